"""Assertion helpers for other people's test suites, in the spirit of ``numpy.testing``.

Compare the array your kernel (PyTorch, JAX, Triton, CUDA, NumPy) produced
with the oracle's answer for the same inputs::

    from iem_ref.testing import assert_softmax_close, assert_attention_close

    def test_my_softmax():
        x = np.random.default_rng(0).normal(0, 30, (4, 1000)).astype(np.float32)
        assert_softmax_close(my_softmax(x), x)          # default tolerances from float32, M = 1000

    def test_my_attention():
        assert_attention_close(my_attention(q, k, v), q, k, v, is_causal=True)

Arrays may be NumPy, PyTorch (any device; detached and copied to the host)
or JAX arrays.  The oracle is the float64 reference (:mod:`iem_ref`, a few ulps of float64
from the truth), or the exact tier (``exact=True``, :mod:`iem_ref.exact`,
correctly rounded; small inputs only); :func:`assert_attention_close`
judges a low-precision kernel with the tiled float64 oracle
(:mod:`iem_ref.accel.verdict`, ``oracle=``), in memory that does not grow
with ``N x M``.  The helpers follow the README's
edge-case policy: NaN must appear exactly where the oracle has NaN, an
infinity exactly where the oracle has the same infinity.

Default tolerances: an error argument, not a guess
--------------------------------------------------
``u`` is the unit roundoff of the dtype of ``actual`` (``2**-24`` for
float32, ``2**-53`` for float64), ``M`` the reduction length (hypotheses per
row) and ``lg = ceil(log2 M)``, the roundings of one term in a tree sum
(both from :mod:`iem_ref.bounds`, which derives the terms once).  The model
is the standard algorithm a kernel implements, each step rounded once in
``u``: shift by the row maximum and divide by ``tau`` (exponents
``t_j = (d_j - min d)/tau``, relative error ``<= 2u``), ``exp`` accurate to
one ulp (``2u``), a tree (pairwise) sum of ``M`` terms (``lg u``), one
division (``u``).  To first order this gives, componentwise,

* responsibilities / softmax:
  ``|r_j - r_j*| <= r_j* u (2 |t_j| + 2 tbar + 5 + lg)``,
  ``tbar = sum_k r_k* |t_k|`` (the ``2|t_j| + 2 tbar`` is the condition
  number of ``r_j`` with respect to the rounding of the exponents: spread
  inputs make every kernel lose digits, and the report prints it);
* log-partition (absolute):
  ``|L - L*| <= u (|m/tau| + 2 |log S| + |L*| + 2 tbar + 2 + lg)``,
  ``m = min d``, ``S = sum_j exp(-t_j)``.  An absolute bound: a plain
  ``max + log(sum)`` kernel that returns 0 for ``[0, -40]`` (true 4.2e-18)
  is within it; ask for more with ``rtol``;
* attention (``assert_attention_close``, ``assert_attention_vjp_close``):
  derived from the kernel's precision model, an
  :class:`iem_ref.precision.Precision` (inferred from the arrays: a bfloat16
  kernel scores and accumulates in float32 and rounds ``P`` and its output
  to bfloat16), by :mod:`iem_ref.bounds` sections 13 (forward) and 14
  (backward): each key's weight error (the score's dot product, the scale,
  the exponent, the variants' steps), the probabilities' rounding, the
  sums, the output's rounding; ``bound="probabilistic"`` (default) adds the
  independent roundings of different keys as a root-sum-square (Hoeffding,
  ``lambda = 6.8``: a correct kernel fails an element with probability
  below ``1e-9``), ``bound="rigorous"`` at their worst.

Second-order terms are covered by a factor ``1 + 2**-10``; every bound gets
``+ 8 u64`` relative for the float64 oracle's own error (at most 3 ulps) and
an absolute floor of ``M * tiny`` (``tiny`` the dtype's smallest normal, times
``max(1, max|v|)`` for attention) for kernels that flush subnormals to zero.
An ``exp`` worse than one ulp (``__expf``, fast-math) or a sequential sum
(``lg`` becomes ``M``) needs explicit ``rtol``/``atol``: when given, the
check is numpy's ``|actual - expected| <= atol + rtol |expected|``.

On failure the ``AssertionError`` names the worst element (largest error
relative to its tolerance), its index, the actual and expected values, the
absolute, relative and ulp errors, the tolerance, how many elements fail,
and for that element's row the entropy of the responsibilities and the
condition number (``kappa`` of the log-partition, ``2|t_j| + 2 tbar`` for
``r``).

Examples
--------
>>> import numpy as np
>>> from iem_ref.testing import assert_softmax_close
>>> x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
>>> e = np.exp(x - x.max(axis=-1, keepdims=True))
>>> assert_softmax_close(e / e.sum(axis=-1, keepdims=True), x)   # passes silently
"""

from __future__ import annotations

import decimal
import math
from decimal import Decimal

import numpy as np

from . import exact as _exact
from ._validation import as_float_array, as_mask, check_axis, check_choice
from .attention import _NO_VARIANTS, Competition, attention, prepare_attention
from .bounds import LAMBDA, U64, forward_terms, kernel_forward_bounds, tree_depth, unit_roundoff
from .precision import LOW_PRECISION, Precision, infer_precision, low_precision_dtype
from .competition import log_partition, responsibilities

__all__ = [
    "ulp_error",
    "assert_close_to_reference",
    "assert_responsibilities_close",
    "assert_softmin_close",
    "assert_softmax_close",
    "assert_log_partition_close",
    "assert_attention_close",
    "assert_attention_vjp_close",
    "TILED_PAIRS",
]

# Decimal arithmetic on exact results such as 1e-203619766 needs the full exponent range.
_WIDE = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])
_SECOND_ORDER = 1.0 + 2.0**-10


def _host(x):
    """A NumPy view of a NumPy, PyTorch (any device, with or without grad) or JAX array.

    torch's bfloat16 and float8 tensors (which NumPy cannot take) arrive as
    the ``ml_dtypes`` arrays of the same values: upcast exactly to float32 on
    the torch side, rounded back exactly.
    """
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach()
        if hasattr(x, "cpu"):
            x = x.cpu()
        name = str(x.dtype).replace("torch.", "")
        if name in LOW_PRECISION and name != "float16":  # exact in float32, and exactly representable back
            return x.float().numpy().astype(low_precision_dtype(name))
    return np.asarray(x)


