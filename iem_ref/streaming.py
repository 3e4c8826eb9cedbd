"""Streaming: partial posteriors over key blocks and their exact merge (M1, M2).

A block ``B`` of hypotheses is summarised by ``(m_B, l_B, o_B)`` (M1); two
summaries merge associatively and commutatively (M2), and the merged summary
finalises to the same output and log-partition as one pass over all keys.
This is the online softmin behind the fused kernels, split-K and chunked or
distributed evaluation.

Shape legend: ``d (..., N, Mb)`` energies of one block, ``v (..., Mb, Dv)``
its values; a partial holds ``m, l (..., N)`` and ``o (..., N, Dv)``.  All
partials are float64.

Edge cases: an empty block (no participating key) is ``(+inf, 0, 0)``, the
identity of the merge; a block holding energies ``-inf`` has ``m = -inf``
and counts them in ``l``; a NaN row has ``m = l = NaN``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validation import as_float_array, as_mask, check_choice, check_tau, need_ndim
from ._accurate import weighted_sum

__all__ = ["Partial", "partial_posterior", "merge_partials", "finalize_partial"]


class Partial(NamedTuple):
    """M1: sufficient statistics of one key block (float64)."""

    m: np.ndarray  #: (..., N) minimum participating energy
    l: np.ndarray  #: (..., N) sum_B exp(-(d_j - m)/tau)
    o: np.ndarray  #: (..., N, Dv) sum_B exp(-(d_j - m)/tau) v_j
    tau: float


def _block_weights(d, m, tau):
    """``exp(-(d_j - m)/tau)``, with ``exp(-(m - m)) = 1`` also when ``m = -inf``.

    An infinite gap stays infinite at ``tau = inf`` (weight 0): beside a
    ``-inf`` energy a finite one has no mass at any temperature, as the
    policy says (``inf / inf`` would make it NaN).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        gap = d - m[..., None]
        t = np.where(np.isposinf(gap), np.inf, gap / tau)
        return np.where(d == m[..., None], 1.0, np.exp(-t))


def partial_posterior(d, v, tau=1.0, *, mask=None):
    """M1: the partial posterior ``(m_B, l_B, o_B)`` of one block of keys.

    ``m_B = min_j d_j``, ``l_B = sum_j exp(-(d_j - m_B)/tau)``,
    ``o_B = sum_j exp(-(d_j - m_B)/tau) v_j`` over the participating keys.

    Examples
    --------
    >>> p = partial_posterior([[1.0, 1.0]], [[2.0], [4.0]])
    >>> p.m, p.l, p.o
    (array([1.]), array([2.]), array([[6.]]))
    """
    d = as_float_array(d, "d").astype(np.float64)
    v = as_float_array(v, "v").astype(np.float64)
    need_ndim(d, "d", 2, "(..., N, Mb)")
    need_ndim(v, "v", 2, "(..., Mb, Dv)")
    if d.shape[-1] != v.shape[-2]:
        raise ValueError(f"d (..., N, Mb) and v (..., Mb, Dv) disagree on Mb: d has shape {d.shape}, v has shape {v.shape}")
    tau = check_tau(tau)
    take = as_mask(mask, d.shape, "mask")
    participates = ~np.isposinf(d) if take is None else take & ~np.isposinf(d)
    d = np.where(participates, d, np.inf)  # selection: masked energies are never read

    m = d.min(axis=-1, initial=np.inf)
    w = np.where(participates, _block_weights(d, m, tau), 0.0)
    l = w.sum(axis=-1)
    o = weighted_sum(w, v, participates)
    return Partial(m, l, o, tau)


def merge_partials(p1, p2):
    """M2: merge two partials: ``m = min(m_1, m_2)``, ``l = l_1 e^{-(m_1-m)/tau} + l_2 e^{-(m_2-m)/tau}``, ``o`` likewise.

    Associative and commutative (up to rounding), with the empty partial
    ``(+inf, 0, 0)`` as identity.

    Examples
    --------
    >>> a = partial_posterior([[0.0]], [[1.0]]); b = partial_posterior([[0.0]], [[3.0]])
    >>> finalize_partial(merge_partials(a, b))[0]
    array([[2.]])
    """
    if p1.tau != p2.tau:
        raise ValueError(f"partials must share tau to merge; got {p1.tau} and {p2.tau}")
    m = np.minimum(p1.m, p2.m)
    c1 = _block_weights(p1.m[..., None], m, p1.tau)[..., 0]
    c2 = _block_weights(p2.m[..., None], m, p2.tau)[..., 0]
    l = p1.l * c1 + p2.l * c2
    o = p1.o * c1[..., None] + p2.o * c2[..., None]
    return Partial(m, l, o, p1.tau)


def finalize_partial(p, *, empty="zero"):
    """M2 (result): ``a = o / l`` and ``L = -m/tau + log l``.

    An empty partial (``l = 0``) gives ``a = 0`` (or NaN with ``empty="nan"``)
    and ``L = -inf``.

    Examples
    --------
    >>> finalize_partial(partial_posterior([[0.0, 0.0]], [[1.0], [3.0]]))
    (array([[2.]]), array([0.69314718]))
    """
    check_choice(empty, "empty", {"zero", "nan"})
    with np.errstate(divide="ignore", invalid="ignore"):
        a = p.o / p.l[..., None]
        L = -np.where(np.isfinite(p.m), p.m, 0.0) / p.tau + np.log(p.l)
    is_empty = p.l == 0
    a = np.where(is_empty[..., None], 0.0 if empty == "zero" else np.nan, a)
    L = np.where(np.isneginf(p.m), np.inf, L)
    L = np.where(np.isnan(p.m), np.nan, L)
    return a, L
