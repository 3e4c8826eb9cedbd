"""Numba CUDA path: the fused softmin summary (M1-M2) and its backward pass (G4) on the GPU.

Same public functions, signatures and edge-case policy as the reference
(:func:`iem_ref.attention.attention`, :func:`iem_ref.summaries.softmin_summary`,
:func:`iem_ref.gradients.attention_vjp`; README, "Edge-case policy").

Shape legend: ``B...`` leading (batch, head) axes, which broadcast; ``N``
queries, ``M`` keys, ``D`` features of queries and keys, ``Dv`` features of
values.

Inputs and outputs:

- NumPy arrays (or anything ``np.asarray`` takes) are copied to the device
  and the results copied back: NumPy in, NumPy out.
- Device arrays (anything exposing ``__cuda_array_interface__``: Numba device
  arrays, CuPy arrays, torch CUDA tensors; under the simulator the arrays of
  ``numba.cuda.to_device``) are read in place, whatever their strides
  (transposed layouts, broadcast axes with stride 0); the results are new
  Numba device arrays (wrap them with ``cupy.asarray`` or
  ``torch.as_tensor(..., device="cuda")``, zero-copy).  The same holds for
  the ``(B..., N, M)`` variant operands, ``bias`` and ``dropout_mask``; the
  small ones (``alibi_slopes``, ``sinks``, ``cu_seqlens_q/k``: a value per
  head or per segment) are read to the host once when they are device arrays,
  since the key ranges and per-row tables are built there.  If any array
  input is a device array the results stay on the device.  A device
  array whose dtype is not the computation dtype (float32 only when every
  input is float32, else float64; integers become float64) is cast once on
  the device.  Kernels run on the default stream; the producer's stream is
  synchronised by ``numba.cuda.as_cuda_array`` first.

Arithmetic: float32 inputs compute in float32 (products, exp, sums),
float64 in float64; the online softmin uses the plain shifted exponent
``exp(x_j - m)`` (not the reference's error-free split), so the error
against the reference grows with ``|x| u`` and the reduction lengths ``D``
and ``M``: the bound is derived in ``tests/test_cuda.py``.

Backend: without a GPU, set ``NUMBA_ENABLE_CUDASIM=1`` before numba is
imported and the same kernels run in Numba's CUDA simulator (one Python
thread per CUDA thread: small shapes only), with a smaller tile layout
(8 threads, 8 x 8 tiles: ``_cuda_kernels.LAYOUTS``) that keeps test shapes
fast and still crosses several tiles.  :data:`BACKEND` says which ran,
:data:`launches` counts kernel launches per kernel name.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda.core import config as _nb_config

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
from . import _cuda_kernels as _k
from ._problem import (
    DOT,
    ENERGY_CODES,
    PRECOMPUTED,
    DeviceProblem,
    Operand,
    band,
    key_ranges,
    own_data,
    segment_args,
    sink_routing,
    slopes_per_row,
)

__all__ = [
    "arithmetic",
    "attention",
    "softmin_summary",
    "attention_vjp",
    "sign_posterior_mean",
    "tanh_from_signed_gaussian",
    "softplus",
    "BACKEND",
    "SUPPORTED_ENERGIES",
    "launches",
    "blocks",
]

SIMULATED = bool(_nb_config.ENABLE_CUDASIM)
BACKEND = "simulator" if SIMULATED else "gpu"
SUPPORTED_ENERGIES = tuple(sorted(ENERGY_CODES))
#: kernel launches and thread blocks launched, by kernel name, since import (what a call costs in launches and blocks)
launches = {}
blocks = {}

if SIMULATED:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray
else:
    _FakeCUDAArray = None


# --------------------------------------------------------------------------
# Device arrays: recognising them, validating them through shape proxies, and
# turning any array into the strided view the kernels take.


def _is_device(x):
    if x is None:
        return False
    if SIMULATED:
        return isinstance(x, _FakeCUDAArray)
    return hasattr(x, "__cuda_array_interface__")


def _device_meta(x):
    """``(shape, dtype)`` of a device array without touching its data."""
    if SIMULATED:
        return tuple(x.shape), np.dtype(x.dtype)
    iface = x.__cuda_array_interface__
    return tuple(iface["shape"]), np.dtype(iface["typestr"])


def _proxy(x):
    """What validation sees: NumPy inputs as they are, device arrays as a zero-stride array of their shape.

    Integer device arrays are validated as float64 (their computation dtype),
    so no host array of their size is ever made.
    """
    if not _is_device(x):
        return x
    shape, dtype = _device_meta(x)
    if dtype.kind in "iu":
        dtype = np.dtype(np.float64)
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _on_host(x):
    """A small operand (a value per head, segment or row) on the host: copied once if it is a device array."""
    if not _is_device(x):
        return x
    return (x if SIMULATED else cuda.as_cuda_array(x)).copy_to_host()


def _prepare(q, k, v, mask, **kw):
    """Validated attention inputs (:func:`~iem_ref.attention.prepare_attention`) seeing device arrays through :func:`_proxy`."""
    for name in ("alibi_slopes", "sinks", "cu_seqlens_q", "cu_seqlens_k"):
        kw[name] = _on_host(kw[name])
    for name in ("bias", "dropout_mask"):
        kw[name] = _proxy(kw[name])
    return prepare_attention(_proxy(q), _proxy(k), _proxy(v), mask=_proxy(mask), **kw)


class _Iface:
    """A minimal ``__cuda_array_interface__`` (1-D, contiguous) over memory owned by ``owner``."""

    def __init__(self, ptr, n, typestr, owner):
        self.__cuda_array_interface__ = {"shape": (n,), "strides": None, "typestr": typestr, "data": (ptr, False), "version": 3}
        self._owner = owner


def _span(shape, strides):
    """``(lo, hi)`` element offsets of the first and last byte-wise extreme elements of a strided array."""
    lo = sum(min(0, (n - 1) * s) for n, s in zip(shape, strides))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(shape, strides))
    return lo, hi


def _flat_device(x, dtype):
    """A 1-D device array over the span of device array ``x`` (no copy unless a cast is needed).

    Returns ``(flat, shape, strides, base)``: element ``idx`` of ``x`` is
    ``flat[base + sum(idx * strides)]``.  ``dtype`` None keeps the dtype; a
    bool array is read as uint8.
    """
    if SIMULATED:
        arr = x._ary
    else:
        arr = cuda.as_cuda_array(x)  # synchronises the producer's stream if it exported one
    shape = tuple(arr.shape)
    src_dtype = np.dtype(arr.dtype)
    item = src_dtype.itemsize
    strides = tuple(s // item for s in arr.strides) if arr.strides is not None else None
    if strides is None or any(s * item != sb for s, sb in zip(strides, arr.strides)):
        raise ValueError(f"device array strides {arr.strides} are not a multiple of its itemsize {item}")
    if 0 in shape:
        flat_dtype = np.uint8 if src_dtype == np.bool_ else (dtype or src_dtype)
        return cuda.to_device(np.zeros(1, dtype=flat_dtype)), shape, strides, 0
    lo, hi = _span(shape, strides)
    n = hi - lo + 1
    if SIMULATED:
        flips = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in strides)
        first = arr[flips]  # its data pointer is the lowest address of arr
        flat_np = np.lib.stride_tricks.as_strided(first, shape=(n,), strides=(item,))
        if src_dtype == np.bool_:
            flat_np = flat_np.view(np.uint8)
        elif dtype is not None and src_dtype != dtype:
            flat_np = flat_np.astype(dtype)
        flat = _FakeCUDAArray(flat_np)
    else:
        typestr = "|u1" if src_dtype == np.bool_ else src_dtype.str
        ptr = arr.device_ctypes_pointer.value + lo * item
        flat = cuda.as_cuda_array(_Iface(ptr, n, typestr, arr))
        if src_dtype != np.bool_ and dtype is not None and src_dtype != dtype:
            cast = cuda.device_array(n, dtype=dtype)
            _launch(_k.build("float64", DOT).cast, (n + 255) // 256, 256, flat, cast)
            flat = cast
    return flat, shape, strides, -lo


def _operand(x, batch, dtype, mask=False):
    """The kernel view (:class:`~iem_ref.accel._problem.Operand`) of ``x`` broadcast to ``batch + x.shape[-2:]`` (its own two trailing axes)."""
    if _is_device(x):
        flat, shape, strides, base = _flat_device(x, None if mask else dtype)
    else:
        a = np.asarray(x)
        a = np.ascontiguousarray(a, dtype=np.uint8 if mask else dtype)
        shape = a.shape
        strides = tuple(s // a.itemsize for s in a.strides)
        flat = cuda.to_device(a.reshape(-1) if a.size else np.zeros(1, dtype=a.dtype))
        base = 0
    nd = len(batch) + 2
    pad = nd - len(shape)
    shape = (1,) * pad + tuple(shape)
    strides = (0,) * pad + tuple(strides)
    strides = tuple(0 if n == 1 else s for n, s in zip(shape, strides))  # a length-1 axis broadcasts
    off = np.full(shape[: len(batch)], base, dtype=np.int64)
    for ax, (n, s) in enumerate(zip(shape[: len(batch)], strides[: len(batch)])):
        if n > 1:
            off = off + (np.arange(n, dtype=np.int64) * s).reshape((1,) * ax + (n,) + (1,) * (len(batch) - ax - 1))
    off = np.ascontiguousarray(np.broadcast_to(off, batch)).reshape(-1)
    off_dev = cuda.to_device(off if off.size else np.zeros(1, dtype=np.int64))
    return Operand(flat, off_dev, int(strides[-2]), int(strides[-1]))


def _placeholder(bf, dtype):
    """An operand the kernel does not read (an absent mask, the forward's upstream gradient)."""
    return Operand(cuda.to_device(np.zeros(1, dtype=dtype)), cuda.to_device(np.zeros(max(bf, 1), dtype=np.int64)), 0, 0)


def _launch(kernel, grid, block, *args):
    name = getattr(getattr(kernel, "py_func", None), "__name__", None) or getattr(kernel, "__name__", "kernel")
    launches[name] = launches.get(name, 0) + 1
    blocks[name] = blocks.get(name, 0) + int(np.prod(grid))
    kernel[grid, block](*args)


def _finish(arrays, shapes, device):
    """Reshape the kernels' (Bf, ...) outputs to the public shapes; copy to the host unless ``device``."""
    out = []
    for a, shape in zip(arrays, shapes):
        if device:
            out.append(a.reshape(shape))
        else:
            out.append(a.copy_to_host().reshape(shape))
    return out


def arithmetic(layout=None):
    """This path's :class:`iem_ref.bounds.Arithmetic`: ``exp`` and the rescalings within 2 ulps, running state in
    the dtype, squared differences summed directly (section 5's ``c = 2``), key tiles of ``BC`` keys: the layout
    ``layout`` of ``_cuda_kernels.LAYOUTS``, or the current one when a bound is formed."""
    from ..bounds import Arithmetic

    def tiles(n_queries, n_keys, dtype, backward):
        lay = _k.LAYOUT if layout is None else _k.LAYOUTS[layout]
        return lay["BR"], lay["BC"]

    return Arithmetic("cuda", exp_ulps=2, rescale_exp_ulps=2, state_float64=False, score_extra=2, expanded_sqeuclid=False,
                      tiles=tiles)


def _check_energy(energy):
    energy_of(energy).require("kernel", "iem_ref.accel.cuda (iem_ref.attention computes every energy)")


def _scale_value(scale, tau, dtype):
    """The scale the kernels multiply by: the user's scale, ``1/sqrt(D)`` by default, 0 for ``tau = inf``."""
    if math.isinf(tau):
        return dtype.type(0.0)
    if scale is not None:
        return dtype.type(float(scale))
    return dtype.type(1.0 / tau)


# --------------------------------------------------------------------------
# The forward pass, shared by attention and softmin_summary.


def _problem(q, k, v, u, mask, batch, *, n, m, d, dv, scale, empty_nan, dtype, inp=None, group=1, sinks=None, bias=None,
             dropout_mask=None):
    """The :class:`~iem_ref.accel._problem.DeviceProblem` of one call; ``u`` (and ``mask``) may be None.

    ``inp``: the validated attention inputs, for the keys each query sees
    (causality, window V4, segments V7); None: every key.

    ``group``: grouped-query heads (V6), ``k`` and ``v`` with ``H / group``
    heads on the last batch axis; the kernels' rows for a key/value head are
    its group's queries, so that each K/V tile is read once for the group;
    ``sinks``: the validated sink logits (V5) broadcast to ``batch``, or None;
    ``bias``, ``dropout_mask``: the caller's arrays, read in place when they
    are device arrays (``inp`` holds host views of them otherwise).
    """
    bf = int(np.prod(batch, dtype=np.int64))
    kv_batch = batch if group == 1 else batch[:-1] + (batch[-1] // group,)
    ops = [_operand(x, kv_batch if name in "kv" else batch, dtype) if x is not None else _placeholder(bf, dtype)
           for name, x in zip("qkvu", (q, k, v, u))]
    mk = _operand(mask, batch, None, mask=True) if mask is not None else _placeholder(bf, np.uint8)
    if inp is None:
        keys = key_ranges(n, m)
    else:
        keys = key_ranges(n, m, *band(inp.is_causal, inp.window), offset=inp.causal_offset, **segment_args(inp))
    sink = np.full(max(bf, 1), -np.inf, dtype) if sinks is None or bf == 0 else np.asarray(sinks, dtype).reshape(-1)
    return DeviceProblem(*ops, mk, int(mask is not None), cuda.to_device(keys if n else np.zeros((1, 3), np.int64)), group,
                         n, m, d, dv, scale, int(empty_nan), cuda.to_device(np.ascontiguousarray(sink)),
                         *_logit_fields(inp, batch, bf, n, bias), *_dropout_fields(inp, batch, bf, dropout_mask))


def _dropout_fields(inp, batch, bf, dropout_mask=None):
    """The :class:`~iem_ref.accel._problem.DeviceProblem`'s fields of V8: ``(keep, has_keep, dropout_keep)``, the mask read in place."""
    if inp is None or inp.keep is None:
        return _placeholder(bf, np.uint8), 0, 1.0
    keep = dropout_mask if _is_device(dropout_mask) else own_data(inp.keep)
    return _operand(keep, batch, None, mask=True), 1, 1.0 - inp.dropout_p


def _logit_fields(inp, batch, bf, n, bias_arg=None):
    """The :class:`~iem_ref.accel._problem.DeviceProblem`'s fields of V1-V3: ``(logits, softcap, bias, has_bias, slopes, has_alibi)``.

    The bias is read in place through its strides (broadcast axes: stride 0), in float64.
    """
    if inp is None:
        return 0, 0.0, _placeholder(bf, np.float64), 0, cuda.to_device(np.zeros((1, 1))), 0
    bias = _placeholder(bf, np.float64)
    if inp.bias is not None:  # its own data: no N x M copy when it broadcasts
        bias = _operand(bias_arg if _is_device(bias_arg) else own_data(inp.bias), batch, np.float64)
    slopes = np.zeros((1, 1))
    if inp.slopes is not None:
        per_row = slopes_per_row(inp)
        slopes = np.ascontiguousarray(np.broadcast_to(per_row, batch + (n,)).reshape(max(bf, 1), n) if bf else slopes,
                                      dtype=np.float64)
    softcap = 0.0 if inp.softcap is None else float(inp.softcap)
    logits = softcap > 0.0 or inp.bias is not None or inp.slopes is not None
    return int(logits), softcap, bias, int(inp.bias is not None), cuda.to_device(slopes), int(inp.slopes is not None)


def _row_blocks(prob, bf):
    """``(blocks per key/value element, key/value elements)`` of the kernels whose rows are a group's queries (V6)."""
    return (prob.n * prob.group + _k.BR - 1) // _k.BR, bf // prob.group


#: the fewest key tiles a split of the forward takes (below, the merge costs more than the split gains)
SPLIT_TILES = 4
_MULTIPROCESSORS = []


def _multiprocessors():
    """The GPU's streaming multiprocessors (the simulator: 2, a small GPU for the small layout)."""
    if not _MULTIPROCESSORS:
        _MULTIPROCESSORS.append(2 if SIMULATED else int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
    return _MULTIPROCESSORS[0]


def key_splits(row_blocks, m):
    """How many key splits the forward takes for ``row_blocks`` row blocks over ``m`` keys.

    Enough for two blocks per multiprocessor when the rows alone give fewer
    (decoding: ``N = 1`` is one block per key/value head), each split at
    least :data:`SPLIT_TILES` key tiles; 1 (no split) otherwise.  The splits'
    partial states merge by M2 (:func:`~iem_ref.accel._cuda_kernels` ``combine``),
    which changes no error bound: each split holds whole tiles, so a weight
    passes through no more rescalings and additions than in one run over
    the tiles.
    """
    want = -(-2 * _multiprocessors() // max(row_blocks, 1))
    return max(1, min(want, -(-m // _k.LAYOUT["BC"]) // SPLIT_TILES))


def _forward(kern, prob, bf, dtype):
    n, dv = prob.n, prob.dv
    O = cuda.device_array((bf, n, dv), dtype=dtype)
    LSE = cuda.device_array((bf, n), dtype=dtype)
    CNT = cuda.device_array((bf, n), dtype=dtype)
    nqb, bkv = _row_blocks(prob, bf)
    if bf * nqb == 0:
        return O, LSE, CNT
    nsplit = key_splits(bkv * nqb, prob.m)
    if nsplit == 1:
        _launch(kern.forward, bkv * nqb, _k.NT, prob, nqb, 1, O, LSE, CNT)
        return O, LSE, CNT
    # each split's partial state (o, m, l), split s of element b at b * nsplit + s, merged by combine
    PO = cuda.device_array((bf * nsplit, n, dv), dtype=dtype)
    PM, PL = (cuda.device_array((bf * nsplit, n), dtype=dtype) for _ in range(2))
    _launch(kern.forward_split, (bkv * nqb, nsplit), _k.NT, prob, nqb, nsplit, PO, PM, PL)
    entries = bf * n * max(dv, 1)
    _launch(kern.combine, (entries + 127) // 128, 128, prob, nsplit, PO, PM, PL, O, LSE, CNT)
    return O, LSE, CNT


def attention(q, k, v, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", empty="zero",
              bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
              cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, return_lse=False):
    """A1-A4 on the GPU: ``a_i = sum_j softmin_j(d_ij * scale) v_j`` in one tiled pass (M1-M2).

    Parameters
    ----------
    q : array (B..., N, D), NumPy or device
    k : array (B..., M, D)
    v : array (B..., M, Dv)
    scale : float, optional
        Default ``1/sqrt(D)``; ``0`` gives uniform weights over the keys that take part.
    mask : bool array broadcast to (B..., N, M), optional
        True = the key takes part (removed by selection: masked keys and values are never used).
    is_causal : bool
    causal_alignment : {"top_left", "bottom_right"}
    energy : {"dot", "sqeuclidean"}
        ``d = -<q, k>`` (A1, K1) or ``d = ||q - k||^2 / 2`` (K2); anything else is a ``ValueError``.
    empty : {"zero", "nan"}
        Output of a row with no key that takes part (its log-partition is ``-inf``).
    bias, alibi_slopes, softcap : optional
        The logits' variants (V1-V3, :func:`iem_ref.attention`): each score becomes its logit pair by
        pair (the soft-cap in the dtype, the priors added in float64, rounded once to the dtype); the
        bias (NumPy or device) is read in place through its strides, in float64.
    window : (left, right), optional
        The sliding window (V4, :func:`iem_ref.attention`): key tiles outside it are never computed.
    enable_gqa : bool
        Grouped-query heads (V6): ``q (B..., Hq, N, D)`` against ``k, v (B..., Hkv, M, .)``,
        query head ``h`` reading key/value head ``h // (Hq / Hkv)`` in place.
    sinks : array (H,), optional
        Attention sinks (V5): one more hypothesis per row with that logit and value 0.
    cu_seqlens_q, cu_seqlens_k : array of int (S + 1,), optional
        Packed sequences (V7): each query sees only its segment's keys; tiles across segments are never computed.
    dropout_p, dropout_mask : optional
        Dropout with an explicit mask (V8, NumPy or device): dropped pairs leave the mean (their values
        never read), which is divided by ``1 - p``.
    return_lse : bool
        Also return ``L_i = log sum_j exp(-d_ij * scale)`` (B..., N).

    Returns
    -------
    a : (B..., N, Dv), NumPy or device array (see the module docstring)
    lse : (B..., N), if ``return_lse``

    Examples
    --------
    >>> import numpy as np
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [0.0]])
    >>> attention(q, k, v, scale=np.log(3.0))  # r = (3/4, 1/4)
    array([[0.75]])
    """
    check_choice(empty, "empty", {"zero", "nan"})
    _check_energy(energy)
    inp = _prepare(
        q, k, v, mask, scale=scale, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, bias=bias,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window, enable_gqa=enable_gqa, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask,
    )
    device = any(_is_device(x) for x in (q, k, v, mask, bias, dropout_mask, alibi_slopes, sinks))
    dtype = kernel_dtype(q=inp.q, k=inp.k_heads, v=inp.v_heads)
    batch, n, m, dv = inp.batch, inp.n, inp.m, inp.dv
    d = inp.q.shape[-1]
    bf = int(np.prod(batch, dtype=np.int64))
    kern = _k.build(dtype.name, ENERGY_CODES[energy])
    prob = _problem(q, k, v, None, mask, batch, n=n, m=m, d=d, dv=dv, scale=_scale_value(scale, inp.tau, dtype),
                    empty_nan=(empty == "nan"), dtype=dtype, inp=inp, group=inp.group, sinks=inp.sinks, bias=bias,
                    dropout_mask=dropout_mask)
    O, LSE, _ = _forward(kern, prob, bf, dtype)
    a, lse = _finish([O, LSE], [batch + (n, dv), batch + (n,)], device)
    return (a, lse) if return_lse else a


def softmin_summary(d, v, tau=1.0, *, mask=None, empty="zero"):
    """A3 + A4 fused on the GPU: ``a_i = sum_j softmin(d_i / tau)_j v_j`` and ``L_i = log sum_j exp(-d_ij / tau)``.

    Parameters
    ----------
    d : array (..., N, M), energies, NumPy or device
    v : array (..., M, Dv)
    tau : float, ``0 < tau <= inf``
    mask : bool array broadcast to ``d``'s shape, optional (True = takes part)
    empty : {"zero", "nan"}

    Returns
    -------
    a : (..., N, Dv)
    L : (..., N)

    Examples
    --------
    >>> a, L = softmin_summary([[0.0, 0.0]], [[1.0], [3.0]])
    >>> a, L
    (array([[2.]]), array([0.69314718]))
    """
    dp, vp, _ = check_summary_inputs(_proxy(d), _proxy(v), _proxy(mask), empty)
    tau = check_tau(tau)
    try:
        batch = np.broadcast_shapes(dp.shape[:-2], vp.shape[:-2])
    except ValueError:
        raise ValueError(f"leading (batch) axes do not broadcast: d {dp.shape}, v {vp.shape}") from None
    device = any(_is_device(x) for x in (d, v, mask))
    dtype = kernel_dtype(d=dp, v=vp)
    n, m, dv = dp.shape[-2], dp.shape[-1], vp.shape[-1]
    bf = int(np.prod(batch, dtype=np.int64))
    kern = _k.build(dtype.name, PRECOMPUTED)
    scale = dtype.type(0.0) if math.isinf(tau) else dtype.type(1.0 / tau)
    prob = _problem(d, None, v, None, mask, batch, n=n, m=m, d=0, dv=dv, scale=scale,
                    empty_nan=(empty == "nan"), dtype=dtype)  # the energies come in as the q operand
    O, LSE, _ = _forward(kern, prob, bf, dtype)
    a, L = _finish([O, LSE], [batch + (n, dv), batch + (n,)], device)
    # L depends on d only: its shape is d's, not the batch broadcast against v (as the reference).
    pad = len(batch) - (dp.ndim - 2)
    sel = tuple(0 for _ in range(pad)) + tuple(
        slice(0, 1) if (nd == 1 and nb != 1) else slice(None) for nd, nb in zip(dp.shape[:-2], batch[pad:])
    )
    if sel and any(not (isinstance(x, slice) and x == slice(None)) for x in sel):
        L = L[sel]
    return a, L


def attention_vjp(q, k, v, grad_out, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot",
                  bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
                  cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, out=None, lse=None):
    """G4 on the GPU: ``(dq, dk, dv)`` for the upstream gradient ``u = dLoss/da``.

    ``b_ij = <u_i, v_j>``, ``delta_i = sum_j r_ij b_ij = <u_i, a_i>``,
    ``dS_ij = r_ij (b_ij - delta_i)``, ``dv_j = sum_i r_ij u_i``,
    ``dq_i = scale sum_j dS_ij k_j``, ``dk_j = scale sum_i dS_ij q_i``
    (``- scale k_j sum_i dS_ij`` for ``"sqeuclidean"``), with
    ``r_ij = exp(x_ij - L_i)`` recomputed from the saved log-partition.

    Parameters
    ----------
    q, k, v, scale, mask, is_causal, causal_alignment, bias, alibi_slopes, softcap, window, enable_gqa, sinks, cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_mask
        As :func:`attention`.
    grad_out : array (B..., N, Dv)
    energy : {"dot", "sqeuclidean"}
    out, lse : the forward's output (B..., N, Dv) and log-partition (B..., N), optional
        Given both, the forward pass is not recomputed (except for rows with
        a certain key, ``lse = +inf``, whose key count it needs).

    Returns
    -------
    dq (B..., N, D), dk (B..., M, D), dv (B..., M, Dv); with ``enable_gqa`` ``dk, dv`` per key/value
    head, each the sum over its group's query heads; with ``bias`` also dbias (its shape): ``dZ``
    formed on the device as ``(B, N, M)`` float64, summed on the host; with ``sinks`` also dsinks
    (their shape), ``-sum_i r_sink,i delta_i`` (the sum on the host, in float64)

    Examples
    --------
    >>> dq, dk, dv = attention_vjp([[0.0]], [[1.0], [2.0]], [[1.0], [3.0]], [[1.0]])
    >>> dv
    array([[0.5],
           [0.5]])
    """
    energy_of(energy).require("kernel", "iem_ref.accel.cuda").require("gradient", "iem_ref.accel.cuda's attention_vjp")
    inp = _prepare(
        q, k, v, mask, scale=scale, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, bias=bias,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window, enable_gqa=enable_gqa, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask,
    )
    batch, n, m, dv = inp.batch, inp.n, inp.m, inp.dv
    up = check_grad_out(_proxy(grad_out), batch, n, dv)
    device = any(_is_device(x) for x in (q, k, v, grad_out, mask, bias, dropout_mask, alibi_slopes, sinks))
    dtype = kernel_dtype(q=inp.q, k=inp.k_heads, v=inp.v_heads, grad_out=up)
    d = inp.q.shape[-1]
    bf = int(np.prod(batch, dtype=np.int64))
    kern = _k.build(dtype.name, ENERGY_CODES[energy])
    prob = _problem(q, k, v, grad_out, mask, batch, n=n, m=m, d=d, dv=dv, scale=_scale_value(scale, inp.tau, dtype),
                    empty_nan=False, dtype=dtype, inp=inp, group=inp.group, sinks=inp.sinks, bias=bias,
                    dropout_mask=dropout_mask)

    LSE = CNT = None
    if out is not None and lse is not None:
        lse_h = np.asarray(_on_host(lse))  # a torch / CuPy tensor has no copy_to_host of its own
        if lse_h.shape[-1:] != (n,):
            raise ValueError(f"lse must have shape (B..., N) = (..., {n}); got {lse_h.shape}")
        if not np.isposinf(lse_h).any():  # else the certain rows need their key counts: recompute below
            LSE = cuda.to_device(np.ascontiguousarray(np.broadcast_to(lse_h, batch + (n,)), dtype=dtype).reshape(bf, n))
            CNT = cuda.to_device(np.zeros((bf, n), dtype=dtype))
            oo = _operand(out, batch, dtype)
    if LSE is None:
        O, LSE, CNT = _forward(kern, prob, bf, dtype)
        oo = Operand(O.reshape(-1) if O.size else cuda.to_device(np.zeros(1, dtype=dtype)),
                     cuda.to_device(np.arange(bf, dtype=np.int64) * n * dv if bf else np.zeros(1, np.int64)), dv, 1)

    nqb, bkv = _row_blocks(prob, bf)
    nkb = (m + _k.BR - 1) // _k.BR
    DEL = cuda.device_array((bf, n), dtype=dtype)
    DQ = cuda.device_array((bf, n, d), dtype=dtype)
    DK = cuda.device_array((bkv, m, d), dtype=dtype)  # V6: a key/value head's gradient sums its group's queries in the kernel
    DV = cuda.device_array((bkv, m, dv), dtype=dtype)
    if bf * n > 0:
        _launch(kern.rowdot, (bf * n + 127) // 128, 128, prob.u, oo, n, dv, DEL)
    RSUM = cuda.to_device(np.zeros((max(bf, 1), max(n, 1)), dtype=dtype))
    dsinks = None
    if inp.sinks is not None:  # V5: r_sink,i and sum_j dS_ij = Delta_i r_sink,i = -dLoss/dsink_i, per row on the host
        L64, cnt, delta = (np.asarray(X.copy_to_host(), np.float64) for X in (LSE, CNT, DEL))
        sink = np.broadcast_to(np.asarray(inp.sinks, np.float64).reshape(-1, 1), (bf, n))
        rowsum = sink_routing(sink, L64, cnt, delta)
        if bf * n > 0:
            RSUM = cuda.to_device(np.ascontiguousarray(rowsum, dtype=dtype))
        dsinks = _sum_to_shape((-rowsum).reshape(batch + (n,)).sum(axis=-1), inp.sinks_shape).astype(dtype)
    DZ = cuda.to_device(np.zeros((bf, n, m) if inp.bias is not None and bf * n * m else (1, 1, 1)))  # V1: dZ, float64
    if bf * nqb > 0 and (d > 0 or inp.bias is not None):
        _launch(kern.dq, bkv * nqb, _k.NT, prob, nqb, LSE, CNT, DEL, RSUM, DQ, DZ)
    if bf * nkb > 0 and (d + dv > 0 or inp.bias is not None):
        _launch(kern.dkv, bkv * nkb, _k.NT, prob, nkb, LSE, CNT, DEL, DK, DV, DZ)
    kv_batch = batch if inp.group == 1 else inp.k_heads.shape[:-2]
    grads = tuple(_finish([DQ, DK, DV], [batch + (n, d), kv_batch + (m, d), kv_batch + (m, dv)], device))
    if inp.bias is not None:
        dz = DZ.copy_to_host() if bf * n * m else np.zeros((bf, n, m))
        dbias = _sum_to_shape(dz.reshape(batch + (n, m)), inp.bias_shape).astype(dtype)
        grads += (cuda.to_device(dbias) if device else dbias,)
    if dsinks is not None:
        grads += (cuda.to_device(dsinks) if device else dsinks,)
    return grads


# --------------------------------------------------------------------------
# Scalar activations (S3, S4, H3): elementwise kernels over the scalar helpers
# shared with the CPU path (iem_ref.accel._scalar, plain @njit functions that
# Numba compiles as device functions).  NumPy in, NumPy out; float64 inside,
# rounded once to the input dtype, as the reference and accel.cpu do.

_ELEMENTWISE = {}


def _elementwise(name):
    if name not in _ELEMENTWISE:
        from ._scalar import sign_mean, signed_gaussian_mean, softplus_scalar

        if name == "sign":

            @cuda.jit
            def sign(dp, dm, out):
                i = cuda.grid(1)
                if i < out.shape[0]:
                    out[i] = sign_mean(dp[i], dm[i])

            _ELEMENTWISE[name] = sign
        elif name == "gauss":

            @cuda.jit
            def gauss(z, alpha, out):
                i = cuda.grid(1)
                if i < out.shape[0]:
                    out[i] = signed_gaussian_mean(z[i], alpha)

            _ELEMENTWISE[name] = gauss
        else:

            @cuda.jit
            def softplus_k(z, tau, out):
                i = cuda.grid(1)
                if i < out.shape[0]:
                    out[i] = softplus_scalar(z[i], tau)

            _ELEMENTWISE[name] = softplus_k
    return _ELEMENTWISE[name]


def _run_elementwise(name, arrays, scalars, shape, dtype):
    n = int(np.prod(shape, dtype=np.int64))
    out = cuda.device_array(max(n, 1), dtype=np.float64)
    if n:
        args = [cuda.to_device(np.ascontiguousarray(a, dtype=np.float64).reshape(-1)) for a in arrays]
        _launch(_elementwise(name), (n + 127) // 128, 128, *args, *scalars, out)
    return np.asarray(out.copy_to_host()[:n].reshape(shape), dtype=dtype)[()]


def sign_posterior_mean(d_plus, d_minus):
    """S3: ``a = r_+ - r_- = E[s | z]`` elementwise on the GPU, as :func:`iem_ref.sign_posterior_mean`.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(sign_posterior_mean(0.0, np.log(3.0))), 12)  # r = (3/4, 1/4), to a few ulps
    0.5
    """
    dp, dm, dtype = check_sign_pair(d_plus, d_minus)
    return _run_elementwise("sign", [dp, dm], [], dp.shape, dtype)


def tanh_from_signed_gaussian(z, m=1.0, sigma=1.0):
    """S4: ``E[s | z] = tanh(m z / sigma^2)`` from the signed Gaussian energies, as :func:`iem_ref.tanh_from_signed_gaussian`.

    Examples
    --------
    >>> import numpy as np
    >>> abs(float(tanh_from_signed_gaussian(0.5, m=2.0, sigma=1.0)) - float(np.tanh(1.0))) < 1e-15
    True
    """
    z = as_float_array(z, "z")
    if not 0 < float(sigma) < np.inf:  # also refuses NaN
        raise ValueError(f"sigma must be finite and > 0 (the kernel width); got {sigma!r}")
    # The linear energies -+ alpha z with alpha = m / sigma^2 (the quadratic part cancels, T3), as the reference.
    return _run_elementwise("gauss", [z], [float(m) / float(sigma) ** 2], z.shape, z.dtype)


def softplus(z, tau=1.0):
    """H3: ``softplus_tau(z) = tau log(1 + exp(z / tau))`` elementwise on the GPU, as :func:`iem_ref.softplus`.

    Examples
    --------
    >>> import numpy as np
    >>> abs(float(softplus(0.0)) - float(np.log(2.0))) < 1e-15
    True
    """
    z = as_float_array(z, "z")
    tau = check_tau(tau)
    return _run_elementwise("softplus", [z], [tau], z.shape, z.dtype)
