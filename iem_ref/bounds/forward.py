"""The accelerated paths' forward against the reference (section 9).

9. Forward bounds
-----------------
Per output element, with the reference's ``r``: ``P = sum_j r_j |v_j|``,
``W = sum_j r_j |v_j - a|`` and ``V = max_j |v_j|`` (that column).  To first
order ``o = sum_j w_j (1 + e_j)(1 + g_j) v_j``, ``l = sum_j w_j (1 + e_j)(1 +
g'_j)`` (``|e_j| <= E``, ``|g|, |g'| <= G``), so ``a^ - a = sum_j r_j e_j (v_j -
a) + sum_j r_j g_j v_j - a sum_j r_j g'_j`` and ``|a^ - a| <= E W + G (P +
|a|) + rho_R min(V / 2, W) + out |a|`` (``E W`` in its form valid for any
``E``, ``min(W expm1(E) e^E, H)`` with ``H = max_j |v_j - a|`` over the
participating keys: :func:`_weight_term`) with ``out`` the division and the
output rounding (CPU: float64 division ``u64``, then the dtype ``u`` if
float32; CUDA: the division in the dtype, ``u``).  ``L = m + log l``:
``|L^ - L| <= E + G + rho_R + 2 u_s log M + (u_s + store) |L|`` (``l`` in
``[1, M]``: the ``log`` within 1 ulp, the addition, and for the CPU's
float32 the rounding of the float64 ``L``).  The comparison with the
reference adds its own error (section 4: ``(6 u64 + gamma_M(u64)) P`` and
``4 u64 |L| + 2 u64 max|x|``, plus its float32 rounding); its score error is
already in ``E``.  A sink (V5) is one more key of exact score and value 0,
merged after the tiles as one more partial: one more rescale in ``rho`` and
two more roundings (a product and a sum) in the state precision in ``G``.
:func:`forward_bounds`, :func:`attention_bounds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .paths import sum_bound
from .primitives import REFERENCE_R_ULPS, U64, _finite, _store, gamma, log_partition_error, ulps, underflow, unit_roundoff
from .scores import logit_error, score_error, score_sizes


@dataclass
class ForwardBounds:
    """Bounds of one forward (section 9).

    ``a (B..., N, Dv)`` and ``L (B..., N)`` bound ``|path - reference|``;
    ``a_path`` and ``L_path`` the path's part (``|path - exact|``), which the
    backward uses; ``E (B..., N)`` the weight term.
    """

    a: np.ndarray
    L: np.ndarray
    a_path: np.ndarray
    L_path: np.ndarray
    E: np.ndarray


def _spreads(x, part, v, a_ref, c=None):
    """``(P, W, V)`` of section 9, ``(B..., N, Dv)``: ``sum_j r_j |v_j|``, ``sum_j r_j |v_j - a|``, ``max_j |v_j|``.

    ``r`` the responsibilities of the scores ``x`` over the pairs ``part``; one value column at a time
    (memory ``O(B N M)``).  ``c (B..., N, M)``: per-pair factors of the values (dropout, V8: the mean
    is ``sum_j r_j c_j v_j``, a dropped pair a value 0 that still shares the normaliser).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.where(part, x, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
        w = np.where(part, np.exp(np.where(part, x - np.where(np.isfinite(m), m, 0.0), -np.inf)), 0.0)
    total = w.sum(-1, keepdims=True)
    r = w / np.where(total > 0, total, 1.0)
    v = _finite(np.asarray(v, np.float64))
    a = _finite(np.asarray(a_ref, np.float64))
    f = 1.0 if c is None else c
    P = (r * f) @ np.abs(v)
    cols = range(v.shape[-1])
    W = np.stack([(r * np.abs(f * v[..., None, :, k] - a[..., :, k, None])).sum(-1) for k in cols], axis=-1) if cols else np.zeros(P.shape)
    # H: the farthest participating value from a; any convex combination of the values is within it
    H = np.stack([np.where(part, np.abs(f * v[..., None, :, k] - a[..., :, k, None]), 0.0).max(-1, initial=0.0) for k in cols],
                 axis=-1) if cols else np.zeros(P.shape)
    V = np.abs(v).max(axis=-2, keepdims=True, initial=0.0) * np.max(f)
    shape = np.broadcast_shapes(P.shape, W.shape, a.shape)
    return (np.broadcast_to(P, shape), np.broadcast_to(W, shape), np.broadcast_to(V, v.shape[:-2] + (1, v.shape[-1])),
            np.broadcast_to(H, shape))


def _weight_term(E, W, H):
    """The weights' part of section 9, ``E W`` to first order, valid for any ``E``: ``min(W expm1(E) e^E, H)``.

    Weights ``w_j f_j`` with ``|log f_j| <= E`` move ``a`` by ``|sum_j r_j (f_j - 1)(v_j - a)| / sum_j r_j f_j
    <= W expm1(E) e^E``; and both results are convex combinations of the participating values, so within
    ``H = max_j |v_j - a|`` of each other whatever ``E`` (a score error beyond ``1``, e.g. float32 scores
    of size ``1e29``, leaves nothing else).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        first = W * (np.expm1(E) * np.exp(E))[..., None]
    return np.minimum(np.where(np.isnan(first), np.inf, first), H)


def forward_bounds(path, dtype, x, S, scale, D, v, a_ref, L_ref, take=None, rows=None, merges=0, eta=None, c=None):
    """Section 9 for scores ``x (B..., N, M)`` (float64, the reference's), sizes ``S`` and values ``v (B..., M, Dv)``.

    ``take`` (broadcast to ``x``; None = all) marks the pairs that take part;
    ``a_ref``, ``L_ref`` the reference's results (their magnitudes enter the
    bound); ``rows``: the query rows the path plans its tiles for (``N g``
    with grouped-query heads; default ``N``); ``merges``: partials merged
    into each row after its key tiles (1 for a sink, V5: one more rescale,
    one multiply and one addition in the state precision); ``eta``: with the
    logits' variants (V1-V3, section 11) ``x`` holds the logits ``z`` and
    ``eta = (path's, reference's)`` their errors, in place of section 5's;
    ``c``: dropout's per-pair factors (V8, ``keep / (1 - p)``): the values
    of each pair are ``c v_j`` and each side divides its mean by ``1 - p``
    once more (``u |a|``).
    """
    u = unit_roundoff(dtype)
    us = path.state_u(u)
    store = _store(u, us)
    x = np.asarray(x, np.float64)
    N, M = x.shape[-2], x.shape[-1]
    N = N if rows is None else int(rows)
    part = np.isfinite(x) if take is None else np.broadcast_to(take, x.shape) & np.isfinite(x)
    xs = np.where(part, x, -np.inf)
    m = xs.max(axis=-1, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    sig_path, sig_ref = score_error(path, u, np.asarray(S, np.float64), x, scale, D) if eta is None else eta
    shift = u * np.abs(_finite(x - m[..., None]))
    exp_term = ulps(path.exp_ulps, u)
    E_path = np.where(part, sig_path + shift, 0.0).max(axis=-1, initial=0.0) + exp_term
    E = np.where(part, sig_path + sig_ref + shift, 0.0).max(axis=-1, initial=0.0) + exp_term
    rho = (path.rescales(M, dtype, N) + merges) * ulps(path.rescale_exp_ulps, us)
    k_T, k_s = path.key_sum(M, dtype, N)
    G = sum_bound(path, (k_T, k_s + 2 * merges), u)
    # rows with scores +inf (energies -inf): those keys share the mass equally (weights exactly 1)
    cert = np.isposinf(x) if take is None else np.broadcast_to(take, x.shape) & np.isposinf(x)
    has_cert = cert.any(axis=-1, keepdims=True)
    Pv, W, V, H = _spreads(np.where(cert, 0.0, x), np.where(has_cert, cert, part), v, a_ref, c)
    A = np.abs(_finite(np.asarray(a_ref, np.float64)))
    La = np.abs(_finite(np.asarray(L_ref, np.float64)))
    xmax = np.abs(np.where(part, x, 0.0)).max(axis=-1, initial=0.0)
    out_ref = u if u > U64 else 0.0  # the reference's float32 rounding of its float64 results
    moved = rho * np.minimum(0.5 * V, W)  # the rescale factors (section 7)
    drop = 0.0 if c is None else u  # the division by 1 - p (V8)
    a_path = _weight_term(E_path, W, H) + G * (Pv + A) + moved + (us + store + drop) * A
    ref_own = (ulps(REFERENCE_R_ULPS, U64) + gamma(M, U64)) * Pv + (0.0 if c is None else U64) * A
    a = _weight_term(E, W, H) + G * (Pv + A) + moved + ref_own + (us + store + out_ref + drop) * A
    log_term = 2 * us * math.log(max(M, 1))
    L_path = E_path + G + rho + log_term + (us + store) * La
    L = E + G + rho + log_term + (us + store) * La + log_partition_error(La, xmax) + out_ref * La
    # section 3b: a subnormal result's roundings are absolute (the relative terms above vanish there)
    vmax = float(np.abs(_finite(np.asarray(v, np.float64))).max(initial=0.0))
    floor = underflow(dtype, M + D + 8, (1.0 + scale) * (1.0 + xmax.max(initial=0.0)) * (1.0 + vmax))
    a_path, L_path, a, L = a_path + floor, L_path + floor, a + 2 * floor, L + 2 * floor
    return ForwardBounds(a=a, L=L, a_path=a_path, L_path=L_path, E=E)


def _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, **variants):
    from ..attention import prepare_attention

    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment,
                            energy=energy, **variants)
    sc = 0.0 if math.isinf(inp.tau) else 1.0 / inp.tau  # the reference's scale (section 5)
    with np.errstate(invalid="ignore"):
        x = -inp.energies() * sc
    take = inp.takes_part()
    S = score_sizes(inp.q, inp.k, energy, path.expanded_sqeuclid)
    return inp, sc, x, take, S


def attention_bounds(path, q, k, v, dtype=None, *, scale=None, energy="dot", mask=None, is_causal=False, causal_alignment="top_left",
                     bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None):
    """The reference's ``(a, L)`` for ``attention`` and :class:`ForwardBounds` of ``path`` against it (finite inputs).

    Examples
    --------
    >>> q = np.array([[1.0, 0.0]]); k = np.eye(2); v = np.array([[1.0], [3.0]])
    >>> from iem_ref.bounds import REFERENCE
    >>> a_ref, L_ref, b = attention_bounds(REFERENCE, q, k, v, np.float64)
    >>> bool(b.a.max() < 1e-13)
    True
    """
    from ..attention import attention

    variants = dict(bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window, enable_gqa=enable_gqa, sinks=sinks,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask)
    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, **variants)
    a_ref, L_ref = attention(q, k, v, return_lse=True, **kw)
    dtype = np.dtype(a_ref.dtype if dtype is None else dtype)
    inp, sc, x, take, S = _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, **variants)
    D = np.shape(q)[-1]
    vals = np.broadcast_to(inp.v, inp.batch + inp.v.shape[-2:])
    x, eta = _logits(path, dtype, inp, x, S, sc, D)
    if inp.sinks is not None:  # V5: the sink as one more key of exact score and value 0, merged after the tiles
        x, S, take, vals = _with_sink_column(inp, x, S, take, vals)
        if eta is not None:
            eta = tuple(np.concatenate([np.broadcast_to(e, inp.batch + e.shape[-2:]), np.zeros(inp.batch + (inp.n, 1))], axis=-1)
                        for e in eta)  # the sink's logit is exact
    c = None
    if inp.keep is not None:  # V8: the values of each pair times keep / (1 - p); the sink's column (value 0) kept at 0
        c = np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
        if inp.sinks is not None:
            c = np.concatenate([c, np.zeros(inp.batch + (inp.n, 1))], axis=-1)
    return a_ref, L_ref, forward_bounds(path, dtype, x, S, sc, D, vals, a_ref, L_ref, take, rows=inp.n * inp.group,
                                        merges=int(inp.sinks is not None), eta=eta, c=c)


def _has_logits(inp):
    """True when V1-V3 turn the scores into other logits (section 11)."""
    return inp.bias is not None or inp.slopes is not None or inp.softcap is not None


def _logits(path, dtype, inp, x, S, scale, D):
    """The logits ``z`` of the inputs and ``(path's, reference's)`` errors of section 11; ``(x, None)`` without V1-V3."""
    if not _has_logits(inp):
        return x, None
    from ..attention import Competition

    comp = Competition(inp)
    u = unit_roundoff(dtype)
    sig_path, sig_ref = score_error(path, u, np.asarray(S, np.float64), x, scale, D)
    z = -comp.e[..., : inp.m]
    return z, (logit_error(comp, sig_path, u), logit_error(comp, sig_ref, U64))


def _with_sink_column(inp, x, S, take, v):
    """Section 9's inputs with the sink (V5) as a last key: its score (exact, ``S = 0``), participation and value 0."""
    rows = inp.batch + (inp.n, 1)
    x = np.concatenate([np.broadcast_to(x, inp.batch + x.shape[-2:]), np.broadcast_to(inp.sinks[..., None, None], rows)], axis=-1)
    S = np.concatenate([np.broadcast_to(S, inp.batch + np.shape(S)[-2:]), np.zeros(rows)], axis=-1)
    if take is not None:
        take = np.concatenate([np.broadcast_to(take, inp.batch + take.shape[-2:]), np.ones(rows, bool)], axis=-1)
    v = np.concatenate([v, np.zeros(inp.batch + (1, v.shape[-1]))], axis=-2)
    return x, S, take, v
