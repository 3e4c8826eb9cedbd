"""First-call cost of the CPU kernels: compile (empty Numba cache) and cache load, per operation, dtype and kind.

Each measurement runs in its own process: the ``fresh`` run gets an empty
``NUMBA_CACHE_DIR``, the following ``cached`` run reuses it.  The backward is
timed with ``out`` and ``lse`` given, so that it compiles the backward kernel
alone (its forward is compiled first, in a process of its own).  ``plain``
calls use no variant; ``variants`` calls add a bias (the kernel every
variant call runs).  Each row is the median of ``--runs`` fresh runs.
``--baseline DIR`` times another checkout of this repository in turns with
this one (a machine's speed drifts: the ratio of the two is the robust
figure).

Results accumulate in ``bench/results/first_call.json``: one record per
machine (its CPU named) and ``--label`` (the code measured), replaced when
measured again; ``first_call.md`` is the table of every record.

    python bench/first_call.py --label "after" [--runs 3] [--kinds plain variants] [--baseline /tmp/before]
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
if {op!r} == "verdict":  # a kernel's output checked by iem_ref.testing's tiled oracle; the kernel is NumPy's
    from iem_ref.testing import assert_attention_close
    s = q @ q.T / np.sqrt(3.0).astype(dt) + kw.get("bias", 0)
    e = np.exp(s - s.max(-1, keepdims=True))
    out = (e / e.sum(-1, keepdims=True)) @ v
t0 = time.perf_counter()
if {op!r} == "forward":
    cpu.attention(q, q, v, **kw)
elif {op!r} == "verdict":
    assert_attention_close(out, q, q, v, oracle="tiled", **kw)
else:
    cpu.attention_vjp(q, q, v, v, out=v, lse=np.zeros(16, dt), **kw)
print(time.perf_counter() - t0)
"""


ROOT = os.path.dirname(HERE)


def _time(op, dtype, kind, env):
    t0 = time.perf_counter()
    # cwd: the cache folder, so that the working directory (first on sys.path for -c) shadows no checkout
    out = subprocess.run([sys.executable, "-c", _CALL.format(op=op, dtype=dtype, kind=kind)], env=env, check=True,
                         capture_output=True, text=True, cwd=env["NUMBA_CACHE_DIR"])
    return {"call_s": float(out.stdout.strip()), "process_s": time.perf_counter() - t0}


def _once(op, dtype, kind, env):
    """One fresh and one cached first call in an empty cache of their own."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(env, NUMBA_CACHE_DIR=cache)
        if op == "backward":  # its first call would also compile the forward: warm that first
            _time("forward", dtype, kind, env)
        return _time(op, dtype, kind, env), _time(op, dtype, kind, env)


def _summary(pairs):
    fresh, cached = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"fresh": {"call_s": statistics.median(x["call_s"] for x in fresh), "process_s": statistics.median(x["process_s"] for x in fresh),
                      "all_call_s": [x["call_s"] for x in fresh]},
            "cached": {"call_s": statistics.median(x["call_s"] for x in cached), "process_s": statistics.median(x["process_s"] for x in cached)}}


def measure(op, dtype, kind, runs, baseline=None):
    """``runs`` fresh/cached pairs of this checkout, and of ``baseline`` (another checkout's directory) taking turns with them."""
    mine, theirs = [], []
    here = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for _ in range(runs):
        mine.append(_once(op, dtype, kind, here))
        if baseline:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(baseline) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            theirs.append(_once(op, dtype, kind, env))
    row = {"op": op, "dtype": dtype, "kind": kind, "runs": runs, **_summary(mine)}
    if baseline:
        row["baseline"] = _summary(theirs)
    return row


def markdown(records):
    lines = ["# First call of the CPU kernels (`bench/first_call.py`)", "",
             "Seconds of the first call in a new process: `fresh` with an empty Numba cache (the kernel is compiled), "
             "`cached` loading it. The backward row compiles the backward kernel alone. Median of the runs. "
             "`baseline`: the same calls to another checkout, taking turns with this one in the same run.", "",
             "| machine | code | op | dtype | kind | fresh (s) | cached (s) | baseline fresh (s) | baseline / code | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        m = rec["machine"]
        name = f"{m.get('cpu')} ({m.get('cpu_family_model')}, {m.get('vector_isa')})"
        for row in rec["rows"]:
            base = row.get("baseline")
            b = f"{base['fresh']['call_s']:.2f} | {base['fresh']['call_s'] / row['fresh']['call_s']:.2f}" if base else "- | -"
            lines.append(f"| {name} | {rec['label']} | {row['op']} | {row['dtype']} | {row.get('kind', 'plain')} | "
                         f"{row['fresh']['call_s']:.2f} | {row['cached']['call_s']:.2f} | {b} | {row.get('runs', 1)} |")
    notes = [f"- {rec['label']}: baseline `{rec['baseline']}`" for rec in records if rec.get("baseline")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="the code measured (e.g. a commit, 'before', 'after')")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["plain", "variants"], choices=["plain", "variants"])
    p.add_argument("--baseline", help="another checkout of this repository, timed in turns with this one")
    p.add_argument("--ops", nargs="+", default=["forward", "backward"], choices=["forward", "backward", "verdict"],
                   help="verdict: iem_ref.testing.assert_attention_close(oracle='tiled') on a NumPy kernel's output")
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "first_call.json"))
    args = p.parse_args()
    from bench_cpu import machine

    rows = []
    for kind in args.kinds:
        for op in args.ops:
            for dtype in args.dtypes:
                row = measure(op, dtype, kind, args.runs, args.baseline)
                rows.append(row)
                base = f", baseline {row['baseline']['fresh']['call_s']:6.2f} s" if args.baseline else ""
                print(f"{kind:8s} {op:8s} {dtype}: first call {row['fresh']['call_s']:6.2f} s (empty cache), "
                      f"{row['cached']['call_s']:5.2f} s (cached){base}", flush=True)
    me = machine()
    record = {"machine": me, "label": args.label, "loadavg": os.getloadavg(), "rows": rows}
    if args.baseline:
        rev = subprocess.run(["git", "-C", args.baseline, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        record["baseline"] = (rev.stdout.strip() or os.path.basename(os.path.abspath(args.baseline)))[:80]
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
