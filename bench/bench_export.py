"""onnxruntime vs PyTorch eager, in one run on one device: embeddings of 1K/4K/16K tokens, decode steps.

    python -m bench.bench_export [--device cpu|cuda]

The benchmark model (bench_core's shape, random weights) is exported to a scratch directory first. Writes
bench/results/export-<device>.json; `python -m bench.report` puts it into BENCHMARKS.md.
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
from bench.bench_core import BENCH_MODEL, prompt, sync
from export.backend import OnnxDecoder, embed_steps
from export.exporter import export_model
from export.runtime import ExportedModel
from model import ReformerConfig, ReformerLM, embed
from model.decode import Decoder
from model.reformer import drain

LENGTHS = (1024, 4096, 16384)
SLOTS, MAX_LENGTH = 8, 16384 + 256


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



def step_time(decoder: Decoder, context: int, batch: int, device, steps: int = 40) -> float:
    slots = [decoder.allocate() for _ in range(batch)]
    decoder.prefill([(slots[0], prompt(context))])
    for slot in slots[1:]:
        decoder.copy_slot(slots[0], slot)
    times = []
    for i, token in enumerate(prompt(steps + 3, seed=1)):
        sync(device)
        start = time.perf_counter()
        decoder.step(slots, [token] * batch)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    for slot in slots:
        decoder.free(slot)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_export", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.from_hf_dict(dict(BENCH_MODEL))).eval()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        export_model(model, scratch, slots=SLOTS, max_length=MAX_LENGTH, progress=lambda line: print(line, flush=True))
        export_seconds = time.perf_counter() - started
        model = model.to(device)
        exported = ExportedModel(scratch, str(device))
        result = {"benchmark": "export", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                  f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  "device_type": device.type, "provider": exported.provider, "torch": torch.__version__,
                  "export_seconds": export_seconds, "embeddings": [], "steps": []}
        for length in LENGTHS:
            documents = [prompt(length)]
            entry = {"tokens": length,
                     "torch_ms": 1e3 * median_seconds(lambda: embed(model, documents), device),
                     "onnx_ms": 1e3 * median_seconds(
                         lambda: drain(embed_steps(exported, model.config, device, documents)), device)}
            result["embeddings"].append(entry)
            print(json.dumps(entry), flush=True)
        torch_decoder = Decoder(model, SLOTS, MAX_LENGTH, cuda_graphs=False)
        onnx_decoder = OnnxDecoder(model, exported)
        for context, batch in ((1024, 1), (16384, 1), (1024, SLOTS)):
            entry = {"context": context, "batch": batch,
                     "torch_ms": 1e3 * step_time(torch_decoder, context, batch, device),
                     "onnx_ms": 1e3 * step_time(onnx_decoder, context, batch, device)}
            result["steps"].append(entry)
            print(json.dumps(entry), flush=True)
    path = RESULTS / f"export-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
