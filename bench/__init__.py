"""Benchmarks against the competitors (the reference Reformer, plain attention), load tests (`bench.loadtest`),
and the report that renders their results into BENCHMARKS.md."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # the recorded results BENCHMARKS.md is rendered from
