"""Attention variants read as implicit EM: V1-V8.

Modern attention kernels change the competition in a few ways.  Each is one
small function here, whose body is its equation; :func:`iem_ref.attention`,
:func:`iem_ref.attention_vjp`, :func:`iem_ref.exact.attention` and
:func:`iem_ref.testing.assert_attention_close` take them as keywords.

====  ===================  ============================================  ==========================================
ID    keyword              equation                                      reading
====  ===================  ============================================  ==========================================
V1    ``bias``             ``z_ij = s_ij + bias_ij``                     ``bias = log pi``: a log prior (G5's ``-log pi_j``)
V2    ``alibi_slopes``     ``bias_ij = -slope |i' - j|``                 a Laplace prior over positions (K4)
V3    ``softcap``          ``s = c tanh(x / c)``                         a bounded energy: no key's evidence exceeds ``c``
V4    ``window``           ``-right <= i' - j <= left``                  a restricted hypothesis set
V5    ``sinks``            one more hypothesis, logit ``sink``, value 0  a null (background) hypothesis
V6    ``enable_gqa``       query head ``h`` reads key head ``h // g``    hypothesis sets shared across heads
V7    ``cu_seqlens_q/k``   keys take part only in their own segment      a block-diagonal hypothesis structure
V8    ``dropout_mask``     ``a_i = sum_j r_ij keep_ij v_j / (1 - p)``    a thinned posterior mean
====  ===================  ============================================  ==========================================

The score pipeline, in this order (FlashAttention's ``attention_ref``):
``x = -d scale`` (the scaled score, T1), ``s = softcap(x)`` (V3),
``z = s + bias + alibi`` (V1, V2), the keys that take part (mask, causal, V4,
V7), the sink (V5), the softmax of ``z``, the (dropped-out, V8) mean.
``i'`` is the query's position aligned as ``causal_alignment`` says
(``i`` top-left, ``i + M - N`` bottom-right; inside each segment with V7).

Selection, never arithmetic: a ``-inf`` bias or score excludes its key as a
mask does, so ``-inf - -inf`` never makes a NaN, and a dropped or excluded
key's value is never read.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._accurate import weighted_sum
from ._validation import as_float_array, as_mask

__all__ = [
    "log_prior_scores",
    "alibi_bias",
    "softcap",
    "relative_positions",
    "window_mask",
    "segment_mask",
    "repeat_kv_heads",
    "with_sink",
    "dropout_mean",
]


def log_prior_scores(s, bias):
    """V1: ``z_ij = s_ij + bias_ij``, the bias a log prior ``log pi_ij`` over the keys.

    A ``-inf`` bias excludes the key by selection (``z = -inf`` whatever
    ``s`` is, no NaN from ``-inf + inf``), exactly as a mask does.

    Examples
    --------
    >>> log_prior_scores(np.array([1.0, np.inf]), np.array([0.5, -np.inf]))
    array([ 1.5, -inf])
    """
    with np.errstate(invalid="ignore"):
        return np.where(np.isneginf(bias), -np.inf, s + bias)


def alibi_bias(slopes, rel):
    """V2: ALiBi, ``bias_ij = -slope |i' - j|``: a Laplace prior over positions (K4 on the position axis).

    ``slopes`` broadcasts against the query rows (e.g. ``(H, 1, 1)``, or
    ``(H, N, 1)`` per query under V7); ``rel`` is ``i' - j``
    (:func:`relative_positions`).

    Examples
    --------
    >>> alibi_bias(np.array([[0.5]]), np.array([[0, 1, -2]]))
    array([[-0. , -0.5, -1. ]])
    """
    return -slopes * np.abs(rel)


def softcap(x, c):
    """V3: logit soft-capping ``s = c tanh(x / c)``, a bounded energy (the family of K6-K7).

    No key's evidence exceeds ``c`` in either direction; ``c -> inf`` gives
    ``s = x``.  Infinite scores map to ``+-c``.

    Examples
    --------
    >>> softcap(np.array([0.0, 1e9, -np.inf]), 30.0)
    array([  0.,  30., -30.])
    """
    return c * np.tanh(x / c)


def relative_positions(n, m, alignment="top_left", cu_seqlens_q=None, cu_seqlens_k=None):
    """The aligned offsets ``rel_ij = i' - j (N, M)`` that causality, windows (V4) and ALiBi (V2) read.

    ``i' = i`` (``"top_left"``) or ``i + M - N`` (``"bottom_right"``); with
    segments (V7, validated cumulative lengths) ``i``, ``j``, ``N`` and ``M``
    are counted inside each segment.  Pairs in different segments get an
    offset too (meaningless; :func:`segment_mask` excludes them).

    Examples
    --------
    >>> relative_positions(2, 3)
    array([[ 0, -1, -2],
           [ 1,  0, -1]])
    >>> relative_positions(2, 3, "bottom_right")[0]
    array([ 1,  0, -1])
    """
    if cu_seqlens_q is None:
        qpos, kpos = np.arange(n), np.arange(m)
        offset = 0 if alignment == "top_left" else m - n
        return (qpos + offset)[:, None] - kpos[None, :]
    seg_q, seg_k = _segment_ids(cu_seqlens_q, n), _segment_ids(cu_seqlens_k, m)
    qpos = np.arange(n) - cu_seqlens_q[seg_q]
    kpos = np.arange(m) - cu_seqlens_k[seg_k]
    lens_q, lens_k = np.diff(cu_seqlens_q), np.diff(cu_seqlens_k)
    offset = np.zeros_like(lens_q) if alignment == "top_left" else lens_k - lens_q
    return (qpos + offset[seg_q])[:, None] - kpos[None, :]


def window_mask(rel, window):
    """V4: sliding window, key ``j`` takes part for query ``i`` when ``i' - left <= j <= i' + right``.

    ``window = (left, right)``, a side ``None`` unbounded (validated by the
    caller: ``-1`` already turned into ``None``).  A restricted hypothesis set.

    Examples
    --------
    >>> window_mask(relative_positions(3, 3), (1, 0)).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 1, 1]])
    """
    left, right = window
    take = np.ones(rel.shape, dtype=bool)
    if left is not None:
        take &= rel <= left
    if right is not None:
        take &= rel >= -right
    return take


def _segment_ids(cu_seqlens, count):
    """The segment of each token ``0 .. count-1`` (empty segments own no token)."""
    return np.searchsorted(cu_seqlens, np.arange(count), side="right") - 1


def segment_mask(cu_seqlens_q, cu_seqlens_k):
    """V7: packed variable-length sequences, a block-diagonal hypothesis structure.

    Query ``i`` and key ``j`` compete only inside one segment:
    ``cu_seqlens_q[s] <= i < cu_seqlens_q[s+1]`` and
    ``cu_seqlens_k[s] <= j < cu_seqlens_k[s+1]`` (FlashAttention's varlen
    convention: cumulative lengths starting at 0).

    Examples
    --------
    >>> segment_mask(np.array([0, 1, 3]), np.array([0, 2, 3])).astype(int)
    array([[1, 1, 0],
           [0, 0, 1],
           [0, 0, 1]])
    """
    seg_q = _segment_ids(cu_seqlens_q, int(cu_seqlens_q[-1]))
    seg_k = _segment_ids(cu_seqlens_k, int(cu_seqlens_k[-1]))
    return seg_q[:, None] == seg_k[None, :]


def repeat_kv_heads(x, group):
    """V6: grouped-query heads, query head ``h`` reads key/value head ``h // group`` (torch's mapping).

    ``x (B..., Hkv, M, D) -> (B..., Hkv * group, M, D)``: one hypothesis set
    shared by ``group`` query heads.

    Examples
    --------
    >>> repeat_kv_heads(np.arange(2.0).reshape(2, 1, 1), 2)[:, 0, 0]
    array([0., 0., 1., 1.])
    """
    return np.repeat(x, group, axis=-3)


def with_sink(z, v, take, sink):
    """V5: attention sinks, one more hypothesis per row with logit ``sink`` and value 0.

    The null (background) hypothesis of a mixture: it enters the
    log-partition with its logit and takes the mass that attends to nothing.
    Returns ``z``, ``v`` and ``take`` with the sink appended as the last key.

    Examples
    --------
    >>> z, v, take = with_sink(np.zeros((1, 2)), np.ones((2, 1)), None, np.array(0.0))
    >>> z, v[:, 0], take
    (array([[0., 0., 0.]]), array([1., 1., 0.]), None)
    """
    rows = z.shape[:-1]
    z = np.concatenate([z, np.broadcast_to(sink[..., None, None], rows + (1,))], axis=-1)
    v = np.concatenate([v, np.zeros(v.shape[:-2] + (1, v.shape[-1]))], axis=-2)
    if take is not None:
        take = np.concatenate([np.broadcast_to(take, rows + (take.shape[-1],)), np.ones(rows + (1,), dtype=bool)], axis=-1)
    return z, v, take


def dropout_mean(r, keep, p, v):
    """V8: dropout with an explicit keep-mask, ``a_i = sum_j r_ij keep_ij v_j / (1 - p)``.

    The responsibilities (and the log-partition) are those before dropout; a
    dropped key's value is never read (selection).

    Examples
    --------
    >>> dropout_mean(np.array([[0.5, 0.5]]), np.array([[True, False]]), 0.5, np.array([[2.0], [np.nan]]))
    array([[2.]])
    """

    return weighted_sum(np.where(keep, r, 0.0), v, keep, limit=True) / (1.0 - p)


# ----------------------------------------------------------------------------
# Validation of the variant keywords (called once by prepare_attention)
# ----------------------------------------------------------------------------


def _real_scalar(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real scalar; got {type(x).__name__}")
    return float(x)


def check_softcap(c):
    """``None`` (no capping) or a real ``c > 0`` (``inf`` allowed: no capping)."""
    if c is None:
        return None
    c = _real_scalar(c, "softcap")
    if not c > 0:
        raise ValueError(f"softcap must be > 0 (None for no capping); got {c!r}")
    return None if np.isinf(c) else c


def check_window(window):
    """``None`` or ``(left, right)``; a side ``None`` or ``-1`` is unbounded, else an int ``>= 0``."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right); got {window!r}")
    sides = []
    for name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, (numbers.Integral, np.integer)):
            raise TypeError(f"window {name} must be an int, -1 or None; got {type(side).__name__}")
        side = int(side)
        if side < -1:
            raise ValueError(f"window {name} must be >= 0, or -1/None for unbounded; got {side}")
        sides.append(None if side == -1 else side)
    return None if sides == [None, None] else tuple(sides)


