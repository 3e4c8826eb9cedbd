"""A small NumPy flash-attention kernel in a given precision, with switches for classic one-line bugs.

The kernel is the one :mod:`iem_ref.lowp` describes (its arithmetic, step for
step, written again here without the library's validation so that each bug
is one changed line): key tiles of ``block_k`` keys, the online softmax with
its rescalings, ``P`` rounded to ``precision.probs`` before the value GEMM,
FlashAttention-2's backward from the saved output and LSE.  With no bug it
equals :mod:`iem_ref.lowp` bit for bit (``tests/test_mutations.py`` checks
it).  Masking is structural only (causal, sliding window, a mask_mod);
variants: GQA, softcap, bias, a score_mod (FlexAttention's: applied to the
scaled scores in the scores' precision, its derivative in the backward).

:data:`BUGS` names the mutations; each is a line of a real kernel gone wrong.
"""

from __future__ import annotations

import numpy as np

from iem_ref.flex import as_score_mod, flex_indices, score_mod_slope
from iem_ref.precision import Precision, round_to

LOG2E = 1.0 / np.log(2.0)

#: name -> what the mutated line does
BUGS = {
    "no_rescale": "the running output is not rescaled when the running maximum grows (l still is)",
    "lse_base2": "the returned LSE is in base 2 (m log2 e + log2 l)",
    "log2e_twice": "the scale's log2(e) factor applied twice: the logits are multiplied by log2(e)",
    "causal_top_left": "the causal mask aligned top-left whatever the alignment asked (N != M)",
    "window_off_by_one": "the window's left edge excludes the key at distance exactly `left`",
    "gqa_mod": "query head h reads key/value head h % Hkv instead of h // g",
    "softcap_after_bias": "softcap applied to the biased logits: c tanh((x + bias) / c)",
    "scale_after_softcap": "the scale applied after the softcap: c tanh(S / c) * scale",
    "delta_unrounded_o": "backward: delta = rowsum(dO * O) with the accumulator's O, not the stored rounded one",
    "no_delta": "backward: dS = P * dP, delta not subtracted",
    "no_division_single_tile": "the final division by l skipped for rows whose keys lie in a single tile",
    "round_before_max": "the logits rounded to the probabilities' dtype before the maximum is subtracted",
    "exp_1e-4": "an exp with a relative error of 1e-4 (oscillating: a poor polynomial)",
    "p_bf16": "P rounded to bfloat16 before the value GEMM (in a float32 kernel)",
    "score_mod_unscaled": "the score_mod applied to the unscaled q k^T, the scale after it",
    "score_mod_no_slope": "backward: the score_mod's derivative left out of dS",
    "mask_mod_transposed": "the mask_mod called with q_idx and kv_idx swapped",
}


def _fl(dtype):
    dt = np.dtype(dtype)
    if dt == np.float64:
        return lambda x: np.asarray(x, np.float64)
    return lambda x: round_to(x, dt).astype(np.float64)


def _tree_sum(p, fl):
    n = p.shape[-1]
    while n > 1:
        h = n // 2
        s = fl(p[..., :h] + p[..., h : 2 * h])
        p = s if n % 2 == 0 else np.concatenate([s, p[..., 2 * h :]], axis=-1)
        n = p.shape[-1]
    return p[..., 0]


