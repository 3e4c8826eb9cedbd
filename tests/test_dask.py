"""``iem_ref.dask``: attention and the softmin summary on Dask, block partials merged by M2 in a fixed tree.

What is checked, and against what:

- agreement: with ``backend="cpu"`` each block runs the one-machine CPU
  kernel with the whole problem's tiles, so the result obeys the CPU path's
  own bound (:func:`iem_ref.bounds.attention_bounds`) with the merge levels
  it adds beyond the one-call kernel's tile count
  (:func:`iem_ref.bounds.merge_bounds`): against the reference
  ``a_bound + da``, against the one-call ``accel.cpu`` ``2 a_path + da``
  (each side against the exact result).  With ``backend="reference"`` the
  blocks' partials are :func:`iem_ref.streaming.partial_posterior`'s, and
  the tree merge is compared with the one-machine chain merge of the same
  partials (``tree_depth(C)`` and ``C - 1`` levels, each side's finish
  added: a division, ``u64 |a|``; a ``log`` within 1 ulp of ``log l <= log M``
  and an addition, ``2 u64 log M + u64 |L|``; ``-m/tau`` is the same float
  on both sides, ``m`` being a minimum);
- bitwise reproducibility for a fixed chunking: synchronous, threaded and
  ``distributed`` runs give the same bits, also after a worker process is
  killed mid-computation;
- the README's edge-case policy, chunked (both backends against the
  one-machine functions), and that causally excluded or fully masked blocks
  are never scheduled (tasks counted in the graph);
- bad input: ``ValueError`` / ``TypeError`` naming the argument.

Shapes are small: the tests run the synchronous or threaded scheduler, and
one module fixture starts a two-process ``LocalCluster`` on the loopback.
"""

import math
import os
import signal
import time

import dask
import dask.array as da
import numpy as np
import pytest

import iem_ref
from iem_ref import bounds
from iem_ref import dask as idk
from iem_ref.accel import cpu
from iem_ref.streaming import finalize_partial, merge_partials, partial_posterior
from tests.conftest import REPO


def cpu_arithmetic():
    """The CPU path's own arithmetic (:func:`iem_ref.accel.cpu.arithmetic`), imported when a bound is formed."""
    from iem_ref.accel import cpu

    return cpu.arithmetic()

U64 = bounds.U64


def _bits(*arrays):
    return tuple(np.ascontiguousarray(a).tobytes() for a in arrays)


def _spreads(r, v, a):
    """Section 9's ``P = sum_j r_j |v_j|``, ``W = sum_j r_j |v_j - a|``, ``V = max_j |v_j|`` (float64, finite inputs)."""
    r, v, a = (np.asarray(z, np.float64) for z in (r, v, a))
    P = r @ np.abs(v)
    W = np.einsum("...nm,...nmc->...nc", r, np.abs(v[..., None, :, :] - a[..., :, None, :]))
    V = np.broadcast_to(np.abs(v).max(axis=-2, keepdims=True, initial=0.0), P.shape)
    return P, W, V


