"""The accelerated paths' backward against the reference (section 10).

10. Backward bounds (G4)
------------------------
Each side (the path and the reference) against the exact gradient, summed
(:func:`attention_vjp_bounds`); evaluated with the reference's ``r``, ``b``,
``dS``.

* ``r_ij = exp(x_ij - L_i)`` from the saved ``L``: relative ``phi_ij =
  score_ij + |dL_i| + u |x_ij - L_i| + 2 p u`` (the path's score, the path's
  forward bound on ``L``, the subtraction, the ``exp``); the reference:
  ``score_ij + 6 u64`` (its ``r`` within 3 ulps).
* ``b_ij = <u_i, v_j>``: ``gamma_Dv sum_c |u_ic v_jc|``.
* ``Delta_i = <u_i, a_i>``: ``sum_c |u_ic| (da_ic + gamma_Dv |a_ic|)`` with
  ``da`` the path's forward bound on ``a`` (the CPU forms it in float64 and
  rounds it to the dtype: ``gamma_Dv(u64) + u <= gamma_Dv(u)``); the reference
  forms it the same way from its own ``a = sum_j r_ij v_j``: ``sum_j r_ij
  (phi_ij + gamma_M + gamma_Dv) B_ij`` with ``B_ij = sum_c |u_ic v_jc|``
  (``|a_c| <= sum_j r_ij |v_jc|``).
* ``dS_ij = r_ij (b_ij - Delta_i)``: ``|ddS| <= r (phi |b - Delta| + db +
  dDelta) + 2u |dS|`` (the subtraction and the product).  These are first
  order in ``phi``.  A row with ``phi_ij > 1/2`` at a key it weighs (huge
  entries, or the expanded squared distance's cancellation in float32,
  where a score's rounding exceeds the scores' spread) is bounded without
  them: each weight it takes part with lies in ``[0, 1]``, so ``|ddS| <= |b|
  + db + |Delta| + dDelta + |dS|`` and ``|dr| <= 1`` for ``dv``.  Pairs of
  weight 0 add no error.
* ``dq_i = scale sum_j dS_ij k_j``: ``scale sum_j (ddS_ij + G |dS_ij|) |k_j|``
  with ``G`` the sum over keys (section 8), plus ``(u_scale + u_s + store)
  |dq|`` (the scale, the product in the state precision, the rounding to
  the dtype); ``dk_j = scale sum_i dS_ij q_i`` alike over queries; for the
  squared Euclidean energy ``dk_j -= scale k_j sum_i dS_ij``: two products
  and the subtraction, ``(u_scale + u_s) scale |A| + (u_scale + 2 u_s) scale
  |k| |C| + (u_s + store) |dk|`` with ``A = sum_i dS_ij q_i``, ``C = sum_i
  dS_ij`` and ``C``'s own sum bound; ``dv_j = sum_i r_ij u_i``: ``sum_i (phi_ij
  + G) r_ij |u_i| + store |dv|``.  The reference: the same with ``u64``,
  ``gamma_n(u64)`` sums, ``u_scale = u64`` (its ``fl(1/tau)``) and its float32
  rounding as ``store``.
* Grouped-query heads (V6): every term is formed per query head (keys and
  values repeated over the group) and the bounds of ``dk``, ``dv`` are then
  summed over the group.  A key's sums run over the ``N g`` query rows of
  its group: the CPU and CUDA stack them into one problem (the tiles are
  planned for ``N g`` rows, forward and backward), the reference sums in
  float64; so ``G`` is the bound of a sum over ``N g`` terms.  The
  per-result terms (the scale, the rounding to the dtype) use the per-head
  magnitudes ``|dk_h|``, ``|dv_h|``, whose group sum is at least ``|dk|``,
  ``|dv|``.
* Sinks (V5): ``r`` sums to ``1 - r_sink`` over the keys and ``C_i = sum_j
  dS_ij = Delta_i r_sink,i = -dsink_i``.  The paths form ``r_sink = exp(sink
  - L)`` in float64 from their saved ``L``: relative ``|dL| + u64 |sink - L|
  + 2 u64``; so ``|dC_i| <= r_sink (phi_s |Delta_i| + dDelta_i) + u64 |C_i|``
  (the reference: its ``r_sink`` within its ulps, its ``Delta``).  ``dsinks``
  sums the rows' bounds in float64 (``gamma_n(u64)`` per side) and rounds
  once to the dtype (per side).  The squared-Euclidean ``dq_i`` subtracts
  ``scale q_i C_i``: ``scale |q_i| |dC_i|`` and the products and subtraction
  as ``dk``'s, one more rounding for CUDA's ``C`` in the dtype; the
  reference sums its own ``dS`` over the keys (``sum_j |ddS_ij| +
  gamma_M(u64) sum_j |dS_ij|``).
* The variants (V1-V3, V8): the path's ``phi`` takes section 11's logit
  error in place of the score error, and its shift is on the logits
  ``z``; ``dS`` is ``dZ``.  A soft-cap gives ``dX = dZ f``,
  ``f = 1 - (s/c)^2 <= 1``, within ``|ddZ| + |dZ| (2 eta / c + 3 u)`` (the
  factor from the path's ``x``, rounded, and the product), and ``dX``
  replaces ``dS`` in ``dq, dk`` and in the squared-Euclidean row sums,
  which the path sums in float64.  Dropout's ``c = keep / (1 - p)``: ``b =
  c <u, v>`` within ``c db + 2 u |b|`` (``c``'s rounding and the product)
  and ``dv_j = sum_i r_ij c_ij u_i`` with ``2 u`` more per term.  ``dbias``
  is the path's ``dZ`` summed over the broadcast entries in float64
  (``sum ddZ + gamma_n(u64) sum |dZ|``) and rounded once.  The reference's
  side is then section 12's bound (its formulas in float64) plus its
  rounding to the dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .forward import _attention_setup, _has_logits, attention_bounds
from .oracle import variant_vjp_error
from .paths import REFERENCE, sum_bound
from .primitives import (
    REFERENCE_R_ULPS,
    U64,
    _finite,
    _store,
    _weighted,
    gamma,
    scale_rounding,
    ulps,
    underflow,
    unit_roundoff,
)
from .scores import logit_error, score_error


class _Quantities(NamedTuple):
    """The reference's quantities both sides of section 10 are evaluated with (non-finite entries taken as 0)."""

    D: Any  # the feature size
    Dv: Any  # the value size
    L: Any  # the log-partition (0 where not finite)
    M: Any  # the keys
    N: Any  # the query rows (``N g``)
    S: Any  # the scores' sizes (section 5)
    a: Any  # the output
    absA: Any  # ``|sum_i dS_ij q_i|``
    absAq: Any  # ``|sum_j dX_ij k_j|``
    absC: Any  # ``|sum_i dS_ij|``
    absdk: Any  # ``|dk|`` per query head
    absdq: Any  # ``|dq|``
    absdv: Any  # ``|dv|`` per query head
    absg: Any  # ``|u|``
    absk: Any  # ``|k|``
    absq: Any  # ``|q|``
    absv: Any  # ``|v|``
    b: Any  # ``<u_i, v_j>`` (times dropout's ``c``)
    comp: Any  # the :class:`~iem_ref.attention.Competition` with the variants (None without)
    dS: Any  # ``dZ``
    dX: Any  # ``dZ`` after a soft-cap's factor
    delta: Any  # ``<u_i, a_i>``
    drop: Any  # dropout's factors ``c`` (V8) or None
    part: Any  # a superset of the pairs that take part
    r: Any  # the responsibilities
    rsink: Any  # the sink's responsibilities (V5) or None
    scale: Any  # the reference's scale
    sink: Any  # the sinks' logits or None
    softcap: Any  # the soft-cap (V3) or None
    sqeuclidean: Any  # the squared Euclidean energy
    u: Any  # the path's unit roundoff
    x: Any  # the reference's scores
    z: Any  # the logits