def ulp_error(actual, expected, dtype=None):
    """Elementwise error of ``actual`` in ulps of ``dtype`` at the expected value.

    ``expected`` may hold floats or Decimals (the exact tier); with Decimals
    the difference is formed exactly.  The ulp is the spacing of ``dtype``
    (default: ``actual``'s float dtype) at ``expected`` rounded to ``dtype``;
    at 0 it is the smallest subnormal.  Matching NaNs and matching
    infinities count as 0 ulps, any other non-finite pair as ``inf``.

    Examples
    --------
    >>> float(ulp_error(np.float32(1.0) + np.float32(2**-23), 1.0))
    1.0
    """
    a = np.asarray(actual)
    if dtype is None:
        dtype = a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)
    dtype = np.dtype(dtype)
    e_obj = np.asarray(expected)
    a, e_obj = np.broadcast_arrays(a, e_obj)
    out = np.empty(a.size, dtype=np.float64)
    flat_a = a.reshape(-1)
    flat_e = e_obj.reshape(-1)
    for i, (x, y) in enumerate(zip(flat_a.tolist(), flat_e.tolist())):
        x = float(x)
        yd = y if isinstance(y, Decimal) else Decimal(float(y))
        if math.isnan(x) or yd.is_nan() or math.isinf(x) or yd.is_infinite():
            same = (math.isnan(x) and yd.is_nan()) or (math.isinf(x) and yd.is_infinite() and (x > 0) == (yd > 0))
            out[i] = 0.0 if same else np.inf
            continue
        yr = _exact.to_float([yd], dtype)[0]
        with np.errstate(over="ignore"):
            sp = float(np.spacing(abs(yr))) if np.isfinite(yr) else float(np.spacing(np.finfo(dtype).max))
        out[i] = float(_WIDE.divide(_WIDE.subtract(Decimal(x), yd).copy_abs(), Decimal(sp)))
    out = out.reshape(a.shape)
    return out[()] if out.ndim == 0 else out


def _nonfinite_mismatch(a, e):
    """Indices where the non-finite pattern differs (NaN vs NaN, inf vs same inf)."""
    a_nan, e_nan = np.isnan(a), np.isnan(e)
    bad = a_nan != e_nan
    inf_e = np.isinf(e)
    bad |= inf_e & ~(a == e)
    bad |= np.isinf(a) & ~inf_e & ~e_nan
    return bad


def _fmt_index(idx):
    return "(" + ", ".join(str(int(i)) for i in idx) + ")" if len(idx) != 1 else f"({int(idx[0])},)"