def _extra_levels(mchunks, bk, M):
    within = max(-(-c // bk) for c in mchunks) - 1
    return max(0, within + bounds.tree_depth(len(mchunks)) - (-(-M // bk) - 1))


def _chunked(q, k, v, nq, nk):
    return (da.from_array(q, chunks=q.shape[:-2] + (nq, q.shape[-1])), da.from_array(k, chunks=k.shape[:-2] + (nk, k.shape[-1])),
            da.from_array(v, chunks=v.shape[:-2] + (nk, v.shape[-1])))


@np.errstate(invalid="ignore")  # rows with L = -inf are compared exactly, apart
def _check_cpu(q, k, v, a, L, mchunks, **kw):
    """``backend="cpu"`` against the reference within the CPU path's bound plus the extra merge levels, and against
    the one-call kernel within ``2 a_path + da`` (each side against the exact result)."""
    dtype = np.result_type(q, k, v)
    a_ref, L_ref, fb = bounds.attention_bounds(cpu_arithmetic(), q, k, v, dtype, **kw)
    r = iem_ref.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), return_responsibilities=True,
                          **kw)[1]
    P, W, V = _spreads(r, v, a_ref)
    B = int(np.prod(a_ref.shape[:-2]))
    bk = cpu.plan(B, q.shape[-2], k.shape[-2], dtype)[1]
    da_, dL = bounds.merge_bounds(_extra_levels(mchunks, bk, k.shape[-2]), P, W, V, np.abs(a_ref.astype(np.float64)))
    assert a.dtype == dtype and L.dtype == dtype and a.shape == a_ref.shape and L.shape == L_ref.shape
    a1, L1 = cpu.attention(q, k, v, return_lse=True, **kw)
    rows = np.isfinite(L_ref)  # the others (empty rows) are exact: 0 and -inf
    np.testing.assert_array_equal(a[~rows], a_ref[~rows])
    np.testing.assert_array_equal(L[~rows], L_ref[~rows])
    a64, L64 = a.astype(np.float64), L.astype(np.float64)
    err_a = np.abs(a64 - a_ref)[rows]
    err_L = np.abs(L64 - L_ref)[rows]
    assert np.all(err_a <= (fb.a + da_)[rows]), float(np.max(err_a - (fb.a + da_)[rows]))
    assert np.all(err_L <= (fb.L + dL)[rows]), float(np.max(err_L - (fb.L + dL)[rows]))
    assert np.all((np.abs(a64 - a1) <= 2 * fb.a_path + da_)[rows])
    assert np.all((np.abs(L64 - L1) <= 2 * fb.L_path + dL)[rows])


def _chain(parts):
    p = parts[0]
    for other in parts[1:]:
        p = merge_partials(p, other)
    return p


@np.errstate(invalid="ignore")
def _check_reference(q, k, v, a, L, mchunks, scale=None, take=None):
    """``backend="reference"`` (finite rows) against the one-machine chain merge of the same blocks' partials:
    ``tree_depth(C)`` and ``C - 1`` levels, and each side's finish."""
    inp = iem_ref.attention.__globals__["prepare_attention"](q, k, v, scale=scale, mask=take)
    d, tau, take = inp.energies(), inp.tau, inp.takes_part()
    starts = np.concatenate([[0], np.cumsum(mchunks)]).astype(int)
    parts = [partial_posterior(d[..., s:e], inp.v[..., s:e, :], tau, mask=None if take is None else take[..., s:e])
             for s, e in zip(starts[:-1], starts[1:])]
    a1, L1 = finalize_partial(_chain(parts))
    C, M = len(parts), k.shape[-2]
    r = iem_ref.responsibilities(d, tau, mask=take)
    P, W, V = _spreads(r, inp.v, a1)
    part = np.ones(d.shape, bool) if take is None else take
    x = np.where(part, -d / tau, -np.inf)
    xmax = x.max(axis=-1, keepdims=True)
    shift = np.where(part, xmax - x, 0.0).max(axis=-1)
    da_t, dL_t = bounds.merge_bounds(bounds.tree_depth(C), P, W, V, np.abs(a1), shift=shift)
    da_c, dL_c = bounds.merge_bounds(C - 1, P, W, V, np.abs(a1), shift=shift)
    finite = np.isfinite(L1)
    np.testing.assert_array_equal(a[~finite], a1[~finite])
    np.testing.assert_array_equal(L[~finite], L1[~finite])
    assert np.all((np.abs(a - a1) <= da_t + da_c + 2 * U64 * np.abs(a1))[finite])
    assert np.all((np.abs(L - L1) <= dL_t + dL_c + 2 * (2 * U64 * math.log(max(M, 1)) + U64 * np.abs(L1)))[finite])


# --- agreement: the CPU backend ---------------------------------------------------------------
CASES = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, causal_alignment="bottom_right"),
    dict(energy="sqeuclidean", scale=0.3),
    dict(mask="random"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_backend_within_the_cpu_bound_plus_the_merge_levels(rng, dtype, case):
    kw = dict(CASES[case])
    B, N, M, D, Dv = 2, 37, 300, 8, 3
    q = rng.standard_normal((B, N, D)).astype(dtype)
    k = rng.standard_normal((B, M, D)).astype(dtype)
    v = rng.standard_normal((B, M, Dv)).astype(dtype)
    if kw.get("mask") == "random":
        kw["mask"] = rng.random((N, M)) < 0.7
    nk = 70  # 5 key chunks, none a multiple of the tile: the levels beyond the one-call kernel's are counted
    a, L = idk.attention(*_chunked(q, k, v, 10, nk), return_lse=True, backend="cpu", **kw)
    a, L = dask.compute(a, L, scheduler="sync")
    _check_cpu(q, k, v, a, L, [nk] * (M // nk) + [M % nk], **kw)


def test_cpu_backend_one_chunk_is_the_one_call_kernel_bitwise(rng):
    q, k, v = rng.standard_normal((2, 9, 4)), rng.standard_normal((2, 50, 4)), rng.standard_normal((2, 50, 2))
    a, L = dask.compute(*idk.attention(*_chunked(q, k, v, 9, 50), return_lse=True, is_causal=True), scheduler="sync")
    a1, L1 = cpu.attention(q, k, v, return_lse=True, is_causal=True)
    assert _bits(a, L) == _bits(a1, L1)


def test_summary_cpu_backend_within_the_bound(rng):
    N, M, Dv, tau = 6, 90, 2, 0.7
    d = rng.standard_normal((2, N, M))
    v = rng.standard_normal((M, Dv))
    a, L = dask.compute(*idk.softmin_summary(da.from_array(d, chunks=(1, 3, 20)), da.from_array(v, chunks=(20, Dv)), tau),
                        scheduler="sync")
    a_ref, L_ref = iem_ref.softmin_summary(d, v, tau)
    x = -d / tau
    fb = bounds.forward_bounds(cpu_arithmetic(), np.float64, x, np.zeros_like(x), 1 / tau, 0, v, a_ref, L_ref)
    r = iem_ref.responsibilities(d, tau)
    P, W, V = _spreads(r, v, a_ref)
    bk = cpu.plan(2, N, M, np.float64)[1]
    da_, dL = bounds.merge_bounds(_extra_levels([20] * 4 + [10], bk, M), P, W, V, np.abs(a_ref))
    assert np.all(np.abs(a - a_ref) <= fb.a + da_)
    assert np.all(np.abs(L - L_ref) <= fb.L + dL)


# --- agreement: the reference backend, tree against chain -----------------------------------
@pytest.mark.parametrize("nk", [7, 16, 50])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_tree_within_the_merge_bound_of_the_chain(rng, nk, causal):
    N, M, D, Dv = 12, 50, 5, 3
    q, k, v = rng.standard_normal((N, D)), rng.standard_normal((M, D)), 3 * rng.standard_normal((M, Dv))
    a, L = dask.compute(*idk.attention(*_chunked(q, k, v, 5, nk), scale=0.9, return_lse=True, backend="reference",
                                       is_causal=causal), scheduler="sync")
    take = iem_ref.causal_mask(N, M) if causal else None
    _check_reference(q, k, v, a, L, [nk] * (M // nk) + ([M % nk] if M % nk else []), scale=0.9, take=take)


def test_reference_backend_one_chunk_is_the_streaming_reference_bitwise(rng):
    q, k, v = rng.standard_normal((7, 3)), rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    a, L = dask.compute(*idk.attention(*_chunked(q, k, v, 7, 11), return_lse=True, backend="reference"), scheduler="sync")
    inp = iem_ref.attention.__globals__["prepare_attention"](q, k, v)
    a1, L1 = finalize_partial(partial_posterior(inp.energies(), v, inp.tau))
    assert _bits(a, L) == _bits(a1, L1)


# --- reproducibility -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", idk.BACKENDS)
def test_bitwise_identical_across_runs_and_schedulers(rng, backend):
    q, k, v = rng.standard_normal((2, 30, 6)), rng.standard_normal((2, 90, 6)), rng.standard_normal((2, 90, 4))
    a, L = idk.attention(*_chunked(q, k, v, 8, 13), return_lse=True, is_causal=True, backend=backend)
    ref = _bits(*dask.compute(a, L, scheduler="sync"))
    for _ in range(3):
        assert _bits(*dask.compute(a, L, scheduler="threads", num_workers=4)) == ref
    # a fresh graph for the same inputs and chunking: the same bits
    again = idk.attention(*_chunked(q, k, v, 8, 13), return_lse=True, is_causal=True, backend=backend)
    assert _bits(*dask.compute(*again, scheduler="threads")) == ref


# --- a real cluster, and a worker killed mid-computation -----------------------------------
@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def test_local_cluster_gives_the_same_bits(client, rng):
    q, k, v = rng.standard_normal((3, 20, 6)), rng.standard_normal((3, 64, 6)), rng.standard_normal((3, 64, 2))
    for backend in idk.BACKENDS:
        a, L = idk.attention(*_chunked(q, k, v, 7, 16), return_lse=True, backend=backend, mask=rng.random((20, 64)) < 0.8)
        assert _bits(*client.compute([a, L], sync=True)) == _bits(*dask.compute(a, L, scheduler="sync"))
    d = rng.standard_normal((20, 64))
    s = idk.softmin_summary(da.from_array(d, chunks=(5, 16)), da.from_array(v[0], chunks=(16, 2)), 0.5)
    assert _bits(*client.compute(list(s), sync=True)) == _bits(*dask.compute(*s, scheduler="sync"))


def test_killed_worker_is_rescheduled_and_the_result_is_unchanged(client, rng):
    N = M = 96
    q, k, v = rng.standard_normal((N, 4)), rng.standard_normal((M, 4)), rng.standard_normal((M, 2))
    a = idk.attention(*_chunked(q, k, v, 4, 4), backend="reference")  # 576 blocks, 552 merges: long enough to interrupt
    expected = _bits(a.compute(scheduler="sync"))
    pids = client.run(os.getpid)
    future = client.compute(a)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and not future.done():
        busy = {w: n for w, n in client.processing().items() if n}
        done = sum(1 for s in client.run_on_scheduler(lambda dask_scheduler: [t.state for t in dask_scheduler.tasks.values()]) if s == "memory")
        if busy and done > 20:
            victim = next(iter(busy))
        else:
            time.sleep(0.01)
    assert victim is not None and not future.done(), "the computation ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)  # a worker process of this test's own cluster
    result = future.result(timeout=120)
    assert _bits(result) == expected
    client.wait_for_workers(2, timeout=60)


# --- the edge-case policy, chunked -----------------------------------------------------------
@pytest.mark.parametrize("backend", idk.BACKENDS)
@pytest.mark.parametrize("empty", ["zero", "nan"])
def test_summary_edge_rows_chunked_as_one_machine(backend, empty):
    N, M, Dv = 6, 12, 2
    d = np.tile(np.linspace(-1.0, 1.0, M), (N, 1))
    v = np.arange(M * Dv, dtype=np.float64).reshape(M, Dv)
    mask = np.ones((N, M), bool)
    mask[0] = False  # an empty row across every chunk
    d[1, 7] = np.nan  # NaN in one chunk: that row only
    d[2, 1] = d[2, 9] = -np.inf  # -inf energies in two chunks: they share the mass
    v_bad = v.copy()
    v_bad[10:, :] = np.nan  # values that are never read: masked (every row but 3) ...
    mask[:, 10:] = False
    mask[3, 10:] = True
    d[3, 4:] = np.inf  # ... or of +inf energy, which takes no part (row 3)
    mask[4, 5:] = False
    d[5, :] = np.inf  # all +inf: empty
    rows = [0, 1, 2, 3, 4, 5]
    a, L = dask.compute(*idk.softmin_summary(da.from_array(d, chunks=(2, 4)), da.from_array(v_bad[:, :], chunks=(4, Dv)),
                                             mask=mask, empty=empty, backend=backend), scheduler="sync")
    a1, L1 = iem_ref.softmin_summary(d, v_bad, mask=mask, empty=empty)
    fill = 0.0 if empty == "zero" else np.nan
    np.testing.assert_array_equal(a[0], [fill, fill])
    np.testing.assert_array_equal(a[5], [fill, fill])
    assert L[0] == -np.inf and L[5] == -np.inf
    assert np.isnan(a[1]).all() and np.isnan(L[1])
    np.testing.assert_array_equal(a[2], (v[1] + v[9]) / 2)
    assert L[2] == np.inf
    assert np.isfinite(a[3]).all() and np.isfinite(a[4]).all()
    for row in rows:  # the same NaN / inf pattern as the one-machine function
        np.testing.assert_array_equal(np.isnan(a[row]), np.isnan(a1[row]))
        assert (np.isnan(L[row]), np.isinf(L[row]) and L[row]) == (np.isnan(L1[row]), np.isinf(L1[row]) and L1[row])
    # the finite rows: the one-machine chain of the same partials, within the merge bound (float64, 3 chunks)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(a1))


@pytest.mark.parametrize("backend", idk.BACKENDS)
def test_attention_edge_cases_chunked_as_one_machine(rng, backend):
    N, M, D = 8, 12, 3
    q, k, v = rng.standard_normal((N, D)), rng.standard_normal((M, D)), rng.standard_normal((M, 2))
    q[3, 0] = np.nan  # a NaN query: its row only
    k[10] = np.nan  # a NaN key that is masked for every row but row 6: only row 6 sees it
    v[11] = np.inf  # an inf value, masked for every row
    mask = np.ones((N, M), bool)
    mask[:, 10:] = False
    mask[6, 10] = True
    mask[1] = False  # empty row
    for empty in ("zero", "nan"):
        a, L = dask.compute(*idk.attention(*_chunked(q, k, v, 3, 4), mask=mask, empty=empty, return_lse=True,
                                           backend=backend), scheduler="sync")
        a1, L1 = iem_ref.attention(q, k, v, mask=mask, empty=empty, return_lse=True)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(a1))
        np.testing.assert_array_equal(np.isnan(L), np.isnan(L1))
        assert np.isnan(a[3]).all() and np.isnan(a[6]).all() and np.isfinite(np.delete(a, [1, 3, 6], 0)).all()
        assert L[1] == -np.inf
        np.testing.assert_array_equal(a[1], [0.0, 0.0] if empty == "zero" else [np.nan, np.nan])


@pytest.mark.parametrize("backend", idk.BACKENDS)
def test_no_key_at_all(backend):
    q, k, v = np.zeros((3, 2)), np.zeros((0, 2)), np.zeros((0, 4))
    a, L = dask.compute(*idk.attention(q, k, v, return_lse=True, backend=backend, empty="nan"), scheduler="sync")
    assert a.shape == (3, 4) and np.isnan(a).all() and (L == -np.inf).all()


# --- blocks that are never scheduled -----------------------------------------------------------
def _partial_tasks(x):
    return sum(1 for key in dict(x.__dask_graph__()) if isinstance(key, tuple) and "-partial-" in key[0] and key[1] != "empty")


@pytest.mark.parametrize("alignment,expected", [("top_left", 10), ("bottom_right", 10)])
def test_causally_excluded_blocks_are_never_scheduled(rng, alignment, expected):
    q, k, v = rng.standard_normal((40, 4)), rng.standard_normal((40, 4)), rng.standard_normal((40, 2))
    a = idk.attention(*_chunked(q, k, v, 10, 10), is_causal=True, causal_alignment=alignment)
    assert _partial_tasks(a) == expected  # the 4 x 4 blocks on and below the diagonal
    assert _partial_tasks(idk.attention(*_chunked(q, k, v, 10, 10))) == 16


def test_bottom_right_rows_that_see_nothing_finish_empty(rng):
    q, k, v = rng.standard_normal((12, 3)), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    for backend in idk.BACKENDS:
        a, L = idk.attention(*_chunked(q, k, v, 4, 2), is_causal=True, causal_alignment="bottom_right", backend=backend,
                             return_lse=True)
        assert _partial_tasks(a) == 2  # query i sees j <= i - 8: chunks 0 and 1 see no key, chunk 2 both key chunks
        a, L = dask.compute(a, L, scheduler="sync")
        assert (a[:8] == 0).all() and (L[:8] == -np.inf).all()
        if backend == "cpu":
            _check_cpu(q, k, v, a, L, [2, 2], is_causal=True, causal_alignment="bottom_right")
        else:
            _check_reference(q, k, v, a, L, [2, 2], take=iem_ref.causal_mask(12, 4, "bottom_right"))


def test_fully_masked_blocks_of_a_numpy_mask_are_never_scheduled(rng):
    q, k, v = rng.standard_normal((20, 4)), rng.standard_normal((30, 4)), rng.standard_normal((30, 2))
    mask = np.ones((20, 30), bool)
    mask[:10, 10:20] = False  # one block of the 2 x 3 grid
    a = idk.attention(*_chunked(q, k, v, 10, 10), mask=mask)
    assert _partial_tasks(a) == 5
    np.testing.assert_array_equal(a.compute(scheduler="sync"), idk.attention(*_chunked(q, k, v, 10, 10), mask=da.from_array(mask, chunks=10)).compute(scheduler="sync"))


# --- NumPy inputs, batch broadcasting ----------------------------------------------------------
def test_numpy_inputs_are_chunked_within_the_budget(rng):
    q, k, v = rng.standard_normal((2, 16, 4)), rng.standard_normal((2, 64, 4)), rng.standard_normal((2, 64, 4))
    a, L = idk.attention(q, k, v, return_lse=True, chunk_bytes=1024)  # a row of k (or v) across the batch: 64 B
    assert a.chunks[-2] == (16,) and len(a.chunks[-1]) == 1
    assert _partial_tasks(a) == 4  # keys in chunks of 16 rows: 1024 B of k and of v each
    a, L = dask.compute(a, L, scheduler="sync")
    _check_cpu(q, k, v, a, L, [16] * 4)


@pytest.mark.parametrize("backend", idk.BACKENDS)
def test_batch_axes_broadcast(rng, backend):
    q = rng.standard_normal((3, 1, 9, 4))
    k = rng.standard_normal((1, 2, 20, 4))
    v = rng.standard_normal((20, 3))
    qd = da.from_array(q, chunks=(1, 1, 4, 4))
    kd = da.from_array(k, chunks=(1, 1, 5, 4))
    vd = da.from_array(v, chunks=(5, 3))
    a, L = dask.compute(*idk.attention(qd, kd, vd, return_lse=True, backend=backend), scheduler="sync")
    assert a.shape == (3, 2, 9, 3) and L.shape == (3, 2, 9)
    if backend == "cpu":
        _check_cpu(q, k, v, a, L, [5] * 4)
    else:
        _check_reference(q, k, v, a, L, [5] * 4)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_names_the_argument(rng):
    q, k, v = rng.standard_normal((8, 4)), rng.standard_normal((12, 4)), rng.standard_normal((12, 2))
    qd, kd, vd = _chunked(q, k, v, 4, 4)
    with pytest.raises(ValueError, match="k and v"):
        idk.attention(qd, kd, da.from_array(v, chunks=(6, 2)))
    with pytest.raises(ValueError, match="mask"):
        idk.attention(qd, kd, vd, mask=da.from_array(np.ones((8, 12), bool), chunks=(8, 12)))
    with pytest.raises(TypeError, match="mask"):
        idk.attention(qd, kd, vd, mask=da.from_array(np.ones((8, 12)), chunks=4))
    with pytest.raises(ValueError, match="backend"):
        idk.attention(qd, kd, vd, backend="gpu")
    with pytest.raises(ValueError, match="energy"):
        idk.attention(qd, kd, vd, energy="laplace", backend="cpu")
    with pytest.raises(TypeError, match="q"):
        idk.attention(qd.astype(np.complex128), kd, vd)
    with pytest.raises(ValueError, match="D"):
        idk.attention(qd[:, :3], kd, vd)
    with pytest.raises(ValueError, match="scale"):
        idk.attention(qd, kd, vd, scale=-1.0)
    with pytest.raises(ValueError, match="empty"):
        idk.attention(qd, kd, vd, empty="inf")
    with pytest.raises(ValueError, match="chunk_bytes"):
        idk.attention(q, k, v, chunk_bytes=0)
    with pytest.raises(ValueError, match="batch axis"):
        idk.attention(da.from_array(np.zeros((4, 8, 4)), chunks=(2, 8, 4)), da.from_array(np.zeros((4, 12, 4)), chunks=(1, 12, 4)),
                      da.from_array(np.zeros((4, 12, 2)), chunks=(1, 12, 2)))
    with pytest.raises(ValueError, match="d and v"):
        idk.softmin_summary(da.from_array(np.zeros((3, 12)), chunks=4), da.from_array(np.zeros((12, 2)), chunks=(6, 2)))
    with pytest.raises(ValueError, match="tau"):
        idk.softmin_summary(np.zeros((3, 12)), np.zeros((12, 2)), tau=0.0)
    with pytest.raises(ValueError, match="causal_offset|tiles|threads"):
        cpu.attention_partials(q, k, v, threads=2)


def test_module_examples_run():
    import doctest

    result = doctest.testmod(idk, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_readme_example_runs():
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Scale-out: beyond one machine (Dask)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
