"""Plot benchmark results: JSON files of ``bench/results`` -> PNGs beside them.

    python bench/plot.py                                  # cpu.json, gpu.json, accuracy.json in bench/results
    python bench/plot.py bench/results/cpu_quick.json     # any results file of a supported kind
    python bench/plot.py RESULTS.json --out DIR           # PNGs into DIR instead of beside the file

Three kinds of results are recognised by their content:

* CPU timings (``bench_cpu.py``: ``cases[*].results[path].median_s``):
  ``<stem>_time.png``, time against N for every path, log-log, one column
  per dtype and one row per case kind (forward, backward, decode), the roof
  dashed; ``<stem>_vs_torch.png``, torch's time over ``accel.cpu``'s per case.
* GPU timings (``bench_gpu.py``: ``configs[*].{ours,torch,roof}_{fwd,bwd}_s``):
  the same two plots, for ``accel.cuda``, one row per pass.
* Accuracy (``accuracy.py``: ``cases[*].results[library].{r_max_ulp,L_ulp}``):
  ``<stem>_ulps.png``, the errors of each library per case as bars.

Every plot names the machine the results file records.  A path that was
skipped, failed or is absent leaves a gap (and a note in the plot), never a
made-up point; a plot with nothing to show is not written.  Needs matplotlib
(``pip install -e ".[plots]"``); the PNGs carry no time stamp, so the same
results give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FILES = ("cpu.json", "gpu.json", "accuracy.json")
PNG_METADATA = {"Software": None}
DPI = 85
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "legend.fontsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}

CPU_PATHS = {  # path key -> (legend label, colour, dashed)
    "reference": ("reference (NumPy, float64 inside)", "C7", False),
    "cpu": ("accel.cpu (Numba)", "C0", False),
    "torch": ("torch SDPA", "C3", False),
    "roof": ("roof: GEMMs + exp (decode: read K, V)", "k", True),
}
GPU_PATHS = {
    "ours": ("accel.cuda (numba-cuda)", "C0", False),
    "torch": ("torch SDPA", "C3", False),
    "roof": ("roof", "k", True),
}
D_MARKERS = ["o", "s", "^", "D", "v"]
KIND_ORDER = ["forward", "backward", "decode"]


class UnknownResults(ValueError):
    """The file is not one of the kinds of results this script plots."""


def _number(x):
    """``x`` as a positive finite float, else None (skipped, failed, missing, NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) and x > 0 else None


def kind_of(data):
    """'cpu', 'gpu' or 'accuracy', from the content; :class:`UnknownResults` otherwise."""
    if isinstance(data, dict):
        cases = data.get("cases")
        if isinstance(data.get("configs"), list):
            return "gpu"
        if isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases):
            if all("kind" in c and isinstance(c.get("results"), dict) for c in cases):
                return "cpu"
            if all("case" in c and isinstance(c.get("results"), dict) for c in cases):
                return "accuracy"
    raise UnknownResults("not CPU timings (cases[*].kind/results), GPU timings (configs) or accuracy results (cases[*].case/results)")


# ----------------------------------------------------------------------------- machine lines
def _versions(info, names):
    return ", ".join(f"{n} {info[n]}" for n in names if info.get(n))


def cpu_machine(data):
    m = data.get("machine") or {}
    if not isinstance(m, dict) or not m:
        return "machine not recorded"
    parts = [m.get("cpu") or "CPU model not recorded"]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("memory_gb"):
        parts.append(f"{m['memory_gb']} GiB")
    line = ", ".join(str(p) for p in parts)
    versions = _versions(m, ["numpy", "numba", "torch"])
    return f"{line}; {versions}" if versions else line


def gpu_machine(data):
    m = data.get("machine") or {}
    if not isinstance(m, dict) or not m:
        return "machine not recorded"
    if m.get("backend") == "simulator" or data.get("note"):
        head = f"Numba CUDA simulator on the CPU ({data.get('note') or 'timings mean nothing'})"
    else:
        head = m.get("gpu") or "GPU model not recorded"
        if m.get("gpu_memory_gib"):
            head += f", {m['gpu_memory_gib']} GiB"
    versions = _versions(m, ["numba_cuda", "torch"])
    return f"{head}; {versions}" if versions else head


