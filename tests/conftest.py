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


def _selects_slow(config):
    expr = config.getoption("markexpr", "") or ""
    return "slow" in expr and "not slow" not in expr


def pytest_configure(config):
    """Hypothesis draws the same examples on every run unless ``-m`` selects ``slow``.

    A failure then reproduces on any machine and a passing run predicts the
    next one; ``-m slow`` draws new examples each time.  Loaded before the test
    modules are imported, so their ``settings(...)`` inherit it.
    """
    from hypothesis import settings

    settings.register_profile("iem-ref", derandomize=not _selects_slow(config), deadline=None, print_blob=True)
    settings.load_profile("iem-ref")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when ``-m`` selects ``slow`` (``-m slow``, or ``-m "slow or not slow"`` for everything).

    The default tier keeps every property with one small case each; the
    slow tier adds the large shapes at the CPU's own tiling, the long fuzz
    budgets, the mutation suite at N = 4096, every CUDA combination under
    the simulator and the PTX build of every GPU kernel.
    """
    if _selects_slow(config):
        return
    keep = [item for item in items if item.get_closest_marker("slow") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("slow") is not None])
        items[:] = keep
