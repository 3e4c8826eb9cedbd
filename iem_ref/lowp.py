"""A NumPy emulation of a low-precision attention kernel, forward and backward.

A kernel described by a :class:`iem_ref.precision.Precision` rounds at a few
named steps; this module computes attention with exactly those roundings and
no others, each one a single correct rounding from float64
(:func:`iem_ref.precision.round_to`).  It explains a discrepancy (what a
correct bf16 kernel returns for these inputs), and it is the baseline of the
"at most ``factor`` times the error of a naive low-precision kernel" rule of
:func:`iem_ref.testing.assert_attention_close` (``baseline="emulated"``).

The forward, per query row, over key tiles of ``block_k`` keys (one tile of
all ``M`` keys when ``block_k`` is None), ``fl_T`` a rounding to dtype
``T`` (``s`` = ``precision.scores``, ``p`` = ``probs``, ``a`` =
``accumulator``, ``o`` = ``output``)::

    S   = fl_s(q k^T)                       # a GEMM with a wide accumulator: one rounding
    x   = fl_s(S * fl_s(scale))             # then, in this order, each op rounded to s:
    x   = fl_s(score_mod(x, b, h, i, j))    #   a score_mod (F1), evaluated in float64
    x   = fl_s(c fl_s(tanh(fl_s(x / c))))   #   softcap (V3)
    z   = fl_s(x + fl_s(bias)) ...          #   bias (V1), ALiBi (V2); excluded keys -inf
    m'  = max(m, max_j z_j)                 # exact
    alpha = fl_s(exp(fl_s(m - m')))         # the online rescaling (1 when m' = m)
    P~  = fl_s(exp(fl_s(z - m')))
    l   = fl_s(fl_s(alpha l) + sum_s P~)    # sum_s: a pairwise sum of the unrounded P~,
                                            #   every addition rounded to s
    acc = fl_a(fl_a(alpha acc) + fl_p(P~) v)  # the value GEMM into the accumulator: one rounding
    out = fl_o(fl_a(acc / l))               # after the last tile
    lse = fl_s(m + fl_s(log l))             # natural log, returned in float32 (float64 for a float64 model)

``q, k, v`` (and ``grad_out``) are first rounded to ``precision.inputs``
(exact for arrays already of that dtype).  A GEMM is modelled as its exact
(float64) value rounded once to its accumulator's dtype: a tensor-core MMA
with a wide internal sum; the ``exp``, ``log`` and ``tanh`` are correctly
rounded (the model's ``exp_ulps`` is the tolerance's allowance for a worse
``exp``, not emulated).  With sinks (V5) the running state starts at the
sink: ``m = fl_s(sink)``, ``l = 1``, ``acc = 0``.  A row without any key
returns 0 and ``lse = -inf``.

The backward (:func:`attention_vjp`) is FlashAttention-2's: ``P`` recomputed
from the saved LSE, ``P = fl_s(exp(fl_s(z - lse)))``; ``dP = fl_s(dO v^T)``
(a GEMM from the rounded inputs); ``delta = fl_a(rowsum(dO * O))`` with ``O``
the stored, rounded output; ``dS = fl_s(P fl_s(dP - delta))`` (with a
softcap times ``fl_s(1 - fl_s(t^2))``, ``t`` the recomputed tanh; with a
score_mod times its slope ``fl_s(f'(x))``, F3); then
``dS`` and ``P`` rounded to the input dtype before the GEMMs ``dQ = dS K``,
``dK = dS^T Q``, ``dV = P^T dO``, accumulated in ``precision.accumulator``
(one rounding per key tile for ``dQ``, per query tile of ``block_k`` rows for
``dK`` and ``dV``), multiplied by ``fl_s(scale)`` and rounded to the input
dtype.

Supported: masks, causality (both alignments), ``bias`` (V1),
``alibi_slopes`` (V2), ``softcap`` (V3), ``window`` (V4), ``sinks`` (V5),
``enable_gqa`` (V6; ``dk, dv`` summed over each group in the accumulator),
``cu_seqlens_q/k`` (V7), ``dropout_mask``/``dropout_p`` (V8: the kept
``fl_p(P~)`` enter the value GEMM, the output is multiplied by
``fl_a(1 / (1 - p))``) and FlexAttention's ``score_mod`` and ``mask_mod``
(F1-F3, :mod:`iem_ref.flex`); the dot-product energy only (``energy``
other than ``"dot"`` raises ``ValueError``).

Examples
--------
>>> import ml_dtypes
>>> q = np.array([[1.0, 0.0]], dtype=ml_dtypes.bfloat16); k = np.eye(2).astype(ml_dtypes.bfloat16)
>>> v = np.array([[1.0], [0.0]], dtype=ml_dtypes.bfloat16)
>>> out = attention(q, k, v, scale=1.0)       # r = (e / (1 + e), 1 / (1 + e)) = (0.7311, 0.2689)
>>> out.dtype.name, float(out[0, 0])           # P~ = (1, 0.3679) -> P = (1, 0.3672) in bf16, l = 1.3679 in float32
('bfloat16', 0.73046875)
"""

