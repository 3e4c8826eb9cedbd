"""A user's score_mod (FlexAttention's, F1) as the CPU kernels call it: compiled once per function, with its slope (F3).

:func:`kernel_mod` turns an :class:`iem_ref.flex.ScoreMod` into a
:class:`~iem_ref.accel._cpu_kernels.KernelMod`, which a kernel instance
binds as its compile-time ``SCORE_MOD`` and ``SCORE_SLOPE``
(:class:`~iem_ref.accel._cpu_kernels.Features`).  The key of the cache
below is what decides the compiled code, so that a ready-made mod made
twice (``flex.softcap(20.0)``) compiles its kernels once per process.
"""

from __future__ import annotations

import threading
import types

import numba
import numpy as np
from numba import njit

from ._cpu_kernels import KernelMod

__all__ = ["kernel_mod"]

_MODS = {}
_MODS_LOCK = threading.Lock()
_MOD_SIG = (numba.types.float64, numba.types.int64, numba.types.int64, numba.types.int64, numba.types.int64)


def kernel_mod(score_mod):
    """A :class:`~iem_ref.flex.ScoreMod` as the kernels call it (F1, F3): a :class:`~iem_ref.accel._cpu_kernels.KernelMod`, or None.

    ``fn`` (and ``grad``) compiled by ``numba.njit`` as scalar functions of
    ``(x: float64, b, h, q_idx, kv_idx: int64)``; without ``grad`` the slope
    is the complex step ``Im fn(x + i h) / h`` (:data:`iem_ref.flex.COMPLEX_STEP`),
    the reference's, so ``fn`` must also compile for a complex ``x``.  Made
    once per function (the kernels compiled with it are kept per process,
    never in Numba's on-disk cache).  A function Numba cannot compile is a
    TypeError naming the score_mod.
    """
    if score_mod is None:
        return None
    key = (_function_key(score_mod.fn), _function_key(score_mod.grad), float(score_mod.ulps))
    with _MODS_LOCK:
        km = _MODS.get(key)
        if km is None:
            km = _MODS[key] = _compile_mod(score_mod, len(_MODS))
    return km


def _function_key(f):
    """What decides a score_mod's compiled code: its code object and the numbers it closes over, so that
    ``flex.softcap(20.0)`` made twice compiles once; a function closing over anything else (an array) is its own
    key (by identity, kept alive by the cache)."""
    if not isinstance(f, types.FunctionType):
        return f
    cells = [cell.cell_contents for cell in f.__closure__ or ()]
    if not all(isinstance(c, (bool, int, float, complex, str, np.number)) or c is None for c in cells):
        return f
    return (f.__code__, id(f.__globals__), tuple((type(c).__name__, c) for c in cells))


def _compile_mod(score_mod, serial):
    from ..flex import COMPLEX_STEP

    def jitted(f):
        return f if isinstance(f, numba.core.registry.CPUDispatcher) else njit(f)

    fn = jitted(score_mod.fn)
    if score_mod.grad is not None:
        slope = jitted(score_mod.grad)
    else:
        @njit
        def slope(x, b, h, q_idx, kv_idx):
            return fn(complex(x, COMPLEX_STEP), b, h, q_idx, kv_idx).imag / COMPLEX_STEP
    for what, f in (("score_mod", fn), ("its slope (the complex step, or grad)", slope)):
        try:
            f.compile(_MOD_SIG)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TypeError(f"iem_ref.accel.cpu compiles score_mod with numba.njit as a scalar function "
                            f"f(score: float64, b, h, q_idx, kv_idx: int64); {what} did not compile: {first}") from None
    return KernelMod(fn, slope, serial, float(score_mod.ulps))
