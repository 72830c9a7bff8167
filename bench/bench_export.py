"""onnxruntime vs PyTorch eager, in one run on one device: embeddings of 1K/4K/16K tokens, decode steps.

    python -m bench.bench_export [--device cpu|cuda] [--quick]

The benchmark model (bench_core's shape, random weights; `--quick`: a 2-layer d=64 model and short lengths) is
exported to a scratch directory first. Each measurement also compares the two: the largest difference of the
embeddings and of the step logits, against a tolerance for the precision (fp32 on a CPU, fp16 graphs on a GPU);
a difference beyond it makes the run exit 1 after writing its results. Writes bench/results/export-<device>.json
(or into $BENCH_OUT); `python -m bench.report` puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from bench import RESULTS
from bench.bench_core import BENCH_MODEL, SMOKE_MODEL, prompt, sync
from export.backend import OnnxDecoder, embed_steps
from export.exporter import export_model
from export.runtime import ExportedModel
from model import ReformerConfig, ReformerLM, embed
from model.decode import Decoder
from model.reformer import drain

LENGTHS = (1024, 4096, 16384)
SLOTS, MAX_LENGTH = 8, 16384 + 256
QUICK_LENGTHS, QUICK_MAX_LENGTH = (256, 512), 1024
# The largest difference allowed between onnxruntime and PyTorch: the same fp32 arithmetic in another order on
# a CPU; on a GPU the CUDA provider's own kernels.
TOLERANCE = {"cpu": 1e-3, "cuda": 2e-2}


def median_seconds(run, device, repeats: int = 3) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)



def step_time(decoder: Decoder, context: int, batch: int, device, steps: int = 40) -> tuple[float, torch.Tensor]:
    slots = [decoder.allocate() for _ in range(batch)]
    decoder.prefill([(slots[0], prompt(context))])
    for slot in slots[1:]:
        decoder.copy_slot(slots[0], slot)
    times, logits = [], []
    for i, token in enumerate(prompt(steps + 3, seed=1)):
        sync(device)
        start = time.perf_counter()
        logits.append(decoder.step(slots, [token] * batch).float().cpu())
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    for slot in slots:
        decoder.free(slot)
    return statistics.median(times), torch.stack(logits)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_export", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and short lengths (a smoke run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape, lengths, max_length = (SMOKE_MODEL, QUICK_LENGTHS, QUICK_MAX_LENGTH) if args.quick else \
        (BENCH_MODEL, LENGTHS, MAX_LENGTH)
    tolerance = TOLERANCE[device.type]
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.from_hf_dict(dict(shape))).eval()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        export_model(model, scratch, slots=SLOTS, max_length=max_length, progress=lambda line: print(line, flush=True))
        export_seconds = time.perf_counter() - started
        model = model.to(device)
        exported = ExportedModel(scratch, str(device))
        result = {"benchmark": "export", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  "device_type": device.type, "provider": exported.provider, "torch": torch.__version__,
                  "export_seconds": export_seconds, "tolerance": tolerance, "embeddings": [], "steps": []}
        for length in lengths:
            documents = [prompt(length)]
            entry = {"tokens": length,
                     "torch_ms": 1e3 * median_seconds(lambda: embed(model, documents), device),
                     "onnx_ms": 1e3 * median_seconds(
                         lambda: drain(embed_steps(exported, model.config, device, documents)), device)}
            ours = embed(model, documents).float().cpu()
            theirs = drain(embed_steps(exported, model.config, device, documents)).float().cpu()
            entry["max_difference"] = float((ours - theirs).abs().max())
            result["embeddings"].append(entry)
            print(json.dumps(entry), flush=True)
        torch_decoder = Decoder(model, SLOTS, max_length, cuda_graphs=False)
        onnx_decoder = OnnxDecoder(model, exported)
        for context, batch in ((lengths[0], 1), (lengths[-1], 1), (lengths[0], SLOTS)):
            torch_seconds, torch_logits = step_time(torch_decoder, context, batch, device)
            onnx_seconds, onnx_logits = step_time(onnx_decoder, context, batch, device)
            entry = {"context": context, "batch": batch, "torch_ms": 1e3 * torch_seconds,
                     "onnx_ms": 1e3 * onnx_seconds,
                     "max_difference": float((torch_logits - onnx_logits).abs().max())}
            result["steps"].append(entry)
            print(json.dumps(entry), flush=True)
    result["parity"] = all(e["max_difference"] <= tolerance for e in result["embeddings"] + result["steps"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"export-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    if not result["parity"]:
        raise SystemExit(f"onnxruntime and PyTorch differ by more than {tolerance}")


if __name__ == "__main__":
    main()
