"""Evaluate the embedded default model on the corpus's test split and write its model card.

    python -m bench.eval_default [--model model/default] [--limit-files N]

- bits per byte of every test file, each read from its start (after an end-of-sequence token, as files
  follow one another in training); files longer than the context are scored with windows that overlap by
  half, so every byte has at least half a context behind it;
- gzip -9, bz2 -9 and xz -9e on exactly the scored bytes (the test files concatenated), computed here;
- bits per byte by position in the file (0-1K, 1K-4K, 4K-16K, 16K+) over the test files longer than 16K
  bytes, and a plot of it at finer positions;
- greedy and sampled continuations of a few prompts.

Writes bench/results/eval-default.json and .png, and model/default/MODEL_CARD.md from them and the training
record (`training.json`); `python -m bench.report` adds the numbers to BENCHMARKS.md.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import corpus  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.generate import generate  # noqa: E402
from model.reformer import ReformerLM  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.tokenizer import ByteTokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
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


def plot(bins: list[dict], baselines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    middles = [max(1, (b["from"] + b["to"]) / 2) for b in bins]
    axes.plot(middles, [b["bpb"] for b in bins], marker="o", label="default model")
    for name, value in baselines.items():
        axes.axhline(value, linestyle="--", linewidth=1, color="gray")
        axes.annotate(name, (middles[0], value), textcoords="offset points", xytext=(2, 3), fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("byte position in the file")
    axes.set_ylabel("bits per byte")
    axes.set_title("Test files longer than 16K bytes: bits per byte by position")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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


# ---- the model card ----------------------------------------------------------------------------------
def _versus_xz(below: float) -> str:
    return f"{100 * below:.1f}% below xz -9e" if below >= 0 else f"{-100 * below:.1f}% above xz -9e"


def _buckets(num_buckets) -> str:
    if isinstance(num_buckets, list):
        return f"{math.prod(num_buckets)} ({' x '.join(map(str, num_buckets))} factorised)"
    return str(num_buckets)


def model_card(result: dict, training: dict, size_bytes: int) -> str:
    config = result["model"]
    history = training["history"]
    validations = [h for h in history if "validation_bpb" in h]
    buckets = result["position_buckets_bpb"]
    compressors = " · ".join(f"{name} {value:.3f}" for name, value in result["compressors_bpb"].items())
    samples = "\n\n".join(
        f"Prompt:\n```python\n{s['prompt']}```\n" + "\n".join(
            f"{kind}:\n```python\n{s['prompt']}{text}\n```" for kind, text in s.items() if kind != "prompt")
        for s in result["samples"])
    return f"""# Model card: the embedded default model (`model/default`)

Generated by `python -m bench.eval_default` from the training record and the evaluation; do not edit by hand.

A byte-level Reformer language model trained from scratch on the Python standard library's source, so that
`python -m server` serves a real model on a fresh machine with no download.

## Data
- The `.py` files of the standard library of Python {training.get('python', '?')} (installed third-party packages
  excluded), gathered by `python -m model.corpus`.
- Split by a hash of each file's path relative to the stdlib root: sha256(path) mod 100 < 90 train, < 95
  validation, else test. Test split here: {result['test_split']['files']} files, {result['test_split']['bytes']:,}
  bytes (sha256 of the stream {result['test_split']['sha256'][:16]}…).
- Training windows are random slices of the train files joined by end-of-sequence tokens.

## Model
{len(config['attn_layers'])} layers `{', '.join(config['attn_layers'])}`, d={config['hidden_size']},
{config['num_attention_heads']} heads of {config['attention_head_size']}, feed-forward {config['feed_forward_size']}
({config['hidden_act']}), chunks of {config['lsh_attn_chunk_length']} with one chunk of look-back,
{config['num_hashes']} hash round over {_buckets(config['num_buckets'])} buckets, axial positions
{config['axial_pos_shape']} (context {config['max_position_embeddings']:,} bytes), vocabulary {config['vocab_size']}
(byte + 2; 0 padding, 2 end of sequence). {result['parameters']:,} parameters; shipped in fp16
({size_bytes / 1e6:.1f} MB, the hash rotations in fp32).

## Training
`python -m model.train --preset {training.get('preset', 'cpu')}`: reversible backprop (block inputs recomputed in
the backward pass with the forward's LSH buckets), chunked feed-forward, AdamW (β 0.9/0.95, weight decay 0.1 on
matrices), linear warm-up then cosine decay, gradient clipping at 1. {training['step']:,} steps,
{training['tokens']:,} tokens ({training['tokens'] / result['model_train_bytes']:.2f} passes over the train split),
{training['seconds'] / 60:.0f} minutes on {training['device']} ({training.get('threads', '?')} threads).
Final validation: {validations[-1]['validation_bpb'] if validations else float('nan'):.3f} bits per byte.

## Evaluation (test split, {result['date'][:10]}, {result['device']})
- **{result['model_bpb']:.3f} bits per byte**; on the same bytes {compressors}; the model is
  {_versus_xz(result['below_xz'])} (target: 15% below). Uniform: {result['uniform_bpb']:.2f}.
- By position in the {result['long_files']} test files longer than 16K bytes:
  {' · '.join(f'{k}: {v:.3f}' for k, v in buckets.items())}.

![bits per byte by position](../../bench/results/eval-default.png)

## Samples
{samples}

## Limitations
- Trained on one corpus (standard-library Python) for a short time: it writes plausible Python with the
  stdlib's style and names, not correct programs, and knows nothing else. Do not use it for anything but
  trying the server.
- It was trained on windows of its full context; text longer than the context cannot be continued beyond it
  (the server refuses prompts that do not fit).
- LSH buckets were sized for full 16K-byte windows (about 32 tokens a bucket); in a short text most buckets
  hold a token or two, so a chunk of sorted tokens mixes unrelated buckets. Quality at the start of a text is
  what the 0-1K column above shows.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--limit-files", type=int, help="only the first N test files (a quick look)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    result = evaluate(args.model, args.limit_files)
    print(json.dumps({k: v for k, v in result.items() if k not in ("position_bins", "samples", "model")}, indent=2))
    if args.limit_files:
        return
    # What the card needs beyond the evaluation: the training record, and the train split's size.
    training = json.loads((args.model / "training.json").read_text())
    result["model_train_bytes"] = corpus.describe(corpus.source_files("train"))["bytes"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result["position_bins"], {"xz -9e": result["compressors_bpb"]["xz -9e"]}, RESULTS / "eval-default.png")
    result["plot"] = "eval-default.png"
    (RESULTS / "eval-default.json").write_text(json.dumps(result, indent=2) + "\n")
    size = (args.model / "model.safetensors").stat().st_size
    (args.model / "MODEL_CARD.md").write_text(model_card(result, training, size))
    print(f"wrote {RESULTS / 'eval-default.json'} and {args.model / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
