"""CUDA-specific tests of ``iem_ref.accel.cuda`` (the shared agreement suite is tests/test_agreement.py).

Without a GPU the kernels run in Numba's CUDA simulator (``conftest`` sets
``NUMBA_ENABLE_CUDASIM=1`` before numba is imported), one Python thread per
CUDA thread: about 1-5 s per call at the shapes below, so the shapes are
small there and larger on a GPU.  What the simulator cannot check (typing
and lowering for the device, registers) is covered by the PTX test, which
compiles the kernels for sm_90 in a subprocess with the real numba-cuda.

Error bounds: derived, not fitted, in :mod:`iem_ref.bounds`, the same
functions as the agreement suite's, with the CUDA path's arithmetic
(:func:`iem_ref.bounds.cuda`: ``exp``/``expf`` within 2 ulps, the running
state in the kernel's dtype, one rescaling per key tile of the layout that
ran, ``_cuda_kernels.LAYOUT["BC"]`` keys wide).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import CUDA_SIMULATED, U64
from tests.tolerances import assert_within

from iem_ref.accel import cuda as C  # noqa: E402  (after conftest chose the backend)
from numba import cuda  # noqa: E402  (after conftest chose the backend)

from iem_ref.accel import _cuda_kernels as _K  # noqa: E402

from iem_ref.attention import attention as ref_attention  # noqa: E402
from iem_ref.gradients import attention_vjp as ref_vjp  # noqa: E402
from iem_ref.summaries import softmin_summary as ref_summary  # noqa: E402
from iem_ref import activations as iem_ref_activations  # noqa: E402
from iem_ref import bounds as _bounds  # noqa: E402

BIG = not CUDA_SIMULATED  # a real GPU: larger shapes (several blocks and tiles in every direction)


def forward_bounds(q, k, v, dtype, *, layout=None, **kw):
    """``(a_ref, L_ref, bound_a, bound_L)``: the reference's results for ``attention(q, k, v, **kw)`` and the
    CUDA path's bounds against them (:func:`iem_ref.bounds.attention_bounds`; ``layout``: the one that ran,
    default the current one)."""
    a_ref, L_ref, fb = _bounds.attention_bounds(C.arithmetic(layout), q, k, v, dtype, **kw)
    return a_ref, L_ref, fb.a, fb.L


def backward_bounds(q, k, v, g, dtype, *, layout=None, **kw):
    """The bounds on ``(dq, dk, dv)`` against the reference (:func:`iem_ref.bounds.attention_vjp_bounds`)."""
    return _bounds.attention_vjp_bounds(C.arithmetic(layout), q, k, v, g, dtype, **kw)[1]


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def _inputs(rng, batch, n, m, d, dv, dtype, spread=1.0):
    q = (spread * rng.standard_normal(batch + (n, d))).astype(dtype)
    k = (spread * rng.standard_normal(batch + (m, d))).astype(dtype)
    v = rng.standard_normal(batch + (m, dv)).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------- which path ran


def test_backend_is_the_one_conftest_chose():
    assert C.BACKEND == ("simulator" if CUDA_SIMULATED else "gpu")
    assert cuda.is_available()


def test_kernels_really_run(rng):
    q, k, v = _inputs(rng, (), 3, 5, 2, 2, np.float64)
    before = dict(C.launches)
    C.attention(q, k, v)
    assert C.launches.get("forward", 0) == before.get("forward", 0) + 1


def test_unsupported_energy_is_an_error_naming_the_supported_ones():
    q = np.zeros((2, 3))
    for energy in ("laplace", "cosine", lambda a, b: a @ b.T):
        with pytest.raises(ValueError, match=r"\['dot', 'sqeuclidean'\]"):
            C.attention(q, q, q, energy=energy)


def test_importing_iem_ref_does_not_import_numba_cuda():
    code = "import sys, iem_ref; print(any(m.startswith('numba.cuda') or m == 'numba_cuda' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- forward agreement


@pytest.mark.equation("A1", "A3", "A4", "M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_forward_agrees_with_reference(rng, dtype, energy):
    # Odd sizes, not multiples of the tiles (32 x 32 on a GPU, 8 x 8 in the simulator: three each way there);
    # batch axes that broadcast (k, v shared over heads).
    n, m, d, dv = (70, 131, 67, 130) if BIG else (19, 21, 5, 3)
    q = rng.standard_normal((2, 1, n, d)).astype(dtype)
    k = rng.standard_normal((1, m, d)).astype(dtype)
    v = rng.standard_normal((1, m, dv)).astype(dtype)
    scale = None if energy == "dot" else 0.7
    a, L = C.attention(q, k, v, scale=scale, energy=energy, return_lse=True)
    assert a.dtype == dtype and a.shape == (2, 1, n, dv) and L.shape == (2, 1, n)
    a_ref, L_ref, bound_a, bound_L = forward_bounds(q, k, v, dtype, scale=scale, energy=energy)
    assert_within(a, a_ref, bound_a, f"a {energy} {np.dtype(dtype)}")
    assert_within(L, L_ref, bound_L, f"L {energy} {np.dtype(dtype)}")


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_mask_and_causal(rng, alignment):
    n, m, d, dv = (45, 100, 16, 8) if BIG else (20, 36, 4, 3)
    q, k, v = _inputs(rng, (), n, m, d, dv, np.float64)
    mask = rng.random((n, m)) < 0.6
    mask[3] = False  # a fully masked row
    a, L = C.attention(q, k, v, mask=mask, is_causal=True, causal_alignment=alignment, return_lse=True)
    a_ref, L_ref, bound_a, bound_L = forward_bounds(q, k, v, np.float64, mask=mask, is_causal=True, causal_alignment=alignment)
    assert_within(a, a_ref, bound_a, "a")
    assert_within(L, L_ref, bound_L, "L")
    assert np.all(a[3] == 0) and L[3] == -np.inf


# ---------------------------------------------------------------- edge cases (README policy)


def test_masked_nan_and_inf_never_leak(rng):
    q, k, v = _inputs(rng, (), 6, 9, 3, 2, np.float64)
    k[4] = np.nan
    v[4] = np.inf
    v[7] = np.nan
    mask = np.ones((6, 9), bool)
    mask[:, [4, 7]] = False
    a = C.attention(q, k, v, mask=mask)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, ref_attention(q, k, v, mask=mask), rtol=0, atol=1e-14)


def test_nan_stays_in_its_rows(rng):
    q, k, v = _inputs(rng, (), 5, 7, 3, 2, np.float64)
    q[2, 1] = np.nan
    a, L = C.attention(q, k, v, return_lse=True)
    assert np.isnan(a[2]).all() and np.isnan(L[2])
    others = [0, 1, 3, 4]
    assert np.isfinite(a[others]).all() and np.isfinite(L[others]).all()


def test_infinite_energies_and_empty_rows_in_softmin_summary(rng):
    d = rng.standard_normal((6, 5))
    v = rng.standard_normal((5, 3))
    d[0, 2] = -np.inf  # one certain hypothesis: its value, L = +inf
    d[1, [1, 3]] = -np.inf  # two certain: they share the mass
    d[2, 4] = np.inf  # weight 0, value not read
    d[3] = np.inf  # empty row: 0 (or NaN), L = -inf
    d[4, 0] = np.nan  # NaN row only
    v_bad = v.copy()
    v_bad[4] = np.nan  # read by every row in which key 4 takes part, and only by them
    for vals in (v, v_bad):
        for empty in ("zero", "nan"):
            a, L = C.softmin_summary(d, vals, 0.8, empty=empty)
            a_ref, L_ref = ref_summary(d, vals, 0.8, empty=empty)
            # float64, M = 5: a few roundings per weight (|x| <= 5) and per sum: 16 ulps of max(1, |ref|).
            assert_within(a, a_ref, 16 * U64 * (1 + np.abs(a_ref)), f"a empty={empty}")
            assert_within(L, L_ref, 16 * U64 * (1 + np.abs(L_ref)), f"L empty={empty}")
    a, L = C.softmin_summary(d, v, 0.8)
    assert L[0] == np.inf and np.array_equal(a[0], v[2])
    assert L[1] == np.inf and np.array_equal(a[1], (v[1] + v[3]) / 2)
    assert np.all(a[3] == 0) and L[3] == -np.inf
    assert np.isnan(a[4]).all() and np.isnan(L[4]) and np.isfinite(a[[0, 1, 2, 5]]).all()
    a, L = C.softmin_summary(d, v_bad, 0.8)
    assert np.isfinite(a[2]).all()  # key 4 has energy +inf in row 2: its NaN value is not read
    assert np.isnan(a[[0, 1, 4, 5]]).all() and np.all(a[3] == 0)


def test_no_keys_and_no_queries():
    q = np.ones((3, 2))
    k = np.ones((0, 2))
    v = np.ones((0, 4))
    a, L = C.attention(q, k, v, return_lse=True)
    assert a.shape == (3, 4) and np.all(a == 0) and np.all(L == -np.inf)
    assert np.isnan(C.attention(q, k, v, empty="nan")).all()
    assert C.attention(np.ones((0, 2)), np.ones((5, 2)), np.ones((5, 1))).shape == (0, 1)


def test_scale_zero_is_uniform_over_the_keys_that_take_part(rng):
    q, k, v = _inputs(rng, (), 4, 6, 3, 2, np.float64, spread=30.0)
    mask = np.ones((4, 6), bool)
    mask[:, 5] = False
    a = C.attention(q, k, v, scale=0.0, mask=mask)
    assert_within(a, np.broadcast_to(v[:5].mean(0), a.shape), 8 * U64 * np.abs(v).max(), "uniform")


# ---------------------------------------------------------------- backward (G4)


@pytest.mark.equation("G4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_backward_agrees_with_reference(rng, dtype, energy):
    n, m, d, dv = (67, 97, 33, 140) if BIG else (13, 19, 3, 2)
    q, k, v = _inputs(rng, (), n, m, d, dv, dtype)
    g = rng.standard_normal((n, dv)).astype(dtype)
    mask = rng.random((n, m)) < 0.8
    scale = 0.5
    got = C.attention_vjp(q, k, v, g, scale=scale, mask=mask, energy=energy)
    want = ref_vjp(q, k, v, g, scale=scale, mask=mask, energy=energy)
    bounds = backward_bounds(q, k, v, g, dtype, scale=scale, mask=mask, energy=energy)
    for name, x, y, bnd in zip(("dq", "dk", "dv"), got, want, bounds):
        assert x.dtype == dtype
        assert_within(x, y, bnd, f"{name} {energy} {np.dtype(dtype)}")


def test_backward_reuses_out_and_lse(rng):
    q, k, v = _inputs(rng, (), 9, 12, 3, 2, np.float64)
    g = rng.standard_normal((9, 2))
    a, L = C.attention(q, k, v, return_lse=True, is_causal=True)
    before = C.launches.get("forward", 0)
    got = C.attention_vjp(q, k, v, g, is_causal=True, out=a, lse=L)
    assert C.launches.get("forward", 0) == before  # no forward recomputation
    want = ref_vjp(q, k, v, g, is_causal=True)
    bounds = backward_bounds(q, k, v, g, np.float64, is_causal=True)
    for name, x, y, bnd in zip(("dq", "dk", "dv"), got, want, bounds):
        assert_within(x, y, bnd, f"{name} with the saved out and lse")


# ---------------------------------------------------------------- device arrays (zero-copy)


def test_device_arrays_in_device_arrays_out(rng):
    q, k, v = _inputs(rng, (2,), 7, 9, 3, 2, np.float32)
    dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
    a, L = C.attention(dq, dk, dv, return_lse=True)
    assert not isinstance(a, np.ndarray) and hasattr(a, "copy_to_host")
    assert a.shape == (2, 7, 2) and np.dtype(a.dtype) == np.float32
    a_np, L_np = C.attention(q, k, v, return_lse=True)
    assert np.array_equal(_host(a), a_np) and np.array_equal(_host(L), L_np)  # same kernels, same bits
    grads = C.attention_vjp(dq, dk, dv, cuda.to_device(rng.standard_normal((2, 7, 2)).astype(np.float32)))
    assert all(hasattr(x, "copy_to_host") for x in grads)


class _View:
    """An object exposing ``iface`` as its ``__cuda_array_interface__`` (memory owned by ``owner``)."""

    def __init__(self, iface, owner):
        self.__cuda_array_interface__ = iface
        self._owner = owner


def test_strided_device_arrays_are_read_in_place(rng):
    # k stored as (D, M) and read through its transpose: no copy is made.
    q, k, v = _inputs(rng, (), 6, 8, 3, 2, np.float64)
    kT = cuda.to_device(np.ascontiguousarray(k.T))
    if CUDA_SIMULATED:
        k_view = kT.transpose()
    else:  # on a GPU Numba's DeviceNDArray.T / transpose() copies (a transpose kernel): take a strided view instead
        iface = dict(kT.__cuda_array_interface__, shape=(8, 3), strides=(8, 64))  # bytes: k[j, c] at (j + 8 c) * 8
        k_view = cuda.as_cuda_array(_View(iface, kT))
    op = C._operand(k_view, (), np.dtype(np.float64))
    if CUDA_SIMULATED:
        assert np.shares_memory(op.data._ary, kT._ary)
    else:
        assert op.data.device_ctypes_pointer.value == kT.device_ctypes_pointer.value
    assert (op.row, op.col) == (1, 8)
    np.testing.assert_array_equal(_host(C.attention(q, k_view, v)), C.attention(q, k, v))


@pytest.mark.parametrize("case", ["all", "all+varlen"])
def test_variant_operands_may_be_device_arrays(rng, case):
    """bias and dropout_mask are read in place, the per-head and per-segment arrays read to the host once:
    the same bits as host arguments, and the results stay on the device."""
    from tests.test_variants import CASES, make_case

    q, k, v, kw = make_case(rng, CASES[case])
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    arrays = [name for name, x in kw.items() if isinstance(x, np.ndarray)]
    assert {"bias", "dropout_mask", "alibi_slopes", "sinks"} <= set(arrays)
    on_device = dict(kw, **{name: cuda.to_device(kw[name]) for name in arrays})
    a, L = C.attention(q, k, v, return_lse=True, **on_device)
    assert hasattr(a, "copy_to_host") and hasattr(L, "copy_to_host")
    a_np, L_np = C.attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_array_equal(_host(a), a_np)
    np.testing.assert_array_equal(_host(L), L_np)
    g = rng.standard_normal(a_np.shape).astype(np.float32)
    grads = C.attention_vjp(q, k, v, g, **on_device)
    assert all(hasattr(x, "copy_to_host") for x in grads)
    for got, want in zip(grads, C.attention_vjp(q, k, v, g, **kw), strict=True):
        np.testing.assert_array_equal(_host(got), want)


def test_device_bias_that_broadcasts_is_read_in_place(rng):
    bias = cuda.to_device(rng.standard_normal((5, 6)))  # (N, M), broadcast over the batch: no (B, N, M) copy
    op = C._operand(bias, (3,), np.dtype(np.float64))
    if CUDA_SIMULATED:
        assert np.shares_memory(op.data._ary, bias._ary)
    else:
        assert op.data.device_ctypes_pointer.value == bias.device_ctypes_pointer.value
    assert (op.row, op.col) == (6, 1) and not _host(op.offset).any()  # every batch element reads the same (N, M)
    q, k, v = _inputs(rng, (3,), 5, 6, 2, 2, np.float64)
    np.testing.assert_array_equal(_host(C.attention(q, k, v, bias=bias)), C.attention(q, k, v, bias=bias.copy_to_host()))


@pytest.mark.equation("V6")
@pytest.mark.parametrize("n", [1, 5])
def test_grouped_query_heads_read_each_key_value_tile_once_per_group(rng, n):
    """V6: the rows of a key/value head are its group's queries, so its K/V tiles are read by one set of blocks, not one per query head.

    The forward launches ``ceil(g N / BR)`` row blocks per key/value head
    (``n = 1``: decoding, one block for the group) and ``dk, dv`` come out of
    ``Hkv`` sets of key blocks, summed over the group inside the kernel.  A
    row's arithmetic does not depend on which rows share its block: ``a``,
    ``L`` and ``dq`` are bitwise those of the same call with K and V
    repeated to every query head.
    """
    hq, hkv, m, d, dv = (8, 2, 5 * _K.BR, 3, 2) if BIG else (4, 2, 3 * _K.BR, 3, 2)  # five (three) key tiles
    q = rng.standard_normal((hq, n, d))
    k, v = rng.standard_normal((hkv, m, d)), rng.standard_normal((hkv, m, dv))
    g = rng.standard_normal((hq, n, dv))
    row_blocks = -(-(hq // hkv) * n // _K.BR)
    before = dict(C.blocks)
    a, L = C.attention(q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right", return_lse=True)
    assert C.blocks["forward"] - before.get("forward", 0) == hkv * row_blocks
    before = dict(C.blocks)
    dq, dk, dv_ = C.attention_vjp(q, k, v, g, enable_gqa=True, is_causal=True, causal_alignment="bottom_right", out=a, lse=L)
    assert C.blocks["dkv"] - before.get("dkv", 0) == hkv * (m // _K.BR) and C.blocks["dq"] - before.get("dq", 0) == hkv * row_blocks
    assert dk.shape == (hkv, m, d) and dv_.shape == (hkv, m, dv)
    kr, vr = (np.repeat(x, hq // hkv, axis=0) for x in (k, v))
    a_rep, L_rep = C.attention(q, kr, vr, is_causal=True, causal_alignment="bottom_right", return_lse=True)
    np.testing.assert_array_equal(a, a_rep)
    np.testing.assert_array_equal(L, L_rep)
    dq_rep = C.attention_vjp(q, kr, vr, g, is_causal=True, causal_alignment="bottom_right", out=a, lse=L)[0]
    np.testing.assert_array_equal(dq, dq_rep)


@pytest.mark.equation("M2", "V5", "V6", "G4")
@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_decoding_splits_the_keys_and_merges_the_splits(rng, monkeypatch, dtype):
    """Few row blocks over many keys (decoding): the forward splits the key tiles into runs, one block each, and ``combine`` merges the partial states (M2).

    The bounds are those of one run (each split holds whole tiles, so no
    weight passes through more rescalings or additions); the edge-case rows
    keep their results when their special keys fall in different splits.
    """
    monkeypatch.setattr(C, "_multiprocessors", lambda: 8)  # the simulator's default (2) splits less
    hq, hkv, m, d, dv = 4, 2, 13 * _K.LAYOUT["BC"], 3, 2
    assert C.key_splits(hkv, m) == 3  # two blocks for 8 multiprocessors: 8 splits wanted, 13 tiles allow 3
    cases = [(1, dict()), (3, dict(is_causal=True, causal_alignment="bottom_right", sinks=np.array([0.5, -1.0, 2.0, 0.0]))),
             (2, dict(window=(70, 0), is_causal=True, causal_alignment="bottom_right"))]
    for n, kw in cases:
        q = rng.standard_normal((hq, n, d)).astype(dtype)
        k, v = rng.standard_normal((hkv, m, d)).astype(dtype), rng.standard_normal((hkv, m, dv)).astype(dtype)
        before = C.launches.get("combine", 0)
        a, L = C.attention(q, k, v, enable_gqa=True, return_lse=True, **kw)
        assert C.launches["combine"] == before + 1, kw
        a_ref, L_ref, bound_a, bound_L = forward_bounds(q, k, v, dtype, enable_gqa=True, **kw)
        assert_within(a, a_ref, bound_a, f"a, split keys, {kw}")
        assert_within(L, L_ref, bound_L, f"L, split keys, {kw}")
        if n == 3:  # the backward recomputes the forward (split) for its log-partition
            g = rng.standard_normal((hq, n, dv)).astype(dtype)
            grads = C.attention_vjp(q, k, v, g, enable_gqa=True, **kw)
            want = ref_vjp(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), g.astype(np.float64),
                           enable_gqa=True, **kw)
            bounds = backward_bounds(q, k, v, g, dtype, enable_gqa=True, **kw)
            for name, x, y, bnd in zip(("dq", "dk", "dv", "dsinks"), grads, want, bounds):
                assert_within(x, y, bnd, f"{name}, split keys")
    # the edge-case rows, their special keys in different splits (split s: tiles 4s .. 4s + 3, the last one 5 tiles: 8 .. 12)
    bc = _K.LAYOUT["BC"]
    e = rng.standard_normal((6, m))
    vals = rng.standard_normal((m, 3))
    e[0, 2] = -np.inf  # one certain key (split 0)
    e[1, [5, m - 3]] = -np.inf  # two certain keys, in the first and last splits
    e[2, 9 * bc] = np.inf  # weight 0
    e[3] = np.inf  # empty row
    e[4, m - 1] = np.nan  # NaN in the last split only
    a, L = C.softmin_summary(e.astype(dtype), vals.astype(dtype), 0.8)
    vals = vals.astype(dtype)
    assert L[0] == np.inf and np.array_equal(a[0], vals[2])
    assert L[1] == np.inf and np.array_equal(a[1], (vals[5] + vals[m - 3]) / 2)
    assert np.all(a[3] == 0) and L[3] == -np.inf
    assert np.isnan(a[4]).all() and np.isnan(L[4]) and np.isfinite(a[[0, 1, 2, 5]]).all() and np.isfinite(L[[2, 5]]).all()


def test_device_array_of_other_dtype_is_cast(rng):
    q, k, v = _inputs(rng, (), 5, 6, 2, 2, np.float64)
    a = C.attention(cuda.to_device(q.astype(np.float32)), k, v)
    assert np.dtype(a.dtype) == np.float64
    np.testing.assert_array_equal(_host(a), C.attention(q.astype(np.float32).astype(np.float64), k, v))


# ---------------------------------------------------------------- torch and CuPy tensors (real GPU only)


class _Framework:
    """torch or CuPy: host -> device, device pointer, the transpose of the last two axes, wrapping a result."""

    def __init__(self, name):
        if CUDA_SIMULATED:
            pytest.skip("needs a GPU: the CUDA simulator takes only its own device arrays, not torch or CuPy tensors")
        self.name = name
        self.mod = pytest.importorskip(name, reason=f"optional peer {name} is not installed")
        if name == "torch" and not self.mod.cuda.is_available():
            pytest.skip("needs a GPU: this torch has no CUDA")

    def dev(self, x):
        x = np.ascontiguousarray(x)  # CuPy would keep a NumPy view's strides
        return self.mod.from_numpy(x).cuda() if self.name == "torch" else self.mod.asarray(x)

    def ptr(self, x):
        return x.data_ptr() if self.name == "torch" else x.data.ptr

    def swap(self, x):
        return x.transpose(-1, -2) if self.name == "torch" else self.mod.swapaxes(x, -1, -2)

    def wrap(self, a):
        return self.mod.as_tensor(a, device="cuda") if self.name == "torch" else self.mod.asarray(a)


@pytest.fixture(params=["torch", "cupy"])
def framework(request):
    return _Framework(request.param)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_framework_tensors_are_read_in_place(rng, framework, dtype):
    # (2, 1) heads broadcast against k, v of batch (1,); k stored as (D, M) and read through its transpose.
    fw = framework
    n, m, d, dv = 45, 70, 19, 33
    q = rng.standard_normal((2, 1, n, d)).astype(dtype)
    k = rng.standard_normal((1, m, d)).astype(dtype)
    v = rng.standard_normal((1, m, dv)).astype(dtype)
    mask = rng.random((n, m)) < 0.7
    tq, tv, tmask = fw.dev(q), fw.dev(v), fw.dev(mask)
    tkT = fw.dev(np.swapaxes(k, -1, -2))
    tk = fw.swap(tkT)
    op = C._operand(tk, (2, 1), np.dtype(dtype))
    assert op.data.device_ctypes_pointer.value == fw.ptr(tkT)  # a view of the tensor's memory, not a copy
    assert (op.row, op.col) == (1, m)
    a, L = C.attention(tq, tk, tv, mask=tmask, return_lse=True)
    assert hasattr(a, "copy_to_host") and a.shape == (2, 1, n, dv) and np.dtype(a.dtype) == dtype
    a_np, L_np = C.attention(q, k, v, mask=mask, return_lse=True)
    assert np.array_equal(a.copy_to_host(), a_np) and np.array_equal(L.copy_to_host(), L_np)  # same kernels, same bits
    ta = fw.wrap(a)
    assert fw.ptr(ta) == a.device_ctypes_pointer.value  # the result wraps zero-copy
    g = rng.standard_normal((2, 1, n, dv)).astype(dtype)
    grads = C.attention_vjp(tq, tk, tv, fw.dev(g), mask=tmask, out=ta, lse=L)
    want = C.attention_vjp(q, k, v, g, mask=mask, out=a_np, lse=L_np)
    for name, x, y in zip(("dq", "dk", "dv"), grads, want):
        assert hasattr(x, "copy_to_host"), name
        assert np.array_equal(x.copy_to_host(), y), name


def test_framework_lse_is_accepted(rng, framework):
    # The saved log-partition may come back as the framework's own tensor (wrapped zero-copy, or computed by it).
    fw = framework
    q, k, v = _inputs(rng, (), 20, 30, 4, 3, np.float64)
    g = rng.standard_normal((20, 3))
    a, L = C.attention(q, k, v, return_lse=True)
    got = C.attention_vjp(fw.dev(q), fw.dev(k), fw.dev(v), fw.dev(g), out=fw.dev(a), lse=fw.dev(L))
    want = C.attention_vjp(q, k, v, g, out=a, lse=L)
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        assert np.array_equal(x.copy_to_host(), y), name


# ---------------------------------------------------------------- PTX for the device (no GPU needed)

_PTX_SCRIPT = textwrap.dedent(
    """
    import json, os, re, shutil, subprocess, sys, tempfile
    from numba import cuda
    try:
        cuda.compile_ptx(lambda x: None, "void(float64[:])", cc=(9, 0))
    except Exception as exc:  # no NVVM / NVRTC: reported, and the test fails
        print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"[:300]}))
        sys.exit(0)
    from iem_ref.accel import _cuda_kernels as K
    from iem_ref.accel._problem import DOT, PRECOMPUTED, SQEUCLIDEAN
    # IEM_REF_PTX=one: every kernel of the float64 squared-Euclidean build (float64 state and the norms' extra
    # terms; the float32 forward below); all: every dtype and energy, softmin_summary's precomputed-energy
    # forward kernels included.
    combos = [("float64", SQEUCLIDEAN)]
    if os.environ.get("IEM_REF_PTX") == "all":
        combos = [(t, e) for t in ("float32", "float64") for e in (DOT, SQEUCLIDEAN, PRECOMPUTED)]
    report = {}
    try:  # the ptxas of the toolkit that the test extra installs: the same version as NVVM, so it reads its PTX
        from cuda.pathfinder import find_nvidia_binary_utility
        ptxas = find_nvidia_binary_utility("ptxas")
    except Exception:
        ptxas = None
    ptxas = ptxas or shutil.which("ptxas")
    for dtype, energy in combos:
        kern = K.build(dtype, energy)
        for name, sig in K.signatures(dtype, energy).items():
            if energy == PRECOMPUTED and name not in ("forward", "forward_split", "combine"):
                continue
            ptx, _ = cuda.compile_ptx(getattr(kern, name).py_func, sig, cc=(9, 0))
            entry = {"ptx_lines": len(ptx.splitlines()), "bar_sync": ptx.count("bar.sync")}
            if ptxas:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "k.ptx")
                    open(path, "w").write(ptx)
                    out = subprocess.run([ptxas, "-v", "-arch=sm_90", path, "-o", os.path.join(tmp, "k.cubin")],
                                         capture_output=True, text=True)
                entry["ptxas_rc"] = out.returncode
                for key, pat in (("registers", r"Used (\\d+) registers"), ("spill_stores", r"(\\d+) bytes spill stores"),
                                 ("smem", r"(\\d+) bytes smem")):
                    found = re.findall(pat, out.stderr)
                    entry[key] = int(found[-1]) if found else None
            report[f"{name}/{dtype}/{energy}"] = entry
    # configure(launch_bounds=(128, 4)) must hold the tiled kernels to 128 registers (2**16 / (128 * 4)).
    kern = K.build("float32", DOT)
    ptx, _ = cuda.compile_ptx(kern.forward.py_func, K.signatures("float32", DOT)["forward"], cc=(9, 0),
                              launch_bounds=(128, 4))
    entry = {"bar_sync": ptx.count("bar.sync")}
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            open(path, "w").write(ptx)
            out = subprocess.run([ptxas, "-v", "-arch=sm_90", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        entry["ptxas_rc"] = out.returncode
        found = re.findall(r"Used (\\d+) registers", out.stderr)
        entry["registers"] = int(found[-1]) if found else None
        entry["smem"] = None
    report["forward/float32/0/launch_bounds=128,4"] = entry
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("builds", ["one", pytest.param("all", marks=pytest.mark.slow)])
def test_every_kernel_compiles_to_ptx_for_sm90(builds):
    """Compiles the kernels with the real numba-cuda (NVVM) for sm_90, and assembles them with ``ptxas`` if present.

    ``one``: every kernel of the float64 squared-Euclidean build and the
    float32 forward under its launch bounds; ``all`` (slow): every dtype and
    energy.

    The simulator runs the Python source and checks no typing; this catches the
    errors only a device build shows (a non-literal shared-array shape did,
    once).  NVVM, NVRTC and ptxas come with the test extra (``numba-cuda[cu13]``, ``cuda-toolkit[nvcc]``).  Register counts are printed
    (``pytest -s``); shared memory must stay under the 48 KiB static limit, and no kernel may spill.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["IEM_REF_PTX"] = builds
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "skip" not in report, f"NVVM/NVRTC missing (the test extra installs them): {report.get('skip')}"
    print(json.dumps(report, indent=1))
    assert {"forward/float64/1", "dq/float64/1", "dkv/float64/1", "forward_split/float64/1", "combine/float64/1",
            "forward/float32/0/launch_bounds=128,4"} <= set(report)
    if builds == "all":
        assert {"forward/float32/0", "dq/float32/0", "dkv/float32/0", "forward_split/float32/0", "combine/float32/2",
                "forward_split/float64/2"} <= set(report)
    for name, entry in report.items():
        assert entry["bar_sync"] > 0 or name.split("/")[0] in ("rowdot", "combine"), name  # one thread per row or entry, no tiles
        assert entry.get("ptxas_rc") == 0, f"{name}: ptxas missing or failed (the test extra installs it)"
        assert entry["smem"] is None or entry["smem"] <= 48 * 1024, name
        assert not entry.get("spill_stores"), f"{name}: ptxas spills {entry.get('spill_stores')} bytes"
    capped = report["forward/float32/0/launch_bounds=128,4"]
    assert capped["registers"] is not None and capped["registers"] <= 128


# ---------------------------------------------------------------- scalar activations (S3, S4, H3)


@pytest.mark.equation("S3", "S4", "H3")
def test_scalar_activations_agree_with_reference():
    z = np.array([-1e3, -30.0, -3.0, -0.5, -1e-8, 0.0, 1e-8, 0.5, 3.0, 30.0, 1e3])
    z_edge = np.concatenate([z, [np.inf, -np.inf, np.nan]])
    # Each value is one scalar formula in float64 (a tanh, or log1p/exp): a few roundings, so 8 ulps
    # of max(1, |ref|) bounds the difference from the reference's own few-ulp result.
    cases = [
        ("softplus", (z_edge, 0.7)),
        ("sign_posterior_mean", (z_edge, z_edge[::-1])),
        ("tanh_from_signed_gaussian", (z, 1.5, 0.8)),
    ]
    for name, args in cases:
        got = getattr(C, name)(*args)
        want = getattr(iem_ref_activations, name)(*args)
        assert got.dtype == want.dtype
        assert_within(got, want, 8 * U64 * np.maximum(1.0, np.abs(np.where(np.isfinite(want), want, 0))), name)
    assert C.softplus(np.float32([1.0, 2.0])).dtype == np.float32
    with pytest.raises(ValueError, match="sigma"):
        C.tanh_from_signed_gaussian(z, 1.0, 0.0)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(C, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


def test_softmin_summary_lse_keeps_the_shape_of_d(rng):
    # Regression: v's extra batch axes broadcast the output a, but L depends on d only (as the reference).
    d = rng.standard_normal((2, 1, 3, 5))
    v = rng.standard_normal((4, 5, 2)).astype(np.float32)
    mask = rng.random((3, 5)) < 0.6
    a, L = C.softmin_summary(d, v, 2.0, mask=mask)
    a_ref, L_ref = ref_summary(d, v, 2.0, mask=mask)
    assert a.shape == a_ref.shape == (2, 4, 3, 2) and L.shape == L_ref.shape == (2, 1, 3)
    assert a.dtype == np.float64
    # float64, M = 5, |d / tau| < 3: a few roundings per weight and per 5-term sum: 16 ulps.
    assert_within(a, a_ref, 16 * U64 * (1 + np.abs(a_ref)), "a")
    assert_within(L, L_ref, 16 * U64 * (1 + np.abs(L_ref)), "L")


def test_the_gpu_layout_under_the_simulator(rng):
    """The simulator normally runs an 8-thread layout; this runs the GPU's (128 threads, 32 x 32 tiles) once."""
    if not CUDA_SIMULATED:
        pytest.skip("on a GPU every test runs the GPU layout")
    n, m, d, dv = 33, 35, 3, 2  # two query blocks and two key tiles of the GPU layout
    q, k, v = _inputs(rng, (), n, m, d, dv, np.float64)
    g = rng.standard_normal((n, dv))
    mask = rng.random((n, m)) < 0.8
    _K.use_layout("gpu")
    try:
        a, L = C.attention(q, k, v, mask=mask, is_causal=True, return_lse=True)
        grads = C.attention_vjp(q, k, v, g, mask=mask, is_causal=True, out=a, lse=L)
    finally:
        _K.use_layout("simulator")
    # the bounds of the layout that ran: 32-key tiles, so fewer rescalings than the simulator's 8-key ones
    a_ref, L_ref, bound_a, bound_L = forward_bounds(q, k, v, np.float64, layout="gpu", mask=mask, is_causal=True)
    assert_within(a, a_ref, bound_a, "a, GPU layout")
    assert_within(L, L_ref, bound_L, "L, GPU layout")
    want = ref_vjp(q, k, v, g, mask=mask, is_causal=True)
    bounds = backward_bounds(q, k, v, g, np.float64, layout="gpu", mask=mask, is_causal=True)
    for name, x, y, bnd in zip(("dq", "dk", "dv"), grads, want, bounds):
        assert_within(x, y, bnd, f"{name}, GPU layout")
