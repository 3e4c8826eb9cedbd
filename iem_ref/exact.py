"""The exact tier: correctly rounded twins of the softmin equations, in ``decimal``.

Arbitrary-precision twins of :func:`iem_ref.log_partition` (G1's ``L``),
:func:`iem_ref.responsibilities` (A3 / T2), :func:`iem_ref.posterior_mean`
(A4 / P2), :func:`iem_ref.attention` (A1-A4, T1; dot and squared-Euclidean
energies), :func:`iem_ref.tanh_from_signed_gaussian` (S4) and
:func:`iem_ref.softplus` (H3), with the same argument names, semantics and
edge-case policy (README, "Edge-case policy").  They are the ground truth the
float64 reference is tested against, on small inputs.

- Inputs are float arrays, converted **exactly** (``Decimal(float)`` is
  exact; float32 goes through its exact float64 value).  No float arithmetic
  happens inside the computation: only the standard library's ``decimal``.
- Results are ``decimal.Decimal`` values in object arrays (a bare ``Decimal``
  where the reference returns a scalar).  ``float(x)`` of every result is the
  **correctly rounded** float64 of the true value of the float inputs, and
  :func:`to_float` gives the correctly rounded float64 or float32 of a whole
  array.

Precision strategy (Ziv's strategy with rigorous error bounds)
--------------------------------------------------------------
Every result is computed at a working precision of ``p`` significant digits
together with a *rigorous* bound ``e`` on its absolute error, accumulated
operation by operation: each rounded ``decimal`` operation (``exp``, ``ln``,
``*``, ``/``, ``+``; all correctly rounded, half-even) contributes at most
``delta = 10**(1 - p)`` relative, and the error of an exponent ``eps``
becomes a relative error ``<= 1.06 eps + 2 delta`` of ``exp`` (``eps <= 0.1``).
Operations on the float inputs themselves (energies ``-<q, k>`` and
``||q - k||^2``, the shifted energies ``d_j - min d``) are done exactly (a
context with unbounded precision).  A result is accepted when both ends of
``[x - e, x + e]`` round to the same float64 *and* the same float32; otherwise
``p`` is doubled (40, 80, 160, ... digits, at most :data:`MAX_DIGITS`) and the
whole computation repeated.  A value whose float64 and float32 roundings
settle but which lies within the last ``e`` of a float16, bfloat16 or float8
rounding midpoint (``log_partition([11788, 0.6875])`` is ``-0.6875 + 7e-5120``,
and ``-0.6875`` is a float8_e5m2 midpoint) comes back as :class:`Unsettled`:
its float64 and float32 roundings are correct, and rounding it to a
low-precision dtype raises ``ArithmeticError``.  A computation that raised no ``Inexact`` signal
has ``e = 0`` (so exact results such as ``r = (1/2, 1/2)`` settle at once,
even on a rounding midpoint).  Tiny results and cancellation are what the loop
is for: ``log_partition([0, 700])`` (about ``1e-304``) settles at 40 digits
because the log-partition is formed in the ``log1p`` form
``L = -m/tau + log1p(sum_{j != argmin} exp(-(d_j - m)/tau))`` and ``log1p``
of a small argument is evaluated with as many extra digits as the argument
has leading zeros; ``log_partition([ln 2, ln 2])`` (about ``2e-17``, with
``ln 2`` the float: 17 digits cancel) settles at 40 digits; the S4 summary
``r_+ - r_-`` at ``z = 1e-300`` cancels 300 digits and settles at 320.

Shape legend as in the reference: hypotheses on ``axis`` (default last,
``M``); attention ``q (B..., N, D)``, ``k (B..., M, D)``, ``v (B..., M, Dv)``.

Examples
--------
>>> from iem_ref import exact
>>> L = exact.log_partition([0.0, 700.0])
>>> float(L)
9.85967654375977e-305
>>> exact.to_float(exact.responsibilities([0.0, 0.0, 0.0]))
array([0.33333333, 0.33333333, 0.33333333])
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from ._validation import as_float_array, as_mask, check_axis, check_choice, check_tau, need_ndim
from .attention import prepare_attention
from .energies import energy_of
from .precision import LOW_PRECISION, is_low_precision, low_precision_dtype, round_to

__all__ = [
    "log_partition",
    "responsibilities",
    "posterior_mean",
    "attention",
    "tanh_from_signed_gaussian",
    "softplus",
    "to_float",
    "round_to_float32",
    "MAX_DIGITS",
]

#: First working precision (significant decimal digits) of the Ziv loop.
START_DIGITS = 40
#: The loop gives up (``ArithmeticError``) beyond this precision.
MAX_DIGITS = 5120

_ZERO = Decimal(0)
_ONE = Decimal(1)
_NAN = Decimal("NaN")
_INF = Decimal("Infinity")

# +, -, * of float-derived values without rounding (unbounded precision).
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def _context(p, rounding=decimal.ROUND_HALF_EVEN):
    return decimal.Context(prec=p, rounding=rounding, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def _dec(x):
    """A float (or Decimal) as its exact Decimal value."""
    if isinstance(x, Decimal):
        return x
    return Decimal(float(x))


# ----------------------------------------------------------------------------
# Correct rounding of Decimal values to float64 / float32
# ----------------------------------------------------------------------------

_F32_OVER = Decimal(2**128)  # stands for float32 inf when comparing distances
_F32_UNDER = Decimal(5**151).scaleb(-151)  # 2**-151, a quarter of the smallest float32 subnormal


def round_to_float32(x):
    """The float32 nearest to the Decimal ``x`` (ties to even), without double rounding.

    ``np.float32(float(x))`` rounds twice and can be off by one float32 ulp on
    a float32 midpoint; this compares the neighbours exactly.

    Examples
    --------
    >>> round_to_float32(Decimal(1) + Decimal(2) ** -24 + Decimal(2) ** -60)  # just above a midpoint
    np.float32(1.0000001)
    """
    x = _dec(x)
    if x.is_nan():
        return np.float32(np.nan)
    if x.is_infinite() or x.copy_abs() > _F32_OVER:
        return np.float32(np.inf if x > 0 else -np.inf)
    if x.copy_abs() < _F32_UNDER:  # below half the smallest subnormal (and no exact
        return np.float32(0.0 if x >= 0 else -0.0)  # subtraction with a 10**-1e8)
    with np.errstate(over="ignore"):
        f = np.float32(float(x))
    cands = {f, np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))}

    def value(c):
        return _F32_OVER.copy_sign(_dec(float(c))) if np.isinf(c) else _dec(float(c))

    def key(c):
        dist = _EXACT.subtract(value(c), x).copy_abs()
        odd = int(np.float32(c).view(np.uint32)) & 1
        return dist, odd

    return min(cands, key=key)


def _low_midpoint(f, dtype):
    """The two ``dtype`` neighbours of the float64 ``f`` if ``f`` is exactly their midpoint, else None."""
    if not math.isfinite(f):
        return None
    r = float(round_to(np.array([f]), dtype).astype(np.float64)[0])
    if r == f or not math.isfinite(r):
        return None
    other = _next_low(r, f > r, dtype)
    return (min(r, other), max(r, other)) if math.isfinite(other) and 2 * f == r + other else None


def _next_low(r, up, dtype):
    """The ``dtype`` value next to its value ``r``, upwards or downwards (by the bit pattern)."""
    a = np.array([r]).astype(dtype)
    uint = np.uint8 if a.itemsize == 1 else np.uint16
    bits = int(a.view(uint)[0])
    sign_bit = 1 << (8 * a.itemsize - 1)
    if r == 0:
        nxt = 1 if up else sign_bit | 1
    elif (r > 0) == up:  # away from zero
        nxt = bits + 1
    else:  # towards zero
        nxt = bits - 1
    return float(np.array([nxt], dtype=uint).view(dtype).astype(np.float64)[0])


class Unsettled(Decimal):
    """A result settled for float64 and float32 only: within ``10**-MAX_DIGITS`` of a low-precision rounding midpoint."""


def _round_low(x, dtype):
    """The ``dtype`` (float16, bfloat16, float8) value nearest the Decimal ``x``, ties to even."""
    if isinstance(x, Unsettled):
        raise ArithmeticError(f"the exact tier could not settle the rounding of {x:.6e} to {np.dtype(dtype).name} "
                              f"within {MAX_DIGITS} digits (it lies that close to one of its rounding midpoints)")
    f = float(x)
    mid = _low_midpoint(f, dtype)
    if mid is None or x == _dec(f):
        return round_to(np.array([f]), dtype)[0]
    return np.array([mid[1] if x > _dec(f) else mid[0]]).astype(dtype)[0]


def to_float(x, dtype=np.float64):
    """Correctly rounded float array from Decimal results (``dtype`` float64, float32, float16, bfloat16, float8).

    Examples
    --------
    >>> to_float([Decimal("0.1"), Decimal("1e-400")])
    array([0.1, 0. ])
    >>> float(to_float([Decimal(1) + Decimal(2) ** -8 + Decimal(2) ** -70], "bfloat16")[0]) - 1  # just above a midpoint
    0.0078125
    """
    dtype = low_precision_dtype(dtype) if isinstance(dtype, str) and dtype in LOW_PRECISION else np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)) and not is_low_precision(dtype):
        raise TypeError(f"dtype must be float64, float32 or one of {LOW_PRECISION}; got {dtype}")
    arr = np.asarray(x, dtype=object)
    flat = [(_dec(e)) for e in arr.reshape(-1)]
    if dtype == np.float64:
        out = np.array([float(e) for e in flat], dtype=np.float64)
    elif dtype == np.float32:
        out = np.array([round_to_float32(e) for e in flat], dtype=np.float32)
    else:
        out = np.array([_round_low(e, dtype) for e in flat], dtype=dtype)
    return out.reshape(arr.shape)


def _rounds_alike(lo, hi, low=True):
    """Every value in ``[lo, hi]`` rounds alike to float64, float32 and (``low``) the low-precision dtypes.

    For a low-precision dtype: when the float64 rounding is the same over the
    interval, the interval can straddle one of its midpoints only if that
    rounding is the midpoint itself (midpoints are float64 values) and the
    interval contains it.
    """
    f = float(lo)
    if f != float(hi):
        return False
    if round_to_float32(lo) != round_to_float32(hi):
        return False
    if not low or lo == hi or not _few_bits(f) or not (lo <= _dec(f) <= hi):
        return True
    return all(_low_midpoint(f, dt) is None for dt in _low_dtypes())


def _few_bits(f):
    """True when ``f`` has at most 12 significant bits: only then can it be a float16, bfloat16 or float8 midpoint."""
    if not math.isfinite(f) or f == 0:
        return False
    m, _ = math.frexp(f)
    return int(abs(m) * 2**53) & ((1 << 41) - 1) == 0


def _low_dtypes():
    dts = [np.dtype(np.float16)]
    try:
        dts += [low_precision_dtype(name) for name in LOW_PRECISION if name != "float16"]
    except TypeError:  # ml_dtypes absent: no bfloat16 or float8 results to settle
        pass
    return dts


def _settled(x, e, p, low=True):
    """True when every value within ``e`` of ``x`` rounds to the same float64 and float32 (and, ``low``, low-precision value).

    The ends are rounded outwards at ``p + 10`` digits (``p`` the working
    precision): a coarser grid could land exactly on a rounding midpoint
    that ``x`` is, in fact, well separated from.
    """
    if not x.is_finite() or e == 0:
        return True
    lo = _context(p + 10, decimal.ROUND_FLOOR).subtract(x, e)
    hi = _context(p + 10, decimal.ROUND_CEILING).add(x, e)
    return _rounds_alike(lo, hi, low)


def _ziv(compute):
    """Run ``compute(C, delta) -> [(values, errors), ...]`` at rising precision until every value settles."""
    p = START_DIGITS
    while True:
        C = _context(p)
        delta = Decimal(10) ** (1 - p)
        with decimal.localcontext(C):  # operators (+, -, abs) on error terms round at p digits too
            outs = compute(C, delta)
        if all(_settled(v, e, p) for vals, errs in outs for v, e in zip(vals, errs)):
            return [vals for vals, _ in outs], p
        if p * 2 > MAX_DIGITS:
            if all(_settled(v, e, p, low=False) for vals, errs in outs for v, e in zip(vals, errs)):
                return [[v if _settled(v, e, p) else Unsettled(v) for v, e in zip(vals, errs)] for vals, errs in outs], p
            raise ArithmeticError(f"the exact tier could not settle the rounding within {MAX_DIGITS} digits")
        p *= 2


def _object_array(values, shape):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    out = out.reshape(shape)
    return out[()] if out.ndim == 0 else out


# ----------------------------------------------------------------------------
# One competition (a row): energies -> L, r, with rigorous error bounds
# ----------------------------------------------------------------------------


@dataclass
class _Row:
    """Result of one softmin row at working precision: values and absolute error bounds."""

    kind: str  # "finite", "empty", "certain", "nan"
    L: Decimal = _ZERO
    eL: Decimal = _ZERO
    r: list = field(default_factory=list)
    er: list = field(default_factory=list)
    n: int = 0  # participating hypotheses with finite energy
    # The unnormalised weights behind r = w / S, for summaries formed as (sum_j w_j v_j) / S:
    w: list = field(default_factory=list)
    ew: list = field(default_factory=list)
    S: Decimal = _ONE
    eS: Decimal = _ZERO
    w_exact: bool = True  # w and S are exact (every weight exp(0) = 1 or 0)


def _log1p(R, C, delta):
    """``log(1 + R)`` for ``R >= 0`` to relative error ``2 delta`` (and its bound)."""
    if R == 0:
        return _ZERO
    if R.adjusted() < -C.prec:
        # log1p(R) = R - R^2/2 + R^3/3 - ...: two terms leave a relative error < R^2 < delta^2.
        return C.subtract(R, C.divide(C.multiply(R, R), 2))
    extra = max(0, -R.adjusted()) + 3
    wide = _context(C.prec + extra)
    return C.plus(wide.ln(wide.add(_ONE, R)))


def _softmin_row(d, take, beta, beta_rel, C, delta, want_r=True, ed=None):
    """A3 / G1 on one row.

    ``d``: Decimal energies (list, length M), exact unless ``ed`` gives their
    absolute errors (the logits of the variants, formed at working precision);
    ``take``: list of bool; ``beta = 1/tau`` (Decimal, relative error
    ``beta_rel``; None for ``tau = inf``).
    """
    part = [j for j in range(len(d)) if take[j] and not (d[j].is_infinite() and d[j] > 0)]
    M = len(d)
    zeros = [_ZERO] * M
    if any(d[j].is_nan() for j in part):
        return _Row("nan", _NAN, _ZERO, [_NAN] * M, zeros)
    if not part:
        return _Row("empty", -_INF, _ZERO, list(zeros), zeros)
    certain = [j for j in part if d[j].is_infinite()]  # only -inf remains
    if certain:
        share = C.divide(_ONE, len(certain))
        err = _ZERO if share * len(certain) == 1 else delta * share
        r = [share if j in certain else _ZERO for j in range(M)]
        er = [err if j in certain else _ZERO for j in range(M)]
        w = [_ONE if j in certain else _ZERO for j in range(M)]
        return _Row("certain", _INF, _ZERO, r, er, len(part), w, zeros, Decimal(len(certain)))

    # Exactness is tracked separately for r and L (the Inexact flag of C): an exact r on a
    # rounding midpoint, e.g. r = (1/2, 1/2) averaging two values, must not inherit L's error.
    n = len(part)
    if beta is None:  # tau = inf: the uniform limit over the participating hypotheses
        C.clear_flags()
        share = C.divide(_ONE, n)
        e_share = delta * share if C.flags[decimal.Inexact] else _ZERO
        C.clear_flags()
        L = C.ln(Decimal(n))
        eL = delta * abs(L) if C.flags[decimal.Inexact] else _ZERO
        r = [share if j in part else _ZERO for j in range(M)]
        er = [e_share if j in part else _ZERO for j in range(M)]
        w = [_ONE if j in part else _ZERO for j in range(M)]
        return _Row("finite", L, eL, r, er, n, w, zeros, Decimal(n))

    inexact_d = ed is not None and any(ed[j] for j in part)
    ed = ed or [_ZERO] * M
    C.clear_flags()
    m = min(d[j] for j in part)
    win = next(j for j in part if d[j] == m)
    w = dict.fromkeys(range(M), _ZERO)
    ew = dict.fromkeys(range(M), _ZERO)
    w[win] = _ONE  # exp(0): exact, in truth as well
    rel_t = (delta + beta_rel) * Decimal("1.01")
    for j in part:
        if j == win:
            continue
        t = C.multiply(_EXACT.subtract(d[j], m), beta)  # (d_j - m)/tau, one rounding
        eps = t * rel_t + (ed[j] + ed[win]) * beta * Decimal("1.01")  # the energies' own errors shift t too
        w[j] = C.exp(-t)
        if eps <= Decimal("0.1"):
            ew[j] = w[j] * (Decimal("1.06") * eps + 2 * delta)
        else:  # both the true and the computed weight are below exp(-(t - eps))
            ew[j] = Decimal("1.01") * (C.exp(-(t - eps)) if t > eps else _ONE)
    rest = [w[j] for j in part if j != win]
    R = _ZERO
    for x in rest:
        R = C.add(R, x)
    eR = (sum(ew.values(), _ZERO) + n * delta * R) * Decimal("1.01")
    S = C.add(_ONE, R)
    w_exact = not C.flags[decimal.Inexact] and not inexact_d
    eS = eR + delta * S
    r = [C.divide(w[j], S) for j in range(M)] if want_r else []
    # Every t_j != 0 gives an inexact exp, so no flag means all weights are exp(0) = 1 (in truth
    # too, whatever beta's rounding) and the divisions were exact.
    r_exact = not C.flags[decimal.Inexact] and not inexact_d
    C.clear_flags()
    ell = _log1p(R, C, delta)
    a = C.multiply(m.copy_negate(), beta)  # -m / tau (m exact: negate without rounding)
    L = C.add(a, ell)
    if r_exact and not C.flags[decimal.Inexact] and beta_rel == 0:
        eL = _ZERO
    else:
        eL = (abs(a) * (delta + beta_rel) + ed[win] * beta + eR + 2 * delta * ell + delta * abs(L)) * Decimal("1.01")
    ws, ews = [w[j] for j in range(M)], [ew[j] for j in range(M)]
    if not want_r:
        return _Row("finite", L, eL, [], [], n, ws, ews, S, eS, w_exact)
    if r_exact:
        return _Row("finite", L, eL, r, zeros, n, ws, zeros, S, _ZERO, True)
    er = []
    for j, rj in enumerate(r):
        if eS >= Decimal("0.01"):  # hopeless at this precision: force another round
            er.append(_ONE)
        else:
            er.append((ew[j] + rj * eS) * Decimal("1.02") + delta * rj)
    return _Row("finite", L, eL, r, er, n, ws, ews, S, eS, w_exact)


def _beta_from_tau(tau, C, delta):
    """``1/tau`` as a Decimal and its relative error (None for ``tau = inf``)."""
    if math.isinf(tau):
        return None, _ZERO
    C.clear_flags()
    beta = C.divide(_ONE, _dec(tau))
    return beta, (delta if C.flags[decimal.Inexact] else _ZERO)


def _rows(d, take):
    """Energies (..., M) as lists of exact Decimals, and masks as lists of bool."""
    M = d.shape[-1]
    rows = int(np.prod(d.shape[:-1], dtype=np.int64))
    d2 = d.astype(np.float64).reshape(rows, M)
    t2 = np.ones(d2.shape, dtype=bool) if take is None else np.broadcast_to(take, d.shape).reshape(rows, M)
    return [[Decimal(x) for x in row] for row in d2.tolist()], t2.tolist()


def _prepare(d, tau, axis, mask):
    d = as_float_array(d, "d")
    if d.ndim == 0:
        raise ValueError("d must have at least one dimension (the hypotheses); got a scalar")
    tau = check_tau(tau)
    axis = check_axis(axis, d.ndim)
    take = as_mask(mask, d.shape, "mask")
    d = np.moveaxis(d, axis, -1)
    if take is not None:
        take = np.moveaxis(take, axis, -1)
    return d, tau, axis, take


# ----------------------------------------------------------------------------
# Public twins
# ----------------------------------------------------------------------------


def log_partition(d, tau=1.0, axis=-1, mask=None):
    """G1's objective, exactly: ``L(d) = log sum_j exp(-d_j / tau)``, correctly rounded.

    Twin of :func:`iem_ref.log_partition` (same arguments and edge cases:
    ``-inf`` for an empty row, ``+inf`` if a participating energy is ``-inf``,
    NaN if one is NaN).  Evaluated as ``-m/tau + log1p(sum_{j != argmin}
    exp(-(d_j - m)/tau))`` in ``decimal`` at a precision raised until the
    float64 and float32 roundings are settled (module docstring).

    Returns
    -------
    L : Decimal, or object ndarray of Decimal, ``d``'s shape without ``axis``.

    Examples
    --------
    >>> float(log_partition([0.6931471805599453, 0.6931471805599453]))  # ln 2 - fl(ln 2)
    2.3190468138462996e-17
    """
    d, tau, axis, take = _prepare(d, tau, axis, mask)
    rows, takes = _rows(d, take)

    def compute(C, delta):
        beta, beta_rel = _beta_from_tau(tau, C, delta)
        res = [_softmin_row(row, tk, beta, beta_rel, C, delta, want_r=False) for row, tk in zip(rows, takes)]
        return [([x.L for x in res], [x.eL for x in res])]

    (L,), _ = _ziv(compute)
    return _object_array(L, d.shape[:-1])


def responsibilities(d, tau=1.0, axis=-1, mask=None, *, empty="zero"):
    """A3 / T2, exactly: ``r_j = exp(-d_j/tau) / sum_j' exp(-d_j'/tau)``, correctly rounded.

    Twin of :func:`iem_ref.responsibilities` (same arguments, same policy:
    masked and ``+inf`` energies get 0, ``-inf`` energies share the mass, NaN
    rows are NaN, empty rows 0 or NaN with ``empty="nan"``).

    Returns
    -------
    r : object ndarray of Decimal, ``d``'s shape.

    Examples
    --------
    >>> to_float(responsibilities([0.0, 40.0]))
    array([1.00000000e+00, 4.24835426e-18])
    """
    check_choice(empty, "empty", {"zero", "nan"})
    d, tau, axis, take = _prepare(d, tau, axis, mask)
    rows, takes = _rows(d, take)

    def compute(C, delta):
        beta, beta_rel = _beta_from_tau(tau, C, delta)
        res = [_softmin_row(row, tk, beta, beta_rel, C, delta) for row, tk in zip(rows, takes)]
        return [([x for row in res for x in _empty_r(row, empty)], [e for row in res for e in row.er])]

    (r,), _ = _ziv(compute)
    r = _object_array(r, d.shape)
    return np.moveaxis(np.asarray(r, dtype=object), -1, axis)


def _empty_r(row, empty):
    if row.kind == "empty" and empty == "nan":
        return [_NAN] * len(row.r)
    return row.r


def _as_exact_array(x, name):
    """Float arrays as exact Decimals; object arrays of Decimal (e.g. exact results) as they are."""
    arr = np.asarray(x)
    if arr.dtype == object:
        if not all(isinstance(e, Decimal) for e in arr.reshape(-1)):
            raise TypeError(f"{name}: an object array must hold decimal.Decimal values")
        return arr
    arr = as_float_array(arr, name).astype(np.float64)
    out = np.empty(arr.shape, dtype=object)
    out.reshape(-1)[:] = [Decimal(v) for v in arr.reshape(-1).tolist()]
    return out


def _dot_settled(pairs, C, delta):
    """``sum r_j g_j`` over the given pairs and its error bound (values taken as exact)."""
    C.clear_flags()
    acc = _ZERO
    mag = _ZERO
    for rj, gj in pairs:
        prod = C.multiply(rj, gj)
        acc = C.add(acc, prod)
        if prod.is_finite():
            mag = C.add(mag, abs(prod))
    if not C.flags[decimal.Inexact]:
        return acc, _ZERO
    return acc, (len(pairs) + 2) * delta * mag * Decimal("1.01")


def posterior_mean(r, g, *, mask=None):
    """A4 / P2, exactly: ``a = sum_j r_j g_j`` for the given ``r`` and ``g``, correctly rounded.

    Twin of :func:`iem_ref.posterior_mean`.  ``r`` and ``g`` are taken at face
    value (floats exactly, or Decimal object arrays such as the results of
    :func:`responsibilities`): the result is the correctly rounded value of
    ``sum_j r_j g_j`` for *those* numbers.  For the posterior mean of exact
    responsibilities use :func:`attention`, which carries their error bound.

    Parameters
    ----------
    r : (..., K) floats or Decimals
    g : (K,) or (..., K, Dv) floats or Decimals
    mask : bool, broadcast to ``r``'s shape; masked hypotheses contribute nothing.

    Examples
    --------
    >>> float(posterior_mean([0.5, 0.5], [1.0, 1.0 + 2.0 ** -52]))  # exactly a float64 midpoint: ties to even
    1.0
    """
    r = _as_exact_array(r, "r")
    g = _as_exact_array(g, "g")
    need_ndim(r, "r", 1, "(..., K)")
    K = r.shape[-1]
    if g.ndim == 0 or g.shape[-2 if g.ndim >= 2 else -1] != K:
        raise ValueError(f"g must have shape (K,) or (..., K, Dv) with K = {K} hypotheses (r has shape {r.shape}); got {g.shape}")
    take = as_mask(mask, r.shape, "mask")
    take = np.ones(r.shape, dtype=bool) if take is None else take
    if g.ndim == 1:
        out_shape = r.shape[:-1]
        jobs = [[(rr[j], g[j]) for j in range(K) if tk[j]] for rr, tk in zip(r.reshape(-1, K), take.reshape(-1, K))]
    else:
        one_row = r.ndim == 1
        r2 = r[None, :] if one_row else r
        t2 = take[None, :] if one_row else take
        batch = np.broadcast_shapes(r2.shape[:-2], g.shape[:-2])
        N, Dv = r2.shape[-2], g.shape[-1]
        rb = np.broadcast_to(r2, batch + (N, K)).reshape(-1, N, K)
        tb = np.broadcast_to(t2, batch + (N, K)).reshape(-1, N, K)
        gb = np.broadcast_to(g, batch + (K, Dv)).reshape(-1, K, Dv)
        jobs = [
            [(rb[b, i, j], gb[b, j, c]) for j in range(K) if tb[b, i, j]]
            for b in range(rb.shape[0])
            for i in range(N)
            for c in range(Dv)
        ]
        out_shape = (batch + (N, Dv)) if not one_row else (Dv,)

    def compute(C, delta):
        res = [_dot_settled(job, C, delta) for job in jobs]
        return [([a for a, _ in res], [e for _, e in res])]

    (a,), _ = _ziv(compute)
    return _object_array(a, out_shape)


def _summary(row, vals, part, C, delta):
    """A4 for one row and feature: ``a = (sum_j w_j v_j) / S`` and its error bound.

    One division at the end (not ``sum_j (w_j / S) v_j``): when every weight
    is exact (ties, the uniform limit) the result is exact whenever it is
    representable, so an average that lands on a rounding midpoint (e.g.
    ``(v_0 + v_2 + v_3) / 3``) still settles.
    """
    C.clear_flags()
    num = _ZERO
    mag = _ZERO
    spread = _ZERO
    for j, v in zip(part, vals):
        # an infinite value with a weight of 0 (underflowed, or beside certain keys) is the limit of positive weights
        prod = v if (v.is_infinite() and row.w[j] == 0) else C.multiply(row.w[j], v)
        num = C.add(num, prod)
        if v.is_finite():
            mag += abs(prod)
            spread += row.ew[j] * abs(v)
    a = C.divide(num, row.S)
    if not a.is_finite() or (row.w_exact and not C.flags[decimal.Inexact]):
        return a, _ZERO
    if row.eS >= Decimal("0.01") * row.S:  # hopeless at this precision: force another round
        return a, abs(a) + _ONE
    err = (spread + (len(vals) + 1) * delta * mag + abs(a) * row.eS) / row.S * Decimal("1.02") + delta * abs(a)
    return a, err


def _is_plus_inf(x):
    return x.is_infinite() and x > 0


def _exact_energies(q, k, energy):
    """A1 / K2 exactly: ``-<q_i, k_j>`` or ``||q_i - k_j||^2 / 2`` for one (N, D) x (M, D) pair."""
    rows = []
    for qi in q:
        row = []
        for kj in k:
            acc = _ZERO
            for a, b in zip(qi, kj):
                if energy == "dot":
                    acc = _EXACT.add(acc, _EXACT.multiply(a, b))
                else:
                    diff = _EXACT.subtract(a, b)
                    acc = _EXACT.add(acc, _EXACT.multiply(diff, diff))
            row.append(acc.copy_negate() if energy == "dot" else _EXACT.multiply(acc, Decimal("0.5")))
        rows.append(row)
    return rows


def _scaled_score(dij, beta, beta_rel, C, delta):
    """T1 at working precision: ``x = -d beta`` and its error (``+-inf`` energies keep their sign)."""
    if dij.is_nan():
        return _NAN, _ZERO
    if dij.is_infinite():
        return dij.copy_negate(), _ZERO
    if beta is None:  # scale = 0
        return _ZERO, _ZERO
    C.clear_flags()
    x = C.multiply(dij.copy_negate(), beta)
    exact = not C.flags[decimal.Inexact] and beta_rel == 0
    return x, (_ZERO if exact else abs(x) * (delta + beta_rel) * Decimal("1.01"))


def _softcap(x, ex, c, C, delta):
    """V3 at working precision: ``c tanh(x / c)`` and its error.

    ``|d/dx c tanh(x/c)| <= 1`` passes ``ex`` through; the roundings of
    ``x/c`` (``delta |x|`` after the derivative), of the exp (``2 delta c``
    through ``d tanh / d e <= 2``) and of the two sums, the quotient and the
    product by ``c`` (``4 delta |s|``) add at most ``delta (|x| + 6 c)``.
    """
    if x.is_nan() or x.is_zero():
        return x, ex
    if x.is_infinite():
        return c.copy_sign(x), _ZERO
    y = C.divide(x, c)
    e2 = C.exp(C.multiply(Decimal(-2), abs(y)))
    th = C.divide(C.subtract(_ONE, e2), C.add(_ONE, e2))
    s = C.multiply(c, th).copy_sign(x)
    return s, (ex + delta * (abs(x) + 6 * c)) * Decimal("1.01")


def _logits(dij, prior, beta, beta_rel, c, C, delta):
    """The logit ``z = softcap(x) + prior`` (V1-V3) and its error; ``-inf`` (exclusion) by selection."""
    x, ex = _scaled_score(dij, beta, beta_rel, C, delta)
    if (x.is_infinite() and x < 0) or (prior.is_infinite() and prior < 0):
        return -_INF, _ZERO
    s, es = (x, ex) if c is None else _softcap(x, ex, c, C, delta)
    C.clear_flags()
    z = C.add(s, prior)
    return z, (es + (delta * abs(z) * Decimal("1.01") if C.flags[decimal.Inexact] else _ZERO))


def attention(
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
    bias=None,
    alibi_slopes=None,
    softcap=None,
    window=None,
    sinks=None,
    enable_gqa=False,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    dropout_p=0.0,
    dropout_mask=None,
    return_lse=False,
    return_responsibilities=False,
):
    """A1-A4 (T1) and the variants V1-V8, exactly: ``a_i = sum_j softmin_j(d_ij * scale) v_j``, correctly rounded.

    Twin of :func:`iem_ref.attention` for ``energy="dot"`` (A1,
    ``d_ij = -<q_i, k_j>``) and ``"sqeuclidean"`` (K2 with ``sigma = 1``,
    ``||q_i - k_j||^2 / 2``); same masks, causality (both alignments),
    ``empty`` option, variants (bias, ALiBi, softcap, window, sinks,
    grouped-query heads, segments, dropout) and edge cases.  The energies are
    formed exactly; the default ``scale`` is the exact ``1/sqrt(D)`` (not its
    float64 rounding), a given ``scale`` is its exact float value.  The
    variants' logits ``softcap(-d scale) + bias + alibi`` are formed at the
    working precision with an error bound that the softmin carries (bias and
    ALiBi exactly: float bias plus ``-slope |i' - j|``).  The posterior mean
    carries the error bound of the responsibilities, ``sum_j e(r_j) |v_j|``,
    plus its own rounding.

    Returns
    -------
    a : object ndarray (B..., N, Dv) of Decimal
    lse : object ndarray (B..., N), if ``return_lse``
    r : object ndarray (B..., N, M), if ``return_responsibilities``
    r_sink : object ndarray (B..., N), if ``return_responsibilities`` and ``sinks``

    Examples
    --------
    >>> q = [[1.0, 0.0]]; k = [[1.0, 0.0], [0.0, 1.0]]; v = [[1.0], [0.0]]
    >>> to_float(attention(q, k, v, scale=1.0))  # e / (e + 1)
    array([[0.73105858]])
    >>> to_float(attention(q, k, v, scale=1.0, sinks=[1.0]))  # e / (e + 1 + e)
    array([[0.4223188]])
    """
    check_choice(empty, "empty", {"zero", "nan"})
    energy_of(energy).require("exact", "the exact tier")
    inp = prepare_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy,
        bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window, sinks=sinks, enable_gqa=enable_gqa,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask,
    )
    D = inp.q.shape[-1]
    batch, N, M, Dv = inp.batch, inp.n, inp.m, inp.dv
    take = inp.takes_part()
    take = np.ones(batch + (N, M), dtype=bool) if take is None else take
    B = int(np.prod(batch, dtype=np.int64))
    qb = inp.q.astype(np.float64).reshape((B, N, D))
    kb = inp.k.astype(np.float64).reshape((B, M, D))
    vb = inp.v.astype(np.float64).reshape((B, M, Dv))
    tb = take.reshape((B, N, M))
    energies = []
    for b in range(B):
        qd = [[Decimal(x) for x in row] for row in qb[b].tolist()]
        kd = [[Decimal(x) for x in row] for row in kb[b].tolist()]
        energies.append(_exact_energies(qd, kd, energy))
    values = [[[Decimal(x) for x in row] for row in vb[b].tolist()] for b in range(B)]
    plain = inp.plain_scores
    priors = _exact_priors(inp, B) if not plain else None
    sinks_b = None if inp.sinks is None else [Decimal(x) for x in np.broadcast_to(inp.sinks, batch).reshape(B).tolist()]
    keep = None if inp.keep is None else inp.keep.reshape((B, N, M))
    one_minus_p = _EXACT.subtract(_ONE, _dec(inp.dropout_p))
    cap = None if inp.softcap is None else _dec(inp.softcap)

    def beta_of(C, delta):
        if scale is None:
            C.clear_flags()
            beta = C.divide(_ONE, C.sqrt(Decimal(D)))
            return beta, (2 * delta if C.flags[decimal.Inexact] else _ZERO)
        if float(scale) == 0.0:
            return None, _ZERO
        return _dec(float(scale)), _ZERO

    def row_of(b, i, beta, beta_rel, C, delta):
        """The row's competition: energies (and errors), participation, values (the sink last)."""
        tk = tb[b, i].tolist()
        if plain:
            return _softmin_row(energies[b][i], tk, beta, beta_rel, C, delta), energies[b][i], tk
        zs = [_logits(energies[b][i][j], priors[b][i][j], beta, beta_rel, cap, C, delta) for j in range(M)]
        e = [z.copy_negate() for z, _ in zs]  # the softmax of z is the softmin of -z (at tau = 1)
        ed = [ez for _, ez in zs]
        if sinks_b is not None:  # V5: the null hypothesis, logit sink, value 0
            e, ed, tk = e + [sinks_b[b].copy_negate()], ed + [_ZERO], tk + [True]
        return _softmin_row(e, tk, _ONE, _ZERO, C, delta, ed=ed), e, tk

    def compute(C, delta):
        beta, beta_rel = beta_of(C, delta)
        A, eA, Ls, eLs, Rs, eRs, Ss, eSs = [], [], [], [], [], [], [], []
        for b in range(B):
            for i in range(N):
                row, e, tk = row_of(b, i, beta, beta_rel, C, delta)
                Ls.append(row.L)
                eLs.append(row.eL)
                r = _empty_r(row, empty)
                Rs.extend(r[:M])
                eRs.extend(row.er[:M])
                if sinks_b is not None:
                    Ss.append(r[M])
                    eSs.append(row.er[M])
                for c in range(Dv):
                    if row.kind == "nan" or (row.kind == "empty" and empty == "nan"):
                        A.append(_NAN)
                        eA.append(_ZERO)
                        continue
                    # every participating key, even one whose weight is 0 in a row with certain
                    # keys: a NaN value of an unmasked key reaches its row (0 * NaN), as in the reference;
                    # a dropped key's value is never read (V8), the sink's is 0
                    part = [j for j in range(M) if tk[j] and not _is_plus_inf(e[j]) and (keep is None or keep[b, i, j])]
                    a, err = _summary(row, [values[b][j][c] for j in part], part, C, delta)
                    if keep is not None:  # V8: divide by 1 - p
                        C.clear_flags()
                        a2 = C.divide(a, one_minus_p)
                        err = err / one_minus_p + (delta * abs(a2) if C.flags[decimal.Inexact] else _ZERO)
                        a = a2
                    A.append(a)
                    eA.append(err)
        return [(A, eA), (Ls, eLs), (Rs, eRs), (Ss, eSs)]

    (A, L, R, S), _ = _ziv(compute)
    out = [_object_array(A, batch + (N, Dv))]
    if return_lse:
        out.append(_object_array(L, batch + (N,)))
    if return_responsibilities:
        out.append(_object_array(R, batch + (N, M)))
        if sinks_b is not None:
            out.append(_object_array(S, batch + (N,)))
    return out[0] if len(out) == 1 else tuple(out)


def _exact_priors(inp, B):
    """V1 + V2 exactly, ``(B, N, M)`` lists of Decimal: the float bias plus ``-slope |i' - j|``."""
    N, M = inp.n, inp.m
    prior = [[[_ZERO] * M for _ in range(N)] for _ in range(B)]
    if inp.bias is not None:
        bias = inp.bias.reshape((B, N, M)).tolist()
        prior = [[[Decimal(x) for x in row] for row in rows] for rows in bias]
    if inp.slopes is not None:
        rel = inp.relative_positions()
        if inp.cu_seqlens_q is not None and inp.slopes.ndim == len(inp.batch) + 1:
            from .variants import _segment_ids

            slopes = inp.slopes[..., _segment_ids(inp.cu_seqlens_q, N)]
        else:
            slopes = np.broadcast_to(inp.slopes[..., None], inp.batch + (N,))
        slopes = slopes.reshape((B, N)).tolist()
        for b in range(B):
            for i in range(N):
                sl = Decimal(slopes[b][i])
                for j in range(M):
                    al = _EXACT.multiply(sl, Decimal(-abs(int(rel[i, j]))))
                    prior[b][i][j] = _EXACT.add(prior[b][i][j], al)
    return prior


def tanh_from_signed_gaussian(z, m=1.0, sigma=1.0):
    """S4, exactly: ``E[s | z] = r_+ - r_-`` under ``d_s(z) = (z - s m)^2 / (2 sigma^2)``.

    Twin of :func:`iem_ref.tanh_from_signed_gaussian`; equals
    ``tanh(m z / sigma^2)``.  The squared distances are exact; ``1/(2 sigma^2)``
    acts as the inverse temperature.

    Examples
    --------
    >>> float(tanh_from_signed_gaussian(1e-300))  # r_+ - r_- cancels; the loop raises the precision
    1e-300
    """
    z = as_float_array(z, "z")
    if not 0 < float(sigma) < math.inf:  # also refuses NaN, as the reference does
        raise ValueError(f"sigma must be finite and > 0 (the kernel width); got {sigma!r}")
    if not math.isfinite(float(m)):
        raise ValueError(f"m must be finite (the exact tier has no limit for an infinite kernel centre); got {m!r}")
    m_d, s_d = _dec(float(m)), _dec(float(sigma))
    zs = [Decimal(x) for x in z.astype(np.float64).reshape(-1).tolist()]
    energies = []
    for x in zs:
        dp = _EXACT.subtract(x, m_d)
        dm = _EXACT.add(x, m_d)
        energies.append([_EXACT.multiply(dp, dp), _EXACT.multiply(dm, dm)])  # [d_+, d_-] * 2 sigma^2
    two_s2 = _EXACT.multiply(2, _EXACT.multiply(s_d, s_d))

    def compute(C, delta):
        C.clear_flags()
        beta = C.divide(_ONE, two_s2)
        beta_rel = delta if C.flags[decimal.Inexact] else _ZERO
        A, eA = [], []
        for dd in energies:
            row = _softmin_row(dd, [True, True], beta, beta_rel, C, delta)
            if row.kind == "nan":
                A.append(_NAN)
                eA.append(_ZERO)
                continue
            a = C.subtract(row.r[0], row.r[1])  # S3 with SIGNS = (+1, -1)
            A.append(a)
            eA.append(row.er[0] + row.er[1] + delta * abs(a))
        return [(A, eA)]

    (A,), _ = _ziv(compute)
    return _object_array(A, z.shape)


def softplus(z, tau=1.0):
    """H3, exactly: ``softplus_tau(z) = tau log(1 + exp(z / tau)) = -F({0, -z})``, correctly rounded.

    Twin of :func:`iem_ref.softplus` (``tau = inf`` gives ``inf``; ``z = -inf``
    gives 0, ``z = +inf`` gives ``inf``).

    Examples
    --------
    >>> float(softplus(-745.0))  # exp(-745): the smallest subnormal region
    5e-324
    """
    z = as_float_array(z, "z")
    tau = check_tau(tau)
    zs = [Decimal(x) for x in z.astype(np.float64).reshape(-1).tolist()]
    tau_d = None if math.isinf(tau) else _dec(tau)

    def compute(C, delta):
        beta, beta_rel = _beta_from_tau(tau, C, delta)
        A, eA = [], []
        for x in zs:
            row = _softmin_row([_ZERO, x.copy_negate()], [True, True], beta, beta_rel, C, delta, want_r=False)
            if row.kind != "finite" or not row.L.is_finite():
                A.append(row.L)
                eA.append(_ZERO)
            elif tau_d is None:  # -F at tau = inf: +inf with two finite hypotheses, the lone energy with one
                A.append(_INF if row.n == 2 else _ZERO)
                eA.append(_ZERO)
            else:
                a = C.multiply(tau_d, row.L)
                A.append(a)
                eA.append(tau_d * row.eL + delta * abs(a))
        return [(A, eA)]

    (A,), _ = _ziv(compute)
    return _object_array(A, z.shape)
