"""Reading reference configs (legacy keys included), validating, and round-tripping our own."""

import json

import pytest

from model.config import ConfigError, ReformerConfig

CRIME_AND_PUNISHMENT = {  # the shape of google/reformer-crime-and-punishment's config.json (legacy keys)
    "architectures": ["ReformerModelWithLMHead"], "attention_head_size": 64, "attention_probs_dropout_prob": 0.1,
    "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"], "axial_norm_std": 1.0, "axial_pos_embds": True,
    "axial_pos_embds_dim": [64, 192], "axial_pos_shape": [512, 1024], "chunk_size_feed_forward": 0,
    "chunk_size_lm_head": 0, "eos_token_id": 2, "feed_forward_size": 512, "hash_seed": None, "hidden_act": "relu",
    "hidden_dropout_prob": 0.05, "hidden_size": 256, "initializer_range": 0.02, "is_decoder": True,
    "layer_norm_eps": 1e-12, "local_attention_probs_dropout_prob": 0.05, "local_attn_chunk_length": 64,
    "lsh_attention_probs_dropout_prob": 0.0, "lsh_attn_chunk_length": 64, "max_position_embeddings": 524288,
    "model_type": "reformer", "num_attention_heads": 2, "num_buckets": [64, 128], "num_chunks_after": 0,
    "num_chunks_before": 1, "num_hashes": 1, "num_hidden_layers": 6, "output_past": True, "pad_token_id": 0,
    "sinusoidal_pos_embds": False, "vocab_size": 320,
}


def test_reads_a_legacy_checkpoint_config():
    config = ReformerConfig.from_hf_dict(CRIME_AND_PUNISHMENT)
    assert config.num_buckets == (64, 128) and config.total_buckets == 8192 and config.rotation_size == 192
    assert config.lsh_num_chunks_before == 1 and config.local_num_chunks_before == 1
    assert config.lsh_num_chunks_after == 0 and config.local_num_chunks_after == 0
    assert config.hash_seed == 0  # fixed once instead of fresh rotations per call
    assert config.max_positions == 524288 and config.padding_multiple == 64
    assert config.extra == {"output_past": True}


def test_legacy_keys_do_not_override_explicit_ones():
    data = dict(CRIME_AND_PUNISHMENT, lsh_num_chunks_before=2)
    config = ReformerConfig.from_hf_dict(data)
    assert config.lsh_num_chunks_before == 2 and config.local_num_chunks_before == 1


def test_any_mix_of_layers_and_factorised_buckets():
    config = ReformerConfig.from_hf_dict(dict(CRIME_AND_PUNISHMENT, attn_layers=["lsh", "lsh", "local"],
                                              num_buckets=[4], lsh_attn_chunk_length=32))
    assert config.num_layers == 3 and config.num_buckets == 4 and config.padding_multiple == 64
    assert config.padded_length(10) == 10 and config.padded_length(33) == 64 and config.padded_length(64) == 64


@pytest.mark.parametrize("changes, field", [
    ({"attn_layers": ["lsh", "full"]}, "attn_layers"),
    ({"attn_layers": []}, "attn_layers"),
    ({"num_buckets": 7}, "num_buckets"),
    ({"num_buckets": [4, 3]}, "num_buckets"),
    ({"axial_pos_embds_dim": [64, 64]}, "axial_pos_embds_dim"),
    ({"hidden_act": "swiglu"}, "hidden_act"),
    ({"num_hashes": 0}, "num_hashes"),
    ({"lsh_attn_chunk_length": -4}, "lsh_attn_chunk_length"),
    ({"local_num_chunks_after": 1}, "local_num_chunks_after"),
    ({"eos_token_id": 999}, "eos_token_id"),
    ({"sinusoidal_pos_embds": True}, "sinusoidal_pos_embds"),
    ({"model_type": "bert"}, "model_type"),
])
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as error:
        ReformerConfig.from_hf_dict(dict(CRIME_AND_PUNISHMENT, **changes))
    assert error.value.field == field and field in str(error.value)


def test_missing_num_buckets_is_fixed_once():
    config = ReformerConfig.from_hf_dict(dict(CRIME_AND_PUNISHMENT, num_buckets=None))
    # the reference's rule for its longest input: 2 * 524288 // 64 = 2**14 buckets, factorised as 2**7 * 2**7
    assert config.num_buckets == (128, 128)


def test_our_config_round_trips():
    config = ReformerConfig.from_hf_dict(CRIME_AND_PUNISHMENT)
    data = json.loads(json.dumps(config.to_dict()))  # as reformer.json stores it
    assert ReformerConfig.from_dict(data) == config
    data["surprise"] = 1
    with pytest.raises(ConfigError, match="surprise"):
        ReformerConfig.from_dict(data)
