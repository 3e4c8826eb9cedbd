"""Where the CPU forward kernel's time goes: a phase profile and a tile-shape sweep, every variant interleaved in one run.

Why this exists: where the kernel misses a speed goal, the profile says why,
in numbers.  Numba has no line profiler, so the profile times a
skeleton of :func:`iem_ref.accel._cpu_kernels._forward_block` (the same
tiles, the same BLAS calls and the same helpers: ``_row_max``,
``_exp_shift_sum``) with phases switched on one at a time:

- ``gemm``: the score GEMM and the value GEMM of every tile, nothing else;
- ``+max``: plus the running row maximum;
- ``+exp``: plus the shifted ``exp`` and the tile's row sums (no maximum: the shift is 0);
- ``+rescale``: plus the M2 rescaling of the output accumulators;
- ``skeleton``: all of them (the kernel without its edge-case selections);
- ``kernel``: :func:`iem_ref.accel.cpu.attention` itself;
- ``torch``: ``scaled_dot_product_attention`` (4-D inputs, flash CPU kernel), if installed.

Each phase's cost is its time minus ``gemm``'s.  The tile sweep times the
kernel and its own GEMMs (``gemm_roof`` of ``bench/roofs.py``) for
several ``(bq, bk)``.  Variants are interleaved round by round (this machine
is a shared VM: its speed drifts by tens of percent over minutes, which
interleaving spreads evenly) and the median per variant is reported.

Usage::

    python bench/profile_cpu.py                      # N = M = 4096, D = 64, both dtypes (about 4 min)
    python bench/profile_cpu.py --rounds 5 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from numba import njit, prange

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from iem_ref.accel import cpu  # noqa: E402
from iem_ref.accel._cpu_kernels import _NOTRANS, _TRANS, _exp_shift_sum, _row_max, gemm  # noqa: E402
from iem_ref.accel._fastexp import like  # noqa: E402
import bench_cpu  # noqa: E402
from roofs import gemm_roof  # noqa: E402

GEMM, MAX, EXP, RESCALE = 0, 1, 2, 4
PHASES = {"gemm": GEMM, "+max": MAX, "+exp": EXP, "+rescale": RESCALE, "skeleton": MAX | EXP | RESCALE}


@njit(fastmath={"contract"})
def _skeleton_block(q, k, v, i0, i1, bk_max, phases, o, m, l):
    """The forward block's main path (dot energy, no mask, finite inputs) with phases switched by bits."""
    bq = i1 - i0
    D = q.shape[1]
    Dv = v.shape[1]
    M = k.shape[0]
    S = np.empty((bq, bk_max), q.dtype)
    T = np.empty((bq, Dv), q.dtype)
    alpha = np.empty(bq)
    scale = like(1.0 / math.sqrt(D), S[0, 0])
    for r in range(bq):
        m[r] = -np.inf
        l[r] = 0.0
        for c in range(Dv):
            o[r, c] = 0.0
    for jb in range(0, M, bk_max):
        bk = min(bk_max, M - jb)
        gemm(_TRANS, _NOTRANS, bk, bq, D, scale, k, jb * D, D, q, i0 * D, D, 0.0, S, 0, bk_max)
        for r in range(bq):
            row = S[r]
            mx = np.float64(_row_max(row, bk)) if phases & MAX else 0.0
            m_new = mx if mx > m[r] else m[r]
            tile_sum = _exp_shift_sum(row, bk, like(m_new, row[0])) if phases & EXP else row[0]
            a = 1.0 if m[r] == m_new else math.exp(m[r] - m_new)
            alpha[r] = a
            m[r] = m_new
            l[r] = a * l[r] + np.float64(tile_sum)
        gemm(_NOTRANS, _NOTRANS, Dv, bq, bk, 1.0, v, jb * Dv, Dv, S, 0, bk_max, 0.0, T, 0, Dv)
        if phases & RESCALE:
            for r in range(bq):
                a = alpha[r]
                for c in range(Dv):
                    o[r, c] = a * o[r, c] + np.float64(T[r, c])


@njit(parallel=True, fastmath={"contract"})
def skeleton(q, k, v, bq, bk, phases, o, m, l):
    """:func:`_skeleton_block` over query blocks in ``prange`` (the kernel's forward spreads the same blocks over as many threads)."""
    N = q.shape[0]
    nqb = (N + bq - 1) // bq
    for w in prange(nqb):
        i0 = w * bq
        i1 = min(N, i0 + bq)
        _skeleton_block(q, k, v, i0, i1, bk, phases, o[i0:i1], m[i0:i1], l[i0:i1])


def _inputs(dtype, N, M, D):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((n, D)).astype(dtype) for n in (N, M, M))


#: Pause before every timed call.  The skeleton runs under Numba's ``prange``, whose OpenMP threads
#: spin for a while after a parallel region; a call started at once shares the cores with them
#: (on a 2-core AVX-512 EPYC the kernel took 37 ms right after the skeleton, 33 ms after a pause,
#: and 33 ms alone in its own process).
SETTLE_S = 0.2


