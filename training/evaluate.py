"""Evaluate the embedded default model on the corpus's test split and write its model card.

    python -m training.evaluate [--model model/default] [--limit-files N]
    python -m training.evaluate --card-only     # the card again from the recorded evaluation

- bits per byte of every test file, each read from its start (after an end-of-sequence token, as files
  follow one another in training); files longer than the context are scored with windows that overlap by
  half, so every byte has at least half a context behind it;
- gzip -9, bz2 -9 and xz -9e on exactly the scored bytes (the test files concatenated), computed here;
- bits per byte by position in the file (0-1K, 1K-4K, 4K-16K, 16K+) over the test files longer than 16K
  bytes, and a plot of it at finer positions;
- greedy and sampled continuations of a few prompts.

Writes bench/results/eval-default.json and .png, and model/default/MODEL_CARD.md from them and the training
record (`training.json`, `training.model_card`); `python -m bench.report` adds the numbers to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import gzip
import json
import lzma
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_model
from model.generate import generate
from model.reformer import ReformerLM
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer

from . import corpus
from .model_card import model_card, plot

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "bench" / "results"
RESULTS_FILE = RESULTS / "eval-default.json"
DEFAULT_MODEL = ROOT / "model" / "default"
POSITION_BUCKETS = ((0, 1024), (1024, 4096), (4096, 16384), (16384, None))
LONG_FILE = 16384
PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n",
           "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n")


@torch.no_grad()
def byte_bits(model: ReformerLM, data: bytes) -> np.ndarray:
    """-log2 p(byte | everything before it in the file, up to the context) for each byte of `data`."""
    ids = torch.tensor([ByteTokenizer.eos_id] + [b + ByteTokenizer.OFFSET for b in data])
    context = model.config.max_positions
    bits = np.empty(len(data), dtype=np.float64)
    start, scored = 0, 0  # window start; targets (positions in ids, minus one) scored so far
    while scored < len(data):
        window = ids[start: start + context]
        logits = model(window[None].to(model.device))[0].float()
        nats = F.cross_entropy(logits[:-1], window[1:].to(model.device), reduction="none").cpu().numpy()
        # window position p predicts ids[start + p + 1] = data[start + p]; keep those not yet scored
        first = scored - start
        bits[scored: start + len(nats)] = nats[first:] / math.log(2)
        scored = start + len(nats)
        start = scored - context // 2 + 1  # the next window keeps half a context behind its first target
    return bits


def compressor_bits(data: bytes) -> dict[str, float]:
    """Bits per byte of the standard compressors at their strongest settings on `data`."""
    sizes = {"gzip -9": len(gzip.compress(data, compresslevel=9)),
             "bz2 -9": len(bz2.compress(data, compresslevel=9)),
             "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}
    return {name: 8 * size / len(data) for name, size in sizes.items()}


def _range_bits(files: list[np.ndarray], low: int, high: int | None) -> tuple[int, float]:
    """(bytes, mean bits per byte) of positions low..high over the files that reach them."""
    parts = [bits[low:high] for bits in files]
    count = sum(len(part) for part in parts)
    return count, sum(float(part.sum()) for part in parts) / count if count else float("nan")


def position_profile(per_file: list[np.ndarray]) -> tuple[dict[str, float], list[dict]]:
    """Bits per byte by position bucket and by finer (power-of-two) position bins, over long files."""
    long_files = [bits for bits in per_file if len(bits) > LONG_FILE]
    buckets = {}
    for low, high in POSITION_BUCKETS:
        label = f"{low // 1024}K-{high // 1024}K" if high else f"{low // 1024}K+"
        buckets[label] = _range_bits(long_files, low, high)[1]
    bins, low = [], 0
    while any(len(bits) > low for bits in long_files):
        high = max(64, 2 * low)
        count, bpb = _range_bits(long_files, low, high)
        bins.append({"from": low, "to": high, "bytes": count, "bpb": bpb})
        low = high
    return buckets, bins


def continuations(model: ReformerLM) -> list[dict]:
    tokenizer = ByteTokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    greedy = generate(model, prompts, SamplingParams(max_tokens=160, temperature=0.0), num_slots=len(prompts))
    sampled = generate(model, prompts, [SamplingParams(max_tokens=160, temperature=0.8, top_p=0.95, seed=i)
                                        for i in range(len(prompts))], num_slots=len(prompts))
    return [{"prompt": p, "greedy": tokenizer.decode(g.token_ids), "sampled (T=0.8, top-p 0.95)":
             tokenizer.decode(s.token_ids)} for p, g, s in zip(PROMPTS, greedy, sampled)]


def evaluate(model_dir: Path, limit_files: int | None = None) -> dict:
    model = load_model(model_dir).float()
    torch.manual_seed(0)
    files = corpus.source_files("test")[:limit_files]
    started = time.perf_counter()
    per_file = [byte_bits(model, f.data) for f in files]
    seconds = time.perf_counter() - started
    data = b"".join(f.data for f in files)
    total_bits = sum(float(bits.sum()) for bits in per_file)
    buckets, bins = position_profile(per_file)
    baselines = compressor_bits(data)
    model_bpb = total_bits / len(data)
    return {
        "benchmark": "eval_default",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": sys.version.split()[0],
        "test_split": corpus.describe(files),
        "model_bpb": model_bpb,
        "uniform_bpb": math.log2(ByteTokenizer.vocab_size),
        "compressors_bpb": baselines,
        "below_xz": 1 - model_bpb / baselines["xz -9e"],
        "long_files": sum(len(bits) > LONG_FILE for bits in per_file),
        "position_buckets_bpb": buckets,
        "position_bins": bins,
        "eval_seconds": seconds,
        "samples": continuations(model),
        "model": model.config.to_dict(),
        "parameters": model.num_parameters(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--limit-files", type=int, help="only the first N test files (a quick look)")
    parser.add_argument("--card-only", action="store_true",
                        help=f"render the model card from {RESULTS_FILE.relative_to(ROOT)} without evaluating")
    args = parser.parse_args(argv)
    if args.card_only:
        write_card(args.model, json.loads(RESULTS_FILE.read_text()))
        return
    torch.set_grad_enabled(False)
    result = evaluate(args.model, args.limit_files)
    print(json.dumps({k: v for k, v in result.items() if k not in ("position_bins", "samples", "model")}, indent=2))
    if args.limit_files:
        return
    # What the card needs beyond the evaluation: the train split's size.
    result["model_train_bytes"] = corpus.describe(corpus.source_files("train"))["bytes"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result["position_bins"], {"xz -9e": result["compressors_bpb"]["xz -9e"]}, RESULTS / "eval-default.png")
    result["plot"] = "eval-default.png"
    RESULTS_FILE.write_text(json.dumps(result, indent=2) + "\n")
    write_card(args.model, result)


def write_card(model_dir: Path, result: dict) -> None:
    training = json.loads((model_dir / "training.json").read_text())
    size = (model_dir / "model.safetensors").stat().st_size
    (model_dir / "MODEL_CARD.md").write_text(model_card(result, training, size))
    print(f"wrote {model_dir / 'MODEL_CARD.md'} from {RESULTS_FILE}")


if __name__ == "__main__":
    main()
