"""Summaries: posterior statistics of the responsibilities (the note's spectrum).

Equations A4 and P1-P4, and the fused "softmin summary" (energies ->
responsibilities -> posterior mean, with the log-partition) that the
accelerated paths implement.

Shape legend: ``r (..., N, K)`` responsibilities (hypotheses last), ``g``
the statistic attached to each hypothesis, either ``(K,)`` (a scalar per
hypothesis, e.g. the signs of S) or ``(..., K, Dv)`` (a vector per hypothesis,
e.g. attention's values).  ``r @ g`` semantics: the result is ``(..., N)`` or
``(..., N, Dv)``.

Hypotheses that do not take part (``mask`` False) contribute nothing, even if
their statistic is NaN or inf: masks select, they never multiply.  A NaN or
inf statistic of a participating hypothesis propagates to the rows that see
it, and only to them.
"""

from __future__ import annotations

import numpy as np

from ._accurate import softmin_terms, weighted_sum
from ._validation import as_float_array, as_mask, check_summary_inputs, check_tau, need_ndim, result_dtype, to_dtype
from .competition import _log_partition_rows, _responsibility_rows, hard_responsibilities
from .variants import dropout_mean

__all__ = [
    "posterior_mean",
    "posterior_mode",
    "posterior_variance",
    "posterior_entropy",
    "softmin_summary",
]


def _check_r_g(r, g):
    r = as_float_array(r, "r")
    g = as_float_array(g, "g")
    need_ndim(r, "r", 1, "(..., K)")
    K = r.shape[-1]
    if g.ndim == 0 or g.shape[-2 if g.ndim >= 2 else -1] != K:
        raise ValueError(
            f"g must have shape (K,) or (..., K, Dv) with K = {K} hypotheses (r has shape {r.shape}); got {g.shape}"
        )
    return r, g


def posterior_mean(r, g, *, mask=None):
    """A4 / P2: the posterior mean ``a = sum_j r_j g_j``.

    Attention's output (``g = v``), tanh (``g = s``), a mixture mean (``g = mu``).

    Parameters
    ----------
    r : array_like, float (..., K)
        Responsibilities.
    g : array_like, float (K,) or (..., K, Dv)
        Statistic per hypothesis.
    mask : array_like of bool, optional, broadcast to ``r``'s shape
        True = takes part; other hypotheses contribute nothing.

    Returns
    -------
    a : ndarray, (...) or (..., Dv)

    Examples
    --------
    >>> float(posterior_mean([0.75, 0.25], [1.0, -1.0]))
    0.5
    """
    r, g = _check_r_g(r, g)
    take = as_mask(mask, r.shape, "mask")
    a = weighted_sum(r.astype(np.float64), g.astype(np.float64), take)
    return to_dtype(a, result_dtype(r, g))[()]


def posterior_mode(d, g, *, mask=None, ties="split"):
    """P3: the posterior mode ``g(argmin_h d_h)`` (hard attention, step, ReLU-like gating).

    The hypothesis of lowest energy wins (H1).  With ``ties="split"`` tied
    winners are averaged (the ``tau -> 0`` limit of the posterior mean);
    ``ties="first"`` takes the first.

    Examples
    --------
    >>> float(posterior_mode([0.3, -2.0], [1.0, -1.0]))
    -1.0
    """
    d = as_float_array(d, "d")
    _, g = _check_r_g(d, g)
    r = hard_responsibilities(d.astype(np.float64), mask=mask, ties=ties)
    take = as_mask(mask, d.shape, "mask")
    a = weighted_sum(r, g.astype(np.float64), take)
    return to_dtype(a, result_dtype(d, g))[()]