class _Mismatches:
    """The comparison of ``actual`` with ``expected`` under a tolerance, fed part by part (:meth:`add`), reported once (:meth:`report`).

    A part is a block of the whole array (the tiled oracle's few heads at a
    time); ``offset`` is its first index along the whole array's first axis.
    Kept: the mismatch counts, the first non-finite mismatch and the worst
    finite element (largest error relative to its tolerance).
    """

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.bad = self.nan = self.inf = self.nonfinite = 0
        self.first = None  # (index, actual, expected)
        self.worst = None  # (ratio, index, actual, expected, tolerance)
        self.largest = 0.0

    def add(self, actual, expected, tol, offset=0):
        a = np.asarray(actual, dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
        tol = np.broadcast_to(tol, e.shape)
        nonfinite_bad = _nonfinite_mismatch(a, e)
        finite = np.isfinite(a) & np.isfinite(e)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(finite, np.abs(a - e), 0.0)
            ratio = np.where(finite, diff / np.maximum(tol, np.finfo(np.float64).tiny), 0.0)
        over = finite & (diff > tol)
        self.largest = max(self.largest, float(ratio.max(initial=0.0)))
        self.bad += int((over | nonfinite_bad).sum())
        shift = lambda idx: (int(idx[0]) + offset,) + tuple(int(i) for i in idx[1:]) if len(idx) else idx  # noqa: E731
        if nonfinite_bad.any():
            self.nonfinite += int(nonfinite_bad.sum())
            self.nan += int((np.isnan(a) & ~np.isnan(e)).sum())
            self.inf += int((np.isinf(a) & ~np.isinf(e) & ~np.isnan(e)).sum())
            if self.first is None:
                first = tuple(np.argwhere(nonfinite_bad)[0])
                self.first = (shift(first), float(a[first]), float(e[first]))
        if over.any():
            worst = np.unravel_index(np.argmax(np.where(over, ratio, -1.0)), a.shape)
            if self.worst is None or ratio[worst] > self.worst[0]:
                self.worst = (float(ratio[worst]), shift(worst), float(a[worst]), float(e[worst]), float(tol[worst]))

    def report(self, what, row_info, header, err_msg):
        """Raise the ``AssertionError`` describing the failures, or return the largest error / tolerance."""
        if not self.bad:
            return self.largest
        size = int(np.prod(self.shape, dtype=np.int64))
        lines = [f"{what}: arrays are not close ({header})",
                 f"  mismatched elements: {self.bad} / {size} ({100.0 * self.bad / max(size, 1):.3g}%)"]
        if self.nonfinite:
            kinds = []
            if self.nan:
                kinds.append(f"{self.nan} NaN where the oracle is not NaN (overflow or 0/0 in the kernel?)")
            if self.inf:
                kinds.append(f"{self.inf} inf where the oracle is finite (overflow?)")
            rest = self.nonfinite - self.nan - self.inf
            if rest:
                kinds.append(f"{rest} finite/NaN where the oracle has NaN or inf (the edge-case policy: README)")
            lines.append("  non-finite mismatch: " + "; ".join(kinds))
            first, af, ef = self.first
            lines.append(f"    first at index {_fmt_index(first)}: actual {af!r}, expected {ef!r}")
            if row_info is not None:
                lines.append("    " + row_info(first))
        if self.worst is not None:
            r, worst, ae, ee, t = self.worst
            rel = abs(ae - ee) / abs(ee) if ee != 0 else np.inf
            ulp = float(ulp_error(np.asarray(ae).astype(self.dtype), ee, self.dtype))
            lines.append(f"  worst element (error / tolerance = {r:.3g}) at index {_fmt_index(worst)}:")
            lines.append(f"    actual   {ae!r}")
            lines.append(f"    expected {ee!r}")
            lines.append(f"    abs err {abs(ae - ee):.3e}, rel err {rel:.3e}, {ulp:.4g} ulp ({self.dtype}); tolerance {t:.3e} (abs)")
            if row_info is not None:
                lines.append("    " + row_info(worst))
        if err_msg:
            lines.append("  " + err_msg)
        raise AssertionError("\n".join(lines))


def _float_dtype(actual):
    dt = np.asarray(actual).dtype
    return dt if dt.kind == "f" else np.dtype(np.float64)


def _report_and_raise(what, actual, expected, tol, row_info, header, err_msg):
    """Raise an AssertionError describing the failures (or return the largest error / tolerance)."""
    m = _Mismatches(np.shape(expected), _float_dtype(actual))
    m.add(actual, expected, np.asarray(tol, np.float64))
    return m.report(what, row_info, header, err_msg)


def _check_shape(actual, expected_shape, what):
    a = _host(actual)
    if a.shape != tuple(expected_shape):
        raise AssertionError(f"{what}: shape mismatch: actual {a.shape}, expected {tuple(expected_shape)}")
    if a.dtype.kind != "f" and a.dtype.name not in LOW_PRECISION:
        raise AssertionError(f"{what}: actual must be a float array; got dtype {a.dtype}")
    return a


def _explicit_tol(e, rtol, atol):
    rtol = 0.0 if rtol is None else float(rtol)
    atol = 0.0 if atol is None else float(atol)
    with np.errstate(invalid="ignore"):
        return atol + rtol * np.abs(np.where(np.isfinite(e), e, 0.0))


def assert_close_to_reference(actual, expected, *, dtype=None, reduction_length=1, rtol=None, atol=None, err_msg=""):
    """General check of ``actual`` against an oracle value ``expected`` (floats or Decimals).

    Default tolerance (``rtol``, ``atol`` None): ``|actual - expected| <=
    u (4 + ceil(log2 n)) |expected| + 8 u64 |expected| + n tiny``, ``u`` the
    unit roundoff of ``dtype`` (default ``actual``'s), ``n =
    reduction_length``: a result rounded once, from a well-conditioned
    reduction of ``n`` terms summed as a tree, each term a few correctly
    rounded operations.  Ill-conditioned quantities need the specific helpers
    (which add the condition number) or explicit tolerances.  NaN and inf
    must match exactly.

    Examples
    --------
    >>> assert_close_to_reference(np.float32(0.1), 0.1)
    """
    e_in = _host(expected)
    e = _exact.to_float(e_in) if e_in.dtype == object else np.asarray(e_in, dtype=np.float64)
    a = _check_shape(actual, e.shape, "assert_close_to_reference")
    dt = np.dtype(dtype) if dtype is not None else a.dtype
    u = unit_roundoff(dt)
    n = max(int(reduction_length), 1)
    if rtol is None and atol is None:
        mag = np.abs(np.where(np.isfinite(e), e, 0.0))
        tol = (u * (4 + tree_depth(n)) + 8 * U64) * _SECOND_ORDER * mag + n * float(np.finfo(dt).tiny)
    else:
        tol = _explicit_tol(e, rtol, atol)
    header = f"{dt}, u = {u:.3g}, reduction length {n}"
    _report_and_raise("assert_close_to_reference", a, e, tol, None, header, err_msg)


# ----------------------------------------------------------------------------
# softmin / softmax / log-partition
# ----------------------------------------------------------------------------


def _row_stats(d64, tau, take, r):
    """Per-row exponents t_j = (d_j - min d)/tau and tbar = sum r_j |t_j| (hypotheses last)."""
    with np.errstate(all="ignore"):
        part = ~np.isposinf(d64) if take is None else take & ~np.isposinf(d64)
        dm = np.where(part & np.isfinite(d64), d64, np.inf)
        m = dm.min(axis=-1, keepdims=True, initial=np.inf)
        m = np.where(np.isfinite(m), m, 0.0)
        t = np.where(part & np.isfinite(d64), (d64 - m) / tau if np.isfinite(tau) else 0.0, 0.0)
        rr = np.where(np.isfinite(r), r, 0.0)
        tbar = (rr * np.abs(t)).sum(axis=-1, keepdims=True)
        H = -(np.where(rr > 0, rr * np.log(np.where(rr > 0, rr, 1.0)), 0.0)).sum(axis=-1)
    return t, tbar, m[..., 0], H


def _softmin_expected(d, tau, axis, mask, empty, exact):
    d = as_float_array(d, "d")
    axis = check_axis(axis, d.ndim)
    if exact:
        r = _exact.to_float(_exact.responsibilities(d, tau, axis, mask, empty=empty))
    else:
        r = np.asarray(responsibilities(d.astype(np.float64), tau, axis, mask, empty=empty), dtype=np.float64)
    return d, axis, r


def assert_responsibilities_close(actual, d, tau=1.0, axis=-1, mask=None, *, empty="zero", rtol=None, atol=None, exact=False, err_msg=""):
    """Check a softmin (A3 / T2) of energies ``d`` computed by your kernel.

    ``actual`` must have ``d``'s shape; the arguments after it are those of
    :func:`iem_ref.responsibilities`.  Default tolerance: module docstring
    (``r_j u (2|t_j| + 2 tbar + 5 + lg)`` plus the floors).  ``exact=True``
    takes the expected values from the exact tier.

    Examples
    --------
    >>> assert_responsibilities_close(np.array([0.75, 0.25]), [0.0, np.log(3.0)])
    """
    d, axis, r = _softmin_expected(_host(d), tau, axis, mask, empty, exact)
    a = _check_shape(actual, d.shape, "assert_responsibilities_close")
    take = as_mask(mask, d.shape, "mask")
    d_l = np.moveaxis(d.astype(np.float64), axis, -1)
    take_l = None if take is None else np.moveaxis(take, axis, -1)
    r_l = np.moveaxis(r, axis, -1)
    t, tbar, _, H = _row_stats(d_l, float(tau), take_l, r_l)
    M = d.shape[axis]
    u = unit_roundoff(a.dtype)
    tiny = float(np.finfo(a.dtype).tiny)
    cond = 2 * np.abs(t) + 2 * tbar
    if rtol is None and atol is None:
        rel = (u * (cond + 5 + tree_depth(M)) + 8 * U64) * _SECOND_ORDER
        tol_l = rel * np.abs(np.where(np.isfinite(r_l), r_l, 0.0)) + M * tiny
        tol = np.moveaxis(tol_l, -1, axis)
    else:
        tol = _explicit_tol(r, rtol, atol)
    cond_full = np.moveaxis(cond, -1, axis)

    def row_info(idx):
        row = tuple(i for k, i in enumerate(idx) if k != axis)
        return (
            f"row {_fmt_index(row) if row else '()'}: entropy of r = {H[row]:.4g} nats (max log M = {math.log(max(M, 1)):.4g}); "
            f"exponent spread max t = {np.max(t[row]) if M else 0:.4g}; condition 2|t_j| + 2 tbar = {cond_full[idx]:.4g}"
        )

    header = f"{a.dtype}, u = {u:.3g}, M = {M} hypotheses per row, {'exact tier' if exact else 'float64 reference'}"
    _report_and_raise("responsibilities", a, r, tol, row_info, header, err_msg)


#: The same check, under the name softmin.
assert_softmin_close = assert_responsibilities_close


def assert_softmax_close(actual, x, axis=-1, *, mask=None, rtol=None, atol=None, exact=False, err_msg=""):
    """Check ``softmax(x)`` (scores, higher is better) computed by your kernel: A3 with ``d = -x``.

    Examples
    --------
    >>> x = np.array([0.0, 1.0])
    >>> assert_softmax_close(np.exp(x) / np.exp(x).sum(), x)
    """
    x = as_float_array(_host(x), "x")
    return assert_responsibilities_close(actual, -x, 1.0, axis, mask, rtol=rtol, atol=atol, exact=exact, err_msg=err_msg)


def assert_log_partition_close(actual, d, tau=1.0, axis=-1, mask=None, *, base=None, rtol=None, atol=None, exact=False, err_msg=""):
    """Check a log-partition ``L = log sum_j exp(-d_j/tau)`` (G1; a logsumexp of ``-d/tau``).

    Default absolute tolerance ``u (|m/tau| + 2|log S| + |L| + 2 tbar + 2 + lg)``
    (module docstring).  The report gives the row's ``kappa = sum_j r_j
    |d_j/tau| / |L|``, the relative condition number.  ``base=2``: the
    kernel returns ``log2`` of the partition sum (FlashAttention's kernels
    work in base 2): compared with ``L / log 2``, tolerance divided alike
    (plus the conversion's rounding).

    Examples
    --------
    >>> assert_log_partition_close(np.log(2.0), [0.0, 0.0])
    >>> assert_log_partition_close(1.0, [0.0, 0.0], base=2)
    """
    d = as_float_array(_host(d), "d")
    axis = check_axis(axis, d.ndim)
    if exact:
        L = _exact.to_float(_exact.log_partition(d, tau, axis, mask))
    else:
        L = np.asarray(log_partition(d.astype(np.float64), tau, axis, mask), dtype=np.float64)
    L = np.asarray(L, dtype=np.float64)
    a = _check_shape(actual, L.shape, "assert_log_partition_close")
    take = as_mask(mask, d.shape, "mask")
    d_l = np.moveaxis(d.astype(np.float64), axis, -1)
    take_l = None if take is None else np.moveaxis(take, axis, -1)
    r_l = np.asarray(responsibilities(d_l, tau, -1, take_l), dtype=np.float64)
    t, tbar, m, H = _row_stats(d_l, float(tau), take_l, r_l)
    M = d.shape[axis]
    u = unit_roundoff(a.dtype)
    with np.errstate(all="ignore"):
        logS = np.where(np.isfinite(L), L + m / tau, 0.0)
        mt = np.abs(np.where(np.isfinite(m), m, 0.0) / tau)
        kappa = (np.where(np.isfinite(r_l), r_l, 0.0) * np.abs(np.where(np.isfinite(d_l), d_l, 0.0) / tau)).sum(axis=-1) / np.abs(L)
    Lf = np.where(np.isfinite(L), L, 0.0)
    if rtol is None and atol is None:
        tol = (u * (mt + 2 * np.abs(logS) + np.abs(Lf) + 2 * tbar[..., 0] + 2 + tree_depth(M)) + 8 * U64 * np.abs(Lf)) * _SECOND_ORDER
    else:
        tol = _explicit_tol(L, rtol, atol)
    tol = np.asarray(tol, dtype=np.float64).reshape(L.shape)
    if base is not None:
        ln_base = math.log(float(base))
        L = L / ln_base
        tol = tol / ln_base + (u * np.abs(np.where(np.isfinite(L), L, 0.0)) if rtol is None and atol is None else 0.0)

    def row_info(idx):
        return f"row {_fmt_index(idx) if idx else '()'}: kappa = {np.asarray(kappa)[idx]:.4g}; entropy of r = {np.asarray(H)[idx]:.4g} nats"

    header = f"{a.dtype}, u = {u:.3g}, M = {M} hypotheses per row, {'exact tier' if exact else 'float64 reference'}"
    _report_and_raise("log_partition", a, L, tol, row_info, header, err_msg)


# ----------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------


_VARIANT_KEYS = tuple(_NO_VARIANTS)  # the variants' keywords, as prepare_attention knows them

#: the size (``B H N M`` query-key pairs) from which ``assert_attention_close`` judges with the tiled oracle by default:
#: there the reference's ``N x M`` float64 temporaries pass 32 MB each and a verdict about a second (2-core Zen 4)
TILED_PAIRS = 2**22


def _bshd(x):
    """FlashAttention's ``(B, N, H, D)`` layout to the library's ``(B, H, N, D)``."""
    if x.ndim < 3:
        raise ValueError(f'layout="bshd" needs arrays (..., N, H, D); got shape {x.shape}')
    return np.swapaxes(x, -2, -3)


def assert_attention_close(
    actual,
    q,
    k,
    v,
    *,
    scale=None,
    mask=None,
    is_causal=False,
    causal_alignment="top_left",
    energy="dot",
    empty="zero",
    layout="bhsd",
    precision=None,
    bound="probabilistic",
    lse=None,
    lse_base=None,
    baseline=None,
    factor=2.0,
    rtol=None,
    atol=None,
    exact=False,
    oracle=None,
    err_msg="",
    **variants,
):
    """Check an attention output ``a (B..., N, Dv)`` (A1-A4, T1, V1-V8) computed by your kernel.

    The keyword arguments are those of :func:`iem_ref.attention`, the
    variants included (``bias``, ``alibi_slopes``, ``softcap``, ``window``,
    ``sinks``, ``enable_gqa``, ``cu_seqlens_q/k``, ``dropout_p``,
    ``dropout_mask``).  ``layout="bshd"`` takes ``q, k, v`` and ``actual`` in
    FlashAttention's ``(B, N, H, D)`` layout (``bias``, ``mask`` and
    ``dropout_mask`` stay ``(B, H, N, M)``).  Arrays may be float64, float32,
    float16, bfloat16 or float8 (NumPy / ``ml_dtypes``, or torch tensors).

    Tolerance per element: derived from ``precision``, an
    :class:`iem_ref.precision.Precision` describing the kernel's arithmetic
    (default: inferred from the lowest-precision dtype among ``actual``,
    ``q``, ``k``, ``v``: a bfloat16 kernel scores and accumulates in float32,
    rounds ``P`` and its output to bfloat16), by :func:`iem_ref.bounds.kernel_forward_bounds`
    (section 13 of :mod:`iem_ref.bounds`): the weights' errors (the scores'
    dot products, the scale, the exponents, the variants' steps), the
    probabilities' rounding, the sums, the output's rounding.
    ``bound="probabilistic"`` (default) treats the roundings of different keys
    as independent (a correct kernel fails an element with probability below
    ``1e-9``); ``"rigorous"`` adds them at their worst.  To both: the oracle's
    own error (``8 u64`` relative; the tiled oracle's own bound) and a floor
    of ``max(1, max|v|)`` times ``M tiny_s + n_p sub_p / 2 + sub_o / 2``
    (``tiny_s`` the scores dtype's smallest normal, for kernels that flush
    subnormal weights; ``sub_p``, ``sub_o`` the smallest subnormals of the
    probabilities' and the output's dtypes, whose roundings are absolute
    there; ``n_p = M`` rigorously, ``min(M, LAMBDA sqrt(M))`` under the
    probabilistic bound, the roundings being independent).  ``rtol``/``atol``: numpy's rule instead.

    ``lse``: the kernel's log-partition (LSE) per query, checked too (natural
    log; ``lse_base=2`` for a kernel that returns ``log2``).
    ``baseline="emulated"``: the peers' rule instead of the derived bound,
    ``max|actual - truth| <= factor max|emulated - truth| + u_o max|truth|``,
    ``emulated`` the output of :func:`iem_ref.lowp.attention` for the same
    ``precision`` and ``truth`` the oracle's answer; ``lse`` by the same rule
    (the emulated kernel's LSE, ``u_o`` its dtype's: float32, or float64 for
    float64 scores).

    ``oracle``: where the expected values and the tolerances' sums come
    from.  ``"tiled"``: the float64 kernels of :mod:`iem_ref.accel.verdict`,
    a few heads at a time, nothing of size ``N x M`` beyond a tile per
    thread; its own error (a float64 FlashAttention forward, bounded
    rigorously there) joins the tolerance.  ``"reference"``: the NumPy
    reference (``8 u64``, memory ``O(B H N M)``).  ``None`` (default):
    ``"tiled"`` for a kernel whose scores are below float64 and the dot
    energy, from :data:`TILED_PAIRS` query-key pairs on, else
    ``"reference"`` (beside a float64 kernel's tolerance the tiled oracle's
    own error would not be small; the tiled oracle expands the squared
    Euclidean distance, whose cancellation the reference avoids; below that
    size the reference takes about a second or less, and needs no kernel
    compiled on a first call); a call with a ``score_mod`` or ``mask_mod``
    (F1, F2) gets ``"reference"`` unless ``"tiled"`` is asked for, which
    compiles the score_mod into its kernels.  ``exact=True`` and
    ``baseline="emulated"`` use the reference's pipeline.  The header of a
    failure names the oracle.

    Returns the largest ratio of an element's error to its tolerance (the
    inverse of the slack): below 1 when the check passes.

    Examples
    --------
    >>> q = np.ones((1, 2)); k = np.eye(2); v = np.array([[1.0], [3.0]])
    >>> float(assert_attention_close(np.array([[2.0]]), q, k, v))
    0.0
    >>> _ = assert_attention_close(np.array([[4.0 / 3.0]]), q, k, v, sinks=[0.0], scale=0.0)  # weights 1/3 each, sink value 0
    """
    unknown = set(variants) - set(_VARIANT_KEYS)
    if unknown:
        raise TypeError(f"assert_attention_close() got unexpected keyword argument(s) {sorted(unknown)}")
    check_choice(layout, "layout", {"bhsd", "bshd"})
    check_choice(bound, "bound", {"probabilistic", "rigorous"})
    check_choice(baseline, "baseline", {None, "emulated"})
    if oracle is not None:
        check_choice(oracle, "oracle", {"tiled", "reference"})
    if oracle == "tiled" and (exact or baseline == "emulated"):
        raise ValueError("oracle='tiled' judges by the derived bound or rtol/atol: not with exact=True or baseline='emulated'")
    q, k, v = _host(q), _host(k), _host(v)
    actual = _host(actual)
    lse_a = None if lse is None else _host(lse)
    if layout == "bshd":
        q, k, v, actual = _bshd(q), _bshd(k), _bshd(v), _bshd(actual)
        if lse_a is not None and lse_a.ndim >= 2:
            lse_a = np.swapaxes(lse_a, -1, -2)
    variants = {key: _host(x) if hasattr(x, "__array__") or hasattr(x, "detach") else x for key, x in variants.items()}
    mask = None if mask is None else _host(mask)
    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, **variants)
    inp = prepare_attention(q, k, v, **kw)
    if precision is None:
        precision = infer_precision(*(x.dtype for x in (actual, q, k, v) if x.dtype.kind == "f" or x.dtype.name in LOW_PRECISION))
    elif not isinstance(precision, Precision):
        precision = Precision.of(precision)
    if oracle is None and not exact and baseline is None:
        pairs = int(np.prod(inp.batch, dtype=np.int64)) * inp.n * inp.m
        flex = inp.score_mod is not None or inp.mask_mod is not None  # F1, F2: tiled only when asked (it compiles the score_mod)
        tiled = isinstance(energy, str) and energy == "dot" and unit_roundoff(precision.scores) > U64 and not flex
        oracle = "tiled" if tiled and pairs >= TILED_PAIRS else "reference"
    if oracle == "tiled":
        return _tiled_forward_check(actual, q, k, v, inp, kw, precision, bound, lse_a, lse_base, empty, rtol, atol, err_msg, variants)
    with_sink = inp.sinks is not None
    if exact:
        inp.refuse_flex("the exact tier (exact=True)")
        res = _exact.attention(q, k, v, empty=empty, return_lse=True, return_responsibilities=True, **kw)
        expected, L, r = _exact.to_float(res[0]), _exact.to_float(res[1]), _exact.to_float(res[2])
        r_sink = _exact.to_float(res[3]) if with_sink else None
    else:
        res = attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), empty=empty, return_lse=True, return_responsibilities=True, **kw)
        expected, L, r = (np.asarray(x, dtype=np.float64) for x in res[:3])
        r_sink = np.asarray(res[3], dtype=np.float64) if with_sink else None
    a = _check_shape(actual, expected.shape, "assert_attention_close")
    comp = Competition(inp)  # the competition the kernel runs: logits, participation, the sink
    M, D = inp.m, inp.q.shape[-1]
    r_all = r if r_sink is None else np.concatenate([r, r_sink[..., None]], axis=-1)
    t, tbar, _, H = _row_stats(comp.e, comp.tau, comp.take, r_all)
    t = t[..., :M]
    u_out = unit_roundoff(precision.output)
    vabs = np.abs(np.where(np.isfinite(inp.v), inp.v.astype(np.float64), 0.0))
    floor = _floor(precision, M, bound) * max(1.0, float(vabs.max()) if vabs.size else 1.0)
    ef = np.abs(np.where(np.isfinite(expected), expected, 0.0))
    if baseline == "emulated":
        from . import lowp

        emulated, emulated_L = (np.asarray(x).astype(np.float64) for x in lowp.attention(q, k, v, precision, return_lse=True, **kw))
        with np.errstate(invalid="ignore"):
            err_e = np.nanmax(np.where(np.isfinite(expected), np.abs(emulated - expected), 0.0), initial=0.0)
            err_L = np.nanmax(np.where(np.isfinite(L), np.abs(emulated_L - L), 0.0), initial=0.0)
        u_lse = unit_roundoff(np.float64 if precision.scores == np.float64 else np.float32)  # the LSE's dtype (lowp)
        tol = np.full(expected.shape, factor * err_e + u_out * float(ef.max(initial=0.0)))
        how = f"baseline: {factor:g} x the emulated kernel's worst error {err_e:.3g}"
    elif rtol is None and atol is None:
        with np.errstate(all="ignore"):
            tol_a, tol_L = kernel_forward_bounds(comp, r_all, expected, L, precision, bound)
        tol = (tol_a + 8 * U64 * ef) * _SECOND_ORDER + floor
        how = f"{bound} bound"
    else:
        tol = _explicit_tol(expected, rtol, atol)
        how = "explicit rtol/atol"
    cond = (2 * np.abs(t) + 2 * tbar).max(axis=-1, initial=0.0)

    def row_info(idx):
        row = idx[:-1] if len(idx) == expected.ndim else idx
        return (
            f"query {_fmt_index(row)}: entropy of r = {H[row]:.4g} nats (max log M = {math.log(max(M, 1)):.4g}); "
            f"max exponent spread t = {np.max(t[row], initial=0.0):.4g}; worst weight condition 2|t_j| + 2 tbar = {cond[row]:.4g}"
        )

    header = _header(precision, how, M, D, energy, variants, "exact tier" if exact else "float64 reference")
    worst = _report_and_raise("attention", a, expected, tol, row_info, header, err_msg)
    if lse_a is not None:
        base = math.e if lse_base is None else float(lse_base)
        expected_L = L / math.log(base)
        Lf = np.abs(np.where(np.isfinite(expected_L), expected_L, 0.0))
        if baseline == "emulated":  # the same rule for the LSE: factor x the emulated kernel's worst, plus its dtype's rounding
            tol_l = np.full(expected_L.shape, factor * err_L / math.log(base) + u_lse * float(Lf.max(initial=0.0)))
        elif rtol is None and atol is None:
            tol_l = (tol_L / math.log(base) + 8 * U64 * Lf) * _SECOND_ORDER
        else:
            tol_l = _explicit_tol(expected_L, rtol, atol)
        _check_shape(lse_a, expected_L.shape, "assert_attention_close (lse)")
        worst = max(worst, _report_and_raise(f"log-partition (base {base:g})", lse_a, expected_L, tol_l, row_info, header, err_msg))
    return worst


