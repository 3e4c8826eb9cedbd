"""Attention: A1-A4 composed, with masks, causality, kernels and the hard limit.

Shape legend: ``B...`` leading (batch, head) axes, which broadcast; ``N``
queries, ``M`` keys, ``D`` features of queries and keys, ``Dv`` features of
values.  ``q (B..., N, D)``, ``k (B..., M, D)``, ``v (B..., M, Dv)``,
output ``(B..., N, Dv)``, log-partition ``(B..., N)``, responsibilities
``(B..., N, M)``.

The pipeline that runs (:func:`attention`), one line per equation, all in
float64 and rounded once to the inputs' dtype::

    d = energy(q, k)                     # A1 (or a kernel, K); tau = 1/scale (T1), scale = 1/sqrt(D) by default
    take = mask & causal                 # which keys take part (selection: the others get no weight)
    t = softmin_terms(d, tau, take)      # m = min d; w_j = exp(-(d_j - m)/tau), shifted error-free; sum w
    r = w / sum(w)                       # A3 (iem_ref.responsibilities)
    L = -m/tau + log(sum w)              # G1, returned with return_lse
    a = sum_j r_j v_j                    # A4 (iem_ref.posterior_mean)

one pass over the energies (:func:`iem_ref.summaries.softmin_summary`'s),
with the edge-case rows (empty, certain, NaN) of the README's policy.

Conventions: ``mask`` is boolean, True = the key takes part (as
``torch.nn.functional.scaled_dot_product_attention``; note that
``nn.MultiheadAttention``'s ``key_padding_mask`` means the opposite), and
broadcasts to ``(B..., N, M)``.  ``is_causal`` lets query ``i`` see keys
``j <= i`` (``causal_alignment="top_left"``, torch's convention) or
``j <= i + M - N`` (``"bottom_right"``, FlashAttention's and KV-cache
decoding's); it combines with ``mask`` by AND.
"""

from __future__ import annotations

import numpy as np

from ._validation import (
    as_float_array,
    as_mask,
    broadcast_batch,
    check_choice,
    check_scale,
    need_ndim,
    result_dtype,
    to_dtype,
)
from .competition import hard_responsibilities, responsibilities
from .energies import energy_of
from .flex import as_score_mod, check_mask_mod, flex_indices, mod_mask, modified_scores, score_mod_slope
from ._accurate import weighted_sum
from .summaries import _softmin_summary
from .variants import (
    _segment_ids,
    alibi_bias,
    as_cu_seqlens,
    as_head_param,
    check_dropout,
    check_softcap,
    check_window,
    log_prior_scores,
    relative_positions,
    repeat_kv_heads,
    segment_mask,
    softcap,
    window_mask,
    with_sink,
)

__all__ = ["attention", "attention_responsibilities", "hard_attention", "causal_mask", "AttentionInputs", "prepare_attention"]

_ALIGN = {"top_left", "bottom_right"}


