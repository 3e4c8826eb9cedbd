"""The agreement suite: every accelerated path against the reference (same results, same errors).

One parametrised suite over the paths ``cpu`` (:mod:`iem_ref.accel.cpu`) and
``cuda`` (:mod:`iem_ref.accel.cuda`; under the Numba CUDA simulator only small
shapes, about 50 us per query-key pair there).  Each test compares a path
with its reference twin (:func:`iem_ref.attention`,
:func:`iem_ref.softmin_summary`, :func:`iem_ref.attention_vjp`, the scalar
activations): the same values within a derived bound, the same NaN / inf
pattern, or the same error class.

Error bounds: derived, not fitted, in :mod:`iem_ref.bounds` (sections 5-10:
scores, weights, rescalings per key tile, tiled sums, forward and backward),
one derivation shared with tests/test_cuda.py.  Each path is described there
by its :class:`iem_ref.bounds.Arithmetic` (``exp`` ulps, tiles and the
precision of its running state); the tests compare with the bounds the
module forms from the reference's values.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, NamedTuple

import numpy as np
import pytest

import iem_ref
from iem_ref import bounds
from tests.conftest import CUDA_SIMULATED, U64
from tests.tolerances import assert_within


# --- the paths ------------------------------------------------------------------------
#: The CPU's tiling in this suite: a kernel's code does not depend on its tile sizes (they are arguments), so
#: problems of tens to a few hundred queries and keys cross as many query blocks, key tiles, few-row blocks
#: and key splits as the default tiling does at thousands; the bounds read the same tiling (cpu.arithmetic() asks
#: cpu.plan).  The slow tier reruns the variants at the default tiling and large shapes (``size="large"``).
SMALL_TILING = dict(forward64=(32, 16), forward32=(32, 32), backward64=(16, 16), backward32=(32, 32), min_blocks=4,
                    target_items=16, min_split_keys=40, small_block=8, decode_keys=40)


class Path:
    """An accelerated module and the description of its arithmetic (:mod:`iem_ref.bounds`)."""

    def __init__(self, name, mod):
        self.name = name
        self.mod = mod
        self.arith = mod.arithmetic()  # the path's own description: tiles read from its plan or layout
        self.small = name == "cuda" and CUDA_SIMULATED  # the simulator: tens of queries and keys at most


@pytest.fixture(params=["cpu", "cuda"])
def path(request, monkeypatch):
    """The path under test; the CPU's with :data:`SMALL_TILING` (see :func:`default_tiling` for its own)."""
    mod = importlib.import_module(f"iem_ref.accel.{request.param}")
    if request.param == "cpu":
        monkeypatch.setattr(mod, "TILING", mod.Tiling(**SMALL_TILING))
    return Path(request.param, mod)


@pytest.fixture
def default_tiling(path, monkeypatch):
    """The CPU's own tiling, for the tests whose shapes cross its tiles at their real sizes."""
    if path.name == "cpu":
        monkeypatch.setattr(path.mod, "TILING", path.mod.Tiling())


#: The heavy variant suites' runs: every CPU run; on the CUDA simulator one energy per dtype (the GPU kernels
#: are built per energy and dtype, the energy's branches resolved when they compile), the other two with -m slow.
RUNS = [pytest.param("cpu", dtype, energy, id=f"cpu-{energy}-{np.dtype(dtype).name}")
        for dtype in (np.float64, np.float32) for energy in ("dot", "sqeuclidean")] + [
    pytest.param("cuda", np.float32, "dot", id="cuda-dot-float32"),
    pytest.param("cuda", np.float64, "sqeuclidean", id="cuda-sqeuclidean-float64"),
    pytest.param("cuda", np.float64, "dot", id="cuda-dot-float64", marks=pytest.mark.slow),
    pytest.param("cuda", np.float32, "sqeuclidean", id="cuda-sqeuclidean-float32", marks=pytest.mark.slow),
]
runs = pytest.mark.parametrize("path, dtype, energy", RUNS, indirect=["path"])


@pytest.fixture(params=["small", pytest.param("large", marks=pytest.mark.slow)])
def size(request, path, monkeypatch):
    """``small``: the shapes of the default tier; ``large`` (slow): thousands of keys at the CPU's own tiling."""
    if request.param == "large":
        if path.small:
            pytest.skip("needs a GPU: the large shapes take hours under the CUDA simulator")
        if path.name == "cpu":
            monkeypatch.setattr(path.mod, "TILING", path.mod.Tiling())
    return request.param


def shapes(path, size, small, large, simulator):
    """The shapes of a run: ``simulator`` under the CUDA simulator, else ``small`` or ``large`` by ``size``."""
    if path.small:
        return simulator
    return large if size == "large" else small


unit = bounds.unit_roundoff


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def attention_bounds(path, q, k, v, dtype, **kw):
    """The reference's ``(a, L)`` and the path's :class:`iem_ref.bounds.ForwardBounds` against it."""
    return bounds.attention_bounds(path.arith, q, k, v, dtype, **kw)


def vjp_bounds(path, q, k, v, gout, dtype, forward, **kw):
    """The reference's ``(dq, dk, dv)`` and the path's bounds against them (:func:`iem_ref.bounds.attention_vjp_bounds`)."""
    return bounds.attention_vjp_bounds(path.arith, q, k, v, gout, dtype, forward=forward, **kw)


def rand(rng, shape, dtype, spread=1.0):
    return (spread * rng.standard_normal(shape)).astype(dtype)


# --- shapes ----------------------------------------------------------------------------
# (batch_q, batch_k, batch_v, N, M, D, Dv): odd sizes (1, 31, 33), non-square,
# M >> N (several key tiles and a partial one), broadcast batch axes, and on
# the CPU a decoding shape that splits the keys (N = 1, M = 20000: 2 splits).
SHAPES_FULL = [
    ((), (), (), 1, 1, 1, 1),
    ((), (), (), 31, 33, 16, 5),
    ((), (), (), 33, 31, 7, 9),
    ((2,), (2,), (2,), 129, 300, 16, 8),
    ((2, 1), (1, 3), (1, 3), 5, 700, 8, 3),
    ((), (), (), 3, 1000, 32, 4),
    ((3,), (), (), 17, 257, 64, 64),
]
SHAPES_DECODE = [((), (), (), 1, 20000, 8, 4), ((2,), (2,), (2,), 16, 9000, 16, 8)]
SHAPES_SMALL = [((), (), (), 1, 1, 1, 1), ((), (), (), 5, 7, 3, 2), ((2, 1), (1, 2), (1, 2), 3, 4, 2, 3)]


def shapes_for(path):
    return SHAPES_SMALL if path.small else SHAPES_FULL


