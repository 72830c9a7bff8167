"""One seed for every random draw in the tests, printed in the header and in failure messages."""

import os
import random

SEED = int(os.environ.get("TEST_SEED", "20261127"))


def rng_for(*case: object) -> random.Random:
    """An independent generator per test case, derived from SEED."""
    return random.Random(f"{SEED}/{'/'.join(map(str, case))}")
