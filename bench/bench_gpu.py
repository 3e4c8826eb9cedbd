"""GPU benchmark: iem_ref.accel.cuda vs torch SDPA vs the roof (cuBLAS GEMMs + exp).

For N = M in {4096, 16384, 65536}, D = Dv in {64, 128}, float32 and float64,
forward and backward, one head ``(B, H) = (1, 1)``:

- ``accel.cuda``: :func:`iem_ref.accel.cuda.attention` (with ``return_lse``)
  and :func:`attention_vjp` (reusing ``out`` and ``lse``), fed torch CUDA
  tensors zero-copy through ``__cuda_array_interface__`` (Numba device arrays
  when torch is missing);
- ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on 4-D
  inputs ``(1, 1, N, D)`` (float64 has no flash/efficient kernel: torch takes
  its math path, which materialises N x M; out-of-memory is recorded);
  backward = ``autograd`` of the forward with an upstream gradient;
- ``roof``: what a kernel built on cuBLAS must at least do: the score GEMM
  ``Q K^T``, ``exp`` over the N x M scores, the value GEMM ``P V`` (forward;
  twice the GEMMs plus two more for the backward), done in row chunks so the
  N x M scores never exceed 2^28 elements at once (torch, else CuPy).

Timing: CUDA-synchronised wall clock, the median (and min) of ``--repeats``
runs (3 when one run takes over 0.5 s) after one warm-up; the first call of each accel.cuda specialisation
(JIT compile + run) is reported apart as ``first_call_s``.  The warm-up run
of accel.cuda is instrumented: each kernel launch is synchronised and timed
(``ours_*_phases_s``: forward, rowdot, dq, dkv; the rest of the call is the
host-side wrapper, ``ours_*_host_s``).  Configurations run smallest first;
the JSON is rewritten after each, so a run cut short by ``--budget``
(seconds) or a timeout keeps what it measured; a configuration whose time,
extrapolated (x (N/N')^2) from the same D and dtype at the previous N', would
not fit in what is left is skipped and listed with that estimate.

Peak device memory, per path and direction, in bytes beyond the inputs:

- ``ours_*_peak_alloc_bytes``: the peak of the live bytes accel.cuda
  allocated through Numba during one call (its outputs and scratch: every
  allocation goes through the context's ``memalloc``, which is counted);
- ``ours_*_device_delta_bytes``: the drop of the device's free memory
  (``cuMemGetInfo``) over one call with Numba's deallocations deferred, so
  nothing allocated in the call is freed before the reading (an upper bound
  of the peak, in whole driver pages);
- ``torch_*_peak_bytes``, ``roof_*_peak_bytes``: ``torch.cuda.max_memory_allocated``
  over one call, less what was allocated before it.

``overhead``: the fixed cost of one call (N = M = 128, D = 64): the host
wrapper (validation, the small offset arrays it copies to the device, the
launches) against the kernels' own time.

Then, with the time left, the tiled kernels rebuilt with ``launch_bounds``
(128, 3) and (128, 4) (fewer registers, more blocks per SM, some spills) at
N = M = 16384, D = 64: ``variants`` in the JSON.

``--simulate``: the Numba CUDA simulator, tiny sizes, torch on the CPU: only
checks that this script works (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simulate", action="store_true", help="Numba CUDA simulator, tiny sizes (checks the script only)")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="N = M values (default 4096 16384 65536)")
    p.add_argument("--dims", type=int, nargs="*", default=None, help="D = Dv values (default 64 128)")
    p.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=420.0, help="stop starting new measurements after this many seconds")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu.json, or gpu_simulated.json)")
    return p.parse_args()


ARGS = parse()
if ARGS.simulate:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from iem_ref.accel import cuda as C  # noqa: E402
from iem_ref.accel import _cuda_kernels as K  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))


def left():
    return ARGS.budget - (time.perf_counter() - T0)


def tdev():
    if torch is None:
        return None
    if ARGS.simulate:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def sync():
    cuda.synchronize()
    if torch is not None and tdev() == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, warmup=None):
    """(median, min) seconds of ``repeats`` synchronised runs after one warm-up (3 runs if the warm-up took > 0.5 s).

    ``warmup``: what to run as the warm-up instead of ``fn`` (an instrumented run of it).
    """
    t = time.perf_counter()
    (warmup or fn)()
    sync()
    if time.perf_counter() - t > 0.5:
        repeats = min(repeats, 3)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(np.min(ts))


class AllocMeter:
    """Live and peak bytes of the device memory Numba allocates (accel.cuda's outputs and scratch).

    Wraps the context's ``memalloc`` (every Numba device array is allocated
    through it); a finaliser on each allocation takes its bytes off when it is
    freed.  Under the simulator nothing goes through it (``ok`` stays False).
    """

    def __init__(self):
        self.live = self.peak = 0
        self.ok = False
        self.error = None

    def install(self):
        if ARGS.simulate:
            self.error = "simulator: no device allocations"
            return
        try:
            import weakref

            ctx = cuda.current_context()
            orig = ctx.memalloc

            def memalloc(nbytes):
                mem = orig(nbytes)
                self.live += int(nbytes)
                self.peak = max(self.peak, self.live)
                weakref.finalize(mem, self._free, int(nbytes))
                return mem

            ctx.memalloc = memalloc
            self.ok = True
        except Exception as exc:  # pragma: no cover - depends on numba-cuda's internals
            self.error = repr(exc)[:200]

    def _free(self, nbytes):
        self.live -= nbytes


METER = AllocMeter()


def free_bytes():
    """The device's free memory (cuMemGetInfo), or None under the simulator."""
    if ARGS.simulate:
        return None
    return int(cuda.current_context().get_memory_info()[0])


