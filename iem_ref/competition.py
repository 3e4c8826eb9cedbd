"""Competition: energies -> responsibilities (the E-step).

Equations A2, A3, T2, T3, H1, H2 and G3 of ``derivations/README.md``, plus the
log-partition and free energy that G1 differentiates.

Shape legend: ``d`` has hypotheses on axis ``axis`` (default the last, size
``M``); every other axis is a batch of independent competitions ("rows").

Conventions (README, "API conventions"): energies, lower is better; ``tau > 0``
(``inf`` allowed: the uniform limit); ``mask`` is boolean, True = the
hypothesis takes part, broadcast against ``d``.  float32 in gives float32 out;
every computation runs in float64 and rounds once at the end.

Edge cases (README, "Edge-case policy"): a masked hypothesis or one with
energy ``+inf`` has responsibility 0 and its value is never read; energies
``-inf`` share all the mass equally; NaN in a participating energy makes its
row NaN; a row with no participating hypothesis ("empty") has
responsibilities 0 (or NaN with ``empty="nan"``) and log-partition ``-inf``.
"""

from __future__ import annotations

import numpy as np

from ._accurate import softmin_terms
from ._validation import as_float_array, as_mask, check_axis, check_choice, check_tau, to_dtype

__all__ = [
    "likelihoods",
    "log_partition",
    "free_energy",
    "responsibilities",
    "canonical_energies",
    "hard_responsibilities",
    "neg_log_softmin",
]

_EMPTY = {"zero", "nan"}
_TIES = {"split", "first"}


def _prepare(d, tau, axis, mask):
    """Validate, move the hypothesis axis last, compute in float64."""
    d = as_float_array(d, "d")
    if d.ndim == 0:
        raise ValueError("d must have at least one dimension (the hypotheses); got a scalar")
    tau = check_tau(tau)
    axis = check_axis(axis, d.ndim)
    take = as_mask(mask, d.shape, "mask")
    d64 = np.moveaxis(d.astype(np.float64, copy=False), axis, -1)
    if take is not None:
        take = np.moveaxis(take, axis, -1)
    return d64, tau, axis, take, d.dtype


def likelihoods(d, tau=1.0):
    """A2: unnormalised likelihoods ``P_j = exp(-d_j / tau)``.

    Parameters
    ----------
    d : array_like, float (..., M)
        Energies.
    tau : float, default 1
        Temperature, ``0 < tau <= inf``.

    Returns
    -------
    P : ndarray, same shape and float dtype as ``d``
        May overflow to ``inf`` for energies below ``-709 tau`` (float64): the
        normalised :func:`responsibilities` never forms these numbers.

    Examples
    --------
    >>> likelihoods([0.0, 1.0])
    array([1.        , 0.36787944])
    """
    d = as_float_array(d, "d")
    tau = check_tau(tau)
    with np.errstate(over="ignore"):
        P = np.exp(-d.astype(np.float64) / tau)
    return to_dtype(P, d.dtype)


def log_partition(d, tau=1.0, axis=-1, mask=None):
    """G1's objective: the log-partition ``L(d) = log sum_j exp(-d_j / tau)``.

    Computed as ``L = -min(d)/tau + log1p(sum_{j != argmin} exp(-(d_j - min d)/tau))``
    (Blanchard, Higham & Higham 2021, Alg. 4.1) with error-free shifted
    exponents: in float64 within ``3 u (|m/tau| + |L| + 1)`` absolute
    (:func:`iem_ref.bounds.log_partition_error`), about ``2 + kappa`` ulps,
    ``kappa = sum_j r_j |d_j/tau| / |L|`` the condition number.  ``dL/dd_j = -r_j / tau`` (G1).

    Parameters
    ----------
    d : array_like, float (..., M, ...)
        Energies, hypotheses on ``axis``.
    tau : float, default 1
        Temperature.
    axis : int, default -1
        Hypothesis axis.
    mask : array_like of bool, optional
        True = the hypothesis takes part; broadcast against ``d``.

    Returns
    -------
    L : ndarray, ``d``'s shape without ``axis``, ``d``'s float dtype.
        ``-inf`` for an empty row, ``+inf`` if a participating energy is
        ``-inf``, NaN if one is NaN.

    Examples
    --------
    >>> float(log_partition([0.0, 40.0]))  # log(1 + e^-40): no cancellation to 0
    4.248354255291589e-18
    """
    d64, tau, axis, take, dtype = _prepare(d, tau, axis, mask)
    # t.m = min_j d_j; t.rest = sum_{j != argmin} exp(-(d_j - m)/tau), each exponent shifted error-free
    t = softmin_terms(d64, tau, take)
    with np.errstate(all="ignore"):
        L = -t.m / tau + np.log1p(t.rest)  # G1: L = log sum_j exp(-d_j/tau) = -m/tau + log(1 + rest)
    return to_dtype(_log_partition_rows(L, t), dtype)[()]


