"""CUDA kernels of the online softmin (M1-M2) and its backward pass (G4).

Shape legend: ``N`` queries, ``M`` keys, ``D`` features of queries and keys,
``Dv`` features of values, ``Bf`` the flattened (broadcast) batch.

Every operand reaches a kernel as a *strided view*: a flat 1-D device array
``X``, a per-batch element offset ``xo (Bf,)`` and two element strides
``(xr, xc)`` for its two trailing axes, so element ``[b, i, c]`` is
``X[xo[b] + i * xr + c * xc]``.  Broadcast axes have stride 0, so batch
broadcasting, transposed layouts and CuPy / torch views need no copy.

The block layout on a GPU (``LAYOUTS["gpu"]``; the simulator runs the same code with 8 threads
and 8 x 8 tiles, ``LAYOUTS["simulator"]``): ``NT = 128`` threads as a 16 x 8 grid
``(tx, ty)``; a block owns ``BR = 32`` *rows* (queries in the forward and
dq kernels, keys in the dk/dv kernel) and walks over tiles of ``BC = 32``
*columns* (keys, resp. queries).  With grouped-query heads (V6) the queries
of a key/value head are its group's, packed ``row = g i + h`` (query ``i``
of the group's head ``h``), so each key/value tile serves the whole group
and ``dk, dv`` sum over it in one accumulator.  Per column tile:

1. ``_tile_dot``: the 32 x 32 score tile, each thread a 4 x 2 register
   micro-tile, the row and column operands staged through shared memory in
   chunks of ``DC = 16`` features (a plain shared-memory GEMM);
2. the scores are classified (mask, causal, +-inf, NaN: the edge-case
   policy) and written to the shared tile ``S``;
3. the row statistics of the online softmin (M2: running maximum ``m``,
   rescale factor ``alpha``, sum ``l``) are updated by one thread per row;
4. ``_tile_accum``: the weights ``W`` times the value tile (staged in key
   chunks of ``KC = 16``) are added to the register accumulator, 4 rows x 8
   columns per thread, ``CW = 128`` output columns per pass (wider outputs
   take several passes, each recomputing the scores).

Decoding (too few row blocks to fill the GPU): ``forward_split`` runs the
same forward with each block's key tiles cut into ``nsplit`` runs (the
grid's ``y``), writing each run's partial state ``(o, m, l)``, and
``combine`` merges the runs by M2 and finishes the rows.

Nothing of size N x M is ever written to global memory.  Every
``cuda.syncthreads()`` is reached by all threads of the block: barriers sit
outside conditionals, inside loops whose trip counts are the same for the
whole block.

Encoding of the shared score tile ``S`` (the policy of the README):
``-inf`` = the key does not take part (masked, causal, outside the arrays, or
energy ``+inf``): its value is never used; ``+inf`` = energy ``-inf``, a
certain key; NaN propagates; finite = the scaled score ``x = -d * scale``.
In the weight tile, ``SENT = -1`` marks "not a hypothesis" (weights are
``>= 0`` or NaN otherwise).

Kernels are built per dtype and energy by :func:`build` (float32 kernels
compute in float32: every constant is made with the kernel's dtype, so
nothing is promoted to float64 on the GPU).
"""

from __future__ import annotations

import math

import numba
import numpy as _np
from numba import cuda

from . import _problem
from ._problem import DOT, PRECOMPUTED, SQEUCLIDEAN, device_problem_type

if not hasattr(_np, "row_stack"):
    # numba-cuda (0.30.4 and earlier) registers an overload of np.row_stack when it compiles its
    # first kernel; NumPy 2.5 removed that alias of np.vstack, and every compilation then fails
    # with AttributeError.  The alias is restored (the simulator never gets there).
    _np.row_stack = _np.vstack

LAYOUT_KEYS = ("NT", "TX", "BR", "BC", "DC", "DCP", "KC", "CW", "RS", "CS", "OC")


