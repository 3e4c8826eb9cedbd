"""Decoding over more keys than the machine holds: ``iem_ref.dask.attention`` on keys generated chunk by chunk.

``N`` queries (default 16) over ``M`` keys (default 10**8), ``D = Dv = 64``,
float32: K and V are Dask random arrays (``dask.array.random.default_rng``),
so each chunk of ``--chunk`` keys (default 2**20) is generated inside the task
that reads it and freed after; nothing of size ``M`` is ever held.  The
partials of the key chunks merge by M2 in a tree (``iem_ref.dask``).  Run on a
``LocalCluster`` of ``--workers`` processes with one thread each.

Reported: the wall time, the peak resident memory of each worker process
(``getrusage``; bounded by a few chunks, not by ``M``), the bytes of K and V
that went through the computation, and the machine.  A small twin
(``--check-m`` keys, default 2**20) is also computed on one process by
``accel.cpu`` from the same generator's arrays, and the two results must agree
within the merge bound's order (printed, not asserted: this is a benchmark).

Usage::

    python bench/dask_out_of_memory.py --out bench/results/dask_out_of_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import _loadavg, machine  # noqa: E402


def _peak_rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--m", type=int, default=10**8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2**20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check-m", type=int, default=2**20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import dask.array as da
    from distributed import Client, LocalCluster

    from iem_ref import dask as idk
    from iem_ref.accel import cpu

    n, m, d, c = args.n, args.m, args.d, args.chunk
    q = np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)
    gen = da.random.default_rng(0)
    k = gen.standard_normal(size=(m, d), chunks=(c, d), dtype=np.float32)
    v = gen.standard_normal(size=(m, d), chunks=(c, d), dtype=np.float32)
    result = {
        "machine": machine(),
        "problem": dict(N=n, M=m, D=d, Dv=d, dtype="float32", chunk=c, workers=args.workers,
                        kv_bytes=2 * m * d * 4, key_chunks=-(-m // c)),
        "loadavg_start": _loadavg(),
    }
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=0) as cluster, Client(cluster) as client:
        client.wait_for_workers(args.workers)
        a, lse = idk.attention(q, k, v, return_lse=True)
        t = time.perf_counter()
        a_out, lse_out = client.compute([a, lse], sync=True)
        result["seconds"] = time.perf_counter() - t
        result["peak_rss_mib_per_worker"] = sorted(client.run(_peak_rss_mib).values())
    result["finite"] = bool(np.isfinite(a_out).all() and np.isfinite(lse_out).all())

    # the small twin: the same generator's first check_m keys, one process, accel.cpu against iem_ref.dask
    mc = min(args.check_m, m)
    kc, vc = (x[:mc].compute() for x in (k, v))
    a_one, lse_one = cpu.attention(q, kc, vc, return_lse=True)
    a_chunked, lse_chunked = (x.compute(scheduler="threads") for x in idk.attention(
        q, da.from_array(kc, chunks=(max(c // 16, 1), d)), da.from_array(vc, chunks=(max(c // 16, 1), d)), return_lse=True))
    result["check"] = dict(M=mc, max_abs_diff_output=float(np.max(np.abs(a_one - a_chunked))),
                           max_abs_diff_lse=float(np.max(np.abs(lse_one - lse_chunked))))
    result["loadavg_end"] = _loadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
