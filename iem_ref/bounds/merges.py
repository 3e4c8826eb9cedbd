"""Merges of partials (M2): what a tree or a chain of merges adds to a forward bound.
"""

from __future__ import annotations

import numpy as np

from .primitives import U64, gamma, ulps


def merge_bounds(levels, P, W, V, A, *, shift=0.0, exp_ulps=1):
    """What ``levels`` M2 merge levels add to a forward bound: ``(da (..., N, Dv), dL (..., N))``.

    Partials ``(m_c, l_c, o_c)`` of key blocks, merged in float64 by M2
    (:func:`iem_ref.streaming.merge_partials`) in a tree (``levels =
    tree_depth(C)`` for ``C`` blocks) or a chain (``C - 1``), against the
    exact merge of the same partials.  Per level, a partial's ``l`` and
    ``o`` are multiplied by one rescale factor ``exp(-(m_c - m)/tau)`` (``1``,
    exact, for the block holding the minimum) and added to the other's:

    * the factor: ``exp`` within ``p = exp_ulps`` ulps of float64 (``np.exp``,
      1 ulp, as :mod:`iem_ref.accel._fastexp` measures it), the same float
      for ``l`` and ``o``: a consistent perturbation of that block's weights
      (section 7); its argument, a subtraction and a division by ``tau``,
      rounds twice per level, and along the levels a block passes these
      arguments telescope to ``|m_c - m|/tau <= |x_j - max x|`` for every key
      ``j`` of the block (section 6): ``delta <= 2 levels p u64 + 2 u64
      shift``, ``shift = max_j |x_j - max x|`` over the participating keys
      (pass 0 where section 6's shift term already counts the arguments, as
      for the CPU path, whose merges extend its tiles' running maximum);
    * the product and the addition: two roundings per level of each term of
      ``l`` and ``o``: ``gamma_{2 levels}(u64)`` (section 8).

    So, as section 9, ``|a^ - a| <= delta min(V/2, W) + gamma_{2 levels}(u64)
    (P + |a|)`` (different blocks' perturbations, each within ``delta``,
    move ``a`` by at most ``delta`` times the mass moved across the mean,
    ``rho (1 - rho) |a_P - a_rest| <= min(V/2, W)``) and
    ``|log l^ - log l| <= delta + gamma_{2 levels}(u64)``.  The finish
    (``a = o / l``, ``L = -m/tau + log l``, the output rounding) is the
    forward's own (section 9's ``out`` and ``log`` terms).  ``P, W, V, A``:
    section 9's ``sum_j r_j |v_j|``, ``sum_j r_j |v_j - a|``, ``max_j |v_j|``
    and ``|a|``; ``shift`` broadcasts to the rows ``(..., N)``.

    Examples
    --------
    >>> da, dL = merge_bounds(3, np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)))
    >>> bool(da[0, 0] == 6 * U64 * 0.5 + gamma(6, U64) * 2), bool(dL[0] == 6 * U64 + gamma(6, U64))
    (True, True)
    """
    levels = int(levels)
    if levels < 0:
        raise ValueError(f"levels must be >= 0; got {levels}")
    delta = levels * ulps(exp_ulps, U64) + 2 * U64 * np.asarray(shift, np.float64)
    G = gamma(2 * levels, U64)
    P, W, V, A = (np.asarray(z, np.float64) for z in (P, W, V, A))
    da = np.asarray(delta)[..., None] * np.minimum(0.5 * V, W) + G * (P + A)
    dL = delta + G + np.zeros(da.shape[:-1])
    return da, dL