def make_inputs(rng, shape, dtype, spread=1.0):
    bq, bk, bv, N, M, D, Dv = shape
    return rand(rng, bq + (N, D), dtype, spread), rand(rng, bk + (M, D), dtype, spread), rand(rng, bv + (M, Dv), dtype)


def agrees_forward(path, q, k, v, dtype, what, **kw):
    """The path's ``(a, L)`` within the bounds of the reference's, with its shapes and empty rows; returns ``(a, L, bounds)``."""
    a, L = path.mod.attention(q, k, v, return_lse=True, **kw)
    a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, **kw)
    assert a.shape == a_ref.shape and L.shape == L_ref.shape, f"{path.name} {what}: {a.shape}, {L.shape}"
    assert np.array_equal(np.isneginf(L), np.isneginf(L_ref)), f"{path.name} {what}: empty rows"
    assert_within(a, a_ref, fb.a, f"{path.name} a {what}")
    assert_within(L, L_ref, fb.L, f"{path.name} L {what}")
    return a, L, fb


class Case(NamedTuple):
    """One case of a variant suite: ``kw(s)`` the call's keywords from the shape's set-up ``s`` (the test's own
    record of its shape, inputs and random masks); ``simulator_backward``: its backward runs under the CUDA
    simulator too (about 10 s each there: every other case)."""

    kw: Callable
    simulator_backward: bool = True


def cases(*items):
    """``@cases(("id", kw, simulator_backward), ...)``: one test per case, named by its id (one failure hides no other)."""
    return pytest.mark.parametrize("case", [pytest.param(Case(kw, sb), id=name) for name, kw, sb in items])


def agree_on_case(path, case, q, k, v, gout, dtype, what, energy, **kw):
    """The forward, and the backward unless the simulator skips it for this case; returns the forward's results."""
    fwd = agrees_forward(path, q, k, v, dtype, what, energy=energy, **kw)
    if case.simulator_backward or not path.small:
        agrees_backward(path, q, k, v, gout, dtype, fwd, what, energy=energy, **kw)
    return fwd


def agrees_backward(path, q, k, v, gout, dtype, forward, what, **kw):
    """The path's gradients from the saved ``forward = (a, L, bounds)`` within their bounds: ``dq, dk, dv``, then ``dbias`` and ``dsinks`` when given."""
    a, L, fb = forward
    refs, bnds = vjp_bounds(path, q, k, v, gout, dtype, fb, **kw)
    grads = path.mod.attention_vjp(q, k, v, gout, out=a, lse=L, **kw)
    names = ("dq", "dk", "dv") + (("dbias",) if kw.get("bias") is not None else ()) + (("dsinks",) if kw.get("sinks") is not None else ())
    assert len(grads) == len(names) and all(g.dtype == dtype for g in grads), f"{path.name} {what}: {len(grads)} gradients"
    for name, got, ref, bound in zip(names, grads, refs, bnds):
        assert got.shape == ref.shape, f"{path.name} {name}: {got.shape} != {ref.shape}"
        assert_within(got, ref, bound, f"{path.name} {name} {what}")


# --- forward --------------------------------------------------------------------------
@pytest.mark.equation("A1", "A3", "A4", "T1", "M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_random(path, default_tiling, rng, dtype, energy):
    for shape in shapes_for(path):
        q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
        a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True)
        a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, energy=energy)
        assert a.dtype == dtype and L.dtype == dtype and a.shape == a_ref.shape and L.shape == L_ref.shape
        assert_within(a, a_ref, fb.a, f"{path.name} a {shape}")
        assert_within(L, L_ref, fb.L, f"{path.name} L {shape}")


@pytest.mark.equation("M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_decoding_split(path, default_tiling, rng, dtype):
    """Few queries, many keys: the CPU splits the keys over the cores and merges the partials (M2)."""
    if path.small:
        pytest.skip("needs a GPU: decoding shapes take minutes under the CUDA simulator (about 50 us per query-key pair)")
    for shape in SHAPES_DECODE:
        q, k, v = make_inputs(rng, shape, dtype)
        a, L = path.mod.attention(q, k, v, return_lse=True)
        a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype)
        assert_within(a, a_ref, fb.a, f"{path.name} a {shape}")
        assert_within(L, L_ref, fb.L, f"{path.name} L {shape}")


@pytest.mark.equation("A3", "T1")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 4.0])
def test_attention_scales(path, rng, dtype, scale):
    """``scale = 0`` is the uniform limit; large scales make the softmin nearly hard (large shifts ``|x - m|``)."""
    shape = SHAPES_SMALL[1] if path.small else SHAPES_FULL[1]
    q, k, v = make_inputs(rng, shape, dtype)
    a, L = path.mod.attention(q, k, v, scale=scale, return_lse=True)
    a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, scale=scale)
    assert_within(a, a_ref, fb.a, f"{path.name} a scale={scale}")
    assert_within(L, L_ref, fb.L, f"{path.name} L scale={scale}")
    if scale == 0.0:  # uniform: the mean of the values, L = log M
        assert_within(L, np.full(L.shape, math.log(k.shape[-2])), fb.L, "L = log M at scale 0")


@pytest.mark.equation("A3", "A4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_masks_and_causal(path, rng, dtype, energy):
    """Boolean masks (full and broadcast), causal with both alignments, and both together."""
    shape = ((2,), (2,), (2,), 5, 7, 3, 2) if path.small else ((2,), (2,), (2,), 40, 120, 8, 5)
    _, _, _, N, M, _, _ = shape
    q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
    full = rng.random((2, N, M)) < 0.7
    full[0, 1] = False  # a fully masked row
    cases = [
        dict(mask=full),
        dict(mask=rng.random((M,)) < 0.5),  # key padding, broadcast over batch and queries
        dict(mask=rng.random((N, 1)) < 0.5),  # whole rows on or off
        dict(is_causal=True),
        dict(is_causal=True, causal_alignment="bottom_right"),
        dict(is_causal=True, mask=full),
    ]
    # N > M with bottom-right alignment: the first M + 3 - M = 3 rows see no key
    qq = rand(rng, (2, M + 3, shape[5]), dtype)
    a, L = path.mod.attention(qq, k, v, is_causal=True, causal_alignment="bottom_right", energy=energy, return_lse=True)
    a_ref, L_ref, fb = attention_bounds(path, qq, k, v, dtype, energy=energy, is_causal=True, causal_alignment="bottom_right")
    assert_within(a, a_ref, fb.a, f"{path.name} bottom_right N > M: a")
    assert_within(L, L_ref, fb.L, f"{path.name} bottom_right N > M: L")
    assert np.isneginf(L[:, :3]).all() and (a[:, :3] == 0).all()
    for kw in cases:
        a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True, **kw)
        a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, energy=energy, **kw)
        assert_within(a, a_ref, fb.a, f"{path.name} a {sorted(kw)}")
        assert_within(L, L_ref, fb.L, f"{path.name} L {sorted(kw)}")
    a, L = path.mod.attention(q, k, v, mask=full, energy=energy, return_lse=True)
    assert (a[0, 1] == 0).all() and np.isneginf(L[0, 1])
    a_nan = path.mod.attention(q, k, v, mask=full, energy=energy, empty="nan")
    assert np.isnan(a_nan[0, 1]).all() and not np.isnan(np.delete(a_nan.reshape(-1, a_nan.shape[-1]), 1, axis=0)).any()


