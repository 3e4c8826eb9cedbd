"""The mutation table: worst error / default tolerance, for a correct flash kernel, its bugs, and torch SDPA.

For each size (``N = M`` in {1024, 4096}, ``D`` in {64, 128}), precision
(bf16, fp16; float32 for the float32-only bugs) and kernel (the correct
NumPy flash kernel of ``tests/flash_kernels.py``, each of its bugs, and,
where torch is installed, torch's own ``scaled_dot_product_attention`` in
bf16 on the CPU), the script runs the kernel on random normal inputs and
asks :mod:`iem_ref.testing` for the ratio ``max over elements of
|kernel - reference| / tolerance`` with the default (derived, probabilistic)
tolerance: forward (output, and LSE where the kernel returns one) and
backward (``dq, dk, dv``).  A ratio below 1 passes, above 1 fails.

Usage::

    python bench/mutations.py                  # every size; writes bench/results/mutations.{json,md}
    python bench/mutations.py --sizes 1024x64  # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402

import iem_ref  # noqa: E402
from iem_ref import testing  # noqa: E402
from iem_ref.precision import Precision  # noqa: E402
from tests.flash_kernels import BUGS, FlashKernel  # noqa: E402
from tests.test_mutations import BLOCK_K, BUG_CASES, FLOAT32_ONLY, _problem  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"bf16": BF16, "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratio(check, error):
    """``max |error| / tol`` of one checked array under the helper's default tolerance.

    ``check(e)`` runs the helper with the reference plus ``e`` in place of that array (every other
    array exact) and returns the helper's worst ratio.  The tolerance depends on the inputs and the
    precision only, so a failing error is scaled down by ``K`` until it passes: the ratio is ``K``
    times the one returned.
    """
    scale = 1.0
    while True:
        try:
            return float(check(error / scale)) * scale
        except AssertionError:
            if scale >= 1e12:
                raise
            scale *= 1e3


def forward_ratios(out, lse, q, k, v, precision, oracle="reference", **kw):
    """``(output, LSE)`` ratios under the default tolerance of ``assert_attention_close`` with ``oracle``."""
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    a_ref, L_ref = iem_ref.attention(q64, k64, v64, return_lse=True, **kw)
    call = dict(kw, precision=precision, oracle=oracle)
    r_out = _ratio(lambda e: testing.assert_attention_close(a_ref + e, q, k, v, lse=L_ref, **call),
                   out.astype(np.float64) - a_ref)
    if lse is None:
        return r_out, None
    with np.errstate(invalid="ignore"):
        dl = np.where(np.isfinite(L_ref), lse.astype(np.float64) - L_ref, 0.0)
    r_lse = _ratio(lambda e: testing.assert_attention_close(a_ref, q, k, v, lse=L_ref + e, **call), dl)
    return r_out, r_lse


def backward_ratio(grads, q, k, v, g, precision, **kw):
    """The largest ratio over ``dq, dk, dv`` under the default tolerance of ``assert_attention_vjp_close``
    (None where this version of :mod:`iem_ref.testing` has no such helper)."""
    if not hasattr(testing, "assert_attention_vjp_close"):
        return None
    q64, k64, v64, g64 = (x.astype(np.float64) for x in (q, k, v, g))
    refs = iem_ref.attention_vjp(q64, k64, v64, g64, **kw)[:3]
    worst = 0.0
    for i in range(3):
        def check(e, i=i):
            arrays = [r + e if j == i else r for j, r in enumerate(refs)]
            return testing.assert_attention_vjp_close(*arrays, q, k, v, g, precision=precision, **kw)
        worst = max(worst, _ratio(check, grads[i].astype(np.float64) - refs[i]))
    return worst


def torch_sdpa(q, k, v, g, kw):
    """torch's bf16 SDPA and its autograd backward on the CPU (plain and causal calls only)."""
    import torch

    if set(kw) - {"is_causal"}:
        return None
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=kw.get("is_causal", False))
    out.backward(torch.from_numpy(g.astype(np.float32)).to(torch.bfloat16))
    to = lambda t: t.detach().float().numpy().astype(BF16)  # noqa: E731  (bf16 values, exactly)
    return to(out), (to(tq.grad), to(tk.grad), to(tv.grad))


