"""Input validation shared by every public function (reference, exact, accel).

Public functions call these once at the boundary, then compute on clean
float arrays.  The rules (README, "API conventions"):

- float32 stays float32, float64 stays float64; integers are promoted to
  float64; a mix of float32 and float64 (or integers) gives float64.
- float16, bfloat16 and the float8 types (``ml_dtypes``) are upcast exactly
  (every value is a float32) and the results rounded once to the widest
  input dtype: float8 < {float16, bfloat16} < float32 < float64, with
  float16 and bfloat16 together giving float32.
- bool is accepted only as a mask; complex, object, string and longdouble
  inputs raise ``TypeError`` naming the argument.
- ``tau`` is a real scalar with ``tau > 0``; ``tau = inf`` is allowed (the
  uniform limit); ``tau <= 0`` or NaN raise ``ValueError`` (the hard limit has
  its own functions).
- shape errors are ``ValueError`` naming the arguments and their shapes.
"""

from __future__ import annotations

import numbers

import numpy as np

from .precision import LOW_PRECISION, round_to

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_RANK = {"float8_e4m3fn": 0, "float8_e5m2": 0, "float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}


def as_float_array(x, name):
    """Return ``x`` as a float32/float64 ndarray, or raise ``TypeError``.

    Integers (and Python ints/floats) become float64; float32 and float64 are
    kept.  Everything else (bool, complex, object, strings, float16,
    longdouble) is refused with a message naming ``name``.
    """
    arr = np.asarray(x)
    dt = arr.dtype
    if dt in _FLOATS or dt.name in LOW_PRECISION:
        return arr
    if dt.kind == "f" and dt.newbyteorder("=") in _FLOATS:  # a non-native byte order: the same values, native
        return arr.astype(dt.newbyteorder("="))
    if dt.kind in "iu":
        return arr.astype(np.float64)
    if dt.kind == "b":
        raise TypeError(f"{name} must be a real float array; got dtype bool (bool is accepted only as a mask)")
    raise TypeError(f"{name} must be a real float64/float32/float16/bfloat16/float8 (or integer) array; got dtype {dt}")


def result_dtype(*arrays):
    """The widest input dtype (module docstring); float16 with bfloat16 gives float32."""
    dts = [a.dtype for a in arrays]
    top = max(_RANK[d.name] for d in dts)
    widest = {d for d in dts if _RANK[d.name] == top}
    if len(widest) > 1:  # float16 and bfloat16, or the two float8 types: neither holds the other
        return np.dtype(np.float32) if top == 1 else np.dtype(np.float16)
    return widest.pop()


def to_dtype(x, dtype):
    """Round float64 results once to the output dtype (low-precision dtypes without double rounding)."""
    return np.asarray(round_to(np.asarray(x, dtype=np.float64), dtype))


def check_tau(tau, name="tau"):
    """Return ``tau`` as a Python float; ``0 < tau <= inf``."""
    if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, (numbers.Real, np.floating, np.integer)):
        if isinstance(tau, np.ndarray) and tau.ndim == 0 and tau.dtype.kind in "fiu":
            tau = tau.item()
        else:
            raise TypeError(f"{name} must be a real scalar; got {type(tau).__name__}")
    tau = float(tau)
    if not tau > 0:  # also catches NaN
        raise ValueError(
            f"{name} must be > 0 (tau = inf gives the uniform limit; use the hard_* functions "
            f"for the zero-temperature limit); got {tau!r}"
        )
    return tau


def check_scale(scale, head_dim, name="scale"):
    """Attention's inverse temperature: ``None`` means ``1/sqrt(D)``; ``0 <= scale < inf``.

    Returns the temperature ``tau = 1/scale`` (``inf`` for ``scale = 0``).
    """
    if scale is None:
        if head_dim == 0:
            raise ValueError("scale=None needs a feature dimension D > 0 to form 1/sqrt(D); got D = 0")
        return float(np.sqrt(head_dim))
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real scalar or None; got {type(scale).__name__}")
    scale = float(scale)
    if not (scale >= 0 and np.isfinite(scale)):
        raise ValueError(
            f"{name} must be finite and >= 0 (scale = 0 gives uniform weights; use hard_attention "
            f"for the zero-temperature limit); got {scale!r}"
        )
    return np.inf if scale == 0 else 1.0 / scale