class WindowSetup(NamedTuple):
    N: int
    M: int
    w: int
    mask: np.ndarray


@pytest.mark.equation("V4", "G4")
@runs
@cases(("left", lambda s: dict(window=(s.w, 0)), True),
       ("both-bottom-right", lambda s: dict(window=(s.w, s.w // 2), causal_alignment="bottom_right"), False),
       ("right-only", lambda s: dict(window=(None, 1)), True),
       ("causal-masked", lambda s: dict(window=(2 * s.w, s.w), is_causal=True, mask=s.mask), False),
       ("zero-width", lambda s: dict(window=(0, 0)), True),
       ("zero-width-bottom-right", lambda s: dict(window=(0, 0), causal_alignment="bottom_right"), False))  # N > M: rows see no key
def test_attention_window(path, rng, dtype, energy, size, case):
    """The sliding window (V4), alone, with causality and a mask, both alignments, forward and backward.

    The shapes cross many of the path's tiles (the CPU's 256-512 keys, the
    simulator's 8), so that whole tiles outside the window are skipped and
    partial ones are cut inside; N > M with bottom-right alignment leaves
    rows with no key.
    """
    sizes = shapes(path, size, simulator=[((), (), (), 10, 26, 3, 2), ((), (), (), 12, 8, 2, 3)],
                   small=[((2,), (2,), (2,), 100, 110, 8, 5), ((), (), (), 70, 160, 4, 3), ((), (), (), 1, 300, 8, 4), ((), (), (), 90, 50, 4, 3)],
                   large=[((2,), (2,), (2,), 1100, 1100, 8, 5), ((), (), (), 700, 2100, 4, 3), ((), (), (), 1, 20000, 8, 4),
                          ((), (), (), 900, 500, 4, 3)])
    for shape in sizes:
        q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
        N, M = shape[3], shape[4]
        gout = rand(rng, np.broadcast_shapes(shape[0], shape[1], shape[2]) + (N, shape[6]), dtype)
        w = 3 if path.small else {"small": 12, "large": 300}[size]
        kw = case.kw(WindowSetup(N, M, w, rng.random((N, M)) < 0.8))
        agree_on_case(path, case, q, k, v, gout, dtype, f"{shape} {sorted(kw)}", energy, **kw)


class GroupSetup(NamedTuple):
    w: int
    shared_mask: np.ndarray
    head_mask: np.ndarray


@pytest.mark.equation("V6", "G4")
@runs
@cases(("plain", lambda s: dict(), True), ("causal", lambda s: dict(is_causal=True), False),
       ("window-bottom-right", lambda s: dict(window=(s.w, s.w // 2), causal_alignment="bottom_right"), True),
       ("mask-shared-by-heads", lambda s: dict(mask=s.shared_mask), False),
       ("mask-per-head-causal", lambda s: dict(mask=s.head_mask, is_causal=True), True))
def test_attention_grouped_query_heads(path, rng, dtype, energy, size, case):
    """Grouped-query heads (V6): ``Hq = g Hkv`` query heads over ``Hkv`` key/value heads, forward and backward.

    ``dk, dv`` come back per key/value head, summed over the group.  Cases:
    plain, causal, a window with bottom-right alignment, a mask shared by
    the heads (read per position) and one that differs between the heads of
    a group (stacked with the queries); on the CPU also a decoding shape
    (the key splits) and multi-query attention (``Hkv = 1``).
    """
    # (B, Hq, Hkv, N, M, D, Dv)
    sizes = shapes(path, size, simulator=[(1, 4, 2, 7, 11, 3, 2)],
                   small=[(2, 8, 2, 50, 90, 16, 5), (1, 4, 1, 1, 300, 8, 4), (1, 6, 3, 40, 30, 4, 3)],
                   large=[(2, 8, 2, 300, 700, 16, 5), (1, 4, 1, 1, 20000, 8, 4), (1, 6, 3, 130, 90, 4, 3)])
    for B, hq, hkv, N, M, D, Dv in sizes:
        spread = 0.5 if energy == "sqeuclidean" else 1.0
        q = rand(rng, (B, hq, N, D), dtype, spread)
        k, v = rand(rng, (B, hkv, M, D), dtype, spread), rand(rng, (B, hkv, M, Dv), dtype)
        gout = rand(rng, (B, hq, N, Dv), dtype)
        w = 3 if path.small else {"small": 12, "large": 200}[size]
        kw = case.kw(GroupSetup(w, rng.random((B, 1, N, M)) < 0.7, rng.random((B, hq, N, M)) < 0.7))
        agree_on_case(path, case, q, k, v, gout, dtype, f"{hq}/{hkv} {sorted(kw)}", energy, enable_gqa=True, **kw)


class LogitSetup(NamedTuple):
    N: int
    H: int
    per_head: np.ndarray
    shared: np.ndarray
    per_key: np.ndarray
    slopes: np.ndarray
    w: int
    seg: dict


@pytest.mark.equation("V1", "V2", "V3", "G4")
@runs
@cases(("bias-per-head", lambda s: dict(bias=s.per_head), True),
       ("bias-shared-causal-bottom-right", lambda s: dict(bias=s.shared, is_causal=True, causal_alignment="bottom_right"), False),
       ("softcap", lambda s: dict(softcap=1.5), True),
       ("alibi", lambda s: dict(alibi_slopes=s.slopes), False),
       ("alibi-causal", lambda s: dict(alibi_slopes=s.slopes, is_causal=True), True),
       ("all-with-window-and-sinks", lambda s: dict(bias=s.per_key, alibi_slopes=s.slopes, softcap=2.0, window=(s.w, s.w),
                                                     sinks=np.ones(s.H)), False),
       ("alibi-per-segment", lambda s: None if s.N == 1 else dict(alibi_slopes=np.stack([s.slopes, 2 * s.slopes]), softcap=3.0,
                                                                    is_causal=True, **s.seg), True))
def test_attention_logits(path, rng, dtype, energy, size, case):
    """The logits' variants: a bias (V1), ALiBi (V2) and a soft-cap (V3), alone and together, forward and backward.

    The backward returns ``dbias`` (the bias's shape) after ``dq, dk, dv``.
    Biases: one per head and query (with ``-inf`` entries, which exclude
    their keys), one shared by the heads (a group's heads read it per
    position), one per key only (read from its own data); ALiBi with both
    alignments, with segments (one slope per segment) and far keys whose
    float32 weights underflow; a soft-cap small enough to bend the scores;
    with grouped-query heads, causality, a window and sinks.
    """
    # (H, Hkv, N, M, D, Dv)
    sizes = shapes(path, size, simulator=[(2, 1, 7, 9, 3, 2)], small=[(4, 2, 50, 90, 16, 5), (2, 2, 1, 300, 8, 4)],
                   large=[(4, 2, 300, 700, 16, 5), (2, 2, 1, 20000, 8, 4)])
    for H, hkv, N, M, D, Dv in sizes:
        spread = 0.5 if energy == "sqeuclidean" else 1.0
        q = rand(rng, (H, N, D), dtype, spread)
        k, v = rand(rng, (hkv, M, D), dtype, spread), rand(rng, (hkv, M, Dv), dtype)
        gout = rand(rng, (H, N, Dv), dtype)
        per_head = rand(rng, (H, N, M), dtype)
        per_head[0, : max(1, N // 3), : M // 2] = -np.inf
        shared, per_key = rand(rng, (1, N, M), dtype), rng.standard_normal(M)
        slopes = 2.0 ** -np.arange(1, H + 1)
        w = 2 if path.small else {"small": 10, "large": 100}[size]
        seg = dict(cu_seqlens_q=np.array([0, N // 2, N]), cu_seqlens_k=np.array([0, M // 3, M]))
        kw = case.kw(LogitSetup(N, H, per_head, shared, per_key, slopes, w, seg))
        if kw is None:  # segments need more than one query
            continue
        kw = dict(kw, enable_gqa=True) if hkv != H else kw
        agree_on_case(path, case, q, k, v, gout, dtype, f"{H}/{hkv} {sorted(kw)}", energy, **kw)


class DropoutSetup(NamedTuple):
    H: int
    per_head: np.ndarray
    shared: np.ndarray
    bias: np.ndarray


@pytest.mark.equation("V8", "G4")
@runs
@cases(("per-head", lambda s: dict(dropout_p=0.3, dropout_mask=s.per_head), True),
       ("shared-causal-rows-dropped", lambda s: dict(dropout_p=0.5, dropout_mask=s.shared, is_causal=True), False),
       ("with-bias-and-sinks", lambda s: dict(dropout_p=0.2, dropout_mask=s.per_head, bias=s.bias, sinks=np.ones(s.H)), True))
def test_attention_dropout(path, rng, dtype, energy, size, case):
    """Dropout with an explicit mask (V8): the dropped pairs leave the mean, not the normaliser, forward and backward.

    ``L`` is the one without dropout; ``a = sum_j r_ij keep_ij v_j / (1 - p)``;
    ``dv`` sums ``r c u`` and ``dZ`` uses ``b = c <u, v>``.  Masks: one per
    head and query, one shared by the heads, one that drops every key of
    some rows; with causality, grouped-query heads, a bias and sinks.  A
    dropped key's NaN value is never read.
    """
    # (H, Hkv, N, M, D, Dv)
    sizes = shapes(path, size, simulator=[(2, 1, 7, 9, 3, 2)], small=[(4, 2, 50, 90, 16, 5), (2, 2, 1, 300, 8, 4)],
                   large=[(4, 2, 300, 700, 16, 5), (2, 2, 1, 20000, 8, 4)])
    for H, hkv, N, M, D, Dv in sizes:
        spread = 0.5 if energy == "sqeuclidean" else 1.0
        q = rand(rng, (H, N, D), dtype, spread)
        k, v = rand(rng, (hkv, M, D), dtype, spread), rand(rng, (hkv, M, Dv), dtype)
        gout = rand(rng, (H, N, Dv), dtype)
        per_head = rng.random((H, N, M)) >= 0.3
        shared = rng.random((1, N, M)) >= 0.5
        shared[:, : max(1, N // 4)] = False  # these rows keep nothing: a = 0, L as without dropout
        kw = case.kw(DropoutSetup(H, per_head, shared, rand(rng, (1, N, M), dtype)))
        kw = dict(kw, enable_gqa=True) if hkv != H else kw
        agree_on_case(path, case, q, k, v, gout, dtype, f"{H}/{hkv} {sorted(kw)}", energy, **kw)


@pytest.mark.equation("V8")
def test_dropped_values_are_never_read(path, rng):
    """A key dropped in every row: its NaN value is never read, and the result is the one with a finite value there."""
    q, k, v = make_inputs(rng, ((), (), (), 3, 5, 2, 2), np.float64)
    keep = np.ones((3, 5), bool)
    keep[:, 1] = False
    v_nan = v.copy()
    v_nan[1] = np.nan  # dropped everywhere: never read
    a = path.mod.attention(q, k, v_nan, dropout_p=0.25, dropout_mask=keep)
    assert np.isfinite(a).all() and np.array_equal(a, path.mod.attention(q, k, v, dropout_p=0.25, dropout_mask=keep))


@pytest.mark.equation("V1", "V3")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_logits(path, rng, dtype):
    """The logits' rows of the edge-case policy, as the reference: a ``-inf`` bias excludes its key, ``+inf`` makes it
    certain, NaN spoils its row, a row whose bias is ``-inf`` everywhere is empty; a soft-cap bounds even an infinite score."""
    q, k, v = make_inputs(rng, ((), (), (), 4, 5, 2, 2), dtype)
    bias = np.zeros((4, 5))
    bias[0, 1] = -np.inf
    bias[1, 2] = np.inf
    bias[2, 3] = np.nan
    bias[3] = -np.inf
    for kw in [dict(bias=bias), dict(bias=bias, softcap=2.0), dict(bias=bias, empty="nan")]:
        a, L = path.mod.attention(q, k, v, return_lse=True, **kw)
        a_ref, L_ref = iem_ref.attention(q, k, v, return_lse=True, **kw)
        assert np.array_equal(np.isnan(a), np.isnan(a_ref)) and np.array_equal(np.isnan(L), np.isnan(L_ref)), kw
        assert np.isnan(L[2]) and np.isposinf(L[1]) and np.isneginf(L[3]), kw
        assert np.array_equal(a[1], v[2]), kw  # the certain key's value, exactly
        masked = np.ones((4, 5), bool)
        masked[0, 1] = False  # a -inf bias is the mask's selection: the same arithmetic, the same bits
        a_mask = path.mod.attention(q, k, v, bias=np.zeros((4, 5)), mask=masked, **{n: kw[n] for n in kw if n != "bias"})
        assert np.array_equal(a[0], a_mask[0]), kw
    qp = np.abs(q) + 1
    k_inf, k_big = k.copy(), k.copy()
    k_inf[0], k_big[0] = np.inf, 1e30  # scores of +-inf and of +-1e30: both capped to exactly +-c
    a, L = path.mod.attention(qp, k_inf, v, softcap=2.0, return_lse=True)
    a_big, L_big = path.mod.attention(qp, k_big, v, softcap=2.0, return_lse=True)
    assert np.isfinite(L).all() and np.array_equal(a, a_big) and np.array_equal(L, L_big)


def _cumulative(rng, total, segments, empty=()):
    """Cumulative lengths of ``segments`` random segments summing to ``total``; the segments in ``empty`` have length 0."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=segments - 1 - len(empty), replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [total]])).tolist()
    for s in sorted(empty):
        lengths.insert(s, 0)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class SegmentSetup(NamedTuple):
    w: int
    mask: np.ndarray


@pytest.mark.equation("V7", "G4")
@runs
@cases(("plain", lambda s: dict(), True), ("causal", lambda s: dict(is_causal=True), False),
       ("causal-bottom-right", lambda s: dict(is_causal=True, causal_alignment="bottom_right"), True),
       ("window-masked", lambda s: dict(window=(s.w, s.w // 2), mask=s.mask), False))
def test_attention_packed_segments(path, rng, dtype, energy, size, case):
    """Packed variable-length sequences (V7): each query competes over its own segment's keys only, forward and backward.

    Segments of random lengths, one of them empty, queries and keys cut
    differently (so that both causal alignments differ inside a segment,
    and top-left leaves rows without a key), crossing many of the path's
    tiles; with causality, a window, a mask and grouped-query heads.
    """
    # (H, Hkv, N, M, D, Dv, segments)
    sizes = shapes(path, size, simulator=[(2, 1, 13, 11, 3, 2, 4)], small=[(2, 2, 150, 130, 8, 5, 6), (4, 2, 50, 90, 16, 4, 5)],
                   large=[(2, 2, 1500, 1300, 8, 5, 6), (4, 2, 300, 700, 16, 4, 5)])
    for H, hkv, N, M, D, Dv, nseg in sizes:
        spread = 0.5 if energy == "sqeuclidean" else 1.0
        q = rand(rng, (H, N, D), dtype, spread)
        k, v = rand(rng, (hkv, M, D), dtype, spread), rand(rng, (hkv, M, Dv), dtype)
        gout = rand(rng, (H, N, Dv), dtype)
        seg = dict(cu_seqlens_q=_cumulative(rng, N, nseg, empty=[1]), cu_seqlens_k=_cumulative(rng, M, nseg, empty=[1]))
        w = 2 if path.small else {"small": 10, "large": 100}[size]
        kw = dict(case.kw(SegmentSetup(w, rng.random((N, M)) < 0.8)), **seg)
        kw = dict(kw, enable_gqa=True) if hkv != H else kw
        agree_on_case(path, case, q, k, v, gout, dtype, f"{H}/{hkv} {sorted(kw)}", energy, **kw)


class SinkSetup(NamedTuple):
    sinks: np.ndarray
    no_head: np.ndarray
    w: int
    empty: np.ndarray


@pytest.mark.equation("V5", "G6")
@runs
@cases(("plain", lambda s: dict(sinks=s.sinks), True), ("causal", lambda s: dict(sinks=s.sinks, is_causal=True), False),
       ("window-no-sink-on-a-head", lambda s: dict(sinks=s.no_head, window=(s.w, s.w // 2)), True),
       ("rows-without-keys", lambda s: dict(sinks=s.sinks, mask=s.empty), False))
def test_attention_sinks(path, rng, dtype, energy, size, case):
    """Attention sinks (V5): one more hypothesis per row with a per-head logit and value 0, forward and backward.

    The backward returns ``dsinks`` (the sinks' shape) after ``dq, dk, dv``;
    the squared-Euclidean ``dq`` keeps its ``q_i`` term (the rows' ``dS``
    no longer sum to 0).  Cases: plain, causal with grouped-query heads, a
    window, a mask that empties rows (the sink takes their mass), and a sink
    of ``-inf`` on one head (no sink there).
    """
    # (H, Hkv, N, M, D, Dv)
    sizes = shapes(path, size, simulator=[(2, 2, 6, 9, 3, 2)],
                   small=[(4, 4, 50, 90, 16, 5), (4, 2, 1, 300, 8, 4), (6, 3, 40, 30, 4, 3)],
                   large=[(4, 4, 300, 700, 16, 5), (4, 2, 1, 20000, 8, 4), (6, 3, 130, 90, 4, 3)])
    for H, hkv, N, M, D, Dv in sizes:
        spread = 0.5 if energy == "sqeuclidean" else 1.0
        q = rand(rng, (H, N, D), dtype, spread)
        k, v = rand(rng, (hkv, M, D), dtype, spread), rand(rng, (hkv, M, Dv), dtype)
        gout = rand(rng, (H, N, Dv), dtype)
        sinks = rng.standard_normal(H) * 2.0
        no_head = sinks.copy()
        no_head[0] = -np.inf
        empty = rng.random((N, M)) < 0.5
        empty[: max(1, N // 3)] = False  # these rows see no key: the sink takes all their mass
        w = 3 if path.small else {"small": 12, "large": 200}[size]
        kw = case.kw(SinkSetup(sinks, no_head, w, empty))
        kw = dict(kw, enable_gqa=True) if hkv != H else kw
        a, L, *_ = agree_on_case(path, case, q, k, v, gout, dtype, f"{H}/{hkv} {sorted(kw)}", energy, **kw)
        if "mask" in kw:  # rows without a key: output 0, log-partition = the sink's logit
            gone = ~empty.any(axis=-1)
            assert (a[:, gone] == 0).all() and np.array_equal(L[:, gone], np.broadcast_to(sinks.astype(dtype)[:, None], L[:, gone].shape))


@pytest.mark.equation("V5")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_sinks(path, rng, dtype):
    """The sink's rows of the edge-case policy: an empty row is not empty, ``-inf`` is no sink, ``+inf`` certain, NaN spoils its row."""
    q, k, v = make_inputs(rng, ((), (), (), 3, 5, 2, 2), dtype)
    mask = np.ones((3, 5), bool)
    mask[1] = False
    a0, L0 = path.mod.attention(q, k, v, mask=mask, return_lse=True)
    for s, check in [(0.5, "finite"), (-np.inf, "none"), (np.inf, "certain"), (np.nan, "nan")]:
        a, L = path.mod.attention(q, k, v, mask=mask, sinks=np.array([s]), return_lse=True, empty="nan")
        if check == "finite":
            assert (a[1] == 0).all() and L[1] == dtype(0.5)
        elif check == "none":  # the plain result, empty="nan" applies again
            assert np.isnan(a[1]).all() and np.array_equal(a[[0, 2]], a0[[0, 2]]) and np.array_equal(L, L0)
        elif check == "certain":
            assert (a == 0).all() and np.isposinf(L).all()
        else:
            assert np.isnan(a).all() and np.isnan(L).all()
        dsinks = path.mod.attention_vjp(q, k, v, np.ones_like(a0), mask=mask, sinks=np.array([s]))[3]
        ref = iem_ref.attention_vjp(q, k, v, np.ones_like(a0), mask=mask, sinks=np.array([s]))[3]
        assert np.array_equal(np.isnan(dsinks), np.isnan(ref)) and (check == "nan" or dsinks[0] == 0 or check == "finite")


@pytest.mark.equation("A4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_return_lse_off_and_defaults(path, rng, dtype):
    q, k, v = make_inputs(rng, SHAPES_SMALL[1], dtype)
    a = path.mod.attention(q, k, v)
    a2, _ = path.mod.attention(q, k, v, return_lse=True)
    assert isinstance(a, np.ndarray) and np.array_equal(a, a2)


# --- edge cases of the policy ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_nan_in_masked_keys_and_values_never_leaks(path, rng, dtype):
    q, k, v = make_inputs(rng, ((), (), (), 4, 6, 3, 2), dtype)
    k[2, 0] = np.nan
    v[2, 1] = np.nan
    v[4, 0] = np.inf
    k[4, 1] = -np.inf
    mask = np.ones((4, 6), bool)
    mask[:, 2] = mask[:, 4] = False
    for energy in ["dot", "sqeuclidean"]:
        a, L = path.mod.attention(q, k, v, mask=mask, energy=energy, return_lse=True)
        a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, mask=mask, energy=energy)
        assert np.isfinite(a).all() and np.isfinite(L).all()
        assert_within(a, a_ref, fb.a, f"{energy}: masked NaN/inf keys and values")
        assert_within(L, L_ref, fb.L, f"{energy}: masked NaN/inf keys and values, L")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_nan_in_participating_inputs_spoils_only_its_rows(path, rng, dtype):
    q, k, v = make_inputs(rng, ((), (), (), 5, 6, 3, 2), dtype)
    q[1, 2] = np.nan  # query 1's row
    v[3, 0] = np.nan  # every row that sees key 3: with causal, rows 3 and 4
    for kw in [dict(), dict(is_causal=True)]:
        a, L = path.mod.attention(q, k, v, return_lse=True, **kw)
        a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, **kw)
        assert_within(a, a_ref, fb.a, f"NaN propagation {kw}")
        assert_within(L, L_ref, fb.L, f"NaN propagation {kw}, L")
    a = path.mod.attention(q, k, v, is_causal=True)
    assert np.isnan(a[1]).all() and np.isnan(a[3:, 0]).all() and np.isfinite(a[[0, 2]]).all() and np.isfinite(a[3:, 1]).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_infinite_energies_from_inputs(path, dtype):
    """Dot energies ``-<q, k>`` of +-inf and NaN from infinite keys: excluded, certain (shared), NaN rows."""
    q = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype)
    k = np.array([[-np.inf, 0.0], [1.0, 2.0], [-np.inf, 0.0], [0.5, -1.0]], dtype)
    v = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype)
    # row 0: keys 0, 2 have score -inf (excluded); row 1: +inf twice (certain, shared);
    # row 2: 0 * inf = NaN (NaN row); row 3: -inf + 0 = -inf (excluded)
    a, L = path.mod.attention(q, k, v, scale=1.0, return_lse=True)
    a_ref, L_ref = iem_ref.attention(q, k, v, scale=1.0, return_lse=True)
    assert np.isposinf(L[1]) and np.isnan(L[2]) and np.isfinite(L[[0, 3]]).all()
    u = unit(dtype)
    assert_within(a, a_ref, 8 * u * 8, "inf energies from inf keys")  # convex combinations of |v| <= 8, few ops
    assert_within(L, L_ref, 8 * u * (1 + np.abs(_finite(L_ref))), "inf energies from inf keys, L")


@pytest.mark.equation("A3", "A4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_softmin_summary_infinities(path, dtype):
    inf = np.inf
    d = np.array(
        [
            [0.0, 1.0, 2.0, inf],  # +inf: excluded
            [-inf, 0.0, -inf, 1.0],  # two -inf: they share the mass, L = +inf
            [inf, inf, inf, inf],  # empty
            [0.0, np.nan, 1.0, 2.0],  # NaN: NaN row
            [5.0, 5.0, 5.0, 5.0],  # ties
        ],
        dtype,
    )
    v = np.array([[1.0, -1.0], [2.0, 0.5], [3.0, 7.0], [np.nan, 4.0]], dtype)  # NaN value on the +inf key of row 0
    mask = np.array([True, True, True, False])  # ... and on a masked key
    for kw in [dict(), dict(mask=mask)]:
        for tau in [1.0, 0.25, np.inf]:
            a, L = path.mod.softmin_summary(d, v, tau, **kw)
            a_ref, L_ref = iem_ref.softmin_summary(d, v, tau, **kw)
            u = unit(dtype)
            bound = 16 * u * (1 + 4 * 7)  # weights from energies <= 5/tau... few ops; values <= 7
            assert_within(a, a_ref, bound, f"softmin_summary edges tau={tau} {kw}")
            assert_within(L, L_ref, 16 * u * (1 + np.abs(_finite(L_ref))), f"softmin_summary edges L tau={tau} {kw}")
    a, L = path.mod.softmin_summary(d, v, empty="nan")
    assert np.isnan(a[2]).all() and np.isneginf(L[2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_empty_key_set(path, rng, dtype):
    q = rand(rng, (2, 3, 4), dtype)
    k = np.zeros((2, 0, 4), dtype)
    v = np.zeros((2, 0, 5), dtype)
    a, L = path.mod.attention(q, k, v, return_lse=True)
    assert a.shape == (2, 3, 5) and a.dtype == dtype and (a == 0).all() and np.isneginf(L).all()
    a = path.mod.attention(q, k, v, empty="nan")
    assert np.isnan(a).all()
    a, L = path.mod.softmin_summary(np.zeros((3, 0), dtype), np.zeros((0, 2), dtype))
    assert a.shape == (3, 2) and (a == 0).all() and np.isneginf(L).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_scale_zero_is_uniform_over_participating_keys(path, rng, dtype):
    q, k, v = make_inputs(rng, ((), (), (), 3, 5, 2, 2), dtype)
    mask = np.array([True, False, True, True, False])
    a = path.mod.attention(q, k, v, scale=0.0, mask=mask)
    expected = np.broadcast_to(v[mask].astype(np.float64).mean(axis=0), a.shape)
    assert_within(a, expected, 8 * unit(dtype) * np.abs(v).max(), "scale = 0: uniform over the unmasked keys")


# --- softmin_summary ----------------------------------------------------------------------
@pytest.mark.equation("A3", "A4", "M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmin_summary_random(path, rng, dtype):
    shapes = [((), (), 3, 5, 2), ((2,), (1,), 4, 6, 3)] if path.small else [((), (), 1, 1, 1), ((), (), 31, 300, 5), ((2, 3), (3,), 17, 513, 4), ((), (2,), 9, 40, 3)]
    for bd, bv, N, M, Dv in shapes:
        d = rand(rng, bd + (N, M), dtype, spread=3.0)
        v = rand(rng, bv + (M, Dv), dtype)
        for tau, mask in [(1.0, None), (0.3, rng.random((N, M)) < 0.8)]:
            a, L = path.mod.softmin_summary(d, v, tau, mask=mask)
            a_ref, L_ref = iem_ref.softmin_summary(d, v, tau, mask=mask)
            assert a.shape == a_ref.shape and L.shape == L_ref.shape and a.dtype == dtype
            x = -np.asarray(d, np.float64) / tau
            # the score is -d * (1/tau): no dot product (S = 0, D = 0), only the scale's and the product's roundings
            fb = bounds.forward_bounds(path.arith, dtype, x, np.zeros_like(x), 1 / tau, 0, v, a_ref, L_ref, take=mask)
            assert_within(a, a_ref, fb.a, f"{path.name} softmin_summary a {(bd, bv, N, M)}")
            assert_within(L, L_ref, fb.L, f"{path.name} softmin_summary L {(bd, bv, N, M)}")


# --- backward (G4) --------------------------------------------------------------------------
@pytest.mark.equation("G4", "G1")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_vjp(path, default_tiling, rng, dtype, energy):
    shapes = [((2,), (2,), (2,), 5, 7, 3, 2)] if path.small else [((), (), (), 1, 1, 1, 1), ((), (), (), 31, 33, 16, 5), ((2,), (2,), (2,), 129, 300, 8, 6), ((), (), (), 3, 600, 4, 2)]
    for shape in shapes:
        q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
        gout = rand(rng, np.broadcast_shapes(shape[0], shape[1], shape[2]) + (shape[3], shape[6]), dtype)
        N, M = shape[3], shape[4]
        mask = rng.random((N, M)) < 0.8
        cases = [dict(), dict(mask=mask), dict(is_causal=True), dict(scale=0.7, is_causal=True, causal_alignment="bottom_right")]
        for n_case, kw in enumerate(cases[1::2] if path.small else cases):  # the simulator: ~10 s per call here
            a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True, **kw)
            a_ref, L_ref, fb = attention_bounds(path, q, k, v, dtype, energy=energy, **kw)
            refs, bnds = vjp_bounds(path, q, k, v, gout, dtype, fb, energy=energy, **kw)
            for saved in [dict(out=a, lse=L), dict()][: 1 if path.small and n_case else 2]:
                grads = path.mod.attention_vjp(q, k, v, gout, energy=energy, **saved, **kw)
                for name, got, ref, bound in zip(("dq", "dk", "dv"), grads, refs, bnds):
                    assert got.dtype == dtype and got.shape == ref.shape
                    assert_within(got, ref, bound, f"{path.name} {name} {shape} {sorted(kw)} saved={bool(saved)}")


@pytest.mark.equation("G4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_vjp_edges(path, rng, dtype):
    """Masked NaN/inf keys and values do not leak into the gradients; fully masked rows give zero gradients."""
    q, k, v = make_inputs(rng, ((), (), (), 4, 6, 3, 2), dtype)
    gout = rand(rng, (4, 2), dtype)
    k[2, 0] = np.nan
    v[4, 1] = np.inf
    mask = np.ones((4, 6), bool)
    mask[:, 2] = mask[:, 4] = False
    mask[3] = False  # a fully masked row
    got = path.mod.attention_vjp(q, k, v, gout, mask=mask)
    ref = iem_ref.attention_vjp(q, k, v, gout, mask=mask)
    kc, vc = k.copy(), v.copy()
    kc[2, 0] = 0.0
    vc[4, 1] = 0.0
    a_ref, L_ref, fb = attention_bounds(path, q, kc, vc, dtype, mask=mask)
    _, bnds = vjp_bounds(path, q, kc, vc, gout, dtype, fb, mask=mask)
    for name, x, y, bd in zip(("dq", "dk", "dv"), got, ref, bnds):
        assert np.isfinite(x).all(), name
        assert_within(x, y, bd, f"vjp edges {name}")
    assert (got[0][3] == 0).all()


# --- scalar activations (S3, S4, H3) ----------------------------------------------------------
def _scalar_inputs(rng, dtype, n):
    z = np.concatenate([rng.standard_normal(n) * 3, [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 800.0, -800.0, np.inf, -np.inf, np.nan]])
    return z.astype(dtype)


@pytest.mark.equation("S3", "S2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sign_posterior_mean(path, rng, dtype):
    n = 20 if path.small else 2000
    dp = _scalar_inputs(rng, dtype, n)
    dm = rng.permutation(_scalar_inputs(rng, dtype, n)).astype(dtype)
    got = path.mod.sign_posterior_mean(dp, dm)
    ref = iem_ref.sign_posterior_mean(dp, dm)
    # tanh((d_- - d_+)/2): the difference rounds once (u64 |x|/2 in the argument, times tanh' = 1 - a^2),
    # tanh and the reference's r_+ - r_- (3 ulps each) add 8 u64; the float32 output rounds once more.
    with np.errstate(invalid="ignore"):
        x = _finite(np.abs(dm.astype(np.float64) - dp.astype(np.float64)))
    bound = (1 - _finite(ref.astype(np.float64)) ** 2) * U64 * x + 8 * U64 + unit(dtype) * np.abs(_finite(ref))
    assert got.dtype == dtype
    assert_within(got, ref, bound, f"{path.name} sign_posterior_mean")
    assert path.mod.sign_posterior_mean(np.inf, np.inf) == 0.0 and path.mod.sign_posterior_mean(np.inf, 1.0) == -1.0
    assert path.mod.sign_posterior_mean(-np.inf, -np.inf) == 0.0 and np.isnan(path.mod.sign_posterior_mean(np.nan, 1.0))


@pytest.mark.equation("S4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m, sigma", [(1.0, 1.0), (2.0, 0.5)])
def test_tanh_from_signed_gaussian(path, rng, dtype, m, sigma):
    z = _scalar_inputs(rng, dtype, 20 if path.small else 2000)
    got = path.mod.tanh_from_signed_gaussian(z, m, sigma)
    ref = iem_ref.tanh_from_signed_gaussian(z, m, sigma)
    # Both form the same float64 linear energies -+ alpha z (alpha = m / sigma^2); as for S3 from there.
    z64 = _finite(z.astype(np.float64))
    x = 2 * np.abs(m * z64) / sigma**2
    bound = (1 - _finite(ref.astype(np.float64)) ** 2) * U64 * x + 8 * U64 + unit(dtype) * np.abs(_finite(ref))
    assert got.dtype == dtype and got.shape == ref.shape
    assert_within(got, ref, bound, f"{path.name} tanh_from_signed_gaussian")


@pytest.mark.equation("H3")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("tau", [1.0, 0.1, 7.0])
def test_softplus(path, rng, dtype, tau):
    z = _scalar_inputs(rng, dtype, 20 if path.small else 2000)
    got = path.mod.softplus(z, tau)
    ref = iem_ref.softplus(z, tau)
    # max(z, 0) + tau log1p(exp(-|z|/tau)): a division, exp, log1p (1 ulp each), a product and a sum: 8 u64 relative;
    # the rounded y = |z|/tau moves exp(-y) by u64 y relative (the reference divides error-free); its log1p form is
    # within 3 u64; the float32 output rounds once more.
    y = np.abs(_finite(z.astype(np.float64))) / tau
    bound = (11 * U64 + U64 * y + unit(dtype)) * np.abs(_finite(ref.astype(np.float64)))
    assert got.dtype == dtype
    assert_within(got, ref, bound, f"{path.name} softplus tau={tau}")
    assert float(path.mod.softplus(np.inf, np.inf)) == float(iem_ref.softplus(np.inf, np.inf))


# --- bad input: the same error class as the reference ---------------------------------------------
def _error_class(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc)
    return None


BAD_ATTENTION = [
    ("complex q", lambda x: dict(q=x["q"].astype(np.complex128))),
    ("bool k", lambda x: dict(k=x["k"] > 0)),
    ("D mismatch", lambda x: dict(k=x["k"][..., :1])),
    ("M mismatch", lambda x: dict(v=x["v"][:-1])),
    ("1-D q", lambda x: dict(q=x["q"][0])),
    ("batch mismatch", lambda x: dict(q=np.stack([x["q"]] * 2), k=np.stack([x["k"]] * 3), v=np.stack([x["v"]] * 3))),
    ("scale < 0", lambda x: dict(scale=-1.0)),
    ("scale inf", lambda x: dict(scale=np.inf)),
    ("scale nan", lambda x: dict(scale=np.nan)),
    ("mask wrong shape", lambda x: dict(mask=np.ones((2, 2), bool))),
    ("mask not bool", lambda x: dict(mask=np.ones((3, 4)))),
    ("is_causal not bool", lambda x: dict(is_causal="yes")),
    ("bad alignment", lambda x: dict(is_causal=True, causal_alignment="middle")),
    ("bad empty", lambda x: dict(empty="one")),
    ("unknown energy", lambda x: dict(energy="nope")),
    ("window negative", lambda x: dict(window=(-3, 0))),
    ("window not a pair", lambda x: dict(window=5)),
    ("window float", lambda x: dict(window=(2.5, 0))),
]


@pytest.mark.parametrize("case", BAD_ATTENTION, ids=[c[0] for c in BAD_ATTENTION])
def test_bad_input_same_error_class(path, rng, case):
    base = dict(q=rand(rng, (3, 2), np.float64), k=rand(rng, (4, 2), np.float64), v=rand(rng, (4, 2), np.float64))
    args = {**base, **case[1](base)}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    expected = _error_class(lambda: iem_ref.attention(q, k, v, **args))
    assert expected is not None, "the reference accepted the bad input: the case is wrong"
    assert _error_class(lambda: path.mod.attention(q, k, v, **args)) is expected
    vjp_args = {key: val for key, val in args.items() if key != "empty"}
    gout = np.ones((3, 2))
    expected = _error_class(lambda: iem_ref.attention_vjp(q, k, v, gout, **vjp_args))
    assert _error_class(lambda: path.mod.attention_vjp(q, k, v, gout, **vjp_args)) is expected


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.softmin_summary(np.ones((2, 3)), np.ones((4, 1))),  # M mismatch
        lambda m: m.softmin_summary(np.ones((2, 3)), np.ones((3, 1)), tau=0.0),
        lambda m: m.softmin_summary(np.ones((2, 3)), np.ones((3, 1)), tau=-1.0),
        lambda m: m.softmin_summary(np.ones((2, 3)), np.ones((3, 1)), tau=np.nan),
        lambda m: m.softmin_summary(np.ones(3), np.ones((3, 1))),  # 1-D d
        lambda m: m.softmin_summary(np.ones((2, 3), complex), np.ones((3, 1))),
        lambda m: m.softmin_summary(np.ones((2, 3)), np.ones((3, 1)), mask=np.ones((2, 3), int)),
        lambda m: m.attention_vjp(np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 2)), np.ones((2, 3))),  # grad_out shape
        lambda m: m.attention_vjp(np.ones((2, 2)), np.ones((3, 2)), np.ones((3, 2)), np.ones((2, 2)), energy="laplace"),
        lambda m: m.sign_posterior_mean(np.ones(2), np.ones(3)),
        lambda m: m.sign_posterior_mean(np.ones(2, complex), np.ones(2)),
        lambda m: m.tanh_from_signed_gaussian(np.ones(2, bool)),
        lambda m: m.tanh_from_signed_gaussian(np.ones(2), sigma=0.0),
        lambda m: m.tanh_from_signed_gaussian(np.ones(2), sigma=np.nan),
        lambda m: m.softplus(np.ones(2), tau=0.0),
        lambda m: m.softplus(np.ones(2), tau=np.nan),
        lambda m: m.softplus(np.array(["a"])),
    ],
)
def test_bad_input_same_error_class_other_functions(path, call):
    expected = _error_class(lambda: call(iem_ref))
    assert expected is not None, "the reference accepted the bad input: the case is wrong"
    assert _error_class(lambda: call(path.mod)) is expected


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_are_refused_with_a_pointer_to_the_reference(path, rng, dtype):
    from iem_ref.precision import low_precision_dtype

    q, k, v = (rand(rng, s, np.float32).astype(low_precision_dtype(dtype)) for s in [(3, 2), (4, 2), (4, 2)])
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}.*float32/float64.*reference"):
        path.mod.attention(q, k, v)
    with pytest.raises(TypeError, match=r"\bd has dtype"):
        path.mod.softmin_summary(np.ones((2, 4), low_precision_dtype(dtype)), np.ones((4, 1)))
    iem_ref.attention(q, k, v)  # the reference takes them