def causal_mask(n, m, alignment="top_left"):
    """The causal mask ``(N, M)``: True where query ``i`` may see key ``j``.

    ``"top_left"``: ``j <= i``; ``"bottom_right"``: ``j <= i + M - N`` (the last
    query sees every key).

    Examples
    --------
    >>> causal_mask(2, 3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0]])
    >>> causal_mask(2, 3, "bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    check_choice(alignment, "causal_alignment", _ALIGN)
    offset = 0 if alignment == "top_left" else m - n
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    return j <= i + offset


class AttentionInputs:
    """Validated attention inputs, shared by the reference, the exact tier and the accelerated paths.

    Attributes: ``q, k, v`` (original dtypes, batch axes broadcast; ``k, v``
    repeated to the query heads under V6, on first use; ``k_heads, v_heads``
    as given, batch broadcast, ``Hkv`` heads), ``batch`` (tuple), ``n, m, dv``,
    ``tau`` (``1/scale``; ``inf`` for ``scale = 0``), ``scale`` (``1/tau``, 0
    for ``tau = inf``), ``mask`` (bool ``(B..., N, M)`` broadcast view, or
    None), ``is_causal``, ``causal_offset`` (query ``i`` sees
    ``j <= i + offset``; without segments), ``energy`` (a name or a
    callable), ``dtype`` (the output dtype), and the variants (V1-V8):
    ``bias`` (float64 broadcast view or None) and ``bias_shape``, ``slopes``,
    ``softcap``, ``window``, ``cu_seqlens_q/k``, ``sinks`` and ``sinks_shape``,
    ``group`` (query heads per key head, 1 without V6), ``dropout_p``,
    ``keep`` (bool broadcast view or None).
    """

    def __init__(self, q, k, v, scale, mask, is_causal, causal_alignment, energy, variants):
        q = as_float_array(q, "q")
        k = as_float_array(k, "k")
        v = as_float_array(v, "v")
        need_ndim(q, "q", 2, "(..., N, D)")
        need_ndim(k, "k", 2, "(..., M, D)")
        need_ndim(v, "v", 2, "(..., M, Dv)")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q (..., N, D) and k (..., M, D) disagree on D: q has shape {q.shape}, k has shape {k.shape}")
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(f"k (..., M, D) and v (..., M, Dv) disagree on M: k has shape {k.shape}, v has shape {v.shape}")
        energy_of(energy)  # a ValueError naming the energies for an unknown name
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
        check_choice(causal_alignment, "causal_alignment", _ALIGN)
        var = dict(_NO_VARIANTS, **variants)
        self.dtype = result_dtype(q, k, v)
        self.group = 1
        if var["enable_gqa"]:
            self.group = _gqa_group(q, k, v)
        # the batch as if K and V had a head per query head (V6); their own heads stay unrepeated until read
        shapes = [("q", q), ("k", _as_query_heads(k, self.group)), ("v", _as_query_heads(v, self.group))]
        self.batch, (self.q, k_rep, v_rep) = broadcast_batch(shapes, [2, 2, 2])
        kv_batch = self.batch[:-1] + (k.shape[-3],) if self.group > 1 else self.batch
        self.k_heads = np.broadcast_to(k, kv_batch + k.shape[-2:])
        self.v_heads = np.broadcast_to(v, kv_batch + v.shape[-2:])
        self._repeated = None if self.group > 1 else (self.k_heads, self.v_heads)
        self.n, self.m, self.dv = q.shape[-2], k.shape[-2], v.shape[-1]
        self.tau = check_scale(scale, q.shape[-1])
        self.scale = 0.0 if np.isinf(self.tau) else 1.0 / self.tau
        rows = self.batch + (self.n, self.m)
        self.mask = as_mask(mask, rows, "mask")
        self.is_causal = bool(is_causal)
        self.causal_offset = 0 if causal_alignment == "top_left" else self.m - self.n
        self.causal_alignment = causal_alignment
        self.energy = energy
        # the variants, V1-V8
        self.cu_seqlens_q = self.cu_seqlens_k = None
        if (var["cu_seqlens_q"] is None) != (var["cu_seqlens_k"] is None):
            raise ValueError("cu_seqlens_q and cu_seqlens_k go together: give both or neither")
        if var["cu_seqlens_q"] is not None:
            self.cu_seqlens_q = as_cu_seqlens(var["cu_seqlens_q"], "cu_seqlens_q", self.n)
            self.cu_seqlens_k = as_cu_seqlens(var["cu_seqlens_k"], "cu_seqlens_k", self.m)
            if self.cu_seqlens_q.size != self.cu_seqlens_k.size:
                raise ValueError(
                    f"cu_seqlens_q and cu_seqlens_k must describe the same number of segments; "
                    f"got lengths {self.cu_seqlens_q.size} and {self.cu_seqlens_k.size}"
                )
        segments = None if self.cu_seqlens_q is None else self.cu_seqlens_q.size - 1
        self.bias, self.bias_shape = None, None
        if var["bias"] is not None:
            b = as_float_array(var["bias"], "bias")
            self.bias_shape = b.shape
            self.bias = as_float_array(b, "bias").astype(np.float64)
            try:
                self.bias = np.broadcast_to(self.bias, rows)
            except ValueError:
                raise ValueError(f"bias of shape {b.shape} does not broadcast to (B..., N, M) = {rows}") from None
        self.slopes = None
        if var["alibi_slopes"] is not None:
            self.slopes = as_head_param(var["alibi_slopes"], "alibi_slopes", self.batch, segments)
            if not np.isfinite(self.slopes).all():
                raise ValueError("alibi_slopes must be finite")
        self.softcap = check_softcap(var["softcap"])
        self.window = check_window(var["window"])
        self.sinks, self.sinks_shape = None, None
        if var["sinks"] is not None:
            self.sinks_shape = np.shape(var["sinks"])
            self.sinks = as_head_param(var["sinks"], "sinks", self.batch, None)
        self.dropout_p, self.keep = check_dropout(var["dropout_p"], var["dropout_mask"], rows)
        self.score_mod = as_score_mod(var["score_mod"])  # F1, F3
        self.mask_mod = check_mask_mod(var["mask_mod"])  # F2

    def refuse_flex(self, tier):
        """A ValueError naming ``tier`` when the call has a ``score_mod`` or ``mask_mod`` (F1, F2), which only some tiers run."""
        given = [name for name in ("score_mod", "mask_mod") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{tier} does not run {' or '.join(given)}; the NumPy reference (iem_ref.attention, "
                             "iem_ref.attention_vjp), iem_ref.testing's reference and tiled forward oracles, iem_ref.lowp and "
                             "iem_ref.accel.cpu do")

    def given_mask(self):
        """The pairs the call lets take part by mask and by rule: ``mask`` AND ``mask_mod`` (F2), a boolean ``(B..., N, M)`` view; None for neither."""
        if self.mask_mod is None:
            return self.mask
        by_rule = mod_mask(self.mask_mod, self.flex_index(), self.batch + (self.n, self.m))
        return by_rule if self.mask is None else self.mask & by_rule

    def flex_index(self):
        """The indices ``(b, h, q_idx, kv_idx)`` that score_mod and mask_mod read (:func:`iem_ref.flex.flex_indices`)."""
        return flex_indices(self.batch, self.n, self.m)

    @property
    def k(self):
        """The keys ``(B..., M, D)``, one head per query head (V6 repeats a key head over its group on first use)."""
        return self._kv()[0]

    @property
    def v(self):
        """The values ``(B..., M, Dv)``, one head per query head (as :attr:`k`)."""
        return self._kv()[1]

    def _kv(self):
        if self._repeated is None:
            self._repeated = (repeat_kv_heads(self.k_heads, self.group), repeat_kv_heads(self.v_heads, self.group))  # V6
        return self._repeated

    @property
    def plain_scores(self):
        """True when the softmin runs on the energies at ``tau`` (no V1, V2, V3, V5, F1)."""
        return self.bias is None and self.slopes is None and self.softcap is None and self.sinks is None and self.score_mod is None

    def relative_positions(self):
        """``i' - j (N, M)``: the aligned offsets of causality, windows and ALiBi (within segments)."""
        return relative_positions(self.n, self.m, self.causal_alignment, self.cu_seqlens_q, self.cu_seqlens_k)

    def takes_part(self):
        """The structural participation ``(B..., N, M)``: mask, causal, window (V4), segments (V7), mask_mod (F2); None when all keys take part."""
        take = self.given_mask()
        structure = None
        if self.is_causal or self.window is not None:
            rel = self.relative_positions()
            structure = rel >= 0 if self.is_causal else None
            if self.window is not None:
                w = window_mask(rel, self.window)
                structure = w if structure is None else structure & w
        if self.cu_seqlens_q is not None:
            seg = segment_mask(self.cu_seqlens_q, self.cu_seqlens_k)
            structure = seg if structure is None else structure & seg
        if structure is not None:
            take = structure if take is None else take & structure
        return None if take is None else np.broadcast_to(take, self.batch + (self.n, self.m))

    def energies(self):
        """A1 / K: ``d (B..., N, M)`` in float64."""
        fn = energy_of(self.energy).reference
        d = np.asarray(fn(self.q.astype(np.float64), self.k.astype(np.float64)), dtype=np.float64)
        if d.shape != self.batch + (self.n, self.m):
            raise ValueError(f"energy returned shape {d.shape}; expected (B..., N, M) = {self.batch + (self.n, self.m)}")
        return d

    def alibi(self):
        """V2's bias ``(B..., N, M)`` (float64), or None."""
        if self.slopes is None:
            return None
        if self.cu_seqlens_q is not None and self.slopes.ndim == len(self.batch) + 1:  # one slope per segment
            slopes = self.slopes[..., _segment_ids(self.cu_seqlens_q, self.n)][..., None]
        else:
            slopes = self.slopes[..., None, None]
        return alibi_bias(slopes, self.relative_positions())

    def scaled_scores(self, d):
        """T1: ``x = -d scale``; an infinite energy keeps its sign at every scale (``+inf`` excludes, ``-inf`` is certain)."""
        with np.errstate(invalid="ignore"):
            return np.where(np.isinf(d), -d, -d * self.scale)

    def modified_scores(self, x):
        """F1: ``y = score_mod(x, b, h, i, j)``, or ``x`` itself without a score_mod."""
        return x if self.score_mod is None else modified_scores(self.score_mod, x, self.flex_index())

    def logits(self, y, s):
        """The logits ``z (B..., N, M)`` from the modified scores ``y`` (F1) and their soft-capped ``s`` (V3): the log priors bias (V1) and ALiBi (V2) added."""
        for prior in (self.bias, self.alibi()):
            if prior is not None:
                s = log_prior_scores(s, prior)  # V1, V2
        return np.where(np.isneginf(y), -np.inf, s)  # an excluded key (a +inf energy, a -inf score_mod) stays excluded under softcap too


