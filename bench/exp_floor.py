"""The float64 exp floor on this CPU: the kernel's Numba exp against hand-written AVX2 versions, same loop, same run.

Why: for the forward kernel to run within 1.15x of its own GEMMs, the
softmin's exp (16.7 M elements at N = M = 4096) must cost under about 15% of
the GEMM time.  This script measures how fast a float64 exp within about
1 ulp can go on this CPU at all:

- ``numba``: the kernels' own exp (:func:`iem_ref.accel._fastexp.exp64_shifted`) in an ``@njit`` loop;
- ``poly1``, ``poly2``, ``poly4``: the same method written with AVX2/FMA
  intrinsics in C (``bench/exp_floor.c``, ``gcc -O2 -mavx2 -mfma``), one, two
  or four vectors per iteration (more independent work in flight);
- ``table``: a different design, ``2**(j/64)`` from a table (two gathers) and a degree-5 polynomial.

Each maps a cache-resident 4096-element buffer ``x -> exp(x) - 1`` over and
over, single-threaded; the variants take turns for several rounds and the
median is reported in ns per element, with the implied time for
``4096 * 4096`` elements on the machine's cores.  Accuracy: the largest
error in ulps against ``np.exp`` in ``longdouble`` (x87 extended, 64-bit
significand) on 200,000 points of ``[-708, 0]``.  The tables and
coefficients come from :mod:`iem_ref.accel._fastexp` (written to a header
in a temporary folder); needs ``gcc`` and an AVX2 CPU (otherwise the C rows
are skipped).

Usage::

    python bench/exp_floor.py            # writes bench/results/exp_floor.json and prints a table
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal, localcontext

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from iem_ref.accel import _fastexp as fe  # noqa: E402

MODES = ["poly1", "poly2", "poly4", "table"]


def header():
    """``exp_floor_tables.h``: the kernel's constants, and the table design's tables and coefficients."""
    th, tl = [], []
    with localcontext() as ctx:
        ctx.prec = 50
        for j in range(64):
            v = Decimal(2) ** (Decimal(j) / 64)
            th.append(float(v))
            tl.append(float(v - Decimal(th[-1])))
    b = fe.interpolation_coefficients(5, math.log(2.0) / 128 * (1 + 1e-6))

    def arr(name, xs):
        return f"static const double {name}[{len(xs)}] = {{{', '.join(repr(float(x)) for x in xs)}}};\n"

    consts = {"LOG2E": fe._LOG2E, "SHIFT": fe._SHIFT, "LN2_HI": fe._LN2_HI, "LN2_LO": fe._LN2_LO, "FLUSH": fe._FLUSH64}
    return "".join(f"#define {k} ({v!r})\n" for k, v in consts.items()) + arr("A", fe.C64) + arr("TH", th) + arr("TL", tl) + arr("B", b)


def build(tmp):
    gcc = shutil.which("gcc")
    if gcc is None:
        return None, "gcc not found"
    with open(os.path.join(tmp, "exp_floor_tables.h"), "w") as f:
        f.write(header())
    exe = os.path.join(tmp, "exp_floor")
    proc = subprocess.run([gcc, "-O2", "-mavx2", "-mfma", "-I", tmp, os.path.join(HERE, "exp_floor.c"), "-o", exe],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip()[-500:]
    return exe, None


def numba_loop():
    from numba import njit

    @njit(fastmath={"contract"})
    def run(buf, passes):
        for _ in range(passes):
            for j in range(buf.shape[0]):
                buf[j] = fe.exp64_shifted(buf[j]) - 1.0
        return buf.sum()

    def timed(passes):
        buf = -(np.arange(4096) % 97) * 0.01
        t0 = time.perf_counter()
        run(buf, passes)
        return (time.perf_counter() - t0) / (passes * 4096) * 1e9

    timed(1)
    return timed


def ulps(values, x):
    truth = np.exp(x.astype(np.longdouble))
    spacing = np.spacing(truth.astype(np.float64)).astype(np.longdouble)
    return float(np.max(np.abs((values.astype(np.longdouble) - truth) / spacing)))


def main():
    rounds, passes = 7, 3000
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.uniform(0, 708, 100_000), -rng.uniform(0, 2, 100_000)])
    extended = np.finfo(np.longdouble).nmant >= 63
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "rounds": rounds, "passes": passes,
              "elements_per_pass": 4096, "variants": {}}
    timers = {"numba": numba_loop()}
    with tempfile.TemporaryDirectory() as tmp:
        exe, why = build(tmp)
        if exe is None:
            result["c_skipped"] = why
        else:
            for mode in MODES:
                timers[mode] = lambda p, mode=mode: float(subprocess.run([exe, mode, str(p)], capture_output=True, text=True,
                                                                         check=True).stdout.split()[1])
        times = {name: [] for name in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                times[name].append(timer(passes))
        for name, ts in times.items():
            ns = float(np.median(ts))
            entry = {"ns_per_element": ns, "all_ns": ts, "ms_for_4096x4096_on_all_cores": ns * 4096 * 4096 / os.cpu_count() / 1e6}
            if extended:
                if name == "numba":
                    entry["max_ulps"] = ulps(fe.exp_shifted_array(x), x)
                elif name in ("poly1", "table"):
                    kind = "check-poly" if name == "poly1" else "check-table"
                    out = subprocess.run([exe, kind], input="\n".join(repr(float(v)) for v in x), capture_output=True, text=True, check=True)
                    entry["max_ulps"] = ulps(np.array([float(s) for s in out.stdout.split()]), x)
            result["variants"][name] = entry
    if not extended:
        result["accuracy_skipped"] = "longdouble has no extended precision here"
    out = os.path.join(HERE, "results", "exp_floor.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"float64 exp, single thread, median of {rounds} rounds ({result['date']}, {os.cpu_count()} cores)\n")
    print("| variant | ns / element | ms for 4096 x 4096 on all cores | max ulps |")
    print("|---|---|---|---|")
    for name, e in result["variants"].items():
        u = f"{e['max_ulps']:.2f}" if "max_ulps" in e else "-"
        print(f"| {name} | {e['ns_per_element']:.2f} | {e['ms_for_4096x4096_on_all_cores']:.1f} | {u} |")
    if "c_skipped" in result:
        print(f"\nC variants skipped: {result['c_skipped']}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
