"""The tiled oracle's backward: expected gradients and section 14's sums in bounded memory, a few heads at a time.

:mod:`iem_ref.testing` judges a backward at the sizes kernels are tested at
through :func:`vjp_chunks`.  For a few key heads at a time (with their
query heads):

1. the tiled forward oracle (:func:`~iem_ref.accel.verdict.forward_chunks`)
   gives ``a``, ``L`` and section 13's sums, hence each row's errors of ``L``
   and (rigorously) of ``a``; the float64 backward of
   :mod:`iem_ref.accel.cpu` gives the expected ``dq, dk, dv``;
2. a panel of query rows at a time, against the keys its causality or
   window leaves it (the others have weight 0), the pair quantities
   of section 14 are formed with the same functions as the ``N x M``
   reference path (:func:`~iem_ref.bounds.key_roundings`,
   :func:`~iem_ref.bounds.delta_sums`, :func:`~iem_ref.bounds.pair_roundings`,
   :func:`~iem_ref.bounds.value_roundings`), and the panel's products are
   added into the sums of :class:`~iem_ref.bounds.BackwardSums`.  A panel
   holds at most ``PANEL_BYTES`` of float64 pair quantities.

Supported: the dot energy with a mask, causality (both alignments), a
window and grouped-query heads, finite inputs and gradient.  A kernel that
stores its gradients' partial sums between blocks (``Precision.gradient_blocks``,
torch's CPU backward) has them summed block by block in the panels, in
row and key order, as the ``N x M`` path does.
:func:`unsupported` names what is outside that; the NumPy reference judges it.

The oracle's own error.  Its ``dq, dk, dv`` are section 10's float64 CPU
backward: ``r_ij`` rebuilt from its ``L`` within ``phi_i = expm1(E_i + |dL_i|)``
relative (``E_i`` the row's largest score and subtraction error plus the
``exp``'s ulps, ``dL_i`` its forward bound), ``b_ij`` within ``gamma_Dv(u64)
sum_c |u_ic v_jc| <= gamma_Dv |u_i|_1 vmax``, ``Delta_i`` within ``dDelta_i =
sum_c |u_ic| (da_ic + gamma_Dv |a_ic|)``, ``dS`` within ``P (phi |b - Delta| + db +
dDelta) + 2 u64 |dS|``, and sums within ``gamma_n(u64)``.  Summed with ``|k_j|``
(``sum_j P_ij |k_j| <= kmax``), the bound on ``dq_i`` is ``scale ((phi_i + 2 u + G_M)
aq_i + (gamma_Dv |u_i|_1 vmax + dDelta_i) kmax) + 2 u64 scale |dq_i|``; on ``dk_j``
the same over the query rows with ``phi``'s largest value, ``qmax`` and the key's
``sum_i P_ij |u_i|_1``, ``sum_i P_ij dDelta_i``; on ``dv_j`` ``(phi + G) pu_j + 2 u64
|dv_j|``.  Coarse (maxima in place of sums), it stays below ``1e-6`` of a float32
or lower-precision kernel's tolerance.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..attention import prepare_attention
from ..bounds import (BackwardSums, RowErrors, U64, backward_terms, delta_sums, forward_terms, gamma, key_roundings, pair_roundings,
                      tree_depth, tree_squares, ulps, unit_roundoff, value_roundings)
from ..bounds.kernels import _delta_terms, _stored_partials
from ..energies import energy_of
from .verdict import forward_chunks, own_error

__all__ = ["VjpChunk", "vjp_chunks", "unsupported"]

#: bytes of float64 pair quantities per panel of query rows
PANEL_BYTES = 64 * 2**20
#: key heads per chunk by default
CHUNK_HEADS = 2


class VjpChunk(NamedTuple):
    """The oracle's results for the flat key heads ``[h0, h1)`` and their query heads ``[h0 g, h1 g)``.

    ``dq, dk, dv``: the expected gradients (float64); ``terms``: section 14's
    :class:`~iem_ref.bounds.ErrorTerms` of ``dq / scale``, ``dk / scale``,
    ``dv``; ``own``: the oracle's own error on each (module docstring).
    """

    h0: int
    h1: int
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    terms: tuple
    own: tuple


def unsupported(inp, arrays, precision):
    """Why the tiled backward cannot judge this call (a sentence), or None when it can.

    ``inp`` the prepared inputs, ``arrays`` the float arrays of the call (``q, k, v, grad_out``).
    """
    if inp.energy != "dot":
        return f"energy {inp.energy!r} (the tiled oracle supports 'dot')"
    for name in ("score_mod", "mask_mod"):
        if getattr(inp, name) is not None:
            return f"a {name} (the NumPy reference's alone)"
    for name in ("bias", "slopes", "softcap", "sinks", "keep", "cu_seqlens_q"):
        if getattr(inp, name, None) is not None:
            label = {"slopes": "alibi_slopes", "keep": "dropout", "cu_seqlens_q": "cu_seqlens_q/k"}.get(name, name)
            return f"the variant {label} (the tiled backward supports masks, causality, windows and grouped-query heads)"
    for name, x in zip(("q", "k", "v", "grad_out"), arrays):
        if not np.isfinite(x).all():
            return f"non-finite entries in {name}"
    return None


def _heads(x, batch, extra):
    """``x`` broadcast to ``batch + extra`` and flattened over the batch: a view where broadcasting allows, else a copy."""
    return np.broadcast_to(x, batch + extra).reshape((-1,) + extra)


def _head_mask(inp, f):
    """The mask of query head ``f`` (flat), ``(N, M)`` bool (a view of the broadcast mask), or None without one."""
    if inp.mask is None:
        return None
    idx = np.unravel_index(f, inp.batch) if inp.batch else ()
    return np.broadcast_to(inp.mask, inp.batch + (inp.n, inp.m))[idx]


def _band(inp, i0, i1, align):
    """The keys ``[lo, hi)`` that causality and the window leave to query rows ``[i0, i1)`` (every key outside has weight
    0), widened to multiples of ``align`` keys (the blocks whose partial sums a kernel stores; 1 for none)."""
    lo, hi, off = 0, inp.m, inp.causal_offset
    if inp.is_causal:
        hi = min(hi, i1 + off)
    if inp.window is not None:
        left, right = inp.window
        if left is not None:
            lo = max(lo, i0 + off - left)
        if right is not None:
            hi = min(hi, i1 + off + right)
    lo = min(max(lo, 0), inp.m) // align * align
    hi = min(inp.m, -(-max(hi, lo) // align) * align)
    return lo, hi


def _take(inp, head_mask, rows, lo, hi):
    """The participation of ``rows`` against keys ``[lo, hi)``: the head's mask, causality, the window (bool)."""
    take = np.ones((len(rows), hi - lo), dtype=bool) if head_mask is None else head_mask[rows, lo:hi].copy()
    if inp.is_causal or inp.window is not None:
        rel = (rows[:, None] + inp.causal_offset) - np.arange(lo, hi)[None, :]  # i' - j, the aligned offset
        if inp.is_causal:
            take &= rel >= 0
        if inp.window is not None:
            left, right = inp.window
            if left is not None:
                take &= rel <= left
            if right is not None:
                take &= -rel <= right
    return take


