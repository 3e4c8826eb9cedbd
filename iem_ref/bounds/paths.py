"""What each path does: the reference, the CPU and CUDA kernels as :class:`Arithmetic` records (sections 4, 6-8).

4. The reference (float64)
--------------------------
Documented and tested accuracy of :mod:`iem_ref` for its own computed
energies (README "Accuracy", ``tests/test_accuracy.py``): ``r_j`` within
3 ulps (``6 u64`` relative: ``REFERENCE_R_ULPS``); ``L = -m/tau + log1p(s)``
within :func:`log_partition_error`: the division ``u64 |m/tau|``, ``log1p``'s
ulp ``2 u64 |log1p(s)|``, ``s`` to ``3 u64`` relative (its exps and sum;
``log1p`` passes at most that absolute), the addition ``u64 |L|``; with
``|log1p(s)| <= |L| + |m/tau|`` and ``|m/tau| <= max_j |x_j|``, at most
``3 u64 (max_j |x_j| + |L| + 1)`` (about ``2 + kappa`` ulps typically,
``kappa |L| = sum_j r_j |x_j|``, up to ``3 kappa + 4`` when ``L`` sits low in
its binade and the roundings add up); the output ``a = sum_j r_j v_j`` adds its matmul, ``gamma_M(u64)
sum_j r_j |v_j|`` (the Notes of :func:`iem_ref.attention`).  Its energies:
``gamma_D(u64) sum_c |q_c k_c|`` (dot, one matmul) or ``gamma_{D+2}(u64) |t|``
(squared Euclidean by its definition: a difference, a square, ``D - 1``
additions; ``t = -||q - k||^2 / 2``).  For float32 inputs it rounds its
float64 results once to float32 (``u |a|``, ``u |L|``).

6. One weight (forward)
-----------------------
``w_j = exp(x_j - m)``, ``m`` the row's running maximum.  Relative error
``e_j = score_j + u |x_j - m| + 2 p u``: the score (section 5, both sides:
a consistent perturbation of the reference's weights too); the subtraction
``x_j - m`` in the dtype (``u |x_j - m_t|`` with ``m_t <= m`` the maximum when
``j``'s tile ran) together with every later rescale argument ``m_old -
m_new`` (rounded in a precision ``<= u``): these telescope, ``|x_j - m_t| +
sum (m_new - m_old) = |x_j - m|``; the ``exp`` within ``p`` ulps
(``Arithmetic.exp_ulps``: CPU's polynomial 2, measured 1.016 (float64) and
1.105 (float32) ulps of the exact value; CUDA ``exp`` 1 ulp and ``expf``
2 ulps, CUDA C Programming Guide, "Mathematical Functions").
``E_i = max_j e_j`` over the keys that take part.

7. Rescalings
-------------
When the running maximum grows, the state accumulated so far (``o`` and
``l``) is multiplied by ``alpha = exp(m_old - m_new)``; ``alpha = 1`` (exact)
when it does not.  The rounded factor is the same float for ``o`` and ``l``:
a consistent relative perturbation ``delta`` of the weights that came
before, within ``2 p_s u_s`` (``Arithmetic.rescale_exp_ulps`` ulps of the
state precision ``u_s``: CPU libm ``exp`` in float64, 1 ulp; CUDA the
dtype's ``exp``, 2 ulps).  Perturbing the weights of a set ``P`` of keys
(responsibility ``rho``, mean ``a_P``) moves ``a`` by ``delta rho (1 - rho)
(a_P - a_rest) = delta sum_{j in P} r_j (v_j - a)``, at most ``delta min(V / 2,
W)`` (``V``, ``W`` of section 9), and ``L`` by at most ``delta``.  A weight sees at most ``R`` rescalings (:meth:`Arithmetic.rescales`):
one per key tile after its own, ``R = ceil(M / b) - 1`` (CPU: ``b = bk`` of
:func:`iem_ref.accel.cpu.plan`; the merges of key splits (M2) replace tiles,
since every split holds at least one tile; CUDA: ``b = BC``, the layout's
key tile, ``_cuda_kernels.LAYOUT["BC"]``: 32 on a GPU, 8 in the simulator;
its key splits for decoding hold whole tiles too, and their merge, in the
dtype, replaces tiles in the same way).
So ``rho_R = 2 R p_s u_s``.  The product ``alpha * state`` rounds too, once
for ``o`` and once for ``l``: counted with the sums (section 8).

8. Tiled sums
-------------
:meth:`Arithmetic.key_sum`, :meth:`Arithmetic.query_sum`,
:meth:`Arithmetic.column_sum` return the roundings ``(k_T, k_s)`` that one
term of a path's sum passes through in the dtype and in the state
precision; :func:`sum_bound` is ``G = gamma_{k_T}(u) + gamma_{k_s}(u_s)``.

* CPU: a tile of ``b`` terms in the dtype (a GEMM: ``b`` roundings, section 3;
  the 8-lane row sum of the weights: at most ``b - 1``), converted exactly to
  float64, then one float64 addition per later tile and, in the forward, one
  rescaling multiply: ``k_T = min(n, b)``, ``k_s = 2 (ceil(n/b) - 1)``
  (forward) or ``ceil(n/b) - 1`` (backward accumulators, no rescaling).
  Forward and backward tiles from ``plan``; the backward's sums over queries
  use its query blocks ``bq``.  ``sum_i dS_ij`` of the squared Euclidean
  ``dk`` is a float64 sum of ``N`` terms: ``k_s = N - 1``.
* CUDA: one accumulator in the dtype across all tiles: a product and ``n - 1``
  additions, and in the forward the ``ceil(n/BC) - 1`` rescaling multiplies:
  ``k_T = n + ceil(n/BC) - 1`` (forward), ``n`` (backward), ``n - 1`` for the
  plain column sum.
* the reference: ``gamma_n(u64)`` (any order, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import numpy as np

from .primitives import U64, gamma


@dataclass(frozen=True)
class Arithmetic:
    """The arithmetic of one path, as the bounds need it (sections 5-8).

    ``kind``: ``"cpu"``, ``"cuda"`` or ``"reference"``; ``exp_ulps``: the
    weights' ``exp`` in ulps of the dtype (section 6); ``rescale_exp_ulps``:
    the rescale factors' ``exp`` in ulps of the state precision (section 7);
    ``state_float64``: running maximum, sums and accumulators across tiles in
    float64 (CPU, reference) or in the dtype (CUDA); ``score_extra``: the
    ``c`` of section 5; ``expanded_sqeuclid``: the squared Euclidean score
    through one GEMM and two norms; ``tiles``: the path's own tile plan,
    ``(n_queries, n_keys, dtype, backward) -> (query block, key tile)``,
    read when a bound is formed (a kind ``"cuda"`` path uses its key tile
    only).  Each path describes itself: :func:`iem_ref.accel.cpu.arithmetic`,
    :func:`iem_ref.accel.cuda.arithmetic`; the bounds import nothing from
    the paths.
    """

    kind: str
    exp_ulps: float
    rescale_exp_ulps: float
    state_float64: bool
    score_extra: int
    expanded_sqeuclid: bool
    tiles: Callable | None = None

    @property
    def name(self):
        return self.kind

    def state_u(self, u):
        """The precision of the running state and the accumulators across tiles."""
        return U64 if self.state_float64 else float(u)

    def _cpu_tiles(self, n_queries, n_keys, dtype, backward):
        bq, bk = self.tiles(max(int(n_queries), 1), max(int(n_keys), 1), np.dtype(dtype), backward)
        return bq, bk

    def _cuda_tile(self):
        return int(self.tiles(1, 1, np.dtype(np.float64), False)[1])

    def rescales(self, n_keys, dtype, n_queries=1):
        """``R``: the most rescalings a weight sees in a row of ``n_keys`` keys (section 7)."""
        n_keys = int(n_keys)
        if self.kind == "reference" or n_keys <= 1:
            return 0
        width = self._cpu_tiles(n_queries, n_keys, dtype, False)[1] if self.kind == "cpu" else self._cuda_tile()
        return -(-n_keys // width) - 1

    def key_sum(self, n, dtype, n_queries=1, backward=False):
        """``(k_T, k_s)`` of a sum over ``n`` keys: ``o`` and ``l`` (forward) or ``dq`` (backward) (section 8)."""
        n = int(n)
        if n <= 0:
            return 0, 0
        if self.kind == "reference":
            return 0, n
        if self.kind == "cpu":
            bk = self._cpu_tiles(n_queries, n, dtype, backward)[1]
            steps = -(-n // bk) - 1
            return min(n, bk), (steps if backward else 2 * steps)
        return (n if backward else n + self.rescales(n, dtype)), 0

    def query_sum(self, n, dtype):
        """``(k_T, k_s)`` of a backward sum over ``n`` queries: ``dk``, ``dv`` (section 8)."""
        n = int(n)
        if n <= 0:
            return 0, 0
        if self.kind == "reference":
            return 0, n
        if self.kind == "cpu":
            bq = self._cpu_tiles(n, 1, dtype, True)[0]
            return min(n, bq), -(-n // bq) - 1
        return n, 0

    def column_sum(self, n, dtype):
        """``(k_T, k_s)`` of the plain sum ``sum_i dS_ij`` over ``n`` queries (squared Euclidean ``dk``; section 8)."""
        n = int(n)
        if n <= 1:
            return 0, 0
        if self.kind == "cuda":
            return n - 1, 0
        return 0, n - 1


#: the float64 reference, for its own sums (section 8); its other terms are section 4's
REFERENCE = Arithmetic("reference", exp_ulps=0, rescale_exp_ulps=0, state_float64=True, score_extra=2, expanded_sqeuclid=False)


def sum_bound(path, roundings, u):
    """``G = gamma_{k_T}(u) + gamma_{k_s}(u_s)`` for ``roundings = (k_T, k_s)`` of ``path`` in a dtype of unit roundoff ``u``."""
    k_T, k_s = roundings
    return gamma(k_T, u) + gamma(k_s, path.state_u(u))