def guarded(rec, key, fn, *args):
    """``fn(*args)``; an exception is recorded as ``rec[key]`` instead of ending the configuration."""
    try:
        fn(*args)
    except Exception as exc:
        rec[key] = f"{type(exc).__name__}: {exc}"[:300]


def measure_ours(rec, key, fn):
    """One call of ``fn``: ``ours_<key>_peak_alloc_bytes`` and ``ours_<key>_device_delta_bytes``."""
    import gc

    gc.collect()
    sync()
    if not ARGS.simulate:
        cuda.current_context().deallocations.clear()
    base = METER.live
    METER.peak = METER.live
    if ARGS.simulate:
        fn()
        sync()
    else:
        with cuda.defer_cleanup():  # nothing allocated during the call is freed before the second reading
            f0 = free_bytes()
            res = fn()
            sync()
            rec[f"ours_{key}_device_delta_bytes"] = f0 - free_bytes()
            del res
    if METER.ok:
        rec[f"ours_{key}_peak_alloc_bytes"] = METER.peak - base


def measure_torch(rec, name, fn):
    """``<name>_peak_bytes``: torch.cuda.max_memory_allocated over one call of ``fn``, less what was allocated before."""
    if tdev() != "cuda":
        return
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    rec[f"{name}_peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)


def instrumented(rec, key, fn):
    """``fn`` with every accel.cuda kernel launch synchronised and timed: ``ours_<key>_phases_s``, ``ours_<key>_host_s``."""

    def run():
        phases = {}
        orig = C._launch

        def launch(kernel, grid, block, *args):
            sync()
            t = time.perf_counter()
            orig(kernel, grid, block, *args)
            sync()
            name = getattr(getattr(kernel, "py_func", None), "__name__", None) or "kernel"
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

        C._launch = launch
        try:
            t = time.perf_counter()
            fn()
            sync()
            total = time.perf_counter() - t
        finally:
            C._launch = orig
        rec[f"ours_{key}_phases_s"] = phases
        rec[f"ours_{key}_host_s"] = total - sum(phases.values())

    return run


def machine():
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "backend": C.BACKEND}
    try:
        import numba
        import numba_cuda

        info["numba"] = numba.__version__
        info["numba_cuda"] = getattr(numba_cuda, "__version__", "?")
    except Exception as exc:  # pragma: no cover
        info["numba_error"] = repr(exc)
    if torch is not None:
        info["torch"] = torch.__version__
        if tdev() == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            info["torch_cuda"] = torch.version.cuda
            info["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    if not ARGS.simulate:
        try:
            dev = cuda.get_current_device()
            info["cc"] = list(dev.compute_capability)
            info["sm_count"] = dev.MULTIPROCESSOR_COUNT
        except Exception as exc:  # pragma: no cover
            info["device_error"] = repr(exc)
        try:
            from numba.cuda.cudadrv import driver as _drv

            info["cuda_driver_version"] = list(_drv.driver.get_version())
            info["cuda_runtime_version"] = list(cuda.runtime.get_version())
        except Exception as exc:  # pragma: no cover
            info["cuda_version_error"] = repr(exc)[:200]
    info["alloc_meter"] = "ok" if METER.ok else METER.error
    return info


def kernel_resources():
    """Registers and shared memory per kernel specialisation that ran (real GPU only)."""
    out = {}
    if ARGS.simulate:
        return out
    for (dtype, energy), kern in K._CACHE.items():
        for name, fn in kern.all().items():
            if not getattr(fn, "overloads", None):
                continue  # not compiled in this run
            try:
                entry = {}
                for key, getter in (("regs", "get_regs_per_thread"), ("smem", "get_shared_mem_per_block"),
                                    ("local", "get_local_mem_per_thread")):
                    val = getattr(fn, getter)()
                    entry[key] = sorted(set(val.values())) if isinstance(val, dict) else val  # one per specialisation
                out[f"{name}/{dtype}/{energy}"] = entry
            except Exception as exc:  # not compiled or API missing
                out[f"{name}/{dtype}/{energy}"] = {"error": repr(exc)[:120]}
    return out


def make_inputs(n, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((1, 1, n, d)).astype(dtype) for _ in range(4))
    if torch is not None and tdev() is not None:
        tq, tk, tv, tg = (torch.from_numpy(x).to(tdev()) for x in (q, k, v, g))
    else:
        tq = tk = tv = tg = None
    return (q, k, v, g), (tq, tk, tv, tg)


def ours_inputs(np_in, t_in):
    if tdev() == "cuda":
        return t_in  # torch CUDA tensors, read in place
    return tuple(cuda.to_device(x) for x in np_in)


def bench_ours(rec, np_in, t_in):
    q, k, v, g = ours_inputs(np_in, t_in)
    t = time.perf_counter()
    a, lse = C.attention(q, k, v, return_lse=True)
    sync()
    rec["ours_fwd_first_call_s"] = time.perf_counter() - t
    fwd = lambda: C.attention(q, k, v, return_lse=True)  # noqa: E731
    rec["ours_fwd_s"], rec["ours_fwd_min_s"] = timed(fwd, ARGS.repeats, warmup=instrumented(rec, "fwd", fwd))
    guarded(rec, "ours_fwd_memory_error", measure_ours, rec, "fwd", fwd)
    if left() < 0:
        return a
    t = time.perf_counter()
    C.attention_vjp(q, k, v, g, out=a, lse=lse)
    sync()
    rec["ours_bwd_first_call_s"] = time.perf_counter() - t
    bwd = lambda: C.attention_vjp(q, k, v, g, out=a, lse=lse)  # noqa: E731
    rec["ours_bwd_s"], rec["ours_bwd_min_s"] = timed(bwd, ARGS.repeats, warmup=instrumented(rec, "bwd", bwd))
    guarded(rec, "ours_bwd_memory_error", measure_ours, rec, "bwd", bwd)
    return a


def bench_torch(rec, t_in, a_ours):
    if tdev() is None:
        rec["torch_sdpa"] = "torch (with CUDA) not available"
        return
    import torch.nn.functional as F

    tq, tk, tv, tg = t_in
    try:
        rec["torch_fwd_s"], rec["torch_fwd_min_s"] = timed(lambda: F.scaled_dot_product_attention(tq, tk, tv), ARGS.repeats)
        measure_torch(rec, "torch_fwd", lambda: F.scaled_dot_product_attention(tq, tk, tv))
        ref = F.scaled_dot_product_attention(tq, tk, tv)
        ours = torch.as_tensor(a_ours, device=tdev()) if tdev() == "cuda" else torch.from_numpy(a_ours.copy_to_host())
        rec["max_abs_diff_vs_torch"] = float((ours.reshape(ref.shape) - ref).abs().max())
        del ref, ours
        if left() < 0:
            return
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (tq, tk, tv))
        out = F.scaled_dot_product_attention(qg, kg, vg)

        def bwd():  # the backward alone, on a retained graph
            qg.grad = kg.grad = vg.grad = None
            out.backward(tg, retain_graph=True)

        rec["torch_bwd_s"], rec["torch_bwd_min_s"] = timed(bwd, ARGS.repeats)
        measure_torch(rec, "torch_bwd", bwd)
        del out
    except RuntimeError as exc:  # out of memory (math path at large N)
        rec["torch_error"] = str(exc).splitlines()[0][:200]
        if tdev() == "cuda":
            torch.cuda.empty_cache()


