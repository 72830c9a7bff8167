"""What a load test's run leaves: its key numbers from locust's CSV files, the table of runs, the plot.

No locust, no server: `bench.report` renders BENCHMARKS.md's load-test section with `runs_table` too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


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


def runs_table(runs: list[dict]) -> list[str]:
    """The table of runs, one row per user count: the run's summary.md and BENCHMARKS.md both show this."""
    lines = ["| users | gate | streamed tokens/s | TTFT p50 / p95 | ITL p50 / p95 | embedding p95 | failures |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        gate = "pass" if run["gate_passed"] else "fail: " + "; ".join(
            run["gate_failures"] or [f"exit {run['exit_code']}"])
        ttft, itl, embed = run["ttft"], run["itl"], run["embeddings"]
        lines.append(
            f"| {run['users']} | {gate} | {run['streamed_tokens_per_second']:.1f} | "
            + (f"{ttft['p50_ms']:,.0f} / {ttft['p95_ms']:,.0f} ms | " if ttft else "- | ")
            + (f"{itl['p50_ms']:,.0f} / {itl['p95_ms']:,.0f} ms | " if itl else "- | ")
            + (f"{embed['p95_ms']:,.0f} ms | " if embed else "- | ") + f"{run['failures']}/{run['requests']} |")
    return lines


def write_summary(out: Path, report: dict) -> None:
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Load test: {report['title']}", "", *runs_table(report["runs"])]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
