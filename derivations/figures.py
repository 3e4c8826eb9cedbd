"""Draw the figures of the derivations from the reference functions themselves.

    python derivations/figures.py                 # writes the PNGs next to this file
    python derivations/figures.py --out DIR       # elsewhere (the tests use a temporary folder)
    python derivations/figures.py --only H_softplus_relu

Needs matplotlib (``pip install -e ".[plots]"``).  Every curve is computed by
``iem_ref`` (no closed form is drawn in its place), so a figure shows what the
code does.  The output is deterministic: the Agg backend, fixed inputs, no
time stamp in the PNG metadata.  Each figure is embedded, with a caption, in
the derivation of the equations it shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import iem_ref as R  # noqa: E402

HERE = Path(__file__).resolve().parent

#: PNG metadata: no "Software" (matplotlib version) entry, no time stamp
PNG_METADATA = {"Software": None}
DPI = 100
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


def _fig(width, height, **kw):
    return plt.subplots(figsize=(width, height), **kw)


# --------------------------------------------------------------------- S4 / S5
def fig_S_tanh_two_keys():
    """S4/S5: tanh from two signed Gaussian energies, equal to attention over the keys +-1."""
    z = np.linspace(-4, 4, 401)
    fig, (top, bottom) = _fig(7.0, 6.0, nrows=2, sharex=True, gridspec_kw={"height_ratios": [1.1, 1]})
    zs = z[::16]
    for (m, sigma), colour in zip([(1.0, 1.0), (1.0, 2.0**-0.5), (0.5, 1.0)], ["C0", "C1", "C2"]):
        alpha = m / sigma**2
        top.plot(z, R.tanh_from_signed_gaussian(z, m=m, sigma=sigma), color=colour,
                 label=f"tanh_from_signed_gaussian, m = {m:g}, sigma = {sigma:.3g}  (alpha = {alpha:g})")
        top.plot(zs, R.tanh_as_attention(zs, alpha=alpha), "o", color=colour, markersize=4, markerfacecolor="none")
    top.plot([], [], "o", color="0.3", markerfacecolor="none", label="tanh_as_attention: query [z], keys and values +1, -1")
    top.axhline(0, color="0.5", lw=0.8)
    top.set_ylabel("a(z) = r+ - r-")
    top.set_title("S4/S5: the posterior mean of the sign is tanh(m z / sigma^2), and two-key attention")
    top.legend(loc="upper left", framealpha=0.9)

    m, sigma = 1.0, 1.0
    d = R.signed_gaussian_energies(z, m=m, sigma=sigma)
    lin = R.signed_linear_energies(z, alpha=m / sigma**2)
    bottom.plot(z, d[:, 0], color="C3", label="d+(z) = (z - m)^2 / 2 sigma^2  (Gaussian at +m)")
    bottom.plot(z, d[:, 1], color="C4", label="d-(z) = (z + m)^2 / 2 sigma^2  (Gaussian at -m)")
    bottom.plot(z, lin[:, 0], "--", color="C3", lw=1, label="-alpha z: d+ minus the shared (z^2 + m^2) / 2 sigma^2")
    bottom.plot(z, lin[:, 1], "--", color="C4", lw=1, label="+alpha z: d- minus the same")
    bottom.axvline(0, color="0.5", lw=0.8)
    bottom.set_xlabel("z (pre-activation)")
    bottom.set_ylabel("energy (m = sigma = 1)")
    bottom.legend(loc="upper center", framealpha=0.9)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------- H2
def fig_H_collapse():
    """H2: responsibilities of three hypotheses as tau goes from 10 to 0.01."""
    d = np.array([0.0, 0.5, 1.5])
    taus = np.geomspace(10, 0.01, 241)
    r = np.array([R.responsibilities(d, tau=t) for t in taus])
    hard = R.hard_responsibilities(d)
    fig, ax = _fig(7.0, 3.8)
    for j in range(3):
        ax.plot(taus, r[:, j], color=f"C{j}", label=f"r_{j + 1}, energy d_{j + 1} = {d[j]:g}")
        ax.plot([0.01], [hard[j]], "s", color=f"C{j}", markersize=6, clip_on=False)
    ax.axhline(1 / 3, color="0.5", ls=":", lw=1)
    ax.text(8, 1 / 3 - 0.05, "uniform: 1/3 each", color="0.4", ha="left")
    ax.set_xscale("log")
    ax.set_xlim(10, 0.01)  # hot on the left, cold on the right
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("temperature tau (decreasing to the right)")
    ax.set_ylabel("responsibility")
    ax.set_title("H2: the softmin collapses onto the lowest energy (squares: hard_responsibilities)")
    ax.legend(loc="center left")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------- H3
def fig_H_softplus_relu():
    """H3: softplus_tau approaches ReLU, at most tau log 2 above it."""
    z = np.linspace(-3, 3, 601)
    relu = R.relu(z)
    fig, (left, right) = _fig(9.0, 3.8, ncols=2)
    for tau, colour in zip([1.0, 0.5, 0.25, 0.1], ["C0", "C1", "C2", "C3"]):
        left.plot(z, R.softplus(z, tau=tau), color=colour, label=f"softplus, tau = {tau:g}")
    left.fill_between(z, relu, relu + 0.5 * np.log(2), color="C1", alpha=0.15, lw=0,
                      label="ReLU + [0, tau log 2], tau = 0.5")
    left.plot(z, relu, color="k", lw=1.5, label="relu")
    left.set_xlabel("z")
    left.set_ylabel("-F_tau({off: 0, on: -z})")
    left.set_title("softplus_tau = minus the free energy")
    left.legend(loc="upper left")

    for tau, colour in zip([1.0, 0.5, 0.25, 0.1], ["C0", "C1", "C2", "C3"]):
        right.plot(z, R.softplus(z, tau=tau) - relu, color=colour, label=f"tau = {tau:g}")
        right.axhline(tau * np.log(2), color=colour, ls=":", lw=1)
    right.set_xlabel("z")
    right.set_ylabel("softplus_tau(z) - relu(z)")
    right.set_title("the gap: largest at z = 0, equal to tau log 2 (dotted)")
    right.legend(loc="center left")
    fig.suptitle("H3: ReLU is the zero-temperature free energy of an on/off competition")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------- T3
def fig_T_invariance():
    """T3: r is unchanged by d -> d + c and by (d, tau) -> (c d, c tau), not by d -> c d alone."""
    d = np.array([0.3, 1.1, -0.4, 0.8, 2.0])
    tau, shift, scale = 0.7, 2.5, 3.0
    cases = [
        ("d, tau", d, tau, "C0", None),
        (f"d + {shift:g}, tau", d + shift, tau, "C1", None),
        (f"{scale:g} d, {scale:g} tau", scale * d, scale * tau, "C2", None),
        (f"{scale:g} d, tau  (not a symmetry)", scale * d, tau, "0.6", "//"),
    ]
    j = np.arange(d.size)
    width = 0.2
    fig, (left, right) = _fig(9.0, 3.8, ncols=2)
    for i, (label, dd, tt, colour, hatch) in enumerate(cases):
        offset = (i - 1.5) * width
        left.bar(j + offset, dd, width, color=colour, hatch=hatch, edgecolor="white" if hatch is None else "0.3", label=label)
        right.bar(j + offset, R.responsibilities(dd, tau=tt), width, color=colour, hatch=hatch,
                  edgecolor="white" if hatch is None else "0.3", label=label)
    for ax in (left, right):
        ax.set_xticks(j, [f"j = {k + 1}" for k in j])
        ax.axhline(0, color="0.3", lw=0.8)
    left.set_ylabel("energy d_j")
    left.set_title("the energies")
    left.legend(loc="upper left")
    right.set_ylabel("responsibility r_j")
    right.set_title("their responsibilities: three bars of each four agree")
    fig.suptitle(f"T3: only (d - min d) / tau matters (tau = {tau:g})")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------ K1-K8
def _kernel_energies(x, mu):
    """Each kernel's energies of inputs ``x (N, 1)`` against centres ``mu (M, 1)``, as in the note's list."""
    x64 = np.asarray(x, dtype=np.float64)
    return {
        "K1 dot, keys +-1": R.dot_energy(x64, mu),
        "K2 Gaussian, sigma = 1": R.sqeuclidean_energy(x64, mu),
        "K4 Laplace, b = 1": R.laplace_energy(x64, mu),
        "K6 Student-t, nu = 1": R.student_t_energy(x64, mu),
        "K7 Huber, delta = 1": R.huber_energy(x64, mu),
        "K7 pseudo-Huber, delta = 1": R.pseudo_huber_energy(x64, mu),
        # a one-sided kernel: hypothesis s says "s x is above 1", d_s = log(1 + exp(-(s x - 1)))
        "K8 logistic, alpha = 1": R.logistic_energy(x64[:, :1] * mu[:, 0], mu=1.0),
    }


KERNEL_COLOURS = {
    "K1": "C7", "K2": "C0", "K3": "C0", "K4": "C2", "K5": "C8", "K6": "C3", "K7 Huber": "C1", "K7 pseudo": "C5", "K8": "C4",
}


def _colour(name):
    for key, colour in KERNEL_COLOURS.items():
        if name.startswith(key):
            return colour
    return "k"


def fig_K_kernels():
    """K1-K8 as functions of the distance; the responsibility an outlying input gives the nearer of two centres."""
    fig, (left, right) = _fig(10.0, 4.2, ncols=2)

    # Left: energy against the distance r from one centre, shifted so that d = 0 at r = 0 (T3).
    r = np.linspace(0, 5, 501)
    zero = np.zeros((1, 1))
    curves = {
        "K2 Gaussian, sigma = 1": R.sqeuclidean_energy(r[:, None], zero)[:, 0],
        "K3 Mahalanobis, Sigma = 4": R.mahalanobis_energy(r[:, None], zero, [[4.0]])[:, 0],
        "K4 Laplace, b = 1": R.laplace_energy(r[:, None], zero)[:, 0],
        "K6 Student-t, nu = 1": R.student_t_energy(r[:, None], zero)[:, 0],
        "K7 Huber, delta = 1": R.huber_energy(r[:, None], zero)[:, 0],
        "K7 pseudo-Huber, delta = 1": R.pseudo_huber_energy(r[:, None], zero)[:, 0],
        "K8 logistic, input r below the centre": R.logistic_energy(-r) - R.logistic_energy(0.0),
    }
    # K1 and K5 depend on the angle: unit vectors at chord distance r = 2 sin(theta / 2) <= 2.
    rc = r[r <= 2]
    theta = 2 * np.arcsin(rc / 2)
    unit = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    key = np.array([[1.0, 0.0]])
    curves["K1 dot, unit vectors (+1)"] = R.dot_energy(unit, key)[:, 0] + 1.0
    curves["K5 cosine, unit vectors"] = R.cosine_energy(unit, key)[:, 0]
    for name, values in curves.items():
        xs = rc if name.startswith(("K1", "K5")) else r
        style = "--" if name.startswith(("K1", "K3", "K5")) else "-"
        left.plot(xs, values, style, color=_colour(name), label=name)
    left.set_ylim(-0.1, 5)
    left.set_xlabel("distance r from the centre")
    left.set_ylabel("energy d(r) - d(0)")
    left.set_title("the kernels: quadratic, linear or logarithmic growth")
    left.legend(loc="upper left", fontsize=7)

    # Right: one input at x >= 0 against two centres at +1 and -1: the nearer centre's responsibility.
    x = np.linspace(0, 12, 481)
    mu = np.array([[1.0], [-1.0]])
    for name, d in _kernel_energies(x[:, None], mu).items():
        left_style = "--" if name.startswith("K1") else "-"
        right.plot(x, R.responsibilities(d)[:, 0], left_style, color=_colour(name), label=name)
    right.axhline(0.5, color="0.5", ls=":", lw=1)
    right.set_ylim(0.45, 1.02)
    right.set_xlabel("input x (centres at +1 and -1): x >> 1 is an outlier")
    right.set_ylabel("responsibility of the centre at +1")
    right.set_title("an outlier's assignment: certain, capped, or fading")
    right.legend(loc="lower right", fontsize=7)
    fig.suptitle("K1-K8: energies as functions of the distance, and their responsibilities")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------- M1/M2
def fig_M_merge_tree():
    """M1/M2: one row's keys in 8 blocks, each summarised by (m_B, l_B), merged in a tree and in a running fold."""
    rng = np.random.default_rng(7)
    tau, n_blocks, per_block = 0.5, 8, 4
    M = n_blocks * per_block
    d = (rng.normal(size=(1, M)) * 1.5).round(2)
    v = rng.normal(size=(M, 1))
    blocks = [np.arange(b * per_block, (b + 1) * per_block) for b in range(n_blocks)]
    leaves = [R.partial_posterior(d[:, b], v[b], tau=tau) for b in blocks]

    fig = plt.figure(figsize=(10.0, 7.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.15])
    top = fig.add_subplot(grid[0, :])
    tree = fig.add_subplot(grid[1, 0])
    right = grid[1, 1].subgridspec(2, 1, hspace=0.08)
    fold_m = fig.add_subplot(right[0])
    fold_l = fig.add_subplot(right[1], sharex=fold_m)

    top.plot(np.arange(M), d[0], "o", color="C0", markersize=4, label="energy d_j of key j")
    for b, (idx, p) in enumerate(zip(blocks, leaves)):
        top.hlines(p.m[0], idx[0] - 0.4, idx[-1] + 0.4, color="C3", lw=2, label="block minimum m_B" if b == 0 else None)
        top.text(idx.mean(), d[0].max() + 0.5, f"l = {p.l[0]:.2f}", ha="center", fontsize=8)
        if b:
            top.axvline(idx[0] - 0.5, color="0.7", lw=0.8)
    top.set_ylim(d.min() - 0.6, d.max() + 1.2)
    top.set_xlabel("key j (8 blocks of 4)")
    top.set_ylabel("energy")
    top.set_title(f"M1: each block keeps (m_B, l_B = sum exp(-(d_j - m_B)/tau), o_B), tau = {tau:g}")
    top.legend(loc="lower right", fontsize=8)

    # The tree: leaves at the bottom, pairs merged upwards (M2).
    level, xs, y = leaves, [idx.mean() for idx in blocks], 0
    for p, x in zip(level, xs):
        tree.text(x, y, f"{p.m[0]:.2f}\n{p.l[0]:.2f}", ha="center", va="center", fontsize=7,
                  bbox={"boxstyle": "round", "fc": "white", "ec": "C0"})
    while len(level) > 1:
        up, up_x = [], []
        for i in range(0, len(level), 2):
            merged = R.merge_partials(level[i], level[i + 1])
            x = (xs[i] + xs[i + 1]) / 2
            for child in (i, i + 1):
                tree.plot([xs[child], x], [y + 0.15, y + 0.85], color="0.6", lw=1)
            up.append(merged)
            up_x.append(x)
        level, xs, y = up, up_x, y + 1
        for p, x in zip(level, xs):
            tree.text(x, y, f"{p.m[0]:.2f}\n{p.l[0]:.2f}", ha="center", va="center", fontsize=7,
                      bbox={"boxstyle": "round", "fc": "white", "ec": "C3" if len(level) == 1 else "C0"})
    a_tree, L_tree = R.finalize_partial(level[0])
    a_one, L_one = R.softmin_summary(d, v, tau=tau)
    tree.set_xlim(-2, M + 1)
    tree.set_ylim(-0.6, y + 0.9)
    tree.set_yticks(range(y + 1), ["blocks", "pairs", "quads", "row"])
    tree.set_xticks([])
    tree.grid(False)
    tree.set_title("M2: merged in a tree, each box (m, l)", fontsize=9)
    tree.text(M / 2, y + 0.55, f"finalised a = {a_tree[0, 0]:.6f}, L = {L_tree[0]:.6f}; one pass: {a_one[0, 0]:.6f}, {L_one[0]:.6f}",
              ha="center", fontsize=7)

    # The running fold (the online softmin): after each block, the running minimum and the rescaled sum.
    acc = leaves[0]
    ms, ls = [acc.m[0]], [acc.l[0]]
    for p in leaves[1:]:
        acc = R.merge_partials(acc, p)
        ms.append(acc.m[0])
        ls.append(acc.l[0])
    steps = np.arange(1, n_blocks + 1)
    fold_m.step(steps, ms, where="post", color="C3")
    fold_m.set_ylabel("running m\n(min energy)")
    fold_m.tick_params(labelbottom=False)
    fold_m.set_title("the same merges as a running fold (online softmin)", fontsize=9)
    fold_l.plot(steps, ls, "o-", color="C0")
    fold_l.set_ylabel("running l")
    fold_l.set_xlabel("blocks folded in, left to right")
    fold_l.set_xticks(steps)
    fold_l.set_ylim(min(ls) - 0.8, max(ls) + 0.4)
    for b in np.flatnonzero(np.diff(ms) < 0) + 1:  # a new minimum: the old sum is rescaled by exp(-(m_old - m)/tau)
        fold_l.annotate("m drops: l rescaled", (steps[b], ls[b]), textcoords="offset points", xytext=(0, -16),
                        ha="center", fontsize=7, color="0.3")
    fig.tight_layout()
    return fig