def _header(precision, how, M, D, energy, variants, oracle):
    """The first line of an attention report: the kernel's model, how its tolerance is formed, the call and the oracle."""
    active = [key for key, x in variants.items() if x is not None and x is not False and not (key == "dropout_p" and x == 0)]
    return (f"kernel: {precision.describe()}; {how}; M = {M} keys, D = {D}, energy {energy!r}"
            + (f", variants {', '.join(active)}" if active else "") + f", {oracle}")


def _tiled_tolerances(ch, inp, precision, bound):
    """The derived tolerances ``(on a, on L)`` of the tiled oracle's :class:`~iem_ref.accel.verdict.Chunk` ``ch``: section 13
    from its sums, plus the oracle's own error (:func:`~iem_ref.accel.verdict.own_error`), the second-order factor and the floor."""
    from .accel.verdict import own_error

    M, D = inp.m, inp.q.shape[-1]
    n_all, dropout = M + (inp.sinks is not None), inp.keep is not None
    with np.errstate(all="ignore"):
        ta, tL, _ = forward_terms(ch.sums, ch.a, ch.L, precision, M, n_all, dropout)
        own_a, own_L = own_error(ch, n_all, M, D, inp.n * inp.group, inp.scale, ch.vmax, dropout)
        return ((ta.bound(bound) + own_a) * _SECOND_ORDER + _floor(precision, M, bound) * max(1.0, ch.vmax),
                (tL.bound(bound) + own_L) * _SECOND_ORDER)


