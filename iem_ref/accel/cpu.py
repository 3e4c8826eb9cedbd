"""Numba CPU path: fused one-pass softmin summaries (M1-M2), their backward (G4), scalar activations (S3, S4, H3).

Same signatures and semantics as the reference twins (:func:`iem_ref.attention`,
:func:`iem_ref.softmin_summary`, :func:`iem_ref.attention_vjp`,
:func:`iem_ref.sign_posterior_mean`, :func:`iem_ref.tanh_from_signed_gaussian`,
:func:`iem_ref.softplus`); validation is the reference's own
(:func:`iem_ref.attention.prepare_attention` and ``iem_ref._validation``).

Shape legend: ``B...`` batch axes (broadcast), ``N`` queries, ``M`` keys,
``D`` query/key features, ``Dv`` value features.

How it runs: the batch is flattened without copying broadcast operands (each
operand keeps its own batch and an index map); work items ``(batch, query
block, key split)`` are shared out over ``numba.get_num_threads()`` threads
running a ``nogil`` kernel; per key tile one GEMM for the scores, the online
softmin update with a polynomial ``exp``, one GEMM for the values (see
:mod:`iem_ref.accel._cpu_kernels`).  No ``N x M`` array is ever formed: extra
memory is ``O(B N Dv)`` plus one tile per work item.  BLAS is pinned to one
thread around every kernel call (``threadpoolctl``): a multithreaded BLAS
inside the kernel's own threads oversubscribes the cores (measured on a
2-core VM, N = M = 4096: 266 ms instead of 92 ms).

The kernels compile on first use into Numba's on-disk cache, one per
feature set (:func:`features_of`: the dtype, the energy, and whether the
call uses a variant that adds steps: a bias, ALiBi, a soft-cap, sinks or
dropout), so a plain call compiles no variant's code
(:mod:`iem_ref.accel._compile`: the kernel templates, a one-time
``CompilationNotice``; :func:`warmup`, ``iem-ref warmup``, compiles chosen
kernels ahead of time).

float32: GEMMs, the shift, ``exp`` and the per-tile row sums run in float32
(dot products of length ``D``, sums of at most ``bk`` terms: 512, or 2048
when a query block has fewer than 64 queries, see :func:`plan`); the
running maximum, sums and output accumulators across tiles are float64; the
result is rounded once to float32.  float64 runs in float64 throughout.

Energies: ``"dot"`` and ``"sqeuclidean"`` (``||q - k||^2 / 2``, expanded as
``<q, k> - |q|^2/2 - |k|^2/2`` so that it is one GEMM; rows with a
non-finite entry use the definition).  Any other energy raises
``ValueError``: there is no silent fallback to the reference.

Examples
--------
>>> import numpy as np
>>> from iem_ref.accel import cpu
>>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [0.0]])
>>> cpu.attention(q, k, v, scale=np.log(3.0))  # r = (3/4, 1/4)
array([[0.75]])
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange, types
from threadpoolctl import ThreadpoolController

from .._validation import (
    as_float_array,
    check_choice,
    check_grad_out,
    check_sign_pair,
    check_summary_inputs,
    check_tau,
    kernel_dtype,
)
from ..attention import prepare_attention
from ..energies import energy_of
from ..gradients import _sum_to_shape
from . import _cpu_kernels as _k
from ._compile import CompilationNotice, _in_cache, cache_dir, compile_kernel
from ._kernel_mods import kernel_mod
from ._problem import (
    ENERGY_CODES,
    MASK_TYPE,
    PRECOMPUTED,
    SQEUCLIDEAN,
    Problem,
    band,
    key_ranges,
    mask_key_ranges,
    own_data,
    problem_type,
    segment_args,
    sink_routing,
    slopes_per_row,
)
from ._scalar import sign_mean, signed_gaussian_mean, softplus_scalar

__all__ = [
    "arithmetic",
    "attention",
    "softmin_summary",
    "attention_vjp",
    "sign_posterior_mean",
    "tanh_from_signed_gaussian",
    "softplus",
    "ENERGIES",
    "plan",
    "Tiling",
    "TILING",
    "warmup",
    "WARMUP_ENERGIES",
]

#: energies with a fused kernel: name -> the code shared by every path (:mod:`iem_ref.accel._problem`)
ENERGIES = ENERGY_CODES

class Tiling(NamedTuple):
    """The sizes :func:`plan` cuts a problem into: fixed (never from the thread count), so that results are reproducible.

    ``(most queries per block, keys per tile)`` per dtype, forward and
    backward.  The forward's were measured at N = M = 4096, D = 64
    (bench/results/cpu_profile.md): taller query blocks made OpenBLAS's GEMMs
    faster (fewer, larger calls; the cause was not isolated further); the
    backward keeps the shapes it was tuned with.  A kernel's code does not
    depend on these sizes (they are arguments), so the tests run the same
    kernels on small problems with a small tiling that crosses as many
    tiles, blocks and key splits.
    """

    forward64: tuple = (512, 256)
    forward32: tuple = (512, 512)
    backward64: tuple = (128, 256)
    backward32: tuple = (256, 512)
    min_blocks: int = 4  # query blocks are shortened (to multiples of 32) so that there are at least this many
    target_items: int = 16  # work items wanted before keys are split (decoding)
    min_split_keys: int = 8192  # fewest keys per split
    small_block: int = 64  # query blocks smaller than this get key tiles of decode_keys
    decode_keys: int = 2048
    split_bytes: int = 128 * 2**20  # the backward's key splits hold at most this many bytes of dq partial sums (float64)

    def tiles(self, dtype, backward):
        """``(bq, bk)`` for ``dtype``, forward or backward."""
        wide = np.dtype(dtype) == np.float64
        if backward:
            return self.backward64 if wide else self.backward32
        return self.forward64 if wide else self.forward32


#: the tiling every call uses
TILING = Tiling()


# --- kernels, compiled once per feature set with explicit signatures ---------------
def _arr(dtype, ndim, layout="C", readonly=True):
    return types.Array(dtype, ndim, layout, readonly=readonly)


def _forward_sig(t):
    i64, b1, f64 = types.int64, types.boolean, types.float64
    partials = types.NamedTuple([_arr(f64, 3, readonly=False), _arr(f64, 3, readonly=False), _arr(f64, 4, readonly=False),
                                 _arr(b1, 3, readonly=False)], _k.Partials)
    return types.void(
        i64, i64, i64,  # stage, this thread, thread count
        problem_type(t), MASK_TYPE,
        _arr(types.int64, 1), i64, i64,  # the query blocks' row boundaries, bk, nsplit
        partials,
        _arr(t, 3, readonly=False), _arr(t, 2, readonly=False),  # out, lse
    )


def _backward_sig(t):
    i64, f64 = types.int64, types.float64
    saved = types.NamedTuple([_arr(f64, 2), _arr(f64, 2), _arr(f64, 2, readonly=False), _arr(f64, 2)], _k.Saved)
    fields = [_arr(t, 3, readonly=False)] * 3 + [_arr(f64, 3, readonly=False)]
    # Numba types a tuple of one field type as a "uni" tuple (float64 here): the signature must say the same
    grads = types.NamedUniTuple(fields[0], 4, _k.Grads) if t == f64 else types.NamedTuple(fields, _k.Grads)
    splits = types.NamedTuple([_arr(f64, 4, readonly=False), _arr(f64, 3, readonly=False)], _k.Splits)
    # stage, thread, thread count, problem, mask, the query blocks' row boundaries, bk
    return types.void(i64, i64, i64, problem_type(t), MASK_TYPE, _arr(i64, 1), i64, saved, grads, splits)


_COMPILED = {}
_COMPILED_LOCK = threading.Lock()
_SIGNATURES = {"forward": _forward_sig, "backward": _backward_sig}


def features_of(p, mod=None):
    """The :class:`~iem_ref.accel._cpu_kernels.Features` of the :class:`~iem_ref.accel._problem.Problem` ``p``: what its kernel must handle.

    A sink of ``-inf`` is no sink (the plain kernel gives the same bits), so
    sinks count when one of them is not ``-inf``.  ``mod``: the call's
    score_mod as a :class:`~iem_ref.accel._cpu_kernels.KernelMod` (:func:`~iem_ref.accel._kernel_mods.kernel_mod`), or None.
    """
    sinks = bool(np.any(p.sinks != -np.inf))
    return _k.Features(p.v.dtype.name, int(p.energy), bool(p.logits or sinks or p.has_keep or mod is not None), mod)


def _kernel(name, features):
    """The kernel ``name`` (``"forward"``, ``"backward"``) of the instance for ``features``, compiled on first use (or loaded from Numba's cache).

    ``nogil``: the threads of :func:`_run_stages` run it side by side.  No
    ``parallel=True``: Numba's parallel pipeline more than doubled the compile
    time (measured 13 s against 8 s for the float64 forward) and the work
    items need no more than a thread each.
    """
    key = (name, features)
    fn = _COMPILED.get(key)
    if fn is None:
        with _COMPILED_LOCK:
            fn = _COMPILED.get(key)
            if fn is None:
                t = types.float64 if features.dtype == "float64" else types.float32
                fn = compile_kernel(_k.kernels(features)[name], _SIGNATURES[name](t), f"{name} ({features.tag})")
                _COMPILED[key] = fn
    return fn


def _run_stages(fn, stages, *args):
    """``fn(stage, thread, nthreads, *args)`` for every ``thread < nthreads`` (``numba.get_num_threads()``), stage after stage, BLAS pinned."""
    nthreads = max(1, numba.get_num_threads())
    with _blas_single_thread():
        for stage in stages:
            if nthreads == 1:
                fn(stage, 0, 1, *args)
                continue
            pool = _pool()
            others = [pool.submit(fn, stage, t, nthreads, *args) for t in range(1, nthreads)]
            try:
                fn(stage, 0, nthreads, *args)
            finally:
                for f in others:
                    f.result()


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1), thread_name_prefix="iem_ref")
        return _POOL


# --- BLAS pinning ---------------------------------------------------------------
_CONTROLLER = None


@contextmanager
def _blas_single_thread():
    """BLAS limited to one thread while a kernel runs (restored afterwards)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


# --- batch flattening without copies of broadcast operands -----------------------
def _ro(x):
    x = x.view()
    x.flags.writeable = False
    return x


def _stack(x, batch, dtype):
    """``x (own..., R, C)`` -> ``(prod(own), R, C)`` C-contiguous in ``dtype`` and the map flat batch index -> own index."""
    own = x.shape[:-2]
    nb = int(np.prod(own, dtype=np.int64))
    x3 = np.ascontiguousarray(x.reshape((nb,) + x.shape[-2:]), dtype=dtype)
    pad = (1,) * (len(batch) - len(own))
    idx = np.broadcast_to(np.arange(nb, dtype=np.int64).reshape(pad + own), batch).reshape(-1)
    return _ro(x3), _ro(np.ascontiguousarray(idx))


def _stack_mask(mask, batch, n, m):
    """The boolean mask as ``(own, n, M)`` (broadcast rows/columns keep stride 0) and its batch map (``n``: its rows)."""
    if mask is None:
        return _ro(np.ones((1, 1, 1), np.bool_)), _zero_map(batch), False
    mk = np.asarray(mask)
    full = len(batch) + 2
    mk = mk.reshape((1,) * (full - mk.ndim) + mk.shape)
    own = mk.shape[:-2]
    nb = int(np.prod(own, dtype=np.int64))
    m3 = np.broadcast_to(mk, own + (n, m)).reshape((nb, n, m))
    idx = np.broadcast_to(np.arange(nb, dtype=np.int64).reshape(own), batch).reshape(-1)
    return _ro(m3), _ro(np.ascontiguousarray(idx)), True


def _tiles(n_queries, n_keys, dtype, backward):
    bq, bk, _ = plan(1, n_queries, n_keys, dtype, backward=backward)
    return bq, bk


def arithmetic():
    """This path's :class:`iem_ref.bounds.Arithmetic`: ``exp`` within 2 ulps (the rescalings' 1 ulp, in float64),
    running state in float64, the squared Euclidean score expanded into one GEMM and two norms (section 5's
    ``c = 3``), and the tiles of :func:`plan` (read when a bound is formed, so :data:`TILING` counts)."""
    from ..bounds import Arithmetic

    return Arithmetic("cpu", exp_ulps=2, rescale_exp_ulps=1, state_float64=True, score_extra=3, expanded_sqeuclid=True,
                      tiles=_tiles)


def plan(B, N, M, dtype, backward=False, band=None, row_values=1):
    """Tile shape and key splits ``(bq, bk, nsplit)``, from the shapes and dtype only (never the thread count).

    The sizes come from :data:`TILING`.  Query blocks hold at most
    ``TILING.tiles(dtype, backward)[0]`` queries, fewer when that would leave
    under ``min_blocks`` blocks (so that every core gets work), but not under
    ``small_block``.  ``band``: the number of keys a query
    sees under a window (V4), ``left + right + 1``; query blocks and key
    tiles are then cut to about that many (a multiple of 32), since a block's
    tiles span its own length plus the band, as long as a band still meets
    no more tiles than a row of ``M`` keys (a column of ``N`` queries) has
    without the window: a row's roundings come only from the tiles that meet
    its band (elsewhere its weights are exactly 0), so the error bounds of
    :mod:`iem_ref.bounds`, which count the tiles of the plan without the
    band, stay valid.  Keys are split (and the partials merged
    by M2) only when there are fewer than ``target_items`` (16) query blocks
    in the whole batch and at least ``min_split_keys`` (8192) keys per split:
    decoding then uses every core.  The backward always splits its keys
    (:class:`~iem_ref.accel._cpu_kernels.Splits`: each split sums its own
    terms of ``dq``): into ``target_items / B`` splits, at most one per key
    tile, and no more than ``split_bytes`` of partial sums hold (``B * nsplit
    * N * row_values`` float64, ``row_values`` = D).  A
    query's own reduction order depends on ``bk`` and ``nsplit`` only.

    Examples
    --------
    >>> plan(1, 4096, 4096, np.float64)
    (512, 256, 1)
    >>> plan(1, 1024, 1024, np.float32)
    (256, 512, 1)
    >>> plan(1, 1, 4 * 2**20, np.float64)
    (1, 2048, 16)
    >>> plan(1, 16384, 16384, np.float64, band=257)  # window=(256, 0)
    (288, 256, 1)
    >>> plan(1, 16384, 16384, np.float32, band=257)
    (288, 288, 1)
    >>> plan(1, 4096, 4096, np.float64, backward=True, row_values=64)  # 16 key splits of dq's sums, 32 MiB
    (128, 256, 16)
    """
    t = TILING
    bq, bk = t.tiles(dtype, backward)
    if not backward:
        spread = 32 * -(-N // (32 * t.min_blocks))  # N / min_blocks, rounded up to a multiple of 32
        bq = min(bq, max(t.small_block, spread))
    if band is not None:
        short = max(t.small_block, 32 * -(-band // 32))
        if short < bk and -(-(band - 1) // short) + 1 <= -(-M // bk):
            bk = short
        if not backward:
            bq = min(bq, short)
        elif short < bq and -(-(band - 1) // short) + 1 <= -(-N // bq):
            bq = short
    bq = max(1, min(bq, N))
    if bq < t.small_block:  # few queries (decoding): longer key tiles amortise the per-tile BLAS calls
        bk = t.decode_keys
    if backward:
        fit = t.split_bytes // max(1, 8 * B * N * row_values)
        return bq, bk, int(max(1, min(-(-t.target_items // max(1, B)), -(-M // bk), fit)))
    nqb = max(1, -(-N // bq))
    want = -(-t.target_items // max(1, B * nqb))
    nsplit = int(max(1, min(want, M // t.min_split_keys)))
    return bq, bk, nsplit


def _blocks(p, bq):
    """The query blocks' row boundaries: ``bq`` rows each, cut afresh at every packed segment (V7), so that none straddles two.

    A block's key tiles span the keys its rows see: one straddling two
    segments would compute each segment's rows against the other's keys.

    Examples
    --------
    >>> import types
    >>> _blocks(types.SimpleNamespace(segments=np.array([0, 5, 5, 12])), 4).tolist()
    [0, 4, 5, 9, 12]
    """
    starts = p.segments
    cuts = [np.arange(s0, s1, bq) for s0, s1 in zip(starts[:-1], starts[1:])]
    return _ro(np.concatenate(cuts + [starts[-1:]]).astype(np.int64))


def _band_width(p):
    """How many keys a query of the :class:`Problem` ``p`` sees at most (a window V4, segments V7), None when that is all of them (:func:`plan`)."""
    if p.keys.shape[0] == 0:
        return None
    width = int((p.keys[:, 1] - p.keys[:, 0]).max())
    return width if width < p.k.shape[1] else None


def _scale_of(tau):
    return 0.0 if math.isinf(tau) else 1.0 / tau


def _zero_map(batch):
    return _ro(np.zeros(max(1, int(np.prod(batch, dtype=np.int64))), np.int64))


def _problem(dtype, batch, n, m, *, energy, scale, q=None, k=None, v=None, u=None, d=None, mask=None, offset=0,
             is_causal=False, window=None, inp=None, empty="zero", groups=None, sinks=None):
    """The :class:`~iem_ref.accel._problem.Problem` of one call and its mask, built once from validated inputs.

    Operands are flattened over ``batch`` without copying broadcast ones
    (:func:`_stack`); those the kernel will not read (``u`` in the forward,
    ``q, k`` for precomputed energies, ``d`` otherwise) are empty placeholders.
    ``groups``: the :class:`_Groups` of grouped-query heads (V6; ``batch``,
    ``n``, ``q``, ``u`` and ``mask`` are then already the stacked ones);
    ``sinks``: the validated sink logits (V5) broadcast to the query heads'
    batch, or None; ``inp``: the validated attention inputs, for the
    packed segments (V7) and the logits' variants (V1-V3); None: neither.
    """
    group, mask_group = (1, 1) if groups is None else (groups.g, groups.mask_group)
    B = max(1, int(np.prod(batch, dtype=np.int64)))
    if sinks is None or np.size(sinks) == 0:
        sink_rows = np.full((B, group), -np.inf)
    else:  # (B..., Hkv * g) -> (Bkv, g): the sinks of a group's heads, in the order its rows interleave them
        sink_rows = np.ascontiguousarray(np.asarray(sinks, np.float64)).reshape(B, group)
    placeholder = {"q": (n, 0), "k": (m, 0), "v": (m, 0), "u": (n, 0), "d": (1, 0)}
    ops = {}
    for name, x in (("q", q), ("k", k), ("v", v), ("u", u), ("d", d)):
        if x is None:
            ops[name] = (_ro(np.zeros((1,) + placeholder[name], dtype)), _zero_map(batch))
        else:
            ops[name] = _stack(x, batch, dtype)
    mask3, mmap, has_mask = _stack_mask(mask, batch, n // mask_group, m)
    keys = key_ranges(n // group, m, *band(is_causal, window), offset=offset, **segment_args(inp))
    if inp is not None and inp.mask_mod is not None and has_mask:  # F2: skip the key tiles its rule masks wholly
        keys = mask_key_ranges(keys, mask3, group, mask_group)
    starts = [0, n] if inp is None or inp.cu_seqlens_q is None else inp.cu_seqlens_q * group
    p = Problem(ops["q"][0], ops["k"][0], ops["v"][0], ops["u"][0], ops["d"][0],
                ops["q"][1], ops["k"][1], ops["v"][1], ops["u"][1], ops["d"][1], mmap,
                int(energy), dtype.type(scale), _ro(keys), _ro(np.asarray(starts, np.int64)), int(group), has_mask, int(mask_group),
                empty == "nan", _ro(sink_rows), *_logit_fields(inp, groups, batch, n, m), *_dropout_fields(inp, groups, batch),
                _flex_field(inp, batch, group))
    return p, mask3


def _flex_field(inp, batch, group):
    """The :class:`Problem`'s ``flex_bh (B, 2)``: for each flat batch element, F1's ``b`` (the leading batch axes) and the
    query head of its row 0 (row ``i``'s head is that plus ``i % group``, V6); ``(B, 0)`` without a score_mod."""
    B = max(1, int(np.prod(batch, dtype=np.int64)))
    if inp is None or inp.score_mod is None:
        return _ro(np.zeros((B, 0), np.int64))
    heads = batch[-1] if batch else 1
    e = np.arange(B, dtype=np.int64)
    return _ro(np.ascontiguousarray(np.stack([e // heads, (e % heads) * group], axis=1)))


def _dropout_fields(inp, groups, batch):
    """The :class:`Problem`'s fields of V8: ``(keep, keep_map, keep_group, has_keep, dropout_keep)``, the mask read from its own data."""
    if inp is None or inp.keep is None:
        return _ro(np.ones((1, 1, 1), np.bool_)), _zero_map(batch), 1, False, 1.0
    keep, keep_group = groups.rows_of(inp.keep)
    own, keep_map = _own_data(keep, batch, np.bool_)
    return own, keep_map, keep_group, True, 1.0 - inp.dropout_p


def _own_data(x, batch, dtype=np.float64):
    """``x`` broadcast to ``batch + (R, C)`` as its own data: ``(Bx, R', C')`` C-contiguous (an axis of stride 0 kept at length 1) and the map flat batch -> ``Bx``."""
    x = np.broadcast_to(x, batch + x.shape[-2:])
    own = np.ascontiguousarray(own_data(x), dtype=dtype)
    lead = own.shape[:-2]
    nb = int(np.prod(lead, dtype=np.int64))
    idx = np.broadcast_to(np.arange(nb, dtype=np.int64).reshape(lead), batch).reshape(-1)
    return _ro(own.reshape((nb,) + own.shape[-2:])), _ro(np.ascontiguousarray(idx))


def _logit_fields(inp, groups, batch, n, m):
    """The :class:`Problem`'s fields of V1-V3: ``(logits, softcap, bias, bias_map, bias_group, has_bias, slopes, has_alibi)``.

    The bias is read through its own data (no ``N x M`` copy when it
    broadcasts); under grouped-query heads a bias shared by a group's heads
    is read per position, one that differs is stacked with the queries.
    ALiBi's slope is one per query row (per segment with V7).
    """
    B = max(1, int(np.prod(batch, dtype=np.int64)))
    none = _ro(np.zeros((1, 1, 1))), _zero_map(batch), 1, False
    if inp is None:
        return (False, 0.0) + none + (_ro(np.zeros((B, 0))), False)
    g = 1 if groups is None else groups.g
    bias = none
    if inp.bias is not None:
        b, bias_group = groups.rows_of(inp.bias) if groups is not None else (inp.bias, 1)
        bias = _own_data(b, batch) + (bias_group, True)
    slopes, has_alibi = _ro(np.zeros((B, 0))), inp.slopes is not None
    if has_alibi:
        per_row = slopes_per_row(inp)
        stacked = per_row if g == 1 else groups.stack(np.ascontiguousarray(per_row)[..., None])[..., 0]
        slopes = _ro(np.ascontiguousarray(np.broadcast_to(stacked, batch + (n,)).reshape(B, n), dtype=np.float64))
    softcap = 0.0 if inp.softcap is None else float(inp.softcap)
    return (softcap > 0.0 or inp.bias is not None or has_alibi, softcap) + bias + (slopes, has_alibi)


class _Groups:
    """Grouped-query heads (V6) as the kernels run them: the ``g`` query heads of a key/value head stacked row by row.

    Row ``i g + h`` of the stacked problem is position ``i`` of the group's
    head ``h``, so a query block holds every head of the group at a few
    positions: each K/V tile is read once per group, the band reads the
    position as ``row // g``, and ``dk, dv`` sum over the group as they sum
    over queries.  Queries, the upstream gradient and the outputs are
    reordered (copies of ``O(B N D)``); keys and values are read as given.
    A mask shared by a group's heads (stride 0 over the heads) is read per
    position; one that differs is stacked with the queries.  ``g = 1``: the
    plain problem, nothing moves.
    """

    def __init__(self, inp):
        g = self.g = inp.group
        self.batch = inp.batch if g == 1 else inp.batch[:-1] + (inp.batch[-1] // g,)
        self.rows = inp.n * g
        given = inp.given_mask()  # mask AND mask_mod (F2)
        self.mask, self.mask_group = (None, 1) if given is None else self.rows_of(given)

    def rows_of(self, x):
        """A per-row array ``x (B..., Hq, N, M)`` (mask, bias) as the kernels read it, and its row group.

        Shared by a group's heads (stride 0 over the heads): read per
        position (row ``i`` reads ``i // g``); else stacked with the queries.
        """
        if self.g == 1:
            return x, 1
        if x.strides[-3] == 0:
            return x[..., :: self.g, :, :], self.g
        return self.stack(x), 1

    def stack(self, x):
        """``(B..., Hkv g, N, C) -> (B..., Hkv, N g, C)``, row ``i g + h`` from head ``h`` of each group."""
        if self.g == 1:
            return x
        *lead, h, n, c = x.shape
        grouped = np.swapaxes(x.reshape((*lead, h // self.g, self.g, n, c)), -3, -2)
        return np.ascontiguousarray(grouped).reshape((*lead, h // self.g, n * self.g, c))

    def unstack(self, x):
        """The inverse of :meth:`stack` (``(B..., Hkv, N g[, C])``; without ``C`` for the log-partition)."""
        return unstack_rows(x, self.g, len(self.batch) - 1)


def unstack_rows(x, g, axis):
    """Stacked rows back to query heads (V6): ``x`` with ``Hkv`` heads on ``axis`` and their ``N g`` rows next to it
    (row ``i g + h`` is head ``h``'s query ``i``) -> ``Hkv g`` heads of ``N`` rows; the axes before and after stay."""
    if g == 1:
        return x
    lead, (h, rows), rest = x.shape[:axis], x.shape[axis:axis + 2], x.shape[axis + 2:]
    heads = np.swapaxes(x.reshape(lead + (h, rows // g, g) + rest), axis + 1, axis + 2)
    return np.ascontiguousarray(heads).reshape(lead + (h * g, rows // g) + rest)


def _new_partials(B, nsplit, n, dv):
    return _k.Partials(np.empty((B, nsplit, n)), np.empty((B, nsplit, n)), np.empty((B, nsplit, n, dv)),
                       np.empty((B, nsplit, n), np.bool_))


def _run_forward(pm, batch, n, m, dv, nsplit=None, mod=None):
    dtype = pm[0].v.dtype
    B = int(np.prod(batch, dtype=np.int64))
    out = np.empty((B, n, dv), dtype)
    lse = np.empty((B, n), dtype)
    if B == 0 or n == 0:
        return out.reshape(batch + (n, dv)), lse.reshape(batch + (n,))
    bq, bk, ns = plan(B, n, m, dtype, band=_band_width(pm[0]))
    if nsplit is not None:
        ns = nsplit
    _run_stages(_kernel("forward", features_of(pm[0], mod)), (0, 1) if ns > 1 else (0,), *pm, _blocks(pm[0], bq), bk, ns, _new_partials(B, ns, n, dv),
                out, lse)
    return out.reshape(batch + (n, dv)), lse.reshape(batch + (n,))


# --- public API ---------------------------------------------------------------------
def _check_energy(energy):
    energy_of(energy).require("kernel", "iem_ref.accel.cpu (iem_ref.attention computes every energy)")


def _forward_attention(q, k, v, scale, mask, is_causal, causal_alignment, energy, empty, nsplit=None, **variants):
    check_choice(empty, "empty", {"zero", "nan"})
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment,
                            energy=energy, **variants)
    _check_energy(energy)
    dtype = kernel_dtype(q=inp.q, k=inp.k_heads, v=inp.v_heads)
    groups = _Groups(inp)
    qs = as_float_array(q, "q") if groups.g == 1 else groups.stack(inp.q)
    pm = _problem(dtype, groups.batch, groups.rows, inp.m, q=qs, k=as_float_array(k, "k"), v=as_float_array(v, "v"),
                  mask=groups.mask, energy=ENERGIES[energy], scale=_scale_of(inp.tau), offset=inp.causal_offset,
                  is_causal=inp.is_causal, window=inp.window, inp=inp, empty=empty, groups=groups, sinks=inp.sinks)
    a, lse = _run_forward(pm, groups.batch, groups.rows, inp.m, inp.dv, nsplit, kernel_mod(inp.score_mod))
    return (groups.unstack(a), groups.unstack(lse)), inp


def attention(q, k, v, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", empty="zero",
              bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
              cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, score_mod=None, mask_mod=None, return_lse=False):
    """A1-A4 fused (M1-M2): ``a_i = sum_j softmin_j(d_ij * scale) v_j`` in one pass, as :func:`iem_ref.attention`.

    Parameters and edge cases as the reference; ``energy`` is ``"dot"`` or
    ``"sqeuclidean"`` (others raise ``ValueError``); ``bias`` (V1, read
    tile by tile from its own data: no ``N x M`` copy when it broadcasts),
    ``alibi_slopes`` (V2) and ``softcap`` (V3) turn each score into its
    logit pair by pair, in float64 (:func:`~iem_ref.accel._problem.logit`),
    before the online softmin; ``window=(left, right)``
    is the sliding window (V4): key tiles outside it are never computed, so
    the cost grows with ``N (left + right)``, not ``N M``;
    ``enable_gqa=True``: grouped-query heads (V6), ``q (B..., Hq, N, D)``
    against ``k, v (B..., Hkv, M, .)``, each K/V tile read once per group;
    ``sinks (H,)``: one more hypothesis per row with that logit and value 0
    (V5), merged into each row's running state as one more partial (M2);
    ``cu_seqlens_q, cu_seqlens_k``: packed sequences (V7), each query's keys
    cut to its segment, so tiles across segments are never computed;
    ``dropout_p, dropout_mask``: dropout with an explicit mask (V8), the
    dropped pairs' weights left out of the value product (their values never
    read), the mean divided by ``1 - p``;
    ``score_mod``: FlexAttention's (F1, :mod:`iem_ref.flex`), compiled into
    the kernel (:func:`~iem_ref.accel._kernel_mods.kernel_mod`: ``numba.njit`` of a scalar function,
    called on each pair's scaled score in float64 before V1-V3);
    ``mask_mod`` (F2): evaluated into the boolean mask, with NumPy.
    No ``return_responsibilities``: that is the ``N x M`` array this path
    avoids.

    Returns
    -------
    a : ndarray (B..., N, Dv), the inputs' float dtype
    lse : ndarray (B..., N), if ``return_lse``: ``L_i = log sum_j exp(-d_ij * scale)``

    Examples
    --------
    >>> import numpy as np
    >>> a, lse = attention(np.zeros((1, 2)), np.zeros((2, 2)), np.array([[1.0], [3.0]]), return_lse=True)
    >>> a, lse
    (array([[2.]]), array([0.69314718]))
    """
    (a, lse), _ = _forward_attention(q, k, v, scale, mask, is_causal, causal_alignment, energy, empty, bias=bias,
                                     alibi_slopes=alibi_slopes, softcap=softcap, window=window, enable_gqa=enable_gqa,
                                     sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p,
                                     dropout_mask=dropout_mask, score_mod=score_mod, mask_mod=mask_mod)
    return (a, lse) if return_lse else a


def softmin_summary(d, v, tau=1.0, *, mask=None, empty="zero"):
    """A3 + A4 fused over precomputed energies: ``(a, L)`` as :func:`iem_ref.softmin_summary`, in one pass over ``d``.

    Examples
    --------
    >>> import numpy as np
    >>> softmin_summary([[0.0, 0.0]], [[1.0], [3.0]])
    (array([[2.]]), array([0.69314718]))
    """
    d, v, _ = check_summary_inputs(d, v, mask, empty)
    tau = check_tau(tau)
    dtype = kernel_dtype(d=d, v=v)
    try:
        batch = np.broadcast_shapes(d.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"leading (batch) axes do not broadcast: d {d.shape}, v {v.shape}") from None
    n, m, dv = d.shape[-2], d.shape[-1], v.shape[-1]
    mask_b = None if mask is None else np.broadcast_to(np.asarray(mask), d.shape)
    pm = _problem(dtype, batch, n, m, v=v, d=d, mask=mask_b, energy=PRECOMPUTED, scale=_scale_of(tau), empty=empty)
    a, L = _run_forward(pm, batch, n, m, dv)
    # L depends on d (and the mask) only: return it with d's batch shape, as the reference does.
    own = d.shape[:-2]
    Lb = L.reshape((-1,) + L.shape[len(batch) - len(own):]) [0] if len(own) < len(batch) else L
    sel = tuple(slice(0, 1) if o == 1 and b != 1 else slice(None) for o, b in zip(own, batch[len(batch) - len(own):]))
    Lb = Lb[sel + (slice(None),)].reshape(d.shape[:-1])
    return a, np.ascontiguousarray(Lb)


def attention_vjp(q, k, v, grad_out, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot",
                  bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
                  cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, score_mod=None, mask_mod=None, out=None, lse=None):
    """G4: ``(dq, dk, dv[, dbias][, dsinks])`` for the upstream gradient ``u = grad_out``, as :func:`iem_ref.attention_vjp`.

    With ``r_ij = exp(s_ij - L_i)`` rebuilt tile by tile from the saved
    log-partition ``lse`` (G1) and ``Delta_i = <u_i, a_i>`` from the saved
    output ``out``: ``dv_j = sum_i r_ij u_i``, ``dS_ij = r_ij (<u_i, v_j> -
    Delta_i)``, ``dq = scale dS k``, ``dk = scale dS^T q`` (minus ``scale k_j
    sum_i dS_ij`` for ``"sqeuclidean"``).  With grouped-query heads (V6)
    ``dk, dv (B..., Hkv, M, .)`` sum over each group's queries.  With sinks
    (V5) also ``dsinks``, the shape of ``sinks``: ``dsink_i = -r_sink,i
    Delta_i`` (``r_sink,i = exp(sink - L_i)``) summed over rows and
    broadcast axes; then ``sum_j dS_ij = Delta_i r_sink,i``, which the
    squared-Euclidean ``dq`` subtracts times ``scale q_i``.  With the
    logits' variants (V1-V3) ``dS`` is ``dZ = dLoss/dz``; a soft-cap
    multiplies it by ``1 - tanh(x / c)^2`` before ``dq, dk`` (``dX``, whose
    row sums the squared-Euclidean ``dq`` then needs, summed in the
    kernel); a score_mod's slope (F3, :func:`~iem_ref.accel._kernel_mods.kernel_mod`) multiplies it
    too; ``dbias`` is ``dZ`` summed to the bias's shape.  With dropout
    (V8) ``b_ij = c_ij <u_i, v_j>`` and ``dv_j = sum_i r_ij c_ij u_i``,
    ``c = keep / (1 - p)``.  When ``out``
    or ``lse`` is missing both are recomputed by :func:`attention`.  No
    ``N x M`` array is formed, except ``dZ`` itself (float64) when a bias
    asks for its gradient.

    Examples
    --------
    >>> import numpy as np
    >>> dq, dk, dv = attention_vjp([[0.0]], [[1.0], [2.0]], [[1.0], [3.0]], [[1.0]])
    >>> dv
    array([[0.5],
           [0.5]])
    """
    energy_of(energy).require("kernel", "iem_ref.accel.cpu").require("gradient", "iem_ref.accel.cpu's attention_vjp")
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment,
                            energy=energy, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window,
                            enable_gqa=enable_gqa, sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                            dropout_p=dropout_p, dropout_mask=dropout_mask, score_mod=score_mod, mask_mod=mask_mod)
    u = check_grad_out(grad_out, inp.batch, inp.n, inp.dv)
    mod = kernel_mod(inp.score_mod)
    dtype = kernel_dtype(q=inp.q, k=inp.k_heads, v=inp.v_heads, grad_out=u)
    groups = _Groups(inp)
    batch, n, m, dv_ = groups.batch, groups.rows, inp.m, inp.dv
    D = inp.q.shape[-1]
    B = int(np.prod(batch, dtype=np.int64))
    dq = np.zeros((B, n, D), dtype)
    dk = np.zeros((B, m, D), dtype)
    dv = np.zeros((B, m, dv_), dtype)
    dsinks = None if inp.sinks is None else np.zeros(inp.sinks_shape, dtype)
    dz = np.zeros((B, n, m) if inp.bias is not None else (B, 0, 0))  # V1: dZ, summed to the bias's shape below

    def shaped():
        grads = (groups.unstack(dq.reshape(batch + (n, D))), dk.reshape(batch + (m, D)), dv.reshape(batch + (m, dv_)))
        if inp.bias is not None:
            grads += (_sum_to_shape(groups.unstack(dz.reshape(batch + (n, m))), inp.bias_shape).astype(dtype),)
        return grads if dsinks is None else grads + (dsinks,)

    if B == 0 or n == 0 or m == 0:  # no keys: a = 0, so Delta = 0 and dsinks = 0
        return shaped()
    if groups.g > 1:
        qs, us = groups.stack(inp.q), groups.stack(np.broadcast_to(u, inp.batch + (inp.n, dv_)))
    else:
        qs, us = as_float_array(q, "q"), as_float_array(u, "grad_out")
    pm = _problem(dtype, batch, n, m, q=qs, k=as_float_array(k, "k"), v=as_float_array(v, "v"), u=us, mask=groups.mask,
                  energy=ENERGIES[energy], scale=_scale_of(inp.tau), offset=inp.causal_offset, is_causal=inp.is_causal,
                  window=inp.window, inp=inp, groups=groups, sinks=inp.sinks)
    if out is None or lse is None:
        a, L = _run_forward(pm, batch, n, m, dv_, mod=mod)
    else:
        a = as_float_array(out, "out")
        L = as_float_array(lse, "lse")
        if a.shape[-2:] != (inp.n, dv_) or L.shape[-1:] != (inp.n,):
            raise ValueError(f"out must be (B..., N, Dv) and lse (B..., N) with N = {inp.n}, Dv = {dv_}; got {a.shape} and {L.shape}")
        a = groups.stack(np.broadcast_to(a, inp.batch + (inp.n, dv_)))
        L = groups.stack(np.broadcast_to(L, inp.batch + (inp.n,))[..., None])[..., 0]
    a64 = np.broadcast_to(a, batch + (n, dv_)).reshape(B, n, dv_).astype(np.float64)
    L64 = _ro(np.ascontiguousarray(np.broadcast_to(L, batch + (n,)).reshape(B, n), dtype=np.float64))
    u64 = np.broadcast_to(us, batch + (n, dv_)).reshape(B, n, dv_).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        delta = _ro(np.ascontiguousarray(np.einsum("bnc,bnc->bn", u64, a64)))  # Delta_i = <u_i, a_i> = sum_j r_ij b_ij
    del a64, u64
    bq, bk, nsplit = plan(B, n, m, dtype, backward=True, band=_band_width(pm[0]), row_values=D)
    blocks = _blocks(pm[0], bq)
    x_rows = n if ((pm[0].softcap > 0.0 or mod is not None) and pm[0].energy == SQEUCLIDEAN) else 0  # K2's sum_j dX_ij (V3, F3)
    splits = _k.Splits(np.zeros((B, nsplit, n, D)), np.zeros((B, nsplit, x_rows)))
    rowsum = np.zeros((B, n))
    saved = _k.Saved(L64, delta, np.zeros((B, n)), _ro(rowsum))  # rowsum is filled below, through its own name
    if inp.sinks is not None:
        _run_stages(_kernel("backward", features_of(pm[0], mod)), (0,), *pm, blocks, bk, saved, _k.Grads(dq, dk, dv, dz),
                    splits)  # the certain-key counts
        sink = np.tile(pm[0].sinks, (1, n // groups.g))  # row i of element b: sinks[b, i % g]
        rowsum[...] = sink_routing(sink, L64, saved.cnt, delta)  # sum_j dS_ij = Delta_i r_sink,i: dLoss/dsink_i = -that
        per_head = groups.unstack(-rowsum.reshape(batch + (n,)))
        dsinks[...] = _sum_to_shape(per_head.sum(axis=-1), inp.sinks_shape)
    _run_stages(_kernel("backward", features_of(pm[0], mod)), (0, 1, 2) if inp.sinks is None else (1, 2), *pm, blocks, bk, saved,
                _k.Grads(dq, dk, dv, dz), splits)
    return shaped()



# --- scalar activations (S3, S4, H3) ----------------------------------------------
@njit(cache=True, parallel=True)
def _sign_mean_array(dp, dm, out):
    for i in prange(out.size):
        out[i] = sign_mean(dp[i], dm[i])


@njit(cache=True, parallel=True)
def _signed_gaussian_array(z, alpha, out):
    for i in prange(out.size):
        out[i] = signed_gaussian_mean(z[i], alpha)


@njit(cache=True, parallel=True)
def _softplus_array(z, tau, out):
    for i in prange(out.size):
        out[i] = softplus_scalar(z[i], tau)


def _flat64(x):
    return np.ascontiguousarray(x, dtype=np.float64).reshape(-1)


def sign_posterior_mean(d_plus, d_minus):
    """S3: ``a = r_+ - r_- = E[s | z]`` elementwise, as :func:`iem_ref.sign_posterior_mean`.

    Examples
    --------
    >>> round(float(sign_posterior_mean(0.0, np.log(3.0))), 15)  # tanh(log(3)/2) = 1/2, to an ulp
    0.5
    """
    dp, dm, dtype = check_sign_pair(d_plus, d_minus)
    out = np.empty(dp.size, np.float64)
    _sign_mean_array(_flat64(dp), _flat64(dm), out)
    return np.asarray(out.reshape(dp.shape), dtype=dtype)[()]


def tanh_from_signed_gaussian(z, m=1.0, sigma=1.0):
    """S4: ``E[s | z] = tanh(m z / sigma^2)`` from the signed Gaussian energies, as :func:`iem_ref.tanh_from_signed_gaussian`.

    Examples
    --------
    >>> float(tanh_from_signed_gaussian(0.5, m=2.0, sigma=1.0)) == float(np.tanh(1.0))
    True
    """
    z = as_float_array(z, "z")
    if not 0 < float(sigma) < np.inf:  # also refuses NaN (as the reference)
        raise ValueError(f"sigma must be finite and > 0 (the kernel width); got {sigma!r}")
    out = np.empty(z.size, np.float64)
    _signed_gaussian_array(_flat64(z), float(m) / float(sigma) ** 2, out)
    return np.asarray(out.reshape(z.shape), dtype=z.dtype)[()]


def softplus(z, tau=1.0):
    """H3: ``softplus_tau(z) = tau log(1 + exp(z / tau))``, as :func:`iem_ref.softplus`.

    Examples
    --------
    >>> float(softplus(0.0)) == float(np.log(2.0))
    True
    """
    z = as_float_array(z, "z")
    tau = check_tau(tau)
    out = np.empty(z.size, np.float64)
    _softplus_array(_flat64(z), tau, out)
    return np.asarray(out.reshape(z.shape), dtype=z.dtype)[()]


# --- compiling ahead of time ----------------------------------------------------------
#: the energies ``warmup`` knows: the caller's names, and ``"precomputed"`` for :func:`softmin_summary` (forward only)
WARMUP_ENERGIES = {**ENERGIES, "precomputed": PRECOMPUTED}


def warmup(dtypes=("float64", "float32"), ops=("forward", "backward"), energies=("dot",), variants=(False,), activations=False,
           report=print):
    """Compile (or load from Numba's cache) the chosen CPU kernels ahead of time; returns ``{kernel: seconds}``.

    One kernel per combination of ``dtypes`` (``"float64"``, ``"float32"``),
    ``ops`` (``"forward"``, ``"backward"``, and ``"verdict"``: the tiled
    oracle of :mod:`iem_ref.testing`, float64 and dot only), ``energies`` (``"dot"``,
    ``"sqeuclidean"``, ``"precomputed"``: :func:`softmin_summary`'s, forward
    only) and ``variants`` (False: the plain kernel; True: the one that
    calls with a bias, ALiBi, a soft-cap, sinks or dropout run).  The
    defaults warm what a plain call runs, in both dtypes.
    ``activations``: also the scalar activations (S3, S4, H3).  ``report``
    receives one line per kernel (its time, and whether it was compiled or
    loaded) and a total.

    Examples
    --------
    >>> times = warmup(dtypes=["float64"], ops=["forward"], report=lambda line: None)
    >>> list(times)
    ['forward f64_dot']
    """
    for name, given, allowed in (("dtypes", dtypes, {"float64", "float32"}), ("ops", ops, set(_SIGNATURES) | {"verdict"}),
                                 ("energies", energies, set(WARMUP_ENERGIES))):
        bad = sorted({str(x) for x in given} - allowed)
        if bad or isinstance(given, str):
            raise ValueError(f"{name} must be a list drawn from {sorted(allowed)}; got {given!r}")
    times, last = {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompilationNotice)
        for dtype in dtypes:
            for energy in energies:
                for op in ops:
                    if op == "backward" and energy == "precomputed":
                        continue  # softmin_summary has no backward kernel
                    if op == "verdict" and (dtype != "float64" or energy != "dot"):
                        continue  # the tiled oracle computes in float64, dot products only
                    for with_variants in variants:
                        features = _k.Features(np.dtype(dtype).name, WARMUP_ENERGIES[energy], bool(with_variants))
                        name = f"{op} {features.tag}"
                        t = types.float64 if features.dtype == "float64" else types.float32
                        if op == "verdict":
                            from . import verdict as _verdict

                            cached = _in_cache(_verdict._vk.kernels(features)["verdict"], _verdict._signature())
                            t0 = time.perf_counter()
                            last = _verdict._kernel(features)
                        else:
                            cached = _in_cache(_k.kernels(features)[op], _SIGNATURES[op](t))
                            t0 = time.perf_counter()
                            last = _kernel(op, features)
                        times[name] = time.perf_counter() - t0
                        report(f"{name:40s} {times[name]:6.2f} s   {'from the cache' if cached else 'compiled'}")
        if activations:
            t0 = time.perf_counter()
            z = np.zeros(2)
            sign_posterior_mean(z, z)
            tanh_from_signed_gaussian(z)
            softplus(z)
            times["scalar activations (float64)"] = time.perf_counter() - t0
            report(f"{'scalar activations (float64)':40s} {times['scalar activations (float64)']:6.2f} s")
    report(f"{'total':40s} {sum(times.values()):6.2f} s   (cache: {cache_dir(last)})")
    return times


# --- un-finalised partials (M1), for reductions across processes or machines ---------------
def _partials_of(pm, bq, bk, B, n, dv, batch, threads):
    """Run the forward's stage 0 with one key split and return its float64 partials, shaped ``batch + (N[, Dv])``.

    With one split the kernel also finishes the rows into ``out`` and ``lse``: scratch here, not returned.
    """
    parts = _new_partials(B, 1, n, dv)
    if B > 0 and n > 0:
        dtype = pm[0].v.dtype
        args = (*pm, _blocks(pm[0], bq), bk, 1, parts, np.empty((B, n, dv), dtype), np.empty((B, n), dtype))
        fn = _kernel("forward", features_of(pm[0]))
        if threads == 1:
            with _blas_single_thread():
                fn(0, 0, 1, *args)
        else:
            _run_stages(fn, (0,), *args)
    shape = batch + (n,)
    return parts.m[:, 0].reshape(shape), parts.l[:, 0].reshape(shape), parts.o[:, 0].reshape(shape + (dv,)), parts.nan[:, 0].reshape(shape)


def _check_tiles(tiles, B, n, m, dtype):
    if tiles is None:
        return plan(B, n, m, dtype)[:2]
    try:
        bq, bk = (int(t) for t in tiles)
    except (TypeError, ValueError):
        raise TypeError(f"tiles must be a pair of ints (queries per block, keys per tile) or None; got {tiles!r}") from None
    if bq < 1 or bk < 1:
        raise ValueError(f"tiles must be positive; got {tiles!r}")
    return bq, bk


def _check_threads(threads):
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads != 1):
        raise ValueError(f"threads must be None (numba.get_num_threads()) or 1; got {threads!r}")


def attention_partials(q, k, v, *, scale=None, mask=None, causal_offset=None, energy="dot", tiles=None, threads=None):
    """M1 without the finish: the float64 partials of every query over the keys of this call.

    The forward kernel of :func:`attention` with one key split, stopped
    before ``a = o / l`` and ``L = m + log l``, so that the partials of other
    key blocks (other calls, other processes) can be merged by M2.  In
    score space ``s_ij = -d_ij * scale``:

    * ``m (B..., N)``: the largest participating score (``-inf`` when none
      takes part, ``+inf`` when a score is ``+inf``);
    * ``l (B..., N)``: ``sum_j exp(s_ij - m_i)``;
    * ``o (B..., N, Dv)``: ``sum_j exp(s_ij - m_i) v_j``;
    * ``nan (B..., N)``: True where a NaN score spoils the row (``m``, ``l``,
      ``o`` are then meaningless).

    ``causal_offset``: None (no causal mask) or an int: query ``i`` sees key
    ``j`` when ``j <= i + causal_offset`` (indices of this call; a key block
    starting at ``j0`` of a query block starting at ``i0`` with the one-call
    offset ``off`` has ``off + i0 - j0``).  ``tiles``: ``(bq, bk)``, default
    :func:`plan`'s for these shapes; fixing them to the whole problem's plan
    makes a block's arithmetic that of the one-call kernel (the bounds of
    :mod:`iem_ref.bounds`).  ``threads=1`` runs the kernel on the calling
    thread only (for callers that parallelise over blocks themselves).

    Examples
    --------
    >>> import numpy as np
    >>> m, l, o, nan = attention_partials(np.zeros((1, 2)), np.zeros((2, 2)), np.array([[1.0], [3.0]]))
    >>> m, l, o, nan
    (array([0.]), array([2.]), array([[4.]]), array([False]))
    """
    if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, (int, np.integer))):
        raise TypeError(f"causal_offset must be an int or None; got {type(causal_offset).__name__}")
    _check_threads(threads)
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, energy=energy)
    _check_energy(energy)
    dtype = kernel_dtype(q=inp.q, k=inp.k, v=inp.v)
    B = int(np.prod(inp.batch, dtype=np.int64))
    bq, bk = _check_tiles(tiles, B, inp.n, inp.m, dtype)
    causal = causal_offset is not None
    pm = _problem(dtype, inp.batch, inp.n, inp.m, q=as_float_array(q, "q"), k=as_float_array(k, "k"), v=as_float_array(v, "v"),
                 mask=inp.mask, energy=ENERGIES[energy], scale=_scale_of(inp.tau), offset=int(causal_offset) if causal else 0,
                 is_causal=causal)
    return _partials_of(pm, bq, bk, B, inp.n, inp.dv, inp.batch, threads)


def softmin_partials(d, v, tau=1.0, *, mask=None, tiles=None, threads=None):
    """M1 without the finish over precomputed energies: ``(m, l, o, nan)`` as :func:`attention_partials`, scores ``-d / tau``.

    Examples
    --------
    >>> import numpy as np
    >>> softmin_partials([[1.0, 1.0]], [[1.0], [3.0]])[:3]
    (array([-1.]), array([2.]), array([[4.]]))
    """
    _check_threads(threads)
    d, v, _ = check_summary_inputs(d, v, mask, "zero")
    tau = check_tau(tau)
    dtype = kernel_dtype(d=d, v=v)
    try:
        batch = np.broadcast_shapes(d.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"leading (batch) axes do not broadcast: d {d.shape}, v {v.shape}") from None
    n, m, dv = d.shape[-2], d.shape[-1], v.shape[-1]
    mask_b = None if mask is None else np.broadcast_to(np.asarray(mask), batch + (n, m))
    B = int(np.prod(batch, dtype=np.int64))
    bq, bk = _check_tiles(tiles, B, n, m, dtype)
    pm = _problem(dtype, batch, n, m, v=v, d=d, mask=mask_b, energy=PRECOMPUTED, scale=_scale_of(tau))
    return _partials_of(pm, bq, bk, B, n, dv, batch, threads)