def accuracy_machine(data):
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        return "machine not recorded"
    libs = meta.get("libraries") if isinstance(meta.get("libraries"), dict) else {}
    parts = [str(meta.get("machine") or "machine not recorded")]
    if meta.get("date"):
        parts.append(str(meta["date"]))
    if libs:
        parts.append(", ".join(f"{k} {v}" for k, v in libs.items()))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- timings
def cpu_series(data):
    """``{(kind, dtype): {(path, D, M_or_None): [(N, seconds), ...]}}`` and notes on what is missing."""
    panels, notes = {}, []
    for case in data.get("cases", []):
        try:
            kind, dtype, n, m, d = case["kind"], case["dtype"], int(case["N"]), int(case["M"]), int(case["D"])
        except (KeyError, TypeError, ValueError):
            notes.append("a case without kind/dtype/N/M/D")
            continue
        for path, res in (case.get("results") or {}).items():
            t = _number(res.get("median_s")) if isinstance(res, dict) else None
            if t is None:
                why = "skipped" if isinstance(res, dict) and "skipped" in res else ("failed" if isinstance(res, dict) and "error" in res else "no time")
                notes.append(f"{path} {why}")
                continue
            key = (path, d, None if m == n else m)
            panels.setdefault((kind, dtype), {}).setdefault(key, []).append((n, t))
    return panels, notes


def gpu_series(data):
    panels, notes = {}, []
    for cfg in data.get("configs", []):
        try:
            dtype, n, m, d = cfg["dtype"], int(cfg["n"]), int(cfg["m"]), int(cfg["d"])
        except (KeyError, TypeError, ValueError):
            notes.append("a configuration without dtype/n/m/d")
            continue
        for short, kind in (("fwd", "forward"), ("bwd", "backward")):
            for path in GPU_PATHS:
                t = _number(cfg.get(f"{path}_{short}_s"))
                if t is None:
                    notes.append(f"{path} {'failed' if 'error' in cfg else 'not measured'}")
                    continue
                key = (path, d, None if m == n else m)
                panels.setdefault((kind, dtype), {}).setdefault(key, []).append((n, t))
    return panels, notes


