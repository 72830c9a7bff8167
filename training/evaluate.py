"""Evaluate the embedded default model on the corpus's test split and write its model card.

    python -m training.evaluate [--model model/default] [--limit-files N]
    python -m training.evaluate --card-only     # the card again from the recorded evaluation

- bits per byte of every test file, each read from its start (after an end-of-sequence token, as files
  follow one another in training); files longer than the context are scored with windows that overlap by
  half, so every token has at least half a context behind it. With a subword vocabulary a token's bits are
  spread evenly over the bytes it stands for, so the figures stay per byte and comparable to the compressors'
  (the one test file that is not UTF-8 is read with replacement characters; the compressors see its bytes);
- gzip -9, bz2 -9 and xz -9e on exactly the scored bytes (the test files concatenated), computed here;
- bits per byte by position in the file (0-1K, 1K-4K, 4K-16K, 16K+) over the test files longer than 16K
  bytes, and a plot of it at finer positions;
- greedy and sampled continuations of a few prompts, each judged by Python's own compiler: how many of its
  non-blank lines come before the first syntax error, and how many of those hold code (a line inside a
  docstring or a comment compiles whatever it says, so it is counted apart).

Writes bench/results/eval-default.json and .png, and model/default/MODEL_CARD.md from them and the training
record (`training.json`, `training.model_card`); `python -m bench.report` adds the numbers to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import bz2
import codeop
import datetime
import gzip
import io
import json
import lzma
import math
import os
import platform
import sys
import time
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import load_model, read_generation_defaults
from model.generate import generate
from model.reformer import ReformerLM
from model.sampling import SamplingParams
from model.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

from . import corpus
from .model_card import model_card, plot
from .subwords import source_text, token_bytes

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "bench" / "results"
RESULTS_FILE = RESULTS / "eval-default.json"
DEFAULT_MODEL = ROOT / "model" / "default"
POSITION_BUCKETS = ((0, 1024), (1024, 4096), (4096, 16384), (16384, None))
LONG_FILE = 16384
PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n",
           "class Stack:\n    \"\"\"A last-in, first-out container.\"\"\"\n\n    def __init__(self):\n")


@torch.no_grad()
def token_bits(model: ReformerLM, tokens: list[int], eos_id: int) -> np.ndarray:
    """-log2 p(token | everything before it in the file, up to the context) for each of `tokens`."""
    ids = torch.tensor([eos_id] + tokens)
    context = model.config.max_length  # the longest window the model runs (padding included)
    bits = np.empty(len(tokens), dtype=np.float64)
    start, scored = 0, 0  # window start; targets (positions in ids, minus one) scored so far
    while scored < len(tokens):
        window = ids[start: start + context]
        logits = model(window[None].to(model.device))[0].float()
        nats = F.cross_entropy(logits[:-1], window[1:].to(model.device), reduction="none").cpu().numpy()
        # window position p predicts ids[start + p + 1] = data[start + p]; keep those not yet scored
        first = scored - start
        bits[scored: start + len(nats)] = nats[first:] / math.log(2)
        scored = start + len(nats)
        start = scored - context // 2 + 1  # the next window keeps half a context behind its first target
    return bits


def byte_bits(model: ReformerLM, tokenizer: Tokenizer, data: bytes) -> np.ndarray:
    """Bits for each byte of a file: each token's bits spread evenly over the bytes it stands for."""
    if isinstance(tokenizer, ByteTokenizer):  # the file's exact bytes, UTF-8 or not
        tokens = [b + ByteTokenizer.OFFSET for b in data]
    else:
        tokens = tokenizer.encode(source_text(data))
    lengths = token_bytes(tokenizer, tokens)
    bits = token_bits(model, tokens, tokenizer.eos_id)
    return np.repeat(bits / np.maximum(lengths, 1), lengths)


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


