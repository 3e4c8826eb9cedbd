"""iem_ref.bounds: the primitives behave as derived, and every suite takes its bounds from there.

The bounds themselves are exercised by tests/test_agreement.py and
tests/test_cuda.py (an accelerated path against the reference); here: the
primitives (unit roundoff, ``gamma_n``, the tree depth), the counts of the
tiled sums and rescalings against the paths' tile layouts, one forward bound
worked out by hand from the module docstring, and that the suites,
``iem_ref.testing`` and ``iem_ref.checks`` use these functions rather than
their own.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import iem_ref.bounds as B
from iem_ref.accel import cpu as _cpu, cuda as _cuda  # noqa: E402  (conftest chose the CUDA backend)
from tests.conftest import U32, U64

#: each path describes its own arithmetic
CPU = _cpu.arithmetic()
cuda_arith = _cuda.arithmetic


@pytest.mark.parametrize("name", ("__init__",) + B.MODULES)
def test_docstring_examples_run(name):
    import importlib

    module = B if name == "__init__" else importlib.import_module(f"iem_ref.bounds.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_docstring_examples_cover_the_package():
    import importlib

    modules = [B] + [importlib.import_module(f"iem_ref.bounds.{name}") for name in B.MODULES]
    attempted = sum(doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE).attempted for m in modules)
    assert attempted >= 10


@pytest.mark.parametrize("dtype, u", [(np.float16, 2.0**-11), (np.float32, 2.0**-24), (np.float64, 2.0**-53)])
def test_unit_roundoff_per_dtype(dtype, u):
    assert B.unit_roundoff(dtype) == u
    assert B.unit_roundoff(np.dtype(dtype)) == u
    # u is the largest relative error of rounding to nearest: 1 + u rounds to 1 (ties to even), 1 + 2u does not
    one = np.asarray(1.0, dtype)
    assert one + np.asarray(u, dtype) == one and one + np.asarray(2 * u, dtype) > one
    assert (B.U32, B.U64) == (U32, U64) == (2.0**-24, 2.0**-53)


@pytest.mark.parametrize("u", [U32, U64, 2.0**-11])
def test_gamma_is_n_u_over_one_minus_n_u_and_increasing(u):
    n = np.arange(0, 200)
    g = B.gamma(n, u)
    assert np.array_equal(g, n * u / (1 - n * u))
    assert g[0] == 0.0 and np.all(np.diff(g) > 0)
    assert np.all(g >= n * u)  # first order: n u, never below it
    # gamma_m + gamma_n <= gamma_{m+n}: roundings counted separately never exceed the total count
    for m, k in [(1, 1), (3, 7), (50, 60)]:
        assert B.gamma(m, u) + B.gamma(k, u) <= B.gamma(m + k, u)
    assert isinstance(B.gamma(3, u), float)


def test_gamma_refuses_where_it_is_not_a_bound():
    with pytest.raises(ValueError, match="n u < 1"):
        B.gamma(2**24, U32)
    with pytest.raises(ValueError, match="n >= 0"):
        B.gamma(-1, U64)


def test_tree_depth_is_ceil_log2():
    for n in list(range(0, 70)) + [1000, 1024, 1025, 2**40 + 1]:
        assert B.tree_depth(n) == (math.ceil(math.log2(n)) if n > 1 else 0), n


def test_ulps_and_scale_rounding():
    assert B.ulps(2, U32) == 4 * U32
    # one ulp of y is at most 2 u |y|: the spacing just below a power of two is u |y|, just above 2 u |y|
    for y in (1.0, 1.5, 3.0e10):
        assert np.spacing(y) <= B.ulps(1, U64) * y
    assert B.scale_rounding(U64) == U64 and B.scale_rounding(U32) == U32 + U64


# --- the counts of the tiled sums and rescalings --------------------------------------------
def test_cpu_sum_bound_is_gamma_n_for_one_tile():
    from iem_ref.accel.cpu import plan

    for dtype in (np.float32, np.float64):
        u = B.unit_roundoff(dtype)
        bk = plan(1, 100, 10**6, dtype)[1]
        for n in (1, 7, bk):
            assert CPU.key_sum(n, dtype, 100) == (n, 0)
            assert B.sum_bound(CPU, CPU.key_sum(n, dtype, 100), u) == B.gamma(n, u)
            assert CPU.rescales(n, dtype, 100) == 0
        # three tiles: the third tile's terms enter float64 by one addition, the first tile's see two
        # rescaled additions (multiply + add each): 2 (tiles - 1) forward, tiles - 1 in the backward
        n = 2 * bk + 5
        assert CPU.key_sum(n, dtype, 100) == (bk, 4)
        assert B.sum_bound(CPU, (bk, 4), u) == B.gamma(bk, u) + B.gamma(4, U64)
        assert CPU.rescales(n, dtype, 100) == 2
        bkb = plan(1, 100, n, dtype, backward=True)[1]
        assert CPU.key_sum(n, dtype, 100, backward=True) == (min(n, bkb), -(-n // bkb) - 1)
        bq = plan(1, 1000, 1, dtype, backward=True)[0]
        assert CPU.query_sum(1000, dtype) == (min(1000, bq), -(-1000 // bq) - 1)
        assert CPU.column_sum(1000, dtype) == (0, 999)


def test_cuda_counts_follow_the_layout():
    from iem_ref.accel import _cuda_kernels as K

    bc = K.LAYOUT["BC"]
    assert cuda_arith().rescales(bc, np.float32) == 0 and cuda_arith().rescales(bc + 1, np.float32) == 1
    assert cuda_arith().rescales(10 * bc, np.float32) == 9
    gpu = cuda_arith("gpu")
    assert gpu.tiles(1, 1, np.float64, False)[1] == K.LAYOUTS["gpu"]["BC"] == 32 and gpu.rescales(35, np.float64) == 1
    assert cuda_arith("simulator").rescales(35, np.float64) == 4
    # one accumulator in the dtype: a product, n - 1 additions and the rescaling multiplies
    assert cuda_arith().key_sum(3 * bc, np.float32) == (3 * bc + 2, 0)
    assert cuda_arith().key_sum(3 * bc, np.float32, backward=True) == (3 * bc, 0)
    u = U32
    assert B.sum_bound(cuda_arith(), cuda_arith().key_sum(5, np.float32, backward=True), u) == B.gamma(5, u)
    assert cuda_arith().column_sum(9, np.float32) == (8, 0)


def test_reference_sums_are_gamma_n_in_float64():
    for n in (1, 10, 1000):
        assert B.sum_bound(B.REFERENCE, B.REFERENCE.key_sum(n, np.float32), U32) == B.gamma(n, U64)
        assert B.REFERENCE.rescales(n, np.float32) == 0


# --- one forward bound by hand (sections 5-9) --------------------------------------------------
def test_forward_bound_of_one_key_by_hand():
    """One key, ``x = 0``, ``S = 1``, ``D = 1``, scale 1, float64, the CPU's arithmetic: every term of section 9."""
    u = U64
    x = np.zeros((1, 1))
    S = np.ones((1, 1))
    a_ref = np.array([[2.0]])
    L_ref = np.array([0.0])
    v = np.array([[2.0]])
    fb = B.forward_bounds(CPU, np.float64, x, S, 1.0, 1, v, a_ref, L_ref)
    E = B.gamma(1 + 3, u) + B.gamma(1 + 2, u) + 4 * u  # path's and reference's scores, exp within 2 ulps
    G = B.gamma(1, u)  # one term in one tile: its product
    # W = sum_j r_j |v_j - a| = 0 (one key: a weight error cannot move a), P = |a| = 2
    expect_a = E * 0 + G * (2 + 2) + (6 * u + B.gamma(1, u)) * 2 + u * 2  # + reference's own + the division
    assert fb.a[0, 0] == pytest.approx(expect_a, rel=1e-12)
    expect_L = E + G + 0.0 + 2 * u * math.log(1)  # L = 0: no |L| terms, no |x|
    assert fb.L[0] == pytest.approx(expect_L, rel=1e-12)
    assert fb.E[0] == pytest.approx(E, rel=1e-12)
    assert fb.a_path[0, 0] < fb.a[0, 0] and fb.L_path[0] < fb.L[0]
    # two keys, equal scores: W = |v_1 - v_2| / 2 carries E; the rescale term is bounded by W too
    x2, v2 = np.zeros((1, 2)), np.array([[1.0], [3.0]])
    fb2 = B.forward_bounds(CPU, np.float64, x2, np.ones((1, 2)), 1.0, 1, v2, np.array([[2.0]]), np.array([math.log(2)]))
    G2 = B.gamma(2, u)
    assert fb2.a[0, 0] == pytest.approx(E * 1.0 + G2 * (2 + 2) + (6 * u + B.gamma(2, u)) * 2 + u * 2, rel=1e-12)