def check_positive(value, name):
    """A kernel parameter (width, scale, degrees of freedom): a finite real scalar > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real scalar; got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    return value


def check_axis(axis, ndim, name="axis"):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimension(s)")
    return int(axis) % ndim


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}")
    return value


def as_mask(mask, shape, name="mask"):
    """Broadcast a boolean mask (True = the hypothesis takes part) to ``shape``."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array (True = takes part); got dtype {m.dtype}")
    try:
        return np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {m.shape} does not broadcast to the energies' shape {tuple(shape)}") from None


def need_ndim(x, name, ndim, what):
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimension(s) {what}; got shape {x.shape}")


def check_summary_inputs(d, v, mask, empty):
    """The softmin summary's arguments (every path): ``d (..., N, M)``, ``v (..., M, Dv)``, a mask for ``d``.

    Returns float ``d``, ``v`` and the broadcast mask (or None).
    """
    check_choice(empty, "empty", {"zero", "nan"})
    d = as_float_array(d, "d")
    v = as_float_array(v, "v")
    need_ndim(d, "d", 2, "(..., N, M)")
    need_ndim(v, "v", 2, "(..., M, Dv)")
    if d.shape[-1] != v.shape[-2]:
        raise ValueError(f"d (..., N, M) and v (..., M, Dv) disagree on M: d has shape {d.shape}, v has shape {v.shape}")
    return d, v, as_mask(mask, d.shape, "mask")


def check_sign_pair(d_plus, d_minus):
    """The two energies of a scalar unit (S2, S3): float arrays that broadcast.

    Returns the broadcast ``d_plus``, ``d_minus`` and the output dtype.
    """
    d_plus = as_float_array(d_plus, "d_plus")
    d_minus = as_float_array(d_minus, "d_minus")
    try:
        dp, dm = np.broadcast_arrays(d_plus, d_minus)
    except ValueError:
        raise ValueError(f"d_plus {d_plus.shape} and d_minus {d_minus.shape} do not broadcast") from None
    return dp, dm, result_dtype(d_plus, d_minus)


def check_grad_out(grad_out, batch, n, dv):
    """G4's upstream gradient: ``(B..., N, Dv)``, batch axes broadcasting to ``batch``."""
    u = as_float_array(grad_out, "grad_out")
    if u.shape[-2:] != (n, dv):
        raise ValueError(f"grad_out must have shape (B..., N, Dv) = (..., {n}, {dv}); got {u.shape}")
    try:
        np.broadcast_to(u, batch + (n, dv))
    except ValueError:
        raise ValueError(f"grad_out {u.shape} does not broadcast to the batch shape {batch}") from None
    return u


def broadcast_batch(named, trailing):
    """Broadcast the leading (batch) axes of several arrays.

    ``named`` is a list of ``(name, array)``; ``trailing`` the number of
    trailing core axes of each.  Returns the arrays with common batch shape,
    or raises ``ValueError`` naming every argument and its shape.
    """
    batches = [a.shape[: a.ndim - t] for (_, a), t in zip(named, trailing)]
    try:
        batch = np.broadcast_shapes(*batches)
    except ValueError:
        desc = ", ".join(f"{n} {a.shape}" for n, a in named)
        raise ValueError(f"leading (batch) axes do not broadcast: {desc}") from None
    out = [np.broadcast_to(a, batch + a.shape[a.ndim - t :]) for (_, a), t in zip(named, trailing)]
    return batch, out


def kernel_dtype(**arrays):
    """The accelerated paths' dtype: float32 or float64 (``result_dtype``); low-precision inputs are ``TypeError``.

    The compiled kernels compute in the inputs' dtype; for float16, bfloat16
    and float8 use the reference (or upcast: every such value is a float32).
    """
    for name, a in arrays.items():
        if a.dtype.name in LOW_PRECISION:
            raise TypeError(
                f"{name} has dtype {a.dtype}: the accelerated paths take float32/float64 "
                f"(upcast exactly with .astype(np.float32), or use the reference, which takes {a.dtype})"
            )
    return result_dtype(*arrays.values())
