"""Responsibilities are gradients: G1-G4 (the implicit-EM identity and its Jacobians).

Shape legend: ``d (..., M)`` energies (hypotheses last), Jacobians
``(..., M, M)`` with ``J[..., i, j] = d out_i / d d_j``; attention shapes
as in :mod:`iem_ref.attention`.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_choice, check_grad_out, result_dtype
from .attention import prepare_attention
from .competition import responsibilities
from .summaries import _weighted_sum

__all__ = ["log_partition_gradient", "responsibilities_jacobian", "neg_log_softmin_jacobian", "attention_vjp"]


def log_partition_gradient(d, tau=1.0, axis=-1, mask=None):
    """G1: ``dL/dd_j = -r_j / tau`` for ``L = log sum_j exp(-d_j/tau)``.

    The implicit-EM identity: the gradient of the log-partition with respect
    to the energies is minus the responsibilities (exactly, at ``tau = 1``).
    Masked hypotheses have gradient 0.

    Examples
    --------
    >>> log_partition_gradient([0.0, 0.0])
    array([-0.5, -0.5])
    """
    r = responsibilities(d, tau, axis, mask)
    return -r / np.asarray(tau, dtype=r.dtype)


def responsibilities_jacobian(d, tau=1.0, mask=None):
    """G2: the softmin Jacobian ``dr_i/dd_j = -r_i (delta_ij - r_j) / tau``.

    Symmetric, rows sum to zero (``sum_i r_i = 1`` for every ``d``).

    Returns ``(..., M, M)``.

    Examples
    --------
    >>> responsibilities_jacobian([0.0, 0.0])
    array([[-0.25,  0.25],
           [ 0.25, -0.25]])
    """
    r = responsibilities(d, tau, -1, mask)
    eye = np.eye(r.shape[-1], dtype=r.dtype)
    return -r[..., :, None] * (eye - r[..., None, :]) / np.asarray(tau, dtype=r.dtype)


def neg_log_softmin_jacobian(d, tau=1.0, mask=None):
    """G3: the Jacobian of the calibrated energies ``dy_i/dd_j = (delta_ij - r_j) / tau``.

    Returns ``(..., M, M)``.

    Examples
    --------
    >>> neg_log_softmin_jacobian([0.0, 0.0])
    array([[ 0.5, -0.5],
           [-0.5,  0.5]])
    """
    r = responsibilities(d, tau, -1, mask)
    eye = np.eye(r.shape[-1], dtype=r.dtype)
    return (eye - r[..., None, :]) / np.asarray(tau, dtype=r.dtype)


def attention_vjp(
    q,
    k,
    v,
    grad_out,
    *,
    scale=None,
    mask=None,
    is_causal=False,
    causal_alignment="top_left",
    energy="dot",
    out=None,
    lse=None,
):
    """G4: the attention backward pass, ``(dq, dk, dv)`` for an upstream gradient ``u = dLoss/da``.

    With scores ``s_ij = -d_ij * scale`` and ``b_ij = <u_i, v_j>``::

        dLoss/dv_j  = sum_i r_ij u_i                           (responsibility-weighted M-step)
        dLoss/ds_ij = r_ij (b_ij - sum_j' r_ij' b_ij')         (the "advantage" routing gradient)
        dq_i = sum_j dLoss/ds_ij ds_ij/dq_i,  dk_j = sum_i dLoss/ds_ij ds_ij/dk_j

    For ``energy="dot"`` ``ds_ij/dq_i = scale k_j``; for ``"sqeuclidean"``
    (``d = ||q - k||^2/2``) ``ds_ij/dq_i = -scale (q_i - k_j)``, and since
    ``sum_j dLoss/ds_ij = 0`` both give ``dq = scale (dS) k``.

    Parameters
    ----------
    q, k, v : as :func:`iem_ref.attention`
    grad_out : array_like, float (B..., N, Dv)
        ``u``, the upstream gradient.
    scale, mask, is_causal, causal_alignment : as :func:`iem_ref.attention`
    energy : {"dot", "sqeuclidean"}
    out, lse : ignored by the reference (which recomputes them); the
        accelerated paths reuse the forward's output and log-partition.

    Returns
    -------
    dq (B..., N, D), dk (B..., M, D), dv (B..., M, Dv), broadcast batch shape.

    Examples
    --------
    >>> dq, dk, dv = attention_vjp([[0.0]], [[1.0], [2.0]], [[1.0], [3.0]], [[1.0]])
    >>> dv
    array([[0.5],
           [0.5]])
    """
    check_choice(energy, "energy", {"dot", "sqeuclidean"})
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy)
    u_in = check_grad_out(grad_out, inp.batch, inp.n, inp.dv)
    u = np.broadcast_to(u_in, inp.batch + (inp.n, inp.dv)).astype(np.float64)
    qq, kk, vv = (x.astype(np.float64) for x in (inp.q, inp.k, inp.v))
    scale_ = 0.0 if np.isinf(inp.tau) else 1.0 / inp.tau

    d = inp.energies()
    take = inp.takes_part()
    participates = ~np.isposinf(d) if take is None else take & ~np.isposinf(d)
    # A NaN row has NaN responsibilities everywhere; selecting the participating entries
    # keeps its NaN away from the keys it cannot see (NaN reaches affected rows only).
    r = np.where(participates, responsibilities(d, inp.tau, mask=take), 0.0)  # (B..., N, M)

    rT, partT = np.swapaxes(r, -1, -2), np.swapaxes(participates, -1, -2)
    with np.errstate(invalid="ignore"):
        b = np.where(participates, u @ np.swapaxes(vv, -1, -2), 0.0)  # b_ij = <u_i, v_j>, participating j only
        dS = np.where(participates, r * (b - (r * b).sum(axis=-1, keepdims=True)), 0.0)  # dLoss/ds_ij
    dv = _weighted_sum(rT, u, partT)  # sum_i r_ij u_i
    dq = scale_ * _weighted_sum(dS, kk, participates)  # sum_j dS_ij k_j
    dk = scale_ * _weighted_sum(np.swapaxes(dS, -1, -2), qq, partT)  # sum_i dS_ij q_i
    if energy == "sqeuclidean":
        dk = dk - scale_ * np.where(np.isfinite(kk), kk, 0.0) * dS.sum(axis=-2)[..., :, None]
    dtype = result_dtype(inp.q, inp.k, inp.v, u_in)
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)
