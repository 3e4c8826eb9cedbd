"""Compiling the CPU kernels: one kernel per feature set, helpers that exist only inside kernels, Numba's on-disk cache.

Three ideas keep a first call short (``bench/first_call.py`` has the figures
per machine):

* **A kernel per feature set.**  A kernel's helpers are written once, as
  :class:`Template` functions that read compile-time constants (the CPU
  kernels' ``ENERGY`` and ``VARIANTS``).  :func:`instantiate` binds one set of constants into
  copies of every template, the way a C++ template is instantiated: Numba
  sees the constants as globals and prunes the branches they switch off
  before it types the code, so a plain call compiles none of the variants'
  code.  Each instance is compiled when a call first needs it.
* **Helpers linked, never compiled on their own.**  Numba compiles every
  ``@njit`` function it calls into a library of its own (optimised, then
  turned into machine code), and links a copy of it into each caller, which
  optimises it again: a helper four calls deep was optimised and turned into
  machine code five times.  The helpers here (``**INNER``) go through
  :class:`LinkedCompiler`, whose libraries stop after Numba's per-function
  optimisation: the kernel that links them optimises and compiles them once,
  with their callers.  Measured alone, three pairs in turns, the plain
  float64 forward on a 2-core AMD EPYC Zen 4 (family 25 model 17) under a
  steady load: 19.3-19.6 s with the helpers compiled on their own,
  10.7-14.6 s linked.  This leans on three of Numba's internals (a
  ``JITCodeLibrary``'s finalising steps, its ``codegen`` property, and the
  compiler state's ``library``, which the native lowering pass fills only
  where it is empty); ``tests/test_cpu_kernels.py`` checks that the helpers
  still compile into linked libraries and the kernels still agree with the
  reference.
* **No overload compiled for a scratch buffer or a cast.**  ``np.empty``,
  ``np.zeros`` and a float cast written as overloads have their
  implementations compiled through Numba's whole pipeline once per type:
  eight small functions per kernel.  The kernels allocate through
  intrinsics (``_cpu_kernels.scratch``, ``zeros``: Numba's own
  ``_empty_nd_impl``, a fourth internal) and cast with the intrinsic
  ``_fastexp.like``: 41 compilations become 33 for the plain forward, and
  the first calls 5-31% shorter in turns on the same Zen 4
  (``bench/results/first_call.md``, "allocation intrinsics").
* **Numba's cache** keeps each kernel instance's machine code (well under a
  second to load).  It lives in ``__pycache__`` beside the package's
  modules, or under ``NUMBA_CACHE_DIR`` when that variable is set (needed
  where the installed package is read-only).  ``iem-ref warmup`` compiles
  chosen instances ahead of time.
"""

from __future__ import annotations

import os
import sys
import threading
import types as pytypes
import warnings

from numba import njit
from numba.core.codegen import JITCodeLibrary
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import LoweringPass, register_pass
from numba.core.typed_passes import AnnotateTypes

__all__ = ["CompilationNotice", "INNER", "LinkedCompiler", "Template", "template", "instantiate", "compile_kernel", "cache_dir"]


# --- helpers that exist only inside the kernels ------------------------------------------------------
class _LinkedLibrary(JITCodeLibrary):
    """A helper's code library: kept as LLVM IR (each function optimised alone), for callers to link, optimise and compile.

    Numba finalises a library by optimising its whole module, handing it to
    the JIT engine and emitting machine code; a caller then links a copy of
    the module and does all of it again.  Here finalising only marks the
    library done: the optimisation and the machine code are the caller's.
    No machine code exists for the helper itself, so it has no entry point
    (its function pointer is 0) and no environment to set (the kernels'
    helpers never reach Python objects).
    """

    def _optimize_final_module(self):
        pass

    def _finalize_final_module(self):
        self._finalize_dynamic_globals()
        self._verify_declare_only_symbols()
        self._finalized = True

    @property
    def codegen(self):
        return _NoEnvironment(self._codegen)


class _NoEnvironment:
    """The code generator as a linked library sees it: everything as usual, but no environment to set.

    A linked library never reaches the JIT engine, so its environment global
    has no address; in a kernel the helper's copy of it stays null and is
    never read: the environment serves Python objects, and no helper touches one.
    """

    def __init__(self, codegen):
        self._codegen = codegen

    def set_env(self, env_name, env):
        pass

    def __getattr__(self, name):
        return getattr(self._codegen, name)