#: name -> (derivation it belongs to, drawing function)
# ------------------------------------------------------------------- V2, V3, V5
def fig_V_variants():
    """V2: ALiBi's prior over positions; V3: the soft-capped score; V5: the sink's share as keys are masked."""
    fig, (left, mid, right) = _fig(10.5, 3.4, ncols=3)
    n, m = 1, 64
    q = np.zeros((1, n, 1))  # all scores 0: the responsibilities are the prior alone
    k, v = np.zeros((1, m, 1)), np.zeros((1, m, 1))
    for slope, colour in zip([0.5, 0.125, 1 / 32], ["C0", "C1", "C2"]):
        _, r = R.attention(q, k, v, scale=1.0, alibi_slopes=[slope], causal_alignment="bottom_right", is_causal=True,
                           return_responsibilities=True)
        left.plot(np.arange(m) - (m - 1), r[0, 0], color=colour, label=f"slope = {slope:g}")
    left.set_xlabel("key position j - i' (the query at 0)")
    left.set_ylabel("r_j with equal scores")
    left.set_title("V2: ALiBi, a Laplace prior over positions")
    left.legend(loc="upper left")

    x = np.linspace(-12, 12, 481)
    for c, colour in zip([2.0, 5.0, 10.0], ["C0", "C1", "C2"]):
        mid.plot(x, R.variants.softcap(x, c), color=colour, label=f"c tanh(x / c), c = {c:g}")
    mid.plot(x, x, "--", color="0.5", lw=1, label="x (no cap)")
    mid.set_ylim(-12, 12)
    mid.set_xlabel("scaled score x = -d scale")
    mid.set_ylabel("soft-capped score s")
    mid.set_title("V3: a bounded energy, |s| < c")
    mid.legend(loc="upper left")

    rng = np.random.default_rng(5)
    kk, vv = rng.normal(size=(32, 8)), rng.normal(size=(32, 1))
    qq = rng.normal(size=(1, 8))
    kept = np.arange(32, -1, -1)
    for sink, colour in zip([0.0, 2.0, 4.0], ["C0", "C1", "C2"]):
        share = []
        for n_kept in kept:
            mask = np.arange(32)[None, :] < n_kept
            share.append(R.attention(qq, kk, vv, sinks=[sink], mask=mask, return_responsibilities=True)[2][0])
        right.plot(kept, share, color=colour, label=f"sink logit {sink:g}")
    right.set_xlabel("keys that take part (of 32)")
    right.set_ylabel("r_sink")
    right.set_title("V5: the null hypothesis takes the rest")
    right.invert_xaxis()
    right.legend(loc="center left")
    fig.tight_layout()
    return fig


FIGURES = {
    "S_tanh_two_keys": ("S_scalar_activations.md", fig_S_tanh_two_keys),
    "H_collapse": ("H_hard_limit.md", fig_H_collapse),
    "H_softplus_relu": ("H_hard_limit.md", fig_H_softplus_relu),
    "T_invariance": ("T_temperature.md", fig_T_invariance),
    "K_kernels": ("K_kernels.md", fig_K_kernels),
    "M_merge_tree": ("M_streaming.md", fig_M_merge_tree),
    "V_variants": ("V_variants.md", fig_V_variants),
}


def save(fig, path):
    """Write ``fig`` as a PNG with no time stamp or version in its metadata, and close it."""
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs (default: derivations/)")
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURES), help="draw only these figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context(STYLE):
        for name in args.only or FIGURES:
            path = args.out / f"{name}.png"
            save(FIGURES[name][1](), path)
            written.append(path)
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