def run(sizes, with_torch):
    rows = []
    for m, d in sizes:
        for dname in ("bf16", "fp16", "fp32"):
            dt = DTYPES[dname]
            kernels = [None] + [b for b in BUG_CASES if (b in FLOAT32_ONLY) == (dname == "fp32")]
            kernels += ["delta_unrounded_o"] if dname != "fp32" else []
            for bug in kernels:
                config = "plain" if bug is None else BUG_CASES.get(bug, ("plain",))[0]
                configs = ["plain", "causal"] if bug is None else [config]
                for cfg in configs:
                    q, k, v, g, kw = _problem(cfg, (m, d), dt)
                    t0 = time.perf_counter()
                    ker = FlashKernel(q, k, v, block_k=BLOCK_K, bugs=() if bug is None else (bug,), **kw)
                    fwd = ker.forward()
                    grads = ker.backward(g, fwd)
                    fr, lr = forward_ratios(fwd[0], fwd[1], q, k, v, Precision.of(dt), **kw)
                    ft, lt = forward_ratios(fwd[0], fwd[1], q, k, v, Precision.of(dt), oracle="tiled", **kw)
                    br = backward_ratio(grads, q, k, v, g, Precision.of(dt), **kw)
                    rows.append(dict(kernel="correct" if bug is None else bug, config=cfg, dtype=dname, N=q.shape[-2], M=m, D=d,
                                     forward=fr, lse=lr, forward_tiled=ft, lse_tiled=lt, backward=br,
                                     seconds=round(time.perf_counter() - t0, 2)))
                    print(rows[-1], flush=True)
            if with_torch and dname == "bf16":
                for cfg in ("plain", "causal"):
                    q, k, v, g, kw = _problem(cfg, (m, d), dt)
                    res = torch_sdpa(q, k, v, g, kw)
                    fr, _ = forward_ratios(res[0], None, q, k, v, Precision.of(dt), **kw)
                    ft, _ = forward_ratios(res[0], None, q, k, v, Precision.of(dt), oracle="tiled", **kw)
                    br = backward_ratio(res[1], q, k, v, g, Precision.of(dt), **kw)
                    rows.append(dict(kernel="torch SDPA", config=cfg, dtype=dname, N=q.shape[-2], M=m, D=d,
                                     forward=fr, lse=None, forward_tiled=ft, lse_tiled=None, backward=br))
                    print(rows[-1], flush=True)
                    # its own model: dq, dk, dv stored in bf16 per block (ATen's CPU flash backward)
                    n = q.shape[-2]
                    blocks = (256 if n >= 768 else 64 if n >= 192 else 32, 512)
                    br = backward_ratio(res[1], q, k, v, g, Precision.of(dt, gradient_blocks=blocks), **kw)
                    rows.append(dict(kernel=f"torch SDPA, gradient_blocks={blocks}", config=cfg, dtype=dname, N=n, M=m,
                                     D=d, forward=None, lse=None, forward_tiled=None, lse_tiled=None, backward=br))
                    print(rows[-1], flush=True)
    return rows


def machine():
    info = dict(cpu=cpu_model(), python=platform.python_version(), numpy=np.__version__, ml_dtypes=ml_dtypes.__version__,
                iem_ref=iem_ref.__version__ if hasattr(iem_ref, "__version__") else "0.1.0",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def markdown(rows, info):
    lines = [
        "## Mutation suite: the default tolerance catches real kernel bugs",
        "",
        "Worst error / default tolerance of `iem_ref.testing` (`assert_attention_close` with the kernel's LSE,",
        "`assert_attention_vjp_close`), precision inferred from the arrays: below 1 passes, above 1 fails.",
        "Forward: with the NumPy reference oracle and with the tiled float64 oracle (`oracle=\"tiled\"`), side by side.",
        f"Random normal inputs, key tiles of {BLOCK_K}; `python bench/mutations.py`, {info['date']}; {info['cpu']},",
        f"numpy {info['numpy']}, ml_dtypes {info['ml_dtypes']}" + (f", torch {info['torch']}" if "torch" in info else "") + ".",
        "",
        "| kernel | what the line does | call | dtype | N x M, D | output | output (tiled) | LSE | LSE (tiled) | backward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = "" if r["kernel"] == "correct" or r["kernel"].startswith("torch") else BUGS[r["kernel"]]
        lines.append(f"| {r['kernel']} | {what} | {r['config']} | {r['dtype']} | {r['N']} x {r['M']}, {r['D']} "
                     f"| {_fmt(r['forward'])} | {_fmt(r.get('forward_tiled'))} | {_fmt(r['lse'])} | {_fmt(r.get('lse_tiled'))} "
                     f"| {_fmt(r['backward'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["1024x64", "1024x128", "4096x64", "4096x128"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="mutations")
    args = ap.parse_args(argv)
    sizes = [tuple(int(t) for t in s.split("x")) for s in args.sizes]
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            with_torch = False
    info = machine()
    rows = run(sizes, with_torch)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(dict(machine=info, rows=rows), indent=1))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, info))


if __name__ == "__main__":
    main()