def as_cu_seqlens(cu, name, total):
    """Cumulative segment lengths: 1-D integers, ``cu[0] = 0``, non-decreasing, ``cu[-1] = total``."""
    arr = np.asarray(cu)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of cumulative lengths; got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be 1-D of length (segments + 1) >= 2; got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr[0] != 0 or np.any(np.diff(arr) < 0) or arr[-1] != total:
        raise ValueError(f"{name} must start at 0, never decrease and end at the token count {total}; got {arr.tolist()}")
    return arr


def check_dropout(p, keep, shape):
    """``0 <= p < 1``; a boolean keep-mask broadcast to ``shape``, required when ``p > 0``."""
    p = _real_scalar(p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1) (1 / (1 - p) rescales the kept weights); got {p!r}")
    if keep is None:
        if p > 0:
            raise ValueError("dropout_p > 0 needs an explicit dropout_mask (bool, True = kept): the oracle is deterministic")
        return p, None
    return p, as_mask(keep, shape, "dropout_mask")


def as_head_param(x, name, batch, segments):
    """Per-head parameters (ALiBi slopes, sink logits) broadcast against the batch axes, heads last.

    Returns a float64 array of shape ``batch`` or, with segments (V7) and a
    2-D ``(S, H)`` input, ``batch + (S,)`` (one value per segment).
    """
    arr = as_float_array(x, name).astype(np.float64)
    if segments is not None and arr.ndim == 2:
        if arr.shape[0] != segments:
            raise ValueError(f"{name} of shape {arr.shape}: with cu_seqlens a 2-D array is (segments, H) = ({segments}, H)")
        try:
            return np.moveaxis(np.broadcast_to(arr, (segments,) + batch), 0, -1)
        except ValueError:
            raise ValueError(f"{name} of shape {arr.shape}: its heads do not broadcast to the batch shape {batch}") from None
    extra = arr.ndim - len(batch)
    if extra > 0 and all(n == 1 for n in arr.shape[:extra]):  # e.g. one head, (1,), for q (N, D)
        arr = arr.reshape(arr.shape[extra:])
    try:
        return np.broadcast_to(arr, batch)
    except ValueError:
        raise ValueError(f"{name} of shape {arr.shape} does not broadcast to the batch (head) shape {batch}; expected (H,) or (B, H)") from None
