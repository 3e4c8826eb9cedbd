"""Attention: A1-A4 composed, with masks, causality, kernels and the hard limit.

Shape legend: ``B...`` leading (batch, head) axes, which broadcast; ``N``
queries, ``M`` keys, ``D`` features of queries and keys, ``Dv`` features of
values.  ``q (B..., N, D)``, ``k (B..., M, D)``, ``v (B..., M, Dv)``,
output ``(B..., N, Dv)``, log-partition ``(B..., N)``, responsibilities
``(B..., N, M)``.

The pipeline that runs (:func:`attention`), one line per equation, all in
float64 and rounded once to the inputs' dtype::

    d = energy(q, k)                     # A1 (or a kernel, K); tau = 1/scale (T1), scale = 1/sqrt(D) by default
    take = mask & causal                 # which keys take part (selection: the others get no weight)
    t = softmin_terms(d, tau, take)      # m = min d; w_j = exp(-(d_j - m)/tau), shifted error-free; sum w
    r = w / sum(w)                       # A3 (iem_ref.responsibilities)
    L = -m/tau + log(sum w)              # G1, returned with return_lse
    a = sum_j r_j v_j                    # A4 (iem_ref.posterior_mean)

one pass over the energies (:func:`iem_ref.summaries.softmin_summary`'s),
with the edge-case rows (empty, certain, NaN) of the README's policy.

Conventions: ``mask`` is boolean, True = the key takes part (as
``torch.nn.functional.scaled_dot_product_attention``; note that
``nn.MultiheadAttention``'s ``key_padding_mask`` means the opposite), and
broadcasts to ``(B..., N, M)``.  ``is_causal`` lets query ``i`` see keys
``j <= i`` (``causal_alignment="top_left"``, torch's convention) or
``j <= i + M - N`` (``"bottom_right"``, FlashAttention's and KV-cache
decoding's); it combines with ``mask`` by AND.
"""

from __future__ import annotations

import numpy as np

from ._validation import (
    as_float_array,
    as_mask,
    broadcast_batch,
    check_choice,
    check_scale,
    need_ndim,
    result_dtype,
)
from .competition import hard_responsibilities, responsibilities
from .energies import ENERGIES
from .summaries import _softmin_summary, _weighted_sum

__all__ = ["attention", "attention_responsibilities", "hard_attention", "causal_mask", "AttentionInputs", "prepare_attention"]

_ALIGN = {"top_left", "bottom_right"}


