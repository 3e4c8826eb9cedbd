"""The oracle's own error: a float64 implementation of the backward's formulas (section 12).

12. Backward of the variants, float64 by the formulas (G4, G6)
--------------------------------------------------------------
:func:`variant_vjp_error` bounds ``|g^ - g|`` for a float64 implementation
of :func:`iem_ref.attention_vjp`'s formulas (the reference; torch autograd
through the same composition; two of them differ by at most twice it).
With ``P`` the responsibilities (sink last), ``eta`` the logits' error
(sections 5, 11, ``u = u64``), ``c = keep / (1 - p)``:

* ``P_ij`` relative ``phi_ij = eta_ij + sum_k P_ik eta_ik + 6 u`` (section 4,
  the logits' perturbation passed through the softmax);
* ``b_ij = c_ij <u_i, v_j>``: ``db = gamma_{Dv+1} c sum |u v|``;
  ``Delta_i = <u_i, a_i>`` with ``a_i = sum_j P_ij c_ij v_j``: ``sum_j P_ij
  (phi_ij + gamma_M + gamma_Dv) c_ij sum_c |u_ic v_jc|``;
* ``dZ_ij = P_ij (b_ij - Delta_i)``: ``P (phi |b - Delta| + db + dDelta) +
  2 u |dZ|``; with a soft-cap ``dX = dZ (1 - (s/c)^2)``: ``+ |dZ| (2 eta / c
  + 3 u)`` (``|s/c| <= 1``, ``s`` within ``eta``);
* ``dq_i = scale sum_j dX_ij k_j``: ``scale sum_j (ddX_ij + gamma_M |dX_ij|)
  |k_j| + 2 u |dq_i|``, and for the squared Euclidean energy with sinks or a
  soft-cap ``scale |q_i| (sum_j ddX_ij + gamma_M sum_j |dX_ij|)``; ``dk`` alike
  over the ``N g`` query rows that read it (``g`` the group of V6); ``dv_j =
  sum_i P_ij c_ij u_i``: ``sum_i (phi_ij + gamma_{N g}) P c |u_i|``;
* ``dbias``: ``sum (ddZ + gamma_n |dZ|)`` over the ``n`` broadcast entries
  each element sums; ``dsinks = -sum_i P_i,sink Delta_i``:
  ``sum_i P_sink (phi_sink |Delta_i| + dDelta_i) + gamma_n sum_i |P_sink Delta_i|``.
"""

from __future__ import annotations

import numpy as np

from .primitives import U64, _finite, _weighted, gamma
from .scores import _times_scale, logit_error, score_sizes, slope_error