def _tiled_forward_check(actual, q, k, v, inp, kw, precision, bound, lse, lse_base, empty, rtol, atol, err_msg, variants):
    """:func:`assert_attention_close` with the tiled oracle: expected values, tolerances and the comparison a few heads at a time."""
    from .accel.verdict import forward_chunks

    M, N, D, Dv = inp.m, inp.n, inp.q.shape[-1], inp.dv
    shape = inp.batch + (N, Dv)
    a_act = _check_shape(actual, shape, "assert_attention_close")
    B = int(np.prod(inp.batch, dtype=np.int64))
    a_act = a_act.reshape(B, N, Dv)
    base = math.e if lse_base is None else float(lse_base)
    lse_act = None if lse is None else _check_shape(lse, inp.batch + (N,), "assert_attention_close (lse)").reshape(B, N)
    derived = rtol is None and atol is None
    how = f"{bound} bound" if derived else "explicit rtol/atol"
    out_m = _Mismatches((B, N, Dv), _float_dtype(a_act))
    lse_m = _Mismatches((B, N), _float_dtype(lse_act)) if lse_act is not None else None
    stats = np.zeros((3, B, N))
    for ch in forward_chunks(q, k, v, precision, empty=empty, **kw):
        e, L = ch.a, ch.L
        if derived:
            tol, tol_L = _tiled_tolerances(ch, inp, precision, bound)
        else:
            tol = _explicit_tol(e, rtol, atol)
        out_m.add(a_act[ch.f0:ch.f1], e, tol, ch.f0)
        if lse_m is not None:
            eL = L / math.log(base)
            tl = tol_L / math.log(base) if derived else _explicit_tol(eL, rtol, atol)
            lse_m.add(lse_act[ch.f0:ch.f1], eL, tl, ch.f0)
        stats[:, ch.f0:ch.f1] = ch.entropy, ch.spread, ch.cond

    def row_info(idx):
        b, i = int(idx[0]), int(idx[1])
        where = np.unravel_index(b, inp.batch) + (i,) if inp.batch else (i,)
        return (f"query {_fmt_index(where)}: entropy of r = {stats[0, b, i]:.4g} nats (max log M = {math.log(max(M, 1)):.4g}); "
                f"max exponent spread t = {stats[1, b, i]:.4g}; worst weight condition 2|t_j| + 2 tbar = {stats[2, b, i]:.4g}")

    header = _header(precision, how, M, D, kw["energy"], variants, "tiled float64 oracle")
    worst = out_m.report("attention", row_info, header + "; indices (flat batch, query, column)", err_msg)
    if lse_m is not None:
        worst = max(worst, lse_m.report(f"log-partition (base {base:g})", row_info, header + "; indices (flat batch, query)", err_msg))
    return worst


