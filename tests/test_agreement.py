"""The agreement suite: every accelerated path against the reference (same results, same errors).

One parametrised suite over the paths ``cpu`` (:mod:`iem_ref.accel.cpu`) and
``cuda`` (:mod:`iem_ref.accel.cuda`; under the Numba CUDA simulator only small
shapes, about 50 us per query-key pair there).  Each test compares a path
with its reference twin (:func:`iem_ref.attention`,
:func:`iem_ref.softmin_summary`, :func:`iem_ref.attention_vjp`, the scalar
activations): the same values within a derived bound, the same NaN / inf
pattern, or the same error class.

Error bounds (derived, not fitted).  ``u`` is the unit roundoff of the
path's compute dtype (float32 inputs compute in float32 on both paths),
``g(n) = n u / (1 - n u)``, ``u64`` float64's.

Forward, row ``i``; scores ``x_ij = -d_ij * scale``:

* score: ``|dx_ij| <= scale (g(D+3) + g64(D+3)) S_ij`` with
  ``S_ij = sum_c |q_ic k_jc|`` for the dot energy and
  ``S_ij = (|q_i|^2 + |k_j|^2)/2 + sum_c |q_ic k_jc|`` for the squared
  Euclidean one (the CPU kernel expands ``||q - k||^2`` into one GEMM and two
  norms; the direct sum of squares is within the same bound); the float64
  reference rounds its own score too, hence the ``g64`` term.  The scale,
  rounded to the dtype, and the product add ``2u|x_ij|``.
* shift ``x_ij - m_i``: ``u |x_ij - m_i|``; the exponential: ``exp_ulps``
  ulps (the CPU polynomial: 2, measured in tests/test_cpu_kernels.py; CUDA's
  ``exp``/``expf``: 2) ``= 2 exp_ulps u``; rescalings between key blocks:
  ``rescales u`` (``ceil(M/32)`` on CUDA, float64 and so ``< u`` in all on
  the CPU).  Every weight is then ``w_j (1 + e_j)`` with
  ``|e_j| <= E_i = max_j (score + shift) + (2 exp_ulps + rescales) u``.
* ``a = sum_j w_j v_j / sum_j w_j`` moves by ``sum_j r_j e_j (v_j - a)``, at most
  ``2 E_i max|v|``; the two sums add ``2 G max|v|`` where ``G`` is the sum
  bound: on the CPU a tile of at most ``bk`` keys in the dtype (the GEMM, and
  the row sum; ``bk`` from ``plan``: 256 for float64, 512 for float32, 2048
  for fewer than 64 queries) then float64 across tiles and splits,
  ``G = g(min(M, bk) + 3) + g64(ceil(M/bk) + 19)``; on CUDA ``G = g(M)``
  (sequential in the dtype).  The division and the output rounding add
  ``2u|a|``; the reference itself is within ``(3 u64 + g64(M)) max|v|``.

      |a - a_ref| <= max|v| (2 E_i + 2 G + 4u + 3 u64 + g64(M)) + 3u |a_ref|
      |L - L_ref| <= E_i + 2 G + 3u |L_ref| + 2u + 4 u64 |L_ref|

Backward (G4): ``r_ij = exp(x_ij - L_i)`` rebuilt from the saved ``L``
has relative error ``F_i = E_i + bound(L_i) + u |x_ij - L_i|``;
``b_ij = <u_i, v_j>`` and ``Delta_i = <u_i, a_i>`` are ``Dv``-term dot
products; ``dS_ij = r_ij (b_ij - Delta_i)``::

    |ddS_ij| <= r_ij (F_i |b_ij - Delta_i| + g(Dv) sum_c |u_ic v_jc| + sum_c |u_ic| (da_ic + g(Dv) |a_ic|)) + u |dS_ij|

and the sums over keys (``dq``) or queries (``dk``, ``dv``) add their own
``G |.|`` terms (CPU: a tile of ``bq`` queries or ``bk`` keys in the dtype,
then float64).  The bounds are evaluated with the reference's ``r`` and ``dS``
(first order in ``u``), doubled for float64 where the reference's own
rounding is of the same size.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

import iem_ref
from iem_ref.attention import attention_responsibilities
from tests.conftest import CUDA_SIMULATED, U32, U64
from tests.tolerances import assert_within


# --- the paths ------------------------------------------------------------------------
class Path:
    """An accelerated module and what its arithmetic is (for the bounds)."""

    def __init__(self, name, mod):
        self.name = name
        self.mod = mod
        self.small = name == "cuda" and CUDA_SIMULATED  # the simulator: tens of queries and keys at most

    def sum_bound(self, n, u, n_queries, backward=False):
        """``G``: relative error bound of an ``n``-term sum over keys (see the module docstring).

        CPU: key tiles of ``bk`` keys (``plan``, forward or backward tiles) in the dtype,
        then float64 across tiles, splits and merges.
        """
        if self.name == "cpu":
            bk = self.mod.plan(1, n_queries, n, np.float32 if u == U32 else np.float64, backward=backward)[1]
            return g(min(n, bk) + 3, u) + g(math.ceil(n / bk) + 19, U64)
        return g(n, u)

    def query_sum_bound(self, n, u):
        """The same for an ``n``-term sum over queries (CPU: query blocks of ``bq`` rows in the dtype, then float64)."""
        if self.name == "cpu":
            bq = self.mod.plan(1, n, 1, np.float32 if u == U32 else np.float64, backward=True)[0]
            return g(bq + 3, u) + g(math.ceil(n / bq) + 3, U64)
        return g(n, u)

    def rescales(self, m):
        return 0 if self.name == "cpu" else math.ceil(m / 32)

    exp_ulps = 2


@pytest.fixture(params=["cpu", "cuda"])
def path(request):
    mod = importlib.import_module(f"iem_ref.accel.{request.param}")
    return Path(request.param, mod)


def g(n, u):
    return n * u / (1 - n * u)


def unit(dtype):
    return U32 if np.dtype(dtype) == np.float32 else U64


# --- bounds -----------------------------------------------------------------------------
def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def score_sizes(q, k, energy):
    """``S_ij`` of the module docstring, (B..., N, M), float64."""
    q = _finite(np.asarray(q, np.float64))
    k = _finite(np.asarray(k, np.float64))
    S = np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)
    if energy == "sqeuclidean":
        S = S + 0.5 * ((q**2).sum(-1)[..., :, None] + (k**2).sum(-1)[..., None, :])
    return S


def forward_bounds(path, dtype, x, m_row, S, scale, D, max_v, a_ref, L_ref, M):
    """``(bound_a (B..., N, 1), bound_L (B..., N))`` for scores ``x`` (B..., N, M) (finite part)."""
    u = unit(dtype)
    with np.errstate(invalid="ignore"):
        shift = np.abs(x - m_row[..., None])
    shift = _finite(shift)
    per = scale * (g(D + 3, u) + g(D + 3, U64)) * S + 2 * u * _finite(np.abs(x)) + u * shift
    E = (per.max(axis=-1) if M else np.zeros(per.shape[:-1])) + (2 * path.exp_ulps + path.rescales(M)) * u
    G = path.sum_bound(max(M, 1), u, x.shape[-2])
    a_abs = _finite(np.abs(np.asarray(a_ref, np.float64)))
    bound_a = max_v[..., None, None] * (2 * E + 2 * G + 4 * u + 3 * U64 + g(max(M, 1), U64))[..., None] + 3 * u * a_abs
    L_abs = _finite(np.abs(np.asarray(L_ref, np.float64)))
    bound_L = E + 2 * G + 3 * u * L_abs + 2 * u + 4 * U64 * L_abs
    return bound_a, bound_L, E


def attention_bounds(path, q, k, v, dtype, *, scale=None, energy="dot", mask=None, is_causal=False, causal_alignment="top_left"):
    """Reference output, log-partition and their bounds for ``attention`` with finite inputs (masked entries may be anything)."""
    a_ref, L_ref = iem_ref.attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, return_lse=True)
    D = np.shape(q)[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    d = iem_ref.ENERGIES[energy](q64, k64)
    x = -d * sc
    S = score_sizes(q64, k64, energy)
    M = np.shape(k)[-2]
    with np.errstate(invalid="ignore"):
        m_row = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, initial=-np.inf) if M else np.zeros(x.shape[:-1])
    m_row = np.where(np.isfinite(m_row), m_row, 0.0)
    max_v = np.max(np.abs(_finite(np.asarray(v, np.float64))), axis=(-1, -2), initial=0.0)
    max_v = np.broadcast_to(max_v, np.broadcast_shapes(max_v.shape, np.shape(a_ref)[:-2]))
    bound_a, bound_L, E = forward_bounds(path, dtype, x, m_row, S, sc, D, max_v, a_ref, L_ref, M)
    return a_ref, L_ref, bound_a, bound_L, E


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


# --- forward --------------------------------------------------------------------------
@pytest.mark.equation("A1", "A3", "A4", "T1", "M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_random(path, rng, dtype, energy):
    for shape in shapes_for(path):
        q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
        a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True)
        a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype, energy=energy)
        assert a.dtype == dtype and L.dtype == dtype and a.shape == a_ref.shape and L.shape == L_ref.shape
        assert_within(a, a_ref, ba, f"{path.name} a {shape}")
        assert_within(L, L_ref, bL, f"{path.name} L {shape}")


@pytest.mark.equation("M1", "M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_decoding_split(path, rng, dtype):
    """Few queries, many keys: the CPU splits the keys over the cores and merges the partials (M2)."""
    if path.small:
        pytest.skip("needs a GPU: decoding shapes take minutes under the CUDA simulator (about 50 us per query-key pair)")
    for shape in SHAPES_DECODE:
        q, k, v = make_inputs(rng, shape, dtype)
        a, L = path.mod.attention(q, k, v, return_lse=True)
        a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype)
        assert_within(a, a_ref, ba, f"{path.name} a {shape}")
        assert_within(L, L_ref, bL, f"{path.name} L {shape}")


@pytest.mark.equation("A3", "T1")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 4.0])
def test_attention_scales(path, rng, dtype, scale):
    """``scale = 0`` is the uniform limit; large scales make the softmin nearly hard (large shifts ``|x - m|``)."""
    shape = SHAPES_SMALL[1] if path.small else SHAPES_FULL[1]
    q, k, v = make_inputs(rng, shape, dtype)
    a, L = path.mod.attention(q, k, v, scale=scale, return_lse=True)
    a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype, scale=scale)
    assert_within(a, a_ref, ba, f"{path.name} a scale={scale}")
    assert_within(L, L_ref, bL, f"{path.name} L scale={scale}")
    if scale == 0.0:  # uniform: the mean of the values, L = log M
        assert_within(L, np.full(L.shape, math.log(k.shape[-2])), bL, "L = log M at scale 0")


@pytest.mark.equation("A3", "A4")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_masks_and_causal(path, rng, dtype, energy):
    """Boolean masks (full and broadcast), causal with both alignments, and both together."""
    shape = ((2,), (2,), (2,), 5, 7, 3, 2) if path.small else ((2,), (2,), (2,), 40, 300, 8, 5)
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
    a_ref, L_ref, ba, bL, _ = attention_bounds(path, qq, k, v, dtype, energy=energy, is_causal=True, causal_alignment="bottom_right")
    assert_within(a, a_ref, ba, f"{path.name} bottom_right N > M: a")
    assert_within(L, L_ref, bL, f"{path.name} bottom_right N > M: L")
    assert np.isneginf(L[:, :3]).all() and (a[:, :3] == 0).all()
    for kw in cases:
        a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True, **kw)
        a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype, energy=energy, **kw)
        assert_within(a, a_ref, ba, f"{path.name} a {sorted(kw)}")
        assert_within(L, L_ref, bL, f"{path.name} L {sorted(kw)}")
    a, L = path.mod.attention(q, k, v, mask=full, energy=energy, return_lse=True)
    assert (a[0, 1] == 0).all() and np.isneginf(L[0, 1])
    a_nan = path.mod.attention(q, k, v, mask=full, energy=energy, empty="nan")
    assert np.isnan(a_nan[0, 1]).all() and not np.isnan(np.delete(a_nan.reshape(-1, a_nan.shape[-1]), 1, axis=0)).any()


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
        a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype, mask=mask, energy=energy)
        assert np.isfinite(a).all() and np.isfinite(L).all()
        assert_within(a, a_ref, ba, f"{energy}: masked NaN/inf keys and values")
        assert_within(L, L_ref, bL, f"{energy}: masked NaN/inf keys and values, L")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_nan_in_participating_inputs_spoils_only_its_rows(path, rng, dtype):
    q, k, v = make_inputs(rng, ((), (), (), 5, 6, 3, 2), dtype)
    q[1, 2] = np.nan  # query 1's row
    v[3, 0] = np.nan  # every row that sees key 3: with causal, rows 3 and 4
    for kw in [dict(), dict(is_causal=True)]:
        a, L = path.mod.attention(q, k, v, return_lse=True, **kw)
        a_ref, L_ref, ba, bL, _ = attention_bounds(path, q, k, v, dtype, **kw)
        assert_within(a, a_ref, ba, f"NaN propagation {kw}")
        assert_within(L, L_ref, bL, f"NaN propagation {kw}, L")
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
            m_row = np.max(np.where(mask if mask is not None else True, x, -np.inf), axis=-1)
            m_row = np.where(np.isfinite(m_row), m_row, 0.0)
            max_v = np.broadcast_to(np.abs(v.astype(np.float64)).max(axis=(-1, -2)), a_ref.shape[:-2])
            # the score is -d * (1/tau): no dot product (S = 0), the scale's and the product's roundings are the 2u|x| term
            ba, bL, _ = forward_bounds(path, dtype, x, m_row, np.zeros_like(x), 1 / tau, 0, max_v, a_ref, L_ref, M)
            assert_within(a, a_ref, ba, f"{path.name} softmin_summary a {(bd, bv, N, M)}")
            assert_within(L, L_ref, bL, f"{path.name} softmin_summary L {(bd, bv, N, M)}")


# --- backward (G4) --------------------------------------------------------------------------
def vjp_bounds(path, q, k, v, gout, dtype, energy, a_bound, L_bound, E, **kw):
    """Bounds for ``(dq, dk, dv)`` from the module docstring, evaluated with the reference's ``r`` and ``dS``."""
    u = unit(dtype)
    sc = 1.0 / math.sqrt(np.shape(q)[-1]) if kw.get("scale") is None else float(kw["scale"])
    kw = {key: val for key, val in kw.items() if key != "scale"}
    r = attention_responsibilities(q, k, scale=sc, energy=energy, **kw).astype(np.float64)
    q64, k64, v64, u64 = (np.asarray(x, np.float64) for x in (q, k, v, gout))
    b = u64 @ np.swapaxes(v64, -1, -2)
    a_ref = iem_ref.attention(q64, k64, v64, scale=sc, energy=energy, **kw)
    delta = (u64 * a_ref).sum(-1)
    dS = r * (b - delta[..., None])
    d = iem_ref.ENERGIES[energy](q64, k64)
    x = -d * sc
    N, M, Dv = np.shape(q)[-2], np.shape(k)[-2], np.shape(v)[-1]
    L_ref = iem_ref.attention(q64, k64, v64, scale=sc, energy=energy, return_lse=True, **kw)[1]
    with np.errstate(invalid="ignore"):
        shift = _finite(np.abs(x - L_ref[..., None]))
    F = E + _finite(L_bound) + u * shift.max(axis=-1, initial=0.0) + 2 * u  # (B..., N); 2u: b - Delta and the product
    absu = np.abs(u64)
    db = g(Dv, u) * (absu @ np.swapaxes(np.abs(v64), -1, -2))
    ddelta = (absu * (a_bound + g(Dv, u) * np.abs(a_ref))).sum(-1)
    ddS = r * (F[..., None] * np.abs(b - delta[..., None]) + db + ddelta[..., None]) + u * np.abs(dS)
    ref2 = 1 + U64 / u  # the reference's own rounding, of the same size in float64
    Gk, Gq = path.sum_bound(M, u, N, backward=True), path.query_sum_bound(N, u)
    absk, absq = np.abs(k64), np.abs(q64)
    dq_ref, dk_ref, dv_ref = iem_ref.attention_vjp(q64, k64, v64, u64, scale=sc, energy=energy, **kw)
    bq = ref2 * sc * ((ddS + Gk * np.abs(dS)) @ absk) + 2 * u * np.abs(dq_ref)
    rT_ddS = np.swapaxes(ddS + Gq * np.abs(dS), -1, -2)
    bk = ref2 * sc * (rT_ddS @ absq) + 2 * u * np.abs(dk_ref)
    if energy == "sqeuclidean":
        bk = bk + ref2 * sc * absk * rT_ddS.sum(-1)[..., None]
    rT = np.swapaxes(r, -1, -2)
    bv = ref2 * ((F[..., None, :] * rT + Gq * rT) @ absu) + 2 * u * np.abs(dv_ref)
    return (dq_ref, dk_ref, dv_ref), (bq, bk, bv)


