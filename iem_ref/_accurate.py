"""The careful arithmetic behind the softmin, kept in one place.

The equations (A3, G1, G3) call :func:`softmin_terms`, which returns every
quantity they need, computed so that the float64 results are accurate to a
few ulps (README, "Accuracy"):

- The shifted exponents ``e_j = -(d_j - m) / tau`` (``m`` the minimum
  energy) are carried as an unevaluated sum ``hi + lo``: ``d_j - m`` is split
  exactly by TwoSum, and the division by ``tau`` is corrected with an exact
  product (Dekker's TwoProduct).  This removes the error that the plain
  ``x_j - max`` subtraction makes (about ``|x_j - max| * u`` in the exponent,
  i.e. up to ~100 ulps for spreads of hundreds), the dominant error of
  scipy/torch/jax softmax (Blanchard, Higham & Higham 2021, sec. 3).
- The weights ``w_j = exp(hi_j) * (1 + lo_j)`` are summed by a pairwise
  TwoSum cascade whose error terms are accumulated separately, which makes
  the sum accurate to about half an ulp.
- The log-partition is formed as ``-m/tau + log1p(s)`` with ``s`` the sum
  of every weight except one at the minimum (BHH21, Algorithm 4.1): for a
  dominant term it returns ``s`` itself instead of rounding ``1 + s``.

Error budget (float64; tested against the exact tier in tests/test_accuracy.py
and tests/test_properties.py, measured in bench/accuracy.py): ``r_j``
within 3 ulps componentwise (worst measured 2.1, scipy/torch/jax ~127 on
N(0, 30) logits); ``L`` within ``3 u (|m/tau| + |L| + 1)`` (bounds section
4; about ``2 + kappa`` ulps); the exact sum of the
returned ``r_j`` within ``2u + (log2 M)^2 u^2 + O(u^2)`` of 1: the weights'
own errors cancel in ``w_j / S``, leaving the rounding of ``S`` and of the
``M`` quotients, each up to ``u``.

The posterior mean ``sum_j r_j g_j`` (A4, and every weighted sum of the
gradients and variants) goes through :func:`weighted_sum`: one matmul over
the finite values, the non-finite ones added only where their hypothesis
takes part, so a NaN in a masked value never leaks.

Extreme ranges: a ``d_j - m`` that overflows has weight 0 (its TwoSum
error term, ``inf - inf``, is discarded); for ``tau`` above ``2**900`` or
below ``2**-800`` TwoProduct works on operands rescaled by ``2**600`` so that
Veltkamp's split neither overflows nor underflows.

Edge cases follow the project policy: a hypothesis that does not take part
(masked, or energy ``+inf``) has weight 0; energies ``-inf`` share all the
mass; a NaN in a participating energy makes its row NaN; a row with no
participating hypothesis is "empty".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SPLITTER = 134217729.0  # 2**27 + 1, Veltkamp's constant for float64
_SPLIT_SAFE = 1e290  # beyond this the split would overflow; exp underflows there anyway


def two_sum(a, b):
    """Error-free sum: ``a + b == s + e`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _split(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a, b):
    """Error-free product: ``a * b == p + e`` exactly (Dekker), for |a|,|b| < 1e290."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def accurate_sum(w):
    """Sum over the last axis to about 0.5 ulp: a pairwise TwoSum cascade.

    Every pairwise addition keeps its rounding error; the errors are summed
    alongside (they are ~u times smaller, so their own rounding does not
    matter) and added back once at the end.
    """
    s = np.asarray(w, dtype=np.float64)
    err = np.zeros_like(s)
    if s.shape[-1] == 0:
        return np.zeros(s.shape[:-1])
    while s.shape[-1] > 1:
        if s.shape[-1] % 2:
            pad = [(0, 0)] * (s.ndim - 1) + [(0, 1)]
            s = np.pad(s, pad)
            err = np.pad(err, pad)
        s, e = two_sum(s[..., 0::2], s[..., 1::2])
        err = err[..., 0::2] + err[..., 1::2] + e
    return s[..., 0] + err[..., 0]


_BIG = 2.0**600  # exact rescaling that keeps Dekker's split away from overflow and underflow


def _divide_with_remainder(s, t, tau):
    """``(s + t) / tau = q + c`` with ``q = fl(s / tau)`` and ``c`` the (rounded) remainder.

    ``s - q tau`` is exact by TwoProduct; for ``tau > 2**900`` the product is
    formed as ``(q 2**600) (tau 2**-600)`` and for ``tau < 2**-800`` everything
    is multiplied by ``2**600`` first, so that the split neither overflows nor
    loses bits to underflow (powers of two rescale exactly).
    """
    q = s / tau
    ok = np.isfinite(q) & (np.abs(q) < _SPLIT_SAFE)
    qs = np.where(ok, q, 0.0)
    s_ok = np.where(ok, s, 0.0)
    if tau > 2.0**900:
        p, pe = two_prod(qs * _BIG, tau / _BIG)
        c = (((s_ok - p) - pe) + t) / tau
    elif tau < 2.0**-800:
        big_tau = tau * _BIG
        p, pe = two_prod(qs, big_tau)
        c = (((s_ok * _BIG - p) - pe) + t * _BIG) / big_tau
    else:
        p, pe = two_prod(qs, tau)
        c = (((s_ok - p) - pe) + t) / tau
    c = np.where(ok & np.isfinite(c), c, 0.0)
    return q, c


@dataclass
class SoftminTerms:
    """Everything A3, G1 and G3 need, for energies with hypotheses on the last axis.

    Attributes (row shape ``R = d.shape[:-1]``, energy shape ``R + (M,)``):
      m      (R)      minimum participating energy (+inf for an empty row, -inf
                      when some energy is -inf, NaN for a NaN row)
      hi, lo (R, M)   shifted exponent ``-(d_j - m)/tau = hi + lo`` (-inf, 0 where
                      the hypothesis does not take part; 0 for the -inf energies
                      of a certain row)
      w      (R, M)   weights ``exp(hi) * (1 + lo)`` (in [0, 1])
      total  (R)      ``sum_j w_j`` to ~0.5 ulp
      rest   (R)      ``total`` without one weight at the minimum (the ``s`` of log1p)
      empty, nan_row, certain (R) bool row classes
    """

    m: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    w: np.ndarray
    total: np.ndarray
    rest: np.ndarray
    empty: np.ndarray
    nan_row: np.ndarray
    certain: np.ndarray


def softmin_terms(d, tau, take):
    """Compute :class:`SoftminTerms` for float64 energies ``d`` (hypotheses last).

    ``take`` is a boolean array of ``d``'s shape (True = unmasked) or None.
    """
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(all="ignore"):
        part = ~np.isposinf(d)
        if take is not None:
            part &= take
        # Masked hypotheses are removed by selection, so their values cannot leak.
        d_eff = np.where(part, d, np.inf)
        nan_row = np.isnan(d_eff).any(axis=-1)
        d_num = np.where(np.isnan(d_eff), np.inf, d_eff)
        m = d_num.min(axis=-1, initial=np.inf)
        empty = np.isposinf(m) & ~nan_row
        certain = np.isneginf(m) & ~nan_row
        finite_m = np.isfinite(m)
        m_safe = np.where(finite_m, m, 0.0)[..., None]

        # d_j - m exactly as s + t (TwoSum), then divided by tau with its remainder.
        s, t = two_sum(d_num, -m_safe)
        t = np.where(np.isfinite(s), t, 0.0)  # d_j - m overflowed: its weight is 0 anyway
        if tau == 1.0:
            q, c = s, t
        elif np.isinf(tau):
            q, c = np.zeros_like(s), np.zeros_like(s)
        else:
            q, c = _divide_with_remainder(s, t, tau)
        hi, lo = -q, -c
        valid = part & np.isfinite(d_num) & finite_m[..., None]
        hi = np.where(valid, hi, -np.inf)
        lo = np.where(valid, lo, 0.0)
        # A row with -inf energies: those hypotheses are certain and share the mass.
        is_certain = certain[..., None] & np.isneginf(d_num)
        hi = np.where(is_certain, 0.0, hi)

        ex = np.exp(hi)
        w = ex + ex * lo
        total = accurate_sum(w)
        winner = np.argmin(np.where(np.isfinite(hi), -hi, np.inf), axis=-1) if d.shape[-1] else None
        if winner is None:
            rest = total
        else:
            w_rest = w.copy()
            np.put_along_axis(w_rest, winner[..., None], 0.0, axis=-1)
            rest = accurate_sum(w_rest)
    return SoftminTerms(m=m, hi=hi, lo=lo, w=w, total=total, rest=rest, empty=empty, nan_row=nan_row, certain=certain)


def weighted_sum(r, g, take, limit=False):
    """``sum_j r_j g_j`` over participating ``j`` only (float64, ``r @ g`` shapes).

    The finite values go through one matmul; the rare non-finite values are
    added separately, and only where the hypothesis takes part, so a NaN in a
    masked value cannot leak.  ``limit``: ``r`` are computed responsibilities
    whose exact values are positive where they take part, so a weight that is
    0 in floating point (underflow, or a finite energy beside ``-inf`` ones)
    lets an infinite value through as itself instead of ``0 * inf = NaN``.
    """
    one_row = r.ndim == 1
    vector = g.ndim >= 2
    if one_row:
        r = r[None, :]
        take = None if take is None else take[None, :]
    if not vector:
        g = g[:, None]
    finite = np.isfinite(g)
    out = r @ np.where(finite, g, 0.0)  # (..., N, Dv)
    if not finite.all():
        other_axes = tuple(i for i in range(g.ndim) if i != g.ndim - 2)
        bad = np.nonzero(~finite.all(axis=other_axes))[0]  # hypotheses with a non-finite value
        g_bad = np.where(finite, 0.0, g)[..., bad, :]  # (..., J, Dv)
        with np.errstate(invalid="ignore"):
            terms = r[..., bad][..., None] * g_bad[..., None, :, :]  # (..., N, J, Dv)
        if limit:
            terms = np.where(r[..., bad][..., None] == 0, g_bad[..., None, :, :], terms)
        if take is not None:
            terms = np.where(take[..., bad][..., None], terms, 0.0)
        out = out + terms.sum(axis=-2)
    if not vector:
        out = out[..., 0]
    return out[0] if one_row else out