def continuations(model: ReformerLM, tokenizer: Tokenizer, defaults: dict[str, float]) -> list[dict]:
    """Greedy and sampled continuations of the prompts, and with the sampling the server applies by default
    (the checkpoint's generation_config.json) when there is one."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    kinds = {"greedy": lambda i: SamplingParams(max_tokens=160, temperature=0.0),
             "sampled (T=0.8, top-p 0.95)": lambda i: SamplingParams(max_tokens=160, temperature=0.8, top_p=0.95,
                                                                     seed=i)}
    if defaults:
        shown = ", ".join(f"{key} {value:g}" for key, value in defaults.items())
        kinds[f"as served by default ({shown})"] = lambda i: SamplingParams(max_tokens=160, seed=i, **defaults)
    outputs = {kind: generate(model, prompts, [make(i) for i in range(len(prompts))], num_slots=len(prompts))
               for kind, make in kinds.items()}
    return [{"prompt": p, **{kind: tokenizer.decode(outputs[kind][i].token_ids) for kind in kinds}}
            for i, p in enumerate(PROMPTS)]


def _valid_so_far(source: str) -> bool:
    """Whether Python's compiler accepts `source` as complete code or as code that is merely unfinished (an open
    block or bracket); `codeop` tells the two apart from an error."""
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences warn but compile
            warnings.simplefilter("ignore")
            codeop.compile_command(source, symbol="exec")
    except (SyntaxError, ValueError, OverflowError):
        return False
    return True


# Tokens that are not code: text in strings and comments, and layout.
_NOT_CODE = {tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER} | {getattr(tokenize, name) for name in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                          "FSTRING_END") if hasattr(tokenize, name)}


def _code_rows(source: str) -> set[int]:
    """The rows (from 1) of `source` on which a code token starts. A string still open at the end (the
    compiler accepts it as unfinished) stops the tokenizer, so its rows hold no code."""
    rows = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type not in _NOT_CODE:
                rows.add(token.start[0])
    except (tokenize.TokenError, SyntaxError):
        pass
    return rows


@dataclass(frozen=True)
class JudgedLine:
    text: str
    valid: bool  # before the continuation's first syntax error
    code: bool  # valid, and holds code rather than only docstring or comment text


def judge_lines(prompt: str, continuation: str) -> list[JudgedLine]:
    """The continuation's complete non-blank lines, judged by the compiler after the prompt (a continuation
    cut off mid-function still counts as valid so far)."""
    lines = continuation.split("\n")[:-1]  # the last piece is an unfinished line (or empty)
    source = valid_source = prompt
    judged, broken = [], False  # (row, text, valid)
    for row, line in enumerate(lines, start=prompt.count("\n") + 1):
        source += line + "\n"
        if line.strip():
            broken = broken or not _valid_so_far(source)
            judged.append((row, line, not broken))
            if not broken:
                valid_source = source
    code = _code_rows(valid_source)
    return [JudgedLine(text, valid, valid and row in code) for row, text, valid in judged]


def lines_before_syntax_error(prompt: str, continuation: str) -> dict[str, int]:
    """Of the continuation's complete non-blank lines (`lines`): those before its first syntax error (`valid`)
    and those of them that hold code (`code`)."""
    judged = judge_lines(prompt, continuation)
    return {"valid": sum(line.valid for line in judged), "code": sum(line.code for line in judged),
            "lines": len(judged)}


def python_lines(samples: list[dict]) -> dict[str, dict[str, int]]:
    """For each kind of continuation, `lines_before_syntax_error` summed over the prompts."""
    totals: dict[str, dict[str, int]] = {}
    for sample in samples:
        for kind, text in sample.items():
            if kind == "prompt":
                continue
            entry = totals.setdefault(kind, {"valid": 0, "code": 0, "lines": 0})
            for key, count in lines_before_syntax_error(sample["prompt"], text).items():
                entry[key] += count
    return totals


def evaluate(model_dir: Path, limit_files: int | None = None) -> dict:
    model = load_model(model_dir).float()
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    files = corpus.source_files("test")[:limit_files]
    started = time.perf_counter()
    per_file = [byte_bits(model, tokenizer, f.data) for f in files]
    seconds = time.perf_counter() - started
    data = b"".join(f.data for f in files)
    scored_bytes = sum(len(bits) for bits in per_file)
    tokens = scored_bytes if isinstance(tokenizer, ByteTokenizer) else \
        sum(len(tokenizer.encode(source_text(f.data))) for f in files)
    total_bits = sum(float(bits.sum()) for bits in per_file)
    buckets, bins = position_profile(per_file)
    baselines = compressor_bits(data)
    model_bpb = total_bits / scored_bytes
    samples = continuations(model, tokenizer, read_generation_defaults(model_dir))
    return {
        "benchmark": "eval_default",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": sys.version.split()[0],
        "test_split": corpus.describe(files),
        "model_bpb": model_bpb,
        "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else f"sentencepiece:{tokenizer.vocab_size}",
        "bytes_per_token": scored_bytes / tokens,
        "uniform_bpb": math.log2(tokenizer.vocab_size) * tokens / scored_bytes,
        "compressors_bpb": baselines,
        "below_xz": 1 - model_bpb / baselines["xz -9e"],
        "long_files": sum(len(bits) > LONG_FILE for bits in per_file),
        "position_buckets_bpb": buckets,
        "position_bins": bins,
        "eval_seconds": seconds,
        "samples": samples,
        "python_lines": python_lines(samples),
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
