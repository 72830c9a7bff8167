"""The GPU campaign: every GPU measurement of the product in one command, within a lent machine's minutes.

    python -m bench.gpu_campaign OUT                   # on one H100/H200: about 9 minutes
    python -m bench.gpu_campaign OUT --ort DIR         # onnxruntime-gpu installed with --target DIR
    python -m bench.gpu_campaign OUT --smoke           # tiny sizes on a CPU (the test suite runs this)
    python -m bench.gpu_campaign OUT --only core,server

Stages run one after another, each in its own process with its own time limit, each writing JSON into OUT
(through BENCH_OUT), so that a stage that hangs or runs out of memory costs only itself:
- gpu-tests: the `gpu` pytest marker (kernel vs torch, CUDA graphs vs eager, fp16/bf16 vs fp32);
- core: `bench.bench_core` (decode steps at 1K/16K/64K, batch 1/16/64; forwards 4K-64K beside the reference,
  256K and 1M ours alone);
- server: `bench.bench_server` on the 6-layer d=512 model (1/16/64 streams with 1K and 64K prompts, TTFT of a
  64K prompt alone and while 16 streams decode, embeddings of 64K and 256K documents, engine vs HTTP);
- loadtest: the locust capacity sweep with its SLA gates, on the default model;
- export: `bench.bench_export` (onnxruntime with the CUDA provider beside PyTorch, parity and speed);
- train-memory: `bench.bench_train_memory` (reversible vs ordinary backprop at 16K and 64K tokens).
OUT/campaign.json records each stage (exit status, seconds, files) and the speed targets of issue #15, each
reached or missed with its figure (`bench.targets`). Exit status 1 when a correctness check failed (the gpu
tests, ONNX parity) or a stage crashed or timed out; a missed speed target is reported, not failed; a load-test
sweep that stops at a failing gate has found its capacity, which is what it is for.
Copy the JSON files into bench/results and run `python -m bench.report` to put them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import ROOT
from bench.targets import evaluate_targets

PYTHON = sys.executable


@dataclass
class Stage:
    name: str
    command: list[str]
    seconds: int  # the stage's time limit
    ok_codes: tuple[int, ...] = (0,)
    env: dict[str, str] = field(default_factory=dict)


def gpu_stages(out: Path) -> list[Stage]:
    """About 9 minutes of one H100/H200 (the limits add up to 530 s; most stages finish well within theirs)."""
    return [
        Stage("gpu-tests", [PYTHON, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
              90, env={"REFORMER_GPU_RESULTS": str(out / "gpu-tests-cuda.json")}),
        Stage("core", [PYTHON, "-m", "bench.bench_core", "--device", "cuda"], 130),
        Stage("server", [PYTHON, "-m", "bench.bench_server", "--device", "cuda", "--streams", "1,16,64",
                         "--prompt-tokens", "1024,65000", "--first-token", "1024,65000", "--under-load", "16",
                         "--embed", "65536,262144", "--embed-documents", "8", "--positions", "262144"], 140),
        Stage("loadtest", [PYTHON, "-m", "bench.loadtest.run", "--server-arg=--device", "--server-arg=cuda",
                           "--sweep", "16,64,128", "--run-time", "15s", "--spawn-rate", "64",
                           "--out", str(out / "loadtest"), "--record", "cuda"], 80, ok_codes=(0, 3)),
        Stage("export", [PYTHON, "-m", "bench.bench_export", "--device", "cuda"], 60),
        Stage("train-memory", [PYTHON, "-m", "bench.bench_train_memory", "--device", "cuda"], 30),
    ]


def smoke_stages(out: Path) -> list[Stage]:
    """The same stages at tiny sizes on a CPU, so that the campaign cannot rot between GPU sessions."""
    return [
        Stage("gpu-tests", [PYTHON, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
              120, env={"REFORMER_GPU_RESULTS": str(out / "gpu-tests-cpu.json")}),
        Stage("core", [PYTHON, "-m", "bench.bench_core", "--device", "cpu", "--smoke"], 120),
        Stage("server", [PYTHON, "-m", "bench.bench_server", "--device", "cpu", "--smoke", "--streams", "1,2",
                         "--tokens", "4", "--prompt-tokens", "64", "--first-token", "512", "--under-load", "2",
                         "--embed", "1024", "--embed-documents", "2", "--positions", "4096"], 180),
        Stage("loadtest", [PYTHON, "-m", "bench.loadtest.run", "--sweep", "2", "--run-time", "4s",
                           "--spawn-rate", "2", "--out", str(out / "loadtest"), "--record", "cpu-smoke"],
              120, ok_codes=(0, 3)),
        Stage("export", [PYTHON, "-m", "bench.bench_export", "--device", "cpu", "--quick"], 240),
        Stage("train-memory", [PYTHON, "-m", "bench.bench_train_memory", "--device", "cpu", "--quick"], 120),
    ]


def run_stage(stage: Stage, out: Path, extra_path: str | None) -> dict:
    env = dict(os.environ, BENCH_OUT=str(out), **stage.env)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    log = out / f"{stage.name}.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        try:
            code = subprocess.run(stage.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=stage.seconds, check=False).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            code, timed_out = None, True
    seconds = time.perf_counter() - started
    ok = not timed_out and code in stage.ok_codes
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"stage": stage.name, "command": stage.command, "limit_s": stage.seconds, "seconds": round(seconds, 1),
            "exit_code": code, "timed_out": timed_out, "ok": ok, "log": log.name, "log_tail": [] if ok else tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the results (created)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU")
    parser.add_argument("--only", help="comma-separated stage names")
    parser.add_argument("--ort", help="a folder holding onnxruntime-gpu (pip install --target), put on PYTHONPATH")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = smoke_stages(out) if args.smoke else gpu_stages(out)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {stage.name for stage in stages}
        if unknown:
            parser.error(f"unknown stages {sorted(unknown)}")
        stages = [stage for stage in stages if stage.name in wanted]
    started = datetime.datetime.now(datetime.timezone.utc)
    document = {"benchmark": "gpu_campaign", "date": started.isoformat(timespec="seconds"), "smoke": args.smoke,
                "stages": []}
    for stage in stages:
        print(f"[campaign] {stage.name} (limit {stage.seconds} s)", flush=True)
        document["stages"].append(run_stage(stage, out, args.ort))
        print(f"[campaign] {json.dumps({k: v for k, v in document['stages'][-1].items() if k != 'command'})}",
              flush=True)
        (out / "campaign.json").write_text(json.dumps(document, indent=2) + "\n")
    document["targets"] = evaluate_targets(out, "cpu" if args.smoke else "cuda")
    document["passed"] = all(stage["ok"] for stage in document["stages"])
    (out / "campaign.json").write_text(json.dumps(document, indent=2) + "\n")
    for target in document["targets"]:
        print(f"[target] {target['verdict']:>8}: {target['name']}: {target['figure']}", flush=True)
    return 0 if document["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
