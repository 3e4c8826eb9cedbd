"""The fastest GEMM on this host for the CPU kernels' tiles: OpenBLAS under each of its x86 kernel sets, MKL, torch.

The forward kernel's work is two GEMMs per tile (scores ``K_b^T Q_b``: ``bk x
bq x D``; values ``V_b^T P``: ``Dv x bq x bk``) at the tiles
:func:`iem_ref.accel.cpu.plan` picks.  This script times exactly those two
products on one core, for every GEMM it can reach, each provider in its own
process (an OpenBLAS build for many CPUs picks its kernels once, as it
loads, from the CPU or from ``OPENBLAS_CORETYPE``):

- ``openblas:<core>``: SciPy's OpenBLAS (the one the kernels call) with
  ``OPENBLAS_CORETYPE=<core>``; ``openblas:detected`` with OpenBLAS's
  variables that override the CPU's identity (``OPENBLAS_CORETYPE``,
  ``OPENBLAS_L2_SIZE``) removed, so that it reads the CPU itself;
  ``openblas:environment`` with the environment as given;
- ``mkl``: ``cblas_?gemm`` from ``libmkl_rt`` (PyPI's ``mkl`` package, if
  installed in this environment), sequential threading layer;
- ``torch``: ``torch.matmul(..., out=)`` with one thread (its MKL/oneDNN build).

Every provider is called from Python with preallocated operands, so each
call carries the same few microseconds of call overhead (under 3% of a
tile's time here).  Paths take turns over ``--rounds`` rounds; reported is
the median GFLOP/s over rounds of each round's best batch.

Usage::

    python bench/gemm_cores.py --out bench/results/gemm_cores.json
    python bench/gemm_cores.py --table bench/results/gemm_cores.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import bench_cpu  # noqa: E402  (the machine record and OpenBLAS's kernel set, as the CPU benchmark records them)

_OPENBLAS_CORES = ("Haswell", "SkylakeX")
_D = 64


def _tiles(dtype):
    from iem_ref.accel import cpu

    bq, bk, _ = cpu.plan(1, 4096, 4096, np.dtype(dtype))
    return bq, bk


def _operands(dtype, bq, bk):
    rng = np.random.default_rng(0)
    kT = np.asfortranarray(rng.standard_normal((bk, _D)).astype(dtype))
    q = np.asfortranarray(rng.standard_normal((_D, bq)).astype(dtype))
    vT = np.asfortranarray(rng.standard_normal((_D, bk)).astype(dtype))
    s = np.zeros((bk, bq), dtype, order="F")
    o = np.zeros((_D, bq), dtype, order="F")
    return kT, q, vT, s, o


def _mkl_path():
    hits = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return hits[0] if hits else None


def _calls(provider, dtype, bq, bk):
    """Two zero-argument callables (the score and the value product) for one provider."""
    kT, q, vT, s, o = _operands(dtype, bq, bk)
    if provider.startswith("openblas"):
        from scipy.linalg import blas

        gemm = blas.dgemm if dtype == "float64" else blas.sgemm
        return (lambda: gemm(1.0, kT, q, 0.0, s, overwrite_c=True),
                lambda: gemm(1.0, vT, s, 0.0, o, overwrite_c=True))
    if provider == "mkl":
        import ctypes

        lib = ctypes.CDLL(_mkl_path())
        lib.MKL_Set_Threading_Layer(ctypes.c_int(1))  # MKL_THREADING_SEQUENTIAL: one core, as inside the kernels
        real = ctypes.c_double if dtype == "float64" else ctypes.c_float
        fn = lib.cblas_dgemm if dtype == "float64" else lib.cblas_sgemm
        fn.argtypes = [ctypes.c_int] * 6 + [real, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                            real, ctypes.c_void_p, ctypes.c_int]
        col, no = 102, 111  # CblasColMajor, CblasNoTrans

        def product(a, b, c):
            m, kk = a.shape
            n = b.shape[1]
            return lambda: fn(col, no, no, m, n, kk, 1.0, a.ctypes.data, m, b.ctypes.data, kk, 0.0, c.ctypes.data, m)

        return product(kT, q, s), product(vT, s, o)
    if provider == "torch":
        import torch

        torch.set_num_threads(1)
        t = [torch.from_numpy(x) for x in (kT, q, vT, s, o)]
        return (lambda: torch.matmul(t[0], t[1], out=t[3]),
                lambda: torch.matmul(t[2], t[3], out=t[4]))
    raise ValueError(provider)


def worker(provider, batches, reps):
    out = {"provider": provider}
    if provider.startswith("openblas"):
        out["openblas"] = bench_cpu.kernels_blas()
    for dtype in ("float64", "float32"):
        bq, bk = _tiles(dtype)
        flops = 2.0 * bk * bq * _D
        res = {"tiles": [bq, bk]}
        for name, fn in zip(("scores", "values"), _calls(provider, dtype, bq, bk)):
            for _ in range(5):
                fn()
            best = float("inf")
            for _ in range(batches):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                best = min(best, (time.perf_counter() - t0) / reps)
            res[name + "_gflops"] = flops / best / 1e9
        out[dtype] = res
    return out


def providers():
    found = ["openblas:environment", "openblas:detected"] + [f"openblas:{c}" for c in _OPENBLAS_CORES]
    if _mkl_path():
        found.append("mkl")
    try:
        import torch  # noqa: F401

        found.append("torch")
    except ImportError:
        pass
    return found


def _env(provider):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if provider != "openblas:environment":  # OpenBLAS reads the CPU (and its caches) itself
        env = bench_cpu.openblas_detects(env)
    if provider.split(":")[-1] in _OPENBLAS_CORES:
        env["OPENBLAS_CORETYPE"] = provider.split(":")[1]
    return env


def run(args):
    found = providers()
    result = {"machine": bench_cpu.machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "environment": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("OPENBLAS_", "MKL_"))},
              "rounds": args.rounds, "batches": args.batches, "reps": args.reps, "loadavg_start": bench_cpu._loadavg(), "runs": {p: [] for p in found}}
    for _ in range(args.rounds):
        for p in found:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", p, "--batches", str(args.batches), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(p))
            if proc.returncode != 0:
                result["runs"][p].append({"error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            result["runs"][p].append(r)
            print(p, r.get("openblas", ""), {d: {k: round(v, 1) for k, v in r[d].items() if k.endswith("gflops")} for d in ("float64", "float32")}, flush=True)
    result["loadavg_end"] = bench_cpu._loadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


def table(result):
    m = result["machine"]
    env = result.get("environment") or {}
    lines = [
        f"Machine: {m.get('cpu', '?')} ({m.get('cpu_family_model', '?')}, {m.get('vector_isa', '?')}, L2 {m.get('l2_per_core', '?')} per core), "
        f"{m.get('cores')} cores; NumPy {m.get('numpy')}, SciPy {m.get('scipy')}, torch {m.get('torch')}.",
        "Environment: " + (", ".join(f"`{k}={v}`" for k, v in env.items()) or "no OpenBLAS or MKL variables") + ".",
        f"Command: `{result['command']}`; one core; median over {result['rounds']} rounds (providers taking turns, each in its own process) "
        f"of each round's best of {result['batches']} batches x {result['reps']} calls; load average (1 min) "
        f"{result['loadavg_start'][0]}-{(result.get('loadavg_end') or ['?'])[0]}.",
        "",
        "| GEMM | kernels picked | float64 scores | float64 values | float32 scores | float32 values |",
        "|---|---|---|---|---|---|",
    ]
    tiles = None
    for p, runs in result["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {p} | error: {runs[0]['error'] if runs else 'not run'} | - | - | - | - |")
            continue
        tiles = {d: ok[0][d]["tiles"] for d in ("float64", "float32")}
        cells = [f"{np.median([r[d][k] for r in ok]):.1f}" for d in ("float64", "float32") for k in ("scores_gflops", "values_gflops")]
        lines.append(f"| {p} | {ok[0].get('openblas') or '-'} | " + " | ".join(cells) + " |")
    if tiles:
        lines.append("")
        lines.append(f"GFLOP/s on one core.  Tiles (bq x bk, D = {_D}): float64 {tiles['float64'][0]} x {tiles['float64'][1]}, "
                     f"float32 {tiles['float32'][0]} x {tiles['float32'][1]}; scores `K_b^T Q_b` ({tiles['float64'][1]} x {tiles['float64'][0]} x {_D} "
                     "in float64), values `V_b^T P` (64 x bq x bk).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=7)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gemm_cores.json"))
    p.add_argument("--table", metavar="JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batches, args.reps)))
        return
    run(args)


if __name__ == "__main__":
    main()
