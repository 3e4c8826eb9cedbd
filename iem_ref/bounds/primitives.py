"""Error-bound primitives: unit roundoff, ``gamma_n``, sums and trees, gradual underflow (sections 1-3b).

1. Unit roundoff
----------------
``u = eps / 2`` of a dtype (:func:`unit_roundoff`): ``2**-24`` for float32,
``2**-53`` for float64 (``U32``, ``U64``).  A correctly rounded operation
returns ``x (1 + delta)``, ``|delta| <= u``.  A result within ``k`` ulps of
a normal value ``y`` is within ``2 k u |y|``: an ulp of ``y`` is at most
``2 u |y|`` (:func:`ulps`).

2. gamma_n
----------
``gamma_n = n u / (1 - n u)`` (:func:`gamma`; Higham, *Accuracy and
Stability of Numerical Algorithms*, Lemma 3.1): a product of ``n`` factors
``(1 + delta_k)^(+-1)``, ``|delta_k| <= u``, is ``1 + theta`` with
``|theta| <= gamma_n``.  So a value that passes through ``n`` roundings is
within ``gamma_n`` relative; roundings in two precisions add
(``gamma_n(u) + gamma_k(u64)``).

3. Sums and dot products
------------------------
In any summation order each of ``n`` terms passes through at most ``n - 1``
additions (the depth of a leaf in any binary tree of ``n`` leaves; an
addition of an exact zero does not round): ``|s^ - s| <= gamma_{n-1} sum
|t_j|``.  A dot product of length ``n`` rounds each product once more:
``gamma_n sum |x_j y_j|`` (BLAS GEMM/GEMV included, whatever their blocking;
a fused multiply-add only removes roundings).  A pairwise (tree) sum has
depth ``ceil(log2 n)`` (:func:`tree_depth`, the ``lg`` of
:mod:`iem_ref.testing`); the squared magnitudes its roundings multiply, for
the probabilistic bounds of section 13, add to at most
:func:`tree_squares`.

3b. Gradual underflow
--------------------
The relative model above holds for normal results.  A result in the
subnormal range is rounded to a multiple of ``eta``, the dtype's smallest
subnormal (``2**-149`` in float32, ``2**-1074`` in float64), so each
rounding may add ``eta / 2`` absolute besides its relative ``u``
(Higham, section 2.1).  The forward (section 9) forms each output through
at most ``M + D + 8`` roundings whose factors are at most ``(1 + scale)
(1 + max |x|) (1 + max |v|)`` (``x`` the scores): ``n eta F`` per side.
The backward forms each gradient element through a
chain of at most ``M + N g + D + Dv + 8`` roundings (the exponential, the
two dot products, the tile sums, the final scale and store) whose factors
are at most ``F = (1 + scale) prod (1 + max |x|)`` over ``q, k, v`` and the
upstream gradient; :func:`underflow` adds ``n eta F`` per side to every
gradient bound.  Negligible next to every relative term unless the
gradient itself is subnormal (far keys under ALiBi, say, whose weights
underflow in float32).
"""

from __future__ import annotations

import numpy as np


#: float32 / float64 unit roundoff (section 1)
U32 = float(np.finfo(np.float32).eps) / 2
U64 = float(np.finfo(np.float64).eps) / 2
#: the reference's responsibilities are within this many float64 ulps (section 4)
REFERENCE_R_ULPS = 3


def unit_roundoff(dtype):
    """``u = eps / 2`` of a float dtype (section 1).

    Examples
    --------
    >>> unit_roundoff(np.float32)
    5.960464477539063e-08
    """
    from ..precision import unit_roundoff as low

    return low(dtype)


def gamma(n, u):
    """``gamma_n = n u / (1 - n u)``: the relative error of ``n`` roundings of unit roundoff ``u`` (section 2).

    ``n`` may be an array (non-negative); ``n u >= 1`` has no bound and raises.

    Examples
    --------
    >>> float(gamma(0, 2.0**-24)), float(gamma(2, 0.25))
    (0.0, 1.0)
    """
    n = np.asarray(n, dtype=np.float64)
    u = float(u)
    if np.any(n < 0):
        raise ValueError(f"gamma_n needs n >= 0; got {n}")
    nu = n * u
    if np.any(nu >= 1):
        raise ValueError(f"gamma_n is defined for n u < 1 only; got n u = {np.max(nu)}")
    out = nu / (1 - nu)
    return out[()] if out.ndim == 0 else out


