"""Dask benchmark: ``iem_ref.dask.attention`` (``backend="cpu"``) against the one-process ``accel.cpu`` call.

One problem, ``N = M`` (default 8192), ``D = Dv = 64``, float64, queries and
keys in chunks of ``--chunk`` rows (default 2048: a 4 x 4 grid of blocks).
Configurations, each timed ``--repeats`` times after one warm-up call (which
compiles or loads the kernel in every process):

- ``accel.cpu``: one call, ``numba.get_num_threads()`` threads;
- ``dask threads, 1 worker`` and ``2 workers``: the threaded scheduler;
- ``LocalCluster 1 x 1`` and ``2 x 1``: ``distributed``, worker processes
  with one thread each (inputs scattered to the workers beforehand, so that
  the timings hold the computation and the partials' traffic only).

Reported per configuration: the median and minimum time, the speed-up of two
workers over one, and the scheduler's cost as the ratio to ``accel.cpu``.
The machine (``bench_cpu.machine()``) and the load average before and after
are recorded: other processes on a shared machine move the numbers.

Usage::

    python bench/bench_dask.py --out bench/results/dask.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import _loadavg, machine  # noqa: E402


def _timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import dask.array as da
    from distributed import Client, LocalCluster

    from iem_ref import dask as idk
    from iem_ref.accel import cpu

    rng = np.random.default_rng(0)
    n, d = args.n, args.d
    q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
    result = {"machine": machine(), "problem": dict(N=n, M=n, D=d, Dv=d, dtype="float64", chunk=args.chunk),
              "loadavg_start": _loadavg(), "results": {}}
    res = result["results"]
    res["accel.cpu"] = _timed(lambda: cpu.attention(q, k, v), args.repeats)
    c = args.chunk
    qd = da.from_array(q, chunks=(c, d))
    kd, vd = da.from_array(k, chunks=(c, d)), da.from_array(v, chunks=(c, d))
    a = idk.attention(qd, kd, vd)
    for workers in (1, 2):
        res[f"dask threads, {workers} worker(s)"] = _timed(lambda: a.compute(scheduler="threads", num_workers=workers),
                                                            args.repeats)
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            qs, ks, vs = (da.from_array(x, chunks=(c, d)).persist() for x in (q, k, v))
            client.wait_for_workers(workers)
            ac = idk.attention(qs, ks, vs)
            res[f"LocalCluster {workers} x 1"] = _timed(lambda: client.compute(ac, sync=True), args.repeats)
    one = res["LocalCluster 1 x 1"]["median_s"]
    two = res["LocalCluster 2 x 1"]["median_s"]
    base = res["accel.cpu"]["median_s"]
    result["summary"] = {
        "speedup_2_over_1_processes": one / two,
        "speedup_2_over_1_threads": res["dask threads, 1 worker(s)"]["median_s"] / res["dask threads, 2 worker(s)"]["median_s"],
        "ratio_to_accel_cpu": {name: r["median_s"] / base for name, r in res.items()},
    }
    result["loadavg_end"] = _loadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