@pytest.mark.equation("G4", "G1")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_attention_vjp(path, rng, dtype, energy):
    shapes = [((2,), (2,), (2,), 5, 7, 3, 2)] if path.small else [((), (), (), 1, 1, 1, 1), ((), (), (), 31, 33, 16, 5), ((2,), (2,), (2,), 129, 300, 8, 6), ((), (), (), 3, 600, 4, 2)]
    for shape in shapes:
        q, k, v = make_inputs(rng, shape, dtype, spread=0.5 if energy == "sqeuclidean" else 1.0)
        gout = rand(rng, np.broadcast_shapes(shape[0], shape[1], shape[2]) + (shape[3], shape[6]), dtype)
        N, M = shape[3], shape[4]
        mask = rng.random((N, M)) < 0.8
        cases = [dict(), dict(mask=mask), dict(is_causal=True), dict(scale=0.7, is_causal=True, causal_alignment="bottom_right")]
        for n_case, kw in enumerate(cases[1::2] if path.small else cases):  # the simulator: ~10 s per call here
            a, L = path.mod.attention(q, k, v, energy=energy, return_lse=True, **kw)
            a_ref, L_ref, ba, bL, E = attention_bounds(path, q, k, v, dtype, energy=energy, **kw)
            refs, bounds = vjp_bounds(path, q, k, v, gout, dtype, energy, ba, bL, E, **kw)
            for saved in [dict(out=a, lse=L), dict()][: 1 if path.small and n_case else 2]:
                grads = path.mod.attention_vjp(q, k, v, gout, energy=energy, **saved, **kw)
                for name, got, ref, bound in zip(("dq", "dk", "dv"), grads, refs, bounds):
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
    a_ref, L_ref, ba, bL, E = attention_bounds(path, q, kc, vc, dtype, mask=mask)
    _, bounds = vjp_bounds(path, q, kc, vc, gout, dtype, "dot", ba, bL, E, mask=mask)
    for name, x, y, bd in zip(("dq", "dk", "dv"), got, ref, bounds):
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
    ("float16 v", lambda x: dict(v=x["v"].astype(np.float16))),
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