from __future__ import annotations

import numpy as np

from .attention import prepare_attention
from .flex import modified_scores, score_mod_slope
from .precision import Precision, round_to

__all__ = ["attention", "attention_vjp"]

#: elements of one (batch, rows, keys) float64 work array: rows are processed in chunks of about this size
_CHUNK_ELEMENTS = 1 << 21


def _rounder(dtype):
    """``fl_T``: float64 in, float64 out, every value representable in ``dtype``, one correct rounding."""
    dt = np.dtype(dtype)
    if dt == np.float64:
        return lambda x: np.asarray(x, dtype=np.float64)
    return lambda x: round_to(x, dt).astype(np.float64)


def _upcast(x, name):
    """An array of any float dtype (float16, bfloat16, float8 included) or integers as float64, exactly."""
    arr = np.asarray(x)
    if arr.dtype.kind in "fiu" or arr.dtype.name == "bfloat16" or arr.dtype.name.startswith("float8"):
        return arr.astype(np.float64)
    raise TypeError(f"{name} must be a float array; got dtype {arr.dtype}")


def _tree_sum(p, fl):
    """``sum_j p_j`` over the last axis, pairwise, each addition rounded by ``fl`` (depth ``ceil(log2 n)``)."""
    n = p.shape[-1]
    if n == 0:
        return np.zeros(p.shape[:-1])
    while n > 1:
        h = n // 2
        s = fl(p[..., :h] + p[..., h : 2 * h])
        p = s if n % 2 == 0 else np.concatenate([s, p[..., 2 * h :]], axis=-1)
        n = p.shape[-1]
    return p[..., 0]


def _tiles(n, width):
    width = n if width is None else width
    return [slice(j, min(j + width, n)) for j in range(0, n, max(width, 1))] if n else []


