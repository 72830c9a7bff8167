"""Choose the default model's sampling defaults by what it writes, not by taste.

    python -m training.choose_sampling [--model model/default] [--prompts 16] [--tokens 128] [--apply]

Every candidate setting continues the same prompts, each with its own seed: the beginning of a validation file
up to and including its first `def` line (the test split stays for the model card). Each continuation's
complete non-blank lines are judged by Python's compiler as the model card judges them
(`training.evaluate.judge_lines`): valid before the first syntax error, and code rather than docstring or
comment text. A valid code line that repeats an earlier line of the same continuation is a loop, not writing,
so the score is the share of lines that are valid, new lines of code. The best score wins; `--apply` writes it
into the model's generation_config.json, the defaults a request that does not say gets from the server.

Writes bench/results/sampling-default.json; `python -m bench.report` puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench import RESULTS
from model.checkpoint import GENERATION_DEFAULTS, load_model, read_generation_defaults
from model.generate import generate
from model.sampling import SamplingParams
from model.tokenizer import load_tokenizer

from . import corpus
from .evaluate import DEFAULT_MODEL, ROOT, _valid_so_far, judge_lines
from .subwords import source_text

RESULTS_FILE = RESULTS / "sampling-default.json"
MAX_PROMPT_BYTES = 8192

# Greedy; temperatures from cautious to loose; the repetition penalty (vLLM's, over prompt and output) at none,
# light and strong; min_p as the alternative to top_p.
CANDIDATES = (
    {"temperature": 0.0},
    {"temperature": 0.0, "repetition_penalty": 1.1},
    *({"temperature": t, "top_p": 0.95, "repetition_penalty": r} for t in (0.3, 0.5, 0.7) for r in (1.0, 1.05, 1.15)),
    {"temperature": 0.7, "min_p": 0.1},
    {"temperature": 1.0, "min_p": 0.1},
)


def prompts(count: int) -> list[str]:
    """Beginnings of validation files, up to and including their first function header, at most
    MAX_PROMPT_BYTES and accepted by the compiler as unfinished code."""
    found = []
    for file in corpus.source_files("validation"):
        text = source_text(file.data)
        lines = text.split("\n")
        header = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")
                       and line.rstrip().endswith(":")), None)
        if header is None:
            continue
        prompt = "\n".join(lines[:header + 1]) + "\n"
        if len(prompt.encode()) <= MAX_PROMPT_BYTES and _valid_so_far(prompt):
            found.append(prompt)
        if len(found) == count:
            break
    return found


def score(prompt: str, continuation: str) -> dict[str, int]:
    """Non-blank lines; valid ones; code ones; and new code lines (not a repeat of an earlier line)."""
    seen, counts = set(), {"lines": 0, "valid": 0, "code": 0, "new_code": 0}
    for line in judge_lines(prompt, continuation):
        counts["lines"] += 1
        counts["valid"] += line.valid
        counts["code"] += line.code
        counts["new_code"] += line.code and line.text.strip() not in seen
        seen.add(line.text.strip())
    return counts


def try_setting(model, tokenizer, texts: list[str], ids: list[list[int]], setting: dict, tokens: int) -> dict:
    params = [SamplingParams(max_tokens=tokens, seed=seed, **setting) for seed in range(len(texts))]
    outputs = generate(model, ids, params, num_slots=len(texts))
    totals = {"lines": 0, "valid": 0, "code": 0, "new_code": 0}
    continuations = [tokenizer.decode(output.token_ids) for output in outputs]
    for text, continuation in zip(texts, continuations):
        for key, count in score(text, continuation).items():
            totals[key] += count
    return {"setting": setting, **totals, "score": totals["new_code"] / max(1, totals["lines"]),
            "example": continuations[0]}


def choose(model_dir: Path, count: int, tokens: int) -> dict:
    model = load_model(model_dir).float()
    tokenizer = load_tokenizer(model_dir)
    texts = prompts(count)
    ids = [tokenizer.encode(text) for text in texts]  # once, for every setting
    started = time.perf_counter()
    tried = []
    for setting in CANDIDATES:
        tried.append(try_setting(model, tokenizer, texts, ids, setting, tokens))
        print(f"{tried[-1]['score']:.3f} new code lines per line  {setting}", flush=True)
    best = max(tried, key=lambda entry: entry["score"])  # the first listed wins a tie: the simpler setting
    return {
        "benchmark": "sampling_default",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": _shown(model_dir),
        "prompts": len(texts),
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "previous": read_generation_defaults(model_dir),
        "tried": tried,
        "best": best["setting"],
    }


def _shown(path: Path) -> str:
    """A path as the project names it (relative to its root), wherever it was run from."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def apply(model_dir: Path, setting: dict) -> None:
    """Write `setting` as the model's sampling defaults, keeping any other keys of generation_config.json."""
    path = model_dir / "generation_config.json"
    document = json.loads(path.read_text()) if path.exists() else {}
    for key in GENERATION_DEFAULTS:  # the old setting goes whole, not only the keys the new one names
        document.pop(key, None)
    path.write_text(json.dumps({**setting, **document}, indent=2) + "\n")
    read_generation_defaults(model_dir)  # the server's own check of what was written
    print(f"wrote {path}: {setting}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.choose_sampling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="tokens each continuation is given")
    parser.add_argument("--apply", action="store_true", help="write the winner into MODEL/generation_config.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    result = choose(args.model, args.prompts, args.tokens)
    RESULTS.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: {result['best']}; wrote {RESULTS_FILE}")
    if args.apply:
        apply(args.model, result["best"])


if __name__ == "__main__":
    main()