def _layout(tx, ty, br, bc, dc, kc, cw):
    """A thread / tile layout: ``tx * ty`` threads, ``br`` rows, ``bc`` columns, ``cw`` output columns per pass."""
    lay = dict(NT=tx * ty, TX=tx, BR=br, BC=bc, DC=dc, DCP=dc + 1, KC=kc, CW=cw, RS=br // ty, CS=bc // tx, OC=cw // tx)
    assert lay["RS"] * ty == br and lay["CS"] * tx == bc and lay["OC"] * tx == cw and bc % kc == 0
    assert lay["NT"] >= br  # one thread per row for the row statistics
    return lay


LAYOUTS = {
    # The GPU: 128 threads (16 x 8), 32 x 32 tiles, micro-tiles of 4 x 2 scores and 4 x 8 outputs,
    # 16-feature / 16-key chunks, 128 output columns per pass (DCP = DC + 1 pads shared rows
    # against bank conflicts).
    "gpu": _layout(tx=16, ty=8, br=32, bc=32, dc=16, kc=16, cw=128),
    # The simulator runs one Python thread per CUDA thread and pays per thread and per barrier:
    # the same code with 8 threads (4 x 2) and 8 x 8 tiles (same micro-tiles), so that small
    # test shapes also cross several tiles, chunks and output passes.
    "simulator": _layout(tx=4, ty=2, br=8, bc=8, dc=4, kc=4, cw=16),
}


def _default_layout():
    from numba.cuda.core import config

    return "simulator" if config.ENABLE_CUDASIM else "gpu"


def use_layout(name):
    """Select a layout of :data:`LAYOUTS` for the kernels built from now on (the simulator's tests run the GPU one too)."""
    global LAYOUT_NAME, LAYOUT, NT, BR
    LAYOUT_NAME = name
    LAYOUT = LAYOUTS[name]
    NT, BR = LAYOUT["NT"], LAYOUT["BR"]  # what the host needs: threads per block, rows per block
    _CACHE.clear()


_CACHE = {}
use_layout(_default_layout())

_OPTIONS = {"launch_bounds": None}


def configure(launch_bounds=None):
    """Options for the tiled kernels (forward, dq, dkv), applied from the next :func:`build` on.

    ``launch_bounds``: ``(threads, min_blocks_per_SM)`` handed to ``cuda.jit``
    (the kernels use 128 threads).  Without it ptxas gives the tiled kernels
    about 216-255 registers (two blocks per SM); ``(128, 3)`` or ``(128, 4)``
    trade registers for occupancy at the price of spills: to be measured on a
    GPU (``bench/bench_gpu.py`` times both).  Ignored by the simulator.
    """
    _OPTIONS["launch_bounds"] = launch_bounds
    _CACHE.clear()


def _tiled_jit():
    from numba.cuda.core import config

    lb = _OPTIONS["launch_bounds"]
    if lb is None or config.ENABLE_CUDASIM:
        return cuda.jit
    return cuda.jit(launch_bounds=lb)


def build(dtype_name, energy):
    """The kernels for one dtype (``"float32"``/``"float64"``) and energy code; cached."""
    key = (dtype_name, energy)
    if key not in _CACHE:
        _CACHE[key] = _build(dtype_name, energy)
    return _CACHE[key]


class Kernels:
    """The compiled kernels of one (dtype, energy): ``forward``, ``forward_split``, ``combine``, ``dq``, ``dkv``, ``rowdot``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def all(self):
        return dict(forward=self.forward, forward_split=self.forward_split, combine=self.combine, dq=self.dq, dkv=self.dkv, rowdot=self.rowdot)


def _build(dtype_name, energy):
    ft = getattr(numba, dtype_name)  # the kernel's float type: every constant is made with it
    # The tile layout, frozen into the kernels as constants (see LAYOUTS).
    NT, TX, BR, BC, DC, DCP, KC, CW, RS, CS, OC = (LAYOUT[key] for key in LAYOUT_KEYS)
    ZERO = ft(0.0)
    ONE = ft(1.0)
    HALF = ft(0.5)
    INF = ft(math.inf)
    NINF = ft(-math.inf)
    NAN = ft(math.nan)
    SENT = ft(-1.0)
    ENERGY = energy
    US = numba.uint32  # unsigned indices: Numba emits no negative-index wraparound for them
    UX = numba.uint64
    tiled = _tiled_jit()
    # Which backward kernel writes a bias's dZ (V1): either can, each pair once.  Chosen per dtype
    # so that no kernel spills at sm_90's 255 registers (ptxas -v): float64 dq spilled 156-204
    # bytes without the write and none with it; float32 dq spilled 16 bytes with it, dkv none.
    DZ_IN_DQ = dtype_name == "float64"
    # the row finish shared with the CPU path: the same Python source, compiled as device functions
    # (calling the CPU dispatchers from a kernel would need a CUDA driver to compile, even for PTX alone)
    log_partition_of_row = cuda.jit(device=True, inline=True)(_problem.log_partition_of_row.py_func)
    summary_of_row = cuda.jit(device=True, inline=True)(_problem.summary_of_row.py_func)
    merge_sink = cuda.jit(device=True, inline=True)(_problem.merge_sink.py_func)
    first_position_above = cuda.jit(device=True, inline=True)(_problem.first_position_above.py_func)
    logit = cuda.jit(device=True, inline=True)(_problem.logit.py_func)
    f64 = numba.float64

    @cuda.jit(device=True, inline=True)
    def _query_of(b, g, row):
        """V6: row ``row`` of key/value element ``b`` is query ``i`` of query element ``bq``: ``row = g i + h``, ``bq = b g + h``."""
        if g == 1:
            return b, row
        i = numba.int64(US(row) // US(g))  # unsigned: a cheaper division on the GPU
        return b * g + (row - i * g), i

    @cuda.jit(device=True, inline=True)
    def _row_start(X, b, g, row):
        """Where row ``row`` of element ``b`` of the :class:`~iem_ref.accel._problem.Operand` ``X`` starts (rows packed ``g`` per query, V6)."""
        if g == 1:  # spelled out here, not only in _query_of: the float64 forward spilled 4 bytes without it (ptxas, sm_90)
            return X.offset[b] + row * X.row
        bx, i = _query_of(b, g, row)
        return X.offset[bx] + i * X.row

    @cuda.jit(device=True, inline=True)
    def _stage(X, b, g, r0, nr, rows, k0, K, Xs, tid):
        """Xs[r, kk] = X[r0 + r, k0 + kk] for a tile of ``rows`` rows and ``DC`` features (0 outside the arrays)."""
        for e in range(tid, rows * DC, NT):
            r = e // DC
            kk = e - r * DC
            val = ZERO
            if r0 + r < nr and k0 + kk < K:
                val = X.data[UX(_row_start(X, b, g, r0 + r) + (k0 + kk) * X.col)]
            Xs[US(r), US(kk)] = val

    @cuda.jit(device=True, inline=True)
    def _tile_dot(A, ab, ag, r0, nr, Bm, bb, bg, c0, nc, K, As, Bs, acc, tid, tx, ty):
        """acc[a, c] = sum_k A[r0 + 4 ty + a, k] * B[c0 + tx + TX c, k]  (or sum (A - B)^2 for SQEUCLIDEAN).

        ``A``, ``B``: operands, rows of elements ``ab``, ``bb`` packed ``ag``, ``bg`` per query (V6; 1 for keys).
        """
        for a in range(RS):
            for c in range(CS):
                acc[a, c] = ZERO
        for k0 in range(0, K, DC):  # same trip count for the whole block: the barriers below are safe
            _stage(A, ab, ag, r0, nr, BR, k0, K, As, tid)
            _stage(Bm, bb, bg, c0, nc, BC, k0, K, Bs, tid)
            cuda.syncthreads()  # the chunk is staged
            kmax = min(DC, K - k0)
            for kk in range(kmax):
                for a in range(RS):
                    qa = As[US(ty * RS + a), US(kk)]
                    for c in range(CS):
                        kb = Bs[US(tx + TX * c), US(kk)]
                        if ENERGY == SQEUCLIDEAN:
                            diff = qa - kb
                            acc[a, c] += diff * diff
                        else:
                            acc[a, c] += qa * kb
            cuda.syncthreads()  # everyone is done with the chunk before it is overwritten

    @cuda.jit(device=True, inline=True)
    def _tile_dot_plain(A, ab, ag, r0, nr, Bm, bb, bg, c0, nc, K, As, Bs, acc, tid, tx, ty):
        """The plain inner-product tile (``<u_i, v_j>``), whatever the energy; operands as :func:`_tile_dot`."""
        for a in range(RS):
            for c in range(CS):
                acc[a, c] = ZERO
        for k0 in range(0, K, DC):
            _stage(A, ab, ag, r0, nr, BR, k0, K, As, tid)
            _stage(Bm, bb, bg, c0, nc, BC, k0, K, Bs, tid)
            cuda.syncthreads()  # the chunk is staged
            kmax = min(DC, K - k0)
            for kk in range(kmax):
                for a in range(RS):
                    qa = As[US(ty * RS + a), US(kk)]
                    for c in range(CS):
                        acc[a, c] += qa * Bs[US(tx + TX * c), US(kk)]
            cuda.syncthreads()  # done with the chunk

    @cuda.jit(device=True, inline=True)
    def _classify(t, take, scale):
        """Score ``t = -d`` of a pair -> the encoded scaled score (module docstring)."""
        if not take:
            return NINF
        if t != t:
            return NAN
        if t == INF:
            return INF  # energy -inf: certain
        if t == NINF:
            return NINF  # energy +inf: weight 0, value not read
        return t * scale

    @cuda.jit(device=True, inline=True)
    def _takes_part(prob, b, i, j):
        """Query ``i`` of element ``b`` sees key ``j``: inside the arrays, its key range (causality, window V4, segments V7) and the mask (True = takes part)."""
        if i >= prob.n or j >= prob.m:
            return False
        if j < prob.keys[i, 0] or j >= prob.keys[i, 1]:
            return False
        if prob.has_mask:
            MK, mo, mr, mc = prob.mask
            if MK[UX(mo[b] + i * mr + j * mc)] == 0:
                return False
        return True

    @cuda.jit(device=True, inline=True)
    def _logit_of(prob, b, i, j, x):
        """V1-V3 for the pair ``(i, j)`` of batch element ``b`` that takes part: the shared :func:`~iem_ref.accel._problem.logit`.

        The soft-cap runs in the kernel's dtype (a float64 ``tanh`` in the
        float32 kernels cost registers they do not have: ``dq`` spilled),
        the priors are added in float64, the logit rounded once.
        """
        bias = f64(0.0)
        if prob.has_bias:
            BI, bio, bir, bic = prob.bias
            bias = BI[UX(bio[b] + i * bir + j * bic)]
        alibi = f64(0.0)
        if prob.has_alibi:
            alibi = -prob.slopes[b, i] * abs(prob.keys[i, 2] - j)  # -slope |i' - j|
        return ft(logit(x, ft(prob.softcap), bias, alibi))

    @cuda.jit(device=True, inline=True)
    def _dropout_factor(prob, b, i, j):
        """V8's ``c_ij``: ``1 / (1 - p)`` where the pair is kept, 0 where dropped (1 without dropout)."""
        if not prob.has_keep:
            return ONE
        KP, kpo, kpr, kpc = prob.keep
        if KP[UX(kpo[b] + i * kpr + j * kpc)] == 0:
            return ZERO
        return ft(1.0 / prob.dropout_keep)

    @cuda.jit(device=True, inline=True)
    def _logit_and_factor(prob, b, i, j, x):
        """``(z, dz/dx)`` of a pair that takes part (V1-V3), the soft-cap's derivative ``1 - tanh(x / c)^2`` (1 without one)."""
        return _logit_of(prob, b, i, j, x), _softcap_factor(prob, x)

    @cuda.jit(device=True, inline=True)
    def _softcap_factor(prob, x):
        """V3's ``dz/dx = 1 - tanh(x / c)^2`` of an encoded score (1 without a soft-cap)."""
        if prob.softcap > 0.0:
            t = math.tanh(x / ft(prob.softcap))
            return ONE - t * t
        return ONE

    @cuda.jit(device=True, inline=True)
    def _key_range(r0, nr, g, m, keys):
        """The key tiles ``[start, end)`` (start a multiple of ``BC``) that the rows ``r0 .. r0 + BR - 1`` of ``nr`` may see (query ``row // g``; the ranges' ends never decrease)."""
        first = keys[r0 // g, 0]
        start = min(m, first // BC * BC)
        return start, min(m, max(start, keys[(min(nr, r0 + BR) - 1) // g, 1]))

    @cuda.jit(device=True, inline=True)
    def _tile_accum(W, S, X, xb, xg, c0, nc, p0, ncol, Xs, acc, tx, ty, limit):
        """acc[a, o] += sum_k W[4 ty + a, k] * X[c0 + k, p0 + tx + TX o] over the tile's taking-part k.

        ``X``: an operand, rows of element ``xb`` packed ``xg`` per query (V6; 1 for keys).

        ``S[r, k] == SENT`` marks a pair that does not take part: skipped, so
        its value (possibly NaN or inf) is never used.  ``limit`` (the
        forward's values, the backward's ``dv``): a weight that is 0 in
        floating point (underflow, or a finite key beside certain ones)
        stands for a positive one, so an infinite value is added as itself,
        never as ``0 * inf``.  Otherwise (``dX`` times ``k`` or ``q``) a zero
        weight reads nothing: the backward's edge-case policy.
        """
        tid = ty * TX + tx
        for k0 in range(0, BC, KC):
            for e in range(tid, KC * CW, NT):
                kk = e // CW
                col = e - kk * CW
                val = ZERO
                if c0 + k0 + kk < nc and p0 + col < ncol:
                    val = X.data[UX(_row_start(X, xb, xg, c0 + k0 + kk) + (p0 + col) * X.col)]
                Xs[US(kk), US(col)] = val
            cuda.syncthreads()  # the value chunk is staged
            for kk in range(KC):
                for a in range(RS):
                    if S[US(ty * RS + a), US(k0 + kk)] != SENT:
                        w = W[US(ty * RS + a), US(k0 + kk)]
                        if w != ZERO:
                            for o in range(OC):
                                acc[a, o] += w * Xs[US(kk), US(tx + TX * o)]
                        elif limit:
                            for o in range(OC):
                                x = Xs[US(kk), US(tx + TX * o)]
                                if x - x != ZERO:  # inf (or NaN): the limit of a positive weight
                                    acc[a, o] += x
            cuda.syncthreads()  # done with the chunk

    @cuda.jit(device=True, inline=True)
    def _pair_score(prob, acc_ac, b, i, j):
        """The score ``t = -d`` of one pair from the tile GEMM (or read from ``d``, the ``q`` operand, when precomputed)."""
        if ENERGY == PRECOMPUTED:
            D, do, dr, dc = prob.q
            return -D[UX(do[b] + i * dr + j * dc)]
        if ENERGY == SQEUCLIDEAN:
            return -(HALF * acc_ac)
        return acc_ac

    @cuda.jit(device=True, inline=True)
    def _merge_sink_of_row(sink, m, l):
        """A row's ``(m, l)`` with its sink merged (V5, :func:`~iem_ref.accel._problem.merge_sink`) and the factor of its sums; a NaN sink spoils the row."""
        m_new, l_new, factor = merge_sink(m, l, sink)
        return m_new, (l_new if sink == sink else NAN), factor

    @cuda.jit(device=True, inline=True)
    def _output_entry(prob, x, l, factor):
        """M2's result for one output entry: the sum ``x`` rescaled by the sink's ``factor``, over ``l`` (the policy's edge rows), over ``1 - p`` (V8)."""
        x = x * factor if x - x == ZERO else x  # an infinite sum stays itself
        a_ic = summary_of_row(x, l, False, prob.empty_nan)  # a NaN row has l = NaN
        return a_ic if not prob.has_keep else ft(f64(a_ic) / prob.dropout_keep)

    @cuda.jit(device=True, inline=True)
    def _row_results(m, l):
        """``(L, certain-key count)`` of a finished row (0 for an ordinary row)."""
        return log_partition_of_row(m, l, False), (l if m == INF else ZERO)  # a NaN row has l = NaN

    def _forward_kernel(SPLIT):
        """The forward kernel; ``SPLIT`` (a constant of the build): the key-split form, which writes partial states."""

        @tiled
        def forward(prob, nqb, nsplit, O, LSE, CNT):
            """M1-M2 for the :class:`~iem_ref.accel._problem.DeviceProblem` ``prob``: one block per (key/value element, 32 rows), ``nqb`` blocks per element.

            Online softmin over key tiles.  The rows of key/value element ``b``
            are its group's queries (``row = g i + h``: query ``i`` of element
            ``b g + h``, V6; ``g = 1`` without grouped-query heads), so each
            key/value tile is read once for the group.  For ``PRECOMPUTED`` the
            energies ``d (Bf, N, M)`` come in as the ``q`` operand (``k``
            unused).  Writes ``O (Bf, N, Dv)``, ``LSE (Bf, N)`` and ``CNT (Bf,
            N)`` (number of certain keys; 0 for an ordinary row).

            ``SPLIT`` (``nsplit > 1``; decoding: too few row blocks to fill the
            GPU): block ``(row block, split)`` (the grid's ``x, y``) takes the ``split``-th of
            ``nsplit`` equal runs of the rows' key tiles and writes its partial
            state ``(o, m, l)`` to ``O``, ``LSE``, ``CNT`` of ``nsplit Bf`` rows
            instead (element ``b`` split ``s`` at ``b nsplit + s``), which
            :func:`combine` merges.
            """
            m, d, dv, scale, g = prob.m, prob.d, prob.dv, prob.scale, prob.group
            nr = prob.n * g  # the rows of a key/value element
            tid = cuda.threadIdx.x
            tx = tid % TX
            ty = tid // TX
            b = cuda.blockIdx.x // nqb  # the key/value element
            r0 = (cuda.blockIdx.x - b * nqb) * BR
            As = cuda.shared.array((BR, DCP), ft)
            Bs = cuda.shared.array((BC, DCP), ft)
            S = cuda.shared.array((BR, BC), ft)
            Xs = cuda.shared.array((KC, CW), ft)
            m_s = cuda.shared.array(BR, ft)
            l_s = cuda.shared.array(BR, ft)
            al_s = cuda.shared.array(BR, ft)
            sacc = cuda.local.array((RS, CS), ft)
            oacc = cuda.local.array((RS, OC), ft)
            # the keys the block's queries see: other tiles are skipped
            m_start, m_end = _key_range(r0, nr, g, m, prob.keys)
            if SPLIT:  # the split's run of the tiles
                tiles = (m_end - m_start + BC - 1) // BC
                m_end = min(m_end, m_start + (cuda.blockIdx.y + 1) * tiles // nsplit * BC)
                m_start = min(m_end, m_start + cuda.blockIdx.y * tiles // nsplit * BC)
            n_pass = max(1, (dv + CW - 1) // CW)
            for p in range(n_pass):
                p0 = p * CW
                if tid < BR:
                    m_s[US(tid)] = NINF
                    l_s[US(tid)] = ZERO
                for a in range(RS):
                    for o in range(OC):
                        oacc[a, o] = ZERO
                cuda.syncthreads()  # row state initialised
                for c0 in range(m_start, m_end, BC):
                    if ENERGY != PRECOMPUTED:
                        _tile_dot(prob.q, b, g, r0, nr, prob.k, b, 1, c0, m, d, As, Bs, sacc, tid, tx, ty)
                    for a in range(RS):
                        bq, i = _query_of(b, g, r0 + ty * RS + a)
                        for c in range(CS):
                            j = c0 + tx + TX * c
                            take = _takes_part(prob, bq, i, j)
                            t = ZERO
                            if take:
                                t = _pair_score(prob, sacc[a, c], bq, i, j)
                            S[US(ty * RS + a), US(tx + TX * c)] = _classify(t, take, scale)
                    if prob.logits:  # V1-V3, each thread on its own entries (a pass of its own: the score tile is dead there)
                        for a in range(RS):
                            bq, i = _query_of(b, g, r0 + ty * RS + a)
                            for c in range(CS):
                                j = c0 + tx + TX * c
                                if i < prob.n and j < m:
                                    S[US(ty * RS + a), US(tx + TX * c)] = _logit_of(prob, bq, i, j, S[US(ty * RS + a), US(tx + TX * c)])
                    cuda.syncthreads()  # S holds the tile's encoded scores
                    if tid < BR:  # M2: the new running maximum and the rescale factor of the old state
                        mt = NINF
                        ncert = 0
                        for c in range(BC):
                            x = S[US(tid), US(c)]
                            if x == INF:
                                ncert += 1
                            elif x > mt:
                                mt = x
                        m_old = m_s[US(tid)]
                        if m_old == INF or ncert > 0:  # certain keys: only they keep mass
                            m_new = INF
                            alpha = ONE if m_old == INF else ZERO
                        else:
                            m_new = max(m_old, mt)
                            alpha = ONE if m_new == NINF else math.exp(m_old - m_new)
                        m_s[US(tid)] = m_new
                        al_s[US(tid)] = alpha
                    cuda.syncthreads()  # m_s, al_s ready
                    for a in range(RS):
                        r = ty * RS + a
                        mrow = m_s[US(r)]
                        for c in range(CS):
                            x = S[US(r), US(tx + TX * c)]
                            if x != x:
                                w = NAN
                            elif x == NINF:
                                w = SENT
                            elif mrow == INF:
                                w = ONE if x == INF else ZERO
                            else:
                                w = math.exp(x - mrow)
                            S[US(r), US(tx + TX * c)] = w  # the same thread wrote this entry: no race
                        alpha = al_s[US(r)]
                        for o in range(OC):
                            x = oacc[a, o]
                            if x - x == ZERO:  # an infinite sum stays itself: the factor is positive in exact arithmetic
                                oacc[a, o] = x * alpha
                    cuda.syncthreads()  # S holds the weights
                    if tid < BR:
                        lsum = l_s[US(tid)] * al_s[US(tid)]
                        for c in range(BC):
                            w = S[US(tid), US(c)]
                            if w != SENT:
                                lsum += w
                        l_s[US(tid)] = lsum
                    if prob.has_keep:  # V8: a dropped pair leaves the mean, not the sum l; its value is never read
                        cuda.syncthreads()  # the row sums have read the weights
                        for a in range(RS):
                            bq, i = _query_of(b, g, r0 + ty * RS + a)
                            for c in range(CS):
                                j = c0 + tx + TX * c
                                if i < prob.n and j < m and _dropout_factor(prob, bq, i, j) == ZERO:
                                    S[US(ty * RS + a), US(tx + TX * c)] = SENT
                    _tile_accum(S, S, prob.v, b, 1, c0, m, p0, dv, Xs, oacc, tx, ty, True)
                cuda.syncthreads()  # l_s final
                if tid < BR and not SPLIT:  # the sink (V5): one more partial, merged into the row's state (M2)
                    m_new, l_new, factor = _merge_sink_of_row(prob.sinks[_query_of(b, g, r0 + tid)[0]], m_s[US(tid)], l_s[US(tid)])
                    m_s[US(tid)] = m_new
                    l_s[US(tid)] = l_new
                    al_s[US(tid)] = factor
                cuda.syncthreads()  # the merged state
                for a in range(RS):
                    r = ty * RS + a
                    bq, i = _query_of(b, g, r0 + r)
                    if r0 + r < nr:
                        lrow = l_s[US(r)]
                        factor = al_s[US(r)]
                        for o in range(OC):
                            col = p0 + tx + TX * o
                            if col < dv:
                                if not SPLIT:
                                    O[bq, i, col] = _output_entry(prob, oacc[a, o], lrow, factor)
                                else:  # a key split's partial sum, merged by combine
                                    O[bq * nsplit + cuda.blockIdx.y, i, col] = oacc[a, o]
                if p == 0 and tid < BR and r0 + tid < nr:
                    bq, i = _query_of(b, g, r0 + tid)
                    lrow = l_s[US(tid)]
                    mrow = m_s[US(tid)]
                    if not SPLIT:
                        LSE[bq, i], CNT[bq, i] = _row_results(mrow, lrow)
                    else:
                        LSE[bq * nsplit + cuda.blockIdx.y, i] = mrow
                        CNT[bq * nsplit + cuda.blockIdx.y, i] = lrow
                cuda.syncthreads()  # before the next pass resets the row state

        return forward

    forward = _forward_kernel(False)
    forward_split = _forward_kernel(True)  # nsplit > 1: each block writes its split's partial state for combine

    @cuda.jit
    def combine(prob, nsplit, PO, PM, PL, O, LSE, CNT):
        """M2 over the forward's key splits (decoding): one thread per output entry ``(b, i, c)`` of ``O (Bf, N, Dv)``.

        The splits' partial states ``(o, m, l)`` (``PO (Bf nsplit, N, Dv)``,
        ``PM``, ``PL (Bf nsplit, N)``, split ``s`` of element ``b`` at ``b
        nsplit + s``) merge in split order as the tiles
        do: each rescaled to the largest ``m`` (an infinite sum stays
        itself), then the sink and the finish of :func:`forward`.  Column 0
        also writes ``LSE`` and ``CNT``.
        """
        n, dv = prob.n, prob.dv
        width = max(dv, 1)
        t = cuda.grid(1)
        b = t // (n * width)
        rest = t - b * (n * width)
        i = rest // width
        col = rest - i * width
        if b < LSE.shape[0]:
            mm = NINF
            for s in range(nsplit):
                mm = max(mm, PM[b * nsplit + s, i])
            lsum = ZERO
            x = ZERO
            for s in range(nsplit):
                ms = PM[b * nsplit + s, i]
                c = ONE if ms == mm else math.exp(ms - mm)
                lsum += c * PL[b * nsplit + s, i]
                if col < dv:
                    xs = PO[b * nsplit + s, i, col]
                    x += c * xs if xs - xs == ZERO else xs
            m_new, l_new, factor = _merge_sink_of_row(prob.sinks[b], mm, lsum)
            if col < dv:
                O[b, i, col] = _output_entry(prob, x, l_new, factor)
            if col == 0:
                LSE[b, i], CNT[b, i] = _row_results(m_new, l_new)

    @cuda.jit(device=True, inline=True)
    def _weight(x, lse, cnt):
        """r_ij from the encoded score and the saved log-partition (and certain-key count)."""
        if x != x:
            return NAN
        if x == NINF:
            return SENT
        if cnt > ZERO:
            return ONE / cnt if x == INF else ZERO
        return math.exp(x - lse)

    @cuda.jit(device=True, inline=True)
    def _dropped_or(bij, cij):
        """V8: ``b_ij = c_ij <u_i, v_j>``, 0 by selection for a dropped pair (its ``v_j`` and ``u_i`` are not read)."""
        return ZERO if cij == ZERO else bij * cij

    @cuda.jit(device=True, inline=True)
    def _routing(w, bij, dl, lse):
        """``dLoss/dz_ij = r_ij (b_ij - Delta_i)`` with the backward's edge-case policy.

        0 for a pair that takes no part (``SENT``) or has weight 0, and in a
        certain row (``L = +inf``: the output does not move under finite
        changes of the logits);
        NaN for a NaN weight and where ``Delta_i = <u_i, a_i>`` is not finite.
        """
        if w == SENT:
            return ZERO
        if w != w or dl - dl != ZERO:
            return NAN
        if lse == INF or w == ZERO:  # a zero weight routes nothing, whatever b holds (an overflowed <u_i, v_j>)
            return ZERO
        return w * (bij - dl)

    @tiled
    def dq(prob, nqb, LSE, CNT, DEL, RSUM, DQ, DZ):
        """G4, dq_i = scale * sum_j dX_ij k_j with dX_ij = dZ_ij = r_ij (<u_i, v_j> - delta_i); block per 32 queries.

        A soft-cap (V3) multiplies ``dZ`` by ``1 - tanh(x / c)^2`` (``dX``); with
        a bias (V1) and ``DZ_IN_DQ`` the first pass writes ``dZ`` to ``DZ``
        (else :func:`dkv` does).  For
        ``SQEUCLIDEAN`` also ``- scale * q_i * C_i``, ``C_i = sum_j dX_ij``:
        ``RSUM_i`` (nonzero with sinks only, V5), or with a soft-cap summed
        here (``q_i`` taken as 0 where not finite).  Rows as in :func:`forward`
        (a group's queries, V6).
        """
        m, d, dv, scale, g = prob.m, prob.d, prob.dv, prob.scale, prob.group
        nr = prob.n * g
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        b = cuda.blockIdx.x // nqb  # the key/value element
        r0 = (cuda.blockIdx.x - b * nqb) * BR
        As = cuda.shared.array((BR, DCP), ft)
        Bs = cuda.shared.array((BC, DCP), ft)
        S = cuda.shared.array((BR, BC), ft)
        Wt = cuda.shared.array((BR, BC), ft)
        Xs = cuda.shared.array((KC, CW), ft)
        xs_s = cuda.shared.array(BR, ft)  # sum_j dX_ij (K2 with a soft-cap)
        sacc = cuda.local.array((RS, CS), ft)
        bacc = cuda.local.array((RS, CS), ft)
        oacc = cuda.local.array((RS, OC), ft)
        m_start, m_end = _key_range(r0, nr, g, m, prob.keys)
        n_pass = max(prob.has_bias, (d + CW - 1) // CW)
        for p in range(n_pass):
            p0 = p * CW
            if tid < BR:
                xs_s[US(tid)] = ZERO
            for a in range(RS):
                for o in range(OC):
                    oacc[a, o] = ZERO
            for c0 in range(m_start, m_end, BC):
                _tile_dot(prob.q, b, g, r0, nr, prob.k, b, 1, c0, m, d, As, Bs, sacc, tid, tx, ty)
                _tile_dot_plain(prob.u, b, g, r0, nr, prob.v, b, 1, c0, m, dv, As, Bs, bacc, tid, tx, ty)
                for a in range(RS):
                    bq, i = _query_of(b, g, r0 + ty * RS + a)
                    lse = ZERO
                    cnt = ZERO
                    dl = ZERO
                    if i < prob.n:
                        lse = LSE[bq, i]
                        cnt = CNT[bq, i]
                        dl = DEL[bq, i]
                    for c in range(CS):
                        j = c0 + tx + TX * c
                        take = _takes_part(prob, bq, i, j)
                        t = ZERO
                        if take:
                            t = _pair_score(prob, sacc[a, c], bq, i, j)
                        x = _classify(t, take, scale)
                        factor = ONE
                        if take and prob.logits:
                            x, factor = _logit_and_factor(prob, bq, i, j, x)
                        w = _weight(x, lse, cnt)
                        bij = bacc[a, c]
                        if take and prob.has_keep:
                            bij = _dropped_or(bij, _dropout_factor(prob, bq, i, j))  # V8: b_ij = c_ij <u_i, v_j>
                        dz = _routing(w, bij, dl, lse)
                        if DZ_IN_DQ and take and prob.has_bias and p == 0:
                            DZ[bq, i, j] = dz
                        S[US(ty * RS + a), US(tx + TX * c)] = w
                        Wt[US(ty * RS + a), US(tx + TX * c)] = dz * factor
                cuda.syncthreads()  # S (flags) and Wt (dX) ready
                if ENERGY == SQEUCLIDEAN and tid < BR and prob.softcap > 0.0:  # only K2's dq reads the row sums
                    s = xs_s[US(tid)]
                    for c in range(BC):
                        if S[US(tid), US(c)] != SENT:
                            s += Wt[US(tid), US(c)]
                    xs_s[US(tid)] = s
                _tile_accum(Wt, S, prob.k, b, 1, c0, m, p0, d, Xs, oacc, tx, ty, False)
            cuda.syncthreads()  # xs_s final
            for a in range(RS):
                bq, i = _query_of(b, g, r0 + ty * RS + a)
                if i < prob.n:
                    rsum = xs_s[US(ty * RS + a)] if prob.softcap > 0.0 else RSUM[bq, i]
                    for o in range(OC):
                        col = p0 + tx + TX * o
                        if col < d:
                            val = scale * oacc[a, o]
                            if ENERGY == SQEUCLIDEAN and rsum != ZERO:
                                qv = prob.q.data[UX(prob.q.offset[bq] + i * prob.q.row + col * prob.q.col)]
                                if qv - qv != ZERO:  # not finite: the reference takes it as 0
                                    qv = ZERO
                                val -= scale * qv * rsum
                            DQ[bq, i, col] = val

    @tiled
    def dkv(prob, nkb, LSE, CNT, DEL, DK, DV, DZ):
        """G4, per block of 32 keys: dv_j = sum_i r_ij u_i and dk_j = scale * sum_i dS_ij q_i.

        With a bias (V1), unless ``DZ_IN_DQ``, the first pass also writes ``dZ``
        to ``DZ (B, N, M)`` (float64; a pass with no ``dk`` column when ``D = 0``).

        For ``SQEUCLIDEAN`` also ``- scale * k_j * sum_i dS_ij`` (``k_j`` taken as 0 where not finite).
        Passes ``0 .. ceil(D/CW) - 1`` produce dk columns, the following ones dv columns.
        The columns of key/value element ``b`` are its group's queries, as
        the rows of :func:`forward` (V6): ``dk``, ``dv`` sum over the group in
        one pass, each key/value tile read once.
        """
        m, d, dv, scale, g = prob.m, prob.d, prob.dv, prob.scale, prob.group
        nr = prob.n * g  # the columns (packed query rows) of a key/value element
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        b = cuda.blockIdx.x // nkb  # the key/value element
        r0 = (cuda.blockIdx.x - b * nkb) * BR  # first key of the block
        As = cuda.shared.array((BR, DCP), ft)
        Bs = cuda.shared.array((BC, DCP), ft)
        S = cuda.shared.array((BR, BC), ft)
        Wt = cuda.shared.array((BR, BC), ft)
        Xs = cuda.shared.array((KC, CW), ft)
        rs_s = cuda.shared.array(BR, ft)
        sacc = cuda.local.array((RS, CS), ft)
        bacc = cuda.local.array((RS, CS), ft)
        oacc = cuda.local.array((RS, OC), ft)
        # the queries that see a key of the block: other query tiles are skipped
        n_start = first_position_above(prob.keys, 1, r0) * g
        n_end = max(n_start, first_position_above(prob.keys, 0, min(m, r0 + BR) - 1) * g)
        n_dk = max(prob.has_bias, (d + CW - 1) // CW)  # a bias's gradient needs a dk pass even without features
        n_pass = n_dk + (dv + CW - 1) // CW
        for p in range(n_pass):
            is_dk = p < n_dk
            p0 = p * CW if is_dk else (p - n_dk) * CW
            kb = dv if is_dk else 0  # <u_i, v_j> is only needed for dS (the dk passes)
            if tid < BR:
                rs_s[US(tid)] = ZERO
            for a in range(RS):
                for o in range(OC):
                    oacc[a, o] = ZERO
            for c0 in range(n_start, n_end, BC):
                _tile_dot(prob.k, b, 1, r0, m, prob.q, b, g, c0, nr, d, As, Bs, sacc, tid, tx, ty)
                _tile_dot_plain(prob.v, b, 1, r0, m, prob.u, b, g, c0, nr, kb, As, Bs, bacc, tid, tx, ty)
                for a in range(RS):
                    j = r0 + ty * RS + a
                    for c in range(CS):
                        bq, i = _query_of(b, g, c0 + tx + TX * c)
                        take = _takes_part(prob, bq, i, j)
                        t = ZERO
                        lse = ZERO
                        cnt = ZERO
                        dl = ZERO
                        if take:
                            t = _pair_score(prob, sacc[a, c], bq, i, j)
                            lse = LSE[bq, i]
                            cnt = CNT[bq, i]
                            dl = DEL[bq, i]
                        x = _classify(t, take, scale)
                        factor = ONE
                        if take and prob.logits:
                            x, factor = _logit_and_factor(prob, bq, i, j, x)
                        w = _weight(x, lse, cnt)
                        cij = ONE
                        if take and prob.has_keep:
                            cij = _dropout_factor(prob, bq, i, j)  # V8: b_ij = c_ij <u_i, v_j>, dv_j = sum_i r_ij c_ij u_i
                        if not is_dk and cij == ZERO:
                            w = SENT  # a dropped pair's upstream gradient is never read
                        S[US(ty * RS + a), US(tx + TX * c)] = w
                        if is_dk:
                            dz = _routing(w, _dropped_or(bacc[a, c], cij), dl, lse)
                            if not DZ_IN_DQ and take and prob.has_bias and p == 0:
                                DZ[bq, i, j] = dz
                            Wt[US(ty * RS + a), US(tx + TX * c)] = dz * factor
                        else:
                            Wt[US(ty * RS + a), US(tx + TX * c)] = w * cij
                cuda.syncthreads()  # S (flags) and Wt ready
                if tid < BR:
                    s = rs_s[US(tid)]
                    for c in range(BC):
                        if S[US(tid), US(c)] != SENT:
                            s += Wt[US(tid), US(c)]
                    rs_s[US(tid)] = s
                if is_dk:
                    _tile_accum(Wt, S, prob.q, b, g, c0, nr, p0, d, Xs, oacc, tx, ty, False)
                else:
                    _tile_accum(Wt, S, prob.u, b, g, c0, nr, p0, dv, Xs, oacc, tx, ty, True)
            cuda.syncthreads()  # rs_s final
            for a in range(RS):
                r = ty * RS + a
                j = r0 + r
                if j < m:
                    for o in range(OC):
                        col = p0 + tx + TX * o
                        if is_dk and col < d:
                            val = scale * oacc[a, o]
                            if ENERGY == SQEUCLIDEAN:
                                kv = prob.k.data[UX(prob.k.offset[b] + j * prob.k.row + col * prob.k.col)]
                                if kv - kv != ZERO:  # not finite: the reference takes it as 0
                                    kv = ZERO
                                val -= scale * kv * rs_s[US(r)]
                            DK[b, j, col] = val
                        elif (not is_dk) and col < dv:
                            DV[b, j, col] = oacc[a, o]
            cuda.syncthreads()  # before the next pass resets rs_s

    @cuda.jit
    def rowdot(u, o, n, dv, DEL):
        """delta_i = <u_i, a_i> (= sum_j r_ij <u_i, v_j>) for the operands ``u``, ``o`` (:class:`~iem_ref.accel._problem.Operand`), one thread per row."""
        U, uo, ur, uc = u
        O, oo, orr, oc = o
        g = cuda.grid(1)
        b = g // max(n, 1)
        i = g - b * max(n, 1)
        if b < DEL.shape[0] and i < n:
            s = ZERO
            for c in range(dv):
                s += U[UX(uo[b] + i * ur + c * uc)] * O[UX(oo[b] + i * orr + c * oc)]
            DEL[b, i] = s

    @cuda.jit
    def cast(src, dst):
        """dst[i] = src[i] in dst's dtype (a device array of another dtype, cast once)."""
        g = cuda.grid(1)
        if g < dst.shape[0]:
            dst[g] = src[g]

    return Kernels(forward=forward, forward_split=forward_split, combine=combine, dq=dq, dkv=dkv, rowdot=rowdot, cast=cast, ft=ft)


def signatures(dtype_name, energy):
    """The argument types each kernel is launched with by :mod:`iem_ref.accel.cuda` (for ``compile_ptx``)."""
    from numba import types

    ft = getattr(types, dtype_name)
    i64 = types.int64
    a2 = types.Array(ft, 2, "C")
    a3 = types.Array(ft, 3, "C")
    p = device_problem_type(ft)
    op = p[0]
    sigs = {
        "forward": (p, i64, i64, a3, a2, a2),
        "forward_split": (p, i64, i64, a3, a2, a2),
        "combine": (p, i64, a3, a2, a2, a3, a2, a2),
        "rowdot": (op, op, i64, i64, a2),
    }
    if energy != PRECOMPUTED:
        dz = types.Array(types.float64, 3, "C")
        sigs["dq"] = (p, i64, a2, a2, a2, a2, a3, dz)
        sigs["dkv"] = (p, i64, a2, a2, a2, a3, a3, dz)
    return {name: types.void(*args) for name, args in sigs.items()}


def compile_all_ptx(cc=(9, 0)):
    """PTX of every kernel, dtype and energy for compute capability ``cc``: ``{(name, dtype, energy): ptx}``.

    Needs the real numba-cuda (not the simulator) and NVVM/NVRTC, no GPU:
    catches the typing and lowering errors the simulator cannot see (it runs
    the Python source).  Feed the PTX to ``ptxas -v`` for register counts.
    """
    out = {}
    for dtype_name in ("float32", "float64"):
        for energy in (DOT, SQEUCLIDEAN, PRECOMPUTED):
            kern = build(dtype_name, energy)
            for name, sig in signatures(dtype_name, energy).items():
                ptx, _ = cuda.compile_ptx(getattr(kern, name).py_func, sig, cc=cc)
                out[(name, dtype_name, energy)] = ptx
    return out