def _floor(precision, n, bound):
    """Absolute floor for ``n`` terms of size at most 1: weights flushed below the scores dtype's
    smallest normal (``n tiny_s``: a flush loses its weight, one-sided), and the probabilities' and the
    result's rounding in their subnormal range (half their smallest subnormal), where the relative
    bound does not hold.  The probabilities' are ``n`` roundings to nearest: under
    ``bound="probabilistic"`` mean-zero and independent, ``LAMBDA sqrt(n)`` of them at most (one more
    Hoeffding event per element: the chance that a correct kernel fails one stays below ``1e-9``)."""
    roundings = n if bound == "rigorous" else min(n, LAMBDA * math.sqrt(n))
    return n * _tiny(precision.scores) + roundings * 0.5 * _smallest(precision.probs) + 0.5 * _smallest(precision.output)


def _smallest(dtype):
    """The smallest positive (subnormal) number of a float dtype."""
    dt = np.dtype(dtype)
    if dt.name in LOW_PRECISION and dt.name != "float16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dt).smallest_subnormal)
    return float(np.finfo(dt).smallest_subnormal)


def _tiny(dtype):
    """The smallest normal number of a float dtype (low-precision ones included)."""
    dt = np.dtype(dtype)
    if dt.name in LOW_PRECISION and dt.name != "float16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dt).tiny)
    return float(np.finfo(dt).tiny)


