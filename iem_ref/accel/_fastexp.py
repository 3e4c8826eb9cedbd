"""A vectorisable polynomial ``exp`` for the fused kernels (float64 and float32).

Why: inside ``@njit`` loops ``math.exp`` is a scalar libm call (no SVML
here), about as costly as the two GEMMs of attention at ``D = 64``.  This
``exp`` is branch-free arithmetic (range reduction, a polynomial, an exponent
built from integer bits), so LLVM vectorises the loops that call it.

Method, for ``y = exp(x)``::

    n = round(x / ln 2)                 (shifter trick: x*log2(e) + 1.5*2**52)
    r = x - n ln2_hi - n ln2_lo         (Cody-Waite; n ln2_hi is exact)
    exp(r) ~ p(r), |r| <= ln(2)/2       (interpolant at Chebyshev nodes;
                                         Horner at the bottom, Estrin above)
    y = p(r) * 2**n1 * 2**n2,  n1 = n >> 1, n2 = n - n1

Two scale factors keep both in the normal range, so results in the
subnormal range come out gradually (rounded twice) instead of flushed.

Accuracy (tested in ``tests/test_cpu_kernels.py``): float64 within 2 ulps of
``np.exp`` (itself within 1 ulp of the exact value in float64) on
``[-708, 709]`` (interpolation error 4e-18 relative, below 0.03 ulp; the rest
is the rounding of the last Horner steps); float32 within 2 ulps of the
correctly rounded value on ``[-87, 88]``.  Measured against the exact value:
float64 at most 1.016 ulps, the largest error found over 3.8e9 random and
targeted arguments in ``[-708.4, 709.8]`` (against ``np.exp`` in 80-bit
``longdouble``; worst at ``x = 674.0976682363154``, confirmed with mpmath),
and never more than 1 ulp from ``np.exp`` there; float32 at most 1.105 ulps,
every float32 argument in ``[-87.34, 88.72]`` checked against float64
``exp`` (worst at ``x = 59.265549``).  Special values: ``-inf -> 0``, ``NaN -> NaN``,
``+inf -> inf``; arguments below ``-746`` (float32: ``-104``) give 0, above
``710`` (``89``) give inf.

No ``fastmath=True`` here: it folds the shifter trick away (measured: 41%
relative error) and breaks NaN tests.  ``fastmath={"contract"}`` (FMA
contraction) is safe and used.

Examples
--------
>>> import numpy as np
>>> from iem_ref.accel._fastexp import exp_array
>>> x = np.array([0.0, -1.0, -np.inf, np.nan])
>>> y = exp_array(x)
>>> bool(y[0] == 1.0), bool(abs(y[1] - np.exp(-1.0)) <= 2 * np.spacing(np.exp(-1.0))), float(y[2]), bool(np.isnan(y[3]))
(True, True, 0.0, True)
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ._compile import INNER

__all__ = ["exp64", "exp32", "exp64_shifted", "exp32_shifted", "exp_array", "exp_shifted_array", "fexp", "fexp_shifted", "like", "interpolation_coefficients", "C64", "C32"]


# --- bit casts (LLVM bitcast: free, and vectorisable) -----------------------
def _bitcast(src, dst):
    """An intrinsic reinterpreting the bits of ``src`` as ``dst`` (an integer argument is first cast to ``src``)."""

    @intrinsic
    def cast(typingctx, x):
        if isinstance(src, types.Integer) and isinstance(x, types.Integer):
            sig = dst(x)
        elif x == src:
            sig = dst(src)
        else:
            return None

        def codegen(context, builder, signature, args):
            val = context.cast(builder, args[0], signature.args[0], src)
            return builder.bitcast(val, context.get_value_type(dst))

        return sig, codegen

    return cast


f64_bits = _bitcast(types.float64, types.int64)
bits_f64 = _bitcast(types.int64, types.float64)
f32_bits = _bitcast(types.float32, types.int32)
bits_f32 = _bitcast(types.int32, types.float32)


# --- polynomial coefficients -------------------------------------------------
def interpolation_coefficients(degree, half_width, digits=60):
    """Monomial coefficients of the polynomial interpolating ``exp`` at ``degree + 1`` Chebyshev nodes of ``[-h, h]``.

    Exact rational arithmetic (``fractions``) on ``exp`` values from
    ``decimal`` at ``digits`` significant digits, then rounded once to
    float64.  The interpolation error on ``[-h, h]`` is at most
    ``2 (h/2)**(n+1) / (n+1)! * e**h`` (``n`` the degree): for ``h = ln(2)/2``
    about ``4e-18`` at ``n = 11`` and ``3e-9`` at ``n = 6``.

    Examples
    --------
    >>> c = interpolation_coefficients(3, 0.25)  # near 1, 1, 1/2, 1/6 (Taylor), not equal
    >>> [round(x, 3) for x in c]
    [1.0, 1.0, 0.503, 0.167]
    """
    n = degree + 1
    h = Fraction(half_width)
    with localcontext() as ctx:
        ctx.prec = digits
        nodes = [Fraction(math.cos((2 * k + 1) * math.pi / (2 * n))) * h for k in range(n)]
        ys = [Fraction((Decimal(x.numerator) / Decimal(x.denominator)).exp()) for x in nodes]
    rows = [[x**j for j in range(n)] + [y] for x, y in zip(nodes, ys)]
    for c in range(n):  # Gauss-Jordan, exact
        p = max(range(c, n), key=lambda r: abs(rows[r][c]))
        rows[c], rows[p] = rows[p], rows[c]
        for r in range(n):
            if r != c and rows[r][c] != 0:
                f = rows[r][c] / rows[c][c]
                rows[r] = [a - f * b for a, b in zip(rows[r], rows[c])]
    return [float(rows[i][n] / rows[i][i]) for i in range(n)]


# |r| <= ln(2)/2 after the reduction; the interval is widened by 1e-6 for the
# rounding of n and r.  Regenerated and compared by tests/test_cpu_kernels.py.
_HALF_WIDTH = math.log(2.0) / 2.0 * (1.0 + 1e-6)
C64 = (
    1.0,
    1.0,
    0.5000000000000019,
    0.1666666666666668,
    0.04166666666648809,
    0.008333333333319601,
    0.0013888888952315155,
    0.00019841269890047406,
    2.480148548192088e-05,
    2.7557240918265525e-06,
    2.7632639789868395e-07,
    2.5110037721946562e-08,
)
C32 = (
    1.0,
    1.0000000377164404,
    0.5000000047118041,
    0.16666415513647304,
    0.04166635289551871,
    0.008375126481913865,
    0.0013941108538586106,
)

# float64 constants
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # 32 trailing zero bits: n * _LN2_HI is exact for |n| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_SHIFT = 6755399441055744.0  # 1.5 * 2**52: x + _SHIFT rounds x to an integer held in the low bits
_SHIFT_BITS = 0x4338000000000000
_XMIN, _XMAX = -746.0, 710.0
(_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7, _A8, _A9, _A10, _A11) = C64

# float32 constants (typed, so that no operation promotes to float64)
_f = np.float32
_LOG2E_F = _f(1.4426950408889634)
_LN2_HI_F = _f(0.693359375)  # 0x3f318000: n * _LN2_HI_F exact for |n| < 2**11
_LN2_LO_F = _f(-2.12194440e-4)
_SHIFT_F = _f(12582912.0)  # 1.5 * 2**23
_SHIFT_BITS_F = 0x4B400000
_XMIN_F, _XMAX_F = _f(-104.0), _f(89.0)
(_B0, _B1, _B2, _B3, _B4, _B5, _B6) = (_f(c) for c in C32)
_ONE_BIAS64 = 1023
_ONE_BIAS32 = 127


@njit(fastmath={"contract"}, **INNER)
def _poly64(r):
    """``sum_k A_k r**k`` (degree 11): two Horner steps at the bottom, Estrin's scheme above.

    Why not plain Horner: its 11 dependent FMAs (about 44 cycles) make the
    exp latency-bound; the vector loop then keeps too few iterations in
    flight (measured: 6.0 cycles per element, this form 5.1).  Why not
    Estrin all the way: the sums of the low terms then round more (measured
    1.75 ulps against 1.02); the last two Horner steps ``1 + r (1 + r h)``
    keep the final rounding that of Horner.
    """
    r2 = r * r
    r4 = r2 * r2
    h = ((_A2 + _A3 * r) + r2 * (_A4 + _A5 * r)) + r4 * (((_A6 + _A7 * r) + r2 * (_A8 + _A9 * r)) + r4 * (_A10 + _A11 * r))
    return _A0 + r * (_A1 + r * h)


@njit(fastmath={"contract"}, **INNER)
def _poly32(r):
    """``sum_k B_k r**k`` (degree 6, float32): as :func:`_poly64`, two Horner steps below an Estrin part."""
    r2 = r * r
    h = (_B2 + _B3 * r) + r2 * ((_B4 + _B5 * r) + r2 * _B6)
    return _B0 + r * (_B1 + r * h)


@njit(fastmath={"contract"}, **INNER)
def _reduced64(x):
    """``(p, n)`` with ``exp(x) ~ p * 2**n``: the reduction and polynomial shared by :func:`exp64` and :func:`exp64_shifted`."""
    t = x * _LOG2E + _SHIFT
    nf = t - _SHIFT  # round(x / ln 2), exactly
    r = (x - nf * _LN2_HI) - nf * _LN2_LO
    return _poly64(r), f64_bits(t) - _SHIFT_BITS  # n: the same integer, from the bits of t


@njit(fastmath={"contract"}, **INNER)
def _reduced32(x):
    """:func:`_reduced64` for float32 (typed constants: nothing promotes to float64)."""
    t = x * _LOG2E_F + _SHIFT_F
    nf = t - _SHIFT_F
    r = (x - nf * _LN2_HI_F) - nf * _LN2_LO_F
    return _poly32(r), f32_bits(t) - np.int32(_SHIFT_BITS_F)


@njit(fastmath={"contract"}, cache=True)
def exp64(x):
    """``exp(x)`` for a float64 scalar, within 2 ulps of ``np.exp`` (see the module docstring)."""
    # Clamp without losing NaN: a comparison with NaN is False, so NaN passes through.
    x = _XMIN if x < _XMIN else x
    x = _XMAX if x > _XMAX else x
    p, n = _reduced64(x)
    n1 = n >> 1
    n2 = n - n1
    return p * bits_f64((n1 + _ONE_BIAS64) << 52) * bits_f64((n2 + _ONE_BIAS64) << 52)


@njit(fastmath={"contract"}, cache=True)
def exp32(x):
    """``exp(x)`` for a float32 scalar, within 2 ulps of ``np.exp`` (see the module docstring)."""
    x = _XMIN_F if x < _XMIN_F else x
    x = _XMAX_F if x > _XMAX_F else x
    p, n = _reduced32(x)
    n1 = n >> np.int32(1)
    n2 = n - n1
    s1 = bits_f32((n1 + np.int32(_ONE_BIAS32)) << np.int32(23))
    s2 = bits_f32((n2 + np.int32(_ONE_BIAS32)) << np.int32(23))
    return p * s1 * s2


_FLUSH64 = -708.3964185322641  # log(2**-1022): below it exp is subnormal (< 2.3e-308)
_FLUSH32 = _f(-87.33654)  # log(2**-126) (float32)


@njit(fastmath={"contract"}, cache=True)
def exp64_shifted(x):
    """``exp(x)`` for the kernels' shifted exponents ``x = s - m <= 0`` (float64), NaN kept.

    The same reduction and polynomial as :func:`exp64`, so the same value
    wherever the result is a normal number (one exact scaling by ``2**n``
    instead of two); results that would be subnormal (``x < log(2**-1022)``,
    true value below ``2.3e-308``, far below ``u`` next to the row's largest
    weight 1) are flushed to 0, and ``-inf`` gives 0.  About 20% cheaper.

    No clamp before the reduction: below the flush point (``-inf``
    included) the arithmetic runs on a meaningless exponent and the final
    selection discards it; one select instead of a clamp and a select.
    """
    small = x < _FLUSH64
    p, n = _reduced64(x)
    y = p * bits_f64((n + _ONE_BIAS64) << 52)
    return 0.0 if small else y


@njit(fastmath={"contract"}, cache=True)
def exp32_shifted(x):
    """:func:`exp64_shifted` for float32: as :func:`exp32` on normal results, 0 below ``log(2**-126)``."""
    small = x < _FLUSH32
    p, n = _reduced32(x)
    y = p * bits_f32((n + np.int32(_ONE_BIAS32)) << np.int32(23))
    return np.float32(0.0) if small else y


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _exp_array64(x, out):
    for i in prange(x.size):
        out[i] = exp64(x[i])


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _exp_array32(x, out):
    for i in prange(x.size):
        out[i] = exp32(x[i])


def exp_array(x):
    """Elementwise polynomial ``exp`` of a float32/float64 array (parallel over elements).

    Examples
    --------
    >>> exp_array(np.zeros(3, np.float32)).dtype
    dtype('float32')
    """
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64; got {x.dtype}")
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    (_exp_array64 if x.dtype == np.float64 else _exp_array32)(flat, out)
    return out.reshape(x.shape)


# --- dtype-generic entry points for the kernels ------------------------------
def fexp(x):
    """``exp`` for a float32 or float64 scalar inside ``@njit`` code (:func:`exp32` / :func:`exp64`)."""
    raise NotImplementedError("fexp is only callable from @njit code")


@overload(fexp, fastmath={"contract"})
def _fexp_overload(x):
    if x == types.float64:
        return lambda x: exp64(x)
    if x == types.float32:
        return lambda x: exp32(x)
    return None


@intrinsic
def like(typingctx, value, sample):
    """``value`` converted to the float type of ``sample`` inside ``@njit`` code (typed constants: no promotion).

    An intrinsic, not an overload: an overload's implementation would be
    compiled through Numba's whole pipeline once per pair of types.
    """
    if not isinstance(sample, types.Float) or not isinstance(value, (types.Number, types.Boolean)):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], value, sample)

    return sample(value, sample), codegen


def fexp_shifted(x):
    """:func:`exp64_shifted` / :func:`exp32_shifted` by the argument's type, inside ``@njit`` code."""
    raise NotImplementedError("fexp_shifted is only callable from @njit code")


@overload(fexp_shifted, fastmath={"contract"})
def _fexp_shifted_overload(x):
    if x == types.float64:
        return lambda x: exp64_shifted(x)
    if x == types.float32:
        return lambda x: exp32_shifted(x)
    return None


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _shifted_array(x, out):
    for i in prange(x.size):
        out[i] = fexp_shifted(x[i])


def exp_shifted_array(x):
    """Elementwise :func:`exp64_shifted` / :func:`exp32_shifted` (the kernels' exp), for tests.

    Examples
    --------
    >>> exp_shifted_array(np.array([0.0, -800.0]))
    array([1., 0.])
    """
    x = np.ascontiguousarray(x)
    out = np.empty_like(x.reshape(-1))
    _shifted_array(x.reshape(-1), out)
    return out.reshape(x.shape)