def _side_vjp(side, u, dtype, ctx, L_err=None, a_err=None):
    """One side's bound on ``(dq, dk, dv)`` against the exact gradient (section 10).

    ``side``: a path (with its forward bounds ``L_err``, ``a_err``) or :data:`REFERENCE`; ``u`` its unit
    roundoff; ``ctx`` the reference's quantities of :func:`attention_vjp_bounds`.
    """
    c = ctx
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    us = side.state_u(u)
    sig_path, sig_ref = score_error(side, u, c.S, c.x, c.scale, c.D)
    if c.comp is not None:  # V1-V3: the logits' errors (section 11)
        sig_path, sig_ref = logit_error(c.comp, sig_path, u), logit_error(c.comp, sig_ref, U64)
    if side.kind == "reference":
        phi = sig_ref + ulps(REFERENCE_R_ULPS, U64)  # its r within 3 ulps of its energies' r
        u_scale = U64  # its fl(1/tau)
        store = c.u if c.u > U64 else 0.0  # its float32 rounding of the float64 gradients
    else:
        with np.errstate(invalid="ignore"):
            shift = u * np.abs(_finite(c.z - c.L[..., None]))
        phi = sig_path + L_err[..., None] + shift + ulps(side.exp_ulps, u)
        u_scale = scale_rounding(u)
        store = _store(u, us)
    r, b, delta, dS = c.r, c.b, c.delta, c.dS
    rsink = c.rsink
    absg, absv, absq, absk = c.absg, c.absv, c.absq, c.absk
    M, N, Dv, sc = c.M, c.N, c.Dv, c.scale
    phi = np.where(r > 0, phi, 0.0)
    # A row whose weights the first-order terms do not bound (a score error above 1/2 at a key it weighs: huge
    # entries, or the expanded squared distance's cancellation in float32): each weight it takes part with is
    # only known to lie in [0, 1], so |dS_path - dS| <= |b| + db + |Delta| + dDelta + |dS| and |r_path - r| <= 1.
    loose_row = phi.max(axis=-1, keepdims=True, initial=0.0) > 0.5
    loose = loose_row & c.part
    phi = np.where(loose_row, 0.0, phi)  # the first-order terms, where they hold
    B = absg @ T(absv)  # sum_c |u_c v_jc|
    rv = r  # the weights of dv
    if c.drop is not None:  # V8: b = c <u, v> and dv = sum_i r c u: the factor's rounding and the product's
        B = c.drop * B
        rv = r * c.drop
    db = gamma(Dv, u) * B + (0.0 if c.drop is None else 2 * u * np.abs(b))
    if side.kind == "reference":  # Delta = <u, a>, a = sum_j r_j c_j v_j: the weights' errors, the M- and Dv-term sums
        ddelta = _weighted(r, (phi + gamma(M, U64) + gamma(Dv, U64)) * B).sum(-1)
        # a loose row: both weight vectors sum to at most 1, so |da_c| <= 2 max_j |c_j v_jc|
        ddelta = ddelta + np.where(loose_row[..., 0], 2 * np.where(c.part, B, 0.0).max(axis=-1, initial=0.0), 0.0)
    else:  # Delta = <u, a> from the saved output
        ddelta = (absg * (a_err + gamma(Dv, u) * np.abs(c.a))).sum(-1)
    ddS = _weighted(r, phi * np.abs(b - delta[..., None]) + db + ddelta[..., None]) + 2 * u * np.abs(dS)
    ddS = np.where(loose, np.abs(b) + db + np.abs(delta)[..., None] + ddelta[..., None] + np.abs(dS), ddS)
    ddZ = ddS  # V1: dbias's terms
    if c.softcap is not None:  # V3: dX = dZ (1 - (s/c)^2), as section 12 (the factor from the path's x, then one product)
        eta = sig_path if side.kind != "reference" else sig_ref
        ddS = ddS + np.abs(dS) * (2 * eta / c.softcap + 3 * u)
        dS = c.dX
    absdS = np.abs(dS)
    Gk = sum_bound(side, side.key_sum(M, dtype, N, backward=True), u)
    Gq = sum_bound(side, side.query_sum(N, dtype), u)
    bq = sc * ((ddS + Gk * absdS) @ absk) + (u_scale + us + store) * c.absdq
    dsink = None
    if c.softcap is not None and c.sqeuclidean:  # dq_i -= scale q_i C_i, C_i = sum_j dX_ij summed in float64 by the path
        dC = ddS.sum(-1) + gamma(M, U64) * absdS.sum(-1)
        absC = np.abs(dS.sum(-1))
        bq = (sc * ((ddS + Gk * absdS) @ absk) + sc * absq * dC[..., None] + (u_scale + us) * sc * c.absAq
              + (u_scale + 3 * us) * sc * absq * absC[..., None] + (us + store) * c.absdq)
    if rsink is not None:  # V5: C_i = sum_j dS_ij = Delta_i r_sink,i = -dLoss/dsink_i
        absC = np.abs(rsink * delta)
        if side.kind == "reference":  # its P_sink within its ulps of the exact, its Delta as above
            phi_s = ulps(REFERENCE_R_ULPS, U64)
        else:  # r_sink = exp(sink - L) in float64 from the path's L: L's error, the subtraction, the exp
            with np.errstate(invalid="ignore"):
                phi_s = L_err + U64 * np.abs(_finite(c.sink - c.L)) + 2 * U64
        dC = np.where(rsink > 0, rsink * (phi_s * np.abs(delta) + ddelta), 0.0) + U64 * absC
        dsink = dC  # per row; summed to the sinks' shape by the caller
        if c.sqeuclidean and c.softcap is None:  # dq_i -= scale q_i C_i: C's error, two products, the subtraction (as dk's)
            if side.kind == "reference":  # it sums dS over the keys itself
                dC = ddS.sum(-1) + gamma(M, U64) * absdS.sum(-1)
            bq = (sc * ((ddS + Gk * absdS) @ absk) + sc * absq * dC[..., None] + (u_scale + us) * sc * c.absAq
                  + (u_scale + 3 * us) * sc * absq * absC[..., None] + (us + store) * c.absdq)
    bk = sc * (T(ddS + Gq * absdS) @ absq)
    if c.sqeuclidean:  # dk_j -= scale k_j C_j: C's sum, two products, the subtraction
        Gc = sum_bound(side, side.column_sum(N, dtype), u)
        bk = (bk + sc * absk * (T(ddS).sum(-1) + Gc * absdS.sum(-2))[..., None]
              + (u_scale + us) * sc * c.absA + (u_scale + 2 * us) * sc * absk * c.absC[..., None]
              + (us + store) * c.absdk)
    else:
        bk = bk + (u_scale + us + store) * c.absdk
    if sc == 0.0:  # every term of dq and dk carries the scale: both are exactly 0 (no 0 * inf from an unbounded term)
        bq, bk = np.zeros_like(bq), np.zeros_like(bk)
    wv = rv * (phi + Gq + (0.0 if c.drop is None else 2 * u))
    wv = np.where(loose, (1.0 if c.drop is None else c.drop) * (1.0 + Gq + 2 * u), wv)
    bv = T(wv) @ absg + store * c.absdv
    return bq, bk, bv, dsink, ddZ


