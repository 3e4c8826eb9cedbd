"""What a verdict costs: ``iem_ref.testing`` against the float64 torch composition people write instead.

The kernel under test is torch's SDPA (bf16 or float32, causal or not) at
``B, H, N = M, D``; its output (forward) or its gradients (backward, for a
random ``grad_out``) are computed first and not timed.  Then one of:

* ``composition``: the check people write: upcast to float64, materialise
  ``softmax(q k^T scale) v`` (with autograd for the backward) and take the
  largest difference (which a rule-of-thumb tolerance then judges);
* ``tiled``: ``assert_attention_close`` / ``assert_attention_vjp_close``
  with the default oracle (the tiled float64 oracles for these kernels);
* ``reference``: the NumPy reference's pipeline (``N x M`` float64
  temporaries): ``oracle="reference"``, where ``--reference`` asks for it.

Each measurement runs in its own process (a fresh interpreter, the modules
imported before the clock starts, kernels loaded from Numba's cache, which
a warm-up process fills first); the paths
take turns, ``--runs`` times, and the table gives the median time and the
peak resident memory beyond what the process held before the check (the
inputs and the kernel's results).  Results go to
``bench/results/verdict.json`` (one record per machine and size) and
``verdict.md``.

    python bench/verdict.py [--size 2 16 4096 128] [--runs 3] [--passes forward backward] [--reference]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
# the modules a check imports, imported before the clock starts (a test suite imports them once)
import ml_dtypes, iem_ref.accel.verdict  # noqa: F401,E401
from iem_ref.testing import assert_attention_close, assert_attention_vjp_close
B, H, N, D, dtype, causal, pass_, path = {args!r}
torch.manual_seed(0)
dt = getattr(torch, dtype)
q, k, v = (torch.randn(B, H, N, D).to(dt) for _ in range(3))
F = torch.nn.functional
if pass_ == "forward":
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
else:
    g = torch.randn(B, H, N, D).to(dt)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal).backward(g)
    grads = (qq.grad, kk.grad, vv.grad)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def composition():
    q6, k6, v6 = (x.double() for x in (q, k, v))
    if pass_ == "backward":
        q6, k6, v6 = (x.requires_grad_() for x in (q6, k6, v6))
    s = (q6 @ k6.transpose(-1, -2)) * D**-0.5
    if causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -float("inf"))
    o = torch.softmax(s, -1) @ v6
    # the comparison such a check makes (its verdict, a rule-of-thumb tolerance, is not the point here: its cost is)
    if pass_ == "forward":
        worst = [float((out.double() - o).abs().max())]
    else:
        o.backward(g.double())
        worst = [float((mine.double() - ref).abs().max()) for mine, ref in zip(grads, (q6.grad, k6.grad, v6.grad))]
    return worst


def verdict(oracle):
    if pass_ == "forward":
        assert_attention_close(out, q, k, v, is_causal=causal, oracle=oracle)
    else:  # torch's CPU backward stores dq, dk, dv in bf16/fp16 per block: its precision model says so (README)
        from iem_ref.precision import Precision
        blocks = (256 if N >= 768 else 64 if N >= 192 else 32, 512)
        prec = Precision.of(dtype, gradient_blocks=blocks) if dtype in ("bfloat16", "float16") else None
        assert_attention_vjp_close(*grads, q, k, v, g, is_causal=causal, precision=prec, oracle=oracle)


before = rss()
t0 = time.perf_counter()
if path == "composition":
    composition()
else:
    verdict(None if path == "tiled" else "reference")
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(elapsed, max(0, peak - before), before)
"""


def _child(args, env=None):
    """``(seconds, extra bytes, held bytes)`` of one check in its own process; ``None`` where the process died (a
    path that does not fit in memory is killed): the table says so rather than the run stopping."""
    out = subprocess.run([sys.executable, "-c", _CHILD.format(args=args)], capture_output=True, text=True, env=env)
    if out.returncode < 0:
        print(f"the check {args} was killed (signal {-out.returncode}: out of memory?)", file=sys.stderr, flush=True)
        return None
    if out.returncode:
        raise RuntimeError(f"the check {args} failed:\n{out.stderr[-3000:]}")
    t, extra, before = out.stdout.split()
    return float(t), int(extra), int(before)


