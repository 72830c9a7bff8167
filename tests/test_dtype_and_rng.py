"""Precision casts, fp32 hashing, and the rule that nothing touches the process-wide RNG."""

import torch

from model.decode import Decoder
from model.generate import generate
from model.sampling import SamplingParams
from tests.reference import TINY, build_pair, random_ids, rng_for


def test_fp16_then_fp32_then_bf16_gives_no_nan():
    _, model = build_pair(dict(TINY))
    ids = random_ids(rng_for("casts"), 2, 40, TINY["vocab_size"])
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        model = model.to(dtype)
        with torch.no_grad():
            logits = model(ids)
        assert torch.isfinite(logits).all(), dtype
    for block in model.layers:
        if block.kind == "lsh":
            assert block.attn.rotations.dtype == torch.float32


def test_half_precision_decoding_stays_finite_and_close():
    _, model = build_pair(dict(TINY), sharp=False)
    ids = random_ids(rng_for("bf16-decode"), 1, 30, TINY["vocab_size"])
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = Decoder(model.to(dtype), num_slots=1)
        slot = decoder.allocate()
        steps = [decoder.prefill([(slot, ids[0, :10].tolist())]).last_logits[0]]
        steps += [decoder.step([slot], [int(t)])[0] for t in ids[0, 10:]]
        results[dtype] = torch.stack(steps)
        assert torch.isfinite(results[dtype]).all()
    assert (results[torch.bfloat16] - results[torch.float32]).abs().max() < 0.25


def test_hashing_is_fp32_whatever_the_model_dtype():
    _, model = build_pair(dict(TINY))
    block = next(b for b in model.layers if b.kind == "lsh")
    qk = torch.randn(1, TINY["num_attention_heads"], 16, TINY["attention_head_size"],
                     generator=torch.Generator().manual_seed(3))
    expected = block.attn.hash(qk)
    model.to(torch.bfloat16)
    assert torch.equal(block.attn.hash(qk), expected)


def test_model_never_uses_the_global_rng():
    _, model = build_pair(dict(TINY))
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    ids = random_ids(rng_for("rng"), 2, 24, TINY["vocab_size"])
    with torch.no_grad():
        model(ids)
    generate(model, [ids[0, :9].tolist(), ids[1, :5].tolist()],
             SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3))
    assert torch.equal(state, torch.random.get_rng_state())


def test_hashing_long_inputs_in_blocks_changes_nothing(monkeypatch):
    import model.attention as attention

    _, model = build_pair(dict(TINY))
    block = next(b for b in model.layers if b.kind == "lsh")
    qk = torch.randn(2, TINY["num_attention_heads"], 50, TINY["attention_head_size"],
                     generator=torch.Generator().manual_seed(5))
    whole = block.attn.hash(qk)
    monkeypatch.setattr(attention, "HASH_BLOCK", 7)
    assert torch.equal(block.attn.hash(qk), whole)
