"""Numba kernels behind :mod:`iem_ref.accel.cpu`: the fused one-pass softmin summary (M1-M2) and its backward (G4).

Shape legend (one batch element): ``q (N, D)``, ``k (M, D)``, ``v (M, Dv)``,
``u (N, Dv)`` (upstream gradient), mask ``(N, M)`` (any strides, 0 for
broadcast axes); tiles: ``bq`` queries x ``bk`` keys.

Scores, not energies: inside the kernels ``s_ij = -d_ij * scale`` (for the dot
energy ``s = scale <q_i, k_j>``; for the squared-Euclidean one
``s = -scale ||q_i - k_j||^2 / 2 = scale (<q_i, k_j> - |q_i|^2/2 - |k_j|^2/2)``),
so the online softmin keeps a running **maximum** score ``m`` (``= -min d *
scale``), ``l = sum_j exp(s_ij - m)`` and ``o = sum_j exp(s_ij - m) v_j``:
the partial posterior M1, merged across key tiles and key splits by M2.

Arithmetic per dtype ``T`` (float32 or float64):
- score tile ``S = Q_b K_b^T`` and value tile ``P V_b``: one BLAS GEMM each, in
  ``T`` (so float32 inputs give float32 dot products of length ``D`` and
  float32 sums over the ``bk`` keys of a tile);
- shift, ``exp`` (the polynomial of :mod:`._fastexp`, <= 2 ulps) and the
  tile's row sum in ``T`` (the row sum with 8 fixed partial sums);
- running ``m, l, o`` (across tiles and splits), the final ``o / l`` and
  ``L = m + log l`` in float64, rounded once to ``T``.

Edge cases (README policy) are handled by selection, never by arithmetic on
masked values: a key that does not take part gets the score ``-inf`` before
the maximum and the exponential; a value row with a non-finite entry goes to
the GEMM as 0 and is added back only for the rows where that key takes part;
a NaN score flags its row (the row sum turns NaN); rows whose running maximum
is still ``-inf`` contribute nothing; ``exp(s - m)`` is 1 where ``s == m``, so
several ``+inf`` scores share the mass.

Determinism: each query's reduction order is fixed by the tile shape and the
split count, which depend on the shapes only, never on which thread runs an
item; BLAS runs single-threaded inside the kernels (the caller pins it), so
results are bitwise identical across runs and thread counts.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.linalg import ensure_blas

from ._fastexp import f32_bits, f64_bits, fexp, fexp_shifted, like

ensure_blas()  # SciPy's BLAS (scipy.linalg.cython_blas), the one Numba's np.dot uses


# --- BLAS GEMM on raw offsets ---------------------------------------------------
class _BlasArgs:
    """Lowering of Numba values to the pointer/integer arguments of Numba's ``numba_xx*`` BLAS shims.

    One instance per call site (``gemm`` and ``gemv`` share it): ``dt`` is
    the call's float dtype (the scalars ``alpha``/``beta`` are passed by
    pointer in that type).
    """

    def __init__(self, context, builder, dt):
        self.context, self.builder, self.dt = context, builder, dt
        self.char = ir.IntType(8)
        self.void_p = self.char.as_pointer()
        self.intp = context.get_value_type(types.intp)

    def function(self, name, arg_types):
        """The shim ``name`` returning int32, declared in the module once."""
        return cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(ir.IntType(32), arg_types), name)

    def kind(self):
        return ir.Constant(self.char, ord("d" if self.dt == types.float64 else "s"))

    def int(self, val, ty):
        return self.context.cast(self.builder, val, ty, types.intp)

    def flag(self, val, ty):
        """A character code (``ord("n")``, ``ord("t")``) as the shim's ``char``."""
        return self.builder.trunc(self.int(val, ty), self.char)

    def ptr(self, arr_val, arr_ty, off_val, off_ty):
        """``&arr.data[off]`` as ``void *``."""
        ary = self.context.make_array(arr_ty)(self.context, self.builder, arr_val)
        return self.builder.bitcast(self.builder.gep(ary.data, [self.int(off_val, off_ty)]), self.void_p)

    def scalar(self, val, ty):
        """A stack slot holding ``val`` converted to ``dt``, as ``void *``."""
        slot = cgutils.alloca_once(self.builder, self.context.get_value_type(self.dt))
        self.builder.store(self.context.cast(self.builder, val, ty, self.dt), slot)
        return self.builder.bitcast(slot, self.void_p)


