"""Threads, memory and index width of the accelerated paths.

- Concurrency: calls from several Python threads at once, and after changing
  Numba's thread count, give bitwise the results of sequential calls.
- Resources: 10,000 calls of the CPU path leave the resident memory flat; a
  request too large to allocate raises ``MemoryError`` and the next call works.
- Index width: the kernels form element offsets in 64-bit integers.  CPU
  (:mod:`iem_ref.accel._cpu_kernels`): every offset (``jb * D``, ``i0 * D``,
  ``jb * Dv`` passed to BLAS, the mask's ``[i, j]``, the batch maps) is a Numba
  ``int64`` and reaches BLAS as a 64-bit pointer offset; only the tile sizes
  and leading dimensions (at most 2048 and ``D``, ``Dv``) are passed as BLAS'
  32-bit integers.  CUDA (:mod:`iem_ref.accel._cuda_kernels`): global offsets
  ``xo + i * xr + c * xc`` are ``int64`` and index as ``uint64``; 32-bit
  indices (``uint32``) address shared memory only.  The ``slow`` test runs a
  decoding shape with ``M * D > 2**31`` in float32 on the CPU (8 GiB of keys,
  zero pages that are never written: little resident memory).
"""

from __future__ import annotations

import gc
import importlib
import threading

import numba
import numpy as np
import pytest

from tests.conftest import CUDA_SIMULATED


def _inputs(rng, dtype, N=33, M=300, D=8, Dv=4):
    q = rng.standard_normal((2, N, D)).astype(dtype)
    k = rng.standard_normal((2, M, D)).astype(dtype)
    v = rng.standard_normal((2, M, Dv)).astype(dtype)
    g = rng.standard_normal((2, N, Dv)).astype(dtype)
    mask = rng.random((N, M)) < 0.8
    return q, k, v, g, mask


def _calls(mod, q, k, v, g, mask):
    """Every entry point once: forward with L, causal forward, softmin_summary, the backward, an activation."""
    out = list(mod.attention(q, k, v, mask=mask, return_lse=True))
    out.append(mod.attention(q, k, v, is_causal=True, causal_alignment="bottom_right", energy="sqeuclidean"))
    out.extend(mod.softmin_summary(q[..., :1] - k[..., 0][:, None, :], v))
    out.extend(mod.attention_vjp(q, k, v, g, mask=mask))
    out.append(mod.softplus(q, 0.5))
    return out


def _bitwise_equal(xs, ys):
    return len(xs) == len(ys) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(xs, ys))


@pytest.mark.parametrize("path", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threads_give_bitwise_the_sequential_results(path, dtype, rng):
    if path == "cuda" and CUDA_SIMULATED:
        pytest.skip("needs a GPU: Numba's CUDA simulator keeps one launch's thread state process-wide, so it cannot run launches from several Python threads")
    mod = importlib.import_module(f"iem_ref.accel.{path}")
    small = False
    cases = [_inputs(rng, dtype, *((3, 9, 2, 2) if small else ())) for _ in range(4)]
    sequential = [_calls(mod, *c) for c in cases]
    results = [None] * len(cases)
    errors = []
    start = threading.Barrier(len(cases))

    def work(t):
        try:
            start.wait()
            for _ in range(1 if small else 3):
                results[t] = _calls(mod, *cases[t])
                assert _bitwise_equal(results[t], sequential[t]), f"thread {t} differs from the sequential call"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    if path == "cpu":  # after changing Numba's thread count, sequentially and from threads again
        before = numba.get_num_threads()
        try:
            for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                numba.set_num_threads(n)
                assert all(_bitwise_equal(_calls(mod, *c), s) for c, s in zip(cases, sequential)), f"{n} threads"
            numba.set_num_threads(1)
            threads = [threading.Thread(target=work, args=(t,)) for t in range(len(cases))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert not errors, errors
        finally:
            numba.set_num_threads(before)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_ten_thousand_calls_leave_resident_memory_flat(rng):
    """10,000 CPU calls (forward, summary, backward, activation): resident memory grows by less than 16 MiB.

    A leak of the per-call buffers (tiles, partials, outputs: tens of KiB per call here) over 10,000
    calls would be hundreds of MiB; 16 MiB is allocator noise (arenas, the import of lazy modules).
    """
    from iem_ref.accel import cpu

    q, k, v, g, mask = _inputs(rng, np.float32, N=4, M=40, D=4, Dv=2)
    for _ in range(50):  # warm: compiled kernels, thread pool, BLAS controller, allocator arenas
        cpu.attention(q, k, v, mask=mask, return_lse=True)
    gc.collect()
    base = _rss_bytes()
    for i in range(10_000):
        which = i % 4
        if which == 0:
            cpu.attention(q, k, v, mask=mask, return_lse=True)
        elif which == 1:
            cpu.softmin_summary(q[..., :1] - k[..., 0][:, None, :], v)
        elif which == 2:
            cpu.attention_vjp(q, k, v, g)
        else:
            cpu.softplus(q)
    gc.collect()
    grown = _rss_bytes() - base
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 10,000 calls"


def test_memory_error_then_the_next_call_works(rng):
    """A CPU request too large to allocate raises MemoryError (no crash, no other error); the next call works."""
    from iem_ref.accel import cpu as mod

    q = np.zeros((1, 2, 1))
    k = np.zeros((1, 3, 1))
    # a broadcast (zero-stride) batch of 2**40 value matrices: the output would need 2**40 * 2 * 2**10 * 8 bytes
    v = np.broadcast_to(np.zeros((3, 2**10)), (2**40, 3, 2**10))
    with pytest.raises(MemoryError):
        mod.attention(q, k, v)
    q2, k2, v2, _, _ = _inputs(rng, np.float64, 3, 5, 2, 2)
    a = mod.attention(q2, k2, v2)
    import iem_ref

    np.testing.assert_allclose(a, iem_ref.attention(q2, k2, v2), rtol=0, atol=1e-12)  # a plain call: sanity, not accuracy


@pytest.mark.slow
def test_decoding_with_m_times_d_beyond_2_to_31_float32():
    """M * D = 2**31 + 64 float32 keys (8 GiB, zero pages: never written, little resident memory).

    All keys are 0 but the last, whose score is 100: the output is its value and ``L = 100`` (the
    other 2**25 weights add ``2**25 e^-100 ~ 1e-36``, below float32's resolution at 1 and 100).
    A 32-bit offset ``jb * D`` would wrap and read the wrong keys.
    """
    from iem_ref.accel import cpu

    D = 64
    M = 2**25 + 1
    k = np.zeros((M, D), np.float32)
    k[-1, 0] = 100.0
    v = np.zeros((M, 1), np.float32)
    v[-1, 0] = 3.0
    q = np.zeros((1, D), np.float32)
    q[0, 0] = 1.0
    assert M * D > 2**31
    a, L = cpu.attention(q, k, v, scale=1.0, return_lse=True)
    assert a[0, 0] == np.float32(3.0) and L[0] == np.float32(100.0)
