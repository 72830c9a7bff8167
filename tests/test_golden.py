"""The reference's integration-test golden values (checked against trax in 2020), reproduced by our code.

Weights come from the reference initialised with torch.manual_seed(0), exactly as its tests build them;
every number below is then computed by our implementation alone.
"""

import pytest
import torch

from tests.reference import HFConfig, ReformerModel, transformers  # noqa: F401
from model.checkpoint import convert_hf_state_dict
from model.config import ReformerConfig
from model.reformer import ReformerBlock, ReformerLM

BASE = {
    "vocab_size": 320, "attention_head_size": 8, "hidden_size": 16, "num_attention_heads": 2, "num_buckets": 2,
    "num_hashes": 4, "lsh_attn_chunk_length": 4, "local_attn_chunk_length": 4, "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0, "local_num_chunks_before": 1, "local_num_chunks_after": 0, "chunk_size_lm_head": 0,
    "chunk_size_feed_forward": 0, "feed_forward_size": 32, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "lsh_attention_probs_dropout_prob": 0.0, "local_attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 32, "initializer_range": 0.02, "axial_norm_std": 1.0, "layer_norm_eps": 1e-12,
    "axial_pos_embds": True, "axial_pos_shape": [4, 8], "axial_pos_embds_dim": [8, 8], "hash_seed": 0,
    "is_decoder": True,
}

HIDDEN = torch.tensor([[
    [1.90826353, -1.45999730, -0.620405462, 1.52503433, -0.364464232, -0.827359235, 0.839670803, 0.244492178,
     0.498332758, 2.69175139, -0.00708081422, 1.04915401, -1.83476661, 0.767220476, 0.298580543, 0.0284803992],
    [-0.0266374286, 0.433497576, 0.310386309, 0.546039944, -0.000247292666, -0.752305019, 0.239162103,
     0.725216186, -0.758357372, 0.420635998, -0.0404739919, 0.159924145, 2.05135748, -1.15997978, 0.537166397,
     0.262873606],
    [0.185247482, 0.707046037, -0.677089715, -2.24209655, -0.037530798, -0.859380874, -2.81027884, 1.01276376,
     -1.69438001, 0.41757466, -1.49196962, -1.76483717, -0.194566312, -1.71183858, 0.772903565, -1.11557056],
    [0.946069193, 0.153417623, -0.958686996, 0.118126669, 1.75967724, 1.6219459, -0.574108159, 0.679920443,
     0.544028163, 0.205466114, -0.363045868, 0.241865062, 0.320348382, -0.905611176, -0.192690727, -1.19917547],
]])
LAYER_MASK = torch.tensor([[0, 1, 0, 0]], dtype=torch.bool)
INPUT_IDS = torch.tensor([
    [89, 279, 286, 84, 194, 316, 182, 28, 283, 37, 169, 7, 253, 267, 107, 250, 44, 7, 102, 62, 3, 243, 171, 265,
     302, 48, 164, 264, 148, 229, 280, 150],
    [9, 192, 66, 112, 163, 83, 135, 70, 224, 96, 31, 80, 196, 80, 63, 22, 85, 100, 47, 283, 0, 163, 126, 143, 195,
     82, 53, 82, 18, 27, 182, 52],
])
MODEL_MASK = torch.tensor([
    [1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0],
], dtype=torch.bool)


def _config(**changes) -> dict:
    config = dict(BASE)
    config.update(changes)
    return config


def _our_block(changes: dict) -> ReformerBlock:
    from transformers.models.reformer.modeling_reformer import ReformerLayer

    kwargs = _config(**changes)
    torch.manual_seed(0)
    reference = ReformerLayer(HFConfig(**kwargs))
    config = ReformerConfig.from_hf_dict(HFConfig(**kwargs).to_dict())
    state = {f"reformer.encoder.layers.0.{k}": v for k, v in reference.state_dict().items()}
    ours = convert_hf_state_dict(state, config)
    block = ReformerBlock(config, config.attn_layers[0]).eval()
    block.load_state_dict({k.removeprefix("layers.0."): v for k, v in ours.items() if k.startswith("layers.0.")},
                          strict=False)
    return block


def _our_model(changes: dict, head: str | None) -> ReformerLM:
    from transformers import ReformerForMaskedLM

    kwargs = _config(**changes)
    torch.manual_seed(0)
    reference = (ReformerForMaskedLM if head == "mlm" else ReformerModel)(HFConfig(**kwargs))
    config = ReformerConfig.from_hf_dict(HFConfig(**kwargs).to_dict())
    model = ReformerLM(config).eval()
    model.load_state_dict(convert_hf_state_dict(reference.state_dict(), config), strict=False)
    return model


@pytest.mark.parametrize("name, changes, mask, expected", [
    ("lsh_layer_forward", {"lsh_num_chunks_before": 0, "attn_layers": ["lsh"], "is_decoder": False}, None,
     [1.6879, -1.3083, -0.4708, 1.3555, -0.6292]),
    ("lsh_layer_forward_complex", {"lsh_num_chunks_before": 0, "attn_layers": ["lsh"], "num_buckets": [2, 4]},
     LAYER_MASK, [1.6439, -1.2306, -0.5108, 1.3006, -0.6537]),
    ("local_layer_forward", {"local_num_chunks_before": 0, "attn_layers": ["local"], "is_decoder": False}, None,
     [1.4212, -2.0576, -0.9688, 1.4599, -0.1344]),
    ("local_layer_forward_complex", {"local_num_chunks_before": 0, "attn_layers": ["local"]}, LAYER_MASK,
     [1.4750, -2.0235, -0.9743, 1.4463, -0.1269]),
])
def test_layer_golden_slices(name, changes, mask, expected):
    block = _our_block(changes)
    with torch.no_grad():
        _, y2, _ = block(HIDDEN.clone(), HIDDEN.clone(), mask)
    torch.testing.assert_close(y2[0, 0, :5], torch.tensor(expected), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name, changes, head, row, expected", [
    ("lsh_model_forward", {"attn_layers": ["lsh"] * 4, "num_buckets": [2, 4]}, None, (0, 0),
     [-0.9896, -0.9396, -1.0831, -0.0597, 0.2456]),
    ("local_model_forward", {"attn_layers": ["local"] * 4}, None, (0, 0),
     [-1.6791, 0.7171, 0.1594, 0.4063, 1.2584]),
    ("lm_model_forward", {"attn_layers": ["local", "lsh"] * 3, "num_buckets": [2, 4], "is_decoder": False}, "mlm",
     (1, -1), [0.1018, -0.2026, 0.2116, 0.0270, -0.1233]),
])
def test_model_golden_slices(name, changes, head, row, expected):
    model = _our_model(changes, head)
    with torch.no_grad():
        if head == "mlm":
            out = model(INPUT_IDS, MODEL_MASK)
        else:
            out = model.hidden_states(INPUT_IDS, MODEL_MASK)
    torch.testing.assert_close(out[row[0], row[1], :5], torch.tensor(expected), rtol=1e-3, atol=1e-3)
