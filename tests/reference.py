"""The oracle: transformers' Reformer on CPU in fp32, and helpers that build matching pairs of models.

Random draws come from TEST_SEED (printed by the tests), so any failure can be replayed exactly:
    TEST_SEED=<seed> python -m pytest tests/...
"""

from __future__ import annotations

import math
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ReformerConfig as HFConfig  # noqa: E402
from transformers import ReformerModel, ReformerModelWithLMHead  # noqa: E402

from model.checkpoint import convert_hf_state_dict  # noqa: E402
from model.config import ReformerConfig  # noqa: E402
from model.reformer import ReformerLM  # noqa: E402
from tests.seed import SEED, rng_for  # noqa: E402,F401

TINY = dict(
    vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=8,
    attn_layers=["local", "lsh", "local", "lsh"], lsh_attn_chunk_length=4, local_attn_chunk_length=4,
    lsh_num_chunks_before=1, lsh_num_chunks_after=0, local_num_chunks_before=1, local_num_chunks_after=0,
    num_buckets=4, num_hashes=2, feed_forward_size=64, hidden_act="relu", hidden_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0, axial_pos_embds=True,
    axial_pos_shape=[4, 16], axial_pos_embds_dim=[16, 16], max_position_embeddings=64, is_decoder=True,
    hash_seed=0, pad_token_id=0, eos_token_id=None,
)


def random_hf_kwargs(rng: random.Random, *, decoder: bool = True) -> dict:
    """A random tiny config: local/LSH mixes, int or factorised buckets, 1-4 rounds, 0-2 chunks around."""
    heads = rng.choice([1, 2, 3])
    lsh_chunk = rng.choice([4, 8])
    local_chunk = rng.choice([4, 8])
    layers = [rng.choice(["lsh", "local"]) for _ in range(rng.randint(1, 4))]
    buckets = rng.choice([2, 4, 8, [2, 2], [2, 4], [4, 2]])
    hidden = rng.choice([16, 32])
    axial = rng.random() < 0.75
    max_positions = 64
    kwargs = dict(TINY)
    kwargs.update(
        hidden_size=hidden, num_attention_heads=heads, attention_head_size=rng.choice([4, 8]),
        attn_layers=layers, lsh_attn_chunk_length=lsh_chunk, local_attn_chunk_length=local_chunk,
        lsh_num_chunks_before=rng.randint(0, 2), local_num_chunks_before=rng.randint(0, 2),
        lsh_num_chunks_after=0 if decoder else rng.randint(0, 2),
        local_num_chunks_after=0 if decoder else rng.randint(0, 2),
        num_buckets=buckets, num_hashes=rng.randint(1, 4), feed_forward_size=rng.choice([32, 64]),
        hidden_act=rng.choice(["relu", "gelu", "gelu_new"]), axial_pos_embds=axial,
        axial_pos_shape=[4, 16], axial_pos_embds_dim=[hidden // 2, hidden // 2],
        max_position_embeddings=max_positions, is_decoder=decoder, hash_seed=rng.randint(0, 10_000),
    )
    return kwargs


def describe(kwargs: dict) -> str:
    keys = ("attn_layers", "num_attention_heads", "lsh_attn_chunk_length", "local_attn_chunk_length",
            "lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before", "local_num_chunks_after",
            "num_buckets", "num_hashes", "axial_pos_embds", "hash_seed")
    return f"TEST_SEED={SEED} " + " ".join(f"{k}={kwargs[k]}" for k in keys)


def sharpen(model: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale every matrix so outputs depend strongly on every detail (default init hides differences)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(factor)


def build_pair(kwargs: dict, *, seed: int = 0, sharp: bool = True, lm: bool = True):
    """(reference model, our model) with identical weights and rotations, both in eval mode."""
    torch.manual_seed(seed)
    hf_config = HFConfig(**kwargs)
    reference = (ReformerModelWithLMHead if lm else ReformerModel)(hf_config).eval()
    if sharp:
        sharpen(reference)
    config = ReformerConfig.from_hf_dict(hf_config.to_dict())
    ours = ReformerLM(config).eval()
    state = convert_hf_state_dict(reference.state_dict(), config)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("rotations") or name.startswith("lm_head") for name in missing)
    return reference, ours


def random_ids(rng: random.Random, batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.tensor([[rng.randrange(1, vocab) for _ in range(length)] for _ in range(batch)])


def normalize_reference_round_offsets(config: ReformerConfig, prompt_length: int, cache) -> None:
    """Rewrite the reference's cached buckets so that every round is offset by `buckets`, not `buckets + 1`.

    After a padded prefill the reference caches buckets offset per round by (buckets + 1) (room for its
    padding bucket), while the tokens it appends later are offset by either (buckets + 1) or `buckets`
    depending on a heuristic, `max(bucket) > rounds * buckets - 1`, that misses whenever no cached token of
    the last round sits in a top bucket. New tokens then sort against the cache as if their bucket were
    smaller by the round number. Offsets never matter inside one round, so making them uniform changes
    nothing but that bug: the oracle then computes the consistent ordering that we implement.
    """
    if config.padded_length(prompt_length) == prompt_length:
        return  # no padding bucket: offsets are already `buckets` per round
    rounds = config.num_hashes
    shift = torch.arange(rounds).view(1, 1, rounds, 1)
    for layer, kind in enumerate(config.attn_layers):
        cached = cache.buckets_cache[layer]
        if kind == "lsh" and cached.numel():
            cache.buckets_cache[layer] = cached - shift  # r * (buckets + 1) -> r * buckets


def lcm_chunk(kwargs: dict) -> int:
    lengths = []
    if "lsh" in kwargs["attn_layers"]:
        lengths.append(kwargs["lsh_attn_chunk_length"])
    if "local" in kwargs["attn_layers"]:
        lengths.append(kwargs["local_attn_chunk_length"])
    return math.lcm(*lengths)