def variant_vjp_error(q, k, v, grad_out, *, scale=None, energy="dot", **options):
    """Section 12: bounds on ``(dq, dk, dv[, dbias][, dsinks])`` of a float64 implementation of G4/G6.

    ``options``: the keywords of :func:`iem_ref.attention_vjp` (masks,
    causality and the variants); the shapes of the gradients
    :func:`iem_ref.attention_vjp` returns.  Special values: every
    intermediate is taken as 0 where it is not finite, as in
    :func:`attention_vjp_bounds` (the bound holds at the finite entries).
    """
    from ..attention import Competition, prepare_attention
    from ..competition import responsibilities
    from ..gradients import _sum_groups, _sum_to_shape

    inp = prepare_attention(q, k, v, scale=scale, energy=energy, **options)
    comp = Competition(inp)
    u = U64
    M, N, D, Dv, g = inp.m, inp.n, inp.q.shape[-1], inp.dv, inp.group
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    part = ~np.isposinf(comp.e) if comp.take is None else comp.take & ~np.isposinf(comp.e)
    with np.errstate(invalid="ignore"):
        P = _finite(np.where(part, responsibilities(comp.e, comp.tau, mask=comp.take), 0.0))
    q64, k64, v64 = (np.abs(_finite(x.astype(np.float64))) for x in (inp.q, inp.k, inp.v))
    uu = _finite(np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (N, Dv)))
    absu = np.abs(uu)
    S = score_sizes(inp.q, inp.k, energy, expanded=False)
    eta_x = gamma(D + 2, u) * _times_scale(inp.scale, S)
    eta = logit_error(comp, eta_x, u)
    if comp.x is None:
        eta = eta + u * np.abs(_finite(comp.d * inp.scale))  # the division by tau inside the exponent
    if inp.sinks is not None:
        eta = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    eta = np.where(P > 0, _finite(eta), 0.0)
    phi = np.where(P > 0, eta + (P * eta).sum(-1, keepdims=True) + 6 * u, 0.0)
    Pk, phik, partk = P[..., :M], phi[..., :M], part[..., :M]
    c = np.ones(partk.shape) if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        b = _finite(np.where(partk, c * (uu @ T(_finite(inp.v.astype(np.float64)))), 0.0))
        db = _finite(gamma(Dv + 1, u) * c * (absu @ T(v64)))
        delta = _finite((Pk * b).sum(-1, keepdims=True))
        # Delta = <u, a>, a = sum_j P_j c_j v_j: the weights' errors and the M- and Dv-term sums, over sum_c |u_c c v_jc|
        ddelta = _weighted(Pk, (phik + gamma(M, u) + gamma(Dv, u)) * _finite(c * (absu @ T(v64)))).sum(-1, keepdims=True)
        dZ = _finite(Pk * (b - delta))
        ddZ = _weighted(Pk, phik * np.abs(b - delta) + db + ddelta) + 2 * u * np.abs(dZ)
    dX, ddX = dZ, ddZ
    slope = comp.logit_slope()
    if slope is not None:  # V3's factor, F3's derivative (section 11)
        dX = dZ * _finite(slope)
        gain = 1.0 if inp.score_mod is None else np.abs(_finite(comp.score_mod_slope()))  # V3's factor is at most 1
        ddX = gain * ddZ + np.abs(dZ) * slope_error(comp, eta_x, eta[..., :M], u)
    adX = np.abs(dX)
    sc = inp.scale
    dq = sc * (ddX + gamma(M, u) * adX) @ k64
    dk = sc * T(ddX + gamma(N * g, u) * adX) @ q64
    dv = T(Pk * c * (phik + gamma(N * g, u))) @ absu
    if energy == "sqeuclidean":
        dk = dk + sc * k64 * (ddX.sum(-2) + gamma(N * g, u) * adX.sum(-2))[..., :, None]
        if inp.softcap is not None or inp.sinks is not None or inp.score_mod is not None:
            dq = dq + sc * q64 * (ddX.sum(-1) + gamma(M, u) * adX.sum(-1))[..., :, None]
    dq = dq + 2 * u * sc * (adX @ k64)
    if sc == 0.0:  # every term of dq and dk carries the scale: both are exactly 0
        dq, dk = np.zeros_like(dq), np.zeros_like(dk)
    if g > 1:
        dk, dv = _sum_groups(dk, g), _sum_groups(dv, g)
    out = [dq, dk, dv]
    if inp.bias is not None:
        n = max(1, int(np.prod(dZ.shape)) // max(1, int(np.prod(inp.bias_shape))))
        out.append(_sum_to_shape(ddZ + gamma(n, u) * np.abs(dZ), inp.bias_shape))
    if inp.sinks is not None:
        Ps, phis = P[..., M], phi[..., M]
        ds = Ps * (phis * np.abs(delta[..., 0]) + ddelta[..., 0])
        n = max(1, int(np.prod(Ps.shape)) // max(1, int(np.prod(inp.sinks_shape))))
        out.append(_sum_to_shape(ds.sum(-1) + gamma(n, u) * np.abs(Ps * delta[..., 0]).sum(-1), inp.sinks_shape))
    return tuple(out)
