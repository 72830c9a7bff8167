"""The load test as CI runs it: short, bounded, against 127.0.0.1, with gates that fail when they should."""

import json

import pytest

from bench.loadtest import run
from tests.server_harness import API_KEY, RunningServer, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("load") / "tiny")


def test_smoke_run_starts_the_server_passes_loose_gates_and_reports(checkpoint, tmp_path):
    config = tmp_path / "sla.json"
    config.write_text(json.dumps({"sla_failure_ratio": 0, "sla_ttft_p95": 60000, "sla_itl_p95": 10000,
                                  "sla_embedding_p95": 60000}))
    code = run.main(["--model", str(checkpoint), "--users", "4", "--spawn-rate", "2", "--run-time", "8s",
                     "--out", str(tmp_path / "out"), "--sla-config", str(config)])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"][0]
    assert code == 0 and summary["gate_passed"] and summary["failures"] == 0
    assert summary["streamed_tokens_per_second"] > 0 and summary["ttft"]["count"] > 0
    assert summary["embeddings"]["count"] > 0 and summary["completions"]["count"] > 0
    for name in ("report.html", "latency.png", "summary.md", "locust_stats_history.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_gate_fails_a_run_that_misses_its_latency_target(checkpoint, tmp_path):
    server = RunningServer(checkpoint)
    try:
        code = run.main(["--host", server.url, "--api-key", API_KEY, "--users", "2", "--spawn-rate", "2",
                         "--run-time", "5s", "--out", str(tmp_path / "out"), "--sla-itl-p95", "0.001",
                         "--sla-failure-ratio", "0"])
    finally:
        server.stop()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"][0]
    assert code == 3 and not summary["gate_passed"]
    assert any("inter-token latency" in line for line in summary["gate_failures"])
    assert summary["failures"] == 0  # the server was fine; only the target was missed


def test_only_this_machine_is_a_target():
    with pytest.raises(SystemExit):
        run.parse_args(["--host", "http://example.com:8000"])
