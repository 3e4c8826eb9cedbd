"""What an attention kernel is asked to compute, described once for every accelerated path.

The host wrappers validate the inputs (with the reference's own checks) and
build one record, :class:`Problem` for the CPU kernels and
:class:`DeviceProblem` for the GPU ones (the same fields, operands as strided
device views); the kernels read everything from it, so a new variant adds a
field here, its validation, and the lines of the score pipeline that use it,
not an argument to every kernel signature.

Named codes shared by :mod:`iem_ref.accel.cpu` and :mod:`iem_ref.accel.cuda`:

- energies: :data:`DOT` (``d = -<q, k>``, A1), :data:`SQEUCLIDEAN`
  (``d = ||q - k||^2 / 2``, K2), :data:`PRECOMPUTED` (the energies are given,
  ``d``);
- the keys a query position sees, whatever the structure: causality, the
  sliding window (V4) and packed segments (V7) leave each query position
  ``i`` one interval of keys ``keys[i, 0] <= j < keys[i, 1]``
  (:func:`key_ranges`, built once on the host; both ends never decrease
  with ``i``, so a block of queries sees one interval and the queries that
  see a key are found by bisection, :func:`first_position_above`);

and the row finish that every path applies (M2's result with the edge-case
policy: a NaN spoils the row, an empty row has ``L = -inf``, certain keys
give ``L = +inf``) as two ``@njit`` scalar functions; the CUDA kernels
compile the same source as device functions.

Examples
--------
>>> import math
>>> log_partition_of_row(0.0, 2.0, False) == math.log(2.0)
True
>>> log_partition_of_row(-math.inf, 0.0, False)  # no key takes part
-inf
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, types

from ..energies import ENERGY_RECORDS
from ._compile import INNER

__all__ = [
    "DOT",
    "SQEUCLIDEAN",
    "PRECOMPUTED",
    "ENERGY_CODES",
    "UNBOUNDED",
    "band",
    "key_ranges",
    "own_data",
    "segment_args",
    "slopes_per_row",
    "first_position_above",
    "Problem",
    "Head",
    "problem_type",
    "MASK_TYPE",
    "Operand",
    "DeviceProblem",
    "device_problem_type",
    "log_partition_of_row",
    "summary_of_row",
    "merge_sink",
    "logit",
    "sink_responsibility",
    "sink_routing",
]

#: energy codes (``Problem.energy``): the records' ``kernel`` view (:data:`iem_ref.energies.ENERGY_RECORDS`), one spelling
#: for every path; precomputed energies (``softmin_summary``) have the next code
ENERGY_CODES = {name: rec.kernel for name, rec in ENERGY_RECORDS.items() if rec.has("kernel")}
DOT, SQEUCLIDEAN = ENERGY_CODES["dot"], ENERGY_CODES["sqeuclidean"]
PRECOMPUTED = max(ENERGY_CODES.values()) + 1
#: a side of the band without a limit: farther than any sequence, small enough that ``i + offset + UNBOUNDED`` fits an int64
UNBOUNDED = 2**40


def band(is_causal, window):
    """``(left, right)`` of the keys a query sees, from causality and the validated window ``(left, right)`` (None: no window).

    Examples
    --------
    >>> band(True, None) == (UNBOUNDED, 0)
    True
    >>> band(True, (256, 8))  # causal cuts the window's right side
    (256, 0)
    """
    left, right = window if window is not None else (None, None)
    left = UNBOUNDED if left is None else int(left)
    right = UNBOUNDED if right is None else int(right)
    return left, min(right, 0) if is_causal else right


def key_ranges(n, m, left=UNBOUNDED, right=UNBOUNDED, offset=0, cu_seqlens=None, bottom_right=False):
    """``keys (n, 3)`` int64: query position ``i`` may see the keys ``keys[i, 0] <= j < keys[i, 1]`` (V4, V7); ``keys[i, 2] = i'``.

    The band ``i' - left <= j <= i' + right`` (from :func:`band`) around the
    aligned position ``i' = i + offset``; with packed segments
    ``cu_seqlens = (cu_q, cu_k)`` (V7) positions and the alignment
    (``bottom_right``: ``len_k - len_q``) count inside the query's segment,
    and the interval is cut to the segment's keys.  Both ends are clipped so
    that they never decrease with ``i`` (an empty interval sits at its
    segment's end), which the kernels' tile skipping relies on.  The third
    column is the aligned position ``i'`` in key indices, so that ALiBi's
    ``i' - j`` (V2) is ``keys[i, 2] - j``.

    Examples
    --------
    >>> key_ranges(3, 3, *band(True, None)).tolist()  # causal
    [[0, 1, 0], [0, 2, 1], [0, 3, 2]]
    >>> key_ranges(4, 4, *band(True, None), cu_seqlens=(np.array([0, 1, 4]), np.array([0, 2, 4])))[:, :2].tolist()
    [[0, 1], [2, 3], [2, 4], [2, 4]]
    """
    i = np.arange(n, dtype=np.int64)
    if cu_seqlens is None:
        at, first, end = i + offset, np.zeros(n, np.int64), np.full(n, m, np.int64)
    else:
        cu_q, cu_k = (np.asarray(c, np.int64) for c in cu_seqlens)
        s = np.searchsorted(cu_q, i, side="right") - 1
        at = i - cu_q[s] + cu_k[s]
        if bottom_right:
            at += (cu_k[s + 1] - cu_k[s]) - (cu_q[s + 1] - cu_q[s])
        first, end = cu_k[s], cu_k[s + 1]
    lo = np.minimum(np.maximum(at - left, first), end)
    hi = np.minimum(np.maximum(at + right + 1, lo), end)
    return np.ascontiguousarray(np.stack([lo, hi, at], axis=-1).reshape(n, 3))


def mask_key_ranges(keys, mask, group=1, mask_group=1):
    """``keys`` narrowed to the keys a boolean ``mask (Bm, R, M)`` lets each query position see, or ``keys`` itself.

    For FlexAttention's ``mask_mod`` (F2): position ``i``'s interval is cut
    to ``[first, last]`` of the keys its mask rows let take part (over every
    batch element and every head of its group), so that the kernels skip the
    key tiles no row of a query block sees, as they do for a window.  Rows
    ``R`` are positions when ``mask_group == group`` (a mask shared by a
    group's heads), else the ``N g`` stacked rows (V6).  The kernels need
    both ends non-decreasing in ``i``; a mask whose intervals are not (an
    arbitrary pattern) leaves ``keys`` as they are: every tile is still
    computed and the mask still selects, so only the speed differs.

    Examples
    --------
    >>> causal = np.tril(np.ones((3, 3), bool))[None]
    >>> mask_key_ranges(key_ranges(3, 3), causal)[:, :2].tolist()
    [[0, 1], [0, 2], [0, 3]]
    >>> mask_key_ranges(key_ranges(2, 2), np.array([[[False, True], [True, False]]]))[:, :2].tolist()  # not monotone
    [[0, 2], [0, 2]]
    """
    n, m = keys.shape[0], mask.shape[-1]
    if n == 0 or m == 0:
        return keys
    seen = mask.any(axis=-1)
    first = np.where(seen, mask.argmax(axis=-1), m).min(axis=0)
    past = np.where(seen, m - mask[..., ::-1].argmax(axis=-1), 0).max(axis=0)
    if first.shape[0] != n:  # stacked rows of a group's heads: a position sees what any of its heads sees
        first, past = first.reshape(n, -1).min(axis=1), past.reshape(n, -1).max(axis=1)
    empty = past <= first
    past = np.where(empty, np.maximum.accumulate(np.where(empty, 0, past)), past)  # an empty row: at the last end so far
    first = np.where(empty, past, first)
    if np.any(np.diff(first) < 0) or np.any(np.diff(past) < 0):
        return keys
    lo = np.maximum(keys[:, 0], first)
    hi = np.maximum(np.minimum(keys[:, 1], past), lo)
    return np.ascontiguousarray(np.stack([lo, hi, keys[:, 2]], axis=-1))


def own_data(x):
    """The data a broadcast view ``x`` holds: each axis of stride 0 cut to length 1 (a view; the kernels read such an axis at index 0).

    Examples
    --------
    >>> own_data(np.broadcast_to(np.arange(3.0), (4, 3))).shape
    (1, 3)
    """
    return x[tuple(slice(0, 1) if st == 0 else slice(None) for st in x.strides)]


def segment_args(inp):
    """:func:`key_ranges`' segment keywords from validated attention inputs with packed segments (V7); none without (or for None)."""
    if inp is None or inp.cu_seqlens_q is None:
        return {}
    return dict(cu_seqlens=(inp.cu_seqlens_q, inp.cu_seqlens_k), bottom_right=inp.causal_alignment == "bottom_right")


def slopes_per_row(inp):
    """V2: the ALiBi slope of each query row, ``(B..., N)`` float64, from validated inputs with ``alibi_slopes`` (one per segment with V7)."""
    from ..variants import _segment_ids

    if inp.cu_seqlens_q is not None and inp.slopes.ndim == len(inp.batch) + 1:  # one slope per segment
        return inp.slopes[..., _segment_ids(inp.cu_seqlens_q, inp.n)]
    return np.broadcast_to(inp.slopes[..., None], inp.batch + (inp.n,))


@njit(cache=True)
def first_position_above(keys, end, key):
    """The first query position ``i`` whose key range's ``end`` (0: first key, 1: past the last) exceeds ``key``, by bisection (``len(keys)`` if none).

    The positions that see a key of ``[j0, j1)`` are
    ``first_position_above(keys, 1, j0) <= i < first_position_above(keys, 0, j1 - 1)``.

    Examples
    --------
    >>> first_position_above(np.array([[0, 1], [0, 2], [0, 3]]), 1, 1)
    1
    """
    lo = 0
    hi = keys.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid, end] > key:
            hi = mid
        else:
            lo = mid + 1
    return lo


class Problem(NamedTuple):
    """One attention problem over a flattened batch ``b = 0 .. B-1``, as the kernels read it.

    Operands keep their own batch (broadcast operands are not copied); the
    ``*map`` arrays give the operand's index for each flat batch index.
    Unused operands (``u`` in the forward, ``d`` unless the energies are
    precomputed, ``q`` and ``k`` when they are) are empty placeholders.

    The boolean mask ``(Bm, N, M)`` (True = takes part; broadcast axes keep
    stride 0, so its layout varies from call to call) is the kernels'
    argument beside the record: Numba converts a C-contiguous array to the
    signature's any-layout type for a plain argument, not inside a tuple.
    """

    q: np.ndarray  # (Bq, N, D) queries
    k: np.ndarray  # (Bk, M, D) keys
    v: np.ndarray  # (Bv, M, Dv) values
    u: np.ndarray  # (Bu, N, Dv) upstream gradient of the output (backward)
    d: np.ndarray  # (Bd, N, M) precomputed energies
    qmap: np.ndarray  # (B,) int64, and the same for every operand
    kmap: np.ndarray
    vmap: np.ndarray
    umap: np.ndarray
    dmap: np.ndarray
    mmap: np.ndarray  # for the mask, which travels beside the record (see below)
    energy: int  # DOT, SQEUCLIDEAN or PRECOMPUTED
    scale: float  # s = -d * scale, in the kernel's dtype; 0 for tau = inf
    keys: np.ndarray  # (N // group, 3) int64: query row i sees keys keys[i // group, 0] <= j < keys[i // group, 1] (causality, V4, V7); [.., 2]: i'

    segments: np.ndarray  # (S + 1,) int64: the rows where packed segments start (V7), then N; [0, N] without (query blocks never straddle two)
    group: int  # grouped-query heads (V6): rows i = group * position + head of the group; 1 otherwise
    has_mask: bool  # False: mask is a placeholder, every pair takes part
    mask_group: int  # row i reads mask row i // mask_group (group when the mask is shared by a group's heads, else 1)
    empty_nan: bool  # an empty row's output is NaN (else 0)
    sinks: np.ndarray  # (B, group) float64: the sink logit (V5) of row i of element b is sinks[b, i % group]; -inf: none
    logits: bool  # any of V1-V3: the scores pass through logit() below
    softcap: float  # V3's c (float64); 0: none
    bias: np.ndarray  # V1: (Bb, Nb, Mb) float64, the bias's own data (axes it broadcasts over kept at length 1); row i // bias_group
    bias_map: np.ndarray  # (B,) int64: the bias element of each flat batch element
    bias_group: int
    has_bias: bool
    slopes: np.ndarray  # V2: (B, N) float64, the ALiBi slope of each query row
    has_alibi: bool
    keep: np.ndarray  # V8: (Bk, Nk, Mk) bool, the dropout mask's own data (as the bias); row i // keep_group
    keep_map: np.ndarray  # (B,) int64
    keep_group: int
    has_keep: bool
    dropout_keep: float  # 1 - p (float64): the kept weights are divided by it
    flex_bh: np.ndarray  # (B, 2) int64: a score_mod's (F1) b and the query head of row 0 of each flat batch element ((B, 0) without)


class Head(NamedTuple):
    """One batch element of a :class:`Problem`: 2-D operands and the scalars (built inside the kernels by :func:`_head_of`)."""

    q: np.ndarray  # (N, D)
    k: np.ndarray  # (M, D)
    v: np.ndarray  # (M, Dv)
    u: np.ndarray  # (N, Dv)
    d: np.ndarray  # (N, M)
    mask: np.ndarray  # (N, M)
    energy: int
    scale: float
    keys: np.ndarray  # (N // group, 3)
    group: int
    has_mask: bool
    mask_group: int
    sinks: np.ndarray  # (group,)
    logits: bool
    softcap: float
    bias: np.ndarray  # (Nb, Mb)
    bias_group: int
    has_bias: bool
    slopes: np.ndarray  # (N,)
    has_alibi: bool
    keep: np.ndarray  # (Nk, Mk)
    keep_group: int
    has_keep: bool
    dropout_keep: float
    flex_b: int  # F1's b of this element, and the query head of its row 0 (row i's head: flex_h + i % group)
    flex_h: int


@njit(**INNER)
def _head_of(p, mask, b):
    """The operands of flat batch element ``b`` of the problem ``p`` and its ``mask`` (views, no copies)."""
    return Head(p.q[p.qmap[b]], p.k[p.kmap[b]], p.v[p.vmap[b]], p.u[p.umap[b]], p.d[p.dmap[b]], mask[p.mmap[b]],
                p.energy, p.scale, p.keys, p.group, p.has_mask, p.mask_group, p.sinks[b],
                p.logits, p.softcap, p.bias[p.bias_map[b]], p.bias_group, p.has_bias, p.slopes[b], p.has_alibi,
                p.keep[p.keep_map[b]], p.keep_group, p.has_keep, p.dropout_keep,
                p.flex_bh[b, 0] if p.flex_bh.shape[1] > 0 else 0, p.flex_bh[b, 1] if p.flex_bh.shape[1] > 0 else 0)


def problem_type(t):
    """The Numba type of a :class:`Problem` whose floating-point operands have the Numba float type ``t``."""
    f3 = types.Array(t, 3, "C", readonly=True)
    i1 = types.Array(types.int64, 1, "C", readonly=True)
    b1, i64 = types.boolean, types.int64
    f2 = types.Array(types.float64, 2, "C", readonly=True)
    i2 = types.Array(types.int64, 2, "C", readonly=True)
    b3 = types.Array(types.float64, 3, "C", readonly=True)
    return types.NamedTuple([f3, f3, f3, f3, f3, i1, i1, i1, i1, i1, i1, i64, t, i2, i1, i64, b1, i64, b1, f2,
                             b1, types.float64, b3, i1, i64, b1, f2, b1,
                             types.Array(types.boolean, 3, "C", readonly=True), i1, i64, b1, types.float64, i2], Problem)


#: the Numba type of the mask argument beside the record
MASK_TYPE = types.Array(types.boolean, 3, "A", readonly=True)


# --- the GPU kernels' record: the same problem, operands as strided views of flat device arrays
class Operand(NamedTuple):
    """An operand of any strides (broadcast axes: stride 0): element ``[b, i, c]`` is ``data[offset[b] + i * row + c * col]``."""

    data: object  # 1-D device array
    offset: object  # (B,) int64 device array: where batch element b starts
    row: int
    col: int


class DeviceProblem(NamedTuple):
    """:class:`Problem` for :mod:`iem_ref.accel.cuda`: operands as :class:`Operand`, flags as 0/1 integers.

    The energy is not a field: the GPU kernels are built per energy (and
    dtype), so that its branches are resolved when they compile.
    """

    q: Operand  # (B, N, D); for PRECOMPUTED the energies d (B, N, M)
    k: Operand  # (B / group, M, D)
    v: Operand  # (B / group, M, Dv)
    u: Operand  # (B, N, Dv) upstream gradient (backward; a placeholder in the forward)
    mask: Operand  # (B, N, M) uint8, 1 = takes part
    has_mask: int
    keys: object  # (N, 3) int64 device array: the keys each query position sees and its aligned position, as in Problem
    group: int  # grouped-query heads (V6): a kernel's rows for key/value element b are row = group * i + h, query i of element b * group + h
    n: int
    m: int
    d: int
    dv: int
    scale: float
    empty_nan: int
    sinks: object  # (B,) device array in the dtype: the sink logit (V5) of each flat batch element, -inf for none
    logits: int  # any of V1-V3, as in Problem (the soft-cap in the dtype, the priors added in float64, rounded once)
    softcap: float  # float64; 0: none
    bias: Operand  # (B, N, M) float64 strided view (V1)
    has_bias: int
    slopes: object  # (B, N) float64 device array: the ALiBi slope of each query row (V2)
    has_alibi: int
    keep: Operand  # (B, N, M) uint8, the dropout mask (V8), 1 = kept
    has_keep: int
    dropout_keep: float  # 1 - p (float64)


def device_problem_type(t):
    """The Numba type of a :class:`DeviceProblem` with float type ``t`` (for compiling the GPU kernels ahead of time)."""
    i64 = types.int64
    offset = types.Array(i64, 1, "C")

    def operand(dtype):
        return types.NamedTuple([types.Array(dtype, 1, "C"), offset, i64, i64], Operand)

    op = operand(t)
    keys = types.Array(i64, 2, "C")
    f64 = types.float64
    return types.NamedTuple([op, op, op, op, operand(types.uint8), i64, keys] + [i64] * 5 + [t, i64, types.Array(t, 1, "C")]
                            + [i64, f64, operand(f64), i64, types.Array(f64, 2, "C"), i64, operand(types.uint8), i64, f64],
                            DeviceProblem)


# --- the row finish (M2's result), one definition for every path ---------------
@njit(cache=True)
def log_partition_of_row(m, l, nan):
    """M2's result: ``L = m + log l`` from a row's running maximum score ``m`` and sum ``l = sum exp(s - m)``, with the policy.

    ``nan``: a NaN score spoiled the row (``L = NaN``); ``m = +inf``: certain
    keys (``L = +inf``, their count is ``l``); ``l = 0``: no key takes part
    (``L = -inf``).
    """
    if nan or l != l:
        return math.nan
    if m == math.inf:
        return math.inf
    if l == 0.0:
        return -math.inf
    return m + math.log(l)


@njit(cache=True)
def merge_sink(m, l, sink):
    """V5 in M2's terms: the sink is one more partial ``(m, l, o) = (sink, 1, 0)``, merged into a row's ``(m, l)``.

    Returns ``(m', l', c)``: the merged maximum and sum, and the factor of
    the row's own ``o`` (``o' = c o``; an infinite ``o`` stays itself, as in
    every rescale).  ``sink = -inf``: no sink, nothing changes; ``+inf``: a
    certain key of value 0 (counted in ``l`` beside the row's own certain
    keys).  A NaN sink spoils the row: the caller's NaN flag.

    Examples
    --------
    >>> merge_sink(-math.inf, 0.0, 1.5)  # no key takes part: the sink takes the mass
    (1.5, 1.0, 0.0)
    >>> merge_sink(0.0, 2.0, -math.inf)
    (0.0, 2.0, 1.0)
    """
    if sink == -math.inf or sink != sink:
        return m, l, 1.0
    mm = m if m > sink else sink
    c = 1.0 if m == mm else math.exp(m - mm)
    cs = 1.0 if sink == mm else math.exp(sink - mm)
    return mm, c * l + cs, c


@njit(cache=True)
def logit(x, softcap, bias, alibi):
    """V1-V3 for one pair, in float64: the scaled score ``x`` (T1) -> ``z = softcap(x) + bias + alibi``.

    The order and roundings of :class:`iem_ref.attention.Competition` (its ``s`` and ``AttentionInputs.logits``):
    ``s = c tanh(x / c)`` (``softcap = 0``: none), then ``+ bias``, then
    ``+ alibi`` (``0`` for none: adding it changes nothing).  Selection,
    never arithmetic: an excluded score (``-inf``) or a ``-inf`` bias gives
    ``-inf`` (never ``-inf + inf``); a ``+inf`` score is capped to ``c``.

    Examples
    --------
    >>> logit(1e9, 30.0, 0.5, 0.0)
    30.5
    >>> logit(-math.inf, 30.0, math.inf, 0.0)
    -inf
    """
    if x == -math.inf or bias == -math.inf:
        return -math.inf
    s = softcap * math.tanh(x / softcap) if softcap > 0.0 else x
    return (s + bias) + alibi


@njit(cache=True)
def summary_of_row(o, l, nan, empty_nan):
    """M2's result: ``a = o / l`` for one output entry, with the policy: NaN for a spoiled row, 0 (or NaN) for an empty one."""
    if nan:
        return math.nan
    if l == 0.0:
        return math.nan if empty_nan else 0.0
    return o / l


def sink_responsibility(sink, L, cnt):
    """V5: ``r_sink,i = exp(sink_i - L_i)``; a row made certain (``L = +inf``) shares its mass among its ``cnt`` certain keys, the sink among them if ``+inf``; no sink (``-inf``) has 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        certain = np.where(np.isposinf(sink), 1.0 / np.where(cnt > 0, cnt, 1.0), 0.0)
        return np.where(np.isneginf(sink), 0.0, np.where(np.isposinf(L), certain, np.exp(sink - L)))


def sink_routing(sink, L, cnt, delta):
    """V5: ``Delta_i r_sink,i`` (``= sum_j dS_ij = -dLoss/dsink_i``) per row, with the backward's edge-case policy.

    0 where the sink takes no part (``-inf``) or the row is certain (``L =
    +inf``: the output does not move under finite changes of the logits);
    NaN where the sink takes part and ``Delta_i = <u_i, a_i>`` is not finite.
    """
    with np.errstate(invalid="ignore"):
        routed = np.where(np.isposinf(L), 0.0, sink_responsibility(sink, L, cnt) * delta)
        return np.where(np.isneginf(sink), 0.0, np.where(np.isfinite(delta), routed, np.nan))