def _log_partition_rows(L, t):
    """The edge-case policy's rows of ``L``: empty -> ``-inf``, certain -> ``+inf``, NaN -> NaN."""
    L = np.where(t.empty, -np.inf, L)
    L = np.where(t.certain, np.inf, L)
    return np.where(t.nan_row, np.nan, L)


def _responsibility_rows(r, t, empty):
    """The edge-case policy's rows of ``r`` (hypotheses last): empty -> 0 or NaN (``empty``), NaN -> NaN."""
    r = np.where(t.empty[..., None], 0.0 if empty == "zero" else np.nan, r)
    return np.where(t.nan_row[..., None], np.nan, r)


def free_energy(d, tau=1.0, axis=-1, mask=None):
    """The free energy ``F(d) = -tau * L(d)``: a soft minimum of the energies.

    ``min(d) - tau log(M) <= F <= min(d)``; ``F -> min(d)`` as ``tau -> 0``
    (used by H3).  At ``tau = inf`` the limit is ``-inf`` when two or more
    hypotheses take part and the lone energy when one does.

    Examples
    --------
    >>> float(free_energy([0.0, 0.0], tau=1.0))  # -log 2
    -0.6931471805599453
    """
    d64, tau, axis, take, dtype = _prepare(d, tau, axis, mask)
    L = np.asarray(log_partition(d64, tau, -1, take), dtype=np.float64)
    with np.errstate(invalid="ignore"):
        F = -tau * L
    if np.isinf(tau):
        # -inf * log(1) is 0 * inf; the limit with one finite hypothesis is that energy.
        lone = np.where(take if take is not None else True, d64, np.inf)
        n = np.isfinite(lone).sum(axis=-1)
        F = np.where((n == 1) & (L == 0), np.where(np.isfinite(lone), lone, 0).sum(axis=-1), F)
    return to_dtype(F, dtype)[()]


def responsibilities(d, tau=1.0, axis=-1, mask=None, *, empty="zero"):
    """A3 / T2: responsibilities ``r_j = exp(-d_j/tau) / sum_j' exp(-d_j'/tau)``.

    The softmin of the energies (= softmax of the scores ``-d``): the E-step.
    The whole vector is P1, the full posterior; as ``tau -> 0`` it tends to
    :func:`hard_responsibilities` (H2).
    Accurate to 3 ulps componentwise in float64 (error-free shifted exponents
    and a half-ulp sum, see ``iem_ref._accurate``); ``sum_j r_j = 1`` within a
    few units of roundoff.

    Parameters
    ----------
    d : array_like, float (..., M, ...)
        Energies, hypotheses on ``axis``.
    tau : float, default 1
        Temperature, ``0 < tau <= inf``; ``inf`` gives uniform weights over the
        hypotheses with finite energy (T2's limit).
    axis : int, default -1
    mask : array_like of bool, optional
        True = takes part.
    empty : {"zero", "nan"}
        What an empty row gives: zeros (default, as torch SDPA and
        FlashAttention) or the strict ``0/0 = NaN``.

    Returns
    -------
    r : ndarray, ``d``'s shape and float dtype; non-negative, rows sum to 1.

    Examples
    --------
    >>> responsibilities([0.0, np.log(3.0)])
    array([0.75, 0.25])
    >>> responsibilities([1.0, -np.inf, -np.inf])  # certain hypotheses share the mass
    array([0. , 0.5, 0.5])
    """
    check_choice(empty, "empty", _EMPTY)
    d64, tau, axis, take, dtype = _prepare(d, tau, axis, mask)
    # t.w = exp(-(d_j - min_k d_k)/tau), shifted error-free; t.total = sum_j t.w, to half an ulp
    t = softmin_terms(d64, tau, take)
    with np.errstate(all="ignore"):
        r = t.w / t.total[..., None]  # A3: r_j = exp(-d_j/tau) / sum_j' exp(-d_j'/tau), the shift cancels
    r = _responsibility_rows(r, t, empty)
    return to_dtype(np.moveaxis(r, -1, axis), dtype)