@intrinsic
def gemm(typingctx, transa, transb, m, n, k, alpha, a, ia, lda, b, ib, ldb, beta, c, ic, ldc):
    """Fortran (column-major) ``C[ic:] = alpha op(A[ia:]) op(B[ib:]) + beta C[ic:]``, ``?gemm`` from SciPy's BLAS.

    ``a, b, c`` are arrays of one float dtype (any shape, C-contiguous data),
    ``ia, ib, ic`` element offsets into them, ``transa``/``transb`` the
    characters' codes (``ord("n")``, ``ord("t")``).  A row-major ``(R, C)``
    block with row stride ``ld`` is the column-major ``(C, R)`` matrix with
    leading dimension ``ld``: the kernels pass row-major tiles that way.
    Unlike Numba's ``np.dot`` it allocates nothing, accepts read-only arrays
    as they are (``np.dot`` took 7x longer on them here) and takes any
    leading dimension, so tiles live in fixed buffers.
    """
    if not (a.dtype == b.dtype == c.dtype and a.dtype in (types.float32, types.float64)):
        return None
    sig = types.int32(transa, transb, m, n, k, alpha, a, ia, lda, b, ib, ldb, beta, c, ic, ldc)

    def codegen(context, builder, signature, args):
        (ta, tb, m_, n_, k_, al, a_, ia_, lda_, b_, ib_, ldb_, be, c_, ic_, ldc_) = args
        t = signature.args
        B = _BlasArgs(context, builder, t[6].dtype)
        ch, vp, ip = B.char, B.void_p, B.intp
        fn = B.function("numba_xxgemm", [ch, ch, ch, ip, ip, ip, vp, vp, ip, vp, ip, vp, vp, ip])
        return builder.call(fn, (
            B.kind(), B.flag(ta, t[0]), B.flag(tb, t[1]),
            B.int(m_, t[2]), B.int(n_, t[3]), B.int(k_, t[4]),
            B.scalar(al, t[5]), B.ptr(a_, t[6], ia_, t[7]), B.int(lda_, t[8]),
            B.ptr(b_, t[9], ib_, t[10]), B.int(ldb_, t[11]),
            B.scalar(be, t[12]), B.ptr(c_, t[13], ic_, t[14]), B.int(ldc_, t[15]),
        ))

    return sig, codegen


@intrinsic
def gemv(typingctx, trans, m, n, alpha, a, ia, lda, x, ix, beta, y, iy):
    """Fortran ``y[iy:] = alpha op(A[ia:]) x[ix:] + beta y[iy:]`` (unit strides), ``?gemv`` from SciPy's BLAS.

    For query blocks of very few rows (decoding): GEMM would pack (copy) the
    whole key tile for one or two columns of work.
    """
    if not (a.dtype == x.dtype == y.dtype and a.dtype in (types.float32, types.float64)):
        return None
    sig = types.int32(trans, m, n, alpha, a, ia, lda, x, ix, beta, y, iy)

    def codegen(context, builder, signature, args):
        (tr, m_, n_, al, a_, ia_, lda_, x_, ix_, be, y_, iy_) = args
        t = signature.args
        B = _BlasArgs(context, builder, t[4].dtype)
        ch, vp, ip = B.char, B.void_p, B.intp
        fn = B.function("numba_xxgemv", [ch, ch, ip, ip, vp, vp, ip, vp, vp, vp])
        return builder.call(fn, (
            B.kind(), B.flag(tr, t[0]), B.int(m_, t[1]), B.int(n_, t[2]),
            B.scalar(al, t[3]), B.ptr(a_, t[4], ia_, t[5]), B.int(lda_, t[6]),
            B.ptr(x_, t[7], ix_, t[8]), B.scalar(be, t[9]), B.ptr(y_, t[10], iy_, t[11]),
        ))

    return sig, codegen


_N = ord("n")
_T = ord("t")
_GEMV_ROWS = 4  # query blocks with fewer rows use GEMV per row instead of GEMM

_FM = {"contract"}  # FMA contraction only: fastmath=True would assume no inf/NaN, and the edge-case policy needs them


# --- small tile helpers -------------------------------------------------------
def _nonfinite_bits(x):
    """1 if ``x`` is inf or NaN (exponent bits all ones), else 0, by integer operations."""
    raise NotImplementedError("only callable from @njit code")


@overload(_nonfinite_bits)
def _nonfinite_bits_overload(x):
    if x == types.float64:
        return lambda x: np.int64((f64_bits(x) & 0x7FF0000000000000) == 0x7FF0000000000000)
    if x == types.float32:
        return lambda x: np.int64((f32_bits(x) & 0x7F800000) == 0x7F800000)
    return None



@intrinsic
def maxnum(typingctx, a, b):
    """IEEE ``maxNum``: the larger of ``a`` and ``b``, the other one where one is NaN (LLVM's ``llvm.maxnum``).

    Why an intrinsic: LLVM vectorises a ``maxnum`` reduction as it is, while
    the equivalent ``a if a > b else b`` loop stays scalar without fast-math
    flags (measured, float32 rows of 1024: 0.3 against 0.5-1.4 cycles per
    element).  The maximum is exact in any order, so vectorising it changes
    no result (the sign of a zero maximum aside, which no result depends on:
    ``s - (+0) == s - (-0)``).
    """
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        lt = context.get_value_type(signature.args[0])
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lt], ir.FunctionType(lt, [lt, lt]))
        return builder.call(fn, args)

    return a(a, b), codegen


@njit(cache=True, fastmath=_FM)
def _row_max(row, n):
    """Maximum of ``row[:n]`` ignoring NaN (``-inf`` if there is none), exact whatever the order."""
    m = like(-np.inf, row[0])
    for j in range(n):
        m = maxnum(m, row[j])
    return m


@njit(cache=True, fastmath=_FM)
def _exp_shift_sum(row, n, mt):
    """``row[j] <- exp(row[j] - mt)`` (1 where ``row[j] == mt``, so equal ``+inf`` scores share the mass); returns the sum.

    The sum runs over 8 fixed partial sums (fixed order, vectorisable), in the row's dtype.
    """
    one = like(1.0, mt)
    if mt == np.inf:  # certain keys: inf - inf would be NaN; they share the mass, the rest gets 0
        for j in range(n):
            x = row[j]
            row[j] = one if x == mt else fexp_shifted(x - mt)
    else:  # x == mt gives exp(0) = 1 exactly (r = 0, n = 0)
        for j in range(n):
            row[j] = fexp_shifted(row[j] - mt)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = like(0.0, mt)
    n8 = n - n % 8
    for j in range(0, n8, 8):
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        s4 += row[j + 4]
        s5 += row[j + 5]
        s6 += row[j + 6]
        s7 += row[j + 7]
    for j in range(n8, n):
        s0 += row[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True)
