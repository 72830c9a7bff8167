import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


def pytest_report_header(config):
    from tests.seed import SEED

    return f"random draws: TEST_SEED={SEED} (set it to replay a failure)"