def bench_roof(rec, t_in, d):
    if tdev() is None:
        rec["roof"] = "torch not available"
        return
    tq, tk, tv, tg = t_in
    q, k, v, g = (x[0, 0] for x in t_in)
    n, m = q.shape[0], k.shape[0]
    chunk = max(1, min(n, 2**28 // max(m, 1)))
    scale = 1.0 / math.sqrt(d)

    def fwd():
        for i in range(0, n, chunk):
            s = (q[i : i + chunk] @ k.T) * scale
            p = torch.exp(s)
            p @ v

    def bwd():  # the backward's GEMMs: S = QK^T, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, plus exp
        for i in range(0, n, chunk):
            s = q[i : i + chunk] @ k.T
            p = torch.exp(s)
            dp = g[i : i + chunk] @ v.T
            p.T @ g[i : i + chunk]
            dp @ k
            dp.T @ q[i : i + chunk]

    try:
        rec["roof_fwd_s"], rec["roof_fwd_min_s"] = timed(fwd, ARGS.repeats)
        measure_torch(rec, "roof_fwd", fwd)
        if left() > 0:
            rec["roof_bwd_s"], rec["roof_bwd_min_s"] = timed(bwd, ARGS.repeats)
            measure_torch(rec, "roof_bwd", bwd)
    except RuntimeError as exc:
        rec["roof_error"] = str(exc).splitlines()[0][:200]


def estimate_s(cfg, done):
    """Seconds ``cfg`` should take, from the same D and dtype at the largest smaller N measured (x (N/N')^2); None if none."""
    prev = [c for c in done if c["d"] == cfg["d"] and c["dtype"] == cfg["dtype"] and c["n"] < cfg["n"] and "ours_fwd_s" in c]
    if not prev:
        return None
    p = max(prev, key=lambda c: c["n"])
    runs = 2 + ARGS.repeats + 1  # first call, instrumented warm-up, repeats, memory reading
    per_run = sum(p.get(f"{w}_{k}_s", 0.0) for w in ("ours", "torch", "roof") for k in ("fwd", "bwd"))
    return runs * per_run * (cfg["n"] / p["n"]) ** 2


def overhead(result):
    """The fixed cost of one call at N = M = 128, D = 64 (8 and 4 under the simulator): median wall time vs the kernels' own time."""
    n, d, reps = (8, 4, 2) if ARGS.simulate else (128, 64, 20)
    rec = {"n": n, "m": n, "d": d, "dv": d}
    for dtype in ARGS.dtypes:
        np_in, t_in = make_inputs(n, d, np.dtype(dtype), seed=1)
        q, k, v, g = ours_inputs(np_in, t_in)
        a, lse = C.attention(q, k, v, return_lse=True)
        C.attention_vjp(q, k, v, g, out=a, lse=lse)
        sync()
        r = {}
        fwd = lambda: C.attention(q, k, v, return_lse=True)  # noqa: E731
        bwd = lambda: C.attention_vjp(q, k, v, g, out=a, lse=lse)  # noqa: E731
        r["fwd_s"], r["fwd_min_s"] = timed(fwd, reps, warmup=instrumented(r, "fwd", fwd))
        r["bwd_s"], r["bwd_min_s"] = timed(bwd, reps, warmup=instrumented(r, "bwd", bwd))
        before = dict(C.launches)
        fwd()
        r["fwd_launches"] = {kk: C.launches[kk] - before.get(kk, 0) for kk in C.launches if C.launches[kk] != before.get(kk, 0)}
        before = dict(C.launches)
        bwd()
        r["bwd_launches"] = {kk: C.launches[kk] - before.get(kk, 0) for kk in C.launches if C.launches[kk] != before.get(kk, 0)}
        sync()
        rec[dtype] = r
    result["overhead"] = rec
    print(json.dumps({"overhead": rec}), flush=True)


def main():
    sizes = ARGS.sizes or ([32] if ARGS.simulate else [4096, 16384, 65536])
    if ARGS.simulate:
        ARGS.repeats = min(ARGS.repeats, 2)
    dims = ARGS.dims or ([8] if ARGS.simulate else [64, 128])
    out_path = ARGS.out or os.path.join(HERE, "results", "gpu_simulated.json" if ARGS.simulate else "gpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    METER.install()
    result = {"machine": machine(), "args": vars(ARGS), "configs": [], "skipped": []}
    if ARGS.simulate:
        result["note"] = "Numba CUDA simulator, torch on the CPU: checks the script; the timings mean nothing"

    def save(main_kernels=True):
        if main_kernels:  # not after configure(launch_bounds=...) rebuilt them
            result.setdefault("kernel_resources", {}).update(kernel_resources())
        result["elapsed_s"] = time.perf_counter() - T0
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    for n in sizes:
        for d in dims:
            for dtype in ARGS.dtypes:
                cfg = {"n": n, "m": n, "d": d, "dv": d, "dtype": dtype}
                est = estimate_s(cfg, result["configs"])
                if left() < 0 or (est is not None and est > left()):
                    result["skipped"].append(dict(cfg, estimate_s=est, left_s=left()))
                    print(json.dumps({"skipped": result["skipped"][-1]}), flush=True)
                    continue
                t_cfg = time.perf_counter()
                np_in = t_in = a = None
                try:
                    np_in, t_in = make_inputs(n, d, np.dtype(dtype))
                    a = bench_ours(cfg, np_in, t_in)
                    if left() > 0:
                        bench_torch(cfg, t_in, a)
                    if left() > 0:
                        bench_roof(cfg, t_in, d)
                except Exception as exc:  # record and go on with the next configuration
                    cfg["error"] = f"{type(exc).__name__}: {exc}"[:300]
                for key in ("fwd", "bwd"):
                    if f"ours_{key}_s" in cfg and f"torch_{key}_s" in cfg:
                        cfg[f"speedup_vs_torch_{key}"] = cfg[f"torch_{key}_s"] / cfg[f"ours_{key}_s"]
                    if f"ours_{key}_s" in cfg and f"roof_{key}_s" in cfg:
                        cfg[f"ours_over_roof_{key}"] = cfg[f"ours_{key}_s"] / cfg[f"roof_{key}_s"]
                cfg["nm_buffer_bytes"] = n * n * np.dtype(dtype).itemsize  # one N x M array of the dtype, for scale
                cfg["wall_s"] = time.perf_counter() - t_cfg
                result["configs"].append(cfg)
                save()
                print(json.dumps(cfg), flush=True)
                del np_in, t_in, a
                if torch is not None and tdev() == "cuda":
                    torch.cuda.empty_cache()
        if n == sizes[0]:
            try:
                overhead(result)
            except Exception as exc:
                result["overhead"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            save()
    # Launch-bounds variants (register cap vs occupancy), at one mid size, if time is left.
    result["variants"] = []
    n_var = 16384 if 16384 in sizes else sizes[0]
    variants = [] if ARGS.simulate else [(128, 3), (128, 4)]
    for lb in variants:
        for dtype in ARGS.dtypes:
            if left() < 60:
                result["skipped"].append({"launch_bounds": list(lb), "dtype": dtype, "left_s": left()})
                continue
            K.configure(launch_bounds=lb)
            rec = {"launch_bounds": list(lb), "n": n_var, "m": n_var, "d": 64, "dv": 64, "dtype": dtype}
            try:
                np_in, t_in = make_inputs(n_var, 64, np.dtype(dtype))
                bench_ours(rec, np_in, t_in)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rec["kernel_resources"] = kernel_resources()
            result["variants"].append(rec)
            print(json.dumps(rec), flush=True)
            save(main_kernels=False)
    K.configure(launch_bounds=None)
    save(main_kernels=False)
    print(f"wrote {out_path} ({len(result['configs'])} configurations, {len(result['skipped'])} skipped, "
          f"{time.perf_counter() - T0:.0f} s)")


if __name__ == "__main__":
    main()
