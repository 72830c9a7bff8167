"""Correctness on a GPU, with explicit tolerances: `pytest -m gpu` on a CUDA machine (skipped elsewhere).

- the fused Triton kernel against the plain-torch path, fp16 and bf16 inputs (the kernel's launch asserted);
- our full forward against the reference on the GPU in fp32, rotations drawn as the reference draws them on CUDA;
- half precision: the model in fp16 / bf16 with the kernel is no further from its fp32 forward than the same
  half-precision model on the plain-torch path (the kernel adds no error of its own);
- decode steps replayed from CUDA graphs against eager steps, fp32 and fp16;
- the engine on the GPU against the engine on the CPU: prompt logprobs (echo), n choices, embeddings.

With `REFORMER_GPU_RESULTS=FILE` each measured difference, its tolerance and its verdict are written to FILE
(`python -m bench.report` renders bench/results/gpu-tests-*.json in BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_core import BENCH_MODEL, build_models, prompt
from model import attention
from model.decode import Decoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")

# Max abs difference of attention outputs (unit-variance values): ~2 units in the last place of each type.
KERNEL_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
FORWARD_FP32_TOLERANCE = 1e-4  # logits, ours vs the reference, both fp32 on the GPU
HALF_ERROR_RATIO = 1.5  # the kernel's half-precision error may be at most this times the torch path's
GRAPHS_TOLERANCE = 0.0  # a replayed graph runs the same kernels on the same inputs as the eager step


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's launches in this test (the dispatcher imports `chunk_attention` at each call)."""
    from model import chunk_kernel

    calls = []
    launch = chunk_kernel.chunk_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(chunk_kernel, "chunk_attention", counted)
    return calls


def use_backend(monkeypatch, backend: str) -> None:
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_the_torch_path(dtype, kernel_calls, gpu_check):
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, heads, count, chunk, dim, before, after, causal, self_mask, with_valid in [
            (1, 8, 64, 128, 64, 1, 0, True, False, False), (2, 8, 32, 256, 64, 1, 0, True, True, True),
            (1, 4, 16, 64, 128, 2, 1, False, True, True)]:
        shape = (batch, heads, count, chunk, dim)
        q, k, v = (torch.randn(shape, generator=generator).to(CUDA, dtype) for _ in range(3))
        pos = torch.randperm(count * chunk, generator=generator).view(1, 1, count, chunk)
        pos = pos.expand(batch, heads, -1, -1).to(CUDA)
        valid = (torch.rand(batch, 1, count, chunk, generator=generator) > 0.2).to(CUDA) if with_valid else None
        options = dict(before=before, after=after, causal=causal, self_mask=self_mask)
        expected, _ = attention.chunked_attention(q.float(), k.float(), v.float(), pos, valid, **options,
                                                  backend="torch")
        assert not kernel_calls
        actual, _ = attention.chunked_attention(q, k, v, pos, valid, **options, backend="triton")
        assert len(kernel_calls) == 1, "the kernel did not run"
        kernel_calls.clear()
        worst = max(worst, (actual.float() - expected).abs().max().item())
    gpu_check(f"kernel vs torch, {str(dtype)[6:]} inputs (max abs)", worst, KERNEL_TOLERANCE[dtype])


def cuda_rotations(ours) -> None:
    """The reference draws its rotations with torch.randn on the model's device: on CUDA, another draw."""
    shape = next(block.attn.rotations.shape for block in ours.layers if block.kind == "lsh")
    torch.manual_seed(BENCH_MODEL["hash_seed"])
    drawn = torch.randn(shape, device=CUDA, dtype=torch.float32)
    for block in ours.layers:
        if block.kind == "lsh":
            block.attn.rotations.copy_(drawn)


