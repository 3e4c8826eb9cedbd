"""Attention and the softmin summary on Dask: per-block partials (M1) merged by M2 in a fixed tree.

Needs the optional extra ``dask`` (``pip install iem_ref[dask]``: ``dask[array]``
and ``distributed``).  The functions build a Dask graph and return Dask
arrays; any scheduler runs it (threads, processes, ``distributed``).

How it runs: queries are chunked along the batch axes and ``N``, keys and
values along ``M`` (the feature axes ``D`` and ``Dv`` are made one chunk).
Each (query chunk, key chunk) task computes the un-finalised partial
``(m, l, o)`` of its block (M1): with ``backend="cpu"`` the fused kernel of
:mod:`iem_ref.accel.cpu` (:func:`~iem_ref.accel.cpu.attention_partials`, run on
the task's own thread, tiles fixed to the whole problem's
:func:`~iem_ref.accel.cpu.plan`), with ``backend="reference"``
:func:`iem_ref.streaming.partial_posterior` on the block's energies.  The
partials of a query chunk merge by M2 (:func:`iem_ref.streaming.merge_partials`)
in a pairwise tree over the key chunks in index order (``(0, 1), (2, 3),
...``, an odd one carried up), then one task finishes the rows
(:func:`iem_ref.streaming.finalize_partial`).  The merge order is part of the
graph, never the order in which tasks complete: for a fixed chunking the
result is bitwise identical from run to run and across schedulers.

Blocks that no query of the block may see are never scheduled: those above
the causal diagonal, and, when ``mask`` is a NumPy array, blocks it excludes
entirely.  A query chunk that sees no key at all finishes as an empty row.

Communication: a partial is ``N_chunk x (Dv + 2)`` float64 numbers per key
chunk, against ``N_chunk x M_chunk x (D + Dv)`` multiply-adds to form it.

Accuracy: the merged result is the one-machine path's with ``t`` more
rescale-and-add levels, ``t`` the tree depth (:func:`iem_ref.bounds.merge_bounds`).
Same edge-case policy as the one-machine functions (README "Edge-case
policy"), chunk by chunk: an empty row across all chunks gives 0 (or NaN with
``empty="nan"``) and ``L = -inf``; a NaN reaches only its rows; ``+inf``
energies take no part; ``-inf`` energies in different chunks share the mass.

Examples
--------
>>> import numpy as np, dask.array as da
>>> q = da.from_array(np.zeros((4, 2)), chunks=2)
>>> k = da.from_array(np.zeros((6, 2)), chunks=(3, 2)); v = da.from_array(np.arange(6.0)[:, None], chunks=(3, 1))
>>> attention(q, k, v, backend="reference").compute(scheduler="sync")[:, 0]
array([2.5, 2.5, 2.5, 2.5])
"""

from __future__ import annotations

import itertools
import math
import operator

import numpy as np

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:  # pragma: no cover - the extra is part of the test set-up
    raise ImportError("iem_ref.dask needs the optional extra 'dask': pip install 'iem_ref[dask]' (dask[array], distributed)") from exc

from ._validation import check_choice, check_tau
from .attention import prepare_attention
from .energies import energy_of
from .streaming import Partial, finalize_partial, merge_partials, partial_posterior

__all__ = ["attention", "softmin_summary", "BACKENDS", "DEFAULT_CHUNK_BYTES"]

#: where a block's partial is computed
BACKENDS = ("cpu", "reference")
#: the memory budget of one chunk of a NumPy input wrapped by these functions (bytes)
DEFAULT_CHUNK_BYTES = 64 * 2**20


# --- tasks (module level: they travel to worker processes by pickle) ------------------------------
def _from_kernel(m, l, o, nan):
    """The CPU kernel's score-space partial as a :class:`Partial` in energy space, ``tau = 1`` (exact: a negation)."""
    m = np.where(nan, np.nan, -m)
    l = np.where(nan, np.nan, l)
    o = np.where(nan[..., None], np.nan, o)
    return Partial(m, l, o, 1.0)


