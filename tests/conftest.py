"""Shared test set-up: the CUDA back end choice, seeds and tolerances.

The CUDA simulator must be chosen before anything imports numba, so it is
decided here, at collection time: the real GPU when ``libcuda.so.1`` loads,
otherwise ``NUMBA_ENABLE_CUDASIM=1`` (numba-cuda runs the kernels on the CPU,
one Python thread per CUDA thread: tests keep its shapes small).
"""

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest


def _have_gpu_driver():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _have_gpu_driver():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

CUDA_SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# float64 / float32 unit roundoff: every tolerance in the suite is a multiple
# of these, with the multiple argued next to the test.
#: the source tree (derivations, README): documents that tests read, which the wheel does not ship
REPO = Path(__file__).resolve().parent.parent

U64 = np.finfo(np.float64).eps / 2
U32 = np.finfo(np.float32).eps / 2


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (the long fuzz budgets, the large mutation sizes) run only when ``-m`` selects ``slow``."""
    expr = config.getoption("markexpr", "") or ""
    if "slow" in expr and "not slow" not in expr:
        return
    keep = [item for item in items if item.get_closest_marker("long") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("long") is not None])
        items[:] = keep
