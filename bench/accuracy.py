"""Adversarial accuracy suite: iem_ref vs scipy, torch and jax, in ulps of the truth.

For every case (logits ``x``; iem_ref is called with energies ``d = -x``) and
every library, the script measures

* ``L``: the error of the log-sum-exp (log-partition) in ulps, and its
  relative condition number ``kappa = sum_j r_j |x_j| / |L|``;
* ``r``: the largest componentwise error of the softmax (responsibilities)
  in ulps, over the components whose true value is a normal float of the
  output dtype;
* ``sum``: ``|sum_j r_j - 1|`` (the exact sum of the returned floats, via
  ``math.fsum``) in units of the dtype's unit roundoff ``u``.

The truth
---------
* ``n <= 5000``: the exact tier (:mod:`iem_ref.exact`, decimal with Ziv's
  loop: correctly rounded values, and their Decimal expansion is used).
* larger ``n`` (``1e5`` equal values, ``1e6`` near-equal values): fixed
  40-digit ``decimal`` (:func:`fixed_precision_truth`), whose a-priori
  relative error is below ``(n + 2 + 2 max t_j) 1e-39``, i.e. under ``1e-16``
  ulps for these cases; the script checks it against the exact tier on every
  small case and records the largest disagreement.

Errors are formed in double-double (truth ``hi + lo``, ``hi = float(truth)``),
so sub-ulp errors are resolved.  Usage::

    python bench/accuracy.py            # writes bench/results/accuracy.json and accuracy.md
    python bench/accuracy.py --quick    # skip the n = 1e6 case
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import json
import math
import platform
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import iem_ref  # noqa: E402
from iem_ref import exact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXACT_LIMIT = 5000


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------


def cases(quick=False):
    rng = np.random.default_rng(20261129)
    out = {
        "dominant [0, -40]": np.array([0.0, -40.0]),
        "dominant [0, -700]": np.array([0.0, -700.0]),
        "cancellation [-ln2, -ln2]": np.array([-0.6931471805599453] * 2),
        "magnitudes near 1e300": np.array([1e300, 1e300 * (1 - 2**-50), 0.9e300, -1e300]),
        "1e5 equal values": np.full(100_000, 3.7),
        "mixed -inf": np.array([-np.inf, 1.0, 2.0, -np.inf, 0.5]),
        # -500 U, not uniform(-500, 0): -500 + 500 U lies on a grid of 2**-44 on which
        # x - max is exact for every library (a benign case in disguise).
        "spread of hundreds (-500 U(0,1), n=1000)": -500.0 * rng.random(1000),
        "one large among 5000 N(0,1)": np.r_[50.0, rng.normal(0, 1, 4999)],
        "N(0, 30), n=1000": rng.normal(0, 30, 1000),
        "N(0, 30), n=1000, float32": rng.normal(0, 30, 1000).astype(np.float32),
        "spread of hundreds, float32": (-500.0 * rng.random(1000)).astype(np.float32),
        "dominant [0, -40], float32": np.array([0.0, -40.0], dtype=np.float32),
    }
    if not quick:
        out["1e6 near-equal values (1 + 1e-10 N(0,1))"] = 1.0 + 1e-10 * rng.normal(0, 1, 1_000_000)
    return out


# ----------------------------------------------------------------------------
# the truth, as double-double (hi, lo)
# ----------------------------------------------------------------------------

_CTX = decimal.Context(prec=60, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def _hilo(values):
    """Decimal values -> float64 arrays hi = float(x), lo = float(x - hi)."""
    hi = np.array([float(v) for v in values], dtype=np.float64)
    lo = np.array(
        [float(_CTX.subtract(v, Decimal(h))) if (v.is_finite() and math.isfinite(h)) else 0.0 for v, h in zip(values, hi)],
        dtype=np.float64,
    )
    return hi, lo


def fixed_precision_truth(x, prec=40):
    """softmax and log-sum-exp of finite float logits in fixed ``prec``-digit decimal.

    ``t_j = m - x_j`` is formed exactly, ``w_j = exp(-t_j)`` (correctly
    rounded), ``S = sum w_j`` with ``n`` roundings, ``L = m + ln S``,
    ``r_j = w_j / S``.  With ``delta = 10**(1 - prec)`` the relative error of
    every ``r_j`` is at most ``(n + 2 + 2 t_j) delta`` and the absolute error of
    ``L`` at most ``(|m| + n + 2 + |L|) delta``: for the cases here (n <= 1e6,
    t_j < 1e-8 or exactly 0) far below 1e-16 ulps.
    """
    C = decimal.Context(prec=prec, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])
    xs = [Decimal(v) for v in np.asarray(x, dtype=np.float64).tolist()]
    m = max(xs)
    w = [C.exp(_CTX.subtract(v, m)) for v in xs]
    S = Decimal(0)
    for wj in w:
        S = C.add(S, wj)
    L = C.add(m, C.ln(S))
    r = [C.divide(wj, S) for wj in w]
    return L, r


def truth(x):
    n = x.size
    if n <= EXACT_LIMIT:
        L = exact.log_partition(-x)
        r = list(exact.responsibilities(-x))
        method = "exact tier (decimal, Ziv loop)"
    else:
        L, r = fixed_precision_truth(x)
        method = "fixed 40-digit decimal"
    return L, r, method


# ----------------------------------------------------------------------------
# libraries
# ----------------------------------------------------------------------------


def libraries():
    libs = {}
    libs["iem_ref"] = (lambda x: iem_ref.log_partition(-x), lambda x: iem_ref.responsibilities(-x), iem_ref.__version__)
    import scipy
    import scipy.special as sp

    libs["scipy"] = (lambda x: sp.logsumexp(x), lambda x: sp.softmax(x), scipy.__version__)
    try:
        import torch

        libs["torch"] = (
            lambda x: torch.logsumexp(torch.from_numpy(np.ascontiguousarray(x)), 0).numpy(),
            lambda x: torch.softmax(torch.from_numpy(np.ascontiguousarray(x)), 0).numpy(),
            torch.__version__,
        )
    except ImportError:
        pass
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        libs["jax"] = (
            lambda x: np.asarray(jax.nn.logsumexp(jnp.asarray(x))),
            lambda x: np.asarray(jax.nn.softmax(jnp.asarray(x))),
            jax.__version__,
        )
    except ImportError:
        pass
    return libs


# ----------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------


def ulp_errors(got, hi, lo, dtype):
    """|got - (hi + lo)| / ulp_dtype(truth), elementwise; non-finite mismatch -> inf, match -> 0."""
    got = np.asarray(got, dtype=np.float64)
    with np.errstate(all="ignore"):
        err = np.abs((got - hi) - lo)
        truth32 = hi.astype(dtype)
        sp = np.spacing(np.abs(truth32)).astype(np.float64)
        sp = np.where(np.isfinite(sp), sp, np.inf)
        out = err / sp
    same_nonfinite = (np.isnan(got) & np.isnan(hi)) | (np.isinf(got) & (got == hi))
    out = np.where(same_nonfinite, 0.0, out)
    out = np.where(~np.isfinite(got) & ~same_nonfinite, np.inf, out)
    out = np.where(np.isfinite(got) & ~np.isfinite(hi), np.inf, out)
    return out


def measure(x, L_true, r_true, libs):
    dtype = x.dtype
    u = float(np.finfo(dtype).eps) / 2
    Lhi, Llo = _hilo([L_true])
    rhi, rlo = _hilo(r_true)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x)
        kappa = float(np.sum(np.where(finite, rhi * np.abs(np.where(finite, x, 0.0)), 0.0)) / abs(Lhi[0])) if Lhi[0] != 0 else math.inf
    normal = np.abs(rhi.astype(dtype)) >= np.finfo(dtype).tiny
    res = {}
    for name, (lse, softmax, _) in libs.items():
        with np.errstate(all="ignore"):
            L = np.asarray(lse(x))
            r = np.asarray(softmax(x))
        L_err = float(ulp_errors(L.reshape(1), Lhi, Llo, dtype)[0])
        r_err = ulp_errors(r, rhi, rlo, dtype)
        rmax = float(np.max(r_err[normal])) if normal.any() else 0.0
        # fsum of [r_1, ..., r_n, -1] is the correctly rounded value of the exact sum minus 1
        s = math.fsum(np.asarray(r, dtype=np.float64).tolist() + [-1.0]) if np.isfinite(r).all() else math.nan
        res[name] = {
            "dtype_out": str(r.dtype),
            "L_value": float(L),
            "L_ulp": L_err,
            "r_max_ulp": rmax,
            "sum_minus_1_in_u": abs(s) / u if math.isfinite(s) else math.nan,
        }
    return kappa, float(Lhi[0]), res


def verify_fixed_precision(x):
    """Largest disagreement (float64 ulps) of the fixed 40-digit truth with the exact tier: r and L."""
    L_e, r_e = exact.log_partition(-x), list(exact.responsibilities(-x))
    L_f, r_f = fixed_precision_truth(x)
    hi, lo = _hilo(r_e)
    fhi, flo = _hilo(r_f)
    with np.errstate(all="ignore"):
        worst = float(np.max(np.abs((fhi - hi) + (flo - lo)) / np.spacing(np.abs(hi)))) if len(r_e) else 0.0
    Lh, Ll = _hilo([L_e])
    Fh, Fl = _hilo([L_f])
    return {"r": worst, "L": float(abs((Fh[0] - Lh[0]) + (Fl[0] - Ll[0])) / np.spacing(abs(Lh[0])))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the n = 1e6 case")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    libs = libraries()
    rows = []
    checks = {}
    for name, x in cases(args.quick).items():
        t0 = time.perf_counter()
        L_true, r_true, method = truth(x)
        kappa, L_float, res = measure(x, L_true, r_true, libs)
        if method.startswith("exact") and np.isfinite(x).all() and x.dtype == np.float64 and x.size <= 1000:
            checks[name] = verify_fixed_precision(x)
        rows.append({"case": name, "n": int(x.size), "dtype": str(x.dtype), "truth": method, "L_true": L_float, "kappa": kappa, "results": res})
        cells = "  ".join(f"{lib}: L {v['L_ulp']:.3g} r {v['r_max_ulp']:.3g} s {v['sum_minus_1_in_u']:.2g}" for lib, v in res.items())
        print(f"{name:45s} kappa {kappa:9.3g} | {cells}   ({time.perf_counter() - t0:.1f}s)", flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "libraries": {k: v[2] for k, v in libs.items()},
        "truth": {
            "n <= 5000": "iem_ref.exact (decimal, Ziv loop, correctly rounded)",
            "n > 5000": "fixed 40-digit decimal (a-priori relative error < (n + 2 + 2 max t) 1e-39)",
        },
        "fixed_precision_vs_exact_max_ulp": checks,
        "metrics": {
            "L_ulp": "log-sum-exp error in ulps of the output dtype",
            "kappa": "sum_j r_j |x_j| / |L|",
            "r_max_ulp": "max componentwise softmax error in ulps, over components whose true value is a normal float",
            "sum_minus_1_in_u": "|sum_j r_j - 1| / u, the exact sum of the returned floats (math.fsum of r and -1)",
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1, allow_nan=True) + "\n")
    (out / "accuracy.md").write_text(markdown(meta, rows))
    print(f"wrote {out / 'accuracy.json'} and {out / 'accuracy.md'}")


def naive_report():
    """The report that the README's naive float32 softmax produces (run here, not pasted)."""
    from iem_ref.testing import assert_softmax_close

    x = np.random.default_rng(0).normal(0, 30, (4, 1000)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(x)
        r = e / e.sum(axis=-1, keepdims=True)
    try:
        assert_softmax_close(r, x)
    except AssertionError as err:
        return str(err)
    return "(no failure: the helper missed the overflow)"


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "0"
    if v >= 1e4:
        return f"{v:.1e}"
    return f"{v:.3g}"


def markdown(meta, rows):
    libs = list(meta["libraries"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["libraries"].items())
    head = "| case | n | dtype | kappa | " + " | ".join(f"{lib} L / r" for lib in libs) + " |"
    sep = "|" + "---|" * (4 + len(libs))
    lines = [head, sep]
    for row in rows:
        cells = [f"{_fmt(row['results'][lib]['L_ulp'])} / {_fmt(row['results'][lib]['r_max_ulp'])}" for lib in libs]
        lines.append(f"| {row['case']} | {row['n']} | {row['dtype']} | {_fmt(row['kappa'])} | " + " | ".join(cells) + " |")
    sums = ["| case | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    for row in rows:
        sums.append(f"| {row['case']} | " + " | ".join(_fmt(row["results"][lib]["sum_minus_1_in_u"]) for lib in libs) + " |")
    def worst(dtype, key, minus_kappa=False):
        vals = {}
        for lib in libs:
            sel = [r["results"][lib][key] - (r["kappa"] if minus_kappa else 0) for r in rows if r["dtype"] == dtype and math.isfinite(r["kappa"])]
            vals[lib] = max(sel, default=0.0)
        return ", ".join(f"{lib} {_fmt(v)}" for lib, v in vals.items())

    return README_SECTION.format(
        worst_r=worst("float64", "r_max_ulp"),
        worst_r32=worst("float32", "r_max_ulp"),
        worst_l=worst("float64", "L_ulp", True),
        report=naive_report(),
        table="\n".join(lines),
        versions=versions,
        date=meta["date"],
    ) + DETAILS.format(sums="\n".join(sums), checks=json.dumps(meta["fixed_precision_vs_exact_max_ulp"], indent=1), machine=meta["machine"])


README_SECTION = """## Accuracy

`iem_ref` is meant to be more trustworthy than the libraries you compare
with.  Against an exact tier (`iem_ref.exact`: standard-library `decimal`,
precision raised until the float64 rounding is settled, so the truth is
correctly rounded), on an adversarial suite (`python bench/accuracy.py`,
{date}; {versions}):

- **softmax / responsibilities**, worst componentwise error over the suite
  (ulps, normal components), float64: {worst_r}; float32
  inputs: {worst_r32}.  The float64 reference keeps the
  rounding error of `x_j - max` (TwoSum), folds it back
  (`exp(hi) (1 + lo)`) and divides by an almost correctly rounded sum:
  3 ulps is its tested bound;
- **log-sum-exp / log-partition**: worst of `ulps - kappa` over the float64
  cases (the tested
  bound is `2 + kappa` ulps, `kappa = sum_j r_j |x_j| / |L|`): {worst_l}.
  Where `kappa` is huge (a result near 0 by cancellation) every float
  algorithm loses digits; only the exact tier does better.

Errors in ulps of the output dtype, `L / r` per library (`r`: the largest
componentwise softmax error):

{table}

### Testing your own kernel

`iem_ref.testing` compares your kernel's output with the oracle's answer for
the same inputs, with tolerances derived from the dtype and the reduction
length (and the conditioning of each element), and explains failures:

```python
import numpy as np
from iem_ref.testing import assert_softmax_close, assert_attention_close

def my_softmax(x):                      # a naive kernel: no max subtraction
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)

def test_my_softmax():
    x = np.random.default_rng(0).normal(0, 30, (4, 1000)).astype(np.float32)
    assert_softmax_close(my_softmax(x), x)

def test_my_attention():
    q, k, v = (np.random.default_rng(1).normal(size=s).astype(np.float32)
               for s in [(2, 5, 8), (2, 7, 8), (2, 7, 3)])
    s = q @ k.transpose(0, 2, 1) / 8**0.5      # a Python float keeps float32
    out = my_softmax(s) @ v
    assert_attention_close(out, q, k, v)
```

`test_my_softmax` fails (float32 `exp` overflows beyond 88.7) with:

```
{report}
```

Other helpers: `assert_responsibilities_close` (= `assert_softmin_close`,
energies), `assert_log_partition_close`, `assert_close_to_reference`,
`ulp_error`; `exact=True` takes the expected values from the exact tier.
"""

DETAILS = """

## Details

### `|sum_j r_j - 1|` in units of `u`

The exact sum of the returned floats (`math.fsum` of `r` and `-1`).  The
reference's bound is `2u + (log2 M)^2 u^2 + O(u^2)`: the weights' own errors
cancel in `w_j / S`, leaving the rounding of `S` and of the `M` quotients,
each up to `u`; one `u` would need correctly rounded *and* sum-preserving
components, which no componentwise rounding guarantees
(tests/test_accuracy.py).

{sums}

### Truth for the large cases

Fixed 40-digit decimal for `n > 5000` (the two large cases have `L` near
15.2 and 14.8, no cancellation, exponents 0 or below 1e-8: the a-priori
bound, under 1e-30 relative, holds with room).  Checked here against the exact tier on the small float64 cases
(largest disagreement in float64 ulps, `r` and `L`).  The `L` of
`[0, -700]` is where any fixed precision fails: `1 + 1e-304` rounds to 1 at
40 digits, so the fixed method returns 0; the exact tier's `log1p` form
and rising precision are what get it right.

```
{checks}
```

Machine: {machine}.
"""


if __name__ == "__main__":
    main()