def _causal_take(n0, n, m0, m, offset):
    """The causal mask of a block: query ``n0 + i`` sees key ``m0 + j`` when ``m0 + j <= n0 + i + offset``."""
    return (m0 + np.arange(m))[None, :] <= (n0 + np.arange(n))[:, None] + offset


def _attention_block(q, k, v, mask, backend, scale, energy, offset, n0, m0, tiles, batch):
    """M1 of one (query chunk, key chunk) block, broadcast to the block's batch shape."""
    n, m = q.shape[-2], k.shape[-2]
    if backend == "cpu":
        from .accel import cpu

        off = None if offset is None else int(offset + n0 - m0)
        p = _from_kernel(*cpu.attention_partials(q, k, v, scale=scale, mask=mask, causal_offset=off, energy=energy,
                                                 tiles=tiles, threads=1))
    else:
        take = mask
        if offset is not None:
            causal = _causal_take(n0, n, m0, m, offset)
            take = causal if take is None else np.asarray(take) & causal
        inp = prepare_attention(q, k, v, scale=scale, mask=take, energy=energy)
        p = partial_posterior(inp.energies(), inp.v, inp.tau, mask=inp.takes_part())
    return _broadcast_partial(p, batch)


def _summary_block(d, v, mask, backend, tau, tiles, batch):
    """M1 of one block of precomputed energies."""
    if backend == "cpu":
        from .accel import cpu

        p = _from_kernel(*cpu.softmin_partials(d, v, tau, mask=mask, tiles=tiles, threads=1))
    else:
        p = partial_posterior(d, v, tau, mask=mask)
    return _broadcast_partial(p, batch)


def _broadcast_partial(p, batch):
    n, dv = p.o.shape[-2], p.o.shape[-1]
    return Partial(np.broadcast_to(p.m, batch + (n,)), np.broadcast_to(p.l, batch + (n,)),
                   np.broadcast_to(p.o, batch + (n, dv)), p.tau)


def _empty_partial(batch, n, dv, tau):
    """The identity of M2: no key takes part."""
    return Partial(np.full(batch + (n,), np.inf), np.zeros(batch + (n,)), np.zeros(batch + (n, dv)), tau)


def _finish(p, empty, dtype):
    a, L = finalize_partial(p, empty=empty)
    return a.astype(dtype), np.asarray(L, dtype=dtype)


# --- chunking and validation ---------------------------------------------------------------
def _is_dask(x):
    return isinstance(x, da.Array)


def _meta(x, name):
    """A zero-memory stand-in of ``x`` with its shape and dtype, for the one-machine validation."""
    if _is_dask(x):
        return np.broadcast_to(np.zeros((), x.dtype), x.shape)
    return np.asarray(x) if not isinstance(x, np.ndarray) else x


