"""Numba kernels behind :mod:`iem_ref.accel.cpu`: the fused one-pass softmin summary (M1-M2) and its backward (G4).

The kernels read the problem from one record built by the host wrapper
(:class:`~iem_ref.accel._problem.Problem`: operands, batch maps, energy,
scale, the band, mask flag, empty-row policy), one batch element of it at a
time as a :class:`~iem_ref.accel._problem.Head`.  Shape legend (one batch
element): ``q (N, D)``, ``k (M, D)``, ``v (M, Dv)``, ``u (N, Dv)`` (upstream
gradient), mask ``(N, M)`` (any strides, 0 for broadcast axes); tiles:
``bq`` queries x ``bk`` keys.

Participation: the key range of the row's position (causality, the sliding
window V4 and packed segments V7 as one interval per position, key ``j``
for query row ``i`` when ``keys[i // group, 0] <= j < keys[i // group, 1]``)
and the mask (row ``i // mask_group``).  Grouped-query heads (V6)
come as ``group`` query heads stacked row by row over one key/value head
(row ``i`` is position ``i // group`` of head ``i % group``), so each K/V
tile is read once per group and ``dk, dv`` sum over the group as they sum
over queries.  Key tiles wholly outside a block's key ranges are never
computed; the kept ones start at the first key the block sees.

Scores, not energies: inside the kernels ``s_ij = -d_ij * scale`` (for the dot
energy ``s = scale <q_i, k_j>``; for the squared-Euclidean one
``s = -scale ||q_i - k_j||^2 / 2 = scale (<q_i, k_j> - |q_i|^2/2 - |k_j|^2/2)``),
so the online softmin keeps a running **maximum** score ``m`` (``= -min d *
scale``), ``l = sum_j exp(s_ij - m)`` and ``o = sum_j exp(s_ij - m) v_j``:
the partial posterior M1, merged across key tiles and key splits by M2.

Arithmetic per dtype ``T`` (float32 or float64):
- score tile ``S = Q_b K_b^T`` and value tile ``P V_b``: one BLAS GEMM each, in
  ``T`` (so float32 inputs give float32 dot products of length ``D`` and
  float32 sums over the ``bk`` keys of a tile); one query row uses GEMV, and
  blocks of a few (decoding, a group of query heads; ``_FEW_ROW_BYTES``) two
  loops that read each key and value row once for the whole block, with the
  same roundings (dot products of ``D`` terms, sums over the tile's keys in
  order);
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

A kernel per feature set: the functions marked ``@template`` read the
compile-time constants ``ENERGY`` and ``VARIANTS``; :func:`kernels` returns
their instance for one :class:`Features` (dtype, energy, whether the
variants' steps are compiled in), built by
:func:`~iem_ref.accel._compile.instantiate`.  Inside an instance Numba
prunes every branch those constants decide before it types the code: the
plain kernels hold no logit, sink or dropout step, and each energy's kernel
only its own scores.  The other helpers (``**INNER``) are shared by every
instance and linked into it (:class:`~iem_ref.accel._compile.LinkedCompiler`).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed, impl_ret_new_ref
from numba.extending import intrinsic, overload
from numba.np.linalg import ensure_blas

from ._compile import INNER, instantiate, template
from ._fastexp import f32_bits, f64_bits, fexp, fexp_shifted, like
from . import _problem
from ._problem import DOT, PRECOMPUTED, SQEUCLIDEAN, _head_of

ensure_blas()  # SciPy's BLAS (scipy.linalg.cython_blas), the one Numba's np.dot uses

# The scalar steps every path shares (:mod:`._problem`), linked into the kernels like their other helpers
# (there they are Python-callable dispatchers, for their examples and the CUDA kernels' source).
_first_position_above = njit(**INNER)(_problem.first_position_above.py_func)
_log_partition_of_row = njit(**INNER)(_problem.log_partition_of_row.py_func)
_summary_of_row = njit(**INNER)(_problem.summary_of_row.py_func)
_merge_sink = njit(**INNER)(_problem.merge_sink.py_func)
_logit = njit(**INNER)(_problem.logit.py_func)


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


# A constant argument of a helper is written np.int64(0), not 0: Numba gives a literal a type of its own
# (Literal[int](0)) and would compile the helper once more for it.
_NOTRANS = ord("n")  # BLAS operand codes
_TRANS = ord("t")
# How a tile's two products run, by the query block's rows (measured at M = 2^20, D = 64 on Zen 5, AVX-512;
# bench/results/cpu_decode.md): one row, a BLAS GEMV (it streams the tile at memory speed); up to 32 bytes of
# query per key (8 float32 rows, 4 float64), the loops of _few_rows_*, which read each key and value row once
# for the block (a GEMM packs the tile first: 2x slower at 4 rows); more rows, a GEMM, whose cost per row falls
# as the loops' does not (the loops were 1.2-1.4x slower than it at 8 float64 and 16 rows).
_GEMV_ROWS = 1
_FEW_ROW_BYTES = 32
#: how many key rows ahead of their use the few-rows loops prefetch K and V
PREFETCH_ROWS = 32

_FM = {"contract"}  # FMA contraction only: fastmath=True would assume no inf/NaN, and the edge-case policy needs them
# A dot product's D-term sum in any order: its bound (gamma_D, bounds section 5) holds for every order, and
# reassociation lets LLVM vectorise the sum; still no finite-math flags, so inf and NaN keep their meaning.
_DOT_FM = {"contract", "reassoc"}


# --- compile-time features ------------------------------------------------------
class Features(NamedTuple):
    """What one kernel instance is compiled for: each field is a constant of its code (:func:`kernels`).

    ``variants``: the steps that only the variants add, compiled only into
    the kernels of the calls that use one of them: the logits of a bias,
    ALiBi or a soft-cap (V1-V3, which of them is data), a sink's merge (V5)
    and dropout (V8).  A plain call's kernel holds none of their code.
    Causality, the mask, windows (V4), packed segments (V7) and grouped-query
    heads (V6) need no field: every kernel reads them as data (each query's
    key range, the mask's rows, the query blocks' boundaries, the row group),
    a few integer operations per row.  One field rather than one per variant:
    the variants' steps are a small part of a kernel's compilation (float64
    forward, 2-core AMD EPYC family 25 model 17: 6.7 s plain, 8.3 s with
    every variant), so a kernel per combination would multiply the compile
    time of callers that use several, for little gain to the others.
    """

    dtype: str  # "float64" or "float32"
    energy: int  # DOT, SQEUCLIDEAN or PRECOMPUTED (:mod:`._problem`)
    variants: bool  # V1-V3, V5, V8: logits, sinks, dropout
    score_mod: object = None  # F1, F3: a :class:`KernelMod` (the user's score_mod and its slope, compiled), or None

    @property
    def tag(self):
        """A short name of the instance (its functions' names end with it, and so do their cache files)."""
        return "_".join(["f64" if self.dtype == "float64" else "f32", ("dot", "sqeuclidean", "precomputed")[self.energy]]
                        + (["variants"] if self.variants else []) + ([f"mod{self.score_mod.serial}"] if self.score_mod else []))

    @property
    def cached(self):
        """Whether the instance may live in Numba's on-disk cache: not with a user's score_mod, whose code the cache cannot see change."""
        return self.score_mod is None

    def constants(self):
        """The names the templates read, bound to this feature set."""
        mod = self.score_mod
        return {"ENERGY": self.energy, "VARIANTS": self.variants, "FLEX": mod is not None,
                "SCORE_MOD": _no_mod if mod is None else mod.fn, "SCORE_SLOPE": _no_mod if mod is None else mod.slope,
                "SCORE_ULPS": 0.0 if mod is None else mod.ulps}


class KernelMod(NamedTuple):
    """A score_mod as the kernels call it (F1, F3): ``fn`` and ``slope``, Numba dispatchers of ``(x, b, h, q_idx, kv_idx)``
    (float64, four int64), the serial number that names the instance (:mod:`iem_ref.accel.cpu` makes them) and its
    evaluation's roundings for the tiled oracle's bound (``ScoreMod.ulps``, section 11)."""

    fn: object
    slope: object
    serial: int
    ulps: float


@njit
def _no_mod(x, b, h, q_idx, kv_idx):
    """The score_mod of an instance without one (never called: ``FLEX`` prunes its branch)."""
    return x


# The templates below (@template) read these names as compile-time constants; each instance binds them
# (Features.constants).  The values here only give the names a definition: a template never runs with them.
ENERGY = DOT
VARIANTS = False
FLEX = False
SCORE_MOD = SCORE_SLOPE = _no_mod
SCORE_ULPS = 0.0

_INSTANCES = {}
_INSTANCES_LOCK = threading.Lock()


def kernels(features):
    """The instance of this module's templates for ``features``: a namespace whose ``forward`` and ``backward`` are Numba dispatchers.

    Built once per process and feature set; nothing compiles until a
    dispatcher is called or compiled for a signature.
    """
    with _INSTANCES_LOCK:
        scope = _INSTANCES.get(features)
        if scope is None:
            scope = _INSTANCES[features] = instantiate(globals(), features.constants(), features.tag, cache=features.cached)
        return scope


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


@intrinsic
def prefetch(typingctx, x, i, j):
    """A hint to fetch the cache line of ``x[i, j]`` (a 2-D array) now, for a later read; nothing when row ``i`` is past the last.

    Why: the few-rows loops below spend about as long on each key row as it
    takes to come from memory, and with the hardware prefetchers alone the
    core waited for each row (grouped-query decoding, ``bench/results/gqa_decode.md``:
    one core 152.9 ms without, 105.7 ms with rows fetched 32 ahead, M = 2^18).
    ``llvm.prefetch`` (read, high locality, data cache): no fault, no result.
    """
    if not (isinstance(x, types.Array) and x.ndim == 2 and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        i_, j_ = (context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:]))
        shape = cgutils.unpack_tuple(builder, ary.shape)
        with builder.if_then(builder.icmp_signed("<", i_, shape[0]), likely=True):
            ptr = cgutils.get_item_pointer2(context, builder, data=ary.data, shape=shape,
                                            strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
                                            inds=[i_, j_], wraparound=False)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(x, i, j), codegen


