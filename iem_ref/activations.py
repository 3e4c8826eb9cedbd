"""Scalar activations as collapsed posteriors: S1-S5, H3 and the prototype unit P5.

A scalar unit runs the same competition as attention with K = 2 hypotheses
(the signs ``s = +1, -1``, S1) and keeps a collapsed statistic: the posterior
mean of the sign (S3), which for Gaussian kernels is tanh (S4).  ReLU is the
zero-temperature free energy of an on/off competition (H3).

Shape legend: ``z (...)`` pre-activations, elementwise; energies of the two
signs ``(..., 2)`` in the order ``[+, -]`` (:data:`iem_ref.energies.SIGNS`).
"""

from __future__ import annotations

import numpy as np

from ._validation import as_float_array, check_scale, check_sign_pair, check_tau, result_dtype, to_dtype
from .attention import attention
from .competition import free_energy, responsibilities
from .energies import SIGNS, signed_linear_energies
from .summaries import posterior_mean

__all__ = [
    "sign_responsibilities",
    "sign_posterior_mean",
    "tanh_from_signed_gaussian",
    "tanh_as_attention",
    "softplus",
    "relu",
    "softplus_derivative",
    "prototype_activation",
]


def _stack_signs(d_plus, d_minus):
    dp, dm, dtype = check_sign_pair(d_plus, d_minus)
    return np.stack([dp, dm], axis=-1).astype(np.float64), dtype


def sign_responsibilities(d_plus, d_minus):
    """S2: ``r_+ = exp(-d_+) / (exp(-d_+) + exp(-d_-))``, ``r_- = 1 - r_+``.

    Returns ``(..., 2)``: ``[r_+, r_-]``.

    Examples
    --------
    >>> sign_responsibilities(0.0, np.log(3.0))
    array([0.75, 0.25])
    """
    d, dtype = _stack_signs(d_plus, d_minus)
    return to_dtype(responsibilities(d), dtype)


def sign_posterior_mean(d_plus, d_minus):
    """S3: the collapsed summary ``a = r_+ - r_- = E[s | z]``.

    Examples
    --------
    >>> float(sign_posterior_mean(0.0, np.log(3.0)))
    0.5
    """
    d, dtype = _stack_signs(d_plus, d_minus)
    r = responsibilities(d)
    return to_dtype(posterior_mean(r, SIGNS), dtype)[()]


def tanh_from_signed_gaussian(z, m=1.0, sigma=1.0):
    """S4: ``E[s | z]`` under signed Gaussian kernels ``d_s(z) = (z - s m)^2 / (2 sigma^2)``.

    ``d_+ - d_- = -2 m z / sigma^2``, so ``r_+ = sigmoid(2 m z / sigma^2)`` and
    ``a(z) = r_+ - r_- = tanh(m z / sigma^2)``: tanh is derived, with
    ``m / sigma^2`` an inverse temperature.

    Examples
    --------
    >>> float(tanh_from_signed_gaussian(0.5, m=2.0, sigma=1.0)), float(np.tanh(1.0))  # equal to a few ulps
    (0.7615941559557647, 0.7615941559557649)
    """
    z = as_float_array(z, "z")
    if not 0 < float(sigma) < np.inf:  # also refuses NaN
        raise ValueError(f"sigma must be finite and > 0 (the kernel width); got {sigma!r}")
    # d_s = (z - s m)^2 / (2 sigma^2) = (z^2 + m^2) / (2 sigma^2) - s m z / sigma^2.  The first part
    # is shared by both signs and cancels in the softmin (T3), leaving the linear energies with
    # alpha = m / sigma^2.  Computing with them keeps the evidence for |z| >= 2**53 m, where
    # z - m and z + m round to the same float and the quadratic form would give 0.
    d = signed_linear_energies(z.astype(np.float64), alpha=m / sigma**2)
    r = responsibilities(d)
    return np.asarray(posterior_mean(r, SIGNS), dtype=z.dtype)[()]