def _rows_per_chunk(row_bytes, chunk_bytes):
    return max(1, int(chunk_bytes // max(1, row_bytes)))


def _check_chunk_bytes(chunk_bytes):
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int (bytes per chunk of a wrapped NumPy input); got {chunk_bytes!r}")
    return int(chunk_bytes)


def _wrap(x, name, row_axis, chunk_bytes):
    """``x`` as a Dask array: a NumPy array is chunked along ``row_axis`` within ``chunk_bytes`` (other axes whole)."""
    if _is_dask(x):
        return x
    x = np.asarray(x)
    row_bytes = x.itemsize * int(np.prod([s for i, s in enumerate(x.shape) if i != x.ndim + row_axis], dtype=np.int64))
    chunks = list(x.shape)
    chunks[row_axis] = min(max(1, x.shape[row_axis]), _rows_per_chunk(row_bytes, chunk_bytes))
    return da.from_array(x, chunks=tuple(chunks), name=f"iem-input-{name}-{tokenize(x)}")


def _whole_axes(x, axes):
    """Rechunk ``axes`` of ``x`` to one chunk each (the feature axes: small, read whole by every task)."""
    want = {ax % x.ndim: -1 for ax in axes if len(x.chunks[ax]) > 1}
    return x.rechunk(want) if want else x


def _lead(x, ndim):
    """Prepend axes of length 1 so that ``x`` has ``ndim`` axes."""
    return x if x.ndim == ndim else x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _batch_chunks(operands, batch):
    """The chunks of each batch axis, which every operand of full length on that axis must share."""
    out = []
    for ax, size in enumerate(batch):
        chosen = None
        for name, x in operands:
            if x.shape[ax] == 1 and size != 1:
                continue
            if chosen is None:
                chosen = (name, x.chunks[ax])
            elif x.chunks[ax] != chosen[1]:
                raise ValueError(f"{chosen[0]} and {name} must be chunked alike along batch axis {ax}; got "
                                 f"{chosen[1]} and {x.chunks[ax]} (rechunk one of them)")
        out.append(chosen[1] if chosen is not None else (size,))
    return out


def _block_key(x, bidx, row_block, col_block, batch):
    """The graph key of ``x``'s block for batch block ``bidx`` (broadcast axes: block 0)."""
    own = tuple(0 if x.shape[ax] == 1 and batch[ax] != 1 else b for ax, b in enumerate(bidx))
    return (x.name,) + own + (row_block, col_block)


def _offsets(chunks):
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _check_backend(backend, energy):
    check_choice(backend, "backend", set(BACKENDS))
    if backend == "cpu":
        energy_of(energy).require("kernel", "backend='cpu' (backend='reference' computes every energy)")


# --- the graph ------------------------------------------------------------------------------
def _tree(layer, name, leaves):
    """Merge ``leaves`` (graph keys, in key-chunk order) pairwise, level by level; return the root's key."""
    level = 0
    while len(leaves) > 1:
        nxt = []
        for i in range(0, len(leaves) - 1, 2):
            key = (name, level, i // 2)
            layer[key] = (merge_partials, leaves[i], leaves[i + 1])
            nxt.append(key)
        if len(leaves) % 2:
            nxt.append(leaves[-1])
        leaves = nxt
        level += 1
    return leaves[0]


def _build(kind, token, row_ops, col_ops, mask, batch, bchunks, nchunks, mchunks, dv, dtype, tau, empty, block_task,
           skip):
    """Partials, merge trees and finishing tasks for every (batch block, query chunk); the ``(a, L)`` Dask arrays."""
    part_name = f"iem-{kind}-partial-{token}"
    merge_prefix = f"iem-{kind}-merge-{token}"
    fin_name = f"iem-{kind}-finish-{token}"
    a_name, L_name = f"iem-{kind}-out-{token}", f"iem-{kind}-lse-{token}"
    layer = {}
    noffs, moffs = _offsets(nchunks), _offsets(mchunks)
    for bidx in itertools.product(*(range(len(c)) for c in bchunks)):
        bshape = tuple(int(c[b]) for c, b in zip(bchunks, bidx))
        for i in range(len(nchunks)):
            leaves = []
            for j in range(len(mchunks)):
                if skip(bidx, i, j, noffs, moffs):
                    continue
                key = (part_name,) + bidx + (i, j)
                layer[key] = block_task(bidx, bshape, i, j, noffs, moffs)
                leaves.append(key)
            if leaves:
                root = _tree(layer, f"{merge_prefix}-{'.'.join(map(str, bidx + (i,)))}", leaves)
            else:
                root = (part_name, "empty") + bidx + (i,)
                layer[root] = (_empty_partial, bshape, int(nchunks[i]), dv, tau)
            fin = (fin_name,) + bidx + (i,)
            layer[fin] = (_finish, root, empty, dtype)
            layer[(a_name,) + bidx + (i, 0)] = (operator.getitem, fin, 0)
            layer[(L_name,) + bidx + (i,)] = (operator.getitem, fin, 1)
    deps = [x for x in list(row_ops) + list(col_ops) + ([mask] if mask is not None else []) if _is_dask(x)]
    graph = HighLevelGraph.from_collections(fin_name, layer, dependencies=deps)
    bch = tuple(tuple(int(s) for s in c) for c in bchunks)
    a = da.Array(graph, a_name, chunks=bch + (tuple(nchunks), (dv,)), dtype=dtype)
    L = da.Array(graph, L_name, chunks=bch + (tuple(nchunks),), dtype=dtype)
    return a, L


def _mask_operand(mask, full, bchunks, nchunks, mchunks, row_name, col_name):
    """``mask`` as a Dask array chunked like the blocks (broadcast axes of length 1 kept), and per-block "any" (NumPy masks)."""
    if mask is None:
        return None, None
    ndim = len(full)
    if _is_dask(mask):
        mk = _lead(mask, ndim)
        want = list(bchunks) + [tuple(nchunks), tuple(mchunks)]
        for ax in range(ndim):
            if mk.shape[ax] != 1 or full[ax] == 1:
                if mk.chunks[ax] != tuple(want[ax]):
                    what = row_name if ax == ndim - 2 else col_name if ax == ndim - 1 else f"batch axis {ax} of the others"
                    raise ValueError(f"mask must be chunked like {what} along axis {ax}: want {tuple(want[ax])}, "
                                     f"got {mk.chunks[ax]} (rechunk the mask)")
        return mk, None
    mk = np.asarray(mask)
    mk = mk.reshape((1,) * (ndim - mk.ndim) + mk.shape)
    chunks = tuple(tuple(want) if mk.shape[ax] != 1 or full[ax] == 1 else (1,)
                   for ax, want in enumerate(list(bchunks) + [tuple(nchunks), tuple(mchunks)]))
    arr = da.from_array(mk, chunks=chunks, name=f"iem-input-mask-{tokenize(mk)}")
    return arr, mk


def _mask_block_any(mk, bidx, i, j, bchunks, noffs, moffs, full):
    """Whether any pair of a block takes part under the NumPy mask ``mk``."""
    sel = []
    for ax, b in enumerate(bidx):
        if mk.shape[ax] == 1:
            sel.append(slice(None))
        else:
            o = _offsets(bchunks[ax])
            sel.append(slice(o[b], o[b + 1]))
    sel.append(slice(None) if mk.shape[-2] == 1 else slice(noffs[i], noffs[i + 1]))
    sel.append(slice(None) if mk.shape[-1] == 1 else slice(moffs[j], moffs[j + 1]))
    return bool(mk[tuple(sel)].any())


# --- public API -------------------------------------------------------------------------------
def attention(q, k, v, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", empty="zero",
              return_lse=False, backend="cpu", chunk_bytes=DEFAULT_CHUNK_BYTES):
    """A1-A4 on Dask: ``a_i = sum_j softmin_j(d_ij * scale) v_j`` as :func:`iem_ref.attention`, block by block (M1-M2).

    Parameters
    ----------
    q, k, v : dask or NumPy arrays, ``(B..., N, D)``, ``(B..., M, D)``, ``(B..., M, Dv)``
        ``q`` chunked along the batch axes and ``N``, ``k`` and ``v`` along
        ``M`` (the same chunks: ``ValueError`` otherwise) and the batch axes
        (as ``q``'s where both have the full length).  NumPy arrays are
        wrapped, ``N`` and ``M`` chunked so that a chunk stays within
        ``chunk_bytes``.
    scale, mask, is_causal, causal_alignment, energy, empty, return_lse
        As :func:`iem_ref.attention`.  A Dask ``mask`` must be chunked as
        the blocks (``q``'s ``N`` chunks, ``k``'s ``M`` chunks) along its
        full-length axes.  ``return_responsibilities`` is not offered: it is
        the ``N x M`` array this form avoids.
    backend : {"cpu", "reference"}
        Each block's partial by the fused kernel (energies ``"dot"`` and
        ``"sqeuclidean"``) or by the float64 reference (any energy; a
        callable must pickle to reach worker processes).
    chunk_bytes : int
        Memory budget of one chunk of a wrapped NumPy input.

    Returns
    -------
    a : dask array (B..., N, Dv), the inputs' float dtype; chunked as ``q`` along the batch axes and ``N``
    lse : dask array (B..., N), if ``return_lse``

    Examples
    --------
    >>> import numpy as np
    >>> a, lse = attention(np.zeros((1, 2)), np.zeros((2, 2)), np.array([[1.0], [3.0]]), return_lse=True,
    ...                    backend="reference")
    >>> a.compute(scheduler="sync"), lse.compute(scheduler="sync")
    (array([[2.]]), array([0.69314718]))
    """
    check_choice(empty, "empty", {"zero", "nan"})
    chunk_bytes = _check_chunk_bytes(chunk_bytes)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool; got {type(return_lse).__name__}")
    mask_meta = None if mask is None else (np.broadcast_to(np.ones((), bool), mask.shape) if _is_dask(mask) else mask)
    inp = prepare_attention(_meta(q, "q"), _meta(k, "k"), _meta(v, "v"), scale=scale, mask=mask_meta, is_causal=is_causal,
                            causal_alignment=causal_alignment, energy=energy)
    _check_backend(backend, energy)
    if _is_dask(mask) and mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array; got dtype {mask.dtype}")
    batch, n, m, dv = inp.batch, inp.n, inp.m, inp.dv
    ndim = len(batch) + 2
    q, k, v = (_whole_axes(_lead(_wrap(x, name, -2, chunk_bytes), ndim), [-1])
               for x, name in ((q, "q"), (k, "k"), (v, "v")))
    if k.chunks[-2] != v.chunks[-2]:
        raise ValueError(f"k and v must share their chunks along M; got {k.chunks[-2]} and {v.chunks[-2]} "
                         "(rechunk one of them)")
    bchunks = _batch_chunks([("q", q), ("k", k), ("v", v)], batch)
    nchunks, mchunks = q.chunks[-2], k.chunks[-2]
    mk, mk_np = _mask_operand(mask, batch + (n, m), bchunks, nchunks, mchunks, "q (N)", "k (M)")
    offset = inp.causal_offset if inp.is_causal else None
    tiles = None
    if backend == "cpu":
        from .accel import cpu

        tiles = cpu.plan(max(1, int(np.prod(batch, dtype=np.int64))), max(1, n), max(1, m), inp.dtype)[:2]
    token = tokenize(q.name, k.name, v.name, None if mk is None else mk.name, scale, is_causal, causal_alignment,
                     energy if isinstance(energy, str) else tokenize(energy), empty, backend, tiles)
    tau = 1.0 if backend == "cpu" else inp.tau

    def skip(bidx, i, j, noffs, moffs):
        if mchunks[j] == 0:
            return True
        if offset is not None and moffs[j] > noffs[i + 1] - 1 + offset:  # no query of the chunk sees its first key
            return True
        return mk_np is not None and not _mask_block_any(mk_np, bidx, i, j, bchunks, noffs, moffs, batch + (n, m))

    def block_task(bidx, bshape, i, j, noffs, moffs):
        mkey = None if mk is None else _block_key(mk, bidx, 0 if mk.shape[-2] == 1 else i, 0 if mk.shape[-1] == 1 else j, batch)
        return (_attention_block, _block_key(q, bidx, i, 0, batch), _block_key(k, bidx, j, 0, batch),
                _block_key(v, bidx, j, 0, batch), mkey, backend, scale, energy, offset, int(noffs[i]), int(moffs[j]),
                tiles, bshape)

    a, L = _build("attention", token, (q,), (k, v), mk, batch, bchunks, nchunks, mchunks, dv, inp.dtype, tau, empty,
                  block_task, skip)
    return (a, L) if return_lse else a


def softmin_summary(d, v, tau=1.0, *, mask=None, empty="zero", backend="cpu", chunk_bytes=DEFAULT_CHUNK_BYTES):
    """A3 + A4 on Dask over precomputed energies: ``(a, L)`` as :func:`iem_ref.softmin_summary`, block by block.

    ``d (..., N, M)`` chunked along the batch axes, ``N`` and ``M``; ``v
    (..., M, Dv)`` along ``M`` with ``d``'s ``M`` chunks (``ValueError``
    otherwise); NumPy inputs are wrapped within ``chunk_bytes``.  ``mask``,
    ``empty`` as the one-machine function; ``backend`` as :func:`attention`.
    ``L`` has ``d``'s batch shape, as the one-machine function's.

    Examples
    --------
    >>> import numpy as np
    >>> a, L = softmin_summary(np.zeros((1, 4)), np.arange(4.0)[:, None], chunk_bytes=16, backend="reference")
    >>> a.compute(scheduler="sync"), L.compute(scheduler="sync")
    (array([[1.5]]), array([1.38629436]))
    """
    check_choice(empty, "empty", {"zero", "nan"})
    chunk_bytes = _check_chunk_bytes(chunk_bytes)
    tau = check_tau(tau)
    check_choice(backend, "backend", set(BACKENDS))
    from ._validation import check_summary_inputs, result_dtype

    mask_meta = None if mask is None else (np.broadcast_to(np.ones((), bool), mask.shape) if _is_dask(mask) else mask)
    dm, vm, _ = check_summary_inputs(_meta(d, "d"), _meta(v, "v"), mask_meta, empty)
    if _is_dask(mask) and mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array; got dtype {mask.dtype}")
    dtype = result_dtype(dm, vm)
    try:
        batch = tuple(np.broadcast_shapes(dm.shape[:-2], vm.shape[:-2]))
    except ValueError:
        raise ValueError(f"leading (batch) axes do not broadcast: d {dm.shape}, v {vm.shape}") from None
    n, m, dv = dm.shape[-2], dm.shape[-1], vm.shape[-1]
    ndim = len(batch) + 2
    if _is_dask(d):
        dd = d
    else:
        dd = np.asarray(d)
        rows = _rows_per_chunk(dd.itemsize * int(np.prod(dd.shape[:-2], dtype=np.int64)), chunk_bytes)
        side = max(1, math.isqrt(rows))
        dd = da.from_array(dd, chunks=dd.shape[:-2] + (min(max(n, 1), side), min(max(m, 1), side)),
                           name=f"iem-input-d-{tokenize(dd)}")
    dd = _lead(dd, ndim)
    vv = _whole_axes(_lead(_wrap(v, "v", -2, chunk_bytes), ndim), [-1])
    if not _is_dask(v):
        vv = vv.rechunk({ndim - 2: dd.chunks[-1]})
    if dd.chunks[-1] != vv.chunks[-2]:
        raise ValueError(f"d and v must share their chunks along M; got {dd.chunks[-1]} and {vv.chunks[-2]} "
                         "(rechunk one of them)")
    bchunks = _batch_chunks([("d", dd), ("v", vv)], batch)
    nchunks, mchunks = dd.chunks[-2], dd.chunks[-1]
    mk, mk_np = _mask_operand(mask, batch + (n, m), bchunks, nchunks, mchunks, "d (N)", "d (M)")
    tiles = None
    if backend == "cpu":
        from .accel import cpu

        tiles = cpu.plan(max(1, int(np.prod(batch, dtype=np.int64))), max(1, n), max(1, m), dtype)[:2]
    token = tokenize(dd.name, vv.name, None if mk is None else mk.name, tau, empty, backend, tiles)
    merge_tau = 1.0 if backend == "cpu" else tau

    def skip(bidx, i, j, noffs, moffs):
        if mchunks[j] == 0:
            return True
        return mk_np is not None and not _mask_block_any(mk_np, bidx, i, j, bchunks, noffs, moffs, batch + (n, m))

    def block_task(bidx, bshape, i, j, noffs, moffs):
        mkey = None if mk is None else _block_key(mk, bidx, 0 if mk.shape[-2] == 1 else i, 0 if mk.shape[-1] == 1 else j, batch)
        return (_summary_block, _block_key(dd, bidx, i, j, batch), _block_key(vv, bidx, j, 0, batch), mkey, backend, tau,
                tiles, bshape)

    a, L = _build("summary", token, (dd,), (vv,), mk, batch, bchunks, nchunks, mchunks, dv, dtype, merge_tau, empty,
                  block_task, skip)
    # L depends on d (and the mask) only: d's batch shape, as the one-machine function returns it.
    own = dm.shape[:-2]
    lead = len(batch) - len(own)
    sel = tuple(0 if ax < lead else slice(0, 1) if own[ax - lead] == 1 and batch[ax] != 1 else slice(None)
                for ax in range(len(batch)))
    L = L[sel + (slice(None),)]
    return a, L