def assert_attention_vjp_close(
    dq,
    dk,
    dv,
    q,
    k,
    v,
    grad_out,
    *,
    scale=None,
    mask=None,
    is_causal=False,
    causal_alignment="top_left",
    energy="dot",
    layout="bhsd",
    precision=None,
    bound="probabilistic",
    rtol=None,
    atol=None,
    err_msg="",
    oracle=None,
    **variants,
):
    """Check a backward pass ``(dq, dk, dv)`` (G4, G6) computed by your kernel for ``grad_out = dLoss/da``.

    The keyword arguments are those of :func:`iem_ref.attention_vjp` (masks,
    causality, the variants; ``dk, dv`` at the key heads with
    ``enable_gqa``), plus ``layout``, ``precision`` and ``bound`` as in
    :func:`assert_attention_close`.  The oracle is the float64 reference's
    :func:`iem_ref.attention_vjp`; the tolerance, per element, is
    :func:`iem_ref.bounds.kernel_vjp_bounds` (section 14 of
    :mod:`iem_ref.bounds`): a FlashAttention-style backward that recomputes
    ``P`` from its saved log-partition, forms ``Delta = rowsum(dO * O)``
    from its rounded output and rounds ``dS`` and ``P`` to the input dtype
    for the GEMMs, the cancellation in ``dP - Delta`` included; plus the
    oracle's own error (:func:`iem_ref.bounds.variant_vjp_error`) and a floor
    of ``n tiny`` (``n`` the reduction length).  Returns the largest ratio of
    an element's error to its tolerance.

    ``oracle``: ``"tiled"`` takes the expected gradients from the float64
    CPU kernels and section 14's sums panel by panel
    (:mod:`iem_ref.accel.verdict_vjp`: the same tolerance, in bounded
    memory, a few heads at a time); ``"reference"`` the NumPy reference
    above; ``None`` (default) the tiled oracle when the kernel's scores are
    below float64, the call has at least ``TILED_PAIRS`` query-key pairs and
    the tiled backward supports it (the dot energy; masks, causality,
    windows, grouped-query heads; finite inputs), else the reference.

    Examples
    --------
    >>> import iem_ref
    >>> q = np.array([[0.5, -1.0]]); k = np.eye(2); v = np.array([[1.0], [3.0]]); g = np.array([[1.0]])
    >>> grads = iem_ref.attention_vjp(q, k, v, g)
    >>> assert_attention_vjp_close(*grads, q, k, v, g) < 1
    True
    """
    from .bounds import kernel_vjp_bounds, variant_vjp_error
    from .gradients import attention_vjp

    unknown = set(variants) - set(_VARIANT_KEYS)
    if unknown:
        raise TypeError(f"assert_attention_vjp_close() got unexpected keyword argument(s) {sorted(unknown)}")
    check_choice(layout, "layout", {"bhsd", "bshd"})
    check_choice(bound, "bound", {"probabilistic", "rigorous"})
    grads = [_host(x) for x in (dq, dk, dv)]
    q, k, v, u = _host(q), _host(k), _host(v), _host(grad_out)
    if layout == "bshd":
        q, k, v, u = _bshd(q), _bshd(k), _bshd(v), _bshd(u)
        grads = [_bshd(x) for x in grads]
    variants = {key: _host(x) if hasattr(x, "__array__") or hasattr(x, "detach") else x for key, x in variants.items()}
    mask = None if mask is None else _host(mask)
    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, **variants)
    if precision is None:
        precision = infer_precision(*(x.dtype for x in grads + [q, k, v, u]))
    elif not isinstance(precision, Precision):
        precision = Precision.of(precision)
    if oracle is not None:
        check_choice(oracle, "oracle", {"tiled", "reference"})
    if oracle != "reference":
        from .accel.verdict_vjp import unsupported

        inp = prepare_attention(q, k, v, **kw)
        why = unsupported(inp, (q, k, v, u), precision)
        if oracle == "tiled" and why is not None:
            raise ValueError(f"oracle='tiled' cannot judge {why}; use oracle='reference'")
        pairs = int(np.prod(inp.batch, dtype=np.int64)) * inp.n * inp.m
        if oracle == "tiled" or (why is None and unit_roundoff(precision.scores) > U64 and pairs >= TILED_PAIRS):
            return _tiled_vjp_check(grads, q, k, v, u, inp, kw, precision, bound, rtol, atol, err_msg, variants)
    q64, k64, v64, u64 = (x.astype(np.float64) for x in (q, k, v, u))
    expected = [np.asarray(x, np.float64) for x in attention_vjp(q64, k64, v64, u64, **kw)[:3]]
    inp = prepare_attention(q64, k64, v64, **kw)
    comp = Competition(inp)
    if rtol is None and atol is None:
        with np.errstate(all="ignore"):
            tols = kernel_vjp_bounds(comp, u64, precision, bound)
            own = variant_vjp_error(q64, k64, v64, u64, **kw)[:3]
        floors = [_floor(precision, n, bound) for n in (inp.m, inp.n * inp.group, inp.n * inp.group)]
        tols = [(t + o) * _SECOND_ORDER + f for t, o, f in zip(tols, own, floors)]
        how = f"{bound} bound"
    else:
        tols = [_explicit_tol(e, rtol, atol) for e in expected]
        how = "explicit rtol/atol"
    header = f"kernel: {precision.describe()}; {how}; N = {inp.n}, M = {inp.m}, D = {inp.q.shape[-1]}, energy {energy!r}"
    worst = 0.0
    for name, got, exp, tol in zip(("dq", "dk", "dv"), grads, expected, tols):
        got = _check_shape(got, exp.shape, f"assert_attention_vjp_close ({name})")
        tol = np.broadcast_to(tol, exp.shape)
        if np.isnan(tol[np.isfinite(exp)]).any():  # a NaN tolerance would pass any value: never silently
            raise RuntimeError(f"assert_attention_vjp_close: no tolerance derived for some finite {name} entries ({header})")
        worst = max(worst, _report_and_raise(name, got, exp, np.broadcast_to(tol, exp.shape), None, header, err_msg))
    return worst


