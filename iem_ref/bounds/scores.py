"""The scores' and the variants' logits' errors (sections 5 and 11).

5. Scores
---------
``x_ij = -d_ij / tau`` with ``tau`` the reference's temperature
(``fl(1/scale)``; the bounds treat the reference's ``1/tau`` as the exact
scale).  ``S_ij`` is the size of the dot product that forms the score:
``sum_c |q_ic k_jc|`` (dot); ``sum_c |q_ic - k_jc|`` (Laplace, K4, in
section 13 only: no path computes it); for the squared Euclidean energy
``(|q_i|^2 + |k_j|^2)/2 + sum_c |q_ic k_jc|`` where a path expands
``||q - k||^2`` into one GEMM and two norms (CPU), else ``|t_ij|`` (CUDA and
the reference sum the squared differences directly; ``|t| <= S`` either way).
:func:`score_error` gives the score's error, both sides:

* the path's: ``scale gamma_{D + c}(u) S + (u + u_scale) |x|``.  ``c``:
  CPU 3, from its squared Euclidean score, ``gamma_D sum|q k|`` (the GEMM)
  ``+ (gamma_D(u64) + u)(|q|^2 + |k|^2)/2`` (the half norms, accumulated in
  float64 and rounded to the dtype) ``+ u (|q|^2 + |k|^2)/2`` (their sum)
  ``+ u |t|`` (the subtraction) ``<= gamma_{D+3}(u) S`` (``gamma_D(u64) <= D u``;
  its dot score needs ``D``); CUDA 2, from its squared differences (a
  difference and a square per term, ``D - 1`` additions: ``gamma_{D+2} |t|``;
  its dot product ``D``).  ``(u + u_scale) |x|``: the product by the scale
  (``u``; on the CPU's dot score the GEMM's ``alpha``) and the scale itself:
  the paths' ``fl_T(fl(1/tau))`` or ``fl_T(scale)`` is within ``u_scale = u64``
  (float64) or ``u + u64`` (float32) of ``1/tau`` (:func:`scale_rounding`);
* the reference's: ``scale gamma_{D+2}(u64) S`` (section 4; ``D + 2`` covers
  both energies).

11. Logits of the variants (V1-V3)
----------------------------------
With a bias, ALiBi or a soft-cap a path forms the logits
``z = softcap(x) + bias + alibi`` before its softmax (:func:`logit_error`).
``x = -d scale`` carries the score error of section 5 (``score``) and its
product by the scale, ``u |x|`` (outside the error-free shift of the plain
path).  The soft-cap ``s = c tanh(x / c)`` scales that error by its
derivative ``1 - (s/c)^2 <= 1`` and adds ``u (|x| + 5 |s|)``: the division
by ``c`` (``u |x|`` after the derivative), a ``tanh`` within 2 ulps
(``4 u |s|``) and the product by ``c`` (``u |s|``).  Each added prior rounds
once, ``u |z|``; ALiBi's ``-slope |i' - j|`` is one product more,
``u |alibi|``.  Sinks are exact logits; dropout acts after the softmax
(one more rounding of the output, ``u |a|``).

A score_mod (F1, ``y = f(x, b, h, i, j)``, before the soft-cap, which then
reads ``y`` for ``x``) scales the error of its argument by its slope
``|f'(x)|`` (first order, as every term here) and adds its own evaluation,
``ulps u (|x| + |y|)`` (``ScoreMod.ulps``, 5 by default: an added bias is
``u |y|``, a product ``u |y|``, the soft-cap's own steps ``u (|x| + 5
|s|)``, so each built-in step written as a score_mod is covered).  The
slope is ``f'`` at the reference's ``x``: the complex step gives it to the
rounding of ``f`` itself (F3), so it adds nothing beside ``u``.

The slope ``dz/dx`` a backward forms (:func:`slope_error`): V3's factor
``1 - (s/c)^2`` from its own ``s`` is within ``2 eta / c + 2 u`` (its
derivative in ``s`` is at most ``2 / c``; a square and a subtraction);
F1's ``f'`` from its own ``x`` within ``|f'(x + e) - f'(x)|`` over ``|e| <=
eta_x`` (taken at the two ends, first order) plus ``ulps u |f'|``; their
product rounds once more, ``u |dz/dx|``.  Alone, V3's gives section 12's
``2 eta / c + 3 u``.
"""

from __future__ import annotations

import numpy as np

from .primitives import U64, _finite, gamma, scale_rounding


