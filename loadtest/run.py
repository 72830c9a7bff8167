"""Run the load test: start the server (or use a running one), run locust headless, gate, summarise, plot.

    python -m loadtest.run --model DIR --users 8 --run-time 60s --sla-ttft-p95 2000 --sla-itl-p95 500
    python -m loadtest.run --host http://127.0.0.1:8000 --users 8 --run-time 60s ...   (a running server)
    python -m loadtest.run --model DIR --sweep 1,2,4,8,16 --run-time 30s ...   (capacity: until the gate fails)

Locust runs as a subprocess (importing it monkey-patches the process), against 127.0.0.1 only, for a
bounded time. Output in --out: locust's CSV files and HTML report, summary.json, summary.md and
latency.png. The exit code is locust's: 0 when the gates pass, 3 when one fails, 1 on other errors.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from server.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
SHAPE = ROOT / "loadtest" / "shape_ramp_burst.py"
SLA_OPTIONS = ("sla_ttft_p95", "sla_itl_p95", "sla_embedding_p95", "sla_failure_ratio")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model", help="checkpoint to serve (default: the embedded model)")
    target.add_argument("--host", help="an already running server on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for python -m server")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4)
    parser.add_argument("--run-time", default="60s", help="per run, e.g. 30s, 2m")
    parser.add_argument("--shape", action="store_true", help="ramp, plateau and a burst of long documents")
    parser.add_argument("--sweep", help="comma-separated user counts, run in turn until a gate fails")
    parser.add_argument("--out", default=str(ROOT / "loadtest" / "out"))
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
        code = subprocess.call(command, cwd=ROOT / "loadtest", stdout=log, stderr=subprocess.STDOUT)
    return code


def summarise(out: Path, users: int, code: int) -> dict:
    """Key numbers of one run from locust's CSV files."""
    rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(open(out / "locust_stats.csv"))}

    def latency(key):
        row = rows.get(key)
        if row is None or int(row["Request Count"]) == 0:
            return None
        return {"p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "count": int(row["Request Count"])}

    total = rows[("", "Aggregated")]
    tokens = sum(float(rows[key]["Requests/s"]) for key in (("SSE", "ttft"), ("SSE", "itl")) if key in rows)
    log = (out / "locust.log").read_text()
    return {
        "users": users, "exit_code": code, "gate_passed": code == 0,
        "gate_failures": [line.removeprefix("SLA FAILED: ") for line in log.splitlines()
                          if line.startswith("SLA FAILED")],
        "requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
        "streamed_tokens_per_second": tokens, "ttft": latency(("SSE", "ttft")), "itl": latency(("SSE", "itl")),
        "stream": latency(("SSE", "stream")), "embeddings": latency(("POST", "/v1/embeddings")),
        "completions": latency(("POST", "/v1/completions")),
    }


def history_points(out: Path) -> list[dict]:
    """Per user count over one run: the median of locust's per-second percentiles and rates."""
    by_users: dict[int, dict[str, list[float]]] = {}
    for row in csv.DictReader(open(out / "locust_stats_history.csv")):
        users = int(row["User Count"])
        if users == 0 or row["95%"] in ("N/A", ""):
            continue
        series = by_users.setdefault(users, {})
        name = row["Name"]
        if name in ("ttft", "itl", "/v1/embeddings"):
            series.setdefault(f"{name}_p50", []).append(float(row["50%"]))
            series.setdefault(f"{name}_p95", []).append(float(row["95%"]))
        if name in ("ttft", "itl"):
            series.setdefault(f"{name}_rate", []).append(float(row["Requests/s"]))
    points = []
    for users, series in sorted(by_users.items()):
        point = {"users": users}
        for key, values in series.items():
            point[key] = sorted(values)[len(values) // 2]
        point["tokens_per_second"] = point.pop("ttft_rate", 0) + point.pop("itl_rate", 0)
        points.append(point)
    return points


def sweep_points(summaries: list[dict]) -> list[dict]:
    points = []
    for s in summaries:
        point = {"users": s["users"], "tokens_per_second": s["streamed_tokens_per_second"]}
        for name, key in (("ttft", "ttft"), ("itl", "itl"), ("/v1/embeddings", "embeddings")):
            if s[key]:
                point[f"{name}_p50"], point[f"{name}_p95"] = s[key]["p50_ms"], s[key]["p95_ms"]
        points.append(point)
    return points


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [p["users"] for p in points]
    figure, (latency, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in (("ttft", "time to first token"), ("itl", "inter-token latency"),
                        ("/v1/embeddings", "embedding request")):
        for percentile, style in (("p50", "--"), ("p95", "-")):
            values = [p.get(f"{name}_{percentile}") for p in points]
            if any(v is not None for v in values):
                latency.plot(users, values, style, marker="o", label=f"{label} {percentile}")
    latency.set(xlabel="users", ylabel="ms", yscale="log", title="latency")
    latency.legend(fontsize=7)
    rate.plot(users, [p["tokens_per_second"] for p in points], marker="o")
    rate.set(xlabel="users", ylabel="streamed tokens / s", title="throughput")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary(out: Path, report: dict) -> None:
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Load test: {report['title']}", "", "| users | gate | streamed tokens/s | TTFT p50/p95 (ms) | "
             "ITL p50/p95 (ms) | embeddings p95 (ms) | failures |", "|---:|---|---:|---:|---:|---:|---:|"]
    for s in report["runs"]:
        ttft = f"{s['ttft']['p50_ms']:.0f} / {s['ttft']['p95_ms']:.0f}" if s["ttft"] else "-"
        itl = f"{s['itl']['p50_ms']:.0f} / {s['itl']['p95_ms']:.0f}" if s["itl"] else "-"
        embed = f"{s['embeddings']['p95_ms']:.0f}" if s["embeddings"] else "-"
        gate = "pass" if s["gate_passed"] else "fail: " + "; ".join(s["gate_failures"] or [f"exit {s['exit_code']}"])
        lines.append(f"| {s['users']} | {gate} | {s['streamed_tokens_per_second']:.1f} | {ttft} | {itl} | {embed} | "
                     f"{s['failures']}/{s['requests']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


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

    results = ROOT / "bench" / "results"
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
    (results / f"loadtest-{args.record}.json").write_text(json.dumps(document, indent=2) + "\n")
    shutil.copy(out / "latency.png", results / f"loadtest-{args.record}.png")


if __name__ == "__main__":
    sys.exit(main())
