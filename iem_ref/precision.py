"""Low-precision dtypes and the precision model of a kernel under test.

Attention kernels run in bfloat16 or float16 (float8 is coming) with float32
accumulation.  This module knows those dtypes and describes, in one small
record, which dtype each step of such a kernel rounds to:
:class:`Precision`.  The tolerances of :mod:`iem_ref.testing` are derived
from it (:mod:`iem_ref.bounds`, section 13) and :mod:`iem_ref.lowp` emulates
it.

Dtypes: float16 is NumPy's; bfloat16 and the float8 types are those of
``ml_dtypes`` (the NumPy dtypes JAX uses), imported only when such an array
arrives or is asked for.  Every value of these dtypes is exactly a float32,
so inputs are upcast exactly; results are rounded once, from float64, with
:func:`round_to` (``ml_dtypes``' own float64 casts round twice, through
float32, and are not used).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["LOW_PRECISION", "is_low_precision", "low_precision_dtype", "round_to", "unit_roundoff", "Precision", "infer_precision"]

#: names of the low-precision dtypes understood (NumPy's float16 and ml_dtypes' types)
LOW_PRECISION = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def _ml_dtypes():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - the test extra installs it
        raise TypeError("bfloat16 and float8 arrays need the optional package ml_dtypes (pip install ml_dtypes)") from None
    return ml_dtypes


def low_precision_dtype(name):
    """The NumPy dtype of a low-precision type name (``"bfloat16"``, ``"float16"``, ...)."""
    if name == "float16":
        return np.dtype(np.float16)
    if name not in LOW_PRECISION:
        raise ValueError(f"unknown low-precision dtype {name!r}; expected one of {LOW_PRECISION}")
    return np.dtype(getattr(_ml_dtypes(), name))


def is_low_precision(dtype):
    """True for float16, bfloat16 and the float8 types."""
    return np.dtype(dtype).name in LOW_PRECISION


def unit_roundoff(dtype):
    """``u = eps / 2`` of a float dtype, the low-precision ones included.

    Examples
    --------
    >>> unit_roundoff(np.float16), unit_roundoff(low_precision_dtype("bfloat16"))
    (0.00048828125, 0.00390625)
    """
    dt = np.dtype(dtype)
    if dt.name in LOW_PRECISION and dt.name != "float16":
        return float(_ml_dtypes().finfo(dt).eps) / 2
    return float(np.finfo(dt).eps) / 2


def _round_to_odd_float32(x):
    """float64 -> float32 rounded to odd: exact values stay, inexact ones take the odd neighbour.

    Rounding to odd at >= p + 2 bits and then to nearest at p bits is a
    single correct rounding (Boldo & Melquiond 2008): float32 (24 bits) serves
    every dtype of at most 11 bits.
    """
    with np.errstate(over="ignore"):
        t = x.astype(np.float32)
    inexact = np.isfinite(x) & (t.astype(np.float64) != x)
    other = np.nextafter(t, np.where(x > t, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    odd_t = (t.view(np.uint32) & 1) == 1
    return np.where(inexact & ~odd_t, other, t)


def round_to(x, dtype):
    """Round float64 values once, to nearest even, to ``dtype`` (float64, float32, float16, bfloat16, float8).

    Examples
    --------
    >>> x = np.array([1.0 + 2.0**-8 + 2.0**-40])   # just above a bfloat16 midpoint
    >>> float(round_to(x, "bfloat16")[0]) - 1.0     # 2**-7; through float32 it would tie to 1
    0.0078125
    """
    dt = low_precision_dtype(dtype) if isinstance(dtype, str) and dtype in LOW_PRECISION else np.dtype(dtype)
    x = np.asarray(x, dtype=np.float64)
    if dt in (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)):
        with np.errstate(over="ignore"):
            return x.astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        return _round_to_odd_float32(x).astype(dt)


def _as_dtype(d):
    if d is None:
        return None
    if isinstance(d, str) and d in LOW_PRECISION:
        return low_precision_dtype(d)
    if hasattr(d, "is_floating_point") and "torch" in type(d).__module__:  # a torch.dtype
        return _as_dtype(str(d).replace("torch.", ""))
    return np.dtype(d)


@dataclass(frozen=True)
class Precision:
    """Which dtype each step of an attention kernel rounds to.

    ``inputs``: q, k, v (and the upstream gradient); ``scores``: the
    accumulation of ``q k^T`` and the softmax arithmetic (running maximum,
    exponent, row sum); ``probs``: what the probabilities are rounded to
    before the value GEMM (FlashAttention rounds ``P`` to the input dtype;
    the row sum keeps the unrounded ones); ``accumulator``: the value GEMM's
    accumulator and the output before its last rounding; ``output``: the
    dtype returned.  ``exp_ulps``: the exponential's accuracy in ulps of
    ``scores`` (1 for a correctly rounded-ish ``exp``; ``__expf`` or
    ``exp2`` with a pre-scaled argument about 2).

    ``gradient_blocks``: ``None`` for a backward that keeps ``dq, dk, dv`` in
    its accumulator until the end (FlashAttention-2), or ``(queries, keys)``
    for one that adds each block's partial sum into gradients stored in the
    input dtype: ``dk, dv`` after every ``queries`` query rows, ``dq`` after
    every ``keys`` keys.  torch's CPU flash backward (``cpu_flash_attention_backward``
    in ATen) does so with GEMMs into the ``bfloat16``/``float16`` gradients:
    ``(256, 512)`` from 768 queries on, ``(64, 512)`` from 192, else ``(32, 512)``.

    Examples
    --------
    >>> p = Precision.of("bfloat16")
    >>> p.inputs.name, p.scores.name, p.probs.name, p.accumulator.name, p.output.name
    ('bfloat16', 'float32', 'bfloat16', 'float32', 'bfloat16')
    >>> Precision.of("float32").probs.name
    'float32'
    >>> Precision.of("bfloat16", gradient_blocks=(256, 512)).gradient_blocks
    (256, 512)
    """

    inputs: np.dtype
    scores: np.dtype
    probs: np.dtype
    accumulator: np.dtype
    output: np.dtype
    exp_ulps: float = 1.0
    gradient_blocks: tuple | None = None

    def __post_init__(self):
        for field in ("inputs", "scores", "probs", "accumulator", "output"):
            object.__setattr__(self, field, _as_dtype(getattr(self, field)))
            if getattr(self, field).kind != "f" and not is_low_precision(getattr(self, field)):
                raise TypeError(f"Precision.{field} must be a float dtype; got {getattr(self, field)}")
        blocks = self.gradient_blocks
        if blocks is not None:
            if len(blocks) != 2 or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in blocks):
                raise ValueError(f"Precision.gradient_blocks must be None or two positive integers (queries, keys); got {blocks!r}")
            object.__setattr__(self, "gradient_blocks", (int(blocks[0]), int(blocks[1])))

    @classmethod
    def of(cls, dtype, **overrides):
        """The usual kernel for inputs of ``dtype``: float32 scores and accumulator for
        low-precision inputs, ``P`` rounded to the input dtype, output in it; float32 and
        float64 kernels compute in their own dtype throughout."""
        dt = _as_dtype(dtype)
        wide = np.dtype(np.float32) if is_low_precision(dt) else dt
        plain = ("exp_ulps", "gradient_blocks")
        return replace(cls(dt, wide, dt, wide, dt), **{k: v if k in plain else _as_dtype(v) for k, v in overrides.items()})

    def describe(self):
        """One line for failure reports."""
        return (
            f"inputs {self.inputs.name}, scores {self.scores.name}, P rounded to {self.probs.name}, "
            f"accumulator {self.accumulator.name}, output {self.output.name}, exp {self.exp_ulps:g} ulp"
            + ("" if self.gradient_blocks is None else
               f", gradients stored every {self.gradient_blocks[0]} queries / {self.gradient_blocks[1]} keys")
        )


def infer_precision(*dtypes):
    """The default model: :meth:`Precision.of` the lowest-precision dtype among those given.

    A bfloat16 output means a bfloat16 kernel even if its inputs were passed
    upcast, and the other way round.
    """
    dts = [_as_dtype(d) for d in dtypes if d is not None]
    return Precision.of(max(dts, key=unit_roundoff))