def _size(n):
    """``4194304 -> '4Mi'``, ``1024 -> '1Ki'``, other sizes as they are."""
    try:
        n = int(n)
    except (TypeError, ValueError):
        return str(n)
    for shift, unit in ((20, "Mi"), (10, "Ki")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _case_label(kind, n, m, d):
    sizes = f"N=M={_size(n)}" if n == m else f"N={_size(n)} M={_size(m)}"
    return f"{kind} {sizes} D={d}"


def _order(values, preferred):
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def plot_times(panels, notes, paths, title, path_out):
    """Time against N, log-log: rows = kinds, columns = dtypes."""
    kinds = _order({k for k, _ in panels}, KIND_ORDER)
    dtypes = _order({t for _, t in panels}, ["float64", "float32"])
    if not kinds:
        return None
    dims = sorted({key[1] for series in panels.values() for key in series})
    marker = {d: D_MARKERS[i % len(D_MARKERS)] for i, d in enumerate(dims)}
    fig, axes = plt.subplots(len(kinds), len(dtypes), figsize=(3.7 * len(dtypes) + 0.5, 2.5 * len(kinds) + 1.0), squeeze=False)
    for row, kind in enumerate(kinds):
        for col, dtype in enumerate(dtypes):
            ax = axes[row][col]
            series = panels.get((kind, dtype), {})
            fixed_m = sorted({key[2] for key in series if key[2] is not None})
            rank = {name: i for i, name in enumerate(paths)}
            for (path, d, m), points in sorted(series.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][0], kv[0][1], kv[0][2] or 0)):
                label, colour, dashed = paths.get(path, (path, "C9", False))
                points = sorted(points)
                ax.plot([p[0] for p in points], [p[1] for p in points], "--" if dashed else "-", marker=marker[d], color=colour, markersize=4)
            if not series:
                ax.text(0.5, 0.5, "no results", transform=ax.transAxes, ha="center", va="center", color="0.4")
            else:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            m_note = f", M = {', '.join(str(m) for m in fixed_m)}" if fixed_m else ", N = M"
            ax.set_title(f"{kind}, {dtype}{m_note}")
            ax.set_xlabel("N (queries)")
            if col == 0:
                ax.set_ylabel("median time per call (s)")
    handles = [Line2D([], [], color=c, ls="--" if dashed else "-", label=label) for key, (label, c, dashed) in paths.items()
               if any(k[0] == key for s in panels.values() for k in s)]
    handles += [Line2D([], [], color="0.3", ls="none", marker=marker[d], label=f"D = {d}") for d in dims]
    rows_of_legend = math.ceil(len(handles) / 4)
    counts = {}
    for note in notes:
        counts[note] = counts.get(note, 0) + 1
    text = "; ".join(f"{note} ({k} point{'s' if k > 1 else ''})" for note, k in sorted(counts.items()))
    inch = 1 / fig.get_figheight()
    note_h = (0.25 if text else 0.05) * inch
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, note_h), ncol=min(len(handles), 4), frameon=False)
    if text:
        fig.text(0.5, 0.08 * inch, "not shown: " + text, ha="center", fontsize=6.5, color="0.35")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, note_h + (0.05 + 0.17 * rows_of_legend) * inch, 1, 1 - 0.3 * inch))
    return _save(fig, path_out)


def plot_vs_torch(rows, title, ylabel, path_out):
    """Bars of torch's time over ours, per case and dtype (log scale: 2 and 1/2 are equally far from 1)."""
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        return None
    cases = list(dict.fromkeys(r[0] for r in rows))
    dtypes = _order({r[1] for r in rows}, ["float64", "float32"])
    width = 0.8 / len(dtypes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(cases) * len(dtypes) + 1.5), 4.2))
    for i, dtype in enumerate(dtypes):
        xs, ys = [], []
        for r in rows:
            if r[1] == dtype:
                xs.append(cases.index(r[0]) + (i - (len(dtypes) - 1) / 2) * width)
                ys.append(r[2])
        ax.bar(xs, [y - 1 for y in ys], width, bottom=1, color=f"C{i}", label=dtype)  # bars grow from 1 up or down
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ratios = [r[2] for r in rows]
    ax.set_ylim(min(0.5, min(ratios) / 1.25), max(2.0, max(ratios) * 1.25))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(range(len(cases)), cases, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path_out)


def cpu_ratio_rows(data):
    rows = []
    for case in data.get("cases", []):
        res = case.get("results") or {}
        t_cpu = _number((res.get("cpu") or {}).get("median_s"))
        t_torch = _number((res.get("torch") or {}).get("median_s"))
        label = _case_label(case.get("kind"), case.get("N"), case.get("M"), case.get("D"))
        rows.append((label, case.get("dtype"), t_torch / t_cpu if t_cpu and t_torch else None))
    return rows


def gpu_ratio_rows(data):
    rows = []
    for cfg in data.get("configs", []):
        for short, kind in (("fwd", "forward"), ("bwd", "backward")):
            ours, torch = _number(cfg.get(f"ours_{short}_s")), _number(cfg.get(f"torch_{short}_s"))
            label = _case_label(kind, cfg.get("n"), cfg.get("m"), cfg.get("d"))
            rows.append((label, cfg.get("dtype"), torch / ours if ours and torch else None))
    return rows


