"""Compiling the CPU kernels on first use: Numba's on-disk cache, a one-time notice, and ahead-of-time warm-up.

A kernel is compiled for one dtype when a call first needs it (about 4.5 s
each on a 2-core VM: ``bench/first_call.py``), then loaded from Numba's cache by later processes
(well under a second).  The cache lives in ``__pycache__`` beside the
package's modules, or under ``NUMBA_CACHE_DIR`` when that environment
variable is set (needed where the installed package is read-only).
:func:`iem_ref.accel.cpu.warmup` (``iem-ref warmup``) compiles everything ahead of time.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

from numba import njit

__all__ = ["CompilationNotice", "INNER", "compile_kernel", "cache_dir"]

#: ``@njit`` options of the helpers that only other kernels call: no CPython or C wrapper.  Numba builds
#: both for every function it compiles, and for the kernels' twenty-odd helpers that was a fifth of a
#: first call (float64 forward, 2-core AMD EPYC family 26: 5.5 s -> 4.5 s of CPU time).  Such a function
#: must never be called from Python: it has no entry point there (Numba crashes, numba/numba#2541), so
#: every one of them has a leading underscore and is called from ``@njit`` code only.
INNER = {"cache": True, "no_cpython_wrapper": True, "no_cfunc_wrapper": True}


class CompilationNotice(UserWarning):
    """Issued once per process, when a kernel is first compiled rather than loaded from the cache."""


_NOTICE_LOCK = threading.Lock()
_NOTICED = False


def cache_dir(dispatcher=None):
    """Where Numba caches the kernels: ``NUMBA_CACHE_DIR`` if set, else the ``__pycache__`` beside the modules."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return env
    if dispatcher is not None:
        try:
            return dispatcher._cache._cache_path  # Numba's own choice (it falls back to a user folder if the package is read-only)
        except AttributeError:
            pass
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def _in_cache(dispatcher, sig):
    try:
        return dispatcher._cache.load_overload(sig, dispatcher.targetctx) is not None
    except Exception:  # a private Numba API: if it moves, only the notice is lost, never a result
        return False


def _caller_level():
    """The ``stacklevel`` of the first frame outside ``iem_ref``: the notice names the user's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def compile_kernel(py_func, sig, label, **options):
    """``njit(sig, cache=True, **options)(py_func)``, with a :class:`CompilationNotice` the first time anything compiles."""
    global _NOTICED
    disp = njit(cache=True, **options)(py_func)
    if not _in_cache(disp, sig):
        with _NOTICE_LOCK:
            if not _NOTICED:
                _NOTICED = True
                warnings.warn(
                    f"iem_ref.accel.cpu: compiling the {label} kernel (several seconds, once per kernel and dtype); "
                    f"cached in {cache_dir(disp)} for later processes (set NUMBA_CACHE_DIR to move it; "
                    f"`iem-ref warmup` compiles every kernel ahead of time)",
                    CompilationNotice,
                    stacklevel=_caller_level(),
                )
    disp.compile(sig)
    disp.disable_compile()  # as njit(sig) does: calls convert to this one signature, never compile another
    return disp
