"""What the CPU kernels run on: the CPU's vector instructions, the BLAS behind their tiles, and the kernel set it picked.

:mod:`iem_ref.accel.cpu` multiplies its tiles with SciPy's OpenBLAS, so its
speed on a machine is mostly that GEMM's speed there.  OpenBLAS picks one of
its kernel sets for the CPU as it loads, unless the environment variable
``OPENBLAS_CORETYPE`` names one.  A set below the CPU's instructions costs
much: on a 2-core AMD EPYC with AVX-512 (family 26), OpenBLAS's AVX-512
``SkylakeX`` GEMM ran the forward kernel's tiles 1.5x (float64) and 1.8x
(float32) faster than its AVX2 ``Haswell`` one (``bench/results/gemm_cores.md``).
:func:`describe` reports what is in use and says when that is the case
(``iem-ref machine`` prints it).
"""

from __future__ import annotations

import os

__all__ = ["describe", "advice"]

#: OpenBLAS's x86 kernel sets that use AVX-512 (``threadpoolctl``'s ``architecture`` names).
AVX512_SETS = frozenset({"SkylakeX", "Cooperlake", "SapphireRapids"})
#: The AVX-512 subsets those kernels need (``/proc/cpuinfo`` flag names).
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
#: OpenBLAS's settings that override what it reads from the CPU.
OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def _cpu():
    """``(model name, flags)`` of the first processor in ``/proc/cpuinfo`` (``(None, frozenset())`` where there is none)."""
    model, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key == "flags":
                    flags = frozenset(val.split())
                    break
    except OSError:
        pass
    return model, flags


def _kernels_blas():
    """threadpoolctl's record of the BLAS that the kernels call (SciPy's), or None."""
    import scipy.linalg.cython_blas  # noqa: F401  (the kernels' BLAS: loads it if nothing has yet)
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    scipys = [i for i in found if os.path.basename(i.get("filepath", "")).startswith("libscipy_openblas-")]
    return (scipys or found or [None])[0]


def advice(flags, architecture, environ):
    """A sentence when the BLAS runs a kernel set below the CPU's vector instructions, else None.

    ``flags``: the CPU's flags; ``architecture``: the kernel set the BLAS
    reports (``"Haswell"``, ``"SkylakeX"``, ...; None if unknown);
    ``environ``: the environment (for ``OPENBLAS_CORETYPE``).

    >>> advice({"avx2"}, "Haswell", {}) is None
    True
    >>> print(advice({"avx2"} | AVX512_FLAGS, "Haswell", {"OPENBLAS_CORETYPE": "Haswell"}))
    OPENBLAS_CORETYPE=Haswell makes OpenBLAS run its Haswell kernels on this AVX-512 CPU; without it OpenBLAS picks its kernels for the CPU (AVX-512 kernels were 1.5-1.8x faster on the kernels' tiles on an AVX-512 AMD EPYC).
    """
    if architecture is None or not AVX512_FLAGS <= set(flags) or architecture in AVX512_SETS:
        return None
    gain = "AVX-512 kernels were 1.5-1.8x faster on the kernels' tiles on an AVX-512 AMD EPYC"
    forced = environ.get("OPENBLAS_CORETYPE")
    if forced:
        return (f"OPENBLAS_CORETYPE={forced} makes OpenBLAS run its {architecture} kernels on this AVX-512 CPU; "
                f"without it OpenBLAS picks its kernels for the CPU ({gain}).")
    return (f"OpenBLAS runs its {architecture} kernels on this AVX-512 CPU; "
            f"OPENBLAS_CORETYPE=SkylakeX, set before Python starts, selects its AVX-512 ones ({gain}).")


def describe():
    """What the CPU kernels run on, as a dict.

    Keys: ``cpu`` (model name), ``vector`` (``"avx512"``, ``"avx2"`` or
    ``"other"``), ``cores``, ``numba_threads``, ``blas`` (library, version,
    kernel set, file: threadpoolctl's record of SciPy's BLAS), ``overrides``
    (OpenBLAS's variables set in the environment) and ``advice`` (see
    :func:`advice`; None when nothing is amiss).
    """
    import numba

    model, flags = _cpu()
    info = _kernels_blas()
    arch = None if info is None else info.get("architecture")
    blas = None if info is None else {
        "library": info.get("internal_api"), "version": info.get("version"), "kernels": arch,
        "file": os.path.basename(info.get("filepath", "")),
    }
    vector = "avx512" if AVX512_FLAGS <= flags else ("avx2" if "avx2" in flags else "other")
    return {
        "cpu": model, "vector": vector, "cores": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "blas": blas, "overrides": {k: os.environ[k] for k in OVERRIDES if k in os.environ},
        "advice": advice(flags, arch, os.environ),
    }