def _interleaved(variants, rounds):
    """``{name: [ms per round]}``: each variant once per round, after one warm-up call each."""
    for f in variants.values():
        f()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def profile(dtype, N, M, D, rounds):
    from threadpoolctl import threadpool_limits

    q, k, v = _inputs(dtype, N, M, D)
    bq, bk, _ = cpu.plan(1, N, M, dtype)
    o = np.zeros((N, D))
    m = np.zeros(N)
    l = np.zeros(N)

    def pinned(fn):
        def run():
            with threadpool_limits(1):
                fn()
        return run

    variants = {name: pinned(lambda p=p: skeleton(q, k, v, bq, bk, p, o, m, l)) for name, p in PHASES.items()}
    variants["kernel"] = lambda: cpu.attention(q, k, v)
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
        tq, tk, tv = (torch.from_numpy(x)[None, None] for x in (q, k, v))
        variants["torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    except ImportError:
        pass
    times = _interleaved(variants, rounds)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    return {"dtype": np.dtype(dtype).name, "N": N, "M": M, "D": D, "bq": bq, "bk": bk, "median_ms": med,
            "phase_cost_ms": {name: med[name] - med["gemm"] for name in PHASES if name != "gemm"}, "all_ms": times}


def tile_sweep(dtype, N, M, D, shapes, rounds):
    from threadpoolctl import threadpool_limits

    q, k, v = _inputs(dtype, N, M, D)
    saved = cpu.TILING
    field = "forward64" if np.dtype(dtype) == np.float64 else "forward32"
    variants = {}
    for bq, bk in shapes:
        def kernel(bq=bq, bk=bk):
            cpu.TILING = saved._replace(**{field: (bq, bk)})
            try:
                cpu.attention(q, k, v)
            finally:
                cpu.TILING = saved

        def gemms(bq=bq, bk=bk):
            with threadpool_limits(1):
                gemm_roof(q, k, v, bq, bk)

        variants[f"kernel {bq}x{bk}"] = kernel
        variants[f"gemm {bq}x{bk}"] = gemms
    times = _interleaved(variants, rounds)
    rows = []
    for bq, bk in shapes:
        kt = float(np.median(times[f"kernel {bq}x{bk}"]))
        gt = float(np.median(times[f"gemm {bq}x{bk}"]))
        rows.append({"bq": bq, "bk": bk, "kernel_ms": kt, "gemm_ms": gt, "kernel_over_gemm": kt / gt})
    return {"dtype": np.dtype(dtype).name, "N": N, "M": M, "D": D, "current": list(saved), "rows": rows}


def markdown(res):
    m = res["machine"]
    env = ", ".join(f"{k}={v}" for k, v in (m.get("openblas_environment") or {}).items()) or "none"
    lines = [f"CPU profile, {m['cpu']} ({m.get('cpu_family_model', '?')}, {m.get('vector_isa', '?')}, L2 {m.get('l2_per_core', '?')} per core), "
             f"{m['cores']} cores, N = M = {res['N']}, D = {res['D']}, median of {res['rounds']} interleaved rounds ({res['date']}).",
             f"The kernels' BLAS: {m.get('kernels_blas', 'not recorded')} (OpenBLAS overrides in the environment: {env}); "
             f"torch {m.get('torch')}" + (f" ({m['torch_build']})." if m.get("torch_build") else "."), ""]
    lines += ["| dtype | tiles | GEMMs | +max | +exp & row sum | +rescale | skeleton | kernel | torch SDPA | kernel / GEMMs | torch / kernel |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["profiles"]:
        med = p["median_ms"]
        cost = p["phase_cost_ms"]
        torch_ms = med.get("torch")
        t_txt = "-" if torch_ms is None else f"{torch_ms:.1f}"
        ratio = "-" if torch_ms is None else f"{torch_ms / med['kernel']:.2f}"
        lines.append(f"| {p['dtype']} | {p['bq']}x{p['bk']} | {med['gemm']:.1f} | +{cost['+max']:.1f} | +{cost['+exp']:.1f} | "
                     f"+{cost['+rescale']:.1f} | {med['skeleton']:.1f} | {med['kernel']:.1f} | {t_txt} | "
                     f"{med['kernel'] / med['gemm']:.2f} | {ratio} |")
    lines += ["", "Times in ms; a phase's cost is its time minus the GEMMs' time (so the costs need not add up exactly).", ""]
    lines += ["Tile sweep (kernel and its own GEMMs, ms):", "", "| dtype | bq x bk | kernel | GEMMs | kernel / GEMMs |", "|---|---|---|---|---|"]
    for s in res["tiles"]:
        for r in s["rows"]:
            mark = " (chosen)" if [r["bq"], r["bk"]] == s["current"] else ""
            lines.append(f"| {s['dtype']} | {r['bq']}x{r['bk']}{mark} | {r['kernel_ms']:.1f} | {r['gemm_ms']:.1f} | {r['kernel_over_gemm']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_profile.json"))
    args = ap.parse_args()
    N = M = args.n
    shapes = {np.float64: [(128, 256), (256, 256), (512, 256), (512, 512), (1024, 256)],
              np.float32: [(256, 512), (512, 512), (512, 1024), (1024, 512)]}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "N": N, "M": M, "D": args.d, "rounds": args.rounds,
           "machine": dict(bench_cpu.machine(), kernels_blas=bench_cpu.kernels_blas(),
                           openblas_environment={k: os.environ[k] for k in bench_cpu.OPENBLAS_OVERRIDES if k in os.environ}),
           "loadavg_before": open("/proc/loadavg").read().split()[:3]}
    res["profiles"] = [profile(dt, N, M, args.d, args.rounds) for dt in (np.float64, np.float32)]
    res["tiles"] = [tile_sweep(dt, N, M, args.d, shapes[dt], max(3, args.rounds // 2)) for dt in (np.float64, np.float32)]
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