def posterior_variance(r, g, *, mask=None):
    """P4: the posterior variance ``sum_h r_h g_h^2 - (sum_h r_h g_h)^2``.

    Evaluated in the centred form ``sum_h r_h (g_h - a)^2`` (equal in exact
    arithmetic, free of the cancellation of the raw form); per feature for a
    vector statistic.  Memory ``O(N K Dv)``.

    Examples
    --------
    >>> float(posterior_variance([0.5, 0.5], [1.0, -1.0]))  # a fair sign: variance 1
    1.0
    """
    r, g = _check_r_g(r, g)
    take = as_mask(mask, r.shape, "mask")
    r64, g64 = r.astype(np.float64), g.astype(np.float64)
    a = weighted_sum(r64, g64, take)
    if g64.ndim == 1:
        centred_sq = (g64 - a[..., None]) ** 2  # (..., K)
        var = np.where(take if take is not None else True, r64 * centred_sq, 0.0).sum(axis=-1)
    else:
        centred_sq = (g64[..., None, :, :] - a[..., :, None, :]) ** 2  # (..., N, K, Dv)
        weighted = r64[..., None] * centred_sq
        if take is not None:
            weighted = np.where(take[..., None], weighted, 0.0)
        var = weighted.sum(axis=-2)
    return to_dtype(var, result_dtype(r, g))[()]


def posterior_entropy(r, axis=-1):
    """P4: the posterior entropy ``H = -sum_h r_h log r_h`` (nats; ``0 log 0 = 0``).

    ``0`` for a hard (collapsed) posterior, ``log K`` for a uniform one.

    Examples
    --------
    >>> float(posterior_entropy([0.5, 0.5]))  # log 2
    0.6931471805599453
    """
    r = as_float_array(r, "r")
    r64 = r.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(r64 > 0, -r64 * np.log(r64), np.where(np.isnan(r64), np.nan, 0.0))
    return to_dtype(terms.sum(axis=axis), r.dtype)[()]


def softmin_summary(d, v, tau=1.0, *, mask=None, empty="zero"):
    """A3 + A4 fused: posterior mean and log-partition from precomputed energies.

    ``a_i = sum_j softmin(d_i / tau)_j v_j`` and ``L_i = log sum_j exp(-d_ij / tau)``:
    the hot loop the accelerated paths implement in one pass (M1-M2).

    Parameters
    ----------
    d : array_like, float (..., N, M)
        Energies, hypotheses on the last axis.
    v : array_like, float (..., M, Dv)
        Values.
    tau : float, default 1
    mask : array_like of bool, optional, broadcast to ``d``'s shape
    empty : {"zero", "nan"}
        Output of a row with no participating hypothesis (``L`` is ``-inf`` either way).

    Returns
    -------
    a : ndarray (..., N, Dv)
    L : ndarray (..., N)

    Examples
    --------
    >>> a, L = softmin_summary([[0.0, 0.0]], [[1.0], [3.0]])
    >>> a, L
    (array([[2.]]), array([0.69314718]))
    """
    d, v, take = check_summary_inputs(d, v, mask, empty)
    a, L, _ = _softmin_summary(d.astype(np.float64), v.astype(np.float64), check_tau(tau), take, empty)
    dtype = result_dtype(d, v)
    return to_dtype(a, dtype), to_dtype(L, dtype)


def _softmin_summary(d, v, tau, take, empty, keep=None, p=0.0):
    """A3 + A4 on validated float64 inputs, one softmin pass: ``(a, L, r)``.

    Shared by :func:`softmin_summary` and :func:`iem_ref.attention`; ``keep``
    and ``p`` thin the mean by dropout (V8).
    """
    t = softmin_terms(d, tau, take)  # the shifted weights w_j, their sum, m = min d (iem_ref.responsibilities)
    with np.errstate(all="ignore"):
        r = _responsibility_rows(t.w / t.total[..., None], t, empty)  # A3: r_j = w_j / sum_j' w_j'
        L = _log_partition_rows(-t.m / tau + np.log1p(t.rest), t)  # G1: L = -m/tau + log(1 + sum_{j != argmin} w_j)
    participates = ~np.isposinf(d) if take is None else take & ~np.isposinf(d)
    if keep is None:
        a = weighted_sum(r, v, participates, limit=True)  # A4: a = sum_j r_j v_j
    else:
        a = dropout_mean(r, keep & participates, p, v)  # V8: a = sum_j r_j keep_j v_j / (1 - p)
        a = np.where(t.nan_row[..., None], np.nan, a)  # a NaN row stays NaN even if all its keys are dropped
    if empty == "nan":  # also when M = 0, where r has no entry to carry the NaN
        a = np.where(participates.any(axis=-1, keepdims=True), a, np.nan)
    return a, L, r
