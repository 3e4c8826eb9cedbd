"""CPU benchmark of the variants on the accelerated path: a sliding window, grouped-query decoding, packed sequences; against torch and the machine.

Each (case, path) runs in its own process, the paths taking turns for
``--rounds`` rounds (one warm-up call, then ``--repeats`` timed calls each);
reported: the median over all timed calls, and the ratios that matter.

``--case window`` (``N = M``, D = 64, float64 and float32):

- ``cpu causal``: :func:`iem_ref.accel.cpu.attention` with ``is_causal=True``;
- ``cpu window``: the same with ``window=(W, 0)`` (a causal sliding window of
  ``W`` keys before each query, FlashAttention's ``window_size=(W, 0)``);
- ``torch causal``: ``scaled_dot_product_attention(is_causal=True)``;
- ``torch window``: SDPA given the equivalent boolean ``(N, M)`` mask (torch
  has no window argument); the mask is built before the timing;
- with ``--backward``, ``cpu causal`` and ``cpu window`` backward
  (:func:`iem_ref.accel.cpu.attention_vjp` with the saved ``out`` and ``lse``).

``--case gqa``: grouped-query decoding (V6), ``Hq = 32`` query heads over
``Hkv = 8`` key/value heads, ``N = 1``, ``M = 2^20``, D = 128, float32 (K
and V take 8 GiB; float64 would not leave room for torch's run on a 24 GiB
machine):

- ``cpu gqa``: :func:`iem_ref.accel.cpu.attention` with ``enable_gqa=True``;
- ``torch gqa``: ``scaled_dot_product_attention(enable_gqa=True)``;
- ``read K, V``: one parallel read of K and V (``roofs.stream_roof``, all
  cores): the memory floor of decoding.

``--threads 1 2``: the same case at each thread count (``NUMBA_NUM_THREADS``
and ``OMP_NUM_THREADS`` of the worker processes, the read included), in one
run: whether the kernel is held by the memory or by its own work per core.

``--case packed``: packed variable-length sequences (V7), ``S = 8`` causal
segments of random lengths (fixed seed, recorded) summing to ``N = 16384``,
D = 64, float64 and float32:

- ``cpu packed``: one :func:`iem_ref.accel.cpu.attention` call with
  ``cu_seqlens_q = cu_seqlens_k`` and ``is_causal=True``;
- ``cpu per segment``: one call per segment on its slice, in a loop (the
  work the packed call must match: its target is 1.2x of it);
- ``torch packed``: SDPA given the equivalent block-diagonal causal boolean
  ``(N, N)`` mask (torch has no packed-sequence argument on the CPU);
- ``torch per segment``: SDPA ``is_causal=True`` per segment, in a loop;
- with ``--backward``, the two CPU paths' backward.

Writes ``bench/results/variants.json``, ``bench/results/gqa_decode.json`` or
``bench/results/packed.json`` (with the machine and the load) and prints
the Markdown table.

    python bench/bench_variants.py [--n 16384] [--window 256] [--backward] [--out PATH]
    python bench/bench_variants.py --case gqa [--m 1048576] [--threads 1 2]
    python bench/bench_variants.py --case packed [--n 16384] [--segments 8] [--backward]
    python bench/bench_variants.py --table bench/results/variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

PATHS = ["cpu causal", "cpu window", "torch causal", "torch window"]
GQA_PATHS = ["cpu gqa", "torch gqa", "read K, V"]
PACKED_PATHS = ["cpu packed", "cpu per segment", "torch packed", "torch per segment"]


def packed_lengths(n, segments, seed=0):
    """``segments`` random positive lengths summing to ``n`` (cuts drawn without replacement; fixed seed)."""
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, n), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int64)


def _packed_call(case, path):
    """The timed callable of one packed-sequence (case, path)."""
    rng = np.random.default_rng(0)
    dt = np.dtype(case["dtype"])
    N, D = case["N"], case["D"]
    cu = np.concatenate([[0], np.cumsum(case["lengths"])]).astype(np.int64)
    q, k, v, u = (rng.standard_normal((N, D)).astype(dt) for _ in range(4))
    spans = list(zip(cu[:-1], cu[1:]))
    if path.startswith("cpu"):
        from iem_ref.accel import cpu

        if path == "cpu packed":
            kw = dict(is_causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
            if case["kind"] == "packed backward":
                a, L = cpu.attention(q, k, v, return_lse=True, **kw)
                return lambda: cpu.attention_vjp(q, k, v, u, out=a, lse=L, **kw)
            return lambda: cpu.attention(q, k, v, **kw)
        if case["kind"] == "packed backward":
            saved = [cpu.attention(q[s0:s1], k[s0:s1], v[s0:s1], is_causal=True, return_lse=True) for s0, s1 in spans]
            return lambda: [cpu.attention_vjp(q[s0:s1], k[s0:s1], v[s0:s1], u[s0:s1], is_causal=True, out=a, lse=L)
                            for (s0, s1), (a, L) in zip(spans, saved)]
        return lambda: [cpu.attention(q[s0:s1], k[s0:s1], v[s0:s1], is_causal=True) for s0, s1 in spans]
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_numpy(x)[None, None] for x in (q, k, v))
    if path == "torch packed":
        seg = torch.from_numpy(np.repeat(np.arange(len(spans)), case["lengths"]))
        i = torch.arange(N)
        allowed = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])  # the same keys as the segments with causality

        def packed():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed)

        return packed

    def per_segment():
        with torch.no_grad():
            return [F.scaled_dot_product_attention(tq[..., s0:s1, :], tk[..., s0:s1, :], tv[..., s0:s1, :], is_causal=True)
                    for s0, s1 in spans]

    return per_segment


def _gqa_call(case, path):
    """The timed callable of one grouped-query decoding (case, path)."""
    rng = np.random.default_rng(0)
    dt = np.dtype(case["dtype"])
    hq, hkv, N, M, D = case["Hq"], case["Hkv"], case["N"], case["M"], case["D"]
    q = rng.standard_normal((1, hq, N, D), dtype=dt)
    k = rng.standard_normal((1, hkv, M, D), dtype=dt)
    v = rng.standard_normal((1, hkv, M, D), dtype=dt)
    if path == "cpu gqa":
        from iem_ref.accel import cpu

        return lambda: cpu.attention(q, k, v, enable_gqa=True)
    if path == "read K, V":
        import roofs

        k2, v2 = k.reshape(-1, D), v.reshape(-1, D)
        return lambda: roofs.stream_roof(k2, v2)
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)

    return fwd


def _call(case, path):
    """The timed callable of one (case, path)."""
    if case["kind"] == "gqa decode":
        return _gqa_call(case, path)
    if case["kind"].startswith("packed"):
        return _packed_call(case, path)
    rng = np.random.default_rng(0)
    dt = np.dtype(case["dtype"])
    N, D, W = case["N"], case["D"], case["window"]
    q, k, v, u = (rng.standard_normal((N, D)).astype(dt) for _ in range(4))
    if path.startswith("cpu"):
        from iem_ref.accel import cpu

        kw = dict(is_causal=True, window=(W, 0) if path.endswith("window") else None)
        if case["kind"] == "backward":
            a, L = cpu.attention(q, k, v, return_lse=True, **kw)
            return lambda: cpu.attention_vjp(q, k, v, u, out=a, lse=L, **kw)
        return lambda: cpu.attention(q, k, v, **kw)
    import torch
    import torch.nn.functional as F

    tq, tk, tv = (torch.from_numpy(x)[None, None] for x in (q, k, v))
    if path.endswith("window"):
        i = torch.arange(N)[:, None]
        j = torch.arange(N)[None, :]
        band = (j <= i) & (j >= i - W)  # the same keys as window=(W, 0) with causality

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=band)

        return fwd

    def fwd_causal():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    return fwd_causal


def worker(case, path, repeats):
    fn = _call(case, path)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "times_s": times}


def run(args):
    from bench_cpu import _loadavg, machine

    paths = {"gqa": GQA_PATHS, "packed": PACKED_PATHS}.get(args.case, PATHS)
    try:
        import torch  # noqa: F401
    except ImportError:
        paths = [p for p in paths if not p.startswith("torch")]
    if args.case == "gqa":
        cases = [dict(kind="gqa decode", Hq=32, Hkv=8, N=1, M=args.m, D=128, dtype="float32", **({"threads": t} if t else {}))
                 for t in (args.threads or [None])]
    elif args.case == "packed":
        lengths = packed_lengths(args.n, args.segments).tolist()
        kinds = ["packed forward"] + (["packed backward"] if args.backward else [])
        cases = [dict(kind=kind, N=args.n, D=64, dtype=dt, lengths=lengths) for kind in kinds for dt in ("float64", "float32")]
    else:
        cases = [dict(kind="forward", N=args.n, M=args.n, D=64, dtype=dt, window=args.window) for dt in ("float64", "float32")]
    if args.backward and args.case == "window":
        cases += [dict(kind="backward", N=args.n, M=args.n, D=64, dtype=dt, window=args.window) for dt in ("float64", "float32")]
    result = {"machine": machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rounds": args.rounds,
              "repeats": args.repeats, "loadavg_start": _loadavg(), "cases": []}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for case in cases:
        entry = dict(case, loadavg_before=_loadavg(), results={})
        case_paths = [p for p in paths if not case["kind"].endswith("backward") or p.startswith("cpu")]
        got = {p: [] for p in case_paths}
        for _ in range(args.rounds):
            for path in case_paths:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case), "--path", path, "--repeats", str(args.repeats)]
                threads = {"NUMBA_NUM_THREADS": str(case["threads"]), "OMP_NUM_THREADS": str(case["threads"])} if "threads" in case else {}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, **threads), timeout=args.timeout)
                if proc.returncode != 0:
                    got[path].append({"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]})
                else:
                    got[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for path, rounds in got.items():
            bad = [r for r in rounds if "error" in r]
            if bad:
                entry["results"][path] = bad[0]
                continue
            times = [t for r in rounds for t in r["times_s"]]
            entry["results"][path] = {"median_s": float(np.median(times)), "min_s": min(times), "times_s": times,
                                      "round_medians_s": [float(np.median(r["times_s"])) for r in rounds]}
        entry["loadavg_after"] = _loadavg()
        R = entry["results"]
        med = {p: R[p]["median_s"] for p in R if "median_s" in R[p]}
        if "cpu causal" in med and "cpu window" in med:
            entry["causal_over_window_cpu"] = med["cpu causal"] / med["cpu window"]
        if "torch window" in med and "cpu window" in med:
            entry["torch_window_over_cpu_window"] = med["torch window"] / med["cpu window"]
        if "torch causal" in med and "cpu causal" in med:
            entry["torch_causal_over_cpu_causal"] = med["torch causal"] / med["cpu causal"]
        if "cpu gqa" in med and "read K, V" in med:
            entry["cpu_gqa_over_read"] = med["cpu gqa"] / med["read K, V"]
        if "cpu gqa" in med and "torch gqa" in med:
            entry["torch_gqa_over_cpu_gqa"] = med["torch gqa"] / med["cpu gqa"]
        for other in ("cpu per segment", "torch packed", "torch per segment"):
            if "cpu packed" in med and other in med:
                entry[f"{other} / cpu packed"] = med[other] / med["cpu packed"]
        print(json.dumps({k: v for k, v in entry.items() if k != "results"}), {p: f"{t * 1e3:.1f} ms" for p, t in med.items()}, flush=True)
        result["cases"].append(entry)
    result["loadavg_end"] = _loadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"wrote {args.out}")


def table(result):
    from bench_cpu import blas_line

    m = result["machine"]
    lines = [
        f"Machine: {m.get('cpu', '?')} ({m.get('cpu_family_model', '?')}, {m.get('vector_isa', '?')}, L2 {m.get('l2_per_core', '?')} per core), "
        f"{m.get('cores')} cores; NumPy {m.get('numpy')}, Numba {m.get('numba')}, torch {m.get('torch')}.",
        blas_line(m),
        f"Command: `{result['command']}`; median of {result['rounds']} rounds x {result['repeats']} runs, one process per path and round, "
        f"the paths taking turns; load average (1 min) at start {result['loadavg_start'][0]}, at end {result['loadavg_end'][0]}.",
        "",
    ]
    if result["cases"] and result["cases"][0]["kind"] == "gqa decode":
        return "\n".join(lines + _gqa_table(result))
    if result["cases"] and result["cases"][0]["kind"].startswith("packed"):
        return "\n".join(lines + _packed_table(result))
    lines += [
        "| case | N = M | D | window | dtype | " + " | ".join(PATHS) + " | cpu causal / cpu window | torch window / cpu window | torch causal / cpu causal |",
        "|" + "---|" * (8 + len(PATHS)),
    ]

    def ms(r):
        return f"{r['median_s'] * 1e3:.1f}" if r and "median_s" in r else ("error" if r and "error" in r else "-")

    def ratio(c, key):
        return f"{c[key]:.1f}" if key in c else "-"

    for c in result["cases"]:
        R = c["results"]
        lines.append(f"| {c['kind']} | {c['N']} | {c['D']} | ({c['window']}, 0), causal | {c['dtype']} | "
                     + " | ".join(ms(R.get(p)) for p in PATHS)
                     + f" | {ratio(c, 'causal_over_window_cpu')} | {ratio(c, 'torch_window_over_cpu_window')} | {ratio(c, 'torch_causal_over_cpu_causal')} |")
    return "\n".join(lines)


def _gqa_table(result):
    lines = ["| case | Hq / Hkv | N | M | D | dtype | threads | " + " | ".join(f"{p} (ms)" for p in GQA_PATHS) + " | cpu / read | torch / cpu |",
             "|" + "---|" * (9 + len(GQA_PATHS))]
    for c in result["cases"]:
        R = c["results"]
        cells = [f"{R[p]['median_s'] * 1e3:.1f}" if p in R and "median_s" in R[p] else ("error" if p in R else "-") for p in GQA_PATHS]
        r1 = f"{c['cpu_gqa_over_read']:.2f}" if "cpu_gqa_over_read" in c else "-"
        r2 = f"{c['torch_gqa_over_cpu_gqa']:.1f}" if "torch_gqa_over_cpu_gqa" in c else "-"
        lines.append(f"| {c['kind']} | {c['Hq']} / {c['Hkv']} | {c['N']} | {c['M']} | {c['D']} | {c['dtype']} | {c.get('threads', 'all')} | "
                     + " | ".join(cells)
                     + f" | {r1} | {r2} |")
    return lines


def _packed_table(result):
    c0 = result["cases"][0]
    lines = [f"Segments (causal, each its own keys): lengths {c0['lengths']} (sum {sum(c0['lengths'])}), D = {c0['D']}.", "",
             "| case | dtype | " + " | ".join(f"{p} (ms)" for p in PACKED_PATHS)
             + " | cpu packed / cpu per segment | torch packed / cpu packed | torch per segment / cpu packed |",
             "|" + "---|" * (5 + len(PACKED_PATHS))]
    for c in result["cases"]:
        R = c["results"]
        cells = [f"{R[p]['median_s'] * 1e3:.1f}" if p in R and "median_s" in R[p] else ("error" if p in R else "-") for p in PACKED_PATHS]
        per = c.get("cpu per segment / cpu packed")
        ratios = [f"{1 / per:.2f}" if per else "-"] + [f"{c[key]:.1f}" if key in c else "-"
                                                       for key in ("torch packed / cpu packed", "torch per segment / cpu packed")]
        lines.append(f"| {c['kind']} | {c['dtype']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["window", "gqa", "packed"], default="window")
    p.add_argument("--n", type=int, default=16384, help="N = M")
    p.add_argument("--m", type=int, default=2**20, help="keys of the grouped-query decoding")
    p.add_argument("--window", type=int, default=256, help="keys before each query (window=(W, 0), causal)")
    p.add_argument("--segments", type=int, default=8, help="packed segments (--case packed)")
    p.add_argument("--threads", type=int, nargs="+", help="--case gqa: thread counts to run the case at (default: all cores)")
    p.add_argument("--backward", action="store_true", help="also time the CPU path's backward (window against causal, packed against per segment)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="default: bench/results/variants.json, gqa_decode.json (--case gqa) or packed.json (--case packed)")
    p.add_argument("--table", metavar="JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.path, args.repeats)))
        return
    if args.out is None:
        args.out = os.path.join(HERE, "results", {"gqa": "gqa_decode.json", "packed": "packed.json"}.get(args.case, "variants.json"))
    run(args)


if __name__ == "__main__":
    main()