def canonical_energies(d, tau=1.0, axis=-1, mask=None):
    """T3: the representative ``(d_j - min_j d_j) / tau`` of an energy class.

    Responsibilities depend on the energies only through this quantity: a
    shared shift ``d -> d + c`` and a joint rescaling ``(d, tau) -> (c d, c tau)``
    leave it, and hence ``r``, unchanged.  Non-participating hypotheses give
    ``+inf``.

    Examples
    --------
    >>> canonical_energies([3.0, 5.0], tau=2.0)
    array([0., 1.])
    """
    d64, tau, axis, take, dtype = _prepare(d, tau, axis, mask)
    t = softmin_terms(d64, tau, take)
    c = -t.hi  # (d_j - m)/tau, rounded once
    c = np.where(t.nan_row[..., None], np.nan, c)
    return to_dtype(np.moveaxis(c, -1, axis), dtype)


def hard_responsibilities(d, axis=-1, mask=None, *, ties="split", empty="zero"):
    """H1: hard attention ``r_j = 1{ j = argmin_j' d_j' }``.

    The winner is the hypothesis of **lowest energy** (highest score).  The
    note writes ``argmax d_j``; with energies ``d = -<q, k>`` that would pick
    the worst key, so the note's ``d`` there must be read as a score.

    Ties: ``"split"`` (default) gives each of the ``c`` tied minima ``1/c``,
    which is the ``tau -> 0`` limit of T2 (H2); ``"first"`` gives all the mass
    to the first one (torch/numpy ``argmax`` convention).

    Examples
    --------
    >>> hard_responsibilities([2.0, 1.0, 1.0])
    array([0. , 0.5, 0.5])
    >>> hard_responsibilities([2.0, 1.0, 1.0], ties="first")
    array([0., 1., 0.])
    """
    check_choice(ties, "ties", _TIES)
    check_choice(empty, "empty", _EMPTY)
    d64, _, axis, take, dtype = _prepare(d, 1.0, axis, mask)
    t = softmin_terms(d64, 1.0, take)
    # softmin_terms puts hi = 0 exactly on the minima (d_j - m rounds to 0 only
    # when d_j == m) and on the -inf energies of a certain row.
    winners = t.hi == 0.0
    if ties == "first":
        first = np.argmax(winners, axis=-1)
        winners = np.zeros_like(winners)
        np.put_along_axis(winners, first[..., None], True, axis=-1)
        winners &= ~t.empty[..., None]
    with np.errstate(all="ignore"):
        r = winners / winners.sum(axis=-1, keepdims=True)
    r = np.where(t.empty[..., None], 0.0 if empty == "zero" else np.nan, r)
    r = np.where(t.nan_row[..., None], np.nan, r)
    return to_dtype(np.moveaxis(r, -1, axis), dtype)


def neg_log_softmin(d, tau=1.0, axis=-1, mask=None):
    """G3: calibrated energies ``y_j = d_j/tau + log sum_k exp(-d_k/tau)``.

    ``exp(-y_j) = r_j`` exactly in real arithmetic: ``y`` is ``-log r`` computed
    without forming ``r`` (no underflow to ``-log 0``).  The Jacobian is
    ``dy_i/dd_j = (delta_ij - r_j)/tau`` (see :func:`iem_ref.neg_log_softmin_jacobian`).
    Non-participating hypotheses give ``+inf``.

    Examples
    --------
    >>> neg_log_softmin([0.0, 0.0])
    array([0.69314718, 0.69314718])
    """
    d64, tau, axis, take, dtype = _prepare(d, tau, axis, mask)
    # t.hi + t.lo = -(d_j - m)/tau exactly (m = min d); t.rest = sum_{j != argmin} exp(-(d_j - m)/tau)
    t = softmin_terms(d64, tau, take)
    with np.errstate(all="ignore"):
        y = -t.hi + (np.log1p(t.rest)[..., None] - t.lo)  # G3: y_j = d_j/tau + L = (d_j - m)/tau + log(1 + rest)
        y = np.where(t.certain[..., None], np.where(t.hi == 0.0, np.log(t.total)[..., None], np.inf), y)
    y = np.where(t.nan_row[..., None], np.nan, y)
    return to_dtype(np.moveaxis(y, -1, axis), dtype)
