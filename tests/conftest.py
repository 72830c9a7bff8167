import datetime
import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

# Measured differences of the GPU tests, with their tolerances and verdicts (`gpu_check`).
GPU_CHECKS: list[dict] = []


def pytest_report_header(config):
    from tests.seed import SEED

    return f"random draws: TEST_SEED={SEED} (set it to replay a failure)"


@pytest.fixture
def gpu_check():
    """check(name, value, tolerance): record a measured difference, then assert it is within its tolerance."""

    def check(name: str, value: float, tolerance: float) -> None:
        GPU_CHECKS.append({"check": name, "value": value, "tolerance": tolerance, "passed": value <= tolerance})
        assert value <= tolerance, f"{name}: {value:.3g} > {tolerance:.3g}"

    return check


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("REFORMER_GPU_RESULTS")
    if not path or not GPU_CHECKS:
        return
    cuda = torch.cuda.is_available()
    document = {"benchmark": "gpu_tests", "device_type": "cuda" if cuda else "cpu",
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__, "pytest_exit_status": int(exitstatus), "checks": GPU_CHECKS}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
