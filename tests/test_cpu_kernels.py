"""CPU-specific tests of ``iem_ref.accel.cpu`` (agreement with the reference is tests/test_agreement.py).

- determinism: bitwise identical results from run to run and for 1 or 2 Numba threads
  (the reduction order per query is fixed by the tile shape and split count, which
  depend on the shapes only; BLAS is pinned to one thread);
- the polynomial exp: its ulp error against ``np.exp`` / the correctly rounded value,
  its special values, and its coefficients re-derived;
- memory: no ``N x M`` array (peak resident memory in a subprocess), and decoding
  memory independent of ``M``;
- no silent fallback to the reference for energies without a kernel.
"""

from __future__ import annotations

import ast
import json
import math
import pathlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import U32, U64

import numba
import threadpoolctl

from iem_ref.accel import _fastexp, cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- determinism -------------------------------------------------------------------------
def _all_results(rng, dtype):
    q = rng.standard_normal((2, 300, 16)).astype(dtype)
    k = rng.standard_normal((2, 700, 16)).astype(dtype)
    v = rng.standard_normal((2, 700, 8)).astype(dtype)
    u = rng.standard_normal((2, 300, 8)).astype(dtype)
    mask = rng.random((300, 700)) < 0.9
    qd = rng.standard_normal((1, 16)).astype(dtype)
    kd = rng.standard_normal((20000, 16)).astype(dtype)  # decoding: 2 key splits
    vd = rng.standard_normal((20000, 8)).astype(dtype)
    out = []
    out += cpu.attention(q, k, v, mask=mask, return_lse=True)
    out += cpu.attention(q, k, v, is_causal=True, energy="sqeuclidean", return_lse=True)
    out += cpu.attention(qd, kd, vd, return_lse=True)
    out += cpu.attention_vjp(q, k, v, u, mask=mask)
    out += cpu.softmin_summary(-q @ np.swapaxes(k, -1, -2), v, 0.5)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bitwise_identical_across_runs_and_thread_counts(dtype):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        first = _all_results(np.random.default_rng(7), dtype)
        again = _all_results(np.random.default_rng(7), dtype)
        numba.set_num_threads(1)
        single = _all_results(np.random.default_rng(7), dtype)
    finally:
        numba.set_num_threads(before)
    for i, (a, b, c) in enumerate(zip(first, again, single)):
        assert a.tobytes() == b.tobytes(), f"result {i} differs between two runs"
        assert a.tobytes() == c.tobytes(), f"result {i} differs between 2 threads and 1"


def test_plan_depends_on_shapes_only():
    """The tiling (hence the summation order) is a function of the shapes and dtype, never of the thread count."""
    before = numba.get_num_threads()
    plans = []
    for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        numba.set_num_threads(n)
        plans.append([cpu.plan(B, N, M, dt) for B, N, M, dt in [(1, 1, 4 << 20, np.float32), (8, 4096, 4096, np.float64), (1, 16, 50000, np.float64)]])
    numba.set_num_threads(before)
    assert all(p == plans[0] for p in plans)
    assert plans[0][0][2] > 1  # decoding splits the keys