def _bad_rows(x, flags):
    """``flags[j] = True`` where row ``x[j]`` holds a non-finite entry; returns how many.

    The test is on the exponent bits (all ones: inf or NaN), an integer
    OR-reduction that vectorises (a floating-point one would not, in order).
    """
    nbad = 0
    for j in range(x.shape[0]):
        bad = 0
        for c in range(x.shape[1]):
            bad |= _nonfinite_bits(x[j, c])
        flags[j] = bad != 0
        nbad += bad != 0
    return nbad


@njit(cache=True)
def _finite_copy(x, flags, out):
    """``out = x`` with the non-finite entries of the flagged rows set to 0 (the GEMM operand)."""
    zero = 0.0  # stored into out's dtype exactly
    for j in range(x.shape[0]):
        if flags[j]:
            for c in range(x.shape[1]):
                xv = x[j, c]
                out[j, c] = xv if np.isfinite(xv) else zero
        else:
            for c in range(x.shape[1]):
                out[j, c] = x[j, c]


@njit(cache=True)
def _add_nonfinite(w, R, C, part, x, flags, out, transpose, limit):
    """The non-finite part of ``W @ X`` (``W^T @ X`` if ``transpose``), only over the pairs that take part.

    ``w[:R, :C]`` weights, ``part[:R, :C]`` True where the pair takes part,
    ``x`` the operand whose rows ``flags`` marks as holding non-finite
    entries (rows of ``x`` are indexed by ``C``, or by ``R`` if
    ``transpose``); the GEMM saw those entries as 0.  ``limit`` (the
    forward's values): a weight that is 0 in floating point (underflow, or a
    finite key beside certain ones) stands for a positive one, so an
    infinite value reaches the output as itself, never as ``0 * inf``.
    """
    F = x.shape[1]
    if not transpose:  # out (R, F) += w (R, C) @ x (C, F)
        for j in range(C):
            if flags[j]:
                for i in range(R):
                    if part[i, j]:
                        wij = w[i, j]
                        for c in range(F):
                            if not np.isfinite(x[j, c]):
                                out[i, c] += x[j, c] if (limit and wij == 0.0) else wij * x[j, c]
    else:  # out (C, F) += w^T (C, R) @ x (R, F)
        for i in range(R):
            if flags[i]:
                for j in range(C):
                    if part[i, j]:
                        for c in range(F):
                            if not np.isfinite(x[i, c]):
                                out[j, c] += w[i, j] * x[i, c]


@njit(cache=True)
def _half_sqnorms(x, out, bad):
    """``out[j] = |x_j|^2 / 2`` (accumulated in float64, rounded to ``out``'s dtype); ``bad[j]`` if it is not finite."""
    for j in range(x.shape[0]):
        acc = 0.0
        for c in range(x.shape[1]):
            acc += np.float64(x[j, c]) * np.float64(x[j, c])
        out[j] = 0.5 * acc
        bad[j] = not np.isfinite(out[j])


@njit(cache=True)
def _direct_sqeuclid_score(q, i, k, j, scale):
    """K2 by its definition, for rows with non-finite entries: ``s = -scale ||q_i - k_j||^2 / 2`` in float64."""
    acc = 0.0
    for c in range(q.shape[1]):
        diff = np.float64(q[i, c]) - np.float64(k[j, c])
        acc += diff * diff
    d = 0.5 * acc
    if scale == 0.0:  # the uniform limit: finite energies tie; the score of an energy +inf stays -inf (excluded), NaN stays NaN
        return -d if not np.isfinite(d) else 0.0
    return -d * scale


@njit(cache=True, fastmath=_FM)
def _scores(S, bq, bk, q, k, dd, i0, jb, energy, scale, hq, qbad, hk, kbad, causal, off, has_mask, mask):
    """Fill the score tile ``S[:bq, :bk]`` with ``s_ij`` (A1 / K2 times ``scale``), ``-inf`` where key ``jb + j`` does not take part.

    One GEMM ``S = Q_b K_b^T`` (row stride of ``S``: its buffer width), then
    the scale, the squared-Euclidean correction and the selection, row by row.
    """
    ld = S.shape[1]
    D = q.shape[1]
    ninf = like(-np.inf, scale)  # scale has the tile's dtype: no promotion below
    zero = like(0.0, scale)
    if energy == 2:  # precomputed energies: the raw score is -d
        for r in range(bq):
            for j in range(bk):
                S[r, j] = -dd[i0 + r, jb + j]
    elif D > 0:
        # the dot energy's scale rides on the GEMM (alpha): one rounding, as a separate product would make;
        # scale = 0 needs the raw products (their inf/NaN), and K2 subtracts the norms first
        alpha = scale if (energy == 0 and scale > 0.0) else like(1.0, scale)
        if bq < _GEMV_ROWS:
            for r in range(bq):
                gemv(_T, D, bk, alpha, k, jb * D, D, q, (i0 + r) * D, 0.0, S, r * ld)
        else:
            gemm(_T, _N, bk, bq, D, alpha, k, jb * D, D, q, i0 * D, D, 0.0, S, 0, ld)
    else:  # D = 0: every dot product is 0
        for r in range(bq):
            for j in range(bk):
                S[r, j] = zero
    if energy == 1:
        _half_sqnorms(k[jb : jb + bk], hk, kbad)
    for r in range(bq):
        i = i0 + r
        row = S[r]
        lim = bk
        if causal:
            lim = min(max(i + off - jb + 1, 0), bk)
        if energy != 1:
            if scale > 0.0:
                if energy == 2:
                    for j in range(lim):
                        row[j] = row[j] * scale
            else:  # scale = 0: finite scores tie at 0, +-inf and NaN keep their meaning
                for j in range(lim):
                    x = row[j]
                    row[j] = zero if np.isfinite(x) else x
        else:
            hqr = hq[r]
            if scale > 0.0:
                for j in range(lim):
                    row[j] = (row[j] - (hqr + hk[j])) * scale
            else:
                for j in range(lim):
                    row[j] = zero
            if qbad[r]:
                for j in range(lim):
                    row[j] = _direct_sqeuclid_score(q, i, k, jb + j, scale)
            else:
                for j in range(lim):
                    if kbad[j]:
                        row[j] = _direct_sqeuclid_score(q, i, k, jb + j, scale)
        for j in range(lim, bk):
            row[j] = ninf
        if has_mask:
            for j in range(lim):
                if not mask[i, jb + j]:
                    row[j] = ninf


