"""Run the load test: start the server (or use a running one), run locust headless, gate, summarise, plot.

    python -m bench.loadtest.run --model DIR --users 8 --run-time 60s --sla-ttft-p95 2000 --sla-itl-p95 500
    python -m bench.loadtest.run --host http://127.0.0.1:8000 --users 8 --run-time 60s ...   (a running server)
    python -m bench.loadtest.run --model DIR --sweep 1,2,4,8,16 --run-time 30s ...   (capacity: until the gate fails)

Locust runs as a subprocess (importing it monkey-patches the process), against 127.0.0.1 only, for a
bounded time. Output in --out: locust's CSV files and HTML report, summary.json, summary.md and
latency.png. The exit code is locust's: 0 when the gates pass, 3 when one fails, 1 on other errors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from bench import RESULTS
from bench.launcher import ServerProcess

from .summary import history_points, plot, summarise, sweep_points, write_summary

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
SHAPE = HERE / "shape_ramp_burst.py"
SLA_OPTIONS = ("sla_ttft_p95", "sla_itl_p95", "sla_embedding_p95", "sla_failure_ratio")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest.run", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model", help="checkpoint to serve (default: the embedded model)")
    target.add_argument("--host", help="an already running server on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for python -m server")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--run-time", default="60s", help="per run, e.g. 30s, 2m")
    parser.add_argument("--shape", action="store_true", help="ramp, plateau and a burst of long documents")
    parser.add_argument("--sweep", help="comma-separated user counts, run in turn until a gate fails")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--api-key", default="")
    parser.add_argument("--sla-config", help="JSON file with any of " + ", ".join(SLA_OPTIONS))
    parser.add_argument("--sla-ttft-p95", type=float, help="ms")
    parser.add_argument("--sla-itl-p95", type=float, help="ms")
    parser.add_argument("--sla-embedding-p95", type=float, help="ms")
    parser.add_argument("--sla-failure-ratio", type=float)
    parser.add_argument("--locust-arg", action="append", default=[], help="extra argument for locust")
    parser.add_argument("--record", metavar="DEVICE", help="also write bench/results/loadtest-DEVICE.json and .png "
                                                           "for BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.host and urlparse(args.host).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load tests target this machine only (127.0.0.1)")
    return args


def run_locust(args: argparse.Namespace, host: str, users: int, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    files = f"{LOCUSTFILE},{SHAPE}" if args.shape else str(LOCUSTFILE)
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", host, "-u", str(users),
               "-r", str(args.spawn_rate), "-t", args.run_time, "--stop-timeout", "30", "--csv", str(out / "locust"),
               "--csv-full-history", "--html", str(out / "report.html"), "--only-summary",
               "--api-key", args.api_key, *args.locust_arg]
    if args.sla_config:
        command += ["--sla-config", args.sla_config]
    for option in SLA_OPTIONS:
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    with open(out / "locust.log", "w") as log:
        code = subprocess.call(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if not args.host:
        server = ServerProcess(args.model, "--log-level", "warning", *args.server_arg, api_key=args.api_key or None,
                               log_path=out / "server.log")
    host = args.host or server.url
    try:
        counts = [int(n) for n in args.sweep.split(",")] if args.sweep else [args.users]
        runs = []
        for users in counts:
            run_out = out / f"users-{users}" if args.sweep else out
            code = run_locust(args, host, users, run_out)
            runs.append(summarise(run_out, users, code))
            print(json.dumps(runs[-1]), flush=True)
            if code != 0:
                break
    finally:
        if server is not None:
            server.stop()
    title = f"{len(runs)} run(s) against {'a running server' if args.host else args.model or 'the default model'}"
    points = sweep_points(runs) if args.sweep else history_points(out)
    write_summary(out, {"title": title, "runs": runs, "points": points})
    if points:
        plot(points, out / "latency.png", title)
    if args.record:
        record(args, runs, points, out)
    return runs[-1]["exit_code"]


def record(args: argparse.Namespace, runs: list[dict], points: list[dict], out: Path) -> None:
    import datetime
    import platform
    import shutil

    limits = {key: getattr(args, key) for key in SLA_OPTIONS if getattr(args, key) is not None}
    if args.sla_config:
        limits = {**json.loads(Path(args.sla_config).read_text()), **limits}
    from server.settings import ServerSettings

    config = ServerSettings(model=args.model).model_config() if not args.host else None
    model = "a running server" if config is None else (
        f"{config.num_layers} layers {list(config.attn_layers)}, d={config.hidden_size}, "
        f"{config.num_attention_heads} heads, {config.max_positions:,} positions, {config.vocab_size} tokens")
    document = {"benchmark": "loadtest", "device": args.record, "machine": platform.machine(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": model, "server_args": args.server_arg, "locust_args": args.locust_arg,
                "run_time": args.run_time, "gates": limits, "runs": runs, "plot": f"loadtest-{args.record}.png"}
    (RESULTS / f"loadtest-{args.record}.json").write_text(json.dumps(document, indent=2) + "\n")
    shutil.copy(out / "latency.png", RESULTS / f"loadtest-{args.record}.png")


if __name__ == "__main__":
    sys.exit(main())