# --- one source: every user takes these functions ----------------------------------------------
def test_the_suites_and_helpers_use_these_bounds(monkeypatch):
    import iem_ref.checks as checks
    import iem_ref.testing as testing
    import tests.test_agreement as TA
    import tests.test_cuda as TC

    assert TA.bounds is B and TC._bounds is B
    assert TA.unit is B.unit_roundoff
    assert testing.unit_roundoff is B.unit_roundoff and testing.tree_depth is B.tree_depth and testing.U64 == B.U64
    assert checks.gamma is B.gamma and checks.U == B.U64
    for name in ("g", "score_sizes", "forward_bounds", "_gamma", "_u", "_scores"):  # no second derivation left
        assert not hasattr(TA, name), name
    assert not any(hasattr(TC, name) for name in ("_gamma", "_u", "_scores"))

    calls = []

    def fake_forward(path, *args, **kw):
        calls.append(("forward", path.kind, kw.get("mask") is not None))
        return "a", "L", B.ForwardBounds(a="ba", L="bL", a_path=None, L_path=None, E=None)

    def fake_vjp(path, *args, **kw):
        calls.append(("vjp", path.kind))
        return "refs", ("bq", "bk", "bv")

    monkeypatch.setattr(B, "attention_bounds", fake_forward)
    monkeypatch.setattr(B, "attention_vjp_bounds", fake_vjp)
    cpu_path = TA.Path("cpu", _cpu)
    assert TA.attention_bounds(cpu_path, 1, 2, 3, np.float32)[2].a == "ba"
    assert TA.vjp_bounds(cpu_path, 1, 2, 3, 4, np.float32, None) == ("refs", ("bq", "bk", "bv"))
    assert TC.forward_bounds(1, 2, 3, np.float64, mask=True) == ("a", "L", "ba", "bL")
    assert TC.backward_bounds(1, 2, 3, 4, np.float64) == ("bq", "bk", "bv")
    assert calls == [("forward", "cpu", False), ("vjp", "cpu"), ("forward", "cuda", True), ("vjp", "cuda")]