@njit(cache=True)
def _value_product(v, iv, Dv, S, bq, bk, ld, T):
    """``T (bq, Dv) = P (bq, bk) @ V_tile (bk, Dv)`` with ``P`` in ``S`` (row stride ``ld``) and the tile at offset ``iv`` of ``v``."""
    if bq < _GEMV_ROWS:
        for r in range(bq):
            gemv(_N, Dv, bk, 1.0, v, iv, Dv, S, r * ld, 0.0, T, r * Dv)
    else:
        gemm(_N, _N, Dv, bq, bk, 1.0, v, iv, Dv, S, 0, ld, 0.0, T, 0, Dv)


# --- forward: one query block over one key range --------------------------------
@njit(cache=True, fastmath=_FM)
def _forward_block(q, k, v, dd, mask, has_mask, causal, off, energy, scale, i0, i1, j0, j1, bk_max, m, l, o, nan_row):
    """M1 over keys ``[j0, j1)`` for queries ``[i0, i1)``: the partial ``(m, l, o)`` (float64) and NaN flags.

    ``m (bq,)`` running maximum score (``-inf`` while nothing takes part),
    ``l (bq,)`` ``sum exp(s - m)``, ``o (bq, Dv)`` ``sum exp(s - m) v_j``,
    merged tile after tile by M2.
    """
    bq = i1 - i0
    Dv = v.shape[1]
    S = np.empty((bq, bk_max), dtype=q.dtype)
    T = np.empty((bq, Dv), dtype=q.dtype)
    vt = np.empty((bk_max, Dv), dtype=q.dtype)
    part = np.empty((bq, bk_max), dtype=np.bool_)
    vbad = np.empty(bk_max, dtype=np.bool_)
    hk = np.empty(bk_max, dtype=q.dtype)
    kbad = np.empty(bk_max, dtype=np.bool_)
    alpha = np.empty(bq, dtype=np.float64)
    hq = np.empty(bq, dtype=q.dtype)
    qbad = np.empty(bq, dtype=np.bool_)
    if energy == 1:
        _half_sqnorms(q[i0:i1], hq, qbad)
    ninf = -np.inf
    for r in range(bq):
        m[r] = ninf
        l[r] = 0.0
        nan_row[r] = False
        for c in range(Dv):
            o[r, c] = 0.0
    jb = j0
    while jb < j1:
        if causal and jb > i1 - 1 + off:
            break  # no query of this block sees keys from jb on
        bk = min(bk_max, j1 - jb)
        _scores(S, bq, bk, q, k, dd, i0, jb, energy, scale, hq, qbad, hk, kbad, causal, off, has_mask, mask)
        nbad = _bad_rows(v[jb : jb + bk], vbad)  # the tile is about to be read by the GEMM: cache-hot
        if nbad:
            for r in range(bq):
                for j in range(bk):
                    part[r, j] = S[r, j] != ninf  # NaN scores take part (and spoil their row)
        for r in range(bq):
            row = S[r]
            m_old = m[r]
            mx = np.float64(_row_max(row, bk))
            m_new = mx if mx > m_old else m_old
            if m_new == ninf:
                # nothing has taken part yet in this row; a NaN score would still spoil it
                for j in range(bk):
                    if row[j] != row[j]:
                        nan_row[r] = True
                    row[j] = 0.0
                alpha[r] = 1.0
                continue
            tile_sum = _exp_shift_sum(row, bk, like(m_new, row[0]))
            a = 1.0 if m_old == m_new else math.exp(m_old - m_new)  # M2: rescale the running sums
            alpha[r] = a
            m[r] = m_new
            l[r] = a * l[r] + np.float64(tile_sum)
            if tile_sum != tile_sum:
                nan_row[r] = True
        if Dv > 0:
            if nbad == 0:
                _value_product(v, jb * Dv, Dv, S, bq, bk, bk_max, T)
            else:
                _finite_copy(v[jb : jb + bk], vbad, vt)
                _value_product(vt, 0, Dv, S, bq, bk, bk_max, T)
                _add_nonfinite(S, bq, bk, part, v[jb : jb + bk], vbad, T, False, True)
        for r in range(bq):
            a = alpha[r]
            if a == 1.0:
                for c in range(Dv):
                    o[r, c] += np.float64(T[r, c])
            else:
                for c in range(Dv):  # an infinite sum stays itself: the factor is positive in exact arithmetic
                    oc = o[r, c]
                    o[r, c] = (a * oc if np.isfinite(oc) else oc) + np.float64(T[r, c])
        jb += bk


