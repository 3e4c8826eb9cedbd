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
runs (3 when one run takes over 2 s) after one warm-up; the first call of each accel.cuda specialisation
(JIT compile + run) is reported apart as ``first_call_s``.  Configurations
run smallest first; the JSON is rewritten after each, so a run cut short by
``--budget`` (seconds) or a timeout keeps what it measured.

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


def timed(fn, repeats):
    """(median, min) seconds of ``repeats`` synchronised runs after one warm-up (3 runs if the warm-up took > 2 s)."""
    t = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - t > 2.0:
        repeats = min(repeats, 3)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(np.min(ts))


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
    if not ARGS.simulate:
        try:
            dev = cuda.get_current_device()
            info["cc"] = list(dev.compute_capability)
            info["sm_count"] = dev.MULTIPROCESSOR_COUNT
        except Exception as exc:  # pragma: no cover
            info["device_error"] = repr(exc)
    return info


def kernel_resources():
    """Registers and shared memory per kernel specialisation that ran (real GPU only)."""
    out = {}
    if ARGS.simulate:
        return out
    for (dtype, energy), kern in K._CACHE.items():
        for name, fn in kern.all().items():
            try:
                regs = fn.get_regs_per_thread()
                smem = fn.get_shared_mem_per_block()
                out[f"{name}/{dtype}/{energy}"] = {"regs": regs, "smem": smem}
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
    rec["ours_fwd_s"], rec["ours_fwd_min_s"] = timed(lambda: C.attention(q, k, v, return_lse=True), ARGS.repeats)
    if left() < 0:
        return a
    t = time.perf_counter()
    C.attention_vjp(q, k, v, g, out=a, lse=lse)
    sync()
    rec["ours_bwd_first_call_s"] = time.perf_counter() - t
    rec["ours_bwd_s"], rec["ours_bwd_min_s"] = timed(lambda: C.attention_vjp(q, k, v, g, out=a, lse=lse), ARGS.repeats)
    return a


def bench_torch(rec, t_in, a_ours):
    if tdev() is None:
        rec["torch_sdpa"] = "torch (with CUDA) not available"
        return
    import torch.nn.functional as F

    tq, tk, tv, tg = t_in
    try:
        rec["torch_fwd_s"], rec["torch_fwd_min_s"] = timed(lambda: F.scaled_dot_product_attention(tq, tk, tv), ARGS.repeats)
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
        if left() > 0:
            rec["roof_bwd_s"], rec["roof_bwd_min_s"] = timed(bwd, ARGS.repeats)
    except RuntimeError as exc:
        rec["roof_error"] = str(exc).splitlines()[0][:200]


def main():
    sizes = ARGS.sizes or ([32] if ARGS.simulate else [4096, 16384, 65536])
    if ARGS.simulate:
        ARGS.repeats = min(ARGS.repeats, 2)
    dims = ARGS.dims or ([8] if ARGS.simulate else [64, 128])
    out_path = ARGS.out or os.path.join(HERE, "results", "gpu_simulated.json" if ARGS.simulate else "gpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    result = {"machine": machine(), "args": vars(ARGS), "configs": [], "skipped": []}
    if ARGS.simulate:
        result["note"] = "Numba CUDA simulator, torch on the CPU: checks the script; the timings mean nothing"
    for n in sizes:
        for d in dims:
            for dtype in ARGS.dtypes:
                cfg = {"n": n, "m": n, "d": d, "dv": d, "dtype": dtype}
                if left() < 0:
                    result["skipped"].append(cfg)
                    continue
                np_in, t_in = make_inputs(n, d, np.dtype(dtype))
                try:
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
                result["configs"].append(cfg)
                result["kernel_resources"] = kernel_resources()
                result["elapsed_s"] = time.perf_counter() - T0
                with open(out_path, "w") as f:
                    json.dump(result, f, indent=1)
                print(json.dumps(cfg), flush=True)
                del np_in, t_in
                if torch is not None and tdev() == "cuda":
                    torch.cuda.empty_cache()
    # Launch-bounds variants (register cap vs occupancy), at one mid size, if time is left.
    result["variants"] = []
    n_var = 16384 if 16384 in sizes else sizes[0]
    variants = [] if ARGS.simulate else [(128, 3), (128, 4)]
    for lb in variants:
        for dtype in ARGS.dtypes:
            if left() < 60:
                result["skipped"].append({"launch_bounds": lb, "dtype": dtype})
                continue
            K.configure(launch_bounds=lb)
            rec = {"launch_bounds": list(lb), "n": n_var, "m": n_var, "d": 64, "dv": 64, "dtype": dtype}
            np_in, t_in = make_inputs(n_var, 64, np.dtype(dtype))
            try:
                bench_ours(rec, np_in, t_in)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rec["kernel_resources"] = kernel_resources()
            result["variants"].append(rec)
            print(json.dumps(rec), flush=True)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
    K.configure(launch_bounds=None)
    result["elapsed_s"] = time.perf_counter() - T0
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path} ({len(result['configs'])} configurations, {len(result['skipped'])} skipped, "
          f"{time.perf_counter() - T0:.0f} s)")


if __name__ == "__main__":
    main()
