"""Peak memory of one training step, reversible backprop vs ordinary residual layers (the paper's claim).

    python -m bench.bench_train_memory [--device cuda|cpu]

The same model, the same tokens, one forward + backward each, every measurement in a fresh process:
- GPU: the GPU training preset (6 layers, d=512) at 16K and 64K tokens, bf16 autocast; peak allocated
  memory above the weights and their gradients (torch.cuda.max_memory_allocated). An ordinary run that
  does not fit is reported as such.
- CPU: the CPU training preset's shape (4 layers, d=256) and a 12-layer version of it at 4K and 16K tokens; peak
  resident memory (ru_maxrss) above the process's resident memory before the step.
Writes bench/results/train-memory-<device>.json for `python -m bench.report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys

import torch

from bench import RESULTS, ROOT
from model.reformer import ReformerLM
from training.train import PRESETS, language_model_loss, vocabulary_size

PLAN = {
    "cuda": {"preset": "gpu", "lengths": (16384, 65536), "layers": (6,)},
    "cpu": {"preset": "cpu", "lengths": (4096, 16384), "layers": (4, 12)},
    "quick": {"preset": "tiny", "lengths": (512,), "layers": (2,)},  # a smoke run
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(device_type: str, preset: str, length: int, layers: int, reversible: bool) -> dict:
    """Run in a fresh process: the peak memory of one forward + backward, beyond the model and its gradients."""
    device = torch.device(device_type)
    make_config, settings = PRESETS[preset]
    config = make_config(vocabulary_size(settings.tokenizer))
    kinds = tuple(config.attn_layers[i % len(config.attn_layers)] for i in range(layers))
    config = dataclasses.replace(config, attn_layers=kinds)
    torch.manual_seed(0)
    model = ReformerLM(config).to(device).train()
    ids = torch.randint(3, 200, (1, length + 1), device=device)
    gpu = device.type == "cuda"

    def training_step(tokens: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = language_model_loss(model, tokens, reversible=reversible)
        loss.backward()

    # A short step first, so that one-time allocations (libraries, cuBLAS workspaces, gradient buffers)
    # are not counted as the step's.
    training_step(ids[:, : 4 * config.lsh_attn_chunk_length + 1])
    model.zero_grad(set_to_none=False)
    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            training_step(ids)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            return {"fits": False}
        return {"fits": True, "peak_bytes": torch.cuda.max_memory_allocated() - before}
    before = _rss_bytes()
    training_step(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"fits": True, "peak_bytes": peak - before}


def measure(device_type: str, preset: str, length: int, layers: int, reversible: bool) -> dict:
    command = [sys.executable, "-m", "bench.bench_train_memory", "--one",
               json.dumps([device_type, preset, length, layers, reversible])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        if "out of memory" in done.stderr.lower():
            return {"fits": False}
        raise RuntimeError(f"{command} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny preset at one short length (a smoke run)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_step(*json.loads(args.one))))
        return
    plan = PLAN["quick" if args.quick else args.device]
    rows = []
    for layers in plan["layers"]:
        for length in plan["lengths"]:
            row = {"layers": layers, "tokens": length}
            for mode in ("reversible", "ordinary"):
                row[mode] = measure(args.device, plan["preset"], length, layers, mode == "reversible")
                print(layers, length, mode, row[mode], flush=True)
            rows.append(row)
    gpu = args.device == "cuda"
    result = {
        "benchmark": "train_memory",
        "device_type": args.device,
        "device": torch.cuda.get_device_name() if gpu else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "preset": plan["preset"],
        "measure": "peak allocated GPU memory above the weights and their gradients, bf16 autocast" if gpu
        else "peak resident memory above the process's before the step, fp32",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train-memory-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
