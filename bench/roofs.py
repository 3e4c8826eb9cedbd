"""The machine's floors for the CPU benchmarks: the kernel's own GEMMs alone, its ``exp`` alone, one read of K and V.

Not part of the package: timing floors, not results (``bench/bench_cpu.py``
and ``bench/profile_cpu.py`` use them).  They call the same BLAS entry point
(:func:`iem_ref.accel._cpu_kernels.gemm`) and the same polynomial ``exp`` as
the kernels, so that "kernel / roof" measures the kernel's overhead over the
work it cannot avoid.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from iem_ref.accel._cpu_kernels import _NOTRANS, _TRANS, gemm
from iem_ref.accel._fastexp import fexp_shifted, like

__all__ = ["gemm_roof", "exp_roof", "stream_roof"]


@njit(cache=True)
def _gemm_block(q, k, v, i0, i1, bk_max):
    bq = i1 - i0
    D = q.shape[1]
    Dv = v.shape[1]
    M = k.shape[0]
    S = np.full((bq, bk_max), 0.5, dtype=q.dtype)
    pv = np.zeros((bq, Dv), dtype=q.dtype)
    checksum = 0.0
    for jb in range(0, M, bk_max):
        bk = min(bk_max, M - jb)
        gemm(_TRANS, _NOTRANS, bk, bq, D, 1.0, k, jb * D, D, q, i0 * D, D, 0.0, S, 0, bk_max)
        gemm(_NOTRANS, _NOTRANS, Dv, bq, bk, 1.0, v, jb * Dv, Dv, S, 0, bk_max, 0.0, pv, 0, Dv)
        checksum += pv[0, 0]
    return checksum


@njit(cache=True, parallel=True)
def gemm_roof(q, k, v, bq, bk):
    """The forward kernel's BLAS calls alone (score tile and value tile per key tile, same tiles, query blocks over the cores).

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


@njit(cache=True, parallel=True, fastmath={"contract"})
def exp_roof(total, sample):
    """The kernels' polynomial ``exp`` applied ``total`` times, on cache-resident 4096-element buffers (as in the tiles).

    Each pass maps ``x -> exp(x) - 1``, which keeps ``x`` in ``(-1, 0]``; ``sample``
    (a 1-element array) fixes the dtype.  Returns a checksum.
    """
    chunk = 4096
    passes = 64
    nitems = (total + chunk * passes - 1) // (chunk * passes)
    one = like(1.0, sample[0])
    checksum = 0.0
    for c in prange(nitems):
        buf = np.empty(chunk, dtype=sample.dtype)
        for j in range(chunk):
            buf[j] = -(j % 97) * like(0.01, sample[0])
        for _ in range(passes):
            for j in range(chunk):
                buf[j] = fexp_shifted(buf[j]) - one
        checksum += buf[c % chunk]
    return checksum


@njit(cache=True, parallel=True, fastmath=True)
def stream_roof(k, v):
    """Read ``k`` and ``v`` once, in parallel (a sum): the memory-bandwidth floor of decoding. Returns the checksum.

    ``fastmath=True`` lets the sum vectorise; this is a timing floor, not a result (no inf/NaN semantics needed).
    """
    M = k.shape[0]
    chunk = 4096
    n = (M + chunk - 1) // chunk
    checksum = 0.0
    for c in prange(n):
        s = 0.0
        for j in range(c * chunk, min(M, (c + 1) * chunk)):
            for d in range(k.shape[1]):
                s += k[j, d]
            for d in range(v.shape[1]):
                s += v[j, d]
        checksum += s
    return checksum