def test_forward_matches_the_reference_in_fp32(gpu_check):
    reference, ours = build_models(CUDA, torch.float32)
    cuda_rotations(ours)
    ids = torch.tensor([prompt(4096)], device=CUDA)
    with torch.no_grad():
        difference = (reference(ids).logits - ours(ids)).abs().max().item()
    gpu_check("full forward vs the reference, fp32, 4,096 tokens (max abs logits)", difference,
              FORWARD_FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward_with_the_kernel_is_as_close_to_fp32_as_without(dtype, kernel_calls, monkeypatch,
                                                                                gpu_check):
    _, ours = build_models(CUDA, torch.float32)
    ids = torch.tensor([prompt(16384)], device=CUDA)
    with torch.no_grad():
        use_backend(monkeypatch, "torch")
        exact = ours(ids)
        half = ours.to(dtype)
        torch_error = (half(ids).float() - exact).abs().max().item()
        assert not kernel_calls
        use_backend(monkeypatch, "triton")
        kernel_error = (half(ids).float() - exact).abs().max().item()
        assert kernel_calls, "the kernel did not run"
    gpu_check(f"{str(dtype)[6:]} forward with the kernel: error vs fp32 ÷ the torch path's (16,384 tokens)",
              kernel_error / torch_error, HALF_ERROR_RATIO)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_graph_replays_match_eager_steps(dtype, gpu_check):
    _, ours = build_models(CUDA, dtype)
    runs = {}
    for graphs in (True, False):
        decoder = Decoder(ours, num_slots=6, max_length=2048, tail_capacity=16, cuda_graphs=graphs)
        slots = [decoder.allocate() for _ in range(5)]
        decoder.prefill([(slot, prompt(300 + 97 * i, seed=i)) for i, slot in enumerate(slots)])
        steps = []
        for t, token in enumerate(prompt(40, seed=9)):  # batches of 1 and 5, tails merged on the way
            active = slots[:1] if t % 3 == 0 else slots
            steps.append(decoder.step(active, [token] * len(active)).float().cpu())
        if graphs:
            assert decoder._graphs is not None and not decoder._graphs.failed, "graph capture failed"
        runs[graphs] = steps
    difference = max((a - b).abs().max().item() for a, b in zip(runs[True], runs[False]))
    gpu_check(f"decode steps, CUDA graphs vs eager, {str(dtype)[6:]} (max abs logits)", difference, GRAPHS_TOLERANCE)


def test_the_engine_serves_every_request_kind_on_the_gpu_as_on_the_cpu(tmp_path, gpu_check):
    """Paths the CPU tests cover but that only a GPU can break by mixing devices: the prompt's logprobs (echo
    with logprobs), n choices from one prefill, stop strings, embeddings. fp32 on both devices."""
    import numpy as np

    from model import ByteTokenizer, SamplingParams, load_model
    from model.engine import Engine
    from model.messages import EmbedRequest, Embeddings, Failed, GenerateRequest, PromptLogprobs, Token
    from tests.server_harness import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "tiny")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
    runs = {}
    for device in ("cpu", "cuda"):
        engine = Engine(load_model(path).to(device), ByteTokenizer(), max_running=4)
        engine.submit(GenerateRequest("echo", (5, 6, 7, 8), greedy, prompt_logprobs=True))
        engine.submit(GenerateRequest("n", (9, 10), greedy, n=2, stop=("zz",)))
        engine.submit(EmbedRequest("embed", ((5, 6, 7), (8, 9))))
        outputs = []
        for _ in range(1000):
            if not engine.has_work():
                break
            outputs += [output for _, output in engine.iteration()]
        assert not [o for o in outputs if isinstance(o, Failed)], device
        runs[device] = {
            "prompt": next(o for o in outputs if isinstance(o, PromptLogprobs)).token_logprobs[1:],
            "tokens": [(o.uid, o.index, o.token) for o in outputs if isinstance(o, Token)],
            "embeddings": next(o for o in outputs if isinstance(o, Embeddings)).vectors,
        }
    cpu, cuda = runs["cpu"], runs["cuda"]
    assert cuda["tokens"] == cpu["tokens"]
    gpu_check("engine: prompt logprobs, GPU vs CPU (max abs)",
              float(np.abs(np.array(cuda["prompt"]) - np.array(cpu["prompt"])).max()), 1e-4)
    gpu_check("engine: embeddings, GPU vs CPU (max abs)",
              float(np.abs(cuda["embeddings"] - cpu["embeddings"]).max()), 1e-4)