def attention_vjp_bounds(path, q, k, v, grad_out, dtype=None, *, scale=None, energy="dot", mask=None, is_causal=False,
                         causal_alignment="top_left", bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False,
                         sinks=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, forward=None):
    """The reference's ``(dq, dk, dv[, dbias][, dsinks])`` and the bounds of ``path`` against them (section 10), at the finite entries.

    ``forward``: the path's :class:`ForwardBounds` for the same call (computed if None).  With the
    logits' variants (V1-V3) the path's side runs on ``dZ`` (``dX`` after a soft-cap) and the
    reference's side is section 12's.

    Examples
    --------
    >>> q = np.array([[0.5, -1.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [3.0]])
    >>> refs, bounds = attention_vjp_bounds(REFERENCE, q, k, v, np.array([[1.0]]), np.float64)
    >>> [b.shape for b in bounds], bool(max(b.max() for b in bounds) < 1e-13)
    ([(1, 2), (2, 2), (2, 1)], True)
    """
    from ..attention import attention
    from ..gradients import _sum_groups, _sum_to_shape, attention_vjp

    from ..attention import Competition

    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, window=window,
              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
              dropout_p=dropout_p, dropout_mask=dropout_mask)
    refs = attention_vjp(q, k, v, grad_out, enable_gqa=enable_gqa, sinks=sinks, **kw)
    dtype = np.dtype(refs[0].dtype if dtype is None else dtype)
    u = unit_roundoff(dtype)
    if forward is None:
        forward = attention_bounds(path, q, k, v, dtype, enable_gqa=enable_gqa, sinks=sinks, **kw)[2]
    inp, sc, x, take, S = _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, window=window,
                                           enable_gqa=enable_gqa, sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                           bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                                           dropout_mask=dropout_mask)
    comp = Competition(inp) if _has_logits(inp) or inp.keep is not None else None
    drop = None if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)  # V8's c
    # per query head: keys and values repeated over a group (V6), the batch broadcast
    q64, k64, v64 = (np.asarray(z, np.float64) for z in (inp.q, inp.k, inp.v))
    g64 = np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (inp.n, inp.dv))
    out = attention(q64, k64, v64, return_lse=True, return_responsibilities=True, sinks=inp.sinks, **kw)
    # Special values: every intermediate is taken as 0 where it is not finite.  Under the backward's
    # edge-case policy (README) such a term is either never read (a masked, excluded or dropped pair, a
    # zero routing weight) or makes the gradient entry itself non-finite, where the pattern is compared
    # and no bound applies; the finite entries are sums of finite terms only.
    q64, k64, v64, g64 = (_finite(z) for z in (q64, k64, v64, g64))
    a64, L64, r = (_finite(np.asarray(z, np.float64)) for z in out[:3])
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):  # products of huge finite entries may overflow: also taken as 0
        b = _finite(g64 @ T(v64) if drop is None else drop * (g64 @ T(v64)))
        delta = _finite((g64 * a64).sum(-1))
        dS = _finite(r * (b - delta[..., None]))  # dZ with V1-V3
        dX = dS if inp.softcap is None else dS * (1.0 - (_finite(comp.s) / inp.softcap) ** 2)  # V3
        A, C = _finite(T(dX) @ q64), _finite(dX.sum(-2))  # sum_i dX_ij q_i and sum_i dX_ij
    dk_heads = sc * (A - _finite(k64) * C[..., None]) if energy == "sqeuclidean" else sc * A
    ctx = _Quantities(
        u=u, x=x, S=S, scale=sc, D=inp.q.shape[-1], L=L64, a=a64, r=r, b=b, delta=delta, dS=dS, dX=dX, comp=comp,
        z=x if comp is None or comp.x is None else -comp.e[..., : inp.m], softcap=inp.softcap, drop=drop,
        absg=np.abs(_finite(g64)), absv=np.abs(_finite(v64)), absq=np.abs(_finite(q64)), absk=np.abs(_finite(k64)),
        N=inp.n * inp.group, M=inp.m, Dv=inp.dv, sqeuclidean=energy == "sqeuclidean", absA=np.abs(A), absC=np.abs(C),
        absdq=np.abs(_finite(np.asarray(refs[0], np.float64))), absdk=np.abs(dk_heads), absdv=np.abs(T(r if drop is None else r * drop) @ g64),
        rsink=None if inp.sinks is None else np.asarray(out[3], np.float64),
        part=np.broadcast_to(True if take is None else take, x.shape) & ~np.isneginf(x),  # a superset of the pairs that take part
        sink=None if inp.sinks is None else inp.sinks[..., None], absAq=np.abs(dX @ k64),
    )
    mine = _side_vjp(path, u, dtype, ctx, forward.L_path, forward.a_path)
    sizes = [np.abs(_finite(z)).max(initial=0.0) for z in (q64, k64, v64, g64)]
    floor = 2 * underflow(dtype, inp.m + inp.n * inp.group + inp.q.shape[-1] + inp.dv + 8,
                          (1.0 + sc) * np.prod([1.0 + z for z in sizes]))  # section 3b, both sides
    if comp is not None:  # the reference's side: section 12, then its rounding to the dtype
        ref_store = u if u > U64 else 0.0
        ref12 = variant_vjp_error(q, k, v, grad_out, enable_gqa=enable_gqa, sinks=sinks, **kw)
        ref12 = [e + ref_store * np.abs(_finite(np.asarray(g_, np.float64))) for e, g_ in zip(ref12, refs)]
        total = [mine[0] + ref12[0]] + [_sum_groups(m_, inp.group) + r_ for m_, r_ in zip(mine[1:3], ref12[1:3])]
        rest = ref12[3:]
        if inp.bias is not None:  # dZ in the dtype, summed in float64 over the broadcast entries, rounded once
            absd = np.abs(_finite(np.asarray(refs[3], np.float64)))
            n = max(1, int(np.prod(mine[4].shape)) // max(1, int(np.prod(inp.bias_shape))))
            mine_db = _sum_to_shape(mine[4] + gamma(n, U64) * np.abs(dS), inp.bias_shape) + _store(u, U64) * absd
            total.append(mine_db + rest[0])
            rest = rest[1:]
        if inp.sinks is not None:
            rows = np.prod(inp.batch + (inp.n,), dtype=np.int64) // max(1, int(np.prod(inp.sinks_shape, dtype=np.int64)))
            absd = np.abs(_finite(np.asarray(refs[-1], np.float64)))
            per_row = _finite(mine[3]) + gamma(int(rows), U64) * np.abs(_finite(ctx.rsink * delta))
            total.append(_sum_to_shape(per_row.sum(axis=-1), inp.sinks_shape) + _store(u, U64) * absd + rest[0])
        return refs, _with_floor(total, floor, inp)
    ref = _side_vjp(REFERENCE, U64, dtype, ctx)
    total = [m_ + r_ for m_, r_ in zip(mine[:3], ref[:3])]
    if inp.group > 1:
        total[1:] = [_sum_groups(t, inp.group) for t in total[1:]]
    if inp.sinks is not None:  # the rows' bounds summed as the rows are, then each side's float64 sum and rounding
        rows = np.prod(inp.batch + (inp.n,), dtype=np.int64) // max(1, int(np.prod(inp.sinks_shape, dtype=np.int64)))
        absd = np.abs(_finite(np.asarray(refs[3], np.float64)))
        per_row = _finite(mine[3] + ref[3]) + 2 * gamma(int(rows), U64) * np.abs(_finite(ctx.rsink * delta))
        total.append(_sum_to_shape(per_row.sum(axis=-1), inp.sinks_shape) + 2 * _store(u, U64) * absd)  # both round to the dtype
    return refs, _with_floor(total, floor, inp)


def _with_floor(total, floor, inp):
    """Section 3b's ``floor`` added to each gradient bound, times the rows (and heads) a ``dbias`` or ``dsinks`` element sums."""
    rows = max(1, int(np.prod(inp.batch + (inp.n, inp.m), dtype=np.int64)))
    return tuple(t + floor * (1 if i < 3 else rows // max(1, t.size)) for i, t in enumerate(total))
