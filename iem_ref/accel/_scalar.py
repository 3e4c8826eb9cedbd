"""Scalar two-hypothesis activations (S3, S4, H3) as plain ``@njit`` functions.

Plain scalar arithmetic with ``math`` only, so that both the CPU array
drivers (:mod:`iem_ref.accel.cpu`) and a ``cuda.jit`` kernel can call them
as device functions.  Edge cases follow the README policy for a competition
of two hypotheses ``[+, -]`` with energies ``d_+, d_-``: an energy ``+inf``
does not take part, ``-inf`` energies are certain (and share the mass), two
``+inf`` energies make an empty row (output 0), NaN propagates.

Examples
--------
>>> import math
>>> round(sign_mean(0.0, math.log(3.0)), 12)  # r = (3/4, 1/4)
0.5
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["sign_mean", "signed_gaussian_mean", "softplus_scalar"]


@njit(cache=True)
def sign_mean(d_plus, d_minus):
    """S3: ``a = r_+ - r_- = tanh((d_- - d_+) / 2)``, with the policy's edge cases.

    Examples
    --------
    >>> sign_mean(float("inf"), 0.0)  # + does not take part
    -1.0
    """
    if d_plus != d_plus or d_minus != d_minus:
        return math.nan
    if d_plus == d_minus:  # equal energies (also both +inf: empty row, 0; both -inf: a tie, 0)
        return 0.0
    if d_plus == math.inf or d_minus == -math.inf:
        return -1.0
    if d_minus == math.inf or d_plus == -math.inf:
        return 1.0
    # r_+ = sigmoid(d_- - d_+); r_+ - r_- = tanh((d_- - d_+)/2).  Halve first: no overflow.
    return math.tanh(0.5 * d_minus - 0.5 * d_plus)


@njit(cache=True)
def signed_gaussian_mean(z, alpha):
    """S4: ``E[s | z]`` with ``d_s = (z - s m)^2 / (2 sigma^2)``, i.e. ``tanh(alpha z)`` with ``alpha = m / sigma^2``.

    The quadratic part of the energies is shared by both signs and cancels
    (T3); like the reference, the linear energies ``d_+- = -+ alpha z`` are
    used, which keep the evidence where ``z -+ m`` would round to one float.

    Examples
    --------
    >>> round(signed_gaussian_mean(0.5, 2.0), 12) == round(math.tanh(1.0), 12)
    True
    """
    d_plus = -alpha * z
    return sign_mean(d_plus, -d_plus)


@njit(cache=True)
def softplus_scalar(z, tau):
    """H3: ``softplus_tau(z) = tau log(1 + exp(z/tau)) = max(z, 0) + tau log1p(exp(-|z|/tau))``.

    The log-partition of ``{off: 0, on: -z}`` in the shifted ``log1p`` form.
    ``tau = inf`` gives ``inf`` (two hypotheses at the uniform limit), except
    ``z = -inf`` (only "off" takes part): 0.

    Examples
    --------
    >>> round(softplus_scalar(0.0, 1.0), 15) == round(math.log(2.0), 15)
    True
    """
    if z != z:
        return math.nan
    if z == math.inf:
        return math.inf
    if z == -math.inf:
        return 0.0
    if tau == math.inf:
        return math.inf
    return tau * (max(z, 0.0) / tau + math.log1p(math.exp(-abs(z) / tau)))
