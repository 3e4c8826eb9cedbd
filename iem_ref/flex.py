"""FlexAttention's user-defined variants: ``score_mod`` and ``mask_mod`` (F1-F3).

PyTorch's FlexAttention lets a kernel author write a variant as two small
functions of the pair's indices, and a kernel compiles them in:

====  ==============================================  ==========================================================
ID    equation                                        reading
====  ==============================================  ==========================================================
F1    ``y_ij = score_mod(x_ij, b, h, i, j)``          a logit of the pair's own making: any prior, any cap
F2    ``take_ij &= mask_mod(b, h, i, j)``             a hypothesis set given by a rule on the indices
F3    ``dX_ij = dY_ij score_mod'(x_ij)``              the backward: the chain rule through F1 (complex step)
====  ==============================================  ==========================================================

Here both take NumPy arrays: ``score`` the scaled scores ``x (B..., N,
M)`` in float64 (T1), and the indices as integer arrays that broadcast
against it (:func:`flex_indices`): ``b`` the flattened index of the
leading batch axes (0 when there are none), ``h`` the head (the last batch
axis; 0 for ``q (N, D)``), ``q_idx`` and ``kv_idx`` the token positions on
the packed axes.  Written with NumPy's ufuncs (``np.where``, ``np.tanh``,
indexing of a table by ``q_idx - kv_idx``, ...), the same function serves
an element or the whole ``(B..., N, M)`` array.

In the score pipeline F1 acts on the scaled score, where FlexAttention
calls it, before the built-in steps: ``y = score_mod(x)``, ``s =
softcap(y)`` (V3), ``z = s + bias + alibi`` (V1, V2).  F2 joins the mask,
causality, windows and segments by AND (V4, V7).  As everywhere in this
package the exclusion is selection: a score_mod that returns ``-inf``
excludes the key (FlexAttention's masking score_mods), and a key excluded
before F1 (a ``+inf`` energy) stays excluded whatever the score_mod returns.

The backward (F3) needs ``score_mod'(x) = dy/dx``.  Give it as
``ScoreMod(fn, grad=...)``, or let :func:`score_mod_slope` take it by the
complex step ``f'(x) = Im f(x + i h) / h``: no difference of two close
values is formed, so the result is as accurate as ``f`` itself at any
``h``, and with ``h = 2**-100`` the truncation ``h^2 |f'''| / 6`` is far
below float64's rounding (derivations/F_flex.md, F3).  That needs ``fn``
written with operations that extend to complex scores: sums, products,
``exp``, ``tanh``, ``np.where`` (NumPy orders complex numbers by their real
part first, so comparisons of the score and ``np.maximum`` choose the same
branch as at the real score).  ``np.abs`` and ``np.sign`` do not extend
(the modulus has no imaginary part: the slope would come out 0; write
``np.where(score < 0, -score, score)``), and ``np.floor`` or ``np.round``
have no complex form (a TypeError): give ``grad`` for such a score_mod.

The bounds (:mod:`iem_ref.bounds`, section 11) take F1's evaluation as a
few roundings of the path's precision relative to ``|x| + |y|``:
``ScoreMod.ulps`` of them (default 5, which covers an added bias, a
product, a ``tanh`` to 2 ulps, and each of the built-in variants' steps).
A score_mod that cancels (``x + 1e8 - 1e8``) needs a larger ``ulps``.

Which tiers run them: the NumPy reference (:func:`iem_ref.attention`,
:func:`iem_ref.attention_vjp`), :mod:`iem_ref.testing`'s reference oracle
with its emulated baseline (:mod:`iem_ref.lowp`, which rounds F1 and its
slope to the scores' dtype), :mod:`iem_ref.accel.cpu` (the score_mod
compiled into its kernel by ``numba.njit`` as a scalar function, so it must
compile there; the mask_mod evaluated into its mask, its wholly masked key
tiles skipped where the rule gives each position an interval of keys) and,
built on it, the tiled forward oracle (``oracle="tiled"``, asked for by
name: the default for a call with mods is the reference, which needs no
compilation).  The exact tier, the tiled backward oracle,
:mod:`iem_ref.dask` and :mod:`iem_ref.accel.cuda` refuse them by name.

FlexAttention's documented examples, as ready-made mods: :func:`causal`,
:func:`sliding_window`, :func:`prefix_lm`, :func:`document`,
:func:`relative_position`, :func:`alibi`, :func:`softcap`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np

__all__ = [
    "ScoreMod",
    "as_score_mod",
    "check_mask_mod",
    "flex_indices",
    "modified_scores",
    "score_mod_slope",
    "mod_mask",
    "causal",
    "sliding_window",
    "prefix_lm",
    "document",
    "relative_position",
    "alibi",
    "softcap",
]

#: the complex step's h (F3): small enough that h^2 |f'''| / 6 is negligible, large enough that h |f'| stays normal
COMPLEX_STEP = 2.0**-100


class ScoreMod(NamedTuple):
    """A score_mod with what the backward and the bounds need beside it (F1, F3).

    ``fn(score, b, h, q_idx, kv_idx)``: the modified score; ``grad``: its
    derivative in ``score``, the same signature (None: the complex step);
    ``ulps``: F1's evaluation error in roundings of the path's precision,
    relative to ``|score| + |fn(score)|`` (section 11 of the bounds).
    """

    fn: Callable
    grad: Optional[Callable] = None
    ulps: float = 5.0


def as_score_mod(mod):
    """``None``, a :class:`ScoreMod`, or a callable (a :class:`ScoreMod` with the defaults); anything else is a TypeError.

    Examples
    --------
    >>> as_score_mod(relative_position).ulps
    5.0
    """
    if mod is None:
        return None
    if isinstance(mod, ScoreMod):
        if not callable(mod.fn) or (mod.grad is not None and not callable(mod.grad)):
            raise TypeError("score_mod: ScoreMod's fn (and grad, when given) must be callable f(score, b, h, q_idx, kv_idx)")
        if isinstance(mod.ulps, (bool, np.bool_)) or not isinstance(mod.ulps, (int, float, np.integer, np.floating)) or not (
            mod.ulps >= 0 and math.isfinite(mod.ulps)
        ):
            raise ValueError(f"score_mod: ScoreMod's ulps must be a finite number >= 0; got {mod.ulps!r}")
        return mod
    if callable(mod):
        return ScoreMod(mod)
    raise TypeError(f"score_mod must be a callable f(score, b, h, q_idx, kv_idx) or an iem_ref.flex.ScoreMod; got {type(mod).__name__}")


def check_mask_mod(mod):
    """``None`` or a callable ``mask_mod(b, h, q_idx, kv_idx) -> bool``; anything else is a TypeError.

    Examples
    --------
    >>> check_mask_mod(causal) is causal
    True
    """
    if mod is not None and not callable(mod):
        raise TypeError(f"mask_mod must be a callable f(b, h, q_idx, kv_idx) -> bool; got {type(mod).__name__}")
    return mod


class FlexIndex(NamedTuple):
    """The pair's indices as integer arrays that broadcast against ``(B..., N, M)``."""

    b: np.ndarray
    h: np.ndarray
    q_idx: np.ndarray
    kv_idx: np.ndarray


