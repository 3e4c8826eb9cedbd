"""The tiled oracle: the expected output and section 13's sums in bounded memory, chunk by chunk.

:mod:`iem_ref.testing` judges a kernel at the sizes kernels are tested at
through :func:`forward_chunks`: the float64 forward of :mod:`iem_ref.accel.cpu`
gives the expected output ``a`` and log-partition ``L`` (tiled, every
variant), and a second pass over the same tiles (:mod:`._verdict_kernels`)
forms the sums of :class:`iem_ref.bounds.ForwardSums` from ``r_ij = exp(z_ij
- L_i)``: six products per tile with ``|v|``, ``v^2`` and ``v``, and the
per-row sums.  Nothing of size ``N x M`` exists beyond one tile per thread;
the results come a few heads at a time (``chunk`` flat batch elements,
default: about 256 MB of sums per chunk).

The oracle's own error.  Its ``a`` and ``L`` are a float64 FlashAttention
forward (section 9's CPU path): a score within ``gamma_{D+3}(u64) S`` and
``2 u64 |x|`` of the exact one, the logits' steps (section 11), the
subtraction of the running maximum (``u64 (L - z)``), an ``exp`` within 2
ulps, sums of the CPU path's depth (:meth:`~iem_ref.bounds.Arithmetic.key_sum`),
its rescalings, the division.  :func:`own_error` bounds it rigorously from
the row's largest weight error ``E`` (the kernel takes the maximum pair by
pair) and ``P = sum_j r_j c_j |v_j|``: ``|a^ - a| <= (P + |a|) (expm1(E)
e^E + G) + rho min(V / 2, P + |a|) + 2 u64 |a|`` (section 9 with ``W <= P +
|a|``) and ``|L^ - L| <= E + G + rho + 2 u64 log M + u64 |L|``.  Beside a
float32 or lower-precision kernel's tolerance this is ``1e-9`` of it or
less; beside a float64 kernel's it is not, so :mod:`iem_ref.testing` judges
float64 kernels with the NumPy reference.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
from numba import types

from ..attention import prepare_attention
from ..bounds import ForwardSums, U64, gamma, sum_bound, tree_depth, ulps, underflow, unit_roundoff
from ..energies import energy_of
from .._validation import as_float_array
from . import _verdict_kernels as _vk
from ._compile import compile_kernel
from ._problem import MASK_TYPE, problem_type
from .cpu import (ENERGIES, _Groups, _arr, _blocks, _band_width, _problem, _run_forward, _run_stages, _scale_of, arithmetic,
                  features_of, plan, unstack_rows)
from ._kernel_mods import kernel_mod

__all__ = ["Chunk", "forward_chunks", "own_error"]

#: bytes of sums per chunk by default
CHUNK_BYTES = 48 * 2**20


class Chunk(NamedTuple):
    """The oracle's results for the flat (query-head) batch elements ``[f0, f1)``.

    ``a (f1 - f0, N, Dv)``, ``L (f1 - f0, N)`` float64; ``sums`` their
    :class:`~iem_ref.bounds.ForwardSums`; ``emax (f1 - f0, N)`` the row's
    largest weight error of the oracle itself (:func:`own_error`), ``xmax``
    its largest finite score magnitude.
    """

    f0: int
    f1: int
    a: np.ndarray
    L: np.ndarray
    sums: ForwardSums
    emax: np.ndarray
    xmax: np.ndarray
    entropy: np.ndarray  # the report's row statistics: the entropy of r, the logits' spread, the worst weight condition
    spread: np.ndarray
    cond: np.ndarray
    vmax: float  # the largest finite |v| of the whole call


def _signature():
    f64, i64 = types.float64, types.int64
    return types.void(i64, i64, i64, problem_type(f64), MASK_TYPE, _arr(i64, 1), i64,
                      _arr(f64, 2, readonly=False), _arr(f64, 1), _arr(f64, 4, readonly=False), _arr(f64, 3, readonly=False))


_COMPILED = {}
_COMPILED_LOCK = threading.Lock()


def _kernel(features):
    """The verdict kernel for ``features``, compiled on first use (or loaded from Numba's cache), once per process."""
    fn = _COMPILED.get(features)
    if fn is None:
        with _COMPILED_LOCK:
            fn = _COMPILED.get(features)
            if fn is None:
                fn = _COMPILED[features] = compile_kernel(_vk.kernels(features)["verdict"], _signature(), f"verdict ({features.tag})")
    return fn


def forward_chunks(q, k, v, precision, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot",
                   empty="zero", chunk=None, **variants):
    """Yield :class:`Chunk` records covering the flat batch, a few heads at a time (arguments as :func:`iem_ref.attention`).

    ``precision``: the kernel under test's :class:`~iem_ref.precision.Precision`
    (its scores' unit roundoff and ``exp`` accuracy enter the sums);
    ``energy``: ``"dot"`` (the CPU kernels expand the squared Euclidean
    distance into one product and two norms, whose float64 cancellation
    would be the oracle's own error: the NumPy reference judges that energy).
    """
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment,
                            energy=energy, **variants)
    rec = energy_of(energy)
    if energy != "dot":
        raise ValueError(f"the tiled oracle supports energy 'dot'; got {rec.label} (oracle='reference' judges it)")
    groups = _Groups(inp)
    dt = np.dtype(np.float64)
    f64 = lambda x, name: as_float_array(x, name).astype(np.float64, copy=False)  # noqa: E731 - one float64 copy at most
    q64 = f64(q, "q") if groups.g == 1 else groups.stack(inp.q.astype(np.float64, copy=False))
    v64 = f64(v, "v")
    pm = _problem(dt, groups.batch, groups.rows, inp.m, q=q64, k=f64(k, "k"), v=v64, mask=groups.mask, energy=ENERGIES[energy], scale=_scale_of(inp.tau),
                  offset=inp.causal_offset, is_causal=inp.is_causal, window=inp.window, inp=inp, empty=empty, groups=groups,
                  sinks=inp.sinks)
    B = int(np.prod(groups.batch, dtype=np.int64))
    n, M, Dv, D, g = groups.rows, inp.m, inp.dv, inp.q.shape[-1], groups.g
    vmax = 0.0  # the largest finite |v|, one batch element at a time
    for x in pm[0].v:
        fin = np.abs(x[np.isfinite(x)])
        vmax = max(vmax, float(fin.max(initial=0.0)))
    u_s = unit_roundoff(precision.scores)
    consts = np.array([u_s, precision.exp_ulps, gamma(D, u_s), tree_depth(D), rec.score.roundings, gamma(D + 3, U64),
                       0.0 if inp.plain_scores else 1.0])
    bq, bk, _ = plan(B, n, M, dt, band=_band_width(pm[0]))
    blocks = _blocks(pm[0], bq)
    mod = kernel_mod(inp.score_mod)  # F1: compiled into the forward and the verdict kernels alike
    fn = _kernel(features_of(pm[0], mod))
    per_element = max(1, 8 * n * (6 * Dv + len(_vk.ROW_SUMS)) * g)  # bytes of sums per stacked batch element
    step = max(1, CHUNK_BYTES // per_element if chunk is None else int(chunk) // g)
    sinks = None if inp.sinks is None else np.broadcast_to(inp.sinks, inp.batch).reshape(-1)
    for c0 in range(0, B if n else 0, step):
        c1 = min(B, c0 + step)
        part = (_batch_range(pm[0], c0, c1), pm[1])
        a, L = _run_forward(part, (c1 - c0,), n, M, Dv, mod=mod)  # the expected output and log-partition of these elements
        cols = np.empty((c1 - c0, 6, n, Dv))
        rows = np.empty((c1 - c0, n, len(_vk.ROW_SUMS)))
        _run_stages(fn, (0,), *part, blocks, bk, L, consts, cols, rows)
        # grouped-query heads (V6): the stacked rows back to query heads, the chunk's flat axis holding the key heads
        ac, Lc, rows = unstack_rows(a, g, 0), unstack_rows(L, g, 0), unstack_rows(rows, g, 0)
        cols = np.stack([unstack_rows(cols[:, t], g, 0) for t in range(6)], axis=1) if g > 1 else cols
        f0, f1 = c0 * g, c1 * g
        r_all, r2_all, rz, zmax, zmin = rows[..., 3], rows[..., 4], rows[..., 7], rows[..., 8], rows[..., 9]
        if sinks is not None:  # V5: the sink's responsibility exp(sink - L) joins the row's sums over every hypothesis
            with np.errstate(invalid="ignore", over="ignore"):
                sink = np.broadcast_to(sinks[f0:f1, None], Lc.shape)
                rs = np.where(np.isfinite(Lc) & (sink > -np.inf), np.exp(sink - np.where(np.isfinite(Lc), Lc, 0.0)), 0.0)
                fin = np.isfinite(sink)
            r_all, r2_all, rz = r_all + rs, r2_all + rs * rs, rz + np.where(fin, rs * sink, 0.0)
            zmax, zmin = np.where(fin, np.maximum(zmax, sink), zmax), np.where(fin, np.minimum(zmin, sink), zmin)
        sums = ForwardSums(re_v=cols[:, 0], rax_v=cols[:, 1], rc_v=cols[:, 2], rc2_v2=cols[:, 3], wc2_v2=cols[:, 4], wc_v=cols[:, 5],
                           re=rows[..., 0], w=rows[..., 1], rax=rows[..., 2], r=r_all, r2=r2_all)
        with np.errstate(invalid="ignore"):  # the report's row statistics (tbar = zmax - sum r z, entropy L - sum r z)
            spread = np.where(np.isfinite(zmax), zmax - zmin, 0.0)
            tbar = np.where(np.isfinite(zmax), zmax * r_all - rz, 0.0)
            H = np.where(np.isfinite(Lc), Lc * r_all - rz, 0.0)
        yield Chunk(f0, f1, ac, Lc, sums, rows[..., 5], rows[..., 6], H, spread, 2 * spread + 2 * tbar, vmax)


def _batch_range(p, c0, c1):
    """The :class:`~iem_ref.accel._problem.Problem` ``p`` restricted to its flat batch elements ``[c0, c1)`` (its maps sliced; no copy)."""
    return p._replace(qmap=p.qmap[c0:c1], kmap=p.kmap[c0:c1], vmap=p.vmap[c0:c1], umap=p.umap[c0:c1], dmap=p.dmap[c0:c1],
                      mmap=p.mmap[c0:c1], sinks=p.sinks[c0:c1], bias_map=p.bias_map[c0:c1], slopes=p.slopes[c0:c1],
                      keep_map=p.keep_map[c0:c1], flex_bh=p.flex_bh[c0:c1])


def own_error(ch, n_all, M, D, n_rows, scale, vmax, dropout):
    """The tiled oracle's own error bound for the :class:`Chunk` ``ch``: ``(on a (rows, Dv), on L (rows,))`` (module docstring).

    ``n_all`` the hypotheses per row (``M + 1`` with a sink), ``n_rows`` the
    query rows the CPU path plans its tiles for, ``vmax`` the largest finite
    value magnitude (with the rows' ``xmax``, section 3b's floor),
    ``dropout``: V8 divides the mean once more.
    """
    path = arithmetic()
    merges = n_all - M
    E = ch.emax + ulps(path.exp_ulps, U64)
    rho = (path.rescales(M, np.float64, n_rows) + merges) * ulps(path.rescale_exp_ulps, U64)
    k_T, k_s = path.key_sum(M, np.float64, n_rows)
    G = sum_bound(path, (k_T, k_s + 2 * merges), U64)
    A = np.abs(np.where(np.isfinite(ch.a), ch.a, 0.0))
    P = ch.sums.rc_v
    with np.errstate(over="ignore", invalid="ignore"):
        weights = np.expm1(E) * np.exp(E)
    W = P + A
    moved = rho * np.minimum(0.5 * vmax, W)
    floor = underflow(np.float64, M + D + 8, 1.0) * (1.0 + scale) * (1.0 + ch.xmax) * (1.0 + vmax)
    own_a = W * (weights[..., None] + G) + moved + (2 + dropout) * U64 * A + floor[..., None]
    La = np.abs(np.where(np.isfinite(ch.L), ch.L, 0.0))
    own_L = E + G + rho + 2 * U64 * math.log(max(M, 1)) + U64 * La + floor
    return own_a, own_L