def slope_error(comp, score, eta, u):
    """Section 11: the error of the slope ``dz/dx`` (V3, F3) a path forms from its own scores and logits; 0 without V3 and F1.

    ``score`` the error of the scaled scores ``x`` (section 5, their product by the scale included), ``eta`` of
    the logits (:func:`logit_error`, which bounds the soft-capped scores'),
    both ``(B..., N, M)``; ``u`` the path's unit roundoff.
    """
    inp = comp.inp
    if inp.softcap is None and inp.score_mod is None:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        f_cap, e_cap = 1.0, 0.0
        if inp.softcap is not None:  # V3's factor from the path's s
            f_cap = 1.0 - (_finite(comp.s) / inp.softcap) ** 2
            e_cap = 2 * eta / inp.softcap + 2 * u
        g, e_g = 1.0, 0.0
        if inp.score_mod is not None:  # F3: f' from the path's x, at the ends of its error interval, and its evaluation
            from ..flex import score_mod_slope

            g = _finite(comp.score_mod_slope())
            x, e_x = comp.x, _finite(score)
            idx = inp.flex_index()
            moved = np.maximum(np.abs(_finite(score_mod_slope(inp.score_mod, x + e_x, idx)) - g),
                               np.abs(_finite(score_mod_slope(inp.score_mod, x - e_x, idx)) - g))
            e_g = moved + inp.score_mod.ulps * u * np.abs(g)
        return _finite(np.abs(g) * e_cap + np.abs(f_cap) * e_g + u * np.abs(f_cap * g))


def score_form(energy):
    """The :class:`~iem_ref.energies.ScoreTerms` of ``energy`` (its record's ``score``); a ``ValueError`` naming it where no bound is derived (never another's)."""
    from ..energies import ENERGY_RECORDS, energy_of

    rec = energy_of(energy)
    if not rec.has("score"):
        derived = ", ".join(sorted(name for name, r in ENERGY_RECORDS.items() if r.has("score")))
        what = "a callable energy (its arithmetic is unknown)" if callable(energy) else f"energy {energy!r}"
        raise ValueError(f"no error bound is derived for {what}: pass rtol/atol, or use one of {derived}")
    return rec.score


def score_sizes(q, k, energy, expanded):
    """``S_ij`` of section 5, ``(B..., N, M)`` float64 (non-finite entries count as 0); ``expanded``: a path that expands ``||q - k||^2``."""
    form = score_form(energy)
    q = _finite(np.asarray(q, np.float64))
    k = _finite(np.asarray(k, np.float64))
    if expanded and energy == "sqeuclidean":
        dot = score_form("dot").sizes(q, k)
        return dot + 0.5 * ((q**2).sum(-1)[..., :, None] + (k**2).sum(-1)[..., None, :])
    return form.sizes(q, k)


def score_squares(q, k, energy):
    """``sum_c y_c^2`` of the ``D`` terms ``y_c`` a score sums (the energy's :class:`~iem_ref.energies.ScoreTerms`), ``(B..., N, M)``.

    With ``score_sizes``' ``S = sum_c |y_c|`` it gives :func:`tree_squares` of the score's sum.
    """
    form = score_form(energy)
    return form.squares(_finite(np.asarray(q, np.float64)), _finite(np.asarray(k, np.float64)))


def _times_scale(scale, S):
    """``scale S``, and 0 at scale 0 even where a size overflowed to inf: every score is then exactly 0."""
    return np.zeros(np.shape(S)) if scale == 0 else scale * np.asarray(S, np.float64)


def score_error(path, u, S, x, scale, D):
    """``(path's, reference's)`` score errors of section 5, elementwise."""
    ax = np.abs(_finite(x))
    sS = _times_scale(scale, S)
    mine = gamma(D + path.score_extra, u) * sS + (u + scale_rounding(u)) * ax
    ref = gamma(D + 2, U64) * sS
    return mine, ref


def logit_error(comp, score, u):
    """Section 11: the error of the logits ``z (B..., N, M)`` that a path forms in unit roundoff ``u``.

    ``comp`` is the :class:`iem_ref.attention.Competition` of the inputs,
    ``score`` the error of the scaled scores ``x`` (section 5).  On the plain
    path (no bias, ALiBi, soft-cap or sinks) the logits are the scores and
    ``score`` is returned unchanged.  Non-finite logits get 0 (the edge-case
    policy decides them, not rounding).
    """
    if comp.x is None:
        return score
    inp = comp.inp
    M = inp.m
    with np.errstate(invalid="ignore"):
        ax, az = _finite(np.abs(comp.x)), _finite(np.abs(comp.e[..., :M]))
        eta = score + u * ax  # the product by the scale
        ay = ax
        if inp.score_mod is not None:  # F1: its slope times its argument's error, and its own evaluation
            ay = _finite(np.abs(comp.y))
            eta = np.abs(comp.score_mod_slope()) * eta + inp.score_mod.ulps * u * (ax + ay)
        if inp.softcap is not None:
            a_s = _finite(np.abs(comp.s))
            eta = eta * (1.0 - (a_s / inp.softcap) ** 2) + u * (ay + 5 * a_s)
        if inp.bias is not None:
            eta = eta + u * az
        alibi = inp.alibi()
        if alibi is not None:
            eta = eta + u * (np.abs(alibi) + az)
    return _finite(eta)