def underflow(dtype, roundings, factor):
    """Section 3b: the absolute error ``roundings * eta * factor`` that gradual underflow may add (``eta`` the dtype's smallest subnormal).

    Examples
    --------
    >>> float(underflow(np.float32, 10, 2.0)) == 20 * 2.0**-149
    True
    """
    return float(roundings) * float(np.finfo(np.dtype(dtype)).smallest_subnormal) * float(factor)


def ulps(k, u):
    """The relative error of a normal result within ``k`` ulps: ``2 k u`` (an ulp of ``y`` is at most ``2 u |y|``).

    Examples
    --------
    >>> ulps(3, U64) == 6 * U64
    True
    """
    return 2.0 * k * float(u)


def log_partition_error(L, shift):
    """Section 4: the float64 reference's ``|L^ - L|`` for ``L = -m/tau + log1p(s)``, ``|m/tau| <= shift``.

    ``3 u64 (shift + |L| + 1)`` (the division, ``log1p``'s ulp, the sum ``s``, the addition).

    Examples
    --------
    >>> bool(log_partition_error(0.0, 1.0) == 6 * U64)
    True
    """
    return 3.0 * U64 * (np.abs(shift) + np.abs(L) + 1.0)


def tree_depth(n):
    """``ceil(log2 n)`` (0 for ``n <= 1``): the roundings of one term in a pairwise sum of ``n`` terms (section 3).

    Examples
    --------
    >>> [tree_depth(n) for n in (0, 1, 2, 3, 8, 9)]
    [0, 0, 1, 2, 3, 4]
    """
    n = int(n)
    return (n - 1).bit_length() if n > 1 else 0


def tree_squares(S, Q, n, total=None):
    """``sum_l min(S^2, 2^l Q)`` over the ``tree_depth(n) + 1`` levels of a pairwise sum (section 3).

    The probabilistic bounds need, for a sum of ``n`` terms ``y_c`` in a tree
    of depth ``lg = tree_depth(n)``, the sum of the squared magnitudes that
    its roundings multiply: the terms themselves (level 0, ``Q = sum y_c^2``)
    and the partial sums of each level ``l``.  The nodes of a level are
    disjoint and hold at most ``2^l`` terms, so by Cauchy-Schwarz their
    squared sums add to at most ``min(S^2, 2^l Q)`` (``S = sum |y_c|``): any
    tree of that depth, any order inside it.  The last level is the sum
    itself: given its magnitude ``total``, it counts ``total^2``.  ``S``,
    ``Q`` and ``total`` broadcast.

    Examples
    --------
    >>> float(tree_squares(8.0, 8.0, 8))  # eight ones: 8 + 16 + 32 + 64
    120.0
    >>> float(tree_squares(8.0, 8.0, 8, total=0.0))  # four ones and four minus ones
    56.0
    """
    S2 = np.asarray(S, np.float64) ** 2
    Q = np.asarray(Q, np.float64)
    lg = tree_depth(n)
    last = np.minimum(S2, 2.0**lg * Q) if total is None else np.square(np.asarray(total, np.float64))
    return sum((np.minimum(S2, 2.0**level * Q) for level in range(lg)), last)


def scale_rounding(u):
    """``u_scale``: the paths' scale against the reference's ``1/tau`` (section 5): ``u64``, plus ``u`` below float64.

    Examples
    --------
    >>> scale_rounding(U64) == U64, scale_rounding(U32) == U32 + U64
    (True, True)
    """
    u = float(u)
    return U64 + (u if u > U64 else 0.0)


def _store(u, u_state):
    """The rounding of a result formed in the state precision to the dtype (0 when they are the same)."""
    return float(u) if u_state < u else 0.0


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def _weighted(r, err):
    """``r * err`` where ``r > 0``, else 0: a pair of zero weight adds no error, even where ``err`` overflowed to inf."""
    with np.errstate(invalid="ignore"):
        return np.where(r > 0, r * err, 0.0)
