"""First-call cost of the CPU kernels: compile (empty Numba cache) and cache load, per operation and dtype.

Each measurement runs in its own process: ``--fresh`` runs get an empty
``NUMBA_CACHE_DIR``, the following ``cached`` run reuses it.  The backward is
timed with ``out`` and ``lse`` given, so that it compiles the backward kernel
alone.  Writes ``bench/results/first_call.json`` with the machine.

    python bench/first_call.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
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
t0 = time.perf_counter()
if {op!r} == "forward":
    cpu.attention(q, q, v)
else:
    cpu.attention_vjp(q, q, v, v, out=v, lse=np.zeros(16, dt))
print(time.perf_counter() - t0)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "first_call.json"))
    args = p.parse_args()
    from bench_cpu import machine

    rows = []
    for op in ("forward", "backward"):
        for dtype in ("float64", "float32"):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, NUMBA_CACHE_DIR=cache)
                if op == "backward":  # its first call would also compile the forward: warm that first
                    subprocess.run([sys.executable, "-c", _CALL.format(op="forward", dtype=dtype)], env=env, check=True, capture_output=True)
                got = {}
                for kind in ("fresh", "cached"):
                    t0 = time.perf_counter()
                    out = subprocess.run([sys.executable, "-c", _CALL.format(op=op, dtype=dtype)], env=env, check=True,
                                         capture_output=True, text=True)
                    got[kind] = {"call_s": float(out.stdout.strip()), "process_s": time.perf_counter() - t0}
            rows.append({"op": op, "dtype": dtype, **got})
            print(f"{op:8s} {dtype}: first call {got['fresh']['call_s']:6.2f} s (empty cache), {got['cached']['call_s']:5.2f} s (cached)")
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "loadavg": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
