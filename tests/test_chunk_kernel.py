"""The fused Triton attention kernel, run by Triton's CPU interpreter, against the torch path and the oracle.

Each check runs in a child process because TRITON_INTERPRET must be set before Triton compiles anything.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent

# Counts the kernel's launches, so each script can assert that the side it calls "kernel" ran it and the
# side it calls "torch" did not.
COUNT_KERNEL_CALLS = r"""
import model.chunk_kernel as chunk_kernel
kernel_calls = []
_kernel = chunk_kernel.chunk_attention
def counted(*args, **kwargs):
    kernel_calls.append(1)
    return _kernel(*args, **kwargs)
chunk_kernel.chunk_attention = counted
"""

KERNEL_VS_TORCH = COUNT_KERNEL_CALLS + r"""
import torch
import model.attention as attention
g = torch.Generator().manual_seed(0)
cases = [(1, 2, 4, 16, 16, 1, 0, True, True, False), (2, 1, 3, 32, 24, 2, 1, False, True, True),
         (1, 2, 5, 16, 16, 0, 0, True, False, True), (1, 1, 2, 16, 32, 2, 0, True, True, True)]
for batch, heads, count, chunk, dim, before, after, causal, self_mask, with_valid in cases:
    q, k, v = (torch.randn(batch, heads, count, chunk, dim, generator=g) * s for s in (3, 1, 1))
    pos = torch.randperm(count * chunk, generator=g).view(1, 1, count, chunk).expand(batch, heads, -1, -1)
    valid = (torch.rand(batch, 1, count, chunk, generator=g) > 0.3) if with_valid else None
    options = dict(before=before, after=after, causal=causal, self_mask=self_mask)
    expected = attention.chunked_attention(q, k, v, pos, valid, **options, backend="torch")
    assert not kernel_calls, "the torch side ran the kernel"
    actual = attention.chunked_attention(q, k, v, pos, valid, **options, backend="triton")
    assert len(kernel_calls) == 1, "the kernel side did not run the kernel"
    kernel_calls.clear()
    for a, b in zip(actual, expected):
        assert (a - b).abs().max() <= 2e-5, (a - b).abs().max()
    assert (actual[0] * 1.001 - expected[0]).abs().max() > 2e-5  # a slightly wrong kernel would be caught
print("ok")
"""

MODEL_VS_REFERENCE = COUNT_KERNEL_CALLS + r"""
import torch
from tests.reference import TINY, build_pair, random_ids, rng_for
import model.attention as attention
kwargs = dict(TINY, hidden_size=32, attention_head_size=16, lsh_attn_chunk_length=16, local_attn_chunk_length=16,
              num_buckets=[2, 4], num_hashes=3, attn_layers=["lsh", "local", "lsh"],
              axial_pos_shape=[8, 16], max_position_embeddings=128)
reference, ours = build_pair(kwargs)
ids = random_ids(rng_for("kernel-model"), 2, 72, kwargs["vocab_size"])  # padded to 80
with torch.no_grad():
    expected = reference(ids).logits
    actual = ours(ids)
assert attention.ATTENTION_BACKEND == "triton" and kernel_calls, "the model did not run the kernel"
assert (expected - actual).abs().max() <= 1e-5, (expected - actual).abs().max()
for dtype in (torch.float16, torch.bfloat16):  # the kernel returns an fp32 lse beside half outputs
    with torch.no_grad():
        half = ours.to(dtype)(ids)
    assert half.dtype == dtype and torch.isfinite(half).all()
print("ok")
"""


@pytest.mark.parametrize("script", [KERNEL_VS_TORCH, MODEL_VS_REFERENCE], ids=["kernel-vs-torch", "model-vs-reference"])
def test_kernel_in_interpreter(script):
    env = dict(os.environ, TRITON_INTERPRET="1", REFORMER_ATTENTION="triton", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