def vjp_chunks(q, k, v, grad_out, precision, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", window=None,
               enable_gqa=False, chunk=None):
    """Yield :class:`VjpChunk` records covering the key heads, ``chunk`` (default ``CHUNK_HEADS``) at a time.

    Arguments as :func:`iem_ref.attention_vjp` (the variants :func:`unsupported` allows);
    ``precision`` the kernel under test's :class:`~iem_ref.precision.Precision`.
    """
    from . import cpu

    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, window=window, enable_gqa=enable_gqa)
    inp = prepare_attention(q, k, v, **{n: x for n, x in kw.items() if n != "enable_gqa" or x})
    why = unsupported(inp, (q, k, v, grad_out), precision)
    if why is not None:
        raise ValueError(f"the tiled backward oracle cannot judge {why}; oracle='reference' judges it")
    N, M, D, Dv, g = inp.n, inp.m, inp.q.shape[-1], inp.dv, inp.group
    kv_batch = inp.k_heads.shape[:-2]
    H = int(np.prod(kv_batch, dtype=np.int64))
    # in their own dtypes: each chunk takes its float64 copy
    qf, uf = _heads(np.asarray(q), inp.batch, (N, D)), _heads(np.asarray(grad_out), inp.batch, (N, Dv))
    kf, vf = _heads(np.asarray(k), kv_batch, (M, D)), _heads(np.asarray(v), kv_batch, (M, Dv))
    sc = inp.scale
    u_s, u_a, u_in = (unit_roundoff(getattr(precision, n)) for n in ("scores", "accumulator", "inputs"))
    u_cast = u_in if u_in > u_s else 0.0
    pe = precision.exp_ulps
    roundings = energy_of("dot").score.roundings  # each product's own rounding, before the tree
    step = CHUNK_HEADS if chunk is None else max(1, int(chunk))
    bq = max(1, min(N, PANEL_BYTES // max(1, 8 * 24 * M)))  # about 24 float64 pair quantities per pair at once
    stored = precision.gradient_blocks is not None and u_in > u_a  # partial sums stored in the input dtype between blocks
    if stored:
        qb, kb = precision.gradient_blocks
        bq = max(qb, bq // qb * qb)  # a panel holds whole query blocks
    else:
        kb = 1
    for h0 in range(0, H if N * M else 0, step):
        h1 = min(H, h0 + step)
        f0, f1 = h0 * g, h1 * g  # their query heads
        qc, uc, kc, vc = (x.astype(np.float64) for x in (qf[f0:f1], uf[f0:f1], kf[h0:h1], vf[h0:h1]))
        mc = None if inp.mask is None else np.stack([_head_mask(inp, f) for f in range(f0, f1)])  # the chunk's own (bool)
        ck = dict(scale=scale, mask=mc, is_causal=is_causal, causal_alignment=causal_alignment, window=window)
        if g > 1:
            ck["enable_gqa"] = True
        (ch,) = forward_chunks(qc, kc, vc, precision, chunk=2**62, **ck)
        dq_e, dk_e, dv_e = (np.asarray(x, np.float64) for x in cpu.attention_vjp(qc, kc, vc, uc, out=ch.a, lse=ch.L, **ck)[:3])
        ta, tL, sum_tree = forward_terms(ch.sums, ch.a, ch.L, precision, M, M, False)
        own_a, own_L = own_error(ch, M, M, D, N * g, sc, ch.vmax, False)
        RL, sL = tL.bound("rigorous"), tL.scale()
        ta_rig, rc_v, rc2_v2 = ta.bound("rigorous"), ch.sums.rc_v, ch.sums.rc2_v2
        delta = (uc * ch.a).sum(-1)
        E = ch.emax + ulps(cpu.arithmetic().exp_ulps, U64) + own_L  # the oracle's r, relative (log)
        with np.errstate(over="ignore"):
            phi = np.expm1(E)
        dDelta = (np.abs(uc) * (own_a + gamma(Dv, U64) * np.abs(ch.a))).sum(-1)
        nh = f1 - f0
        sums = {n: np.zeros((nh, N, D)) for n in ("rq", "vq", "aq", "a2q", "dq", "pk")}
        for n in ("rk", "vk", "ak", "a2k", "dk", "dk_heads"):
            sums[n] = np.zeros((h1 - h0, M, D))
        for n in ("rv", "vv", "pu", "p2u2", "dv", "dv_heads"):
            sums[n] = np.zeros((h1 - h0, M, Dv))
        RD, sD = np.zeros((nh, N)), np.zeros((nh, N))
        cPU, cPD = np.zeros((h1 - h0, M)), np.zeros((h1 - h0, M))
        st = {n: np.zeros(x.shape) for n, x in (("Rq", sums["dq"]), ("sq", sums["dq"]), ("Rk", sums["dk"]), ("sk", sums["dk"]),
                                                  ("Rv", sums["dv"]), ("sv", sums["dv"]))} if stored else None
        for f in range(nh):
            c = f // g
            K, V = kc[c], vc[c]
            absK, K2, absV, V2 = np.abs(K), K * K, np.abs(V), V * V
            dk_h, dv_h = np.zeros((M, D)), np.zeros((M, Dv))
            Vk_h, Vv_h = np.zeros((M, D)), np.zeros((M, Dv))
            for i0 in range(0, N, bq):
                rows = np.arange(i0, min(N, i0 + bq))
                lo, hi = _band(inp, i0, rows[-1] + 1, kb if stored else 1)  # keys outside add nothing to any sum
                Q, U, L = qc[f, rows], uc[f, rows], ch.L[f, rows]
                Kb, Vb, absKb, K2b, absVb, V2b = (y[lo:hi] for y in (K, V, absK, K2, absV, V2))
                take = _take(inp, None if mc is None else mc[f], rows, lo, hi)
                with np.errstate(invalid="ignore", over="ignore"):
                    Lf = np.where(np.isfinite(L), L, 0.0)[:, None]
                    x = sc * (Q @ Kb.T)
                    live = take & np.isfinite(L)[:, None]  # an empty row has no weight
                    P = np.where(live, np.exp(np.where(live, x, 0.0) - Lf), 0.0)
                    S = sc * (np.abs(Q) @ absKb.T)
                    Qs = sc * sc * ((Q * Q) @ K2b.T)
                    S2 = tree_squares(S, Qs, D, total=x) + roundings * Qs
                    t = np.where(live, np.abs(x - Lf), 0.0)
                    e, sq = key_roundings(D, u_s, pe, S, S2, x, t, 0.0)
                    b = np.where(live, U @ Vb.T, 0.0)
                    uv = np.abs(U) @ absVb.T
                    db = tree_depth(Dv) * u_a * uv
                    db_s = u_a * np.sqrt(tree_squares(uv, (U * U) @ V2b.T, Dv, total=b))
                    dl = delta[f, rows][:, None]
                    bd = np.abs(b - dl)
                    rd, sd = _delta_terms(ta_rig[f, rows], precision, ch.a[f, rows], U, delta[f, rows], sum_tree[f, rows],
                                          rc_v[f, rows], rc2_v2[f, rows], delta_sums(P, sq, np.abs(x), b, bd), M, Dv, False)
                    RD[f, rows], sD[f, rows] = rd, sd
                    at = RowErrors(RL[f, rows][:, None], sL[f, rows][:, None], rd[:, None], sd[:, None])
                    dX = P * (b - dl)
                    adX = np.abs(dX)
                    ds = (2 * u_s + u_cast) * adX
                    own_s = u_s * np.sqrt(sq)
                    Rq, Vq, Rk, Vk = pair_roundings(e, own_s, bd, P, db, db_s, ds, at)
                    Rv, Vv = value_roundings(P, e, own_s, u_cast, at)
                sums["rq"][f, rows] = Rq @ absKb
                sums["vq"][f, rows] = Vq @ K2b
                sums["aq"][f, rows] = adX @ absKb
                sums["a2q"][f, rows] = (adX * adX) @ K2b
                sums["dq"][f, rows] = dX @ Kb
                sums["pk"][f, rows] = P @ Kb
                absQ, Q2, absU, U2 = np.abs(Q), Q * Q, np.abs(U), U * U
                band = slice(lo, hi)
                sums["rk"][c, band] += Rk.T @ absQ
                sums["vk"][c, band] += Vk.T @ Q2
                sums["ak"][c, band] += adX.T @ absQ
                sums["a2k"][c, band] += (adX * adX).T @ Q2
                sums["rv"][c, band] += Rv.T @ absU
                sums["vv"][c, band] += Vv.T @ U2
                sums["pu"][c, band] += P.T @ absU
                sums["p2u2"][c, band] += (P * P).T @ U2
                if stored:  # the partial sums after each block but the last: over keys for dq, over query rows for dk, dv
                    R_part, s_part = _stored_partials(dX, Kb, kb, 1.0)
                    # the blocks ending at or after hi (a multiple of kb) hold the row's whole sum
                    after = max(0, -(-M // kb) - hi // kb) if hi < M else 0
                    total = sums["dq"][f, rows]
                    st["Rq"][f, rows] = R_part + after * np.abs(total)
                    st["sq"][f, rows] = np.sqrt(np.square(s_part) + after * total * total)
                    for r0 in range(0, len(rows), qb):
                        dk_h[band] += dX[r0:r0 + qb].T @ Q[r0:r0 + qb]
                        dv_h[band] += P[r0:r0 + qb].T @ U[r0:r0 + qb]
                        if rows[0] + r0 + qb < N:
                            st["Rk"][c] += np.abs(dk_h)
                            st["Rv"][c] += np.abs(dv_h)
                            Vk_h += dk_h * dk_h
                            Vv_h += dv_h * dv_h
                else:
                    dk_h[band] += dX.T @ Q
                    dv_h[band] += P.T @ U
                cPU[c, band] += P.T @ absU.sum(-1)
                cPD[c, band] += P.T @ dDelta[f, rows]
            sums["dk"][c] += dk_h
            sums["dv"][c] += dv_h
            sums["dk_heads"][c] += np.abs(dk_h)
            sums["dv_heads"][c] += np.abs(dv_h)
            if stored:  # a group's heads: their scales add (as the N x M path sums them)
                st["sk"][c] += np.sqrt(Vk_h)
                st["sv"][c] += np.sqrt(Vv_h)
        bs = BackwardSums(**sums)
        with np.errstate(invalid="ignore", over="ignore"):
            terms = backward_terms(bs, RowErrors(RL, sL, RD, sD), precision, M, N * g)
            if stored:
                terms[0].add(u_in * st["Rq"], u_in * st["sq"])
                terms[1].add(u_in * st["Rk"], u_in * st["sk"])
                terms[2].add(u_in * st["Rv"], u_in * st["sv"])
            # the oracle's own error (module docstring)
            qmax = np.abs(qc).reshape(h1 - h0, g * N, D).max(axis=1, initial=0.0)[:, None, :]
            kmax = np.abs(kc).max(axis=1, initial=0.0)[:, None, :]
            kmax_q = np.repeat(kmax, g, axis=0)
            vmax = ch.vmax
            G_M, G_n, gDv = gamma(M, U64), gamma(N * g, U64), gamma(Dv, U64)
            u1 = np.abs(uc).sum(-1)
            own_dq = sc * ((phi + 2 * U64 + G_M)[..., None] * bs.aq + (gDv * u1 * vmax + dDelta)[..., None] * kmax_q) \
                + 2 * U64 * sc * np.abs(dq_e)
            phimax = phi.reshape(h1 - h0, -1).max(axis=1, initial=0.0)[:, None, None]
            own_dk = sc * ((phimax + 2 * U64 + G_n) * bs.ak + qmax * (gDv * vmax * cPU + cPD)[..., None]) + 2 * U64 * sc * np.abs(dk_e)
            own_dv = (phimax + G_n) * bs.pu + 2 * U64 * np.abs(dv_e)
        yield VjpChunk(h0, h1, dq_e, dk_e, dv_e, terms, (own_dq, own_dk, own_dv))