def _tiled_vjp_check(grads, q, k, v, u, inp, kw, precision, bound, rtol, atol, err_msg, variants):
    """:func:`assert_attention_vjp_close` with the tiled oracle: expected gradients, tolerances and the comparison a few heads at a time."""
    from .accel.verdict_vjp import vjp_chunks

    N, M, D, Dv, g = inp.n, inp.m, inp.q.shape[-1], inp.dv, inp.group
    kv_batch = inp.k_heads.shape[:-2]
    shapes = (inp.batch + (N, D), kv_batch + (M, D), kv_batch + (M, Dv))
    Bq, Bk = int(np.prod(inp.batch, dtype=np.int64)), int(np.prod(kv_batch, dtype=np.int64))
    flat = [_check_shape(x, s, f"assert_attention_vjp_close ({n})").reshape((B,) + s[-2:])
            for x, s, n, B in zip(grads, shapes, ("dq", "dk", "dv"), (Bq, Bk, Bk))]
    derived = rtol is None and atol is None
    how = f"{bound} bound" if derived else "explicit rtol/atol"
    found = [_Mismatches(x.shape, _float_dtype(x)) for x in flat]
    floors = [_floor(precision, n, bound) for n in (M, N * g, N * g)]
    opts = {n: kw[n] for n in ("scale", "mask", "is_causal", "causal_alignment")}
    for ch in vjp_chunks(q, k, v, u, precision, window=variants.get("window"), enable_gqa=bool(variants.get("enable_gqa")), **opts):
        expected = (ch.dq, ch.dk, ch.dv)
        if derived:
            with np.errstate(all="ignore"):
                scales = (inp.scale, inp.scale, 1.0)
                tols = [(s * t.bound(bound) + o) * _SECOND_ORDER + f for s, t, o, f in zip(scales, ch.terms, ch.own, floors)]
        else:
            tols = [_explicit_tol(e, rtol, atol) for e in expected]
        for m, x, e, tol, first in zip(found, flat, expected, tols, (ch.h0 * g, ch.h0, ch.h0)):
            m.add(x[first:first + len(e)], e, tol, first)
    header = _header(precision, how, M, D, kw["energy"], variants, "tiled float64 oracle")
    worst = 0.0
    for name, m in zip(("dq", "dk", "dv"), found):
        worst = max(worst, m.report(name, None, header + "; indices (flat batch, row, column)", err_msg))
    return worst