@register_pass(mutates_CFG=False, analysis_only=False)
class _UseLinkedLibrary(LoweringPass):
    """Lower the helper into a :class:`_LinkedLibrary` (the native lowering pass creates a library only where none is set)."""

    _name = "iem_ref_linked_library"

    def __init__(self):
        LoweringPass.__init__(self)

    def run_pass(self, state):
        state.library = _LinkedLibrary(state.targetctx.codegen(), state.func_id.func_qualname)
        return True


class LinkedCompiler(CompilerBase):
    """Numba's nopython pipeline, lowering into a :class:`_LinkedLibrary` (``@njit(pipeline_class=LinkedCompiler)``)."""

    def define_pipelines(self):
        pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pm.add_pass_after(_UseLinkedLibrary, AnnotateTypes)
        pm.finalize()
        return [pm]


#: ``@njit`` options of the helpers that only other kernels call: linked into their callers (:class:`LinkedCompiler`),
#: no CPython or C wrapper, no cache of their own (the kernels' cache holds them).  Such a function has no entry
#: point: it must never be called from Python (Numba crashes, numba/numba#2541), so every one of them has a leading
#: underscore and is called from ``@njit`` code only.
INNER = {"pipeline_class": LinkedCompiler, "no_cpython_wrapper": True, "no_cfunc_wrapper": True}


# --- a kernel per feature set ----------------------------------------------------------------------
class Template:
    """A kernel function compiled per feature set: :func:`instantiate` makes a compiled copy for each set of constants.

    Calling the template itself is an error: it reads constants (``ENERGY``,
    ``VARIANTS``) that only an instance binds.
    """

    def __init__(self, py_func, options):
        self.py_func = py_func
        self.options = options
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__doc__ = py_func.__doc__
        self.__module__ = py_func.__module__
        self.__wrapped__ = py_func

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.__qualname__} is a kernel template: only its instances (iem_ref.accel._compile.instantiate) run")

    def __repr__(self):
        return f"<kernel template {self.__module__}.{self.__qualname__}>"


def template(**options):
    """Decorator: the function becomes a :class:`Template`, each instance compiled with these ``@njit`` options."""

    def mark(fn):
        return Template(fn, options)

    return mark


def instantiate(namespace, constants, tag, cache=True):
    """Every :class:`Template` of ``namespace`` (a module's globals) compiled with the compile-time ``constants``.

    Returns the instance's namespace: ``namespace`` with ``constants`` bound
    and each template replaced by a Numba dispatcher of a copy of its
    function, whose globals are this namespace, so that the copies call
    each other.  Numba reads a global as a constant and prunes the branches
    it decides before typing.  The copies are named ``<name>__<tag>``:
    Numba's cache keys a function by its name, its bytecode and its
    signature, identical across instances, so the name keeps each instance's
    cache entry its own.  Compilation happens when an instance is first called
    (or :func:`compile_kernel` asks for it).  ``cache=False``: no instance
    goes to Numba's on-disk cache (one that calls a user's function, whose
    changes the cache would not see).
    """
    scope = dict(namespace)
    scope.update(constants)
    for name, value in namespace.items():
        if isinstance(value, Template):
            py = value.py_func
            fn = pytypes.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
            fn.__qualname__ = f"{py.__qualname__}__{tag}"
            fn.__module__ = py.__module__
            fn.__doc__ = py.__doc__
            options = dict(value.options, cache=False) if not cache and "cache" in value.options else value.options
            scope[name] = njit(**options)(fn)
    return scope


# --- the on-disk cache and the first-compile notice ------------------------------------------------
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


def compile_kernel(disp, sig, label):
    """Compile the dispatcher ``disp`` (``cache=True``) for ``sig`` alone, with a :class:`CompilationNotice` the first time anything compiles."""
    global _NOTICED
    if not _in_cache(disp, sig):
        with _NOTICE_LOCK:
            if not _NOTICED:
                _NOTICED = True
                persistent = type(getattr(disp, "_cache", None)).__name__ != "NullCache"
                where = (f"cached in {cache_dir(disp)} for later processes (set NUMBA_CACHE_DIR to move it; "
                         f"`iem-ref warmup` compiles kernels ahead of time)" if persistent
                         else "kept for this process only: it calls a user's function")
                warnings.warn(
                    f"iem_ref.accel.cpu: compiling the {label} kernel (seconds, once per kernel, dtype and variant set); {where}",
                    CompilationNotice,
                    stacklevel=_caller_level(),
                )
    disp.compile(sig)
    disp.disable_compile()  # as njit(sig) does: calls convert to this one signature, never compile another
    return disp
