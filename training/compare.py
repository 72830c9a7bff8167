"""Compare training recipes at equal wall time on this machine, scored on the same validation bytes.

    python -m training.compare --minutes 9 cpu-v1 cpu-mixed cpu-sp cpu-sp-deep

Each recipe (`training.train.PRESETS`) trains from scratch for the same wall time in its own process, one
after another, so each has the whole machine; its learning-rate schedule runs over that time. The result,
with the validation curve of each, goes to bench/results/recipes.json, which `python -m bench.report` renders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from .train import PRESETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "bench" / "results" / "recipes.json"


def run_recipe(preset: str, minutes: float, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "training.train", "--preset", preset, "--out", str(out),
                    "--minutes", str(minutes)], check=True, cwd=ROOT)
    return collect(preset, out)


def collect(preset: str, out: Path) -> dict:
    """A finished recipe's figures, from its run directory."""
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    config = json.loads((out / "checkpoint" / "reformer.json").read_text())["config"]
    validations = [(h["step"], h["validation_bpb"]) for h in progress["history"] if "validation_bpb" in h]
    settings = PRESETS[preset][1]
    return {"preset": preset, "tokenizer": settings.tokenizer, "short_context": settings.short_context,
            "long_every": settings.long_every if settings.short_context else None,
            "layers": len(config["attn_layers"]), "hidden": config["hidden_size"], "vocab": config["vocab_size"],
            "context": config["max_position_embeddings"], "lr": settings.lr,
            "steps": progress["step"], "tokens": progress["tokens"], "seconds": round(progress["seconds"], 1),
            "validation_bpb": validations[-1][1], "curve": validations}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--minutes", type=float, default=9.0, help="wall time of each recipe")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare", help="run directories")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE)
    parser.add_argument("--collect-only", action="store_true",
                        help="write the result from run directories trained earlier, without training")
    args = parser.parse_args(argv)
    results = []
    for preset in args.presets:
        if args.collect_only:
            results.append(collect(preset, args.runs / preset))
        else:
            results.append(run_recipe(preset, args.minutes, args.runs / preset))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    document = {"benchmark": "recipes", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                "minutes_each": args.minutes, "recipes": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