def machine():
    from iem_ref.accel.machine import describe
    import numpy as np
    import platform

    info = describe()
    rec = dict(cpu=info["cpu"], vector=info["vector"], cores=info["cores"], python=platform.python_version(), numpy=np.__version__)
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, val = line.partition(":")
            fields.setdefault(key.strip(), val.strip())
    rec["family_model"] = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    blas = info["blas"] or {}
    rec["blas"] = f"{blas.get('library', '?')} {blas.get('version', '?')} ({blas.get('kernels', '?')} kernels)"
    try:
        import torch

        rec["torch"] = torch.__version__
    except ImportError:
        pass
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=4, default=[2, 16, 4096, 128], metavar=("B", "H", "N", "D"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--causal", nargs="+", default=["0", "1"])
    ap.add_argument("--passes", nargs="+", default=["forward", "backward"])
    ap.add_argument("--reference", action="store_true", help="also time oracle='reference' (N x M float64 temporaries)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    B, H, N, D = a.size
    rows = []
    for pass_ in a.passes:
        paths = ["composition", "tiled"] + (["reference"] if a.reference else [])
        for dtype in a.dtypes:
            for causal in (c == "1" for c in a.causal):
                _child((B, H, min(N, 256), D, dtype, causal, pass_, paths[-1]))  # fill Numba's cache for this case
                times = {p: [] for p in paths}
                extra = {p: [] for p in paths}
                held = []
                for _ in range(a.runs):
                    for p in paths:  # the paths take turns
                        res = _child((B, H, N, D, dtype, causal, pass_, p))
                        if res is None:
                            continue
                        t, x, before = res
                        times[p].append(t)
                        extra[p].append(x)
                        held.append(before)
                row = dict(pass_=pass_, dtype=dtype, causal=causal, B=B, H=H, N=N, D=D, held_gb=max(held, default=0) / 1e9)
                for p in paths:
                    row[f"{p}_runs"] = times[p]
                    row[f"{p}_killed"] = a.runs - len(times[p])
                    if times[p]:
                        row[f"{p}_s"] = statistics.median(times[p])
                        row[f"{p}_extra_gb"] = max(extra[p]) / 1e9
                for p in paths[1:]:
                    if f"{p}_s" in row and "composition_s" in row:
                        row[f"{p}_ratio"] = row[f"{p}_s"] / row["composition_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.no_save:
        return
    path = RESULTS / "verdict.json"
    records = json.loads(path.read_text()) if path.exists() else []
    mach = machine()
    records = [r for r in records if not (r["machine"]["cpu"] == mach["cpu"] and r["size"] == a.size
                                         and r.get("passes") == a.passes)]
    records.append(dict(machine=mach, size=a.size, passes=a.passes, runs=a.runs, rows=rows))
    path.write_text(json.dumps(records, indent=1) + "\n")
    _write_md(records)


def _write_md(records):
    lines = ["# What a verdict costs", "",
             "`python bench/verdict.py`: torch SDPA is the kernel under test; each check in its own process, the paths taking",
             "turns; median of the runs.  *composition*: upcast to float64, materialise, the largest difference (what",
             "people write instead); *tiled*: `iem_ref.testing` with its default oracle; *reference*: `oracle=\"reference\"`.",
             "Memory: peak resident beyond what the process held before the check (inputs and the kernel's results, *held*).",
             "*killed*: every run of that path died (the kernel killed it: out of memory on this machine).", ""]
    for rec in records:
        m = rec["machine"]
        B, H, N, D = rec["size"]
        lines += [f"## {m['cpu']} (family/model {m.get('family_model', '?')}, {m['vector']}, {m['cores']} cores), "
                  f"B = {B}, H = {H}, N = M = {N}, D = {D}", "",
                  f"BLAS {m.get('blas', '?')}, torch {m.get('torch', '-')}, numpy {m['numpy']}, {rec['runs']} runs.", ""]
        lines += ["| pass | dtype | causal | composition | tiled | tiled / composition | reference | reference / composition "
                  "| held | extra: composition | extra: tiled | extra: reference |", "|" + "---|" * 12]
        def cell(r, key, fmt):
            if key in r:
                return fmt.format(r[key])
            path = key.split("_")[0]
            return "killed (out of memory)" if r.get(f"{path}_killed") else "-"

        for r in rec["rows"]:
            lines.append("| " + " | ".join([
                r["pass_"], r["dtype"], "yes" if r["causal"] else "no", cell(r, "composition_s", "{:.2f} s"),
                cell(r, "tiled_s", "{:.2f} s"), cell(r, "tiled_ratio", "{:.2f}x"), cell(r, "reference_s", "{:.2f} s"),
                cell(r, "reference_ratio", "{:.1f}x"), f"{r['held_gb']:.2f} GB", cell(r, "composition_extra_gb", "{:.2f} GB"),
                cell(r, "tiled_extra_gb", "{:.2f} GB"), cell(r, "reference_extra_gb", "{:.2f} GB")]) + " |")
        lines.append("")
    (RESULTS / "verdict.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
