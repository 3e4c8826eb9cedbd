"""How tight the default tolerances are: slack of correct kernels (torch SDPA) under iem_ref.testing.

For each dtype, size and bound, run ``torch.nn.functional.scaled_dot_product_attention``
(forward, and its autograd backward) on N(0, 1) inputs and record

* ``slack``: the tolerance at the element where torch errs most, over that error
  (the question a kernel author asks: how much worse may a kernel be and pass);
* ``ratio``: the largest error / tolerance over all elements (below 1: passes).

Writes ``bench/results/slack.json`` and ``slack.md`` with the machine.
Usage: ``python bench/slack.py [--sizes 1024x64 4096x64 ...] [--backward-sizes 1024x64]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine():
    info = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = {}
        for line in text.splitlines():
            if ":" in line:
                key, val = line.split(":", 1)
                fields.setdefault(key.strip(), val.strip())
        info["cpu"] = fields.get("model name", "")
        info["cpu_family_model"] = f"{fields.get('cpu family', '')}/{fields.get('model', '')}"
        info["cores"] = sum(1 for line in text.splitlines() if line.startswith("processor"))
    except OSError:
        info["cpu"] = platform.processor()
    return info


def one(dtype_name, n, d, backward, seed=0):
    import torch

    import iem_ref
    from iem_ref.attention import Competition, prepare_attention
    from iem_ref.bounds import kernel_forward_bounds, kernel_vjp_bounds
    from iem_ref.precision import Precision
    from iem_ref.accel.verdict import forward_chunks
    from iem_ref.bounds import U64, variant_vjp_error
    from iem_ref.testing import _SECOND_ORDER, _floor, _host, _tiled_tolerances

    tdt = getattr(torch, dtype_name)
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.normal(size=(1, 2, n, d)) for _ in range(4))
    tq, tk, tv = (torch.tensor(x).to(tdt).requires_grad_(backward) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    qn, kn, vn = (_host(x).astype(np.float64) for x in (tq, tk, tv))
    prec = Precision.of(dtype_name)
    inp = prepare_attention(qn, kn, vn)
    comp = Competition(inp)
    a, L, r = iem_ref.attention(qn, kn, vn, return_lse=True, return_responsibilities=True)
    rows = []
    err = np.abs(_host(out).astype(np.float64) - a)
    worst = np.unravel_index(np.argmax(err), err.shape)
    chunks = list(forward_chunks(qn, kn, vn, prec)) if prec.scores != np.float64 else None
    vmax = float(np.abs(vn).max())
    for bound in ("probabilistic", "rigorous"):
        # the default tolerance of assert_attention_close with the reference: section 13, the oracle's 8 u64, the floor
        tol, _ = kernel_forward_bounds(comp, r, a, L, prec, bound)
        tol = (tol + 8 * U64 * np.abs(a)) * _SECOND_ORDER + _floor(prec, n, bound) * max(1.0, vmax)
        rows.append(dict(dtype=dtype_name, n=n, d=d, pass_="forward", bound=bound, worst_error=float(err.max()),
                         slack=float(tol[worst] / err[worst]), ratio=float((err / tol).max())))
        if chunks is not None:  # the tiled oracle's tolerance (its own error, the floors and the second-order factor in)
            tol = np.concatenate([_tiled_tolerances(ch, inp, prec, bound)[0] for ch in chunks]).reshape(err.shape)
            rows.append(dict(dtype=dtype_name, n=n, d=d, pass_="forward (tiled oracle)", bound=bound,
                             worst_error=float(err.max()), slack=float(tol[worst] / err[worst]), ratio=float((err / tol).max())))
    if backward:
        tg = torch.tensor(g).to(tdt)
        out.backward(tg)
        gn = _host(tg).astype(np.float64)
        exp = iem_ref.attention_vjp(qn, kn, vn, gn)
        models = {"": prec}
        if dtype_name in ("bfloat16", "float16"):  # torch's CPU backward stores dq, dk, dv in the input dtype per block
            models[" (torch CPU blocks)"] = Precision.of(dtype_name, gradient_blocks=torch_cpu_blocks(n))
        for label, model in models.items():
            for bound in ("probabilistic", "rigorous"):
                # the default tolerance of assert_attention_vjp_close: section 14, the oracle's own error, the floors
                own = variant_vjp_error(qn, kn, vn, gn)[:3]
                tols = [(t + o) * _SECOND_ORDER + _floor(model, m, bound)
                        for t, o, m in zip(kernel_vjp_bounds(comp, gn, model, bound), own, (n, n, n))]
                for name, grad, e, t in zip(("dq", "dk", "dv"), (tq.grad, tk.grad, tv.grad), exp, tols):
                    err = np.abs(_host(grad).astype(np.float64) - e)
                    w = np.unravel_index(np.argmax(err), err.shape)
                    rows.append(dict(dtype=dtype_name, n=n, d=d, pass_=f"backward {name}{label}", bound=bound,
                                     worst_error=float(err.max()), slack=float(t[w] / err[w]), ratio=float((err / t).max())))
    return rows


def torch_cpu_blocks(n):
    """``gradient_blocks`` of torch's CPU flash backward for ``n`` queries (query split by length, 512 keys)."""
    return (256 if n >= 768 else 64 if n >= 192 else 32, 512)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["1024x64", "1024x128", "4096x64", "4096x128"])
    ap.add_argument("--backward-sizes", nargs="*", default=["1024x64"])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    rows = []
    t0 = time.time()
    for size in args.sizes:
        n, d = (int(x) for x in size.split("x"))
        for dt in args.dtypes:
            rows += one(dt, n, d, backward=size in args.backward_sizes)
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    doc = dict(machine=machine(), seconds=time.time() - t0, rows=rows)
    (RESULTS / "slack.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# Slack of correct kernels under the default tolerances",
        "",
        f"Machine: {doc['machine'].get('cpu', '?')} (family/model {doc['machine'].get('cpu_family_model', '?')}, "
        f"{doc['machine'].get('cores', '?')} cores), numpy {doc['machine']['numpy']}, torch {doc['machine'].get('torch', '-')}.",
        "torch SDPA on CPU, B = 1, 2 heads, N = M, N(0, 1) inputs, seed 0.  slack = tolerance / error at the element",
        "where torch errs most; ratio = max over elements of error / tolerance (below 1: passes).  The tolerance is the",
        "helpers' default, whole: the derived bound, the oracle's own error, the second-order factor and the floor;",
        "*forward* with the NumPy reference, *forward (tiled oracle)* with the tiled float64 oracle.",
        "",
        "| dtype | N = M | D | pass | worst error | slack (probabilistic) | ratio (probabilistic) | slack (rigorous) | ratio (rigorous) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["dtype"], r["n"], r["d"], r["pass_"]), {})[r["bound"]] = r
    for (dt, n, d, ps), b in keyed.items():
        p_, g_ = b["probabilistic"], b["rigorous"]
        lines.append(f"| {dt} | {n} | {d} | {ps} | {p_['worst_error']:.3g} | {p_['slack']:.3g} | {p_['ratio']:.3g} | {g_['slack']:.3g} | {g_['ratio']:.3g} |")
    (RESULTS / "slack.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