@njit(cache=True)
def _finalize_rows(m, l, o, nan_row, empty_nan, out, lse):
    """M2 (result): ``a = o / l``, ``L = m + log l`` (float64, rounded once to ``out``'s dtype), with the edge cases."""
    for r in range(m.shape[0]):
        Dv = o.shape[1]
        if nan_row[r]:
            lse[r] = np.nan
            for c in range(Dv):
                out[r, c] = np.nan
        elif l[r] == 0.0:  # empty row: no key takes part
            lse[r] = -np.inf
            for c in range(Dv):
                out[r, c] = np.nan if empty_nan else 0.0
        else:
            lse[r] = np.inf if m[r] == np.inf else m[r] + math.log(l[r])
            inv = l[r]
            for c in range(Dv):
                out[r, c] = o[r, c] / inv


def forward(stage, t, T, q3, k3, v3, qmap, kmap, vmap, d3, dmap, mask3, mmap, has_mask, causal, off, energy, scale, bq, bk,
            nsplit, empty_nan, pm, pl, po, pn, out, lse):
    """A1-A4 fused, over the flattened batch: ``out (B, N, Dv)``, ``lse (B, N)``; this thread's share of one stage.

    Plain Python: :mod:`iem_ref.accel.cpu` compiles it (``nogil``, one
    explicit signature per dtype) and runs it on ``T`` threads, thread ``t``
    taking the work items ``t, t + T, t + 2T, ...`` (which items a thread
    takes changes no result).  ``energy``: 0 dot, 1 sqeuclidean, 2
    precomputed energies ``d3`` (then ``q3``, ``k3`` are unused).

    Stage 0: work items ``(batch, query block, key split)``, each M1 over its
    keys into the float64 partials ``pm, pl, po, pn`` of shape
    ``(B, nsplit, N[, Dv])``; with one split the item also finishes its rows.
    Stage 1 (``nsplit > 1``, decoding: few queries, many keys): items
    ``(batch, query block)`` merge the splits in split order (M2) and finish.
    """
    B = out.shape[0]
    N = out.shape[1]
    Dv = out.shape[2]
    M = k3.shape[1]
    nqb = (N + bq - 1) // bq
    nkb = (M + bk - 1) // bk
    if stage == 0:
        for w in range(t, B * nqb * nsplit, T):
            b = w // (nqb * nsplit)
            rest = w % (nqb * nsplit)
            qblk = rest // nsplit
            sp = rest % nsplit
            i0 = qblk * bq
            i1 = min(N, i0 + bq)
            j0 = min(M, (sp * nkb // nsplit) * bk)
            j1 = min(M, ((sp + 1) * nkb // nsplit) * bk)
            _forward_block(
                q3[qmap[b]], k3[kmap[b]], v3[vmap[b]], d3[dmap[b]], mask3[mmap[b]], has_mask, causal, off, energy, scale,
                i0, i1, j0, j1, bk, pm[b, sp, i0:i1], pl[b, sp, i0:i1], po[b, sp, i0:i1], pn[b, sp, i0:i1],
            )
            if nsplit == 1:
                _finalize_rows(pm[b, 0, i0:i1], pl[b, 0, i0:i1], po[b, 0, i0:i1], pn[b, 0, i0:i1], empty_nan, out[b, i0:i1], lse[b, i0:i1])
        return
    for w in range(t, B * nqb, T):
        b = w // nqb
        i0 = (w % nqb) * bq
        i1 = min(N, i0 + bq)
        for sp in range(1, nsplit):  # M2, in split order
            for i in range(i0, i1):
                m1 = pm[b, 0, i]
                m2 = pm[b, sp, i]
                mm = m1 if m1 > m2 else m2
                c1 = 1.0 if m1 == mm else math.exp(m1 - mm)
                c2 = 1.0 if m2 == mm else math.exp(m2 - mm)
                pm[b, 0, i] = mm
                pl[b, 0, i] = c1 * pl[b, 0, i] + c2 * pl[b, sp, i]
                pn[b, 0, i] = pn[b, 0, i] or pn[b, sp, i]
                for c in range(Dv):
                    o1 = po[b, 0, i, c]
                    o2 = po[b, sp, i, c]
                    po[b, 0, i, c] = (c1 * o1 if np.isfinite(o1) else o1) + (c2 * o2 if np.isfinite(o2) else o2)
        _finalize_rows(pm[b, 0, i0:i1], pl[b, 0, i0:i1], po[b, 0, i0:i1], pn[b, 0, i0:i1], empty_nan, out[b, i0:i1], lse[b, i0:i1])


# --- the roof: the kernel's own GEMMs, alone ------------------------------------
@njit(cache=True)
def _gemm_block(q, k, v, i0, i1, bk_max):
    bq = i1 - i0
    D = q.shape[1]
    Dv = v.shape[1]
    M = k.shape[0]
    S = np.full((bq, bk_max), 0.5, dtype=q.dtype)
    T = np.zeros((bq, Dv), dtype=q.dtype)
    acc = 0.0
    for jb in range(0, M, bk_max):
        bk = min(bk_max, M - jb)
        gemm(_T, _N, bk, bq, D, 1.0, k, jb * D, D, q, i0 * D, D, 0.0, S, 0, bk_max)
        gemm(_N, _N, Dv, bq, bk, 1.0, v, jb * Dv, Dv, S, 0, bk_max, 0.0, T, 0, Dv)
        acc += T[0, 0]
    return acc


@njit(cache=True, parallel=True)
def gemm_roof(q, k, v, bq, bk):
    """The forward kernel's BLAS calls alone (score tile and value tile per key tile, same tiles, same ``prange``): its floor.

    Returns a checksum (so that nothing is optimised away).  The value GEMM
    multiplies the raw score tile (no softmin in between).
    """
    N = q.shape[0]
    nqb = (N + bq - 1) // bq
    total = 0.0
    for w in prange(nqb):
        i0 = w * bq
        total += _gemm_block(q, k, v, i0, min(N, i0 + bq), bk)
    return total


# --- backward (G4) ------------------------------------------------------------------
@njit(cache=True, fastmath=_FM)
def _p_ds_tile(S, Bt, bq, bk, lse, cnt, delta, i0, part, keep_part):
    """Responsibilities and routing gradients of a tile, in place: ``S <- r_ij``, ``Bt <- dLoss/ds_ij = r_ij (b_ij - Delta_i)``.

    ``r_ij = exp(s_ij - L_i)`` (the saved log-partition, G1), ``Delta_i =
    sum_j r_ij b_ij = <u_i, a_i>``.  Rows by their ``L``: NaN -> NaN on
    the keys that take part (as the reference), 0 elsewhere; ``-inf`` (empty) -> 0; ``+inf``
    (certain) -> ``1/c_i`` on the ``c_i`` keys with score ``+inf``.  A key
    that does not take part (score ``-inf``) gets ``r = 0`` and
    ``dLoss/ds = 0`` by selection, whatever its ``b``.
    """
    ninf = -np.inf
    for r in range(bq):
        srow = S[r]
        brow = Bt[r]
        if keep_part:
            for j in range(bk):
                part[r, j] = srow[j] != ninf
        L = lse[i0 + r]
        if L != L:  # NaN on the keys the row sees only: keys outside its mask stay unaffected
            for j in range(bk):
                nan_or_zero = np.nan if srow[j] != ninf else 0.0
                srow[j] = nan_or_zero
                brow[j] = nan_or_zero
        elif L == ninf:
            for j in range(bk):
                srow[j] = 0.0
                brow[j] = 0.0
        elif L == np.inf:
            w = 1.0 / cnt[i0 + r]
            dl = delta[i0 + r]
            for j in range(bk):
                if srow[j] == np.inf:
                    srow[j] = w
                    brow[j] = w * (brow[j] - dl)
                else:
                    srow[j] = 0.0
                    brow[j] = 0.0
        else:
            Lt = like(L, srow[0])
            dt = like(delta[i0 + r], srow[0])
            zero = like(0.0, Lt)
            for j in range(bk):
                s = srow[j]
                p = fexp(s - Lt)  # exp(-inf) = 0 for keys that do not take part; clamped if a saved L is off
                srow[j] = p
                brow[j] = p * (brow[j] - dt) if s != ninf else zero


@njit(cache=True)
def _rows_flags(x, i0, n, flags):
    """``flags[r]``: row ``i0 + r`` of ``x`` holds a non-finite entry; returns how many."""
    nb = 0
    for r in range(n):
        bad = False
        for c in range(x.shape[1]):
            bad |= not np.isfinite(x[i0 + r, c])
        flags[r] = bad
        nb += bad
    return nb


@njit(cache=True)
def _count_certain(q, k, dd, mask, has_mask, causal, off, energy, scale, i0, i1, bk_max, lse, cnt):
    """``cnt_i``: how many keys take part with score ``+inf`` (rows with ``L = +inf`` only)."""
    bq = i1 - i0
    any_certain = False
    for r in range(bq):
        cnt[i0 + r] = 0.0
        any_certain |= lse[i0 + r] == np.inf
    if not any_certain:
        return
    M = k.shape[0]
    S = np.empty((bq, bk_max), dtype=q.dtype)
    hq = np.empty(bq, dtype=q.dtype)
    qbad = np.empty(bq, dtype=np.bool_)
    hk = np.empty(bk_max, dtype=q.dtype)
    kbad = np.empty(bk_max, dtype=np.bool_)
    if energy == 1:
        _half_sqnorms(q[i0:i1], hq, qbad)
    for jb in range(0, M, bk_max):
        bk = min(bk_max, M - jb)
        _scores(S, bq, bk, q, k, dd, i0, jb, energy, scale, hq, qbad, hk, kbad, causal, off, has_mask, mask)
        for r in range(bq):
            for j in range(bk):
                cnt[i0 + r] += S[r, j] == np.inf


@njit(cache=True, fastmath=_FM)
def _backward_keys(q, k, v, u, dd, mask, has_mask, causal, off, energy, scale, j0, j1, bq_max, lse, cnt, delta, dk, dv):
    """G4, keys ``[j0, j1)``: ``dv_j = sum_i r_ij u_i`` and ``dk_j = scale sum_i dS_ij q_i`` (minus ``scale k_j sum_i dS_ij`` for K2), over all queries."""
    bk = j1 - j0
    N = q.shape[0]
    D = q.shape[1]
    Dv = v.shape[1]
    S = np.empty((bq_max, bk), dtype=q.dtype)
    Bt = np.empty((bq_max, bk), dtype=q.dtype)
    part = np.empty((bq_max, bk), dtype=np.bool_)
    tk = np.empty((bk, D), dtype=q.dtype)
    tv = np.empty((bk, Dv), dtype=q.dtype)
    qfin = np.empty((bq_max, D), dtype=q.dtype)
    ufin = np.empty((bq_max, Dv), dtype=q.dtype)
    qflag = np.empty(bq_max, dtype=np.bool_)
    uflag = np.empty(bq_max, dtype=np.bool_)
    hq = np.empty(bq_max, dtype=q.dtype)
    qbad = np.empty(bq_max, dtype=np.bool_)
    hk = np.empty(bk, dtype=q.dtype)
    kbad = np.empty(bk, dtype=np.bool_)
    acc_k = np.zeros((bk, D), dtype=np.float64)
    acc_v = np.zeros((bk, Dv), dtype=np.float64)
    colsum = np.zeros(bk, dtype=np.float64)
    i_start = 0
    if causal:  # queries i with i + off < j0 see none of these keys
        i_start = min(N, max(0, j0 - off))
        i_start -= i_start % bq_max  # keep the query tiling of the forward
    for i0 in range(i_start, N, bq_max):
        i1 = min(N, i0 + bq_max)
        bq = i1 - i0
        if energy == 1:
            _half_sqnorms(q[i0:i1], hq, qbad)
        _scores(S, bq, bk, q, k, dd, i0, j0, energy, scale, hq, qbad, hk, kbad, causal, off, has_mask, mask)
        if Dv > 0:
            gemm(_T, _N, bk, bq, Dv, 1.0, v, j0 * Dv, Dv, u, i0 * Dv, Dv, 0.0, Bt, 0, bk)  # b_ij = <u_i, v_j>
        else:
            Bt[:bq, :] = 0.0
        nq = _rows_flags(q, i0, bq, qflag) if energy != 2 else 0
        nu = _rows_flags(u, i0, bq, uflag)
        _p_ds_tile(S, Bt, bq, bk, lse, cnt, delta, i0, part, nq + nu > 0)
        if Dv > 0:
            if nu == 0:
                gemm(_N, _T, Dv, bk, bq, 1.0, u, i0 * Dv, Dv, S, 0, bk, 0.0, tv, 0, Dv)
            else:
                _finite_copy(u[i0:i1], uflag, ufin)
                gemm(_N, _T, Dv, bk, bq, 1.0, ufin, 0, Dv, S, 0, bk, 0.0, tv, 0, Dv)
                _add_nonfinite(S, bq, bk, part, u[i0:i1], uflag, tv, True, False)
            for j in range(bk):
                for c in range(Dv):
                    acc_v[j, c] += np.float64(tv[j, c])
        if D > 0 and energy != 2:
            if nq == 0:
                gemm(_N, _T, D, bk, bq, 1.0, q, i0 * D, D, Bt, 0, bk, 0.0, tk, 0, D)
            else:
                _finite_copy(q[i0:i1], qflag, qfin)
                gemm(_N, _T, D, bk, bq, 1.0, qfin, 0, D, Bt, 0, bk, 0.0, tk, 0, D)
                _add_nonfinite(Bt, bq, bk, part, q[i0:i1], qflag, tk, True, False)
            for j in range(bk):
                for c in range(D):
                    acc_k[j, c] += np.float64(tk[j, c])
        if energy == 1:
            for r in range(bq):
                for j in range(bk):
                    colsum[j] += np.float64(Bt[r, j])
    sc = np.float64(scale)
    for j in range(bk):
        for c in range(Dv):
            dv[j0 + j, c] = acc_v[j, c]
        for c in range(D):
            g = sc * acc_k[j, c]
            if energy == 1:
                kj = np.float64(k[j0 + j, c])
                g -= sc * (kj if np.isfinite(kj) else 0.0) * colsum[j]
            dk[j0 + j, c] = g


@njit(cache=True, fastmath=_FM)
def _backward_queries(q, k, v, u, dd, mask, has_mask, causal, off, energy, scale, i0, i1, bk_max, lse, cnt, delta, dq):
    """G4, queries ``[i0, i1)``: ``dq_i = scale sum_j dS_ij k_j`` over all keys (for K2 too: ``sum_j dS_ij = 0``)."""
    bq = i1 - i0
    M = k.shape[0]
    D = q.shape[1]
    Dv = v.shape[1]
    S = np.empty((bq, bk_max), dtype=q.dtype)
    Bt = np.empty((bq, bk_max), dtype=q.dtype)
    part = np.empty((bq, bk_max), dtype=np.bool_)
    tq = np.empty((bq, D), dtype=q.dtype)
    kfin = np.empty((bk_max, D), dtype=q.dtype)
    kflag = np.empty(bk_max, dtype=np.bool_)
    hq = np.empty(bq, dtype=q.dtype)
    qbad = np.empty(bq, dtype=np.bool_)
    hk = np.empty(bk_max, dtype=q.dtype)
    kbad = np.empty(bk_max, dtype=np.bool_)
    acc = np.zeros((bq, D), dtype=np.float64)
    if energy == 1:
        _half_sqnorms(q[i0:i1], hq, qbad)
    for jb in range(0, M, bk_max):
        if causal and jb > i1 - 1 + off:
            break
        bk = min(bk_max, M - jb)
        _scores(S, bq, bk, q, k, dd, i0, jb, energy, scale, hq, qbad, hk, kbad, causal, off, has_mask, mask)
        if Dv > 0:
            gemm(_T, _N, bk, bq, Dv, 1.0, v, jb * Dv, Dv, u, i0 * Dv, Dv, 0.0, Bt, 0, bk_max)
        else:
            Bt[:, :] = 0.0
        nk = _rows_flags(k, jb, bk, kflag) if energy != 2 else 0
        _p_ds_tile(S, Bt, bq, bk, lse, cnt, delta, i0, part, nk > 0)
        if D > 0 and energy != 2:
            if nk == 0:
                gemm(_N, _N, D, bq, bk, 1.0, k, jb * D, D, Bt, 0, bk_max, 0.0, tq, 0, D)
            else:
                _finite_copy(k[jb : jb + bk], kflag, kfin)
                gemm(_N, _N, D, bq, bk, 1.0, kfin, 0, D, Bt, 0, bk_max, 0.0, tq, 0, D)
                _add_nonfinite(Bt, bq, bk, part, k[jb : jb + bk], kflag, tq, False, False)
            for r in range(bq):
                for c in range(D):
                    acc[r, c] += np.float64(tq[r, c])
    sc = np.float64(scale)
    for r in range(bq):
        for c in range(D):
            dq[i0 + r, c] = sc * acc[r, c]


def backward(stage, t, T, q3, k3, v3, u3, qmap, kmap, vmap, umap, d3, dmap, mask3, mmap, has_mask, causal, off, energy, scale,
             bq, bk, lse, delta, cnt, dq, dk, dv):
    """G4 over the flattened batch: ``dq (B, N, D)``, ``dk (B, M, D)``, ``dv (B, M, Dv)`` from the saved ``lse`` and ``delta = <u_i, a_i>`` (float64).

    This thread's share (items ``t, t + T, ...``) of one stage, as
    :func:`forward`.  Stage 0: per query block, ``cnt``, the number of keys
    with score ``+inf`` of each certain row.  Then two stages free of races:
    stage 1 over key blocks (``dk``, ``dv``: sums over queries), stage 2 over
    query blocks (``dq``: sums over keys).  Each recomputes the score tile and
    ``b = U V^T``: 7 GEMMs per tile pair instead of 5, in exchange for
    ``O((N + M) D)`` memory, no atomics and a fixed summation order.  Plain
    Python: compiled by :mod:`iem_ref.accel.cpu`.
    """
    B = dq.shape[0]
    N = dq.shape[1]
    M = dk.shape[1]
    nqb = (N + bq - 1) // bq
    nkb = (M + bk - 1) // bk
    if stage == 0:
        for w in range(t, B * nqb, T):
            b = w // nqb
            i0 = (w % nqb) * bq
            _count_certain(q3[qmap[b]], k3[kmap[b]], d3[dmap[b]], mask3[mmap[b]], has_mask, causal, off, energy, scale,
                           i0, min(N, i0 + bq), bk, lse[b], cnt[b])
    elif stage == 1:
        for w in range(t, B * nkb, T):
            b = w // nkb
            j0 = (w % nkb) * bk
            _backward_keys(q3[qmap[b]], k3[kmap[b]], v3[vmap[b]], u3[umap[b]], d3[dmap[b]], mask3[mmap[b]], has_mask, causal, off,
                           energy, scale, j0, min(M, j0 + bk), bq, lse[b], cnt[b], delta[b], dk[b], dv[b])
    else:
        for w in range(t, B * nqb, T):
            b = w // nqb
            i0 = (w % nqb) * bq
            _backward_queries(q3[qmap[b]], k3[kmap[b]], v3[vmap[b]], u3[umap[b]], d3[dmap[b]], mask3[mmap[b]], has_mask, causal, off,
                              energy, scale, i0, min(N, i0 + bq), bk, lse[b], cnt[b], delta[b], dq[b])


@njit(cache=True, parallel=True, fastmath=_FM)
def exp_roof(total, sample):
    """The kernels' polynomial ``exp`` applied ``total`` times, on cache-resident 4096-element buffers (as in the tiles).

    Each pass maps ``x -> exp(x) - 1``, which keeps ``x`` in ``(-1, 0]``; ``sample``
    (a 1-element array) fixes the dtype.  Returns a checksum.
    """
    chunk = 4096
    passes = 64
    nitems = (total + chunk * passes - 1) // (chunk * passes)
    one = like(1.0, sample[0])
    acc = 0.0
    for c in prange(nitems):
        buf = np.empty(chunk, dtype=sample.dtype)
        for j in range(chunk):
            buf[j] = -(j % 97) * like(0.01, sample[0])
        for _ in range(passes):
            for j in range(chunk):
                buf[j] = fexp_shifted(buf[j]) - one
        acc += buf[c % chunk]
    return acc


@njit(cache=True, parallel=True, fastmath=True)
def stream_roof(k, v):
    """Read ``k`` and ``v`` once, in parallel (a sum): the memory-bandwidth floor of decoding. Returns the checksum.

    ``fastmath=True`` lets the sum vectorise; this is a timing floor, not a result (no inf/NaN semantics needed).
    """
    M = k.shape[0]
    chunk = 4096
    n = (M + chunk - 1) // chunk
    acc = 0.0
    for c in prange(n):
        s = 0.0
        for j in range(c * chunk, min(M, (c + 1) * chunk)):
            for d in range(k.shape[1]):
                s += k[j, d]
            for d in range(v.shape[1]):
                s += v[j, d]
        acc += s
    return acc
