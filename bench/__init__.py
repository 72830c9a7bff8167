"""Benchmarks against the competitors (the reference Reformer, plain attention), load tests (`bench.loadtest`),
and the report that renders their results into BENCHMARKS.md."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The recorded results BENCHMARKS.md is rendered from; BENCH_OUT sends a run's results elsewhere (the GPU
# campaign writes into its own folder, and its smoke run into a scratch one).
RESULTS = Path(os.environ["BENCH_OUT"]) if os.environ.get("BENCH_OUT") else ROOT / "bench" / "results"