_NO_VARIANTS = dict(
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
)


def _as_query_heads(x, group):
    """A zero-copy stand-in for ``x (..., Hkv, M, D)`` with ``Hkv * group`` heads: for broadcasting the batch shapes only."""
    if group == 1:
        return x
    shape = x.shape[:-3] + (x.shape[-3] * group,) + x.shape[-2:]
    return np.lib.stride_tricks.as_strided(x, shape, (0,) * len(shape), writeable=False)


def _gqa_group(q, k, v):
    """V6: the number of query heads per key/value head (heads on axis -3)."""
    if q.ndim < 3 or k.ndim < 3 or v.ndim < 3:
        raise ValueError(
            f"enable_gqa needs a head axis: q (..., Hq, N, D), k (..., Hkv, M, D), v (..., Hkv, M, Dv); "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    hq, hk = q.shape[-3], k.shape[-3]
    if v.shape[-3] != hk:
        raise ValueError(f"enable_gqa: k and v disagree on the heads: k {k.shape}, v {v.shape}")
    if hk == 0 or hq % hk:
        raise ValueError(f"enable_gqa: the query heads Hq = {hq} must be a multiple of the key/value heads Hkv = {hk}")
    return hq // hk


def prepare_attention(q, k, v, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", **variants):
    """Validate attention arguments once (the boundary every path shares).

    ``variants`` are the keywords of V1-V8 (:mod:`iem_ref.variants`).

    Examples
    --------
    >>> inp = prepare_attention(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 1)))
    >>> inp.batch, inp.n, inp.m, inp.dv, float(inp.tau)  # tau = sqrt(D)
    ((), 2, 4, 1, 1.7320508075688772)
    """
    unknown = set(variants) - set(_NO_VARIANTS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
    return AttentionInputs(q, k, v, scale, mask, is_causal, causal_alignment, energy, variants)


class Competition:
    """The softmin that attention runs, once the variants are applied (float64).

    ``e`` energies and ``tau`` (the plain energies at ``1/scale``, or ``-z`` at
    1 when V1-V3 or V5 change the logits), ``take`` the structural
    participation, ``v`` the values; with sinks (V5) one more key, the last,
    with value 0.  ``x``, ``y`` and ``s`` the scaled, modified (F1) and
    soft-capped scores (None on the plain path), ``keep`` the dropout mask
    (sink column False).
    """

    def __init__(self, inp):
        self.inp = inp
        self.d = inp.energies()  # A1 / K
        self.v = inp.v.astype(np.float64)
        self.take = inp.takes_part()  # mask, causal, window (V4), segments (V7)
        self.keep = inp.keep
        self.x = self.y = self.s = self._mod_slope = None
        if inp.plain_scores:
            self.e, self.tau = self.d, inp.tau  # T1: the softmin of d at tau = 1/scale
            return
        self.x = inp.scaled_scores(self.d)
        self.y = inp.modified_scores(self.x)  # F1
        self.s = self.y if inp.softcap is None else softcap(self.y, inp.softcap)  # V3
        z = inp.logits(self.y, self.s)  # V1, V2
        if inp.sinks is not None:
            z, self.v, self.take = with_sink(z, self.v, self.take, inp.sinks)  # V5: the null hypothesis
            if self.keep is not None:
                rows = inp.batch + (inp.n, 1)
                self.keep = np.concatenate([self.keep, np.zeros(rows, dtype=bool)], axis=-1)
        self.e, self.tau = -z, 1.0  # the softmax of z is the softmin of -z

    def logit_slope(self):
        """``dz/dx (B..., N, M)``: V3's ``1 - (s/c)^2`` times F1's ``score_mod'(x)`` (F3); None where it is 1 (neither)."""
        inp = self.inp
        if inp.softcap is None and inp.score_mod is None:
            return None
        slope = 1.0 if inp.softcap is None else 1.0 - (self.s / inp.softcap) ** 2  # V3
        return slope if inp.score_mod is None else slope * self.score_mod_slope()

    def score_mod_slope(self):
        """F3: ``score_mod'(x) (B..., N, M)``, formed once (:func:`iem_ref.flex.score_mod_slope`); None without a score_mod."""
        if self.inp.score_mod is None:
            return None
        if self._mod_slope is None:
            self._mod_slope = score_mod_slope(self.inp.score_mod, self.x, self.inp.flex_index())
        return self._mod_slope

    def summary(self, empty):
        """A3 + A4 (V8 with dropout): ``(a, L, r)``, ``r`` with the sink's column last when V5."""
        return _softmin_summary(self.e, self.v, self.tau, self.take, empty, keep=self.keep, p=self.inp.dropout_p)


def attention(
    q,
    k,
    v,
    *,
    scale=None,
    mask=None,
    is_causal=False,
    causal_alignment="top_left",
    energy="dot",
    empty="zero",
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
    return_lse=False,
    return_responsibilities=False,
):
    """A1-A4: attention as explicit competition and posterior-mean summary, with the variants V1-V8.

    ``d_ij = energy(q_i, k_j)`` (A1; default ``-<q_i, k_j>``),
    ``r_ij = softmin_j(d_ij * scale)`` (A3; T1 with ``scale = 1/sqrt(D)``),
    ``a_i = sum_j r_ij v_j`` (A4).  The variants change the logits
    ``z = softcap(-d scale) + bias + alibi``, the keys that take part
    (window, segments), add a null hypothesis (sinks) or thin the mean
    (dropout): :mod:`iem_ref.variants`.

    Parameters
    ----------
    q : array_like, float (B..., N, D)
    k : array_like, float (B..., M, D)
    v : array_like, float (B..., M, Dv)
    scale : float, optional
        Inverse temperature, default ``1/sqrt(D)``; ``0`` gives uniform weights.
        Must be finite and ``>= 0`` (the hard limit is :func:`hard_attention`).
    mask : array_like of bool, optional, broadcast to (B..., N, M)
        True = the key takes part.  Masked keys are removed by selection: NaN
        or inf in their keys or values cannot reach the output.
    is_causal : bool
    causal_alignment : {"top_left", "bottom_right"}
        Where query ``i`` sits among the keys, ``i' = i`` or ``i + M - N``:
        for causality, windows and ALiBi (FlashAttention's convention is
        ``"bottom_right"``, torch SDPA's causal mask ``"top_left"``).
    energy : str or callable
        A kernel from :data:`iem_ref.energies.ENERGIES` (``"dot"``,
        ``"sqeuclidean"``, ``"laplace"``, ``"cosine"``, ``"student_t"``,
        ``"huber"``, ``"pseudo_huber"``) or ``f(q, k) -> d (B..., N, M)``.
    empty : {"zero", "nan"}
        Output of a query with no key to attend to (fully masked, or ``M = 0``,
        and no sink): zeros (torch SDPA, FlashAttention) or NaN.  The
        log-partition is ``-inf``.
    bias : array_like, float, broadcast to (B..., N, M), optional
        V1: added to the (soft-capped) scaled scores, as SDPA's float
        ``attn_mask``; ``-inf`` excludes the key as a mask does.
    alibi_slopes : array_like, float (H,) or (B, H), optional
        V2: adds ``-slope |i' - j|`` (heads are the last batch axis; with
        ``cu_seqlens`` a 2-D array is one row of slopes per segment).
    softcap : float > 0, optional
        V3: the scaled score ``x`` becomes ``softcap * tanh(x / softcap)``
        before the bias.
    window : (left, right), optional
        V4: key ``j`` takes part when ``i' - left <= j <= i' + right``; a side
        ``None`` or ``-1`` is unbounded.  Combines with ``is_causal`` by AND.
    sinks : array_like, float (H,), optional
        V5: one more hypothesis per row with this logit and value 0 (it
        enters the log-partition).  A row whose keys are all masked still has
        its sink: it is not empty.
    enable_gqa : bool
        V6: ``q (B..., Hq, N, D)``, ``k, v (B..., Hkv, M, .)``,
        ``Hq = g Hkv``; query head ``h`` reads key head ``h // g`` (torch).
    cu_seqlens_q, cu_seqlens_k : array_like of int (S + 1,), optional
        V7: packed sequences on the token axes (N and M); segment ``s`` is
        ``cu[s] <= i < cu[s+1]``.  Causality, windows and ALiBi align inside
        each segment.
    dropout_p : float in [0, 1)
    dropout_mask : array_like of bool, broadcast to (B..., N, M), optional
        V8: ``a_i = sum_j r_ij keep_ij v_j / (1 - dropout_p)``; the
        responsibilities and the log-partition are those before dropout.
    score_mod : callable or iem_ref.flex.ScoreMod, optional
        F1, FlexAttention's: ``score_mod(score, b, h, q_idx, kv_idx)`` on
        the scaled scores (float64 arrays, indices that broadcast), before
        the soft-cap and the priors; ``-inf`` excludes the key
        (:mod:`iem_ref.flex`).
    mask_mod : callable, optional
        F2, FlexAttention's: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True
        = the key takes part; combines with ``mask`` and the rest by AND.
    return_lse : bool
        Also return the log-partition ``L_i = log sum_j exp(z_ij)`` (with the
        sink's ``exp(sink)``; FlashAttention's LSE of the scaled scores):
        what makes partial results mergeable (M2).
    return_responsibilities : bool
        Also return ``r (B..., N, M)`` (P1: the full posterior); with sinks,
        also the sink's responsibility ``(B..., N)`` after it.

    Returns
    -------
    a : ndarray (B..., N, Dv)
        Output, in the inputs' common float dtype.
    lse : ndarray (B..., N), if ``return_lse``
    r : ndarray (B..., N, M), if ``return_responsibilities``
    r_sink : ndarray (B..., N), if ``return_responsibilities`` and ``sinks``

    Notes
    -----
    Accuracy (float64, ``u = 2**-53``, ``gamma_n = n u / (1 - n u)``): the
    computed energies are within ``eps_j = gamma_D sum_l |q_l k_jl|`` (dot) or
    ``gamma_{D+1} d_j`` (sqeuclidean); with ``t_j = (d_j - min d) scale`` the
    exponents are within ``eta_j = scale (eps_j + max_k eps_k) + gamma_1 t_j``
    (the ``fl(1/scale)`` rounding), so ``log r_j`` is within
    ``zeta_j = eta_j + sum_k r_k eta_k``; the softmin adds 3 ulps per weight and
    the matmul ``gamma_M``.  Hence, per output element,
    ``|a - a_exact| <= sum_j |v_j| r_j ((1 + 6u) expm1(zeta_j) + 6u)
    + gamma_M sum_j r_j e^{zeta_j} (1 + 6u) |v_j|``
    (tested against the exact tier in ``tests/test_accuracy.py``; the energies'
    matmul dominates, e.g. up to ~57 ulps of the output on N(0,1) inputs).
    With V1-V3 or V5 the logits ``z`` are formed first (one more rounding each
    for the product by ``scale``, the soft-cap and each added prior, relative
    to ``|z|``), then the same softmin runs at ``tau = 1``.

    Examples
    --------
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [0.0]])
    >>> attention(q, k, v, scale=np.log(3.0))  # r = (3/4, 1/4)
    array([[0.75]])
    >>> attention(q, k, v, scale=np.log(3.0), sinks=np.log(4.0))  # a null hypothesis of weight 4: r = (3/8, 1/8), sink 1/2
    array([[0.375]])
    """
    check_choice(empty, "empty", {"zero", "nan"})
    inp = prepare_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy,
        bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window, sinks=sinks, enable_gqa=enable_gqa,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask,
        score_mod=score_mod, mask_mod=mask_mod,
    )
    # A1 (energies), T1 (tau = 1/scale), F1, V1-V5 (logits), F2 (participation), the sink, then A3 + A4 (V8) in one pass
    a, lse, r = Competition(inp).summary(empty)
    out = [to_dtype(a, inp.dtype)]
    if return_lse:
        out.append(to_dtype(lse, inp.dtype))
    if return_responsibilities:
        out.append(to_dtype(r[..., : inp.m], inp.dtype))
        if inp.sinks is not None:
            out.append(to_dtype(r[..., inp.m], inp.dtype))
    return out[0] if len(out) == 1 else tuple(out)


def attention_responsibilities(q, k, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", empty="zero"):
    """T1 (and A3 for any kernel): ``r_ij = softmax_j(<q_i, k_j> * scale)``.

    Scaled dot-product attention weights are the softmin of the dot-product
    energies at temperature ``tau = 1/scale = sqrt(D)``.

    Examples
    --------
    >>> attention_responsibilities([[0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]])
    array([[0.5, 0.5]])
    """
    k = np.asarray(k)
    v = np.zeros(k.shape[:-1] + (0,))
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy)
    r = responsibilities(inp.energies(), inp.tau, mask=inp.takes_part(), empty=empty)
    return to_dtype(r, result_dtype(as_float_array(q, "q"), as_float_array(k, "k")))


def hard_attention(q, k, v, *, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", ties="split", empty="zero", return_responsibilities=False):
    """H1: hard attention ``a_i = v_{argmin_j d_ij}``, the zero-temperature limit (H2).

    The output is the posterior mode of the values (P3); only the winners'
    values are read.

    The winner is the key of **lowest energy** (highest score ``<q, k>``).
    ``ties="split"`` averages the values of tied winners (the limit of soft
    attention as ``scale -> inf``); ``"first"`` takes the first (argmax
    convention).  No ``scale``: a positive scale does not change the argmin.

    Examples
    --------
    >>> hard_attention([[1.0]], [[1.0], [2.0]], [[10.0], [20.0]])
    array([[20.]])
    """
    inp = prepare_attention(q, k, v, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, scale=1.0)
    d = inp.energies()
    take = inp.takes_part()
    r = hard_responsibilities(d, mask=take, ties=ties, empty=empty)
    a = weighted_sum(r, inp.v.astype(np.float64), r > 0)
    a = np.where(np.isnan(r).any(axis=-1, keepdims=True), np.nan, a)
    if empty == "nan":  # also when M = 0, where r has no entry to carry the NaN
        a = np.where((r > 0).any(axis=-1, keepdims=True), a, np.nan)
    if return_responsibilities:
        return to_dtype(a, inp.dtype), to_dtype(r, inp.dtype)
    return to_dtype(a, inp.dtype)