def flex_indices(batch, n, m):
    """``(b, h, q_idx, kv_idx)`` for a batch shape ``batch`` (heads last) and ``N`` queries, ``M`` keys.

    ``b`` numbers the leading batch axes in C order (0 without them), ``h``
    the last batch axis (0 without one).

    Examples
    --------
    >>> idx = flex_indices((2, 3), 4, 5)
    >>> [x.shape for x in idx]
    [(2, 1, 1, 1), (1, 3, 1, 1), (4, 1), (1, 5)]
    >>> int(flex_indices((), 1, 1).h.sum())
    0
    """
    nb = len(batch)
    pair = (1, 1)
    if nb == 0:
        b = h = np.zeros(pair, np.int64)
    else:
        h = np.arange(batch[-1], dtype=np.int64).reshape((1,) * (nb - 1) + (batch[-1],) + pair)
        lead = batch[:-1]
        b = np.arange(int(np.prod(lead, dtype=np.int64)), dtype=np.int64).reshape(lead + (1,) + pair)
    return FlexIndex(b, h, np.arange(n, dtype=np.int64)[:, None], np.arange(m, dtype=np.int64)[None, :])


def _read_only(x):
    """A view of ``x`` that a user's function cannot write to (the scores and indices are the caller's, used again after the call)."""
    view = np.asarray(x).view()
    view.flags.writeable = False
    return view


def _evaluate(fn, what, args, shape, kinds):
    """``fn(*args)`` broadcast to ``shape``: a TypeError unless its dtype kind is one of ``kinds``, a ValueError unless it broadcasts."""
    with np.errstate(all="ignore"):
        out = np.asarray(fn(*(_read_only(a) for a in args)))
    if out.dtype.kind not in kinds:
        raise TypeError(f"{what} must return {'booleans (True = the key takes part)' if kinds == 'b' else 'real numbers'}; "
                        f"got dtype {out.dtype}")
    try:
        return np.broadcast_to(out, shape)
    except ValueError:
        raise ValueError(f"{what} returned shape {out.shape}, which does not broadcast to (B..., N, M) = {shape}") from None


def modified_scores(mod, x, idx):
    """F1: ``y_ij = score_mod(x_ij, b, h, i, j)`` (float64), the scaled scores ``x`` modified pair by pair.

    A key excluded before the modification (``x = -inf``) stays excluded.

    Examples
    --------
    >>> x = np.zeros((2, 3))
    >>> modified_scores(relative_position, x, flex_indices((), 2, 3))
    array([[ 0., -1., -2.],
           [ 1.,  0., -1.]])
    """
    mod = as_score_mod(mod)
    y = _evaluate(mod.fn, "score_mod", (x,) + tuple(idx), x.shape, "fiu").astype(np.float64)
    return np.where(np.isneginf(x), -np.inf, y)


