"""Correctness checks that need a GPU (CPU CI cannot run them), written into the benchmark results.

    python -m bench.gpu_checks

- the fused Triton attention kernel against the torch path (in fp32), fp16 and bf16 inputs;
- our full forward against the reference on the GPU in fp32 (rotations drawn as the reference draws them
  on CUDA, which differs from the CPU draw), and our fp16 full forward with the kernel against the torch path;
- decode steps replayed from CUDA graphs against eager steps, fp32 and fp16, batches 1 and 5.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import time
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_core import BENCH_MODEL, build_models, prompt  # noqa: E402
from model import attention  # noqa: E402
from model.chunk_kernel import chunk_attention  # noqa: E402
from model.decode import Decoder  # noqa: E402


def kernel_vs_torch(dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, heads, count, chunk, dim, before, after, causal, self_mask, with_valid in [
            (1, 8, 64, 128, 64, 1, 0, True, False, False), (2, 8, 32, 256, 64, 1, 0, True, True, True),
            (1, 4, 16, 64, 128, 2, 1, False, True, True)]:
        shape = (batch, heads, count, chunk, dim)
        q, k, v = (torch.randn(shape, generator=g).cuda().to(dtype) for _ in range(3))
        pos = torch.randperm(count * chunk, generator=g).view(1, 1, count, chunk).expand(batch, heads, -1, -1).cuda()
        valid = (torch.rand(batch, 1, count, chunk, generator=g) > 0.2).cuda() if with_valid else None
        masked, self_value = attention.mask_values(dtype)
        attention.ATTENTION_BACKEND = "torch"  # the blocked torch path is the expectation
        expected = attention.chunked_attention(q.float(), k.float(), v.float(), pos, valid, before=before,
                                               after=after, causal=causal, self_mask=self_mask)
        attention.ATTENTION_BACKEND = "auto"
        actual = chunk_attention(q, k, v, pos, valid, before=before, after=after, causal=causal,
                                 self_mask=self_mask, masked=masked, self_value=self_value)
        worst = max(worst, (actual[0].float() - expected[0]).abs().max().item())
    return worst


def forward_vs_reference(length: int) -> float:
    reference, ours = build_models(torch.device("cuda"), torch.float32)
    shape = next(b.attn.rotations.shape for b in ours.layers if b.kind == "lsh")
    torch.manual_seed(BENCH_MODEL["hash_seed"])
    cuda_rotations = torch.randn(shape, device="cuda", dtype=torch.float32)  # what the reference draws on CUDA
    for block in ours.layers:
        if block.kind == "lsh":
            block.attn.rotations.copy_(cuda_rotations)
    ids = torch.tensor([prompt(length)], device="cuda")
    with torch.no_grad():
        return (reference(ids).logits - ours(ids)).abs().max().item()


def model_kernel_vs_torch(length: int) -> float:
    _, ours = build_models(torch.device("cuda"), torch.float16)
    ids = torch.tensor([prompt(length)], device="cuda")
    with torch.no_grad():
        attention.ATTENTION_BACKEND = "torch"
        expected = ours(ids).float()
        attention.ATTENTION_BACKEND = "auto"
        actual = ours(ids).float()
    return (expected - actual).abs().max().item()


def graphs_vs_eager(dtype: torch.dtype) -> float:
    _, ours = build_models(torch.device("cuda"), dtype)
    worst = 0.0
    runs = {}
    for graphs in (True, False):
        decoder = Decoder(ours, num_slots=6, max_length=2048, tail_capacity=16, cuda_graphs=graphs)
        slots = [decoder.allocate() for _ in range(5)]
        decoder.prefill([(slot, prompt(300 + 97 * i, seed=i)) for i, slot in enumerate(slots)])
        steps = []
        for t, token in enumerate(prompt(40, seed=9)):
            active = slots[:1] if t % 3 == 0 else slots
            steps.append(decoder.step(active, [token] * len(active)).float().cpu())
        runs[graphs] = steps
        if graphs:
            assert decoder._graphs is not None and not decoder._graphs.failed, "graph capture failed"
    for a, b in zip(runs[True], runs[False]):
        worst = max(worst, (a - b).abs().max().item())
    return worst


def main() -> None:
    only = sys.argv[1:]  # optional check names to run (default: all)
    results = {"benchmark": "gpu_checks", "device": torch.cuda.get_device_name(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "checks": {}}
    checks = results["checks"]
    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where it is instead of nothing
    for name, check, argument in [
            ("kernel_vs_torch_fp16_max_abs", kernel_vs_torch, torch.float16),
            ("kernel_vs_torch_bf16_max_abs", kernel_vs_torch, torch.bfloat16),
            ("forward_vs_reference_fp32_4096_max_abs", forward_vs_reference, 4096),
            ("forward_fp16_kernel_vs_torch_16384_max_abs", model_kernel_vs_torch, 16384),
            ("graphs_vs_eager_fp32_max_abs", graphs_vs_eager, torch.float32),
            ("graphs_vs_eager_fp16_max_abs", graphs_vs_eager, torch.float16)]:
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            checks[name] = check(argument)
        except Exception as error:  # noqa: BLE001 - reported
            checks[name] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"{name}: {checks[name]} ({time.perf_counter() - start:.1f} s)", flush=True)
    faulthandler.cancel_dump_traceback_later()
    out = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results")) / "gpu-checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if only and out.exists():  # a partial rerun updates the earlier results
        earlier = json.loads(out.read_text())
        results["checks"] = {**earlier["checks"], **results["checks"]}
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