@pytest.mark.parametrize("B, N, M, D", [
    pytest.param(1, 4096, 4096, 64, id="one-head"),
    pytest.param(1, 16384, 16384, 128, id="one-long-head"),
    pytest.param(64, 4096, 4096, 128, id="many-heads"),
    pytest.param(1, 4096, 300, 64, id="two-key-tiles"),
])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_key_splits_within_their_memory(B, N, M, D, dtype):
    """The backward's key splits: enough work items for the cores, at most one per key tile, their dq sums within split_bytes."""
    t = cpu.TILING
    _, bk, ns = cpu.plan(B, N, M, dtype, backward=True, row_values=D)
    assert 1 <= ns <= -(-M // bk)
    assert ns == 1 or B * ns * N * D * 8 <= t.split_bytes
    assert B * ns >= min(t.target_items, B * -(-M // bk), max(B, t.split_bytes // (8 * N * D)))


@pytest.mark.parametrize("N", [1, 16, 63, 64, 200, 255, 256, 600, 1024, 2047, 4096, 16384])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_plan_gives_every_core_work(N, dtype):
    """Query blocks: at most the dtype's tile height, at least 64 rows (or all N), and at least 4 blocks once N allows it."""
    bq, bk, _ = cpu.plan(1, N, 4096, dtype)
    t = cpu.TILING
    tile_bq, tile_bk = t.tiles(dtype, False)
    nqb = -(-N // bq)
    assert bq <= tile_bq
    assert bq >= min(N, t.small_block)
    if N >= t.min_blocks * t.small_block:
        assert nqb >= t.min_blocks
    assert bk == (tile_bk if bq >= t.small_block else t.decode_keys)
    assert cpu.plan(1, N, 4096, dtype, backward=True)[0] <= t.tiles(dtype, True)[0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_row_max_ignores_nan_and_is_exact(rng, dtype):
    """The kernels' row maximum (``llvm.maxnum``, vectorised): NaN ignored, ``-inf`` when nothing else, exactly ``np.nanmax``.

    A maximum involves no rounding, so the comparison is exact equality (the sign of a zero maximum aside).
    """
    from iem_ref.accel._cpu_kernels import _row_max

    rows = [rng.standard_normal(n).astype(dtype) for n in (1, 7, 8, 9, 255, 256, 1000)]
    with_nan = rng.standard_normal(300).astype(dtype)
    with_nan[[0, 17, 299]] = np.nan
    rows += [with_nan, np.array([np.nan, -np.inf, np.nan], dtype), np.array([-np.inf] * 5, dtype),
             np.array([np.nan] * 4, dtype), np.array([1.0, np.inf, np.nan, 2.0], dtype), np.array([-0.0, -1.0], dtype)]
    for row in rows:
        got = _row_max(row, row.shape[0])
        finite_or_inf = row[~np.isnan(row)]
        want = finite_or_inf.max() if finite_or_inf.size else -np.inf
        assert got == want, f"row {row[:8]}...: got {got}, want {want}"
    assert _row_max(rows[-1], 1) == 0.0  # only the first n entries count


@pytest.mark.equation("M2")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_key_splits_agree_with_one_pass(rng, dtype):
    """M2 merges exactly in real arithmetic: 1, 3 and 7 key splits agree within the rounding of the weights.

    The score tiles are identical (same GEMMs), but each split shifts its exponents by its
    own running maximum, so the weights ``exp(x - m)``, the tile sums and the value GEMM
    round differently.  Each side is within ``|e_j| <= E = 4u + u max|x - m|`` per weight and
    ``G = g(min(M, bk) + 3) + g64(ceil(M/bk) + 19)`` per sum (``bk`` from ``plan``) (tests/test_agreement.py), so
    ``|a_s - a_1| <= 2 (2E + 2G) max|v| + 2u |a|`` and ``|L_s - L_1| <= 2 (E + 2G) + 2u |L|``.
    """
    q = rng.standard_normal((2, 3, 8)).astype(dtype)
    k = rng.standard_normal((2, 5000, 8)).astype(dtype)
    v = rng.standard_normal((2, 5000, 4)).astype(dtype)
    u = U32 if dtype == np.float32 else U64
    M = k.shape[-2]
    x = (q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)) / math.sqrt(8)
    spread = (x.max(-1) - x.min(-1)).max()
    g = lambda n, uu: n * uu / (1 - n * uu)  # noqa: E731
    E = 4 * u + u * spread * (1 + 1e-6)
    bk = cpu.plan(2, 3, M, dtype)[1]
    G = g(min(M, bk) + 3, u) + g(math.ceil(M / bk) + 19, U64)
    (a1, L1), _ = cpu._forward_attention(q, k, v, None, None, False, "top_left", "dot", "zero", nsplit=1)
    for ns in (3, 7):
        (a, L), _ = cpu._forward_attention(q, k, v, None, None, False, "top_left", "dot", "zero", nsplit=ns)
        err_a = np.abs(a.astype(np.float64) - a1)
        err_L = np.abs(L.astype(np.float64) - L1)
        bound_a = 2 * (2 * E + 2 * G) * np.abs(v).max() + 2 * u * np.abs(a1)
        bound_L = 2 * (E + 2 * G) + 2 * u * np.abs(L1)
        assert (err_a <= bound_a).all(), f"{ns} splits: max |da| {err_a.max():.3e}, mean {err_a.mean():.3e}, bound {bound_a.min():.3e}"
        assert (err_L <= bound_L).all(), f"{ns} splits: max |dL| {err_L.max():.3e}, mean {err_L.mean():.3e}, bound {bound_L.min():.3e}"
        assert not np.array_equal(a, a1), f"{ns} splits gave bitwise the one-pass result: were the keys split at all?"


# --- the polynomial exp ----------------------------------------------------------------------
def test_exp_coefficients_rederived():
    """The constants in _fastexp are the interpolants at Chebyshev nodes, re-derived in exact arithmetic."""
    assert _fastexp.interpolation_coefficients(11, _fastexp._HALF_WIDTH) == list(_fastexp.C64)
    assert _fastexp.interpolation_coefficients(6, _fastexp._HALF_WIDTH) == list(_fastexp.C32)


def test_exp64_within_2_ulps_of_np_exp(rng):
    """float64: within 2 ulps of ``np.exp`` on ``[-708, 709]``, uniformly and near 0 (the kernels' range is ``<= 0``).

    Measured here: 1 ulp.  The kernels' error bounds use 2 ulps = ``4 u``.
    """
    x = np.concatenate([rng.uniform(-708, 709, 400_000), rng.uniform(-1, 1, 200_000), rng.uniform(-40, 0, 200_000), [0.0, -0.0, 1e-300, -1e-300]])
    y = _fastexp.exp_array(x)
    ref = np.exp(x)
    ulps = np.abs(y - ref) / np.spacing(ref)
    worst = int(np.argmax(ulps))
    assert ulps.max() <= 2, f"max {ulps.max():.2f} ulps at x = {x[worst]!r}; mean {ulps.mean():.3f}"


def test_exp32_within_2_ulps_of_the_correctly_rounded_value(rng):
    """float32: within 2 ulps of ``exp`` rounded from float64 on ``[-87, 88]`` (``np.exp`` in float32 itself is 2.4 ulps off here).

    Every float32 in ``[-87.34, 88.72]`` measured: at most 1.105 ulps.
    """
    x = np.concatenate([rng.uniform(-87, 88, 400_000), rng.uniform(-1, 1, 200_000)]).astype(np.float32)
    y = _fastexp.exp_array(x).astype(np.float64)
    true = np.exp(x.astype(np.float64))
    ulps = np.abs(y - true) / np.spacing(true.astype(np.float32)).astype(np.float64)
    worst = int(np.argmax(ulps))
    assert ulps.max() <= 2, f"max {ulps.max():.2f} ulps at x = {x[worst]!r}; mean {ulps.mean():.3f}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exp_special_values_and_underflow(dtype):
    """``-inf -> 0``, ``NaN -> NaN``, ``+inf -> inf``, overflow -> inf, underflow gradual (subnormals), then 0."""
    with np.errstate(all="ignore"):
        x = np.array([-np.inf, np.nan, np.inf, 1e5, -1e5, 0.0, -0.0], dtype)
        y = _fastexp.exp_array(x)
        assert y[0] == 0 and np.isnan(y[1]) and y[2] == np.inf and y[3] == np.inf and y[4] == 0 and y[5] == 1 and y[6] == 1
        tiny = np.finfo(dtype).tiny
        sub = np.linspace(math.log(tiny) - 30, math.log(tiny), 2001).astype(dtype)  # results in the subnormal range
        ys, ref = _fastexp.exp_array(sub).astype(np.float64), np.exp(sub.astype(np.float64))
        # two scalings round twice: within one subnormal step (plus the polynomial's relative error)
        step = float(np.finfo(dtype).smallest_subnormal)
        assert (np.abs(ys - ref) <= step + 4 * (U32 if dtype == np.float32 else U64) * ref).all()
        assert (ys > 0).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_exp_equals_exp_on_normal_results_and_flushes_below(rng, dtype):
    """The kernels' ``exp`` of shifted exponents ``x <= 0``: bitwise :func:`exp_array` where the result is normal, 0 below.

    Below ``log(tiny)`` the true value is under ``2.3e-308`` (float32: ``1.2e-38``), far below
    ``u`` next to the row's largest weight 1 that every softmin row holds.
    """
    lo = math.log(np.finfo(dtype).tiny)
    x = np.concatenate([rng.uniform(lo, 0, 300_000), rng.uniform(-1, 0, 100_000), [0.0, -0.0]]).astype(dtype)
    x = x[x >= dtype(lo)]
    assert np.array_equal(_fastexp.exp_shifted_array(x), _fastexp.exp_array(x))
    below = np.array([lo - 1e-3 * abs(lo), lo * 1.5, -np.inf], dtype)
    assert (_fastexp.exp_shifted_array(below) == 0).all()
    assert np.isnan(_fastexp.exp_shifted_array(np.array([np.nan], dtype))).all()


# --- memory ------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from iem_ref.accel import cpu

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    N, M, D, Dv, dtype, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((N, D)).astype(dtype)
    k = rng.standard_normal((M, D)).astype(dtype)
    v = rng.standard_normal((M, Dv)).astype(dtype)
    u = rng.standard_normal((N, Dv)).astype(dtype)
    run = {"forward": lambda: cpu.attention(q, k, v, return_lse=True),
           "backward": lambda: cpu.attention_vjp(q, k, v, u)}[what]
    small = [x[:8] for x in (q, k, v, u)]
    cpu.attention(*small[:3], return_lse=True); cpu.attention_vjp(*small)  # compile / load, warm the pools
    run()
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    out = run()
    print(json.dumps({"extra": status("VmHWM:") - base}))
    """
)


def _peak_extra(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["extra"]


def _can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not _can_reset_peak(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("what", ["forward", "backward"])
def test_no_n_by_m_allocation(what):
    """Peak extra resident memory of a call at N = M = 4096: well under one N x M float64 array (134 MB).

    Expected: outputs and float64 partials ``O(N (D + Dv))`` (about 1 MB here) plus a tile per
    thread; the bound is the target, 5% of one N x M float64 matrix (6.7 MB).
    """
    N = M = 4096
    extra = _peak_extra(N, M, 16, 16, "float64", what)
    assert extra < 0.05 * N * M * 8, f"{what}: peak extra {extra / 2**20:.1f} MiB"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not _can_reset_peak(), reason="needs Linux /proc peak-RSS reset")
def test_decoding_memory_independent_of_m():
    """One query against 2**17 and 2**20 keys: the same small extra memory (no per-key arrays)."""
    small = _peak_extra(1, 1 << 17, 16, 16, "float32", "forward")
    large = _peak_extra(1, 1 << 20, 16, 16, "float32", "forward")
    assert large < 2 * 2**20 and small < 2 * 2**20, f"peak extra {small / 2**20:.2f} MiB (M = 2^17), {large / 2**20:.2f} MiB (M = 2^20)"


def test_docstring_examples_run():
    """The accelerated modules' examples are executed (tests/test_doctests.py covers the reference)."""
    import doctest

    from iem_ref.accel import _problem, _scalar, machine

    for mod in (cpu, _fastexp, _scalar, _problem, machine):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted > 0, f"{mod.__name__} has no examples"
        assert res.failed == 0, f"{mod.__name__}: {res.failed} of {res.attempted} examples failed"


# --- no silent fallback -----------------------------------------------------------------------
@pytest.mark.parametrize("energy", ["laplace", "cosine", lambda q, k: -(q @ k.T)])
def test_energies_without_a_kernel_raise(energy):
    q = np.ones((2, 3))
    with pytest.raises(ValueError, match="supports energy"):
        cpu.attention(q, q, q, energy=energy)


def test_blas_single_threaded_inside_the_kernels(monkeypatch):
    """While a kernel runs BLAS has one thread (BLAS threads inside the kernel threads would oversubscribe the cores)."""
    seen = []
    real = cpu._kernel

    def spying(name, features):
        fn = real(name, features)

        def run(*args):
            seen.append({i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"})
            return fn(*args)

        return run

    monkeypatch.setattr(cpu, "_kernel", spying)
    x = np.ones((70, 4))
    cpu.attention(x, x, x)
    cpu.attention_vjp(x, x, x, x)
    assert seen and all(s == {1} for s in seen), seen


def test_blas_threads_restored():
    """BLAS is pinned to one thread only while a kernel runs."""
    before = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    cpu.attention(np.ones((3, 2)), np.ones((4, 2)), np.ones((4, 2)))
    after = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert before == after


# --- the first call -----------------------------------------------------------------------------
_FIRST_CALL = textwrap.dedent(
    """
    import numpy as np
    from iem_ref.accel import cpu
    x = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
    cpu.attention(x, x, x)
    cpu.attention(x, x, x, is_causal=True)
    print("done")
    """
)


def test_first_call_announces_compilation_once_and_prints_nothing_else(tmp_path):
    """A fresh Numba cache: one CompilationNotice (naming the cache), no other warning or output; the next process is silent."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONWARNINGS="always")
    first = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "done\n"
    assert first.stderr.count("CompilationNotice") == 1, first.stderr
    assert str(tmp_path) in first.stderr
    others = [line for line in first.stderr.splitlines() if "Warning" in line or "warn" in line]
    assert not others, first.stderr
    second = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert second.returncode == 0 and second.stdout == "done\n" and second.stderr == "", second.stderr


_KINDS = textwrap.dedent(
    """
    import json, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from iem_ref.accel import cpu, _cpu_kernels, _compile
    x = np.linspace(-1.0, 1.0, 12).reshape(4, 3)
    cpu.attention(x, x, x)
    cpu.attention(x, x, x, softcap=2.0)
    ir = {features.variants: fn.inspect_llvm(fn.signatures[0]) for (name, features), fn in cpu._COMPILED.items()}
    helper = _cpu_kernels._finite_copy
    print(json.dumps({"kinds": sorted(str(k) for k in ir),
                      "tanh": {str(k): "tanh" in v for k, v in ir.items()},
                      "ir_lines": {str(k): v.count(chr(10)) for k, v in ir.items()},
                      "helper_linked": all(isinstance(c.library, _compile._LinkedLibrary) for c in helper.overloads.values()),
                      "helper_compiled": len(helper.overloads)}))
    """
)


def test_a_plain_kernel_holds_no_variant_code(tmp_path):
    """A plain call and a soft-capped one compile two kernels; only the second holds the soft-cap's ``tanh``.

    Also: the helpers (``**INNER``) were compiled into libraries that only
    link (:class:`iem_ref.accel._compile._LinkedLibrary`), with no machine code of their own.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _KINDS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kinds"] == ["False", "True"], got
    assert got["tanh"] == {"False": False, "True": True}, got
    assert got["ir_lines"]["False"] < got["ir_lines"]["True"], got
    assert got["helper_compiled"] >= 1 and got["helper_linked"], got


def _warmup(tmp_path, *options):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "iem_ref.cli", "warmup", *options], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=1800)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout


def test_warmup_command_compiles_what_it_is_asked_for(tmp_path):
    """``iem-ref warmup --dtype float32 --ops forward``: that kernel alone, reported, cached; a second run loads it."""
    first = _warmup(tmp_path, "--dtype", "float32", "--ops", "forward")
    kernels = [line.split()[:2] for line in first.splitlines()[1:-1]]
    assert kernels == [["forward", "f32_dot"]], first
    assert first.splitlines()[1].endswith("compiled") and "total" in first.splitlines()[-1], first
    assert any(f.endswith(".nbi") for _, _, files in os.walk(tmp_path) for f in files)
    second = _warmup(tmp_path, "--dtype", "float32", "--ops", "forward")
    assert second.splitlines()[1].endswith("from the cache"), second


@pytest.mark.slow
def test_warmup_command_compiles_every_kernel(tmp_path):
    """``iem-ref warmup --all``: every kernel a call can ask for, both dtypes, energies and kinds, and the activations."""
    out = _warmup(tmp_path, "--all")
    for dtype in ("f64", "f32"):
        for energy in ("dot", "sqeuclidean", "precomputed"):
            for kind in ("", "_variants"):
                ops = ("forward",) if energy == "precomputed" else ("forward", "backward")
                for op in ops:
                    assert f"{op} {dtype}_{energy}{kind} " in out, out
    assert "scalar activations" in out and "total" in out, out


def test_warmup_refuses_unknown_choices():
    with pytest.raises(ValueError, match="dtypes"):
        cpu.warmup(dtypes=["float16"], report=lambda line: None)
    with pytest.raises(ValueError, match="energies"):
        cpu.warmup(energies="dot", report=lambda line: None)  # a string, not a list of names


_AVX512 = {"avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("flags, architecture, environ, says", [
    ({"avx2", "fma"}, "Haswell", {}, None),  # the CPU has nothing better
    (_AVX512, "SkylakeX", {}, None),
    (_AVX512, "SapphireRapids", {"OPENBLAS_CORETYPE": "SapphireRapids"}, None),
    (_AVX512, None, {}, None),  # not OpenBLAS: nothing to say
    ({"avx2", "avx512f"}, "Haswell", {}, None),  # AVX-512 without the subsets OpenBLAS's kernels need
    (_AVX512, "Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, "OPENBLAS_CORETYPE=Haswell makes OpenBLAS run its Haswell kernels"),
    (_AVX512, "Zen", {}, "OPENBLAS_CORETYPE=SkylakeX, set before Python starts"),
])
def test_machine_advice_names_a_blas_below_the_cpu(flags, architecture, environ, says):
    from iem_ref.accel.machine import advice

    got = advice(flags, architecture, environ)
    assert (got is None) if says is None else (says in got), got


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64", reason="OpenBLAS's x86 kernel sets")
def test_machine_command_reports_the_kernel_set_in_use():
    """``iem-ref machine`` reports the kernels OpenBLAS runs, an override of them, and the advice where the CPU has more."""
    from iem_ref.accel.machine import AVX512_FLAGS, _cpu

    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
    out = subprocess.run([sys.executable, "-m", "iem_ref.cli", "machine"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Haswell kernels" in out.stdout and "OPENBLAS_CORETYPE=Haswell" in out.stdout, out.stdout
    assert ("note:" in out.stdout) == (AVX512_FLAGS <= _cpu()[1]), out.stdout


def _openblas_sets():
    """OpenBLAS's x86 kernel sets this CPU can run: AVX2's, and AVX-512's where the CPU has it."""
    from iem_ref.accel.machine import AVX512_FLAGS, _cpu

    flags = _cpu()[1]
    return ["Haswell"] * ("avx2" in flags) + ["SkylakeX"] * (AVX512_FLAGS <= flags)


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", _openblas_sets())
def test_agreement_under_each_openblas_kernel_set(kernel_set):
    """The CPU kernels stay within the bounds whichever GEMM kernels OpenBLAS runs under their tiles.

    A GEMM's summation order belongs to its kernel set (blocking, vector
    width, FMA order); the bounds assume none.  The agreement suite's GEMM-heavy
    tests run again in a process whose OpenBLAS was told the set.
    """
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel_set)
    check = subprocess.run([sys.executable, "-c", "from iem_ref.accel.machine import describe; print(describe()['blas']['kernels'])"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == kernel_set, (check.stdout, check.stderr)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_agreement.py",
                          "-k", "cpu and (random or vjp or decoding_split)"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


def _is_jit(decorator):
    """``@njit``, ``@njit(...)``, ``@numba.njit``, ``@cuda.jit(...)`` and the like."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (getattr(node, "id", None) or getattr(node, "attr", None)) in ("njit", "jit")


def test_helpers_without_a_python_entry_point_are_private():
    """A helper compiled with ``_compile.INNER`` has no CPython wrapper: called from Python, Numba would crash.

    So every such helper has a leading underscore, and none is called from
    Python by the package, its tests or its benchmarks (they call the public
    kernels, or ``@njit`` code of their own).
    """
    import iem_ref.accel

    root = pathlib.Path(__file__).resolve().parents[1]  # the tests, bench and derivations (beside an installed wheel too)
    inner = set()
    for path in pathlib.Path(iem_ref.accel.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and any(isinstance(k.value, ast.Name) and k.value.id == "INNER" for k in dec.keywords):
                        inner.add(node.name)
    assert inner, "no helper compiled with INNER found: the check would be vacuous"
    assert all(name.startswith("_") for name in inner), sorted(n for n in inner if not n.startswith("_"))
    # no plain-Python call site: a name may appear in Python code only inside @njit functions or imports
    for folder in ("tests", "bench", "derivations"):
        for path in (root / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            jitted = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and any(_is_jit(d) for d in f.decorator_list)
                      for n in ast.walk(f)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and id(node) not in jitted:
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    assert name not in inner, f"{path.name}:{node.lineno} calls {name} from Python"
