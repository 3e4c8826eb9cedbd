"""The tiled oracle's kernel: section 13's sums over keys, tile by tile, in float64 (:mod:`iem_ref.accel.verdict`).

For each query block and each key tile it sees, the kernel forms the tile's
scaled scores and logits as the forward kernel does (:func:`_scaled_scores`,
the variants' logits as :func:`_row_logits` forms them), the responsibilities from the forward's
log-partition (``r_ij = exp(z_ij - L_i)``), each pair's own roundings
(:func:`iem_ref.bounds.key_roundings`, written here for one pair) and six
weight tiles, which three BLAS products per tile fold into the sums of
:class:`iem_ref.bounds.ForwardSums`.  Memory: a few tiles per thread.

A row whose log-partition is ``+inf`` holds certain keys (logits ``+inf``):
they share its mass, ``r = 1 / n``; the kernel weighs them 1 and divides the
row's sums by ``n`` (``n^2`` for the squared ones) once its keys are done.
A row with a NaN or ``-inf`` log-partition (spoiled or empty) has no weight.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit

from ._compile import INNER, instantiate, template
from . import _cpu_kernels
from ._cpu_kernels import (_band_in_tile, _key_tiles, _norms, _logit, _no_mod, _own_at, _scaled_scores, _set_query_norms,
                           _NOTRANS, _TRANS, gemm, scratch)
from ._fastexp import f64_bits, fexp
from ._problem import DOT, _head_of

# sums of tolerance terms in any order (no bit of a verdict depends on it); no finite-math flags: inf and NaN keep their meaning
_SUMS_FM = {"contract", "reassoc"}

# compile-time constants, bound per instance (as in :mod:`._cpu_kernels`); the oracle's energy is the dot product
ENERGY = DOT
VARIANTS = False
FLEX = False
SCORE_MOD = SCORE_SLOPE = _no_mod
SCORE_ULPS = 0.0

#: the per-row sums, in the order of the ``rows`` output's last axis
ROW_SUMS = ("re", "w", "rax", "r", "r2", "emax", "xmax", "rz", "zmax", "zmin")
_NROWS = len(ROW_SUMS)
#: the per-column sums, in the order of the ``cols`` output's second axis
COLUMN_SUMS = ("re_v", "rax_v", "rc_v", "rc2_v2", "wc2_v2", "wc_v")


@njit(error_model="numpy", **INNER)  # S^2 / 0: inf or NaN, whose exponent bits give the right k
def _tree_squares(S, Q, lg, total):
    """:func:`iem_ref.bounds.tree_squares` of one sum of depth ``lg`` whose magnitude is ``total``, in closed form.

    ``min(S^2, 2^l Q)`` is ``2^l Q`` for the levels ``l < k``, ``k = floor(log2(S^2
    / Q)) + 1`` (read from the exponent's bits; ``S^2 >= Q``), then ``S^2``:
    ``(2^k - 1) Q + (lg - k) S^2``.  Branch-free, so the loops that call it vectorise.
    """
    S2 = S * S
    ex = ((f64_bits(S2 / Q) >> 52) & 0x7FF) - 1022  # floor(log2) + 1 of a normal ratio; 0 / 0 and x / 0 give lg
    k = min(max(ex, 0), lg)
    return (np.float64(np.int64(1) << k) - 1.0) * Q + np.float64(lg - k) * S2 + total * total


@njit(**INNER)
def _key_roundings(S, Q, x, t, extra, u_s, p, gD, lg, roundings):
    """:func:`iem_ref.bounds.key_roundings` for one pair: ``(e, sq)`` from the score's size ``S`` and squares ``Q``, the
    finite scaled score ``x``, ``t = L - z`` and the variants' ``extra``; ``S2`` the score's tree squares (the sum
    itself its last level) plus its terms' own roundings."""
    S2 = _tree_squares(S, Q, lg, x) + roundings * Q
    e = gD * S + u_s * (abs(x) + t + 2.0 * p + extra)
    sq = S2 + x * x + t * t + 4.0 * p * p + extra * extra
    return e, sq


@njit(**INNER)
def _or_zero(x):
    """``x``, or 0 where it is not finite."""
    return x if np.isfinite(x) else 0.0


@njit(fastmath=_SUMS_FM, **INNER)
def _plain_row(x, SA, SQ, lo, hi, Li, consts, lg, W, r, acc):
    """Pairs ``[lo, hi)`` of one row of a dot-product call without the variants' logits or dropout (``r = exp(x - L)``;
    a masked pair's ``x = -inf`` gives it weight 0): branch-free, so it vectorises.  ``acc``: the row's :data:`ROW_SUMS`."""
    u_s, p, gD, roundings, g3 = consts[0], consts[1], consts[2], consts[4], consts[5]
    re = 0.0
    ww = 0.0
    rax = 0.0
    rs = 0.0
    r2 = 0.0
    rz = 0.0
    emax = acc[5]
    xmax = acc[6]
    zmax = acc[8]
    zmin = acc[9]
    for j in range(lo, hi):
        xj = x[j]
        fin = np.isfinite(xj)
        xf = xj if fin else 0.0
        rr = fexp(xj - Li)
        S = SA[j]
        Q = SQ[j]
        ax = abs(xf)
        tt = abs(xj - Li) if fin else 0.0
        e, sq = _key_roundings(S, Q, xf, tt, 0.0, u_s, p, gD, lg, roundings)
        w = rr * rr * sq
        W[0, r, j] = rr * e
        W[1, r, j] = rr * ax
        W[2, r, j] = rr
        W[3, r, j] = rr * rr
        W[4, r, j] = w
        W[5, r, j] = w
        re += rr * e
        ww += w
        rax += rr * ax
        rs += rr
        r2 += rr * rr
        rz += rr * xf
        live = rr > 0.0
        own = g3 * S + 1.1102230246251565e-16 * (2.0 * ax + tt) if live else 0.0
        emax = max(emax, own)
        xmax = max(xmax, ax if live else 0.0)
        zmax = max(zmax, xj if fin else -np.inf)
        zmin = min(zmin, xj if fin else np.inf)
    acc[0] += re
    acc[1] += ww
    acc[2] += rax
    acc[3] += rs
    acc[4] += r2
    acc[7] += rz
    acc[5] = emax
    acc[6] = xmax
    acc[8] = zmax
    acc[9] = zmin


@template(**INNER)
def _verdict_block(h, i0, i1, bk_max, L, consts, cols, rows):
    """Section 13's sums for queries ``[i0, i1)`` of one batch element ``h`` over every key tile they see.

    ``L`` the rows' log-partitions (float64), ``consts``: ``(u_s, exp_ulps,
    gamma_D(u_s), tree depth of D, roundings, gamma_{D+3}(u64), 1 where the
    logits are not the scores (a bias, ALiBi, a soft-cap or sinks) else 0)``; ``cols
    (6, rows, Dv)`` and ``rows (rows, 6)`` receive the sums (zeroed here).
    """
    q, k, v = h.q, h.k, h.v
    bq = i1 - i0
    D = q.shape[1]
    Dv = v.shape[1]
    M = k.shape[0]
    u_s, p, gD, lg, roundings, g3 = consts[0], consts[1], consts[2], np.int64(consts[3]), consts[4], consts[5]
    nonplain = consts[6] > 0.0
    scale = h.scale
    X = scratch((bq, bk_max), np.float64)
    SA = scratch((bq, bk_max), np.float64)
    SQ = scratch((bq, bk_max), np.float64)
    W = scratch((6, bq, bk_max), np.float64)
    qa = scratch((bq, D), np.float64)
    q2 = scratch((bq, D), np.float64)
    ka = scratch((bk_max, D), np.float64)
    k2 = scratch((bk_max, D), np.float64)
    va = scratch((bk_max, Dv), np.float64)
    v2 = scratch((bk_max, Dv), np.float64)
    vf = scratch((bk_max, Dv), np.float64)
    certain = scratch(bq, np.float64)
    norms = _norms(q, bq, bk_max)
    _set_query_norms(q, norms, i0, i1)
    for r in range(bq):
        certain[r] = 0.0
        for t in range(7):
            rows[r, t] = 0.0
        rows[r, 7] = 0.0
        rows[r, 8] = -np.inf
        rows[r, 9] = np.inf
        for c in range(Dv):
            for t in range(6):
                cols[t, r, c] = 0.0
        for c in range(D):
            x = _or_zero(q[i0 + r, c])
            qa[r, c] = abs(x)
            q2[r, c] = x * x
    jb, end = _key_tiles(h.keys, h.group, i0, i1, 0, M, bk_max)
    while jb < end:
        bk = min(bk_max, M - jb)
        _scaled_scores(X, bq, bk, h, i0, jb, norms)
        if D > 0:  # the sizes S = scale sum |q k| and squares scale^2 sum q^2 k^2 as two more products
            for j in range(bk):
                for c in range(D):
                    x = _or_zero(k[jb + j, c])
                    ka[j, c] = abs(x)
                    k2[j, c] = x * x
            gemm(_TRANS, _NOTRANS, bk, bq, D, scale, ka, np.int64(0), D, qa, np.int64(0), D, 0.0, SA, np.int64(0), bk_max)
            gemm(_TRANS, _NOTRANS, bk, bq, D, scale * scale, k2, np.int64(0), D, q2, np.int64(0), D, 0.0, SQ, np.int64(0), bk_max)
        else:  # D = 0: every score is an empty sum
            for r in range(bq):
                for j in range(bk):
                    SA[r, j] = 0.0
                    SQ[r, j] = 0.0
        for j in range(bk):
            for c in range(Dv):
                x = _or_zero(v[jb + j, c])
                vf[j, c] = x
                va[j, c] = abs(x)
                v2[j, c] = x * x
        for r in range(bq):
            i = i0 + r
            Li = L[r]
            spoiled = not (Li == Li) or Li == -np.inf  # NaN or empty: no weight
            cert = Li == np.inf
            lo, hi = _band_in_tile(h.keys, h.group, i, jb, bk)
            if not cert and not spoiled and not (VARIANTS and (nonplain or h.has_keep)):
                for t in range(6):
                    for j in range(lo):
                        W[t, r, j] = 0.0
                    for j in range(hi, bk):
                        W[t, r, j] = 0.0
                _plain_row(X[r], SA[r], SQ[r], lo, hi, Li, consts, lg, W, r, rows[r])
                continue
            for t in range(6):
                for j in range(bk):
                    W[t, r, j] = 0.0
            if spoiled:
                continue
            for j in range(lo, hi):
                x = X[r, j]
                if x == -np.inf:  # masked
                    continue
                y = x
                gain = 1.0
                if FLEX:  # F1 as the kernels apply it (_scores), and its slope, which scales the score's own errors
                    pos, head = i // h.group, h.flex_h + i % h.group
                    y = SCORE_MOD(np.float64(x), h.flex_b, head, pos, jb + j)
                    gain = abs(SCORE_SLOPE(np.float64(x), h.flex_b, head, pos, jb + j)) if math.isfinite(x) else 0.0
                z = y
                s = y
                alibi = 0.0
                if VARIANTS and h.logits:  # V1-V3 as the kernels form them (_row_logits), the head read here, not passed per pair
                    bias = _own_at(h.bias, h.bias_group, i, jb + j) if h.has_bias else 0.0
                    if h.has_alibi:
                        alibi = -h.slopes[i] * abs(h.keys[i // h.group, 2] - (jb + j))
                    z = _logit(np.float64(y), h.softcap, bias, alibi)
                    if h.softcap > 0.0:
                        s = h.softcap * math.tanh(y / h.softcap)
                if np.isfinite(z):  # the report's row statistics: the finite logits' range
                    if z > rows[r, 8]:
                        rows[r, 8] = z
                    if z < rows[r, 9]:
                        rows[r, 9] = z
                if cert:
                    rr = 1.0 if z == np.inf else 0.0
                else:
                    rr = fexp(z - Li) if z > -np.inf else 0.0
                if not (rr > 0.0):
                    continue
                c = 1.0
                if VARIANTS and h.has_keep:
                    c = 1.0 / h.dropout_keep if _own_at(h.keep, h.keep_group, i, jb + j) else 0.0
                xf = _or_zero(x)
                ax = abs(xf)
                S = SA[r, j]
                Q = SQ[r, j]
                extra = 0.0  # section 11: the variants' steps, in units of u_s
                if VARIANTS and nonplain:  # the logits are formed apart from the scores: their product by the scale first
                    az = abs(_or_zero(z))
                    extra = ax
                    ay = ax
                    if FLEX:  # F1: its slope times its argument's error, and its own evaluation
                        ay = abs(_or_zero(y))
                        extra = gain * extra + SCORE_ULPS * (ax + ay)
                    if h.softcap > 0.0:
                        a_s = abs(_or_zero(s))
                        f = a_s / h.softcap
                        extra = extra * (1.0 - f * f) + ay + 5.0 * a_s
                    if h.has_bias:
                        extra += az
                    if h.has_alibi:
                        extra += abs(alibi) + az
                tt = 0.0 if cert else _or_zero(abs(z - Li))
                if FLEX:  # the score's sum and its product by the scale reach the logit times the slope (section 11)
                    S, Q, xf, ax = gain * S, gain * gain * Q, gain * xf, gain * ax
                e, sq = _key_roundings(S, Q, xf, tt, extra, u_s, p, gD, lg, roundings)
                w = rr * rr * sq
                W[0, r, j] = rr * e * c
                W[1, r, j] = rr * ax * c
                W[2, r, j] = rr * c
                W[3, r, j] = rr * rr * c * c
                W[4, r, j] = w * c * c
                W[5, r, j] = w * c
                rows[r, 0] += rr * e
                rows[r, 1] += w
                rows[r, 2] += rr * ax
                rows[r, 3] += rr
                rows[r, 4] += rr * rr
                rows[r, 7] += rr * _or_zero(z)
                # the tiled oracle's own score and logit error, for its own bound (section 9's E)
                own = g3 * S + 1.1102230246251565e-16 * (2.0 * ax + tt + extra)
                if own > rows[r, 5]:
                    rows[r, 5] = own
                if ax > rows[r, 6]:
                    rows[r, 6] = ax
                if cert and z == np.inf:
                    certain[r] += 1.0
        if Dv > 0:
            for t in range(6):
                V = va if t < 3 else (v2 if t < 5 else vf)
                gemm(_NOTRANS, _NOTRANS, Dv, bq, bk, 1.0, V, np.int64(0), Dv, W[t], np.int64(0), bk_max, 1.0, cols[t],
                     np.int64(0), Dv)
        jb += bk
    for r in range(bq):
        n = certain[r]
        if n > 0.0:  # certain keys share the row's mass: r = 1 / n
            for t in (0, 2, 3, 7):
                rows[r, t] /= n
            for t in (1, 4):
                rows[r, t] /= n * n
            for c in range(Dv):
                for t in range(3):
                    cols[t, r, c] /= n
                for t in range(3, 6):
                    cols[t, r, c] /= n * n


@template(cache=True, nogil=True, no_cfunc_wrapper=True)
def verdict(stage, thread, nthreads, p, mask, blocks, bk, lse, consts, cols, rows):
    """Section 13's sums for the flat batch elements of ``p``; this thread's share.

    ``lse (B, N)`` the forward's log-partitions, ``cols (Bc, 6, N, Dv)``,
    ``rows (Bc, N, 10)``; work items ``(batch element, query block)``, taken
    ``thread, thread + nthreads, ...``.  The sink's term (V5) is the host's.
    """
    Bc = cols.shape[0]
    nqb = blocks.shape[0] - 1
    for w in range(thread, Bc * nqb, nthreads):
        bl = w // nqb
        i0 = blocks[w % nqb]
        i1 = blocks[w % nqb + 1]
        _verdict_block(_head_of(p, mask, bl), i0, i1, bk, lse[bl, i0:i1], consts, cols[bl, :, i0:i1], rows[bl, i0:i1])


_INSTANCES = {}
_INSTANCES_LOCK = threading.Lock()


def kernels(features):
    """The instance of the verdict kernel (and the forward's helpers it calls) for ``features``, built once per process."""
    with _INSTANCES_LOCK:
        scope = _INSTANCES.get(features)
        if scope is None:
            namespace = dict(vars(_cpu_kernels))
            namespace.update({name: value for name, value in globals().items() if not name.startswith("__")})
            scope = _INSTANCES[features] = instantiate(namespace, features.constants(), "verdict_" + features.tag,
                                                      cache=features.cached)
        return scope