def tanh_as_attention(z, alpha=1.0):
    """S5: ``tanh(alpha z) = attention(q=[z], keys=[+1, -1], values=[+1, -1], scale=alpha)``.

    The note's table as an executable identity: one query ``[z]``, K = 2 keys
    ``+1, -1`` with values ``+1, -1``; the dot-product energies are
    ``d_+- = -+ z`` and the posterior mean of the value is ``tanh(alpha z)``.

    Examples
    --------
    >>> float(tanh_as_attention(0.5, alpha=2.0)), float(np.tanh(1.0))  # equal to a few ulps
    (0.7615941559557647, 0.7615941559557649)
    """
    z = as_float_array(z, "z")
    check_scale(alpha, 1, "alpha")  # so that errors name this function's argument
    q = z.astype(np.float64)[..., None, None]  # (..., N=1, D=1)
    keys = SIGNS[:, None]  # (M=2, D=1)
    values = SIGNS[:, None]  # (M=2, Dv=1)
    a = attention(q, keys, values, scale=alpha)
    return np.asarray(a[..., 0, 0], dtype=z.dtype)[()]


def softplus(z, tau=1.0):
    """H3: ``softplus_tau(z) = tau log(1 + exp(z / tau)) = -F({0, -z})``.

    The negative free energy of an on/off competition (off: energy 0, on:
    energy ``-z``) at temperature ``tau``; ``-> relu(z)`` as ``tau -> 0``.

    Examples
    --------
    >>> float(softplus(0.0))  # log 2
    0.6931471805599453
    """
    z = as_float_array(z, "z")
    tau = check_tau(tau)
    zeros = np.zeros_like(z, dtype=np.float64)
    d = np.stack([zeros, -z.astype(np.float64)], axis=-1)  # [off, on]
    return np.asarray(-free_energy(d, tau), dtype=z.dtype)[()]


def relu(z):
    """H3 (limit): ``ReLU(z) = max(0, z) = lim_{tau -> 0} softplus_tau(z) = -min(0, -z)``.

    The zero-temperature free energy is the minimum energy.

    Examples
    --------
    >>> relu([-1.0, 2.0])
    array([0., 2.])
    """
    z = as_float_array(z, "z")
    return np.maximum(z, z.dtype.type(0))  # = -min(0, -z), written without a signed zero


def softplus_derivative(z, tau=1.0):
    """H3: ``d softplus_tau / dz = sigmoid(z / tau) = r_on(z)``, the soft responsibility of "on".

    Its ``tau -> 0`` limit is the hard responsibility ``1{z > 0}``, ReLU's derivative.

    Examples
    --------
    >>> float(softplus_derivative(0.0))
    0.5
    """
    z = as_float_array(z, "z")
    tau = check_tau(tau)
    zeros = np.zeros_like(z, dtype=np.float64)
    d = np.stack([zeros, -z.astype(np.float64)], axis=-1)  # [off, on]
    return np.asarray(responsibilities(d, tau)[..., 1], dtype=z.dtype)[()]


def prototype_activation(z, centres, values, tau=1.0):
    """P5: ``a(z) = sum_h softmin(d_h(z) / tau) g_h`` with ``d_h(z) = (z - c_h)^2 / 2``.

    "Attention-like behaviour at every layer without the cost": each unit
    keeps ``K`` prototypes, runs a soft competition among them and collapses
    to the posterior mean.  ``K = 2``, ``c = g = (+1, -1)`` is tanh (S4);
    ``tau -> 0`` gives a step function (P3).

    Parameters
    ----------
    z : (...) pre-activations
    centres : (..., K) prototype centres ``c_h`` (broadcast against ``z[..., None]``)
    values : (..., K) statistics ``g_h``
    tau : float

    Examples
    --------
    >>> float(prototype_activation(0.5, [1.0, -1.0], [1.0, -1.0])), float(np.tanh(0.5))  # equal to a few ulps
    (0.4621171572600098, 0.46211715726000974)
    """
    z = as_float_array(z, "z")
    c = as_float_array(centres, "centres")
    g = as_float_array(values, "values")
    if c.shape[-1:] != g.shape[-1:]:
        raise ValueError(f"centres {c.shape} and values {g.shape} must have the same number K of prototypes")
    z64, c64 = z.astype(np.float64)[..., None], c.astype(np.float64)
    # d_h(z) = (z - c_h)^2 / 2, evaluated relative to the first prototype (T3: a shared shift
    # does not change r) as a difference of squares, d_h - d_0 = (c_0 - c_h)(2 z - c_h - c_0) / 2,
    # which stays accurate when |z| >> |c| (the squares themselves would round alike).
    c0 = c64[..., :1]
    d = (c0 - c64) * (2.0 * z64 - c64 - c0) / 2.0  # (..., K)
    r = responsibilities(d, tau)
    a = (r * g.astype(np.float64)).sum(axis=-1)
    return to_dtype(a, result_dtype(z, c, g))[()]