def score_mod_slope(mod, x, idx):
    """F3: ``dy/dx = score_mod'(x)`` per pair: ``grad`` when given, else the complex step ``Im f(x + i h) / h``.

    0 where ``x`` is not finite (an infinite score's logit does not move
    under a finite change of it, as V3's factor ``1 - (s/c)^2`` is 0 there).

    Examples
    --------
    >>> x = np.array([[0.0, 1.0]])
    >>> score_mod_slope(softcap(2.0), x, flex_indices((), 1, 2))  # 1 - tanh(x / 2)^2
    array([[1.        , 0.78644773]])
    """
    mod = as_score_mod(mod)
    finite = np.isfinite(x)
    xf = np.where(finite, x, 0.0)
    if mod.grad is not None:
        g = _evaluate(mod.grad, "score_mod's grad", (xf,) + tuple(idx), x.shape, "fiu").astype(np.float64)
    else:
        try:
            with np.errstate(all="ignore"):
                y = np.asarray(mod.fn(xf + 1j * COMPLEX_STEP, *(_read_only(a) for a in idx)))
        except TypeError as exc:  # e.g. a comparison of complex scores
            raise TypeError(
                f"score_mod cannot be evaluated at complex scores for its derivative (the complex step, F3): {exc}; "
                "give it as iem_ref.flex.ScoreMod(fn, grad=...)"
            ) from None
        g = np.broadcast_to(np.imag(y) / COMPLEX_STEP, x.shape)
    return np.where(finite, g, 0.0)


def mod_mask(mod, idx, shape):
    """F2: the pairs ``mask_mod(b, h, i, j)`` lets take part, a boolean ``(B..., N, M)`` view.

    Examples
    --------
    >>> mod_mask(causal, flex_indices((), 2, 3), (2, 3)).astype(int)
    array([[1, 0, 0],
           [1, 1, 0]])
    """
    return _evaluate(mod, "mask_mod", tuple(idx), shape, "b")


# --- FlexAttention's documented examples ----------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    """mask_mod: query ``i`` sees the keys ``j <= i`` (top-left causality).

    Examples
    --------
    >>> causal(0, 0, np.arange(2)[:, None], np.arange(2)[None, :]).astype(int)
    array([[1, 0],
           [1, 1]])
    """
    return q_idx >= kv_idx


def sliding_window(size):
    """mask_mod: causal, and query ``i`` sees the keys ``i - size <= j`` (V4's ``window=(size, 0)`` with ``is_causal``).

    Examples
    --------
    >>> sliding_window(1)(0, 0, np.arange(3)[:, None], np.arange(3)[None, :]).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [0, 1, 1]])
    """

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= size)

    return sliding_window_mask


def prefix_lm(prefix_length):
    """mask_mod: every query sees the first ``prefix_length`` keys (bidirectional prefix), and causally beyond them.

    Examples
    --------
    >>> prefix_lm(2)(0, 0, np.arange(3)[:, None], np.arange(3)[None, :]).astype(int)
    array([[1, 1, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return prefix_lm_mask


def document(document_id, causal=False):
    """mask_mod: packed documents, token ``t`` belonging to ``document_id[t]``; queries see keys of their own document (V7).

    With ``causal``, only the keys at or before the query (positions on the
    packed axis, so within a document as V7's top-left alignment).
    

    Examples
    --------
    >>> document([0, 0, 1])(0, 0, np.arange(3)[:, None], np.arange(3)[None, :]).astype(int)
    array([[1, 1, 0],
           [1, 1, 0],
           [0, 0, 1]])
    """
    ids = np.asarray(document_id)

    def document_mask(b, h, q_idx, kv_idx):
        same = ids[q_idx] == ids[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    return document_mask


def relative_position(score, b, h, q_idx, kv_idx):
    """score_mod: adds the signed distance ``i - j`` (FlexAttention's relative position example).

    Examples
    --------
    >>> relative_position(np.zeros((1, 3)), 0, 0, np.array([[1]]), np.arange(3)[None, :])
    array([[ 1.,  0., -1.]])
    """
    return score + (q_idx - kv_idx)


def alibi(slopes):
    """score_mod: ALiBi as FlexAttention writes it, ``score + slope_h (j - i)``: V2's ``-slope |i - j|`` where causal.

    Examples
    --------
    >>> alibi([0.5])(np.zeros((1, 2)), 0, np.zeros((1, 1), int), np.array([[1]]), np.arange(2)[None, :])
    array([[-0.5,  0. ]])
    """
    s = np.asarray(slopes, dtype=np.float64)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + s[h] * (kv_idx - q_idx)

    return alibi_mod


def softcap(cap):
    """score_mod: ``cap tanh(score / cap)``, V3 as a score_mod.

    Examples
    --------
    >>> softcap(2.0)(np.array([0.0, 100.0]), 0, 0, 0, 0)
    array([0., 2.])
    """

    def softcap_mod(score, b, h, q_idx, kv_idx):
        return cap * np.tanh(score / cap)

    return softcap_mod
