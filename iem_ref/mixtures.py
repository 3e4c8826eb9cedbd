"""Gaussian mixtures: the unsupervised regime of the same softmin (G5).

Shape legend: ``x (N, D)`` points, ``means (K, D)``, ``covariances (K, D, D)``
(or ``(D, D)`` shared), ``weights (K,)`` mixing proportions.
"""

from __future__ import annotations

import numpy as np

from ._validation import as_float_array, to_dtype
from .competition import responsibilities
from .energies import mahalanobis_energy

__all__ = ["mixture_energies", "mixture_responsibilities"]


def mixture_energies(x, means, covariances, weights):
    """G5: ``d_j(x) = 1/2 (x - mu_j)^T Sigma_j^{-1} (x - mu_j) + 1/2 log det Sigma_j - log pi_j``.

    The negative log of ``pi_j N(x; mu_j, Sigma_j)`` up to the shared constant
    ``(D/2) log 2 pi``, which cancels in the softmin (T3).

    Examples
    --------
    >>> mixture_energies([[0.0]], [[0.0], [1.0]], [[[1.0]], [[1.0]]], [0.5, 0.5])
    array([[0.69314718, 1.19314718]])
    """
    w = as_float_array(weights, "weights")
    if w.ndim != 1 or np.any(w < 0) or not np.isclose(w.sum(), 1.0, rtol=0, atol=max(1e-12, w.size * np.finfo(w.dtype).eps)):
        raise ValueError(f"weights must be a 1-D probability vector (non-negative, summing to 1); got {np.asarray(weights)!r}")
    d = mahalanobis_energy(x, means, covariances, half=True, log_det=True)
    with np.errstate(divide="ignore"):
        return to_dtype(d.astype(np.float64) - np.log(w.astype(np.float64)), d.dtype)


def mixture_responsibilities(x, means, covariances, weights):
    """G5: the E-step of a Gaussian mixture, ``p(j | x)``, as the softmin of :func:`mixture_energies`.

    Classical EM responsibilities are A3 with these energies.  A component
    with weight 0 has energy ``+inf`` and responsibility 0.

    Examples
    --------
    >>> mixture_responsibilities([[0.5]], [[0.0], [1.0]], [[[1.0]], [[1.0]]], [0.5, 0.5])
    array([[0.5, 0.5]])
    """
    return responsibilities(mixture_energies(x, means, covariances, weights))