class _Kernel:
    """The validated inputs, the roundings and the logits of one call (shared by the forward and the backward)."""

    def __init__(self, q, k, v, precision, scale, mask, is_causal, causal_alignment, block_k, variants):
        energy = variants.pop("energy", "dot")
        if energy != "dot":
            raise ValueError(f"iem_ref.lowp emulates dot-product attention kernels only; got energy={energy!r}")
        if block_k is not None and (isinstance(block_k, (bool, np.bool_)) or not isinstance(block_k, (int, np.integer)) or block_k < 1):
            raise ValueError(f"block_k must be None or a positive int; got {block_k!r}")
        self.block_k = None if block_k is None else int(block_k)
        qa = np.asarray(q)
        self.precision = Precision.of(qa.dtype) if precision is None else precision
        if not isinstance(self.precision, Precision):
            raise TypeError(f"precision must be an iem_ref.precision.Precision or None; got {type(self.precision).__name__}")
        P = self.precision
        self.fl_in, self.fl_s, self.fl_p = _rounder(P.inputs), _rounder(P.scores), _rounder(P.probs)
        self.fl_a, self.fl_o = _rounder(P.accumulator), _rounder(P.output)
        for name in ("bias", "sinks", "alibi_slopes"):
            if variants.get(name) is not None:
                variants[name] = _upcast(variants[name], name)
        q64, k64, v64 = (self.fl_in(_upcast(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
        self.inp = inp = prepare_attention(q64, k64, v64, scale=scale, mask=mask, is_causal=is_causal,
                                           causal_alignment=causal_alignment, **variants)
        self.q, self.k, self.v = inp.q, inp.k, inp.v  # float64, batch broadcast, GQA heads repeated
        self.scale = float(self.fl_s(np.float64(inp.scale)))
        self.take = inp.takes_part()
        self.flex_index = inp.flex_index()  # F1's (b, h, q_idx, kv_idx), sliced per tile
        self.alibi = inp.alibi()
        self.bias = None if inp.bias is None else self.fl_s(inp.bias)
        self.alibi = None if self.alibi is None else self.fl_s(self.alibi)
        self.softcap = None if inp.softcap is None else float(self.fl_s(np.float64(inp.softcap)))
        self.sinks = None if inp.sinks is None else self.fl_s(inp.sinks)
        self.keep = inp.keep
        self.dropout_scale = None if inp.keep is None else float(self.fl_a(np.float64(1.0 / (1.0 - inp.dropout_p))))
        self.row_chunk = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(inp.batch, dtype=np.int64)) * max(inp.m, 1)))

    def logits(self, rs, cs):
        """``z`` for query rows ``rs`` and key columns ``cs`` (``-inf`` where the key takes no part), the softcap's ``t``
        and the score_mod's slope ``fl_s(f'(x))`` (F3; None without one)."""
        fl = self.fl_s
        S = fl(self.q[..., rs, :] @ np.swapaxes(self.k[..., cs, :], -1, -2))
        z = fl(S * self.scale)
        t = slope = None
        if self.inp.score_mod is not None:  # F1 on the scaled scores, evaluated in float64 and rounded to the scores' dtype
            b, h, qi, ki = self.flex_index
            idx = (b, h, qi[rs], ki[:, cs])
            slope = fl(score_mod_slope(self.inp.score_mod, z, idx))
            z = fl(modified_scores(self.inp.score_mod, z, idx))
        if self.softcap is not None:
            t = fl(np.tanh(fl(z / self.softcap)))
            z = fl(self.softcap * t)
        with np.errstate(invalid="ignore"):
            for prior in (self.bias, self.alibi):
                if prior is not None:
                    z = fl(z + prior[..., rs, cs])
        if self.take is not None:
            z = np.where(self.take[..., rs, cs], z, -np.inf)
        return z, t, slope

    def forward(self):
        inp, fl_s, fl_a = self.inp, self.fl_s, self.fl_a
        out = np.zeros(inp.batch + (inp.n, inp.dv))
        lse = np.full(inp.batch + (inp.n,), -np.inf)
        for rs in _tiles(inp.n, self.row_chunk):
            rows = inp.batch + (rs.stop - rs.start,)
            if self.sinks is None:
                m, l = np.full(rows, -np.inf), np.zeros(rows)
            else:
                m, l = np.broadcast_to(self.sinks[..., None], rows).copy(), np.ones(rows)
            acc = np.zeros(rows + (inp.dv,))
            for cs in _tiles(inp.m, self.block_k):
                z, _, _ = self.logits(rs, cs)
                m_new = np.maximum(m, z.max(axis=-1, initial=-np.inf))
                seen = np.isfinite(m_new)
                m_safe = np.where(seen, m_new, 0.0)
                with np.errstate(invalid="ignore"):
                    alpha = np.where(seen, fl_s(np.exp(fl_s(m - m_safe))), 1.0)
                    p = fl_s(np.exp(fl_s(z - m_safe[..., None])))
                l = fl_s(fl_s(alpha * l) + _tree_sum(p, fl_s))
                pr = self.fl_p(p)
                if self.keep is not None:
                    pr = np.where(self.keep[..., rs, cs], pr, 0.0)
                acc = fl_a(fl_a(alpha[..., None] * acc) + pr @ self.v[..., cs, :])
                m = m_new
            has = l > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                o = fl_a(acc / np.where(has, l, 1.0)[..., None])
                if self.dropout_scale is not None:
                    o = fl_a(o * self.dropout_scale)
                out[..., rs, :] = np.where(has[..., None], o, 0.0)
                lse[..., rs] = np.where(has, fl_s(m + fl_s(np.log(np.where(has, l, 1.0)))), -np.inf)
        return self.fl_o(out), lse

    def lse_dtype(self):
        return np.dtype(np.float64) if self.precision.scores == np.float64 else np.dtype(np.float32)

    def backward(self, grad_out, out, lse):
        inp, fl_s, fl_a, fl_in = self.inp, self.fl_s, self.fl_a, self.fl_in
        B, n, m, d, dv = inp.batch, inp.n, inp.m, self.q.shape[-1], inp.dv
        g = fl_in(_upcast(grad_out, "grad_out"))
        if g.shape[-2:] != (n, dv):
            raise ValueError(f"grad_out must have shape (B..., N, Dv) = (..., {n}, {dv}); got {g.shape}")
        g = np.broadcast_to(g, B + (n, dv))
        O = np.broadcast_to(_upcast(out, "out"), B + (n, dv))
        L = np.broadcast_to(_upcast(lse, "lse"), B + (n,))
        delta = fl_a((g * O).sum(axis=-1))  # the stored (rounded) output; a wide sum, one rounding
        dq = np.zeros(B + (n, d))
        dk = np.zeros(B + (m, d))
        dvv = np.zeros(B + (m, dv))
        # key tiles outside, query tiles inside (FlashAttention-2); without block_k one key tile and
        # row chunks (for memory only) summed in float64, i.e. one rounding per GEMM
        q_tiles = _tiles(n, self.block_k if self.block_k is not None else self.row_chunk)
        between = fl_a if self.block_k is not None else (lambda x: x)
        for cs in _tiles(m, self.block_k):
            dk_t = np.zeros(B + (cs.stop - cs.start, d))
            dv_t = np.zeros(B + (cs.stop - cs.start, dv))
            for rs in q_tiles:
                z, t, slope = self.logits(rs, cs)
                Lr = L[..., rs, None]
                live = np.isfinite(Lr)
                with np.errstate(invalid="ignore"):
                    P = np.where(live, fl_s(np.exp(fl_s(z - np.where(live, Lr, 0.0)))), 0.0)
                dP = fl_s(g[..., rs, :] @ np.swapaxes(self.v[..., cs, :], -1, -2))
                Pv = P
                if self.keep is not None:
                    kp = self.keep[..., rs, cs]
                    c = fl_s(np.float64(self.dropout_scale))
                    dP = np.where(kp, fl_s(dP * c), 0.0)
                    Pv = np.where(kp, fl_s(P * c), 0.0)
                dS = fl_s(P * fl_s(dP - delta[..., rs, None]))
                if t is not None:
                    dS = fl_s(dS * fl_s(1.0 - fl_s(t * t)))
                if slope is not None:
                    dS = fl_s(dS * slope)
                dS_in, P_in = fl_in(dS), fl_in(Pv)
                dq[..., rs, :] = fl_a(dq[..., rs, :] + dS_in @ self.k[..., cs, :])
                dk_t = between(dk_t + np.swapaxes(dS_in, -1, -2) @ self.q[..., rs, :])
                dv_t = between(dv_t + np.swapaxes(P_in, -1, -2) @ g[..., rs, :])
            dk[..., cs, :] = fl_a(dk_t)
            dvv[..., cs, :] = fl_a(dv_t)
        if inp.group > 1:  # V6: the group's accumulators added in the accumulator dtype
            dk, dvv = (self._group_sum(x) for x in (dk, dvv))
        return fl_in(fl_a(dq * self.scale)), fl_in(fl_a(dk * self.scale)), fl_in(dvv)

    def _group_sum(self, x):
        gsz = self.inp.group
        x = x.reshape(x.shape[:-3] + (x.shape[-3] // gsz, gsz) + x.shape[-2:])
        s = x[..., 0, :, :]
        for h in range(1, gsz):
            s = self.fl_a(s + x[..., h, :, :])
        return s


def attention(q, k, v, precision=None, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left",
              block_k=None, return_lse=False, **variants):
    """Attention as a kernel of precision model ``precision`` computes it (module docstring).

    Parameters
    ----------
    q, k, v : array_like (B..., N, D), (B..., M, D), (B..., M, Dv)
        Any float dtype (NumPy float16, ``ml_dtypes`` bfloat16 and float8
        included); rounded to ``precision.inputs``.
    precision : iem_ref.precision.Precision, optional
        Default ``Precision.of(q.dtype)``: float32 scores and accumulator for
        a low-precision ``q``, ``P`` rounded to its dtype, output in it.
    scale, mask, is_causal, causal_alignment, variants
        As :func:`iem_ref.attention` (``energy="dot"`` only).
    block_k : int, optional
        Key tile width: the online softmax across tiles with the rescaling's
        roundings, as a flash kernel.  None: one tile.
    return_lse : bool
        Also return the log-sum-exp of the logits (natural log), float32
        (float64 when ``precision.scores`` is float64).

    Returns
    -------
    out : ndarray (B..., N, Dv) of dtype ``precision.output``
    lse : ndarray (B..., N), if ``return_lse``
    """
    ker = _Kernel(q, k, v, precision, scale, mask, is_causal, causal_alignment, block_k, dict(variants))
    out, lse = ker.forward()
    out = round_to(out, ker.precision.output)
    if return_lse:
        return out, lse.astype(ker.lse_dtype())
    return out


def attention_vjp(q, k, v, grad_out, precision=None, *, out=None, lse=None, scale=None, mask=None, is_causal=False,
                  causal_alignment="top_left", block_k=None, **variants):
    """The backward of a kernel of precision model ``precision``: ``(dq, dk, dv)`` in ``precision.inputs``.

    FlashAttention-2's algorithm with the roundings of the module docstring.
    ``out`` and ``lse``: the forward's stored output (in ``precision.output``)
    and log-sum-exp; both recomputed by :func:`attention` with the same
    arguments when either is None.  ``grad_out (B..., N, Dv)`` is rounded to
    ``precision.inputs``.  Returns the gradients with the broadcast batch
    shape (``Hkv`` heads for ``dk, dv`` with ``enable_gqa``).
    """
    ker = _Kernel(q, k, v, precision, scale, mask, is_causal, causal_alignment, block_k, dict(variants))
    if out is None or lse is None:
        out64, lse64 = ker.forward()
        out = ker.fl_o(out64) if out is None else out
        lse = round_to(lse64, ker.lse_dtype()) if lse is None else lse
    dq, dk, dv = ker.backward(grad_out, out, lse)
    dt = ker.precision.inputs
    return round_to(dq, dt), round_to(dk, dt), round_to(dv, dt)
