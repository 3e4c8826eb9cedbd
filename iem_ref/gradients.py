"""Responsibilities are gradients: G1-G4 (the implicit-EM identity and its Jacobians).

Shape legend: ``d (..., M)`` energies (hypotheses last), Jacobians
``(..., M, M)`` with ``J[..., i, j] = d out_i / d d_j``; attention shapes
as in :mod:`iem_ref.attention`.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_grad_out, result_dtype, to_dtype
from .attention import Competition, prepare_attention
from .energies import energy_of
from .competition import responsibilities
from ._accurate import weighted_sum

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
    return to_dtype(-r.astype(np.float64) / tau, r.dtype)


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
    r64, eye = r.astype(np.float64), np.eye(r.shape[-1])
    return to_dtype(-r64[..., :, None] * (eye - r64[..., None, :]) / tau, r.dtype)


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
    r64, eye = r.astype(np.float64), np.eye(r.shape[-1])
    return to_dtype((eye - r64[..., None, :]) / tau, r.dtype)


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
    bias=None,
    alibi_slopes=None,
    softcap=None,
    window=None,
    sinks=None,
    enable_gqa=False,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    dropout_p=0.0,
    dropout_mask=None,
    score_mod=None,
    mask_mod=None,
    out=None,
    lse=None,
):
    """G4 (and G6 for the variants): the attention backward pass for an upstream gradient ``u = dLoss/da``.

    With logits ``z_ij`` (``-d_ij * scale``, soft-capped, plus the priors),
    ``P_ij`` the responsibilities, ``c_ij = keep_ij / (1 - p)`` the dropout
    factor (1 without V8) and ``b_ij = c_ij <u_i, v_j>``::

        dLoss/dv_j  = sum_i P_ij c_ij u_i                      (responsibility-weighted M-step)
        Delta_i     = sum_j P_ij b_ij  (= <u_i, a_i>)
        dLoss/dz_ij = P_ij (b_ij - Delta_i)                    (the "advantage" routing gradient)
        dLoss/dsink = -P_i,sink Delta_i                         (V5: one more column, value 0)
        dLoss/dx_ij = dLoss/dz_ij (1 - (s_ij / softcap)^2)      (V3: the tanh's derivative)
                      * score_mod'(x_ij)                       (F3, with a score_mod)
        dq_i = sum_j dLoss/dx_ij dx_ij/dq_i,  dk_j = sum_i dLoss/dx_ij dx_ij/dk_j

    For ``energy="dot"`` ``dx_ij/dq_i = scale k_j``; for ``"sqeuclidean"``
    (``d = ||q - k||^2/2``) ``dx_ij/dq_i = -scale (q_i - k_j)``; the term
    ``-scale q_i sum_j dLoss/dx_ij`` vanishes without sinks, softcap and
    score_mod (``sum_j dLoss/dz_ij = Delta_i P_i,sink``) and is formed only
    with them.  A score_mod's derivative is its ``grad`` or the complex step
    (:func:`iem_ref.flex.score_mod_slope`).
    ``dbias = dLoss/dz`` summed to the shape of ``bias``; ``dsinks`` summed to
    the shape of ``sinks``; with V6 ``dk, dv`` are summed over each group of
    query heads, at ``Hkv`` heads.

    Parameters
    ----------
    q, k, v : as :func:`iem_ref.attention`
    grad_out : array_like, float (B..., N, Dv)
        ``u``, the upstream gradient.
    scale, mask, is_causal, causal_alignment, and the variants : as :func:`iem_ref.attention`
    energy : {"dot", "sqeuclidean"}
    out, lse : ignored by the reference (which recomputes them); the
        accelerated paths reuse the forward's output and log-partition.

    Returns
    -------
    dq (B..., N, D), dk (B..., M, D), dv (B..., M, Dv), broadcast batch shape
    (``Hkv`` heads with ``enable_gqa``); then ``dbias`` (the shape of
    ``bias``) if ``bias`` is given, then ``dsinks`` (the shape of ``sinks``)
    if ``sinks`` is given.

    Examples
    --------
    >>> dq, dk, dv = attention_vjp([[0.0]], [[1.0], [2.0]], [[1.0], [3.0]], [[1.0]])
    >>> dv
    array([[0.5],
           [0.5]])
    """
    energy_of(energy).require("gradient", "attention_vjp")
    inp = prepare_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy,
        bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window, sinks=sinks, enable_gqa=enable_gqa,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask,
        score_mod=score_mod, mask_mod=mask_mod,
    )
    u_in = check_grad_out(grad_out, inp.batch, inp.n, inp.dv)
    u = np.broadcast_to(u_in, inp.batch + (inp.n, inp.dv)).astype(np.float64)
    qq, kk = inp.q.astype(np.float64), inp.k.astype(np.float64)
    comp = Competition(inp)
    M = inp.m
    take = comp.take
    participates = ~np.isposinf(comp.e) if take is None else take & ~np.isposinf(comp.e)
    # A NaN row has NaN responsibilities everywhere; selecting the participating entries
    # keeps its NaN away from the keys it cannot see (NaN reaches affected rows only).
    P = np.where(participates, responsibilities(comp.e, comp.tau, mask=take), 0.0)  # (B..., N, M [+ sink])
    part, Pk = participates[..., :M], P[..., :M]
    nan_row = np.any(participates & np.isnan(comp.e), axis=-1, keepdims=True)  # a NaN energy: the row is NaN
    certain = np.any(participates & np.isneginf(comp.e), axis=-1, keepdims=True) & ~nan_row  # a key (or sink) of score +inf
    c = None if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)  # V8
    read = part if c is None else part & inp.keep  # a dropped pair reads neither v_j nor u_i
    W = Pk if c is None else Pk * c  # the weights of the values
    with np.errstate(invalid="ignore", over="ignore"):
        b = np.where(read, u @ np.swapaxes(comp.v[..., :M, :], -1, -2), 0.0)  # <u_i, v_j>, participating j only
        if c is not None:
            b = b * c  # 0 already wherever the pair is not read
        a = weighted_sum(W, comp.v[..., :M, :], read, limit=True)  # A4, as the forward
        delta = (u * a).sum(axis=-1, keepdims=True)  # Delta_i = <u_i, a_i> (= sum_j P_ij b_ij), as every path forms it
        dZ = np.where(part & (Pk != 0.0), Pk * (b - delta), 0.0)  # dLoss/dz_ij; a zero weight routes nothing
        dZ = np.where(certain, 0.0, dZ)  # a certain row's output stays put under every finite change of its logits
        spoilt = ~np.isfinite(delta)  # a non-finite <u_i, a_i>: its derivatives with respect to the logits are undefined
        dZ = np.where(spoilt & part, np.nan, dZ)
        slope = comp.logit_slope()  # V3's 1 - (s/c)^2, F3's score_mod'(x)
        dX = dZ if slope is None else np.where(dZ == 0.0, 0.0, dZ * slope)  # a pair that routes nothing reads no slope
    # dv reads u_i as the forward reads v_j: an infinite u_i reaches dv_j as itself, whatever P_ij rounds to
    dv = weighted_sum(np.swapaxes(W, -1, -2), u, np.swapaxes(read, -1, -2), limit=True)
    sc = inp.scale
    # a pair with dX_ij = 0 reads neither k_j nor q_i: 0 * inf is taken as 0 (a certain or soft-capped infinite score)
    moves = part & (dX != 0.0)
    dq = sc * weighted_sum(dX, kk, moves)  # sum_j dX_ij k_j
    dk = sc * weighted_sum(np.swapaxes(dX, -1, -2), qq, np.swapaxes(moves, -1, -2))  # sum_i dX_ij q_i
    if energy == "sqeuclidean":
        dk = dk - sc * np.where(np.isfinite(kk), kk, 0.0) * dX.sum(axis=-2)[..., :, None]
        if inp.softcap is not None or inp.sinks is not None or inp.score_mod is not None:
            dq = dq - sc * np.where(np.isfinite(qq), qq, 0.0) * dX.sum(axis=-1)[..., :, None]
    dtype = result_dtype(inp.q, inp.k, inp.v, u_in)
    if inp.group > 1:  # V6: each key head's gradient is the sum over its group of query heads
        dk, dv = (_sum_groups(x, inp.group) for x in (dk, dv))
    grads = [to_dtype(dq, dtype), to_dtype(dk, dtype), to_dtype(dv, dtype)]
    if inp.bias is not None:
        grads.append(to_dtype(_sum_to_shape(dZ, inp.bias_shape), dtype))  # V1: dbias = dLoss/dz
    if inp.sinks is not None:
        with np.errstate(invalid="ignore"):
            dsink = -P[..., M] * delta[..., 0]  # V5: dLoss/dsink_i = -P_i,sink Delta_i
        # the edge cases as for the keys' logits: 0 where the sink does not take part or the row is certain
        dsink = np.where(participates[..., M] & ~certain[..., 0], dsink, 0.0)
        dsink = np.where(participates[..., M] & spoilt[..., 0], np.nan, dsink)
        grads.append(to_dtype(_sum_to_shape(dsink.sum(axis=-1), inp.sinks_shape), dtype))
    return tuple(grads)


def _sum_groups(x, group):
    """``(B..., Hkv * g, M, .) -> (B..., Hkv, M, .)``, summing each group of ``g`` heads (itself when ``g = 1``, any rank)."""
    if group == 1:
        return x
    shape = x.shape[:-3] + (x.shape[-3] // group, group) + x.shape[-2:]
    return x.reshape(shape).sum(axis=-3)


def _sum_to_shape(x, shape):
    """Reduce a broadcast gradient to the shape its argument was given in."""
    lead = x.ndim - len(shape)
    if lead < 0:  # given with leading axes of length 1 that the batch lacks: one head, (1,), for q (N, D)
        x = x.reshape((1,) * -lead + x.shape)
        lead = 0
    x = x.sum(axis=tuple(range(lead))) if lead > 0 else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)