# ----------------------------------------------------------------------------- accuracy
def plot_accuracy(data, title, path_out, floor=1e-2):
    cases = [c for c in data.get("cases", []) if isinstance(c.get("results"), dict)]
    libs = list(dict.fromkeys(lib for c in cases for lib in c["results"]))
    if not cases or not libs:
        return None
    labels = [f"{c.get('case', '?')} ({c.get('dtype', '?')})" for c in cases]
    width = 0.8 / len(libs)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.6 * len(cases) + 2), 7.5), sharex=True)
    metrics = [("r_max_ulp", "softmax: largest componentwise error (ulps)"), ("L_ulp", "log-sum-exp error (ulps)")]
    for ax, (key, ylabel) in zip(axes, metrics):
        for i, lib in enumerate(libs):
            xs, ys = [], []
            for j, c in enumerate(cases):
                v = (c["results"].get(lib) or {}).get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    xs.append(j + (i - (len(libs) - 1) / 2) * width)
                    ys.append(max(float(v), floor))
            ax.bar(xs, ys, width, color=f"C{i}", label=lib)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor * 0.7)
        ax.set_ylabel(ylabel)
    kappas = [c.get("kappa") for c in cases]
    bound = [(j, 2 + k) for j, k in enumerate(kappas) if isinstance(k, (int, float)) and math.isfinite(k)]
    if bound:
        axes[1].hlines([b for _, b in bound], [j - 0.45 for j, _ in bound], [j + 0.45 for j, _ in bound],
                       color="k", lw=1.2, label="2 + kappa (iem_ref's tested bound)")
    axes[0].axhline(3, color="k", lw=1.2, ls=":", label="3 ulps (iem_ref's tested bound)")
    for ax in axes:
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=len(libs) + 1, frameon=False)
    axes[1].set_xticks(range(len(cases)), labels, rotation=60, ha="right", fontsize=6.5)
    fig.suptitle(title)
    fig.text(0.5, 0.005, f"errors below {floor:g} ulp (including 0) are drawn at {floor:g}", ha="center", fontsize=6, color="0.35")
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))
    return _save(fig, path_out)


# ----------------------------------------------------------------------------- driver
def _save(fig, path):
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)
    return Path(path)


def plot_file(path, out=None):
    """Plot one results file; return the PNG paths written (next to it, or in ``out``)."""
    path = Path(path)
    data = json.loads(path.read_text())
    kind = kind_of(data)
    out = Path(out) if out is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    written = []
    with plt.rc_context(STYLE):
        if kind == "cpu":
            machine = cpu_machine(data)
            panels, notes = cpu_series(data)
            written.append(plot_times(panels, notes, CPU_PATHS, f"CPU, {stem}.json: {machine}", out / f"{stem}_time.png"))
            written.append(plot_vs_torch(cpu_ratio_rows(data), f"torch SDPA time / accel.cpu time (above 1: accel.cpu faster)\n{machine}",
                                         "torch / accel.cpu", out / f"{stem}_vs_torch.png"))
        elif kind == "gpu":
            machine = gpu_machine(data)
            panels, notes = gpu_series(data)
            written.append(plot_times(panels, notes, GPU_PATHS, f"GPU, {stem}.json: {machine}", out / f"{stem}_time.png"))
            written.append(plot_vs_torch(gpu_ratio_rows(data), f"torch SDPA time / accel.cuda time (above 1: accel.cuda faster)\n{machine}",
                                         "torch / accel.cuda", out / f"{stem}_vs_torch.png"))
        else:
            written.append(plot_accuracy(data, f"Errors against the exact tier, {stem}.json\n{accuracy_machine(data)}", out / f"{stem}_ulps.png"))
    return [p for p in written if p is not None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help=f"results JSON files (default: {', '.join(DEFAULT_FILES)} in bench/results)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside each results file)")
    args = parser.parse_args(argv)
    files = args.files or [RESULTS / name for name in DEFAULT_FILES]
    failed = 0
    for path in files:
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            failed += 1
            continue
        try:
            written = plot_file(path, args.out)
        except (UnknownResults, json.JSONDecodeError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        for png in written:
            print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KB)")
        if not written:
            print(f"{path}: nothing to plot (no timings or errors recorded)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
