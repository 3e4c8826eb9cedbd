"""First-call cost of the CPU kernels: compile (empty Numba cache) and cache load, per operation, dtype and kind.

Each measurement runs in its own process: the ``fresh`` run gets an empty
``NUMBA_CACHE_DIR``, the following ``cached`` run reuses it.  The backward is
timed with ``out`` and ``lse`` given, so that it compiles the backward kernel
alone (its forward is compiled first, in a process of its own).  ``plain``
calls use no variant; ``variants`` calls add a bias (the kernel every
variant call runs).  Each row is the median of ``--runs`` fresh runs.

Results accumulate in ``bench/results/first_call.json``: one record per
machine (its CPU named) and ``--label`` (the code measured), replaced when
measured again; ``first_call.md`` is the table of every record.

    python bench/first_call.py --label "after" [--runs 3] [--kinds plain variants]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

_CALL = """
import time, warnings
warnings.simplefilter("ignore")
import numpy as np
from iem_ref.accel import cpu
dt = np.dtype({dtype!r})
q = np.linspace(-1, 1, 48).reshape(16, 3).astype(dt)
v = q[:, :2].copy()
kw = dict(bias=np.zeros((16, 16), dt)) if {kind!r} == "variants" else dict()
t0 = time.perf_counter()
if {op!r} == "forward":
    cpu.attention(q, q, v, **kw)
else:
    cpu.attention_vjp(q, q, v, v, out=v, lse=np.zeros(16, dt), **kw)
print(time.perf_counter() - t0)
"""


def _time(op, dtype, kind, env):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CALL.format(op=op, dtype=dtype, kind=kind)], env=env, check=True,
                         capture_output=True, text=True)
    return {"call_s": float(out.stdout.strip()), "process_s": time.perf_counter() - t0}


def measure(op, dtype, kind, runs):
    fresh, cached = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            if op == "backward":  # its first call would also compile the forward: warm that first
                _time("forward", dtype, kind, env)
            fresh.append(_time(op, dtype, kind, env))
            cached.append(_time(op, dtype, kind, env))
    med = lambda xs, key: statistics.median(x[key] for x in xs)  # noqa: E731
    return {"op": op, "dtype": dtype, "kind": kind, "runs": runs,
            "fresh": {"call_s": med(fresh, "call_s"), "process_s": med(fresh, "process_s"), "all_call_s": [x["call_s"] for x in fresh]},
            "cached": {"call_s": med(cached, "call_s"), "process_s": med(cached, "process_s")}}


def markdown(records):
    lines = ["# First call of the CPU kernels (`bench/first_call.py`)", "",
             "Seconds of the first call in a new process: `fresh` with an empty Numba cache (the kernel is compiled), "
             "`cached` loading it. The backward row compiles the backward kernel alone. Median of the runs.", "",
             "| machine | code | op | dtype | kind | fresh (s) | cached (s) | runs |", "|---|---|---|---|---|---|---|---|"]
    for rec in records:
        m = rec["machine"]
        name = f"{m.get('cpu')} ({m.get('cpu_family_model')}, {m.get('vector_isa')})"
        for row in rec["rows"]:
            lines.append(f"| {name} | {rec['label']} | {row['op']} | {row['dtype']} | {row.get('kind', 'plain')} | "
                         f"{row['fresh']['call_s']:.2f} | {row['cached']['call_s']:.2f} | {row.get('runs', 1)} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="the code measured (e.g. a commit, 'before', 'after')")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["plain", "variants"], choices=["plain", "variants"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "first_call.json"))
    args = p.parse_args()
    from bench_cpu import machine

    rows = []
    for kind in args.kinds:
        for op in ("forward", "backward"):
            for dtype in ("float64", "float32"):
                row = measure(op, dtype, kind, args.runs)
                rows.append(row)
                print(f"{kind:8s} {op:8s} {dtype}: first call {row['fresh']['call_s']:6.2f} s (empty cache), "
                      f"{row['cached']['call_s']:5.2f} s (cached)", flush=True)
    me = machine()
    record = {"machine": me, "label": args.label, "loadavg": os.getloadavg(), "rows": rows}
    records = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            records = json.load(f)
    key = lambda r: (r["machine"].get("cpu_family_model"), r["label"])  # noqa: E731
    records = [r for r in records if key(r) != key(record)] + [record]
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(records))


if __name__ == "__main__":
    main()