def causal_mask(n, m, alignment="top_left"):
    """The causal mask ``(N, M)``: True where query ``i`` may see key ``j``.

    ``"top_left"``: ``j <= i``; ``"bottom_right"``: ``j <= i + M - N`` (the last
    query sees every key).

    Examples
    --------
    >>> causal_mask(2, 3).astype(int)
    array([[1, 0, 0],
           [1, 1, 0]])
    >>> causal_mask(2, 3, "bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    check_choice(alignment, "causal_alignment", _ALIGN)
    offset = 0 if alignment == "top_left" else m - n
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    return j <= i + offset


class AttentionInputs:
    """Validated attention inputs, shared by the reference and accelerated paths.

    Attributes: ``q, k, v`` (original dtypes, batch axes broadcast),
    ``batch`` (tuple), ``n, m, dv``, ``tau`` (``1/scale``; ``inf`` for
    ``scale = 0``), ``mask`` (bool ``(B..., N, M)`` broadcast view, or None),
    ``is_causal``, ``causal_offset`` (query ``i`` sees ``j <= i + offset``),
    ``energy`` (a name or a callable), ``dtype`` (the output dtype).
    """

    def __init__(self, q, k, v, scale, mask, is_causal, causal_alignment, energy):
        q = as_float_array(q, "q")
        k = as_float_array(k, "k")
        v = as_float_array(v, "v")
        need_ndim(q, "q", 2, "(..., N, D)")
        need_ndim(k, "k", 2, "(..., M, D)")
        need_ndim(v, "v", 2, "(..., M, Dv)")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q (..., N, D) and k (..., M, D) disagree on D: q has shape {q.shape}, k has shape {k.shape}")
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(f"k (..., M, D) and v (..., M, Dv) disagree on M: k has shape {k.shape}, v has shape {v.shape}")
        if not (callable(energy) or energy in ENERGIES):
            raise ValueError(f"energy must be a callable or one of {sorted(ENERGIES)}; got {energy!r}")
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"is_causal must be a bool; got {type(is_causal).__name__}")
        check_choice(causal_alignment, "causal_alignment", _ALIGN)
        self.dtype = result_dtype(q, k, v)
        self.batch, (self.q, self.k, self.v) = broadcast_batch([("q", q), ("k", k), ("v", v)], [2, 2, 2])
        self.n, self.m, self.dv = q.shape[-2], k.shape[-2], v.shape[-1]
        self.tau = check_scale(scale, q.shape[-1])
        self.mask = as_mask(mask, self.batch + (self.n, self.m), "mask")
        self.is_causal = bool(is_causal)
        self.causal_offset = 0 if causal_alignment == "top_left" else self.m - self.n
        self.causal_alignment = causal_alignment
        self.energy = energy

    def takes_part(self):
        """The combined mask ``(B..., N, M)`` (mask AND causal), or None when every key takes part."""
        take = self.mask
        if self.is_causal:
            causal = causal_mask(self.n, self.m, self.causal_alignment)
            take = causal if take is None else take & causal
        return None if take is None else np.broadcast_to(take, self.batch + (self.n, self.m))

    def energies(self):
        """A1 / K: ``d (B..., N, M)`` in float64."""
        fn = ENERGIES[self.energy] if isinstance(self.energy, str) else self.energy
        d = np.asarray(fn(self.q.astype(np.float64), self.k.astype(np.float64)), dtype=np.float64)
        if d.shape != self.batch + (self.n, self.m):
            raise ValueError(f"energy returned shape {d.shape}; expected (B..., N, M) = {self.batch + (self.n, self.m)}")
        return d


def prepare_attention(q, k, v, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot"):
    """Validate attention arguments once (the boundary every path shares).

    Examples
    --------
    >>> inp = prepare_attention(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 1)))
    >>> inp.batch, inp.n, inp.m, inp.dv, float(inp.tau)  # tau = sqrt(D)
    ((), 2, 4, 1, 1.7320508075688772)
    """
    return AttentionInputs(q, k, v, scale, mask, is_causal, causal_alignment, energy)


def attention(
    q,
    k,
    v,
    *,
    scale=None,
    mask=None,
    is_causal=False,
    causal_alignment="top_left",
    energy="dot",
    empty="zero",
    return_lse=False,
    return_responsibilities=False,
):
    """A1-A4: attention as explicit competition and posterior-mean summary.

    ``d_ij = energy(q_i, k_j)`` (A1; default ``-<q_i, k_j>``),
    ``r_ij = softmin_j(d_ij * scale)`` (A3; T1 with ``scale = 1/sqrt(D)``),
    ``a_i = sum_j r_ij v_j`` (A4).

    Parameters
    ----------
    q : array_like, float (B..., N, D)
    k : array_like, float (B..., M, D)
    v : array_like, float (B..., M, Dv)
    scale : float, optional
        Inverse temperature, default ``1/sqrt(D)``; ``0`` gives uniform weights.
        Must be finite and ``>= 0`` (the hard limit is :func:`hard_attention`).
    mask : array_like of bool, optional, broadcast to (B..., N, M)
        True = the key takes part.  Masked keys are removed by selection: NaN
        or inf in their keys or values cannot reach the output.
    is_causal : bool
    causal_alignment : {"top_left", "bottom_right"}
    energy : str or callable
        A kernel from :data:`iem_ref.energies.ENERGIES` (``"dot"``,
        ``"sqeuclidean"``, ``"laplace"``, ``"cosine"``, ``"student_t"``,
        ``"huber"``, ``"pseudo_huber"``) or ``f(q, k) -> d (B..., N, M)``.
    empty : {"zero", "nan"}
        Output of a query with no key to attend to (fully masked, or ``M = 0``):
        zeros (torch SDPA, FlashAttention) or NaN.  The log-partition is ``-inf``.
    return_lse : bool
        Also return the log-partition ``L_i = log sum_j exp(-d_ij * scale)``
        (FlashAttention's LSE of the scaled scores): what makes partial
        results mergeable (M2).
    return_responsibilities : bool
        Also return ``r (B..., N, M)`` (P1: the full posterior).

    Returns
    -------
    a : ndarray (B..., N, Dv)
        Output, in the inputs' common float dtype.
    lse : ndarray (B..., N), if ``return_lse``
    r : ndarray (B..., N, M), if ``return_responsibilities``

    Notes
    -----
    Accuracy (float64, ``u = 2**-53``, ``gamma_n = n u / (1 - n u)``): the
    computed energies are within ``eps_j = gamma_D sum_l |q_l k_jl|`` (dot) or
    ``gamma_{D+1} d_j`` (sqeuclidean); with ``t_j = (d_j - min d) scale`` the
    exponents are within ``eta_j = scale (eps_j + max_k eps_k) + gamma_1 t_j``
    (the ``fl(1/scale)`` rounding), so ``log r_j`` is within
    ``zeta_j = eta_j + sum_k r_k eta_k``; the softmin adds 3 ulps per weight and
    the matmul ``gamma_M``.  Hence, per output element,
    ``|a - a_exact| <= sum_j |v_j| r_j ((1 + 6u) expm1(zeta_j) + 6u)
    + gamma_M sum_j r_j e^{zeta_j} (1 + 6u) |v_j|``
    (tested against the exact tier in ``tests/test_accuracy.py``; the energies'
    matmul dominates, e.g. up to ~57 ulps of the output on N(0,1) inputs).

    Examples
    --------
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [0.0]])
    >>> attention(q, k, v, scale=np.log(3.0))  # r = (3/4, 1/4)
    array([[0.75]])
    """
    check_choice(empty, "empty", {"zero", "nan"})
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy)
    d = inp.energies()  # A1
    # A3 (T1: tau = 1/scale) and A4 in one softmin pass, with the log-partition
    a, lse, r = _softmin_summary(d, inp.v.astype(np.float64), inp.tau, inp.takes_part(), empty)
    out = [a.astype(inp.dtype)]
    if return_lse:
        out.append(np.asarray(lse, dtype=inp.dtype))
    if return_responsibilities:
        out.append(r.astype(inp.dtype))
    return out[0] if len(out) == 1 else tuple(out)


def attention_responsibilities(q, k, *, scale=None, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", empty="zero"):
    """T1 (and A3 for any kernel): ``r_ij = softmax_j(<q_i, k_j> * scale)``.

    Scaled dot-product attention weights are the softmin of the dot-product
    energies at temperature ``tau = 1/scale = sqrt(D)``.

    Examples
    --------
    >>> attention_responsibilities([[0.0, 0.0]], [[1.0, 2.0], [3.0, 4.0]])
    array([[0.5, 0.5]])
    """
    k = np.asarray(k)
    v = np.zeros(k.shape[:-1] + (0,))
    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy)
    r = responsibilities(inp.energies(), inp.tau, mask=inp.takes_part(), empty=empty)
    return r.astype(result_dtype(as_float_array(q, "q"), as_float_array(k, "k")))


def hard_attention(q, k, v, *, mask=None, is_causal=False, causal_alignment="top_left", energy="dot", ties="split", empty="zero", return_responsibilities=False):
    """H1: hard attention ``a_i = v_{argmin_j d_ij}``, the zero-temperature limit (H2).

    The output is the posterior mode of the values (P3); only the winners'
    values are read.

    The winner is the key of **lowest energy** (highest score ``<q, k>``).
    ``ties="split"`` averages the values of tied winners (the limit of soft
    attention as ``scale -> inf``); ``"first"`` takes the first (argmax
    convention).  No ``scale``: a positive scale does not change the argmin.

    Examples
    --------
    >>> hard_attention([[1.0]], [[1.0], [2.0]], [[10.0], [20.0]])
    array([[20.]])
    """
    inp = prepare_attention(q, k, v, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, scale=1.0)
    d = inp.energies()
    take = inp.takes_part()
    r = hard_responsibilities(d, mask=take, ties=ties, empty=empty)
    a = _weighted_sum(r, inp.v.astype(np.float64), r > 0)
    a = np.where(np.isnan(r).any(axis=-1, keepdims=True), np.nan, a)
    if empty == "nan":  # also when M = 0, where r has no entry to carry the NaN
        a = np.where((r > 0).any(axis=-1, keepdims=True), a, np.nan)
    if return_responsibilities:
        return a.astype(inp.dtype), r.astype(inp.dtype)
    return a.astype(inp.dtype)
