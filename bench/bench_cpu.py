"""CPU benchmark: attention forward/backward and long-context decoding, every path side by side in one run.

Paths (each case and path runs in its own subprocess, so that peak memory is
that path's alone):

- ``reference``: the NumPy reference (:func:`iem_ref.attention`, two passes
  over an ``N x M`` float64 matrix; skipped where its estimated memory,
  about 16 ``N x M`` float64 arrays forward and 24 backward, exceeds
  ``--max-ref-gb``);
- ``cpu``: :mod:`iem_ref.accel.cpu` (the backward reuses the saved ``out`` and ``lse``);
- ``baseline`` (with ``--baseline DIR``): the same calls to the
  :mod:`iem_ref.accel.cpu` of another checkout of this repository (``DIR``,
  e.g. ``git worktree add /tmp/before HEAD~3``), so that a change's before
  and after are timed side by side in one run;
- ``flex`` (with ``--softcap C``): :mod:`iem_ref.accel.cpu` with the same
  soft-cap as FlexAttention's ``score_mod`` (``iem_ref.flex.softcap(C)``,
  compiled into its own kernel), against ``cpu`` with ``softcap=C``: what a
  user's score_mod costs beside the built-in variant;
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` with 4-D
  ``(B, H, N, D) = (1, 1, N, D)`` inputs, which reach its flash CPU kernel
  (backward: autograd through it, ``.backward`` timed alone), if torch is installed;
- ``roof``: the CPU kernel's own BLAS GEMM calls alone (same tiles, query
  blocks spread over the same cores; ``bench/roofs.py``: ``gemm_roof``) plus the fastest
  ``exp`` over ``N*M`` elements (the polynomial exp on cache-resident
  buffers, ``exp_roof``); for the backward,
  the forward's GEMM time x 5/2 (5 GEMMs per tile pair instead of 2), an
  estimate, marked as such; for decoding, the larger of reading K and V
  once (``stream_roof``) and the decode's GEMM flops (``4 N M D``) at the
  host's tile-GEMM rate on all cores, measured in the same worker as the
  forward's GEMM tiles on an ``N = M = PROBE_N`` (2048) problem: a few
  queries are bandwidth-bound, tens of queries compute-bound on a few cores.

Timing: ``--rounds`` rounds (default 3); in each, every path runs in turn in
its own process: one warm-up call (its time is reported as ``first_s``:
compilation or cache load for the Numba path), then ``--repeats`` timed
calls.  Reported: the median and minimum over all timed calls of all rounds,
and each round's median (``round_medians_s``: the spread shows the
machine's drift).  The reference runs in the first round only.  Memory: the peak resident set (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) during the timed calls, minus the
resident set before them (inputs already allocated): ``peak_extra_mb``.  It
sees every allocator (NumPy, Numba's NRT, torch, BLAS buffers).

Usage::

    python bench/bench_cpu.py --quick            # N = M in {1024, 4096}, D = 64, forward; decoding M = 2**20
    python bench/bench_cpu.py --full             # N = M in {1024, 4096, 16384}, D in {64, 128}, forward and backward; decoding M = 2**22 (tens of minutes)
    python bench/bench_cpu.py --full --out bench/results/cpu_full.json
    python bench/bench_cpu.py --quick --kinds forward backward decode --paths cpu baseline --baseline /tmp/before
    python bench/bench_cpu.py --quick --kinds forward backward --softcap 20 --paths cpu flex baseline --baseline /tmp/before
    python bench/bench_cpu.py --table bench/results/cpu.json   # the Markdown table

``--softcap C``: every path but torch and the roof runs with ``softcap=C``
(V3: the logits' kernel), and ``flex`` with the same as a score_mod.

The machine (CPU model, cores, memory, library versions) and ``/proc/loadavg``
before and after every case are recorded in the JSON: other processes on the
machine inflate timings, so check the load.

BLAS: the kernels' tiles are SciPy's OpenBLAS GEMMs, whose speed depends on
the kernel set OpenBLAS runs (on the AVX-512 AMD EPYC of
``bench/results/gemm_cores.md`` its AVX-512 ``SkylakeX`` kernels are 1.5x
(float64) and 1.8x (float32) faster than its AVX2 ``Haswell`` ones on these
tiles).  OpenBLAS picks the set from the CPU unless
``OPENBLAS_CORETYPE`` names one.  The workers run with the environment as
given (``--openblas environment``) or without OpenBLAS's overrides
(``--openblas detected``); each records the set its kernels ran.  With
``detected`` the roof's GEMMs run OpenBLAS's own choice for the CPU;
``gemm_cores.py`` says whether another GEMM on the host (MKL, torch's) is
faster on the same tiles, i.e. whether that roof is the machine's limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


#: OpenBLAS's settings that override what it reads from the CPU: its kernel set and its L2 size.  The same
#: names as ``iem_ref.accel.machine.OVERRIDES``, not imported: a baseline worker runs an older ``iem_ref``.
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: the decoding roof's GEMM rate comes from the forward's GEMM tiles on an N = M = PROBE_N problem, all cores
PROBE_N = 2048


def openblas_detects(env):
    """``env`` without :data:`OPENBLAS_OVERRIDES`: OpenBLAS picks its kernels and blocking for the CPU it runs on."""
    return {k: v for k, v in env.items() if k not in OPENBLAS_OVERRIDES}


def kernels_blas():
    """The BLAS the CPU kernels call (SciPy's OpenBLAS) and the kernel set it picked, as threadpoolctl reports them."""
    try:
        import scipy.linalg  # noqa: F401
        import threadpoolctl
    except ImportError:
        return None
    for i in threadpoolctl.threadpool_info():
        if i.get("user_api") == "blas" and os.path.basename(i["filepath"]).startswith("libscipy_openblas-"):
            return f"{i['internal_api']} {i['version']} ({i.get('architecture')})"
    return None


# --- the worker: one (case, path) in this process -------------------------------------
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(case):
    rng = np.random.default_rng(0)
    dt = np.dtype(case["dtype"])
    N, M, D = case["N"], case["M"], case["D"]
    q = rng.standard_normal((N, D), dtype=np.float64).astype(dt)
    k = rng.standard_normal((M, D), dtype=np.float64).astype(dt)
    v = rng.standard_normal((M, D), dtype=np.float64).astype(dt)
    u = rng.standard_normal((N, D), dtype=np.float64).astype(dt)
    return q, k, v, u


def _make_call(case, path, q, k, v, u):
    """A zero-argument callable doing one timed unit of work, and a description."""
    kind = case["kind"]
    if path == "reference":
        import iem_ref

        kw = _variant_kw(case, path)
        if kind == "backward":
            return lambda: iem_ref.attention_vjp(q, k, v, u, **kw), "iem_ref.attention_vjp (recomputes r)"
        return lambda: iem_ref.attention(q, k, v, **kw), "iem_ref.attention"
    if path in ("cpu", "baseline", "flex"):
        from iem_ref.accel import cpu

        kw = _variant_kw(case, path)
        if kind == "backward":
            a, L = cpu.attention(q, k, v, return_lse=True, **kw)
            return lambda: cpu.attention_vjp(q, k, v, u, out=a, lse=L, **kw), f"accel.cpu.attention_vjp(out=, lse=, {_kw_text(kw)})"
        return lambda: cpu.attention(q, k, v, return_lse=True, **kw), f"accel.cpu.attention(return_lse=True, {_kw_text(kw)})"
    if path == "torch":
        import torch
        import torch.nn.functional as F

        t = [torch.from_numpy(np.ascontiguousarray(x))[None, None] for x in (q, k, v, u)]
        if kind == "backward":
            qt, kt, vt = (x.clone().requires_grad_(True) for x in t[:3])
            out = F.scaled_dot_product_attention(qt, kt, vt)

            def back():
                for x in (qt, kt, vt):
                    x.grad = None
                out.backward(t[3], retain_graph=True)

            return back, f"torch {torch.__version__} SDPA backward, 4-D inputs, {torch.get_num_threads()} threads"

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(t[0], t[1], t[2])

        return fwd, f"torch {torch.__version__} SDPA, 4-D (1, 1, N, D) inputs, {torch.get_num_threads()} threads"
    if path == "roof":
        import roofs
        from iem_ref.accel import cpu

        if kind == "decode":  # the floor: reading K and V once, or the decode's GEMM flops at the host's tile-GEMM rate
            pq, pk, _ = cpu.plan(1, PROBE_N, PROBE_N, q.dtype)
            rng = np.random.default_rng(1)
            qp, kp, vp = (rng.standard_normal((PROBE_N, q.shape[1])).astype(q.dtype) for _ in range(3))

            def probe():
                with cpu._blas_single_thread():
                    roofs.gemm_roof(qp, kp, vp, pq, pk)

            return ((lambda: roofs.stream_roof(k, v)), probe), (
                f"K and V read once (parallel sum), and the decode's GEMM flops at the rate of the forward's GEMM tiles "
                f"({pq}x{pk}) of an N = M = {PROBE_N} problem on all cores; the larger of the two")
        bq, bk, _ = cpu.plan(1, case["N"], case["M"], q.dtype)
        sample = np.zeros(1, q.dtype)
        total = case["N"] * case["M"]

        def gemms():
            with cpu._blas_single_thread():
                roofs.gemm_roof(q, k, v, bq, bk)

        def exps():
            roofs.exp_roof(total, sample)

        return (gemms, exps), f"GEMM tiles {bq}x{bk} alone + polynomial exp over N*M"
    raise ValueError(path)


def _variant_kw(case, path):
    """The call's variant keywords: ``softcap=C`` with ``--softcap``; for ``flex`` the same soft-cap as a score_mod."""
    c = case.get("softcap")
    if c is None:
        return {}
    if path == "flex":
        from iem_ref import flex

        return {"score_mod": flex.softcap(c)}
    return {"softcap": c}


def _kw_text(kw):
    return ", ".join(f"{k}={'flex.softcap(C)' if k == 'score_mod' else v}" for k, v in kw.items()) or "no variant"


def _time(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def worker(case, path, repeats):
    q, k, v, u = _inputs(case)
    res = {"path": path}
    t0 = time.perf_counter()
    if path in ("cpu", "baseline", "roof", "flex"):  # compile or load the kernels on a tiny problem first
        from iem_ref.accel import cpu

        small = [x[:4] for x in (q, k, v, u)]
        kw = {} if path == "roof" else _variant_kw(case, path)
        cpu.attention(*small[:3], return_lse=True, **kw)
        if case["kind"] == "backward":
            cpu.attention_vjp(*small, **kw)
        res["compile_or_load_s"] = time.perf_counter() - t0
    fn, desc = _make_call(case, path, q, k, v, u)
    res["what"] = desc
    base = _status("VmRSS:")
    can_peak = _reset_peak()
    if path == "roof" and case["kind"] == "decode":
        first_r, tr = _time(fn[0], repeats)
        first_p, tp = _time(fn[1], repeats)
        res.update(read_times_s=tr, probe_times_s=tp, first_s=first_r + first_p)
    elif path == "roof":
        first_g, tg = _time(fn[0], repeats)
        first_e, te = _time(fn[1], repeats)
        res.update(gemm_times_s=tg, exp_times_s=te, first_s=first_g + first_e)
    else:
        first, times = _time(fn, repeats)
        res.update(first_s=first, times_s=times)
    if can_peak:
        res["peak_extra_mb"] = (_status("VmHWM:") - base) / 2**20
    if path in ("cpu", "baseline", "roof", "flex"):
        res["blas"] = kernels_blas()
    res["inputs_mb"] = sum(x.nbytes for x in (q, k, v, u)) / 2**20
    return res


# --- the driver -------------------------------------------------------------------------
def merge(case, path, rounds):
    """One result from a path's rounds: medians and minima over every timed call of every round.

    Why rounds: this machine is a shared VM whose speed drifts by tens of
    percent over minutes; running the paths in turn, round after round,
    spreads that drift over all of them instead of charging it to one.
    The roof's backward GEMM time is an estimate: 2.5 x the forward's
    (5 GEMMs per tile pair instead of 2).
    """
    bad = [r for r in rounds if "error" in r]
    if bad:
        return bad[0]
    out = {k: v for k, v in rounds[0].items()
           if k not in ("times_s", "gemm_times_s", "exp_times_s", "read_times_s", "probe_times_s", "peak_extra_mb")}
    out["rounds"] = len(rounds)
    peaks = [r["peak_extra_mb"] for r in rounds if "peak_extra_mb" in r]
    if peaks:
        out["peak_extra_mb"] = max(peaks)
    if path == "roof" and case["kind"] == "decode":
        tr = [t for r in rounds for t in r["read_times_s"]]
        tp = [t for r in rounds for t in r["probe_times_s"]]
        rate = 4.0 * PROBE_N * PROBE_N * case["D"] / float(np.median(tp))  # flop/s: two GEMMs of 2 N M D flops (Dv = D)
        flops_s = 4.0 * case["N"] * case["M"] * case["D"] / rate
        read_s = float(np.median(tr))
        out.update(read_median_s=read_s, gemm_rate_gflops=rate / 1e9, flops_median_s=flops_s,
                   median_s=max(read_s, flops_s), min_s=max(min(tr), flops_s))
    elif path == "roof":
        tg = [t for r in rounds for t in r["gemm_times_s"]]
        te = [t for r in rounds for t in r["exp_times_s"]]
        scale = 2.5 if case["kind"] == "backward" else 1.0
        out.update(gemm_median_s=float(np.median(tg)) * scale, gemm_min_s=min(tg) * scale,
                   exp_median_s=float(np.median(te)), exp_min_s=min(te))
        out.update(median_s=out["gemm_median_s"] + out["exp_median_s"], min_s=out["gemm_min_s"] + out["exp_min_s"])
        if case["kind"] == "backward":
            out["estimated"] = "backward GEMMs = 2.5 x the forward's (5 GEMMs per tile pair instead of 2)"
    else:
        times = [t for r in rounds for t in r["times_s"]]
        out.update(median_s=float(np.median(times)), min_s=min(times), times_s=times,
                   round_medians_s=[float(np.median(r["times_s"])) for r in rounds])
    return out


def _loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def machine():
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cores": os.cpu_count()}
    try:
        fields = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, val = line.partition(":")
                fields[key.strip()] = val.strip()
        info["cpu"] = fields.get("model name")
        # the model name alone does not tell Zen 3 from Zen 4, nor whether AVX-512 is exposed
        info["cpu_family_model"] = f"{fields.get('vendor_id')} family {fields.get('cpu family')} model {fields.get('model')}"
        flags = fields.get("flags", "").split()
        info["vector_isa"] = "avx512f" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other")
        info["isa_flags"] = [f for f in _ISA_FLAGS if f in flags]  # the ones the GEMMs and exp can use
        caches = {}
        for index in range(8):  # L1d, L1i, L2, L3 as the OS reports them for the first core
            base = f"/sys/devices/system/cpu/cpu0/cache/index{index}/"
            try:
                with open(base + "level") as f, open(base + "type") as g, open(base + "size") as h:
                    level, kind, size = f.read().strip(), g.read().strip(), h.read().strip()
            except OSError:
                continue
            if kind != "Instruction":
                caches[f"L{level}"] = size
        info["caches"] = caches
        if "L2" in caches:
            info["l2_per_core"] = caches["L2"]
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for mod in ("numpy", "scipy", "numba", "torch", "threadpoolctl"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            info[mod] = None
    try:
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except Exception:  # noqa: BLE001
        pass
    try:  # torch's build: the BLAS and the vector width its CPU kernels use
        import torch

        info["torch_build"] = (f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}, "
                               f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    except Exception:  # noqa: BLE001 - optional
        pass
    try:  # the BLAS the kernels call (SciPy's, through Numba) and the kernels it picked for this CPU
        import scipy.linalg  # noqa: F401
        import threadpoolctl

        info["blas"] = [f"{i['internal_api']} {i['version']} ({i.get('architecture')}) {os.path.basename(i['filepath'])}"
                        for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    except Exception:  # noqa: BLE001 - optional
        pass
    return info


def cases(quick, kinds=None):
    """The cases of a run; ``kinds`` (forward, backward, decode) selects among them.

    Quick: forward at N = M in {1024, 4096}, backward at 4096 (only if asked
    for), decoding (N in {1, 4, 16, 64}) at M = 2**20; D = 64.  Full: N = M in
    {1024, 4096, 16384}, D in {64, 128}, forward and backward, decoding at M = 2**22.
    """
    if kinds is None:
        kinds = ["forward", "decode"] if quick else ["forward", "backward", "decode"]
    out = []
    dtypes = ["float64", "float32"]
    for kind in ("forward", "backward"):
        if kind not in kinds:
            continue
        sizes = ([1024, 4096] if kind == "forward" else [4096]) if quick else [1024, 4096, 16384]
        for n in sizes:
            for d in ([64] if quick else [64, 128]):
                for dt in dtypes:
                    out.append(dict(kind=kind, N=n, M=n, D=d, dtype=dt))
    if "decode" in kinds:
        m_dec = 1 << 20 if quick else 4 * 2**20
        for n in [1, 4, 16, 64]:
            for dt in dtypes:
                out.append(dict(kind="decode", N=n, M=m_dec, D=64, dtype=dt))
    return out


def ref_gb(case):
    arrays = 24 if case["kind"] == "backward" else 16  # measured forward: 2006 MB at N = M = 4096 (15 arrays)
    return arrays * case["N"] * case["M"] * 8 / 2**30


def run(args):
    have_torch = True
    try:
        import torch  # noqa: F401
    except ImportError:
        have_torch = False
    paths = [p for p in args.paths if p != "torch" or have_torch]
    if "baseline" in paths and not args.baseline:
        raise SystemExit("--paths baseline needs --baseline DIR (another checkout of this repository)")
    result = {"machine": machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "repeats": args.repeats, "rounds": args.rounds,
              "loadavg_start": _loadavg(), "cases": [], "notes": [], "openblas": args.openblas,
              "openblas_environment": {k: os.environ[k] for k in OPENBLAS_OVERRIDES if k in os.environ}}
    if args.baseline:
        rev = subprocess.run(["git", "-C", args.baseline, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        result["baseline"] = {"dir": os.path.abspath(args.baseline), "commit": rev.stdout.strip() or None}
    if not have_torch:
        result["notes"].append("torch is not installed: no torch column (pip install -e '.[bench]')")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    base_env = openblas_detects(os.environ) if args.openblas == "detected" else dict(os.environ)
    env = dict(base_env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    envs = {path: env for path in paths}
    if args.baseline:
        envs["baseline"] = dict(base_env, PYTHONPATH=os.path.abspath(args.baseline) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "flex" in paths and args.softcap is None:
        raise SystemExit("--paths flex needs --softcap C (the score_mod it times is that soft-cap)")
    for case in cases(args.quick, args.kinds):
        if args.softcap is not None:
            case = dict(case, softcap=args.softcap)
        entry = dict(case, loadavg_before=_loadavg(), results={})
        got = {path: [] for path in paths}
        for rnd in range(args.rounds):
            for path in paths:
                if path == "reference" and ref_gb(case) > args.max_ref_gb:
                    entry["results"][path] = {"skipped": f"needs about {ref_gb(case):.0f} GB (> --max-ref-gb {args.max_ref_gb})"}
                    continue
                if path == "reference" and rnd > 0:
                    continue  # the slow reference has no target: one round
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case), "--path", path, "--repeats", str(args.repeats)]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=envs[path], timeout=args.timeout)
                if proc.returncode != 0:
                    r = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["wall_s"] = time.perf_counter() - t0
                got[path].append(r)
        for path in paths:
            if got[path]:
                entry["results"][path] = merge(case, path, got[path])
                entry["results"][path]["wall_s"] = sum(r["wall_s"] for r in got[path])
            r = entry["results"][path]
            print(f"{case['kind']:8s} N={case['N']:<6d} M={case['M']:<8d} D={case['D']:<4d} {case['dtype']:8s} {path:10s} "
                  + (f"median {r['median_s'] * 1e3:9.1f} ms  min {r['min_s'] * 1e3:9.1f} ms  peak+ {r.get('peak_extra_mb', float('nan')):8.1f} MB"
                     if "median_s" in r else str(r.get("skipped") or r.get("error"))), flush=True)
        entry["loadavg_after"] = _loadavg()
        res = entry["results"]
        if "median_s" in res.get("cpu", {}):
            for other in ("torch", "roof", "reference", "baseline", "flex"):
                if "median_s" in res.get(other, {}):
                    entry[f"{other}_over_cpu"] = res[other]["median_s"] / res["cpu"]["median_s"]
            if "gemm_median_s" in res.get("roof", {}):
                entry["cpu_over_gemms"] = res["cpu"]["median_s"] / res["roof"]["gemm_median_s"]
            elif "read_median_s" in res.get("roof", {}):  # decoding: over the larger of the read and the GEMM flops
                entry["cpu_over_gemms"] = res["cpu"]["median_s"] / res["roof"]["median_s"]
        result["cases"].append(entry)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    result["loadavg_end"] = _loadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


def blas_line(m, result=None):
    """The results page's line naming the BLAS libraries threadpoolctl found (and the kernels they picked), from the machine record.

    With a whole ``result``, also the OpenBLAS settings the workers ran with
    and the kernel set the kernels' OpenBLAS picked in them.
    """
    found = m.get("blas") or ["not recorded"]
    line = f"BLAS in the driver process (threadpoolctl): {'; '.join(found)}; the kernels call SciPy's (`libscipy_openblas`; NumPy's is `libscipy_openblas64_`)."
    if result is None or "openblas" not in result:
        return line
    env = ", ".join(f"`{k}={v}`" for k, v in result.get("openblas_environment", {}).items()) or "no OpenBLAS overrides"
    picked = sorted({r["blas"] for c in result["cases"] for p, r in c["results"].items() if r.get("blas")})
    how = ("removed for the workers (`--openblas detected`): OpenBLAS read the CPU itself" if result["openblas"] == "detected"
           else "kept for the workers")
    return line + f"  Environment: {env}, {how}; in the workers the kernels' OpenBLAS ran {', '.join(picked) or 'not recorded'}."


def table(result):
    """Markdown tables (one row per case) from a bench_cpu JSON result."""
    lines = []
    m = result["machine"]
    lines.append(f"Machine: {m.get('cpu', '?')} ({m.get('cpu_family_model', '?')}, {' '.join(m['isa_flags']) if m.get('isa_flags') else m.get('vector_isa', '?')}, "
                 + (", ".join(f"{k} {v}" for k, v in m["caches"].items()) if m.get("caches") else f"L2 {m.get('l2_per_core', '?')} per core") + "), "
                 f"{m.get('cores')} cores, {m.get('memory_gb')} GiB; Python {m.get('python')}, "
                 f"NumPy {m.get('numpy')}, SciPy {m.get('scipy')}, Numba {m.get('numba')}, torch {m.get('torch')}"
                 + (f" ({m['torch_build']})." if m.get("torch_build") else "."))
    lines.append(blas_line(m, result))
    lines.append(f"Command: `{result['command']}`; median of {result.get('rounds', 1)} rounds x {result['repeats']} runs (each round: one process per path, "
                 "a warm-up call, then the timed calls; the paths take turns); "
                 f"load average (1 min) at start {result.get('loadavg_start', ['?'])[0]}, at end {(result.get('loadavg_end') or ['?'])[0]}.")
    if result.get("baseline"):
        b = result["baseline"]
        lines.append(f"Baseline: the same calls to the checkout `{b.get('commit') or b['dir']}` (column \"baseline\").")
    lines.append("")
    base = any("baseline" in c["results"] for c in result["cases"])
    flex = any("flex" in c["results"] for c in result["cases"])
    if any(c.get("softcap") is not None for c in result["cases"]):
        lines.insert(-1, f"Variant: `softcap={result['cases'][0]['softcap']:g}` on every path but torch and the roof"
                     + ("; `flex`: accel.cpu with the same soft-cap as a score_mod (`iem_ref.flex.softcap`)." if flex else "."))
    hdr = "| case | N | M | D | dtype | reference | accel.cpu |" + (" baseline | baseline / cpu |" if base else "") + (" flex | flex / cpu |" if flex else "") + " torch SDPA 4-D | roof (GEMMs + exp) | torch / cpu | cpu / GEMMs (decode: / roof) | peak extra MB (ref / cpu / torch) | load before-after |"
    lines.append(hdr)
    lines.append("|" + "---|" * (hdr.count("|") - 1))
    def ms(r):
        if "median_s" in r:
            return f"{r['median_s'] * 1e3:.1f}"
        return "skipped" if "skipped" in r else ("error" if "error" in r else "-")
    def mb(r):
        return f"{r['peak_extra_mb']:.0f}" if "peak_extra_mb" in r else "-"
    def ratio(c, key):
        return f"{c[key]:.2f}" if key in c else "-"  # a path that was not run has no ratio
    for c in result["cases"]:
        R = c["results"]
        roof = R.get("roof", {})
        roof_s = f"{ms(roof)} ({roof['gemm_median_s'] * 1e3:.1f} + {roof['exp_median_s'] * 1e3:.1f})" if "gemm_median_s" in roof else ms(roof)
        if c["kind"] == "decode" and "read_median_s" in roof:
            roof_s = (f"{roof['median_s'] * 1e3:.1f} (read K, V {roof['read_median_s'] * 1e3:.1f}; "
                      f"GEMM flops {roof['flops_median_s'] * 1e3:.1f} at {roof['gemm_rate_gflops']:.0f} GFLOP/s)")
        elif c["kind"] == "decode" and "median_s" in roof:
            roof_s = f"{roof['median_s'] * 1e3:.1f} (read K, V)"
        if roof.get("estimated"):
            roof_s += " est."
        lines.append(
            f"| {c['kind']} | {c['N']} | {c['M']} | {c['D']} | {c['dtype']} | {ms(R.get('reference', {}))} | {ms(R.get('cpu', {}))} | "
            + (f"{ms(R.get('baseline', {}))} | {ratio(c, 'baseline_over_cpu')} | " if base else "")
            + (f"{ms(R.get('flex', {}))} | {ratio(c, 'flex_over_cpu')} | " if flex else "") +
            f"{ms(R.get('torch', {}))} | {roof_s} | {ratio(c, 'torch_over_cpu')} | "
            f"{ratio(c, 'cpu_over_gemms')} | {mb(R.get('reference', {}))} / {mb(R.get('cpu', {}))} / {mb(R.get('torch', {}))} | "
            f"{c['loadavg_before'][0]}-{c['loadavg_after'][0]} |"
        )
    return "\n".join(lines)



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="N = M in {1024, 4096}, D = 64, forward, decoding with M = 2**20")
    g.add_argument("--full", action="store_true", help="N = M in {1024, 4096, 16384}, D in {64, 128}, forward and backward, and decoding (default)")
    p.add_argument("--paths", nargs="+", default=["reference", "cpu", "torch", "roof"],
                   choices=["reference", "cpu", "baseline", "flex", "torch", "roof"])
    p.add_argument("--softcap", type=float, help="run every path but torch and the roof with softcap=C (V3), and 'flex' with it as a score_mod")
    p.add_argument("--kinds", nargs="+", choices=["forward", "backward", "decode"],
                   help="which cases (default: forward and decode with --quick, all with --full)")
    p.add_argument("--baseline", metavar="DIR", help="another checkout of this repository, timed as the path 'baseline'")
    p.add_argument("--openblas", choices=["environment", "detected"], default="environment",
                   help="the worker processes' OpenBLAS: as the environment configures it (default), or 'detected': "
                        "without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, so that it picks its kernels for this CPU")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path and round (after one warm-up call)")
    p.add_argument("--rounds", type=int, default=3, help="rounds: every path runs once per round, in turn (the reference only in the first)")
    p.add_argument("--max-ref-gb", type=float, default=8.0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None)
    p.add_argument("--table", metavar="JSON", help="print the Markdown table of a results file and exit")
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
        args.out = os.path.join(HERE, "results", "cpu_quick.json" if args.quick else "cpu.json")
    run(args)


if __name__ == "__main__":
    main()