class FlashKernel:
    """One call's inputs (rounded to ``precision.inputs``), its logits per tile, forward and backward."""

    def __init__(self, q, k, v, precision=None, *, scale=None, is_causal=False, causal_alignment="top_left",
                 window=None, softcap=None, bias=None, enable_gqa=False, score_mod=None, mask_mod=None, block_k=64, bugs=()):
        self.bugs = frozenset(bugs)
        unknown = self.bugs - set(BUGS)
        if unknown:
            raise ValueError(f"unknown bugs {sorted(unknown)}")
        self.p = Precision.of(np.asarray(q).dtype) if precision is None else precision
        self.fl_in, self.fl_s, self.fl_p = _fl(self.p.inputs), _fl(self.p.scores), _fl(self.p.probs)
        self.fl_a, self.fl_o = _fl(self.p.accumulator), _fl(self.p.output)
        q, k, v = (self.fl_in(np.asarray(x).astype(np.float64)) for x in (q, k, v))
        if enable_gqa:
            hq, hkv = q.shape[-3], k.shape[-3]
            heads = np.arange(hq) % hkv if "gqa_mod" in self.bugs else np.arange(hq) // (hq // hkv)
            k, v = k[..., heads, :, :], v[..., heads, :, :]
            self.group = hq // hkv
        else:
            self.group = 1
        self.q, self.k, self.v = q, k, v
        self.n, self.m, self.d = q.shape[-2], k.shape[-2], q.shape[-1]
        self.batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        self.scale = float(self.fl_s(np.float64(1.0 / np.sqrt(self.d) if scale is None else scale)))
        if "log2e_twice" in self.bugs:
            self.scale = float(self.fl_s(np.float64(self.scale * LOG2E)))
        self.softcap, self.bias = softcap, None if bias is None else self.fl_s(np.asarray(bias, np.float64))
        self.is_causal, self.window, self.block_k = is_causal, window, block_k
        self.score_mod, self.mask_mod = as_score_mod(score_mod), mask_mod
        self.idx = flex_indices(self.batch, self.n, self.m)
        align = "top_left" if "causal_top_left" in self.bugs else causal_alignment
        self.offset = 0 if align == "top_left" else self.m - self.n

    def tiles(self):
        return [slice(j, min(j + self.block_k, self.m)) for j in range(0, self.m, self.block_k)]

    def take(self, cs):
        rel = (np.arange(self.n) + self.offset)[:, None] - np.arange(cs.start, cs.stop)[None, :]
        take = np.ones(rel.shape, bool)
        if self.is_causal:
            take &= rel >= 0
        if self.window is not None:
            left, right = self.window
            take &= (rel < left) if "window_off_by_one" in self.bugs else (rel <= left)
            take &= rel >= -right
        if self.mask_mod is not None:
            b, h, qi, ki = self.idx
            ki = ki[:, cs]
            take = take & (self.mask_mod(b, h, ki, qi) if "mask_mod_transposed" in self.bugs else self.mask_mod(b, h, qi, ki))
        return take

    def _tile_index(self, cs):
        b, h, qi, ki = self.idx
        return b, h, qi, ki[:, cs]

    def logits(self, cs):
        fl = self.fl_s
        S = fl(self.q @ np.swapaxes(self.k[..., cs, :], -1, -2))
        t = None
        if "scale_after_softcap" in self.bugs and self.softcap is not None:
            t = fl(np.tanh(fl(S / self.softcap)))
            z = fl(fl(self.softcap * t) * self.scale)
        else:
            z = fl(S * self.scale)
        self.slope = None
        if self.score_mod is not None:  # F1 on the scaled scores, rounded as the kernel's scores; its slope for F3
            idx = self._tile_index(cs)
            with np.errstate(all="ignore"):
                if "score_mod_unscaled" in self.bugs:
                    z = fl(fl(self.score_mod.fn(S, *idx)) * self.scale)
                else:
                    self.slope = fl(score_mod_slope(self.score_mod, z, idx))
                    z = fl(self.score_mod.fn(z, *idx))
            if self.slope is None:
                self.slope = fl(score_mod_slope(self.score_mod, S, idx))
        if "softcap_after_bias" in self.bugs and self.bias is not None:
            z = fl(z + self.bias[..., cs])
        if self.softcap is not None and "scale_after_softcap" not in self.bugs:
            t = fl(np.tanh(fl(z / self.softcap)))
            z = fl(self.softcap * t)
        if self.bias is not None and "softcap_after_bias" not in self.bugs:
            z = fl(z + self.bias[..., cs])
        if "round_before_max" in self.bugs:
            z = self.fl_p(z)
        return np.where(self.take(cs), z, -np.inf), t

    def exp(self, x):
        e = np.exp(x)
        if "exp_1e-4" in self.bugs:
            e = e * (1.0 + 1e-4 * np.sin(1000.0 * np.where(np.isfinite(x), x, 0.0)))
        return self.fl_s(e)

    def forward(self):
        """``(out, lse, o)``: the output in ``precision.output``, the natural-log LSE (float32), the accumulator's output."""
        fl_s, fl_a = self.fl_s, self.fl_a
        rows = self.batch + (self.n,)
        m, l = np.full(rows, -np.inf), np.zeros(rows)
        acc = np.zeros(rows + (self.v.shape[-1],))
        tiles_seen = np.zeros(self.n, int)
        for cs in self.tiles():
            z, _ = self.logits(cs)
            tiles_seen = tiles_seen + self.take(cs).any(axis=-1)
            m_new = np.maximum(m, z.max(axis=-1))
            seen = np.isfinite(m_new)
            m_safe = np.where(seen, m_new, 0.0)
            with np.errstate(invalid="ignore"):
                alpha = np.where(seen, self.exp(fl_s(m - m_safe)), 1.0)
                p = self.exp(fl_s(z - m_safe[..., None]))
            l = fl_s(fl_s(alpha * l) + _tree_sum(p, fl_s))
            pr = self.fl_p(p)
            if "p_bf16" in self.bugs:
                pr = _fl("bfloat16")(pr)
            scaled = acc if "no_rescale" in self.bugs else fl_a(alpha[..., None] * acc)
            acc = fl_a(scaled + pr @ self.v[..., cs, :])
            m = m_new
        has = l > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            o = fl_a(acc / np.where(has, l, 1.0)[..., None])
            if "no_division_single_tile" in self.bugs:
                o = np.where((tiles_seen == 1)[..., None], acc, o)
            o = np.where(has[..., None], o, 0.0)
            if "lse_base2" in self.bugs:
                lse = fl_s(fl_s(m * LOG2E) + fl_s(np.log2(np.where(has, l, 1.0))))
            else:
                lse = fl_s(m + fl_s(np.log(np.where(has, l, 1.0))))
        lse = np.where(has, lse, -np.inf)
        return round_to(o, self.p.output), lse.astype(np.float32), o

    def backward(self, grad_out, fwd=None):
        """FlashAttention-2's backward: ``(dq, dk, dv)`` in ``precision.inputs`` (``dk, dv`` at ``Hkv`` heads with GQA)."""
        fl_s, fl_a, fl_in = self.fl_s, self.fl_a, self.fl_in
        out, lse, o_acc = self.forward() if fwd is None else fwd
        if "lse_base2" in self.bugs:  # the kernel's own backward reads its own convention back
            lse = lse.astype(np.float64) / LOG2E
        O = o_acc if "delta_unrounded_o" in self.bugs else out.astype(np.float64)
        g = np.broadcast_to(fl_in(np.asarray(grad_out).astype(np.float64)), self.batch + (self.n, self.v.shape[-1]))
        delta = fl_a((g * O).sum(axis=-1))
        L = np.asarray(lse, np.float64)[..., None]
        live = np.isfinite(L)
        dq = np.zeros(self.batch + (self.n, self.d))
        dk = np.zeros(self.batch + (self.m, self.d))
        dv = np.zeros(self.batch + (self.m, self.v.shape[-1]))
        row_tiles = [slice(i, min(i + self.block_k, self.n)) for i in range(0, self.n, self.block_k)]
        # a kernel that stores its gradients in the input dtype between blocks (torch's CPU backward)
        bq, bk = self.p.gradient_blocks or (None, None)

        def stored(x, end, block):
            return fl_in(x) if block is not None and end % block == 0 else x

        for cs in self.tiles():
            z, t = self.logits(cs)
            with np.errstate(invalid="ignore"):
                P = np.where(live, self.exp(fl_s(z - np.where(live, L, 0.0))), 0.0)
            dP = fl_s(g @ np.swapaxes(self.v[..., cs, :], -1, -2))
            dS = fl_s(P * dP) if "no_delta" in self.bugs else fl_s(P * fl_s(dP - delta[..., None]))
            if t is not None:
                dS = fl_s(dS * fl_s(1.0 - fl_s(t * t)))
            if self.slope is not None and "score_mod_no_slope" not in self.bugs:
                dS = fl_s(dS * self.slope)
            dS_in, P_in = fl_in(dS), fl_in(P)
            dq = stored(fl_a(dq + dS_in @ self.k[..., cs, :]), cs.stop, bk)
            dk_t = np.zeros(self.batch + (cs.stop - cs.start, self.d))
            dv_t = np.zeros(self.batch + (cs.stop - cs.start, self.v.shape[-1]))
            for rs in row_tiles:  # dK, dV accumulate over query tiles
                dk_t = stored(fl_a(dk_t + np.swapaxes(dS_in[..., rs, :], -1, -2) @ self.q[..., rs, :]), rs.stop, bq)
                dv_t = stored(fl_a(dv_t + np.swapaxes(P_in[..., rs, :], -1, -2) @ g[..., rs, :]), rs.stop, bq)
            dk[..., cs, :], dv[..., cs, :] = dk_t, dv_t
        if self.group > 1:
            dk, dv = self._group_sum(dk), self._group_sum(dv)
        dt = self.p.inputs
        return (round_to(fl_a(dq * self.scale), dt), round_to(fl_a(dk * self.scale), dt), round_to(dv, dt))

    def _group_sum(self, x):
        x = x.reshape(x.shape[:-3] + (x.shape[-3] // self.group, self.group) + x.shape[-2:])
        s = x[..., 0, :, :]
        for h in range(1, self.group):
            s = self.fl_a(s + x[..., h, :, :])
        return s
