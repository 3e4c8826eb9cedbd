"""A kernel under test, by its precision model: forward and backward (sections 13 and 14).

13. A kernel under test, by its precision model (forward)
--------------------------------------------------------
:func:`kernel_forward_bounds` bounds ``|a^ - a|`` and ``|L^ - L|`` of a
kernel described by an :class:`iem_ref.precision.Precision`: ``u_s`` the
unit roundoff of its scores (the ``q k^T`` accumulator and the softmax
arithmetic), ``u_p`` of the probabilities it rounds before the value GEMM,
``u_a`` of its accumulator, ``u_o`` of its output; inputs are taken as
given (they are the kernel's inputs, already rounded).  Every sum is a
tree of depth ``lg = ceil(log2 n)`` (pairwise or blocked; any order
inside it).  Each error is a list of terms (:class:`ErrorTerms`), each a
sum ``sum_k c_k delta_k`` of roundings ``|delta_k| <= u``:

* a key's own roundings: as in section 9 a relative error ``e_j`` of key
  ``j``'s weight, the same in the numerator and the row sum, moves the
  output by ``sum_j r_j e_j (c_j v_j - a)`` and ``L`` by ``sum_j r_j e_j``.
  ``e_j``: the score's products and additions (rigorously ``gamma_D scale
  S_j``, section 5; squared magnitudes :func:`tree_squares` of its ``D``
  terms), its product by the scale (``|x_j|``), the subtraction of the row
  maximum (``t_j = L - z_j``: a tiled kernel subtracts a running maximum
  ``m'``, and ``z_j <= m' <= max z <= L``, so ``|z_j - m'| <= t_j`` for
  every tiling), the ``exp`` (``2 p``, ``p = exp_ulps``) and the variants'
  steps (section 11);
* the scale's own rounding, one for every key: ``u_s sum_j r_j |x_j|
  |c_j v_j - a|``;
* the probabilities rounded to ``u_p`` (numerator only): ``sum_j r_j c_j
  delta_j v_j``;
* the row sum of the weights (relative to itself, moving ``a`` by
  ``|a|`` times it) and the value GEMM, each a tree: rigorously ``lg u_s
  |a|`` and ``lg u_a sum_j r_j c_j |v_j|``;
* the division and the output, ``(u_a + u_o) |a|``; for ``L`` the log, the
  addition of the maximum and the store, ``u_s (log M + 2 |L| + 2)``.

* ``bound="rigorous"``: every rounding at its worst, ``R = u sum_k
  |c_k|``; the bound is the sum of the terms' ``R``.
* ``bound="probabilistic"`` (the default of :mod:`iem_ref.testing`): the
  roundings are independent, mean-zero, bounded variables (the model of
  Higham and Mary, SIAM J. Sci. Comput. 41, 2019), so a term is
  sub-Gaussian with scale ``sigma = u sqrt(sum_k c_k^2)`` and independent
  terms' scales add in squares; by Hoeffding's inequality the sum exceeds
  ``lambda sqrt(sum sigma^2)`` with probability at most ``2 exp(-lambda^2 /
  2)``.  A tree's roundings multiply its partial sums; the nodes of one
  level are disjoint and hold at most ``2^l`` terms, so by Cauchy-Schwarz
  their squares add to at most ``min(S^2, 2^l Q)`` (``S = sum |y|``, ``Q =
  sum y^2``; :func:`tree_squares`): a spread row of ``M`` keys gains about
  ``sqrt(M)`` over the rigorous bound.  A term whose ``R`` is below
  ``lambda sigma`` (one key holding the mass, one rounding) is counted by
  its ``R`` instead (:meth:`ErrorTerms.bound`; the choice depends on the
  data, not on the roundings, so the bound keeps its probability).
  ``LAMBDA = 6.8``: one event per element, ``2 exp(-6.8^2 / 2) = 1.9e-10 <
  1e-9``, the chance that a correct kernel fails one element.

14. A kernel under test, by its precision model (backward)
---------------------------------------------------------
:func:`kernel_vjp_bounds` bounds ``dq, dk, dv`` of a FlashAttention-style
backward: ``P`` recomputed from the saved log-partition, ``dP = dO v^T``,
``Delta = rowsum(dO * O)`` from the stored (rounded) output, ``dS = P (dP -
Delta)`` rounded to the input dtype for the two GEMMs, ``dv = P^T dO`` with
``P`` rounded to the input dtype, float32 (``u_a``) accumulators, results
rounded to the input dtype (``u_in``).  The terms, with ``eta_ij`` a
score's error:

* ``P_ij``'s own roundings (relative): ``eta_ij + u_s |x_ij - L_i| + 2 p
  u_s`` (the score, the subtraction, the exp);
* ``b_ij = <u_i, v_j>``: ``db = lg_Dv u_a sum_c |u_ic v_jc|``;
* the row's ``L_i`` (section 13's terms) and ``Delta_i``: the output's
  bound per column plus the row sum's tree, rigorously; its scale from the
  output's roundings, those that every column shares entering through
  ``sum_c u_c (c_j v_jc - a_c) = b_ij - Delta_i``.  Both are made of the
  forward's roundings, so their scales add linearly; rows are independent;
* ``dS_ij``: ``P (own |b - Delta| + db) + (2 u_s + u_in) |dS|`` (the
  subtraction, the product, the rounding for the GEMM), plus the row's
  ``P (dL |b - Delta| + dDelta)``; a soft-cap's factor ``1 - (s/c)^2`` adds
  ``|dS| (2 eta / c + 3 u_s)``;
* ``dq_i = scale sum_j dS_ij k_j``: each of those summed with ``|k_j|``,
  the accumulation's tree over ``M`` terms, ``(u_a + u_in) |dq_i|`` for the
  scale's product and the store; the row's errors move all of its ``dS_ij``
  together, so they enter exactly: ``dL_i |dq_i| + dDelta_i scale |sum_j
  P_ij f_ij k_j|`` (``f`` the soft-cap's factor).  ``dk`` alike over the
  ``N g`` query rows (a group's heads independent); ``dv_j = sum_i P_ij
  c_ij u_i``: ``P c (own + u_in + dL) |u_i|`` and its tree.  The roundings
  to ``u_in`` count only where the input dtype is coarser than the one the
  value was formed in.
* a backward that stores its gradients in the input dtype between blocks
  (``Precision.gradient_blocks``, torch's CPU kernel) rounds each partial
  sum ``S_k`` it stores: ``u_in sum_k |S_k|``, scale ``u_in sqrt(sum_k
  S_k^2)``, from the exact partial sums block by block.

Each is an :class:`ErrorTerms` bounded as in section 13.  A pair's own
roundings (its key's, ``dP``'s, ``dS``'s, and for ``dk``, ``dv`` its row's
``L`` and ``Delta``) are different roundings: one term per pair holds them
all (:func:`pair_roundings`, :func:`value_roundings`), its scale their
squares' sum; the best split then chooses per pair, not per source, which
can only raise the bound (on small random problems at most 1.25x, for
bf16 ``dk``, and 1.5x with a soft-cap and the squared Euclidean energy in
float32; rigorous bounds are unchanged).

Evaluation.  Section 13's terms read sums over keys only
(:class:`ForwardSums`): :func:`forward_sums` forms them from ``N x M``
arrays, the tiled oracle (:mod:`iem_ref.accel.verdict`) tile by tile, and
:func:`forward_terms` turns either into the bound.  Section 14's read the
per-row errors of ``L`` and ``Delta`` (:class:`RowErrors`; ``Delta``'s
scale from the sums :func:`delta_sums`) and the sums over keys and over
query rows of :class:`BackwardSums`; :func:`backward_terms` turns them into
the bound.  The probabilistic
bound's best split (:meth:`ErrorTerms.bound`) considers only the terms
worth keeping (``R < LAMBDA sigma``), which reaches the same minimum.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from numba import njit

from .primitives import _finite, gamma, tree_depth, tree_squares
from .scores import _times_scale, logit_error, score_form, score_sizes, score_squares, slope_error


#: Hoeffding's multiplier of the probabilistic bounds (section 13): one event per element,
#: failing with probability at most 2 exp(-LAMBDA^2 / 2) = 1.9e-10.
LAMBDA = 6.8


class ErrorTerms:
    """The error of one quantity as a list of terms, each a rigorous bound ``R`` and a scale ``sigma`` (section 13).

    A term is a sum of roundings ``sum_k c_k delta_k`` (``|delta_k| <= u``):
    ``R = u sum_k |c_k|`` always holds, and under the probabilistic model the
    term is sub-Gaussian with scale ``sigma = u sqrt(sum_k c_k^2)``.  A term
    that is one rounding, or whose roundings are not independent, has
    ``sigma = R``.  Terms made of different roundings are independent, so
    their scales add in squares.

    Examples
    --------
    >>> t = ErrorTerms(); t.add(1.0); t.add(10.0, 1.0)
    >>> float(t.bound("rigorous")), float(t.bound("probabilistic"))  # the first by its R, the second by LAMBDA sigma
    (11.0, 7.8)
    """

    def __init__(self):
        self.R, self.sigma = [], []

    def add(self, R, sigma=None):
        self.R.append(R)
        self.sigma.append(R if sigma is None else sigma)

    def map(self, f, g=None):
        """A copy with ``f`` applied to every ``R`` and ``g`` (default ``f``) to every ``sigma**2``."""
        out = ErrorTerms()
        for R, s in zip(self.R, self.sigma):
            out.add(f(R), np.sqrt((g or f)(np.square(s))))
        return out

    def scale(self):
        """The scale of the whole sum: ``sqrt(sum sigma^2)``."""
        return np.sqrt(sum(np.square(s) for s in self.sigma))

    def bound(self, kind):
        """``sum R`` (rigorous), or the best split: some terms by their ``R``, the rest by ``LAMBDA sqrt(sum
        sigma^2)`` (Hoeffding), the split chosen per element among all ``2^terms`` (it depends on the data only,
        not on the roundings, so the chosen bound keeps its probability)."""
        if kind == "rigorous":
            return sum(self.R)
        arrays = np.broadcast_arrays(*self.R, *self.sigma)
        shape, T = arrays[0].shape, len(self.R)
        R = np.stack([np.ravel(r) for r in arrays[:T]]).astype(np.float64)
        var = np.square(np.stack([np.ravel(x) for x in arrays[T:]]).astype(np.float64))
        out = np.empty(R.shape[1])
        n = out.size
        threads = max(1, min(os.cpu_count() or 1, n // 65536))
        if threads == 1:
            _best_splits(R, var, LAMBDA, out, 0, n)
        else:  # nogil: the threads share the elements
            bounds = [n * t // threads for t in range(threads + 1)]
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda t: _best_splits(R, var, LAMBDA, out, bounds[t], bounds[t + 1]), range(threads)))
        return out.reshape(shape)


@njit(cache=True, nogil=True)
def _best_splits(R, var, lam, out, e0, e1):
    """``out[e] = min over splits of (sum of the kept R + lam sqrt(sum of the rest's var))`` for elements ``[e0, e1)``.

    Only a term with ``R < lam sigma`` is ever worth keeping: moving any
    other to the rest changes the bound by ``lam (sqrt(V + sigma^2) -
    sqrt(V)) - R <= lam sigma - R <= 0``.  So the splits of those terms
    alone reach the minimum over all ``2^T``.  A NaN anywhere gives NaN.
    """
    T = R.shape[0]
    cand = np.empty(T, np.int64)
    for e in range(e0, e1):
        base = 0.0
        c = 0
        nan = False
        for i in range(T):
            r, v = R[i, e], var[i, e]
            if r != r or v != v:
                nan = True
            if r < lam * math.sqrt(v):
                cand[c] = i
                c += 1
            else:
                base += v
        if nan:
            out[e] = np.nan
            continue
        best = np.inf
        for split in range(1 << c):
            kept = 0.0
            rest = base
            for t in range(c):
                if split >> t & 1:
                    kept += R[cand[t], e]
                else:
                    rest += var[cand[t], e]
            b = kept + lam * math.sqrt(rest)
            if b < best:
                best = b
        out[e] = best


def _kernel_score_sizes(inp, x):
    """``(scale S, the score's tree_squares)`` of a kernel's scores ``x`` (sections 5 and 13).

    Each term's own roundings before the tree (:class:`~iem_ref.energies.ScoreTerms`) add
    that many times its square at level 0; an energy without a derived form
    raises (:func:`score_form`).
    """
    form = score_form(inp.energy)
    S = _times_scale(inp.scale, score_sizes(inp.q, inp.k, inp.energy, False))
    Q = _times_scale(inp.scale**2, score_squares(inp.q, inp.k, inp.energy))
    S2 = tree_squares(S, Q, inp.q.shape[-1], total=x) + form.roundings * Q
    return S, S2


class ForwardSums(NamedTuple):
    """The sums over keys that section 13's terms read, per query row (float64; rows ``(B..., N)``, columns ``(B..., N, Dv)``).

    With ``r_j`` the oracle's responsibilities (``rr`` the keys', the sink's
    apart), ``c_j`` dropout's factors, ``e_j`` a key's own roundings and
    ``w_j = r_j^2 sq_j`` their squared magnitudes (section 13):
    ``re_v = sum r e c |v|``, ``rax_v = sum r |x| c |v|``, ``rc_v = sum r c
    |v|``, ``rc2_v2 = sum (r c)^2 v^2``, ``wc2_v2 = sum w c^2 v^2``, ``wc_v =
    sum w c v``; per row ``re = sum r e``, ``w = sum w``, ``rax = sum r
    |x|``, and over every hypothesis (the sink included) ``r = sum r``, ``r2
    = sum r^2``.  :func:`forward_sums` forms them from ``N x M`` arrays; the
    tiled oracle (:mod:`iem_ref.accel.verdict`) tile by tile, in bounded
    memory; :func:`forward_terms` turns either into the bound.
    """

    re_v: Any
    rax_v: Any
    rc_v: Any
    rc2_v2: Any
    wc2_v2: Any
    wc_v: Any
    re: Any
    w: Any
    rax: Any
    r: Any
    r2: Any


def key_roundings(D, u_s, exp_ulps, S, S2, x, t, extra):
    """A key's own roundings in section 13, ``(e, sq)``: rigorously ``e = gamma_D S + u_s (|x| + t + 2 p + extra)``
    (the score, its product by the scale, the subtraction, the ``exp``, the variants' steps), in units of ``u_s``
    their squared magnitudes ``sq``.  Elementwise; the tiled oracle's kernel evaluates the same expression per pair."""
    p = exp_ulps
    e = gamma(D, u_s) * S + u_s * (np.abs(x) + t + 2 * p + extra)
    sq = S2 + x**2 + t**2 + 4 * p * p + extra**2
    return e, sq


class _Pairs(NamedTuple):
    """Section 13's per-pair quantities as ``N x M`` arrays (:func:`_pairs`; section 14 reuses them)."""

    x: Any  # the scaled scores (finite)
    S: Any  # their sizes (section 5) and their tree's squares
    S2: Any
    r_all: Any  # the responsibilities, the sink's last; rr the keys'
    rr: Any
    c: Any  # dropout's factors (ones without)
    v: Any  # the values (finite)
    e: Any  # a key's own roundings (rigorous) and their squared magnitudes
    sq: Any
    ax: Any  # |x| times a score_mod's slope |f'(x)| (F1): how the scale's one rounding moves the logit


def _mod_gain(comp):
    """``|score_mod'(x)|`` (F1's slope, section 11), by which a score's own errors reach the logits; 1 without a score_mod."""
    g = comp.score_mod_slope()
    return 1.0 if g is None else np.abs(_finite(g))


def _pairs(comp, r, L, precision):
    """The :class:`_Pairs` of the competition ``comp``, its responsibilities ``r`` and log-partition ``L``.

    ``t_j = L - z_j``, the distance of a participating logit from the
    log-partition: it bounds its distance to whatever row maximum a kernel
    subtracts, its running maxima included (``z_j <= m' <= max z <= L``),
    so one bound covers every tiling.
    """
    from ..precision import unit_roundoff as unit

    inp = comp.inp
    M, D = inp.m, inp.q.shape[-1]
    u_s = unit(precision.scores)
    x = _finite(comp.x if comp.x is not None else inp.scaled_scores(comp.d))
    z = (-comp.e if comp.x is not None else -comp.e * inp.scale)[..., :M]  # the keys' logits
    S, S2 = _kernel_score_sizes(inp, x)
    extra = logit_error(comp, np.zeros(x.shape), u_s) / u_s if comp.x is not None else 0.0  # the variants' steps
    g = _mod_gain(comp)  # F1 scales the score's errors (the sum's and the scale's product) by its slope (section 11)
    r_all = np.where(np.isfinite(r), r, 0.0)
    rr = r_all[..., :M]
    Lf = np.where(np.isfinite(L), L, 0.0)[..., None]
    t = np.where(rr > 0, _finite(np.abs(z - Lf)), 0.0)
    c = np.ones(rr.shape) if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
    e, sq = key_roundings(D, u_s, precision.exp_ulps, g * S, g * g * S2, g * x, t, extra)
    return _Pairs(x, S, S2, r_all, rr, c, _finite(inp.v.astype(np.float64)), e, sq, g * np.abs(x))


def forward_sums(comp, r, L, precision):
    """:class:`ForwardSums` of the competition ``comp`` from ``N x M`` arrays (memory ``O(B N M)``).

    ``r (B..., N, M [+ 1])`` the oracle's responsibilities (the sink's last),
    ``L`` its log-partition (:func:`_pairs`).
    """
    return _pair_sums(_pairs(comp, r, L, precision))


def _pair_sums(f):
    """:class:`ForwardSums` of the :class:`_Pairs` ``f`` (section 14 forms its pairs once and reads both)."""
    rr, c, v, e = f.rr, f.c, f.v, f.e
    absv, ax = np.abs(v), f.ax
    rc, w = rr * c, rr**2 * f.sq
    return ForwardSums(re_v=(rr * e * c) @ absv, rax_v=(rr * ax * c) @ absv, rc_v=rc @ absv, rc2_v2=rc**2 @ v**2,
                       wc2_v2=(w * c * c) @ v**2, wc_v=(w * c) @ v, re=(rr * e).sum(-1), w=w.sum(-1), rax=(rr * ax).sum(-1),
                       r=f.r_all.sum(-1), r2=(f.r_all**2).sum(-1))


def forward_terms(sums, a, L, precision, M, n_all, dropout):
    """Section 13's terms from the :class:`ForwardSums` ``sums``: ``(ErrorTerms of a, ErrorTerms of L, sum_tree)``.

    ``a``, ``L`` the oracle's output and log-partition (float64), ``M`` the
    keys, ``n_all`` the hypotheses (``M + 1`` with a sink), ``dropout``:
    whether V8's factors are applied.  ``sum_tree``: the row sum's tree
    squares, relative to itself (section 14 reuses it).
    """
    from ..precision import unit_roundoff as unit

    u_s, u_p, u_a, u_o = (unit(getattr(precision, n)) for n in ("scores", "probs", "accumulator", "output"))
    af = _finite(np.asarray(a, np.float64))
    A = np.abs(af)
    row = lambda y: np.asarray(y)[..., None]  # noqa: E731 - a per-row sum beside the columns
    sum_tree = tree_squares(sums.r, sums.r2, n_all)  # the row sum, relative to itself
    ta = ErrorTerms()
    # a relative error e_j of key j's weight moves a by r_j e_j (c_j v_j - a); its scale, sum_j w_j (c_j v_j - a)^2, expanded
    spread = sums.wc2_v2 - 2 * af * sums.wc_v + af**2 * row(sums.w)
    ta.add(sums.re_v + A * row(sums.re), u_s * np.sqrt(np.maximum(spread, 0.0)))
    ta.add(u_s * (sums.rax_v + A * row(sums.rax)))  # the scale's rounding, every key alike
    if u_p > u_s:  # the probabilities rounded before the value GEMM
        ta.add(u_p * sums.rc_v, u_p * np.sqrt(sums.rc2_v2))
    ta.add(tree_depth(n_all) * u_s * A, u_s * A * np.sqrt(row(sum_tree)))  # the row sum's tree
    ta.add(tree_depth(M) * u_a * sums.rc_v, u_a * np.sqrt(tree_squares(sums.rc_v, sums.rc2_v2, M, total=af)))  # the value GEMM's tree
    if dropout:
        ta.add(2 * u_a * sums.rc_v)  # V8: c_j rounded and multiplied
    ta.add((u_a + u_o) * A, math.hypot(u_a, u_o) * A)  # the division, the output
    tL = ErrorTerms()
    tL.add(sums.re, u_s * np.sqrt(sums.w))
    tL.add(u_s * sums.rax)  # the scale's rounding
    tL.add(tree_depth(n_all) * u_s * sums.r, u_s * np.sqrt(sum_tree))  # the row sum's tree
    Lf = np.abs(_finite(np.asarray(L, np.float64)))
    logM = math.log(max(M, 1))
    # the log (its result, at most log M, and its own 2 ulps), the addition of the maximum and the store
    tL.add(u_s * (logM + 2 * Lf + 2), u_s * np.sqrt(logM**2 + 2 * Lf**2 + 4))
    return ta, tL, sum_tree


def kernel_forward_bounds(comp, r, a, L, precision, bound="probabilistic"):
    """Section 13: ``(tol_a (B..., N, Dv), tol_L (B..., N))`` for a kernel of ``precision``.

    ``comp``: the :class:`iem_ref.attention.Competition` of the inputs;
    ``r (B..., N, M [+ 1])`` the oracle's responsibilities (the sink's last),
    ``a``, ``L`` its output and log-partition (float64).  First order; the
    caller adds the oracle's own error and floors.  With dropout (V8) the
    value of key ``j`` for query ``i`` is ``c_ij v_j``, ``c = keep / (1 - p)``.
    Memory ``O(B N M)``: the sums over keys are matrix products (the
    probabilistic ``sum_j w_j (c_j v_j - a)^2`` expanded into three).
    """
    if bound not in ("probabilistic", "rigorous"):
        raise ValueError(f"bound must be 'probabilistic' or 'rigorous'; got {bound!r}")
    with np.errstate(invalid="ignore", over="ignore"):
        sums = forward_sums(comp, r, L, precision)
        ta, tL, _ = forward_terms(sums, a, L, precision, comp.inp.m, np.shape(r)[-1], comp.inp.keep is not None)
        return ta.bound(bound), tL.bound(bound)


class BackwardSums(NamedTuple):
    """The sums that section 14's terms read: over keys per query row, over query rows per key (float64).

    With, per pair, ``P`` the responsibility, ``f`` a soft-cap's factor (1
    without), ``c`` dropout's, ``dX = P (b - Delta) f``, ``R`` and ``V`` the
    rigorous part and the variance of its per-pair roundings (the key's own,
    ``dP``'s, ``dS``'s; for ``dk`` and ``dv`` also the row's ``L`` and
    ``Delta``): ``rq = sum_j Rq |k|``, ``vq = sum_j Vq k^2``, ``aq = sum_j
    |dX| |k|``, ``a2q = sum_j dX^2 k^2``, ``dq = sum_j dX k``, ``pk = sum_j P
    f k`` (per query row, ``D``); ``rk, vk, ak, a2k, dk`` alike over the query
    rows with ``q`` (per key, ``D``); ``rv = sum_i Rv |u|``, ``vv = sum_i Vv
    u^2``, ``pu = sum_i P c |u|``, ``p2u2 = sum_i (P c)^2 u^2``, ``dv = sum_i P
    c u`` (per key, ``Dv``); ``dk_heads``, ``dv_heads``: ``sum_h |dk_h|``,
    ``sum_h |dv_h|`` over a group's heads (V6; ``|dk|``, ``|dv|`` without), whose
    results a kernel may round head by head.  A key's other sums run over
    every query row that reads it: a group's heads are one sum over ``N g``
    rows.
    :func:`kernel_vjp_bounds` forms them from ``N x M`` arrays, the tiled
    oracle (:mod:`iem_ref.accel.verdict_vjp`) panel by panel;
    :func:`backward_terms` turns either into the bound.
    """

    rq: Any
    vq: Any
    aq: Any
    a2q: Any
    dq: Any
    pk: Any
    rk: Any
    vk: Any
    ak: Any
    a2k: Any
    dk: Any
    rv: Any
    vv: Any
    pu: Any
    p2u2: Any
    dv: Any
    dk_heads: Any
    dv_heads: Any


class RowErrors(NamedTuple):
    """A row's ``L_i`` and ``Delta_i`` as section 14 reads them: rigorous bounds ``RL``, ``RD`` and scales ``sL``, ``sD``."""

    RL: Any
    sL: Any
    RD: Any
    sD: Any


def pair_roundings(R_own, s_own, bd, P, db, db_s, ds, rows):
    """One pair's roundings in section 14, ``(Rq, Vq, Rk, Vk)``: for ``dq`` the key's own (``R_own``, scale ``s_own``,
    relative, times ``P |b - Delta|``), ``dP``'s (``db``, ``db_s``, times ``P``) and ``dS``'s own (``ds``); for ``dk``
    also the row's ``L`` and ``Delta`` (:class:`RowErrors` ``rows``, per row), which ``dq`` takes exactly
    (:func:`backward_terms`).  Different roundings: the scales add in squares.  Elementwise; the tiled oracle's kernel
    evaluates the same expression per pair."""
    Rq = P * (R_own * bd + db) + ds
    Vq = (P * s_own * bd) ** 2 + (P * db_s) ** 2 + ds**2
    Rk = Rq + P * (rows.RL * bd + rows.RD)
    Vk = Vq + (P * (rows.sL * bd + rows.sD)) ** 2
    return Rq, Vq, Rk, Vk


def value_roundings(Pc, R_own, s_own, u_cast, rows):
    """One pair's roundings in ``dv`` (section 14), ``(Rv, Vv)``: the key's own and the cast of ``P`` (relative, times
    ``P c``), and the row's ``L``.  Elementwise, as :func:`pair_roundings`."""
    return Pc * (R_own + u_cast + rows.RL), (Pc * (s_own + u_cast)) ** 2 + (Pc * rows.sL) ** 2


def delta_sums(rr, sq, ax, b, bd):
    """The sums over keys that ``Delta_i``'s scale reads (:func:`_delta_terms`), ``(sum r^2 sq |b - Delta|^2, sum r |x|
    |b - Delta|, sum r^2 b^2)`` with ``r`` the keys' responsibilities, ``sq`` a key's own squared roundings
    (:func:`key_roundings`), ``x`` the scaled scores, ``b = dP``."""
    return (rr**2 * sq * bd**2).sum(-1), (rr * ax * bd).sum(-1), (rr**2 * b**2).sum(-1)


def backward_terms(sums, rows, precision, M, n_rows, dq_rows=None, pk_rows=None):
    """Section 14's terms from the :class:`BackwardSums` ``sums`` and the :class:`RowErrors` ``rows``:
    ``(ErrorTerms of dq / scale, of dk / scale, of dv)``.

    ``M`` the keys, ``n_rows`` the query rows a key's sums run over (``N g``).
    ``dq_rows``, ``pk_rows``: the sums that the row's ``L`` and ``Delta`` move
    (default ``sums.dq``, ``sums.pk``; the squared Euclidean energy subtracts
    its ``q_i`` terms from both).
    """
    from ..precision import unit_roundoff as unit

    u_in, u_a = unit(precision.inputs), unit(precision.accumulator)
    u_store = u_in if u_in > u_a else 0.0  # the accumulator's result rounded to the input dtype
    dq_rows = np.abs(sums.dq if dq_rows is None else dq_rows)
    pk_rows = np.abs(sums.pk if pk_rows is None else pk_rows)
    col = lambda y: np.asarray(y)[..., None]  # noqa: E731 - a per-row quantity beside the columns
    tq, tk, tv = ErrorTerms(), ErrorTerms(), ErrorTerms()
    for t, R, V, A, A2, total, heads, n in ((tq, sums.rq, sums.vq, sums.aq, sums.a2q, sums.dq, np.abs(sums.dq), M),
                                            (tk, sums.rk, sums.vk, sums.ak, sums.a2k, sums.dk, sums.dk_heads, n_rows)):
        t.add(R, np.sqrt(V))  # each pair's roundings
        t.add(tree_depth(n) * u_a * A, u_a * np.sqrt(tree_squares(A, A2, n, total=total)))  # the accumulation's tree
        t.add((u_a + u_store) * heads)  # the scale's product, the store
    # L_i moves every dS_ij of the row by the same relative amount, Delta_i by P_ij times it: dq takes them exactly
    tq.add(col(rows.RL) * dq_rows + col(rows.RD) * pk_rows, col(rows.sL) * dq_rows + col(rows.sD) * pk_rows)
    tv.add(sums.rv, np.sqrt(sums.vv))
    tv.add(tree_depth(n_rows) * u_a * sums.pu, u_a * np.sqrt(tree_squares(sums.pu, sums.p2u2, n_rows, total=sums.dv)))
    tv.add(u_store * sums.dv_heads)
    return tq, tk, tv


def kernel_vjp_bounds(comp, grad_out, precision, bound="probabilistic"):
    """Section 14: ``(tol_dq, tol_dk, tol_dv)`` for a FlashAttention-style backward of ``precision``.

    ``comp``: the :class:`iem_ref.attention.Competition` of the inputs (dot
    or squared Euclidean energy), ``grad_out`` the upstream gradient
    (broadcast to ``(B..., N, Dv)``).  Shapes as :func:`iem_ref.attention_vjp`
    returns them (``Hkv`` heads with grouped-query heads).  Memory ``O(B N
    M)``: the sums of :class:`BackwardSums` are matrix products.
    """
    from ..competition import responsibilities
    from ..gradients import _sum_groups
    from ..precision import unit_roundoff as unit

    if bound not in ("probabilistic", "rigorous"):
        raise ValueError(f"bound must be 'probabilistic' or 'rigorous'; got {bound!r}")
    inp = comp.inp
    M, N, D, Dv, g = inp.m, inp.n, inp.q.shape[-1], inp.dv, inp.group
    u_in = unit(precision.inputs)
    pe = precision.exp_ulps
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    with np.errstate(invalid="ignore", over="ignore"):
        part = ~np.isposinf(comp.e) if comp.take is None else comp.take & ~np.isposinf(comp.e)
        P_all = np.where(part, responsibilities(comp.e, comp.tau, mask=comp.take), 0.0)
        P_all = np.where(np.isfinite(P_all), P_all, 0.0)
        P = P_all[..., :M]
        a, L, _ = comp.summary("zero")  # the reference's output and log-partition
        L = _finite(L)  # an empty row has no weight: its terms vanish with P
        # a NaN row's output is NaN: its terms reach only its own (NaN) gradients and pairs of weight 0, whose
        # routing is 0 (an excluded key's dk, dv stay finite): taken as 0, as every non-finite intermediate here
        a = _finite(a)
        f = _pairs(comp, P_all, L, precision)
        fsums = _pair_sums(f)
        ta, tL, sum_tree = forward_terms(fsums, a, L, precision, M, P_all.shape[-1], inp.keep is not None)
        u_s, u_a = unit(precision.scores), unit(precision.accumulator)
        z_all = -comp.e if comp.x is not None else -comp.e * inp.scale
        x, S, v64, c = f.x, f.S, f.v, f.c
        eta_x = gamma(D, u_s) * S + u_s * np.abs(x)
        eta = logit_error(comp, eta_x, u_s) if comp.x is not None else eta_x
        tz = _finite(np.abs(z_all[..., :M] - L[..., None]))
        # P_ij recomputed as exp(z_ij - L_i): a key's own roundings (its score, the subtraction, the exp)
        own = eta + u_s * tz + 2 * pe * u_s
        var = logit_error(comp, np.zeros(x.shape), u_s) if comp.x is not None else 0.0
        gain = _mod_gain(comp)
        own_s = u_s * np.sqrt(gain**2 * (f.S2 + x**2) + tz**2 + 4 * pe * pe) + var
        u = _finite(np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (N, Dv)))
        absu, absv = np.abs(u), np.abs(v64)
        b = np.where(part[..., :M], c * (u @ T(v64)), 0.0)  # dP_ij, with dropout's c
        uv = c * (absu @ T(absv))
        db, db_s = tree_depth(Dv) * u_a * uv, u_a * np.sqrt(tree_squares(uv, c**2 * (u**2 @ T(v64**2)), Dv, total=b))
        delta = (u * a).sum(-1, keepdims=True)
        bd = np.abs(b - delta)
        RD, sD = _delta_terms(ta.bound("rigorous"), precision, a, u, delta[..., 0], sum_tree, fsums.rc_v, fsums.rc2_v2,
                              delta_sums(f.rr, f.sq, f.ax, b, bd), M, Dv, inp.keep is not None)  # the row's Delta
        rows = RowErrors(tL.bound("rigorous"), tL.scale(), RD, sD)
        at_pairs = RowErrors(*(y[..., None] for y in rows))
        dZ = P * (b - delta)
        slope = comp.logit_slope()
        fcap = 1.0 if slope is None else _finite(slope)
        dX = dZ * fcap  # the slope dz/dx: a soft-cap's factor (V3), a score_mod's derivative (F3)
        adX = np.abs(dX)
        u_cast = u_in if u_in > u_s else 0.0  # dS and P rounded to the input dtype for the GEMMs
        # dS's own roundings: the subtraction, the product, the cast; the slope's (section 11)
        ds = (2 * u_s + u_cast) * adX + np.abs(dZ) * slope_error(comp, eta_x, eta, u_s)
        Rq, Vq, Rk, Vk = pair_roundings(own, own_s, bd, P, db, db_s, ds, at_pairs)
        Pc = P * c
        Rv, Vv = value_roundings(Pc, own, own_s, u_cast, at_pairs)
        kf, qf = _finite(inp.k.astype(np.float64)), _finite(inp.q.astype(np.float64))
        absk, absq = np.abs(kf), np.abs(qf)
        PF = P * fcap
        over_rows = lambda W, X: _sum_groups(T(W) @ X, g)  # noqa: E731 - over the N g query rows of a key's group (V6)
        sums = BackwardSums(rq=Rq @ absk, vq=Vq @ kf**2, aq=adX @ absk, a2q=adX**2 @ kf**2, dq=dX @ kf, pk=PF @ kf,
                            rk=over_rows(Rk, absq), vk=over_rows(Vk, qf**2), ak=over_rows(adX, absq), a2k=over_rows(adX**2, qf**2),
                            dk=over_rows(dX, qf), rv=over_rows(Rv, absu), vv=over_rows(Vv, u**2), pu=over_rows(Pc, absu),
                            p2u2=over_rows(Pc**2, u**2), dv=over_rows(Pc, u), dk_heads=_sum_groups(np.abs(T(dX) @ qf), g),
                            dv_heads=_sum_groups(np.abs(T(Pc) @ u), g))
        dq_rows = pk_rows = None
        if inp.energy == "sqeuclidean":  # dq_i also subtracts q_i sum_j dS_ij
            dq_rows = dX @ kf - dX.sum(-1, keepdims=True) * qf
            pk_rows = PF @ kf - PF.sum(-1, keepdims=True) * qf
        tq, tk, tv = backward_terms(sums, rows, precision, M, N * g, dq_rows, pk_rows)
        if inp.energy == "sqeuclidean":  # -dS summed over the row (or column) times q_i (k_j): its terms, rigorous
            tk.add(_sum_groups(absk * (Rk.sum(-2) + tree_depth(N * g) * u_a * adX.sum(-2))[..., None], g))
            if inp.softcap is not None or inp.sinks is not None or inp.score_mod is not None:
                tq.add(absq * (Rk.sum(-1) + tree_depth(M) * u_a * adX.sum(-1))[..., None])
        blocks = precision.gradient_blocks
        if blocks is not None and u_in > u_a:  # partial sums stored in the input dtype between blocks
            tq.add(*_stored_partials(dX, kf, blocks[1], u_in))
            tk.add(*(_sum_groups(y, g) for y in _stored_partials(T(dX), qf, blocks[0], u_in)))
            tv.add(*(_sum_groups(y, g) for y in _stored_partials(T(Pc), u, blocks[0], u_in)))
        dq, dk, dv = (inp.scale * tq.bound(bound), inp.scale * tk.bound(bound), tv.bound(bound))
    return dq, dk, dv


def _stored_partials(W, X, block, u):
    """``(R, sigma)`` of ``W @ X`` summed a ``block`` of terms at a time into a result stored in unit roundoff
    ``u`` (section 14): each intermediate store rounds the partial sum ``S_k`` so far (the last store is the
    result's own rounding, counted apart): ``u sum_k |S_k|`` and ``u sqrt(sum_k S_k^2)``."""
    n = W.shape[-1]
    S, R, V = 0.0, 0.0, 0.0
    for s in range(0, n - block, block):
        S = S + W[..., s : s + block] @ X[..., s : s + block, :]
        R, V = R + np.abs(S), V + np.square(S)
    return u * R, u * np.sqrt(V)


def _delta_terms(ta_rig, precision, a, u, delta, sum_tree, rc_v, rc2_v2, dsums, M, Dv, dropout):
    """``(R, sigma)`` per row of ``Delta_i = sum_c u_ic a_ic`` formed from the kernel's stored output (section 14).

    Rigorous: the output's bound per column (``ta_rig``, section 13's rigorous
    bound) and the row sum's tree.  Scale: the output's roundings that every column shares
    enter ``Delta`` through ``sum_c u_c (c_j v_jc - a_c) = b_ij - Delta_i``
    (the sums :func:`delta_sums`, ``dsums``); the value GEMM's, the
    division's and the output's own roundings are independent across
    columns.  ``rc_v``, ``rc2_v2``: those of :class:`ForwardSums`,
    ``sum_tree`` the row sum's tree squares (:func:`forward_terms`), ``M``
    the keys.
    """
    from ..precision import unit_roundoff as unit

    u_s, u_p, u_a, u_o = (unit(getattr(precision, n)) for n in ("scores", "probs", "accumulator", "output"))
    absu = np.abs(u)
    ua = np.abs(u * a)
    S_ua = ua.sum(-1)
    R = (absu * ta_rig).sum(-1) + (tree_depth(Dv) * u_a + u_o) * S_ua
    sq_bd2, ax_bd, b2 = dsums
    var = u_s**2 * sq_bd2  # a key's own roundings
    var = var + (u_s * ax_bd) ** 2  # the scale's rounding
    if u_p > u_s:
        var = var + u_p**2 * b2
    var = var + u_s**2 * delta**2 * sum_tree  # the row sum's tree
    var = var + u_a**2 * (u**2 * tree_squares(rc_v, rc2_v2, M, total=a)).sum(-1)  # the value GEMM
    var = var + (u_a**2 + 2 * u_o**2) * (ua**2).sum(-1)  # the division, the output, its product by u
    var = var + u_a**2 * tree_squares(S_ua, (ua**2).sum(-1), Dv, total=delta)  # Delta's row sum
    if dropout:
        var = var + (2 * u_a * (absu * rc_v).sum(-1)) ** 2  # V8
    return R, np.sqrt(var)