@intrinsic
def readonly(typingctx, x):
    """The array ``x`` typed read-only (the same data, no copy).

    Why: Numba compiles a helper once per argument type, and a scratch
    buffer is a writable array where the operands are read-only ones; a
    helper given both (the value product of a tile, and of the tile with its
    non-finite values replaced) was compiled twice.
    """
    if not isinstance(x, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return x.copy(readonly=True)(x), codegen


def _element_type(dtype):
    """The element type a ``dtype`` argument names in ``@njit`` code: ``x.dtype``, ``np.float64``, ``np.bool_``."""
    if isinstance(dtype, types.DType):
        return dtype.dtype
    if isinstance(dtype, types.NumberClass):
        return dtype.instance_type
    return None


def _allocate(zeroed):
    """An ``@intrinsic`` ``(shape, dtype) -> C-contiguous array`` (``zeroed``: filled with 0), as ``np.empty``/``np.zeros``.

    Why: ``np.empty`` and ``np.zeros`` are overloads, and Numba compiles each
    overload's implementation through its whole pipeline once per shape and
    dtype: six to eight small functions per kernel, about 0.5 s of a first
    call.  An intrinsic emits the allocation directly (Numba's own
    ``_empty_nd_impl``, a fourth internal the kernels lean on).
    """

    def allocate(typingctx, shape, dtype):
        element = _element_type(dtype)
        tuple_shape = isinstance(shape, types.BaseTuple)
        if element is None or not (tuple_shape or isinstance(shape, types.Integer)):
            return None
        ndim = len(shape) if tuple_shape else 1
        arrtype = types.Array(element, ndim, "C")

        def codegen(context, builder, signature, args):
            from numba.np.arrayobj import _empty_nd_impl

            dims = cgutils.unpack_tuple(builder, args[0]) if tuple_shape else [args[0]]
            dim_types = list(shape) if tuple_shape else [shape]
            dims = [context.cast(builder, d, t, types.intp) for d, t in zip(dims, dim_types)]
            ary = _empty_nd_impl(context, builder, arrtype, dims)
            if zeroed:
                cgutils.memset(builder, ary.data, builder.mul(ary.itemsize, ary.nitems), 0)
            return impl_ret_new_ref(context, builder, arrtype, ary._getvalue())

        return arrtype(shape, dtype), codegen

    return intrinsic(allocate)


#: ``np.empty`` and ``np.zeros`` for the kernels' scratch buffers, without an overload's compile each
scratch = _allocate(False)
zeros = _allocate(True)


@njit(**INNER)
def _prefetch_row(x, i):
    """:func:`prefetch` every cache line of row ``i`` of ``x`` (64-byte lines)."""
    for c in range(0, x.shape[1], max(1, 64 // x.itemsize)):
        prefetch(x, i, c)


@njit(cache=True, fastmath=_FM)  # not INNER: the tests call it from Python
def _row_max(row, n):
    """Maximum of ``row[:n]`` ignoring NaN (``-inf`` if there is none), exact whatever the order."""
    m = like(-np.inf, row[0])
    for j in range(n):
        m = maxnum(m, row[j])
    return m


@njit(fastmath=_FM, **INNER)
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


@njit(**INNER)
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


@njit(**INNER)
def _all_finite(x, rows):
    """True when the first ``rows`` rows of ``x`` hold no inf or NaN (by the exponent bits, as :func:`_bad_rows`)."""
    bad = 0
    for j in range(rows):
        for c in range(x.shape[1]):
            bad |= _nonfinite_bits(x[j, c])
    return bad == 0


@njit(**INNER)
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


@njit(**INNER)
def _add_nonfinite(w, R, C, part, x, flags, out, limit):
    """The non-finite part of ``W @ X``, only over the pairs that take part: ``out (R, F) += w (R, C) @ x (C, F)``.

    ``w[:R, :C]`` weights, ``part[:R, :C]`` True where the pair takes part,
    ``x`` the operand whose rows ``flags`` marks as holding non-finite
    entries; the GEMM saw those entries as 0.  ``limit`` (the forward's
    values, the backward's ``dv``): a weight that is 0 in floating point
    (underflow, or a finite key beside certain ones) stands for a positive
    one, so an infinite value reaches the output as itself, never as ``0 *
    inf``.  Otherwise (the routing gradients ``dX`` times ``k`` or ``q``) a
    zero weight reads nothing: the backward's edge-case policy.
    """
    F = x.shape[1]
    for j in range(C):
        if flags[j]:
            for i in range(R):
                if part[i, j]:
                    wij = w[i, j]
                    if wij == 0.0 and not limit:
                        continue  # dX_ij = 0 reads no operand: 0 * inf is 0 (certain or soft-capped infinite scores)
                    for c in range(F):
                        if not np.isfinite(x[j, c]):
                            out[i, c] += x[j, c] if wij == 0.0 else wij * x[j, c]


@njit(**INNER)
def _add_nonfinite_transposed(w, R, C, part, x, flags, out, limit):
    """:func:`_add_nonfinite` for ``W^T @ X``: ``out (C, F) += w^T (C, R) @ x (R, F)``, ``flags`` marking the rows of ``x`` (indexed by ``R``)."""
    F = x.shape[1]
    for i in range(R):
        if flags[i]:
            for j in range(C):
                if part[i, j]:
                    wij = w[i, j]
                    if wij == 0.0 and not limit:
                        continue
                    for c in range(F):
                        if not np.isfinite(x[i, c]):
                            out[j, c] += x[i, c] if wij == 0.0 else wij * x[i, c]


@njit(**INNER)
def _half_sqnorms(x, out, bad):
    """``out[j] = |x_j|^2 / 2`` (accumulated in float64, rounded to ``out``'s dtype); ``bad[j]`` if it is not finite."""
    for j in range(x.shape[0]):
        acc = 0.0
        for c in range(x.shape[1]):
            acc += np.float64(x[j, c]) * np.float64(x[j, c])
        out[j] = 0.5 * acc
        bad[j] = not np.isfinite(out[j])


@njit(**INNER)
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


class Norms(NamedTuple):
    """Scratch of the squared-Euclidean energy (K2): half squared norms of a query block and a key tile, and their non-finite flags."""

    q: np.ndarray  # (bq,) |q_i|^2 / 2
    qbad: np.ndarray  # (bq,) bool
    k: np.ndarray  # (bk,) |k_j|^2 / 2
    kbad: np.ndarray  # (bk,) bool


# The small helpers take the fields they read, not the whole Head: a Head argument is some hundred scalars
# that Numba unpacks and packs again at every function boundary, about 0.2 s of a kernel's compilation per
# helper that takes one (measured on _key_tiles: 0.27 s of compiler time, 0.07 s of it LLVM).
@njit(**INNER)
def _norms(q, bq, bk):
    """:class:`Norms` scratch for query blocks of up to ``bq`` queries (of ``q``'s dtype) and key tiles of up to ``bk`` keys."""
    return Norms(scratch(bq, q.dtype), scratch(bq, np.bool_), scratch(bk, q.dtype), scratch(bk, np.bool_))


@template(**INNER)
def _set_query_norms(q, norms, i0, i1):
    """The half squared norms of queries ``[i0, i1)`` into ``norms`` (K2 only; the key tile's are set by :func:`_scores`)."""
    if ENERGY == SQEUCLIDEAN:
        _half_sqnorms(q[i0:i1], norms.q, norms.qbad)


@njit(**INNER)
def _band_in_tile(keys, group, i, jb, bk):
    """``(lo, hi)``: query row ``i`` sees the keys ``jb + j`` of a tile for ``lo <= j < hi`` (causality, window V4, segments V7)."""
    at = i // group  # the row's position (a group's heads share it, V6)
    lo = min(max(keys[at, 0] - jb, 0), bk)
    hi = min(max(keys[at, 1] - jb, lo), bk)
    return lo, hi


@njit(**INNER)
def _key_tiles(keys, group, i0, i1, j0, j1, bk):
    """The key tiles ``jb = j0, j0 + bk, ...`` below ``j1`` that a query of ``[i0, i1)`` may see: ``(first jb, end)``.

    Tiles wholly outside the rows' key ranges are never computed (a window
    makes the work linear in the sequence length, segments skip every
    cross-segment tile).  The tiles start at the first key the block sees,
    as a call on that segment alone would (a diagonal block of a causal
    segment then meets as many tiles as in its own call); a row still meets
    at most ``ceil(M / bk)`` tiles of at most ``bk`` keys, the counts of the
    error bounds.  The ranges' ends never decrease with the row, so the
    block's first and last rows bound it.
    """
    first = keys[i0 // group, 0]  # the lowest key the block's first query sees
    start = j0
    if first > j0:
        start = min(j1, first)
    end = min(j1, max(start, keys[(i1 - 1) // group, 1]))  # past the highest key its last query sees
    return start, end


@njit(**INNER)
def _own_at(x, group, i, j):
    """Entry ``(i, j)`` of a per-pair array kept as its own data (bias, dropout mask): an axis of length 1 is broadcast; rows read ``i // group``."""
    return x[i // group if x.shape[0] > 1 else 0, j if x.shape[1] > 1 else 0]


@njit(**INNER)
def _row_logits(h, row, i, jb, lo, hi):
    """V1-V3 on the keys ``jb + lo .. jb + hi - 1`` of query row ``i``: ``row[j] <- logit(row[j], softcap, bias, alibi)`` in place.

    One call per row, the loop inside: the head record crosses a call once
    per row, not once per pair (a call that takes it copies its arrays'
    references; per pair that cost 16x the logits themselves).
    """
    softcap = h.softcap
    has_bias, has_alibi = h.has_bias, h.has_alibi
    bias_rows, bias_group = h.bias, h.bias_group
    slope = -h.slopes[i] if has_alibi else 0.0
    pos = h.keys[i // h.group, 2]
    for j in range(lo, hi):
        bias = _own_at(bias_rows, bias_group, i, jb + j) if has_bias else 0.0
        alibi = slope * abs(pos - (jb + j)) if has_alibi else 0.0  # -slope |i' - j|
        row[j] = _logit(np.float64(row[j]), softcap, bias, alibi)


@njit(**INNER)
def _dropout_factors(keep, keep_group, dropout_keep, W, bq, bk, i0, jb, part):
    """V8 on a tile of the backward: ``W[r, j] *= c_ij`` (``1 / (1 - p)`` where kept, else 0, as the reference's ``c``).

    Given rows, ``part`` marks the weights' tile (``r_ij``): a dropped pair's
    weight becomes ``r_ij * 0`` and its ``part`` is cleared.  Without, ``W``
    is ``b = U V^T``: a dropped pair's ``b_ij`` is set to 0 (selection).

    ``keep``: the dropout mask's own data, row ``i`` read as ``i // keep_group`` (:func:`_own_at`); ``dropout_keep``: ``1 - p``.
    """
    c = like(1.0 / dropout_keep, W[0, 0])
    zero = like(0.0, c)
    weights = part.shape[0] > 0
    for r in range(bq):
        for j in range(bk):
            if _own_at(keep, keep_group, i0 + r, jb + j):
                W[r, j] = W[r, j] * c
            elif weights:  # r_ij c_ij: a NaN row's weight stays NaN on every key it sees
                W[r, j] = W[r, j] * zero
                part[r, j] = False
            else:  # b_ij: a dropped pair reads neither v_j nor u_i, so a NaN or inf there cannot reach it
                W[r, j] = zero


@template(fastmath=_FM, **INNER)
def _scores(S, bq, bk, h, i0, jb, norms, F):
    """Fill the score tile ``S[:bq, :bk]`` with the logits ``z_ij``, ``-inf`` where key ``jb + j`` does not take part.

    The scaled scores ``x`` (:func:`_scaled_scores`), then a score_mod
    (F1: ``SCORE_MOD`` in float64, an instance's constant) and the variants'
    logits (V1-V3), row by row.  ``h``: the batch element's
    :class:`~iem_ref.accel._problem.Head`; ``F``: with a soft-cap or a
    score_mod and rows to hold it (the backward), the slope ``dz/dx`` of each
    pair: ``1 - tanh(y / c)^2`` times the score_mod's ``SCORE_SLOPE`` (F3).
    """
    _scaled_scores(S, bq, bk, h, i0, jb, norms)
    if VARIANTS and (h.logits or FLEX):  # F1, then V1-V3, pair by pair (an excluded pair's -inf stays -inf)
        slopes = F.shape[0] > 0
        for r in range(bq):
            i = i0 + r
            row = S[r]
            lo, hi = _band_in_tile(h.keys, h.group, i, jb, bk)
            if slopes:
                for j in range(bk):
                    F[r, j] = 1.0  # pairs that do not take part have dZ = 0: a finite factor keeps them 0
            if FLEX:  # F1 on the scaled score in float64, and its slope (F3; 0 at a non-finite score, as the reference)
                pos, head = i // h.group, h.flex_h + i % h.group
                for j in range(lo, hi):
                    x = np.float64(row[j])
                    if x != -np.inf:
                        if slopes:
                            F[r, j] = SCORE_SLOPE(x, h.flex_b, head, pos, jb + j) if math.isfinite(x) else 0.0
                        row[j] = SCORE_MOD(x, h.flex_b, head, pos, jb + j)
            if h.softcap > 0.0 and slopes:
                for j in range(lo, hi):
                    t = math.tanh(np.float64(row[j]) / h.softcap)
                    F[r, j] = F[r, j] * (1.0 - t * t) if FLEX else 1.0 - t * t
            if h.logits:
                _row_logits(h, row, i, jb, lo, hi)


@template(fastmath=_FM, **INNER)
def _scaled_scores(S, bq, bk, h, i0, jb, norms):
    """Fill the score tile ``S[:bq, :bk]`` with the scaled scores ``x_ij`` (T1), ``-inf`` where key ``jb + j`` does not take part.

    One GEMM ``S = Q_b K_b^T`` (row stride of ``S``: its buffer width), then
    the scale, the squared-Euclidean correction (A1 / K2 times ``scale``)
    and the selection, row by row.
    """
    ld = S.shape[1]
    q, k, scale = h.q, h.k, h.scale
    D = q.shape[1]
    ninf = like(-np.inf, scale)  # scale has the tile's dtype: no promotion below
    zero = like(0.0, scale)
    if ENERGY == PRECOMPUTED:  # the raw score is -d
        for r in range(bq):
            for j in range(bk):
                S[r, j] = -h.d[i0 + r, jb + j]
    elif D > 0:
        # the dot energy's scale rides on the GEMM's factor: one rounding, as a separate product would make;
        # scale = 0 needs the raw products (their inf/NaN), and K2 subtracts the norms first
        factor = scale if (ENERGY == DOT and scale > 0.0) else like(1.0, scale)
        if bq <= _GEMV_ROWS:
            for r in range(bq):
                gemv(_TRANS, D, bk, factor, k, jb * D, D, q, (i0 + r) * D, 0.0, S, r * ld)
        elif _few_rows(bq, q):
            _few_rows_scores(S, bq, bk, q, i0, k, jb, factor)
        else:
            gemm(_TRANS, _NOTRANS, bk, bq, D, factor, k, jb * D, D, q, i0 * D, D, 0.0, S, 0, ld)
    else:  # D = 0: every dot product is 0
        for r in range(bq):
            for j in range(bk):
                S[r, j] = zero
    if ENERGY == SQEUCLIDEAN:
        _half_sqnorms(k[jb : jb + bk], norms.k, norms.kbad)
    for r in range(bq):
        i = i0 + r
        row = S[r]
        lo, hi = _band_in_tile(h.keys, h.group, i, jb, bk)  # keys jb + j take part for lo <= j < hi (causality, window)
        if ENERGY != SQEUCLIDEAN:
            if scale > 0.0:
                if ENERGY == PRECOMPUTED:
                    for j in range(lo, hi):
                        row[j] = row[j] * scale
            else:  # scale = 0: finite scores tie at 0, +-inf and NaN keep their meaning
                for j in range(lo, hi):
                    x = row[j]
                    row[j] = zero if np.isfinite(x) else x
        else:
            hq = norms.q[r]
            if scale > 0.0:
                for j in range(lo, hi):
                    row[j] = (row[j] - (hq + norms.k[j])) * scale
            else:
                for j in range(lo, hi):
                    row[j] = zero
            if norms.qbad[r]:
                for j in range(lo, hi):
                    row[j] = _direct_sqeuclid_score(q, i, k, jb + j, scale)
            else:
                for j in range(lo, hi):
                    if norms.kbad[j]:
                        row[j] = _direct_sqeuclid_score(q, i, k, jb + j, scale)
        for j in range(lo):
            row[j] = ninf
        for j in range(hi, bk):
            row[j] = ninf
        if h.has_mask:
            for j in range(lo, hi):
                if not h.mask[i // h.mask_group, jb + j]:
                    row[j] = ninf


@njit(**INNER)
def _few_rows(bq, x):
    """True when a block of ``bq`` query rows of ``x``'s dtype takes the loops of ``_few_rows_*`` (see ``_FEW_ROW_BYTES``)."""
    return bq > _GEMV_ROWS and bq * x.itemsize <= _FEW_ROW_BYTES


@njit(fastmath=_DOT_FM, **INNER)
def _few_rows_scores(S, bq, bk, q, i0, k, jb, factor):
    """``S[r, j] = factor <q_{i0 + r}, k_{jb + j}>`` for a block of few queries (decoding, a group of query heads).

    Each key row is read once for all the block's queries, while it is in
    L1; BLAS would pack (copy) the whole key tile for a few columns of work.
    Two keys per step: two independent sums per query row keep the vector
    units busy while the other's horizontal reduction runs.  The rows
    :data:`PREFETCH_ROWS` ahead are fetched meanwhile (:func:`prefetch`).
    """
    D = q.shape[1]
    zero = factor - factor  # 0 in the tile's dtype
    j = 0
    while j + 2 <= bk:
        _prefetch_row(k, jb + j + PREFETCH_ROWS)
        _prefetch_row(k, jb + j + 1 + PREFETCH_ROWS)
        ka = k[jb + j]
        kb = k[jb + j + 1]
        for r in range(bq):
            qr = q[i0 + r]
            sa = zero
            sb = zero
            for c in range(D):
                sa += qr[c] * ka[c]
                sb += qr[c] * kb[c]
            S[r, j] = factor * sa
            S[r, j + 1] = factor * sb
        j += 2
    if j < bk:
        kj = k[jb + j]
        for r in range(bq):
            qr = q[i0 + r]
            s = zero
            for c in range(D):
                s += qr[c] * kj[c]
            S[r, j] = factor * s


@njit(fastmath=_FM, **INNER)
def _few_rows_values(v, jv, S, bq, bk, pv):
    """``pv (bq, Dv) = P (bq, bk) @ v[jv : jv + bk]`` for few rows: each value row read once, the keys summed in order.

    Four keys per step: ``pv`` is loaded and stored once per four fused
    multiply-adds, which still run key after key (the order of a sequential sum).
    The rows :data:`PREFETCH_ROWS` ahead are fetched meanwhile (:func:`prefetch`).
    """
    Dv = v.shape[1]
    for r in range(bq):
        for c in range(Dv):
            pv[r, c] = 0.0
    j = 0
    while j + 4 <= bk:
        for t in range(4):
            _prefetch_row(v, jv + j + t + PREFETCH_ROWS)
        va = v[jv + j]
        vb = v[jv + j + 1]
        vc = v[jv + j + 2]
        vd = v[jv + j + 3]
        for r in range(bq):
            pa = S[r, j]
            pb = S[r, j + 1]
            pc = S[r, j + 2]
            pd = S[r, j + 3]
            for c in range(Dv):
                pv[r, c] = pv[r, c] + pa * va[c] + pb * vb[c] + pc * vc[c] + pd * vd[c]
        j += 4
    while j < bk:
        vj = v[jv + j]
        for r in range(bq):
            p = S[r, j]
            for c in range(Dv):
                pv[r, c] += p * vj[c]
        j += 1


@njit(**INNER)
def _value_product(v, jv, S, bq, bk, ld, pv):
    """``pv (bq, Dv) = P (bq, bk) @ v[jv : jv + bk]`` with ``P`` in ``S`` (row stride ``ld``)."""
    Dv = v.shape[1]
    if bq <= _GEMV_ROWS:
        for r in range(bq):
            gemv(_NOTRANS, Dv, bk, 1.0, v, jv * Dv, Dv, S, r * ld, 0.0, pv, r * Dv)
    elif _few_rows(bq, v):
        _few_rows_values(v, jv, S, bq, bk, pv)
    else:
        gemm(_NOTRANS, _NOTRANS, Dv, bq, bk, 1.0, v, jv * Dv, Dv, S, 0, ld, 0.0, pv, 0, Dv)


# --- forward: one query block over one key range --------------------------------
class Partials(NamedTuple):
    """M1's running state of some rows, in float64: merged tile after tile (and split after split) by M2."""

    m: np.ndarray  # (rows,) running maximum score (-inf while nothing takes part)
    l: np.ndarray  # (rows,) sum exp(s - m)
    o: np.ndarray  # (rows, Dv) sum exp(s - m) v_j
    nan: np.ndarray  # (rows,) bool: a NaN score spoiled the row


@njit(**INNER)
def _partials_at(parts, b, split, i0, i1):
    """The rows ``[i0, i1)`` of batch element ``b``, key split ``split`` of the ``(B, nsplit, N[, Dv])`` partials."""
    return Partials(parts.m[b, split, i0:i1], parts.l[b, split, i0:i1], parts.o[b, split, i0:i1], parts.nan[b, split, i0:i1])


@template(fastmath=_FM, **INNER)
def _forward_block(h, i0, i1, j0, j1, bk_max, acc):
    """M1 over keys ``[j0, j1)`` for queries ``[i0, i1)`` of one batch element ``h``, into the :class:`Partials` ``acc``."""
    q, v = h.q, h.v
    bq = i1 - i0
    Dv = v.shape[1]
    S = scratch((bq, bk_max), q.dtype)
    pv = scratch((bq, Dv), q.dtype)
    vt = scratch((bk_max, Dv), q.dtype)
    part = scratch((bq, bk_max), np.bool_)
    vbad = scratch(bk_max, np.bool_)
    rescale = scratch(bq, np.float64)
    F = scratch((0, 0), q.dtype)  # the forward needs no soft-cap derivative
    norms = _norms(h.q, bq, bk_max)
    _set_query_norms(h.q, norms, i0, i1)
    ninf = -np.inf
    for r in range(bq):
        acc.m[r] = ninf
        acc.l[r] = 0.0
        acc.nan[r] = False
        for c in range(Dv):
            acc.o[r, c] = 0.0
    # Non-finite values are found before the tile's product when it is a GEMM (one more pass over the tile
    # is cheap beside it); for one or a few rows the product is a single pass over the values, so they are
    # found from it: any inf or NaN value makes its entries of pv non-finite (0 * inf is NaN), and only then
    # is the tile scanned and redone by selection.
    values_first = bq > _GEMV_ROWS and not _few_rows(bq, q)
    jb, end = _key_tiles(h.keys, h.group, i0, i1, j0, j1, bk_max)
    while jb < end:
        bk = min(bk_max, j1 - jb)
        _scores(S, bq, bk, h, i0, jb, norms, F)
        nbad = _bad_rows(v[jb : jb + bk], vbad) if values_first else 0  # the tile is about to be read by the GEMM: cache-hot
        if nbad or not values_first or (VARIANTS and h.has_keep):
            for r in range(bq):
                for j in range(bk):
                    part[r, j] = S[r, j] != ninf  # NaN scores take part (and spoil their row)
        for r in range(bq):
            row = S[r]
            m_old = acc.m[r]
            mx = np.float64(_row_max(row, bk))
            m_new = mx if mx > m_old else m_old
            if m_new == ninf:
                # nothing has taken part yet in this row; a NaN score would still spoil it
                for j in range(bk):
                    if row[j] != row[j]:
                        acc.nan[r] = True
                    row[j] = 0.0
                rescale[r] = 1.0
                continue
            tile_sum = _exp_shift_sum(row, bk, like(m_new, row[0]))
            a = 1.0 if m_old == m_new else math.exp(m_old - m_new)  # M2: rescale the running sums
            rescale[r] = a
            acc.m[r] = m_new
            acc.l[r] = a * acc.l[r] + np.float64(tile_sum)
            if tile_sum != tile_sum:
                acc.nan[r] = True
        if VARIANTS and h.has_keep:  # V8: a dropped pair's weight leaves the mean, not the sum l; its value is never read
            for r in range(bq):
                for j in range(bk):
                    if not _own_at(h.keep, h.keep_group, i0 + r, jb + j):
                        S[r, j] = 0.0
                        part[r, j] = False
        if Dv > 0:
            if nbad == 0:
                _value_product(v, jb, S, bq, bk, bk_max, pv)
                if not values_first and not _all_finite(pv, bq):
                    nbad = _bad_rows(v[jb : jb + bk], vbad)  # else an overflow: pv is already what selection gives
            if nbad:
                _finite_copy(v[jb : jb + bk], vbad, vt)
                _value_product(readonly(vt), np.int64(0), S, bq, bk, bk_max, pv)
                _add_nonfinite(S, bq, bk, part, v[jb : jb + bk], vbad, pv, True)
        for r in range(bq):
            a = rescale[r]
            if a == 1.0:
                for c in range(Dv):
                    acc.o[r, c] += np.float64(pv[r, c])
            else:
                for c in range(Dv):  # an infinite sum stays itself: the factor is positive in exact arithmetic
                    oc = acc.o[r, c]
                    acc.o[r, c] = (a * oc if np.isfinite(oc) else oc) + np.float64(pv[r, c])
        jb += bk


@template(**INNER)
def _finish_rows(acc, sinks, i0, empty_nan, keep_div, out, lse):
    """M2's result for the rows ``i0, i0 + 1, ...`` of ``acc``: ``a = o / l``, ``L = m + log l`` (float64, rounded once to ``out``'s dtype), with the policy.

    ``sinks``: the element's sink logits (V5), row ``i`` taking ``sinks[i % len(sinks)]``
    (a group's heads, V6), merged as one more partial; ``-inf`` for none;
    ``keep_div``: dropout's ``1 - p`` (V8), which divides the mean (1 without).
    """
    Dv = acc.o.shape[1]
    for r in range(acc.m.shape[0]):
        m, l, c, nan = acc.m[r], acc.l[r], 1.0, acc.nan[r]
        if VARIANTS:
            sink = sinks[(i0 + r) % sinks.shape[0]]
            nan = nan or sink != sink
            m, l, c = _merge_sink(m, l, sink)
        lse[r] = _log_partition_of_row(m, l, nan)
        for col in range(Dv):
            o = acc.o[r, col]
            a = _summary_of_row(c * o if np.isfinite(o) else o, l, nan, empty_nan)
            out[r, col] = a if keep_div == 1.0 else a / keep_div


@template(cache=True, nogil=True, no_cfunc_wrapper=True)
def forward(stage, thread, nthreads, p, mask, blocks, bk, nsplit, parts, out, lse):
    """A1-A4 fused over the flattened batch of the :class:`~iem_ref.accel._problem.Problem` ``p`` (and its ``mask``); this thread's share of one stage.

    ``out (B, N, Dv)``, ``lse (B, N)``; ``parts``: :class:`Partials` of shape
    ``(B, nsplit, N[, Dv])``; ``blocks``: the query blocks' row boundaries
    (block ``t`` is rows ``blocks[t] .. blocks[t + 1] - 1``).  A template: :mod:`iem_ref.accel.cpu`
    compiles an instance of it per feature set (``nogil``, one explicit signature) and runs it on
    ``nthreads`` threads, thread ``thread`` taking the work items ``thread,
    thread + nthreads, ...`` (which items a thread takes changes no result).

    Stage 0: work items ``(batch, query block, key split)``, each M1 over its
    keys into its partials; with one split the item also finishes its rows.
    Stage 1 (``nsplit > 1``, decoding: few queries, many keys): items
    ``(batch, query block)`` merge the splits in split order (M2) and finish.
    """
    B = out.shape[0]
    Dv = out.shape[2]
    M = p.k.shape[1]
    nqb = blocks.shape[0] - 1
    nkb = (M + bk - 1) // bk
    if stage == 0:
        for w in range(thread, B * nqb * nsplit, nthreads):
            b = w // (nqb * nsplit)
            rest = w % (nqb * nsplit)
            i0 = blocks[rest // nsplit]
            i1 = blocks[rest // nsplit + 1]
            split = rest % nsplit
            j0 = min(M, (split * nkb // nsplit) * bk)
            j1 = min(M, ((split + 1) * nkb // nsplit) * bk)
            acc = _partials_at(parts, b, split, i0, i1)
            _forward_block(_head_of(p, mask, b), i0, i1, j0, j1, bk, acc)
            if nsplit == 1:
                _finish_rows(acc, p.sinks[b], i0, p.empty_nan, p.dropout_keep, out[b, i0:i1], lse[b, i0:i1])
        return
    for w in range(thread, B * nqb, nthreads):
        b = w // nqb
        i0 = blocks[w % nqb]
        i1 = blocks[w % nqb + 1]
        first = _partials_at(parts, b, np.int64(0), i0, i1)
        for split in range(1, nsplit):  # M2, in split order
            other = _partials_at(parts, b, split, i0, i1)
            for r in range(i1 - i0):
                m1 = first.m[r]
                m2 = other.m[r]
                mm = m1 if m1 > m2 else m2
                c1 = 1.0 if m1 == mm else math.exp(m1 - mm)
                c2 = 1.0 if m2 == mm else math.exp(m2 - mm)
                first.m[r] = mm
                first.l[r] = c1 * first.l[r] + c2 * other.l[r]
                first.nan[r] = first.nan[r] or other.nan[r]
                for c in range(Dv):
                    o1 = first.o[r, c]
                    o2 = other.o[r, c]
                    first.o[r, c] = (c1 * o1 if np.isfinite(o1) else o1) + (c2 * o2 if np.isfinite(o2) else o2)
        _finish_rows(first, p.sinks[b], i0, p.empty_nan, p.dropout_keep, out[b, i0:i1], lse[b, i0:i1])


# --- backward (G4) ------------------------------------------------------------------
class Saved(NamedTuple):
    """What the backward reads from the forward, float64 per ``(B, N)``: ``L_i``, ``Delta_i = <u_i, a_i>``, the certain-key count, the row sum of ``dS``."""

    lse: np.ndarray
    delta: np.ndarray
    cnt: np.ndarray  # filled by the backward's stage 0
    rowsum: np.ndarray  # sum_j dS_ij over the keys: Delta_i r_sink,i with sinks (V5), else 0 (K2's dq needs it)


class Grads(NamedTuple):
    """The backward's results: ``dq (B, N, D)``, ``dk (B, M, D)``, ``dv (B, M, Dv)``; ``dz (B, N, M)`` float64 ``dZ`` with a bias (V1), else ``(B, 0, 0)``."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dz: np.ndarray


class Splits(NamedTuple):
    """The key splits' float64 partial sums of ``dq``: ``dq (B, S, N, D)``; ``x (B, S, N)`` the row sums of ``dX`` (K2 with a soft-cap, else ``(B, S, 0)``).

    Split ``s`` holds the terms of the key blocks ``s, s + S, s + 2 S, ...``
    (interleaved, so that a causal problem gives every split about the same
    work).
    """

    dq: np.ndarray
    x: np.ndarray


@njit(fastmath=_FM, **INNER)
def _p_ds_tile(S, Bt, bq, bk, saved, i0, part, keep_part):
    """Responsibilities and routing gradients of a tile, in place: ``S <- r_ij``, ``Bt <- dLoss/ds_ij = r_ij (b_ij - Delta_i)``.

    ``r_ij = exp(s_ij - L_i)`` (the saved log-partition, G1), ``Delta_i =
    sum_j r_ij b_ij = <u_i, a_i>``.  Rows by their ``L``: NaN -> NaN on
    the keys that take part (as the reference), 0 elsewhere; ``-inf`` (empty) -> 0; ``+inf``
    (certain) -> ``r = 1/c_i`` on the ``c_i`` keys with score ``+inf`` and
    ``dLoss/ds = 0`` (the output does not move under finite changes of the
    logits).  A non-finite ``Delta_i`` (an infinite or NaN value the output
    reads, or a non-finite ``u_i``) makes ``dLoss/ds`` NaN on the keys that
    take part.  A key that does not take part (score ``-inf``), or whose
    weight is 0, gets ``dLoss/ds = 0`` by selection, whatever its ``b`` (an
    overflowed ``<u_i, v_j>`` of finite entries included).
    """
    ninf = -np.inf
    for r in range(bq):
        srow = S[r]
        brow = Bt[r]
        if keep_part:
            for j in range(bk):
                part[r, j] = srow[j] != ninf
        L = saved.lse[i0 + r]
        spoilt = not np.isfinite(saved.delta[i0 + r])
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
            w = 1.0 / saved.cnt[i0 + r]
            for j in range(bk):
                brow[j] = np.nan if (spoilt and srow[j] != ninf) else 0.0
                srow[j] = w if srow[j] == np.inf else 0.0
        elif spoilt:
            Lt = like(L, srow[0])
            for j in range(bk):
                s = srow[j]
                srow[j] = fexp(s - Lt)
                brow[j] = np.nan if s != ninf else 0.0
        else:
            Lt = like(L, srow[0])
            dt = like(saved.delta[i0 + r], srow[0])
            zero = like(0.0, Lt)
            for j in range(bk):
                s = srow[j]
                p = fexp(s - Lt)  # exp(-inf) = 0 for keys that do not take part; clamped if a saved L is off
                srow[j] = p
                brow[j] = p * (brow[j] - dt) if p != zero else zero  # a zero weight routes nothing, whatever b holds


@njit(**INNER)
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


@template(**INNER)
def _count_certain(h, i0, i1, bk_max, saved):
    """``cnt_i``: how many keys take part with score ``+inf`` (rows with ``L = +inf`` only)."""
    bq = i1 - i0
    any_certain = False
    for r in range(bq):
        saved.cnt[i0 + r] = 0.0
        any_certain |= saved.lse[i0 + r] == np.inf
    if not any_certain:
        return
    M = h.k.shape[0]
    S = scratch((bq, bk_max), h.q.dtype)
    F = scratch((0, 0), h.q.dtype)
    norms = _norms(h.q, bq, bk_max)
    _set_query_norms(h.q, norms, i0, i1)
    start, end = _key_tiles(h.keys, h.group, i0, i1, np.int64(0), M, bk_max)
    for jb in range(start, end, bk_max):
        bk = min(bk_max, M - jb)
        _scores(S, bq, bk, h, i0, jb, norms, F)
        for r in range(bq):
            for j in range(bk):
                saved.cnt[i0 + r] += S[r, j] == np.inf
    if VARIANTS:
        for r in range(bq):  # a sink of logit +inf (V5) is a certain key too
            if saved.lse[i0 + r] == np.inf and h.sinks[(i0 + r) % h.sinks.shape[0]] == np.inf:
                saved.cnt[i0 + r] += 1.0


@template(fastmath=_FM, **INNER)
def _logit_grads(h, Bt, F, bq, bk, i0, jb, dz):
    """The variants' chain rule on a tile of ``Bt = dZ`` (V1, V3, F3): ``dz[i0 + r, jb + j] = dZ`` (``dbias``'s terms) when ``dz`` has rows,
    then ``Bt <- dX = dZ dz/dx`` (``F``: ``1 - tanh(y / c)^2`` times the score_mod's slope)."""
    if h.has_bias and dz.shape[0] > 0:
        for r in range(bq):
            for j in range(bk):
                dz[i0 + r, jb + j] = Bt[r, j]
    if h.softcap > 0.0 or FLEX:
        for r in range(bq):
            for j in range(bk):
                Bt[r, j] = Bt[r, j] * F[r, j]


@template(fastmath=_FM, **INNER)
def _backward_keys(h, j0, j1, blocks, saved, dk, dv, dq_part, x_part, dz):
    """G4, keys ``[j0, j1)``, over all queries: ``dv_j``, ``dk_j`` in full and these keys' terms of every ``dq_i``.

    ``dv_j = sum_i r_ij u_i`` and ``dk_j = scale sum_i dS_ij q_i`` (minus
    ``scale k_j sum_i dS_ij`` for K2) are written; ``dq_part[i] += sum_j dX_ij
    k_j`` over these keys (float64, one tile product at a time), and
    ``x_part[i] += sum_j dX_ij`` where K2 with a soft-cap needs it (``dX =
    dZ = dS`` without a soft-cap, V3).  With a bias (V1) ``dz`` receives the
    tile's ``dZ`` (``dbias``'s terms, summed by the host).
    """
    q, k, v, u = h.q, h.k, h.v, h.u
    bk = j1 - j0
    N = q.shape[0]
    D = q.shape[1]
    Dv = v.shape[1]
    bq_max = np.int64(0)
    for t in range(blocks.shape[0] - 1):
        bq_max = max(bq_max, blocks[t + 1] - blocks[t])
    S = scratch((bq_max, bk), q.dtype)
    Bt = scratch((bq_max, bk), q.dtype)
    part = scratch((bq_max, bk), np.bool_)
    tk = scratch((bk, D), q.dtype)
    tv = scratch((bk, Dv), q.dtype)
    qfin = scratch((bq_max, D), q.dtype)
    ufin = scratch((bq_max, Dv), q.dtype)
    qflag = scratch(bq_max, np.bool_)
    uflag = scratch(bq_max, np.bool_)
    tq = scratch((bq_max, D), q.dtype)
    kfin = scratch((bk, D), q.dtype)
    kflag = scratch(bk, np.bool_)
    acc_k = zeros((bk, D), np.float64)
    acc_v = zeros((bk, Dv), np.float64)
    colsum = zeros(bk, np.float64)
    F = scratch((bq_max if (h.softcap > 0.0 or FLEX) else 0, bk), q.dtype)
    nopart = scratch((0, 0), np.bool_)
    part_kept = scratch((bq_max if (VARIANTS and h.has_keep) else 0, bk), np.bool_)
    norms = _norms(h.q, bq_max, bk)
    nk = _rows_flags(k, j0, bk, kflag) if ENERGY != PRECOMPUTED else 0
    if nk > 0:
        _finite_copy(k[j0:j1], kflag, kfin)
    # the queries that see a key of [j0, j1) (causality, window, segments), in the query blocks of the forward
    i_start = min(N, _first_position_above(h.keys, np.int64(1), j0) * h.group)
    i_end = min(N, _first_position_above(h.keys, np.int64(0), j1 - 1) * h.group)
    t = 0
    while t + 2 < blocks.shape[0] and blocks[t + 1] <= i_start:
        t += 1
    for t in range(t, blocks.shape[0] - 1):
        i0 = blocks[t]
        i1 = blocks[t + 1]
        if i0 >= i_end:
            break
        bq = i1 - i0
        _set_query_norms(h.q, norms, i0, i1)
        _scores(S, bq, bk, h, i0, j0, norms, F)
        if Dv > 0:
            gemm(_TRANS, _NOTRANS, bk, bq, Dv, 1.0, v, j0 * Dv, Dv, u, i0 * Dv, Dv, 0.0, Bt, 0, bk)  # b_ij = <u_i, v_j>
        else:
            Bt[:bq, :] = 0.0
        nq = _rows_flags(q, i0, bq, qflag) if ENERGY != PRECOMPUTED else 0
        nu = _rows_flags(u, i0, bq, uflag)
        if VARIANTS and h.has_keep:  # V8: b_ij = c_ij <u_i, v_j>
            _dropout_factors(h.keep, h.keep_group, h.dropout_keep, Bt, bq, bk, i0, j0, nopart)
        _p_ds_tile(S, Bt, bq, bk, saved, i0, part, nq + nu + nk > 0)
        if VARIANTS and (h.logits or FLEX):
            _logit_grads(h, Bt, F, bq, bk, i0, j0, dz)
            if (h.softcap > 0.0 or FLEX) and ENERGY == SQEUCLIDEAN:
                for r in range(bq):
                    for j in range(bk):
                        x_part[i0 + r] += np.float64(Bt[r, j])
        if Dv > 0:
            partv = part
            if VARIANTS and h.has_keep:  # dv_j = sum_i r_ij c_ij u_i, a dropped pair's u never read
                partv = part_kept
                for r in range(bq):  # a loop, not partv[:bq] = part[:bq]: Numba would compile a shape-error message
                    for j in range(bk):
                        partv[r, j] = part[r, j]
                _dropout_factors(h.keep, h.keep_group, h.dropout_keep, S, bq, bk, i0, j0, partv)
            if nu == 0:
                gemm(_NOTRANS, _TRANS, Dv, bk, bq, 1.0, u, i0 * Dv, Dv, S, 0, bk, 0.0, tv, 0, Dv)
            else:
                _finite_copy(u[i0:i1], uflag, ufin)
                gemm(_NOTRANS, _TRANS, Dv, bk, bq, 1.0, ufin, 0, Dv, S, 0, bk, 0.0, tv, 0, Dv)
                _add_nonfinite_transposed(S, bq, bk, partv, u[i0:i1], uflag, tv, True)
            for j in range(bk):
                for c in range(Dv):
                    acc_v[j, c] += np.float64(tv[j, c])
        if D > 0 and ENERGY != PRECOMPUTED:
            if nq == 0:
                gemm(_NOTRANS, _TRANS, D, bk, bq, 1.0, q, i0 * D, D, Bt, 0, bk, 0.0, tk, 0, D)
            else:
                _finite_copy(q[i0:i1], qflag, qfin)
                gemm(_NOTRANS, _TRANS, D, bk, bq, 1.0, qfin, 0, D, Bt, 0, bk, 0.0, tk, 0, D)
                _add_nonfinite_transposed(Bt, bq, bk, part, q[i0:i1], qflag, tk, False)
            for j in range(bk):
                for c in range(D):
                    acc_k[j, c] += np.float64(tk[j, c])
            if nk == 0:  # dq's terms: dX (bq, bk) @ k (bk, D)
                gemm(_NOTRANS, _NOTRANS, D, bq, bk, 1.0, k, j0 * D, D, Bt, 0, bk, 0.0, tq, 0, D)
            else:
                gemm(_NOTRANS, _NOTRANS, D, bq, bk, 1.0, kfin, 0, D, Bt, 0, bk, 0.0, tq, 0, D)
                _add_nonfinite(Bt, bq, bk, part, k[j0:j1], kflag, tq, False)
            for r in range(bq):
                for c in range(D):
                    dq_part[i0 + r, c] += np.float64(tq[r, c])
        if ENERGY == SQEUCLIDEAN:
            for r in range(bq):
                for j in range(bk):
                    colsum[j] += np.float64(Bt[r, j])
    sc = np.float64(h.scale)
    for j in range(bk):
        for c in range(Dv):
            dv[j0 + j, c] = acc_v[j, c]
        for c in range(D):
            g = sc * acc_k[j, c]
            if ENERGY == SQEUCLIDEAN:
                kj = np.float64(k[j0 + j, c])
                g -= sc * (kj if np.isfinite(kj) else 0.0) * colsum[j]
            dk[j0 + j, c] = g


@template(**INNER)
def _finish_dq(h, i0, i1, saved, dq_parts, x_parts, dq):
    """G4, queries ``[i0, i1)``: ``dq_i = scale sum_s dq_parts[s, i]`` (for K2 minus ``scale q_i sum_j dX_ij``, nonzero with sinks or a soft-cap only).

    The key splits' float64 partial sums are added in split order, so the
    result depends on the number of splits (a function of the shapes), never
    on which thread ran a split.
    """
    q = h.q
    D = q.shape[1]
    ns = dq_parts.shape[0]
    sc = np.float64(h.scale)
    for i in range(i0, i1):
        rowsum = saved.rowsum[i]
        if VARIANTS and (h.softcap > 0.0 or FLEX) and ENERGY == SQEUCLIDEAN:
            rowsum = 0.0
            for s in range(ns):
                rowsum += x_parts[s, i]
        for c in range(D):
            acc = 0.0
            for s in range(ns):
                acc += dq_parts[s, i, c]
            g = sc * acc
            if ENERGY == SQEUCLIDEAN and rowsum != 0.0:
                qi = np.float64(q[i, c])
                g -= sc * (qi if np.isfinite(qi) else 0.0) * rowsum
            dq[i, c] = g


@njit(**INNER)
def _saved_at(saved, b):
    return Saved(saved.lse[b], saved.delta[b], saved.cnt[b], saved.rowsum[b])


@template(cache=True, nogil=True, no_cfunc_wrapper=True)
def backward(stage, thread, nthreads, p, mask, blocks, bk, saved, grads, splits):
    """G4 over the flattened batch of the :class:`~iem_ref.accel._problem.Problem` ``p`` (and its ``mask``), into the :class:`Grads` ``grads``.

    ``saved``: :class:`Saved` (``L``, ``Delta = <u_i, a_i>``, float64).
    This thread's share (items ``thread, thread + nthreads, ...``) of one
    stage, as :func:`forward`.  Stage 0: per query block, ``cnt``, the number
    of keys with score ``+inf`` of each certain row.  Stage 1: per batch
    element and key split (:class:`Splits`), the split's key blocks one after
    the other, each against every query block that sees it: the score tile,
    ``b = U V^T``, ``dS``, then ``dv``, ``dk`` (written, the block's own) and
    the block's terms of ``dq`` (into the split's partial sums).  Five GEMMs
    per tile pair and one exponential per score; no two items write the same
    element, so no atomics.  Stage 2: per query block, ``dq`` from the
    splits' partial sums, in split order.
    A template: :mod:`iem_ref.accel.cpu` compiles an instance of it per feature set.
    """
    B = grads.dq.shape[0]
    M = grads.dk.shape[1]
    nqb = blocks.shape[0] - 1
    nkb = (M + bk - 1) // bk
    ns = splits.dq.shape[1]
    if stage == 0:
        for w in range(thread, B * nqb, nthreads):
            b = w // nqb
            _count_certain(_head_of(p, mask, b), blocks[w % nqb], blocks[w % nqb + 1], bk, _saved_at(saved, b))
    elif stage == 1:
        for w in range(thread, B * ns, nthreads):
            b = w // ns
            s = w % ns
            h = _head_of(p, mask, b)
            sv = _saved_at(saved, b)
            for kb in range(s, nkb, ns):
                j0 = kb * bk
                _backward_keys(h, j0, min(M, j0 + bk), blocks, sv, grads.dk[b], grads.dv[b], splits.dq[b, s], splits.x[b, s],
                               grads.dz[b])
    else:
        for w in range(thread, B * nqb, nthreads):
            b = w // nqb
            _finish_dq(_head_of(p, mask, b), blocks[w % nqb], blocks[w % nqb + 1], _saved_at(saved, b), splits.dq[b],
                       splits.x[b], grads.dq[b])
