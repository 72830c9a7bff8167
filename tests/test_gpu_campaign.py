"""The GPU campaign (`bench.gpu_campaign`): its smoke run end to end on this CPU, so that the script a lent GPU
runs has run here first; how it judges stages and targets."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import ROOT, gpu_campaign
from bench.targets import core_targets, server_targets

SMOKE_FILES = ("core-cpu.json", "server-cpu.json", "export-cpu.json", "train-memory-cpu.json",
               "loadtest-cpu-smoke.json", "campaign.json")


def test_smoke_campaign_runs_every_stage_and_judges_every_target(tmp_path):
    out = tmp_path / "campaign"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_campaign", str(out), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    campaign = json.loads((out / "campaign.json").read_text())
    failed = [s for s in campaign["stages"] if not s["ok"]]
    assert done.returncode == 0 and not failed, (done.stdout[-3000:], failed)
    assert [s["stage"] for s in campaign["stages"]] == [s.name for s in gpu_campaign.gpu_stages(out)]
    for name in SMOKE_FILES:
        assert (out / name).exists(), name
    core = json.loads((out / "core-cpu.json").read_text())
    assert any(e["reference"].get("skipped") for e in core["forward"])  # the widened model's long forward ran
    server = json.loads((out / "server-cpu.json").read_text())
    assert [e["under_load"] for e in server["first_token"]] == [0, 2]
    assert server["embeddings"][0]["documents_per_second"] > 0
    assert all(s["streamed"]["itl_p50"] is not None for s in server["streams"])
    export = json.loads((out / "export-cpu.json").read_text())
    assert export["parity"] and export["provider"] == "CPUExecutionProvider"
    verdicts = {t["name"]: t["verdict"] for t in campaign["targets"]}
    assert len(verdicts) == 6 and all(v in ("reached", "missed", "not measured") for v in verdicts.values())
    assert "[target]" in done.stdout


def test_a_failed_or_hung_stage_fails_the_campaign_and_keeps_its_log(tmp_path, monkeypatch):
    stages = [gpu_campaign.Stage("fine", [sys.executable, "-c", "print('measured')"], 30),
              gpu_campaign.Stage("crash", [sys.executable, "-c", "print('oops'); raise SystemExit(2)"], 30),
              gpu_campaign.Stage("hang", [sys.executable, "-c", "import time; time.sleep(60)"], 1),
              gpu_campaign.Stage("gate", [sys.executable, "-c", "raise SystemExit(3)"], 30, ok_codes=(0, 3))]
    monkeypatch.setattr(gpu_campaign, "smoke_stages", lambda out: stages)
    assert gpu_campaign.main([str(tmp_path), "--smoke"]) == 1
    result = {s["stage"]: s for s in json.loads((tmp_path / "campaign.json").read_text())["stages"]}
    assert result["fine"]["ok"] and result["gate"]["ok"]
    assert not result["crash"]["ok"] and result["crash"]["exit_code"] == 2 and result["crash"]["log_tail"] == ["oops"]
    assert result["hang"]["timed_out"] and not result["hang"]["ok"]
    monkeypatch.setattr(gpu_campaign, "smoke_stages", lambda out: [stages[0], stages[3]])
    assert gpu_campaign.main([str(tmp_path / "again"), "--smoke"]) == 0


def _step(ms: float) -> dict:
    return {"median_ms": ms}


def test_targets_are_judged_on_the_figures_issue_15_names():
    core = {"steps": [{"context": 1024, "ours_batch1": _step(1.0), "ours_batch64": _step(1.5),
                       "reference_batch1": _step(10.0)},
                      {"context": 65368, "ours_batch1": _step(1.2), "ours_batch64": _step(2.0),
                       "reference_batch1": _step(30.0)}],
            "forward": [{"length": 65536, "ours": {"median_ms": 10.0, "peak_mib": 100.0},
                         "reference": {"median_ms": 60.0, "peak_mib": 500.0}},
                        {"length": 1 << 20, "ours": {"median_ms": 600.0, "peak_mib": 9000.0},
                         "reference": {"skipped": "beyond 64K"}}]}
    verdicts = [t["verdict"] for t in core_targets(core)]
    # 25x the reference; 1.2x flat; 32,000 tokens/s at 64; 1/6 of the time and 1/5 of the memory; 0.6 s at 1M
    assert verdicts == ["reached", "reached", "reached", "reached", "missed"]
    core["steps"][1]["ours_batch1"] = _step(1.5)  # 20x exactly, but 1.5x the 1K step
    assert [t["verdict"] for t in core_targets(core)][:2] == ["reached", "missed"]
    assert [t["verdict"] for t in core_targets(None)] == ["not measured"] * 5

    server = {"streams": [{"streams": 1, "prompt_tokens": 1024, "engine": {"tokens_per_second": 100.0},
                           "streamed": {"tokens_per_second": 89.0}}]}
    assert server_targets(server)[0]["verdict"] == "missed"
    server["streams"][0]["streamed"]["tokens_per_second"] = 91.0
    assert server_targets(server)[0]["verdict"] == "reached"
