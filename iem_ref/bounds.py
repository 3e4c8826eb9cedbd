"""Floating-point error bounds, derived once: the primitives and the accelerated paths' attention bounds.

Every tolerance of the agreement tests (an accelerated path against the
reference), of :mod:`iem_ref.testing` and of :mod:`iem_ref.checks` is built
from the terms below.  Each term is a count of roundings, or a documented
accuracy, with the reason next to it.  The bounds are first order in the
unit roundoff (products of two error terms are dropped), as is usual for
bounds evaluated on the computed or reference values.

1. Unit roundoff
----------------
``u = eps / 2`` of a dtype (:func:`unit_roundoff`): ``2**-24`` for float32,
``2**-53`` for float64 (``U32``, ``U64``).  A correctly rounded operation
returns ``x (1 + delta)``, ``|delta| <= u``.  A result within ``k`` ulps of
a normal value ``y`` is within ``2 k u |y|``: an ulp of ``y`` is at most
``2 u |y|`` (:func:`ulps`).

2. gamma_n
----------
``gamma_n = n u / (1 - n u)`` (:func:`gamma`; Higham, *Accuracy and
Stability of Numerical Algorithms*, Lemma 3.1): a product of ``n`` factors
``(1 + delta_k)^(+-1)``, ``|delta_k| <= u``, is ``1 + theta`` with
``|theta| <= gamma_n``.  So a value that passes through ``n`` roundings is
within ``gamma_n`` relative; roundings in two precisions add
(``gamma_n(u) + gamma_k(u64)``).

3. Sums and dot products
------------------------
In any summation order each of ``n`` terms passes through at most ``n - 1``
additions (the depth of a leaf in any binary tree of ``n`` leaves; an
addition of an exact zero does not round): ``|s^ - s| <= gamma_{n-1} sum
|t_j|``.  A dot product of length ``n`` rounds each product once more:
``gamma_n sum |x_j y_j|`` (BLAS GEMM/GEMV included, whatever their blocking;
a fused multiply-add only removes roundings).  A pairwise (tree) sum has
depth ``ceil(log2 n)`` (:func:`tree_depth`, the ``lg`` of
:mod:`iem_ref.testing`); the squared magnitudes its roundings multiply, for
the probabilistic bounds of section 13, add to at most
:func:`tree_squares`.

3b. Gradual underflow
--------------------
The relative model above holds for normal results.  A result in the
subnormal range is rounded to a multiple of ``eta``, the dtype's smallest
subnormal (``2**-149`` in float32, ``2**-1074`` in float64), so each
rounding may add ``eta / 2`` absolute besides its relative ``u``
(Higham, section 2.1).  The backward forms each gradient element through a
chain of at most ``M + N g + D + Dv + 8`` roundings (the exponential, the
two dot products, the tile sums, the final scale and store) whose factors
are at most ``F = (1 + scale) prod (1 + max |x|)`` over ``q, k, v`` and the
upstream gradient; :func:`underflow` adds ``n eta F`` per side to every
gradient bound.  Negligible next to every relative term unless the
gradient itself is subnormal (far keys under ALiBi, say, whose weights
underflow in float32).

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

9. Forward bounds
-----------------
Per output element, with the reference's ``r``: ``P = sum_j r_j |v_j|``,
``W = sum_j r_j |v_j - a|`` and ``V = max_j |v_j|`` (that column).  To first
order ``o = sum_j w_j (1 + e_j)(1 + g_j) v_j``, ``l = sum_j w_j (1 + e_j)(1 +
g'_j)`` (``|e_j| <= E``, ``|g|, |g'| <= G``), so ``a^ - a = sum_j r_j e_j (v_j -
a) + sum_j r_j g_j v_j - a sum_j r_j g'_j`` and ``|a^ - a| <= E W + G (P +
|a|) + rho_R min(V / 2, W) + out |a|`` (``E W`` in its form valid for any
``E``, ``min(W expm1(E) e^E, H)`` with ``H = max_j |v_j - a|`` over the
participating keys: :func:`_weight_term`) with ``out`` the division and the
output rounding (CPU: float64 division ``u64``, then the dtype ``u`` if
float32; CUDA: the division in the dtype, ``u``).  ``L = m + log l``:
``|L^ - L| <= E + G + rho_R + 2 u_s log M + (u_s + store) |L|`` (``l`` in
``[1, M]``: the ``log`` within 1 ulp, the addition, and for the CPU's
float32 the rounding of the float64 ``L``).  The comparison with the
reference adds its own error (section 4: ``(6 u64 + gamma_M(u64)) P`` and
``4 u64 |L| + 2 u64 max|x|``, plus its float32 rounding); its score error is
already in ``E``.  A sink (V5) is one more key of exact score and value 0,
merged after the tiles as one more partial: one more rescale in ``rho`` and
two more roundings (a product and a sum) in the state precision in ``G``.
:func:`forward_bounds`, :func:`attention_bounds`.

10. Backward bounds (G4)
------------------------
Each side (the path and the reference) against the exact gradient, summed
(:func:`attention_vjp_bounds`); evaluated with the reference's ``r``, ``b``,
``dS``.

* ``r_ij = exp(x_ij - L_i)`` from the saved ``L``: relative ``phi_ij =
  score_ij + |dL_i| + u |x_ij - L_i| + 2 p u`` (the path's score, the path's
  forward bound on ``L``, the subtraction, the ``exp``); the reference:
  ``score_ij + 6 u64`` (its ``r`` within 3 ulps).
* ``b_ij = <u_i, v_j>``: ``gamma_Dv sum_c |u_ic v_jc|``.
* ``Delta_i = <u_i, a_i>``: ``sum_c |u_ic| (da_ic + gamma_Dv |a_ic|)`` with
  ``da`` the path's forward bound on ``a`` (the CPU forms it in float64 and
  rounds it to the dtype: ``gamma_Dv(u64) + u <= gamma_Dv(u)``); the reference
  forms it the same way from its own ``a = sum_j r_ij v_j``: ``sum_j r_ij
  (phi_ij + gamma_M + gamma_Dv) B_ij`` with ``B_ij = sum_c |u_ic v_jc|``
  (``|a_c| <= sum_j r_ij |v_jc|``).
* ``dS_ij = r_ij (b_ij - Delta_i)``: ``|ddS| <= r (phi |b - Delta| + db +
  dDelta) + 2u |dS|`` (the subtraction and the product).  These are first
  order in ``phi``.  A row with ``phi_ij > 1/2`` at a key it weighs (huge
  entries, or the expanded squared distance's cancellation in float32,
  where a score's rounding exceeds the scores' spread) is bounded without
  them: each weight it takes part with lies in ``[0, 1]``, so ``|ddS| <= |b|
  + db + |Delta| + dDelta + |dS|`` and ``|dr| <= 1`` for ``dv``.  Pairs of
  weight 0 add no error.
* ``dq_i = scale sum_j dS_ij k_j``: ``scale sum_j (ddS_ij + G |dS_ij|) |k_j|``
  with ``G`` the sum over keys (section 8), plus ``(u_scale + u_s + store)
  |dq|`` (the scale, the product in the state precision, the rounding to
  the dtype); ``dk_j = scale sum_i dS_ij q_i`` alike over queries; for the
  squared Euclidean energy ``dk_j -= scale k_j sum_i dS_ij``: two products
  and the subtraction, ``(u_scale + u_s) scale |A| + (u_scale + 2 u_s) scale
  |k| |C| + (u_s + store) |dk|`` with ``A = sum_i dS_ij q_i``, ``C = sum_i
  dS_ij`` and ``C``'s own sum bound; ``dv_j = sum_i r_ij u_i``: ``sum_i (phi_ij
  + G) r_ij |u_i| + store |dv|``.  The reference: the same with ``u64``,
  ``gamma_n(u64)`` sums, ``u_scale = u64`` (its ``fl(1/tau)``) and its float32
  rounding as ``store``.
* Grouped-query heads (V6): every term is formed per query head (keys and
  values repeated over the group) and the bounds of ``dk``, ``dv`` are then
  summed over the group.  A key's sums run over the ``N g`` query rows of
  its group: the CPU and CUDA stack them into one problem (the tiles are
  planned for ``N g`` rows, forward and backward), the reference sums in
  float64; so ``G`` is the bound of a sum over ``N g`` terms.  The
  per-result terms (the scale, the rounding to the dtype) use the per-head
  magnitudes ``|dk_h|``, ``|dv_h|``, whose group sum is at least ``|dk|``,
  ``|dv|``.
* Sinks (V5): ``r`` sums to ``1 - r_sink`` over the keys and ``C_i = sum_j
  dS_ij = Delta_i r_sink,i = -dsink_i``.  The paths form ``r_sink = exp(sink
  - L)`` in float64 from their saved ``L``: relative ``|dL| + u64 |sink - L|
  + 2 u64``; so ``|dC_i| <= r_sink (phi_s |Delta_i| + dDelta_i) + u64 |C_i|``
  (the reference: its ``r_sink`` within its ulps, its ``Delta``).  ``dsinks``
  sums the rows' bounds in float64 (``gamma_n(u64)`` per side) and rounds
  once to the dtype (per side).  The squared-Euclidean ``dq_i`` subtracts
  ``scale q_i C_i``: ``scale |q_i| |dC_i|`` and the products and subtraction
  as ``dk``'s, one more rounding for CUDA's ``C`` in the dtype; the
  reference sums its own ``dS`` over the keys (``sum_j |ddS_ij| +
  gamma_M(u64) sum_j |dS_ij|``).
* The variants (V1-V3, V8): the path's ``phi`` takes section 11's logit
  error in place of the score error, and its shift is on the logits
  ``z``; ``dS`` is ``dZ``.  A soft-cap gives ``dX = dZ f``,
  ``f = 1 - (s/c)^2 <= 1``, within ``|ddZ| + |dZ| (2 eta / c + 3 u)`` (the
  factor from the path's ``x``, rounded, and the product), and ``dX``
  replaces ``dS`` in ``dq, dk`` and in the squared-Euclidean row sums,
  which the path sums in float64.  Dropout's ``c = keep / (1 - p)``: ``b =
  c <u, v>`` within ``c db + 2 u |b|`` (``c``'s rounding and the product)
  and ``dv_j = sum_i r_ij c_ij u_i`` with ``2 u`` more per term.  ``dbias``
  is the path's ``dZ`` summed over the broadcast entries in float64
  (``sum ddZ + gamma_n(u64) sum |dZ|``) and rounded once.  The reference's
  side is then section 12's bound (its formulas in float64) plus its
  rounding to the dtype.

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

12. Backward of the variants, float64 by the formulas (G4, G6)
--------------------------------------------------------------
:func:`variant_vjp_error` bounds ``|g^ - g|`` for a float64 implementation
of :func:`iem_ref.attention_vjp`'s formulas (the reference; torch autograd
through the same composition; two of them differ by at most twice it).
With ``P`` the responsibilities (sink last), ``eta`` the logits' error
(sections 5, 11, ``u = u64``), ``c = keep / (1 - p)``:

* ``P_ij`` relative ``phi_ij = eta_ij + sum_k P_ik eta_ik + 6 u`` (section 4,
  the logits' perturbation passed through the softmax);
* ``b_ij = c_ij <u_i, v_j>``: ``db = gamma_{Dv+1} c sum |u v|``;
  ``Delta_i = <u_i, a_i>`` with ``a_i = sum_j P_ij c_ij v_j``: ``sum_j P_ij
  (phi_ij + gamma_M + gamma_Dv) c_ij sum_c |u_ic v_jc|``;
* ``dZ_ij = P_ij (b_ij - Delta_i)``: ``P (phi |b - Delta| + db + dDelta) +
  2 u |dZ|``; with a soft-cap ``dX = dZ (1 - (s/c)^2)``: ``+ |dZ| (2 eta / c
  + 3 u)`` (``|s/c| <= 1``, ``s`` within ``eta``);
* ``dq_i = scale sum_j dX_ij k_j``: ``scale sum_j (ddX_ij + gamma_M |dX_ij|)
  |k_j| + 2 u |dq_i|``, and for the squared Euclidean energy with sinks or a
  soft-cap ``scale |q_i| (sum_j ddX_ij + gamma_M sum_j |dX_ij|)``; ``dk`` alike
  over the ``N g`` query rows that read it (``g`` the group of V6); ``dv_j =
  sum_i P_ij c_ij u_i``: ``sum_i (phi_ij + gamma_{N g}) P c |u_i|``;
* ``dbias``: ``sum (ddZ + gamma_n |dZ|)`` over the ``n`` broadcast entries
  each element sums; ``dsinks = -sum_i P_i,sink Delta_i``:
  ``sum_i P_sink (phi_sink |Delta_i| + dDelta_i) + gamma_n sum_i |P_sink Delta_i|``.

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
  maximum (``t_j = |x_j - m|``), the ``exp`` (``2 p``, ``p = exp_ulps``)
  and the variants' steps (section 11);
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

Each is an :class:`ErrorTerms` bounded as in section 13.

Examples
--------
>>> from iem_ref.bounds import gamma, unit_roundoff, tree_depth
>>> unit_roundoff(np.float32) == 2.0**-24, unit_roundoff(np.float64) == 2.0**-53
(True, True)
>>> float(gamma(1, 2.0**-53)) == 2.0**-53 / (1 - 2.0**-53)
True
>>> tree_depth(1000)
10
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "U32",
    "U64",
    "REFERENCE_R_ULPS",
    "unit_roundoff",
    "gamma",
    "ulps",
    "tree_depth",
    "log_partition_error",
    "tree_squares",
    "scale_rounding",
    "Arithmetic",
    "CPU",
    "CUDA",
    "REFERENCE",
    "cpu",
    "cuda",
    "sum_bound",
    "score_form",
    "score_sizes",
    "score_squares",
    "score_error",
    "ForwardBounds",
    "forward_bounds",
    "attention_bounds",
    "attention_vjp_bounds",
    "logit_error",
    "variant_vjp_error",
    "merge_bounds",
    "LAMBDA",
    "ErrorTerms",
    "kernel_forward_bounds",
    "kernel_vjp_bounds",
]

#: float32 / float64 unit roundoff (section 1)
U32 = float(np.finfo(np.float32).eps) / 2
U64 = float(np.finfo(np.float64).eps) / 2
#: the reference's responsibilities are within this many float64 ulps (section 4)
REFERENCE_R_ULPS = 3


# --- 1-3: primitives ---------------------------------------------------------------
def unit_roundoff(dtype):
    """``u = eps / 2`` of a float dtype (section 1).

    Examples
    --------
    >>> unit_roundoff(np.float32)
    5.960464477539063e-08
    """
    from .precision import unit_roundoff as low

    return low(dtype)


def gamma(n, u):
    """``gamma_n = n u / (1 - n u)``: the relative error of ``n`` roundings of unit roundoff ``u`` (section 2).

    ``n`` may be an array (non-negative); ``n u >= 1`` has no bound and raises.

    Examples
    --------
    >>> float(gamma(0, 2.0**-24)), float(gamma(2, 0.25))
    (0.0, 1.0)
    """
    n = np.asarray(n, dtype=np.float64)
    u = float(u)
    if np.any(n < 0):
        raise ValueError(f"gamma_n needs n >= 0; got {n}")
    nu = n * u
    if np.any(nu >= 1):
        raise ValueError(f"gamma_n is defined for n u < 1 only; got n u = {np.max(nu)}")
    out = nu / (1 - nu)
    return out[()] if out.ndim == 0 else out


def underflow(dtype, roundings, factor):
    """Section 3b: the absolute error ``roundings * eta * factor`` that gradual underflow may add (``eta`` the dtype's smallest subnormal).

    Examples
    --------
    >>> float(underflow(np.float32, 10, 2.0)) == 20 * 2.0**-149
    True
    """
    return float(roundings) * float(np.finfo(np.dtype(dtype)).smallest_subnormal) * float(factor)


def ulps(k, u):
    """The relative error of a normal result within ``k`` ulps: ``2 k u`` (an ulp of ``y`` is at most ``2 u |y|``).

    Examples
    --------
    >>> ulps(3, U64) == 6 * U64
    True
    """
    return 2.0 * k * float(u)


def log_partition_error(L, shift):
    """Section 4: the float64 reference's ``|L^ - L|`` for ``L = -m/tau + log1p(s)``, ``|m/tau| <= shift``.

    ``3 u64 (shift + |L| + 1)`` (the division, ``log1p``'s ulp, the sum ``s``, the addition).

    Examples
    --------
    >>> bool(log_partition_error(0.0, 1.0) == 6 * U64)
    True
    """
    return 3.0 * U64 * (np.abs(shift) + np.abs(L) + 1.0)


def tree_depth(n):
    """``ceil(log2 n)`` (0 for ``n <= 1``): the roundings of one term in a pairwise sum of ``n`` terms (section 3).

    Examples
    --------
    >>> [tree_depth(n) for n in (0, 1, 2, 3, 8, 9)]
    [0, 0, 1, 2, 3, 4]
    """
    n = int(n)
    return (n - 1).bit_length() if n > 1 else 0


def tree_squares(S, Q, n, total=None):
    """``sum_l min(S^2, 2^l Q)`` over the ``tree_depth(n) + 1`` levels of a pairwise sum (section 3).

    The probabilistic bounds need, for a sum of ``n`` terms ``y_c`` in a tree
    of depth ``lg = tree_depth(n)``, the sum of the squared magnitudes that
    its roundings multiply: the terms themselves (level 0, ``Q = sum y_c^2``)
    and the partial sums of each level ``l``.  The nodes of a level are
    disjoint and hold at most ``2^l`` terms, so by Cauchy-Schwarz their
    squared sums add to at most ``min(S^2, 2^l Q)`` (``S = sum |y_c|``): any
    tree of that depth, any order inside it.  The last level is the sum
    itself: given its magnitude ``total``, it counts ``total^2``.  ``S``,
    ``Q`` and ``total`` broadcast.

    Examples
    --------
    >>> float(tree_squares(8.0, 8.0, 8))  # eight ones: 8 + 16 + 32 + 64
    120.0
    >>> float(tree_squares(8.0, 8.0, 8, total=0.0))  # four ones and four minus ones
    56.0
    """
    S2 = np.asarray(S, np.float64) ** 2
    Q = np.asarray(Q, np.float64)
    lg = tree_depth(n)
    last = np.minimum(S2, 2.0**lg * Q) if total is None else np.square(np.asarray(total, np.float64))
    return sum((np.minimum(S2, 2.0**level * Q) for level in range(lg)), last)


def scale_rounding(u):
    """``u_scale``: the paths' scale against the reference's ``1/tau`` (section 5): ``u64``, plus ``u`` below float64.

    Examples
    --------
    >>> scale_rounding(U64) == U64, scale_rounding(U32) == U32 + U64
    (True, True)
    """
    u = float(u)
    return U64 + (u if u > U64 else 0.0)


def _store(u, u_state):
    """The rounding of a result formed in the state precision to the dtype (0 when they are the same)."""
    return float(u) if u_state < u else 0.0


# --- 6-8: what each path does ----------------------------------------------------------
@dataclass(frozen=True)
class Arithmetic:
    """The arithmetic of one path, as the bounds need it (sections 5-8).

    ``kind``: ``"cpu"``, ``"cuda"`` or ``"reference"``; ``exp_ulps``: the
    weights' ``exp`` in ulps of the dtype (section 6); ``rescale_exp_ulps``:
    the rescale factors' ``exp`` in ulps of the state precision (section 7);
    ``state_float64``: running maximum, sums and accumulators across tiles in
    float64 (CPU, reference) or in the dtype (CUDA); ``score_extra``: the
    ``c`` of section 5; ``expanded_sqeuclid``: the squared Euclidean score
    through one GEMM and two norms; ``tile_width``: CUDA's key tile ``BC``
    (``None``: the current layout's, read when a bound is formed).
    """

    kind: str
    exp_ulps: float
    rescale_exp_ulps: float
    state_float64: bool
    score_extra: int
    expanded_sqeuclid: bool
    tile_width: int | None = None

    @property
    def name(self):
        return self.kind

    def state_u(self, u):
        """The precision of the running state and the accumulators across tiles."""
        return U64 if self.state_float64 else float(u)

    def _cpu_tiles(self, n_queries, n_keys, dtype, backward):
        from .accel.cpu import plan  # imports Numba: only when a CPU bound is formed

        bq, bk, _ = plan(1, max(int(n_queries), 1), max(int(n_keys), 1), np.dtype(dtype), backward=backward)
        return bq, bk

    def _cuda_tile(self):
        if self.tile_width is not None:
            return int(self.tile_width)
        from .accel import _cuda_kernels  # imports numba.cuda: only when a CUDA bound is formed

        return int(_cuda_kernels.LAYOUT["BC"])

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


#: the CPU path (:mod:`iem_ref.accel.cpu`)
CPU = Arithmetic("cpu", exp_ulps=2, rescale_exp_ulps=1, state_float64=True, score_extra=3, expanded_sqeuclid=True)
#: the CUDA path (:mod:`iem_ref.accel.cuda`), with the current layout's key tile
CUDA = Arithmetic("cuda", exp_ulps=2, rescale_exp_ulps=2, state_float64=False, score_extra=2, expanded_sqeuclid=False)
#: the float64 reference, for its own sums (section 8); its other terms are section 4's
REFERENCE = Arithmetic("reference", exp_ulps=0, rescale_exp_ulps=0, state_float64=True, score_extra=2, expanded_sqeuclid=False)


def cpu():
    """The CPU path's :class:`Arithmetic` (tiles from :func:`iem_ref.accel.cpu.plan`)."""
    return CPU


def cuda(layout=None):
    """The CUDA path's :class:`Arithmetic`; ``layout`` a name of ``_cuda_kernels.LAYOUTS`` (default: the current one)."""
    if layout is None:
        return CUDA
    from .accel import _cuda_kernels

    return Arithmetic("cuda", 2, 2, False, 2, False, tile_width=_cuda_kernels.LAYOUTS[layout]["BC"])


def sum_bound(path, roundings, u):
    """``G = gamma_{k_T}(u) + gamma_{k_s}(u_s)`` for ``roundings = (k_T, k_s)`` of ``path`` in a dtype of unit roundoff ``u``."""
    k_T, k_s = roundings
    return gamma(k_T, u) + gamma(k_s, path.state_u(u))


# --- 5: scores ------------------------------------------------------------------------
def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def score_form(energy):
    """The :class:`~iem_ref.energies.ScoreTerms` of ``energy`` (its record's ``score``); a ``ValueError`` naming it where no bound is derived (never another's)."""
    from .energies import ENERGY_RECORDS, energy_of

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


# --- 9: forward -------------------------------------------------------------------------
@dataclass
class ForwardBounds:
    """Bounds of one forward (section 9).

    ``a (B..., N, Dv)`` and ``L (B..., N)`` bound ``|path - reference|``;
    ``a_path`` and ``L_path`` the path's part (``|path - exact|``), which the
    backward uses; ``E (B..., N)`` the weight term.
    """

    a: np.ndarray
    L: np.ndarray
    a_path: np.ndarray
    L_path: np.ndarray
    E: np.ndarray


def _spreads(x, part, v, a_ref, c=None):
    """``(P, W, V)`` of section 9, ``(B..., N, Dv)``: ``sum_j r_j |v_j|``, ``sum_j r_j |v_j - a|``, ``max_j |v_j|``.

    ``r`` the responsibilities of the scores ``x`` over the pairs ``part``; one value column at a time
    (memory ``O(B N M)``).  ``c (B..., N, M)``: per-pair factors of the values (dropout, V8: the mean
    is ``sum_j r_j c_j v_j``, a dropped pair a value 0 that still shares the normaliser).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.where(part, x, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
        w = np.where(part, np.exp(np.where(part, x - np.where(np.isfinite(m), m, 0.0), -np.inf)), 0.0)
    total = w.sum(-1, keepdims=True)
    r = w / np.where(total > 0, total, 1.0)
    v = _finite(np.asarray(v, np.float64))
    a = _finite(np.asarray(a_ref, np.float64))
    f = 1.0 if c is None else c
    P = (r * f) @ np.abs(v)
    cols = range(v.shape[-1])
    W = np.stack([(r * np.abs(f * v[..., None, :, k] - a[..., :, k, None])).sum(-1) for k in cols], axis=-1) if cols else np.zeros(P.shape)
    # H: the farthest participating value from a; any convex combination of the values is within it
    H = np.stack([np.where(part, np.abs(f * v[..., None, :, k] - a[..., :, k, None]), 0.0).max(-1, initial=0.0) for k in cols],
                 axis=-1) if cols else np.zeros(P.shape)
    V = np.abs(v).max(axis=-2, keepdims=True, initial=0.0) * np.max(f)
    shape = np.broadcast_shapes(P.shape, W.shape, a.shape)
    return (np.broadcast_to(P, shape), np.broadcast_to(W, shape), np.broadcast_to(V, v.shape[:-2] + (1, v.shape[-1])),
            np.broadcast_to(H, shape))


def _weight_term(E, W, H):
    """The weights' part of section 9, ``E W`` to first order, valid for any ``E``: ``min(W expm1(E) e^E, H)``.

    Weights ``w_j f_j`` with ``|log f_j| <= E`` move ``a`` by ``|sum_j r_j (f_j - 1)(v_j - a)| / sum_j r_j f_j
    <= W expm1(E) e^E``; and both results are convex combinations of the participating values, so within
    ``H = max_j |v_j - a|`` of each other whatever ``E`` (a score error beyond ``1``, e.g. float32 scores
    of size ``1e29``, leaves nothing else).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        first = W * (np.expm1(E) * np.exp(E))[..., None]
    return np.minimum(np.where(np.isnan(first), np.inf, first), H)


def forward_bounds(path, dtype, x, S, scale, D, v, a_ref, L_ref, take=None, rows=None, merges=0, eta=None, c=None):
    """Section 9 for scores ``x (B..., N, M)`` (float64, the reference's), sizes ``S`` and values ``v (B..., M, Dv)``.

    ``take`` (broadcast to ``x``; None = all) marks the pairs that take part;
    ``a_ref``, ``L_ref`` the reference's results (their magnitudes enter the
    bound); ``rows``: the query rows the path plans its tiles for (``N g``
    with grouped-query heads; default ``N``); ``merges``: partials merged
    into each row after its key tiles (1 for a sink, V5: one more rescale,
    one multiply and one addition in the state precision); ``eta``: with the
    logits' variants (V1-V3, section 11) ``x`` holds the logits ``z`` and
    ``eta = (path's, reference's)`` their errors, in place of section 5's;
    ``c``: dropout's per-pair factors (V8, ``keep / (1 - p)``): the values
    of each pair are ``c v_j`` and each side divides its mean by ``1 - p``
    once more (``u |a|``).
    """
    u = unit_roundoff(dtype)
    us = path.state_u(u)
    store = _store(u, us)
    x = np.asarray(x, np.float64)
    N, M = x.shape[-2], x.shape[-1]
    N = N if rows is None else int(rows)
    part = np.isfinite(x) if take is None else np.broadcast_to(take, x.shape) & np.isfinite(x)
    xs = np.where(part, x, -np.inf)
    m = xs.max(axis=-1, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    sig_path, sig_ref = score_error(path, u, np.asarray(S, np.float64), x, scale, D) if eta is None else eta
    shift = u * np.abs(_finite(x - m[..., None]))
    exp_term = ulps(path.exp_ulps, u)
    E_path = np.where(part, sig_path + shift, 0.0).max(axis=-1, initial=0.0) + exp_term
    E = np.where(part, sig_path + sig_ref + shift, 0.0).max(axis=-1, initial=0.0) + exp_term
    rho = (path.rescales(M, dtype, N) + merges) * ulps(path.rescale_exp_ulps, us)
    k_T, k_s = path.key_sum(M, dtype, N)
    G = sum_bound(path, (k_T, k_s + 2 * merges), u)
    # rows with scores +inf (energies -inf): those keys share the mass equally (weights exactly 1)
    cert = np.isposinf(x) if take is None else np.broadcast_to(take, x.shape) & np.isposinf(x)
    has_cert = cert.any(axis=-1, keepdims=True)
    Pv, W, V, H = _spreads(np.where(cert, 0.0, x), np.where(has_cert, cert, part), v, a_ref, c)
    A = np.abs(_finite(np.asarray(a_ref, np.float64)))
    La = np.abs(_finite(np.asarray(L_ref, np.float64)))
    xmax = np.abs(np.where(part, x, 0.0)).max(axis=-1, initial=0.0)
    out_ref = u if u > U64 else 0.0  # the reference's float32 rounding of its float64 results
    moved = rho * np.minimum(0.5 * V, W)  # the rescale factors (section 7)
    drop = 0.0 if c is None else u  # the division by 1 - p (V8)
    a_path = _weight_term(E_path, W, H) + G * (Pv + A) + moved + (us + store + drop) * A
    ref_own = (ulps(REFERENCE_R_ULPS, U64) + gamma(M, U64)) * Pv + (0.0 if c is None else U64) * A
    a = _weight_term(E, W, H) + G * (Pv + A) + moved + ref_own + (us + store + out_ref + drop) * A
    log_term = 2 * us * math.log(max(M, 1))
    L_path = E_path + G + rho + log_term + (us + store) * La
    L = E + G + rho + log_term + (us + store) * La + log_partition_error(La, xmax) + out_ref * La
    return ForwardBounds(a=a, L=L, a_path=a_path, L_path=L_path, E=E)


def _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, **variants):
    from .attention import prepare_attention

    inp = prepare_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment,
                            energy=energy, **variants)
    sc = 0.0 if math.isinf(inp.tau) else 1.0 / inp.tau  # the reference's scale (section 5)
    with np.errstate(invalid="ignore"):
        x = -inp.energies() * sc
    take = inp.takes_part()
    S = score_sizes(inp.q, inp.k, energy, path.expanded_sqeuclid)
    return inp, sc, x, take, S


def attention_bounds(path, q, k, v, dtype=None, *, scale=None, energy="dot", mask=None, is_causal=False, causal_alignment="top_left",
                     bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False, sinks=None, cu_seqlens_q=None,
                     cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None):
    """The reference's ``(a, L)`` for ``attention`` and :class:`ForwardBounds` of ``path`` against it (finite inputs).

    Examples
    --------
    >>> q = np.array([[1.0, 0.0]]); k = np.eye(2); v = np.array([[1.0], [3.0]])
    >>> a_ref, L_ref, b = attention_bounds(REFERENCE, q, k, v, np.float64)
    >>> bool(b.a.max() < 1e-13)
    True
    """
    from .attention import attention

    variants = dict(bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, window=window, enable_gqa=enable_gqa, sinks=sinks,
                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, dropout_mask=dropout_mask)
    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, **variants)
    a_ref, L_ref = attention(q, k, v, return_lse=True, **kw)
    dtype = np.dtype(a_ref.dtype if dtype is None else dtype)
    inp, sc, x, take, S = _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, **variants)
    D = np.shape(q)[-1]
    vals = np.broadcast_to(inp.v, inp.batch + inp.v.shape[-2:])
    x, eta = _logits(path, dtype, inp, x, S, sc, D)
    if inp.sinks is not None:  # V5: the sink as one more key of exact score and value 0, merged after the tiles
        x, S, take, vals = _with_sink_column(inp, x, S, take, vals)
        if eta is not None:
            eta = tuple(np.concatenate([np.broadcast_to(e, inp.batch + e.shape[-2:]), np.zeros(inp.batch + (inp.n, 1))], axis=-1)
                        for e in eta)  # the sink's logit is exact
    c = None
    if inp.keep is not None:  # V8: the values of each pair times keep / (1 - p); the sink's column (value 0) kept at 0
        c = np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
        if inp.sinks is not None:
            c = np.concatenate([c, np.zeros(inp.batch + (inp.n, 1))], axis=-1)
    return a_ref, L_ref, forward_bounds(path, dtype, x, S, sc, D, vals, a_ref, L_ref, take, rows=inp.n * inp.group,
                                        merges=int(inp.sinks is not None), eta=eta, c=c)


def _has_logits(inp):
    """True when V1-V3 turn the scores into other logits (section 11)."""
    return inp.bias is not None or inp.slopes is not None or inp.softcap is not None


def _logits(path, dtype, inp, x, S, scale, D):
    """The logits ``z`` of the inputs and ``(path's, reference's)`` errors of section 11; ``(x, None)`` without V1-V3."""
    if not _has_logits(inp):
        return x, None
    from .attention import Competition

    comp = Competition(inp)
    u = unit_roundoff(dtype)
    sig_path, sig_ref = score_error(path, u, np.asarray(S, np.float64), x, scale, D)
    z = -comp.e[..., : inp.m]
    return z, (logit_error(comp, sig_path, u), logit_error(comp, sig_ref, U64))


def _with_sink_column(inp, x, S, take, v):
    """Section 9's inputs with the sink (V5) as a last key: its score (exact, ``S = 0``), participation and value 0."""
    rows = inp.batch + (inp.n, 1)
    x = np.concatenate([np.broadcast_to(x, inp.batch + x.shape[-2:]), np.broadcast_to(inp.sinks[..., None, None], rows)], axis=-1)
    S = np.concatenate([np.broadcast_to(S, inp.batch + np.shape(S)[-2:]), np.zeros(rows)], axis=-1)
    if take is not None:
        take = np.concatenate([np.broadcast_to(take, inp.batch + take.shape[-2:]), np.ones(rows, bool)], axis=-1)
    v = np.concatenate([v, np.zeros(inp.batch + (1, v.shape[-1]))], axis=-2)
    return x, S, take, v


# --- 10: backward ------------------------------------------------------------------------
def _weighted(r, err):
    """``r * err`` where ``r > 0``, else 0: a pair of zero weight adds no error, even where ``err`` overflowed to inf."""
    with np.errstate(invalid="ignore"):
        return np.where(r > 0, r * err, 0.0)


def _side_vjp(side, u, dtype, ctx, L_err=None, a_err=None):
    """One side's bound on ``(dq, dk, dv)`` against the exact gradient (section 10).

    ``side``: a path (with its forward bounds ``L_err``, ``a_err``) or :data:`REFERENCE`; ``u`` its unit
    roundoff; ``ctx`` the reference's quantities of :func:`attention_vjp_bounds`.
    """
    c = ctx
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    us = side.state_u(u)
    sig_path, sig_ref = score_error(side, u, c["S"], c["x"], c["scale"], c["D"])
    if c["comp"] is not None:  # V1-V3: the logits' errors (section 11)
        sig_path, sig_ref = logit_error(c["comp"], sig_path, u), logit_error(c["comp"], sig_ref, U64)
    if side.kind == "reference":
        phi = sig_ref + ulps(REFERENCE_R_ULPS, U64)  # its r within 3 ulps of its energies' r
        u_scale = U64  # its fl(1/tau)
        store = c["u"] if c["u"] > U64 else 0.0  # its float32 rounding of the float64 gradients
    else:
        with np.errstate(invalid="ignore"):
            shift = u * np.abs(_finite(c["z"] - c["L"][..., None]))
        phi = sig_path + L_err[..., None] + shift + ulps(side.exp_ulps, u)
        u_scale = scale_rounding(u)
        store = _store(u, us)
    r, b, delta, dS = c["r"], c["b"], c["delta"], c["dS"]
    rsink = c["rsink"]
    absg, absv, absq, absk = c["absg"], c["absv"], c["absq"], c["absk"]
    M, N, Dv, sc = c["M"], c["N"], c["Dv"], c["scale"]
    phi = np.where(r > 0, phi, 0.0)
    # A row whose weights the first-order terms do not bound (a score error above 1/2 at a key it weighs: huge
    # entries, or the expanded squared distance's cancellation in float32): each weight it takes part with is
    # only known to lie in [0, 1], so |dS_path - dS| <= |b| + db + |Delta| + dDelta + |dS| and |r_path - r| <= 1.
    loose_row = phi.max(axis=-1, keepdims=True, initial=0.0) > 0.5
    loose = loose_row & c["part"]
    phi = np.where(loose_row, 0.0, phi)  # the first-order terms, where they hold
    B = absg @ T(absv)  # sum_c |u_c v_jc|
    rv = r  # the weights of dv
    if c["drop"] is not None:  # V8: b = c <u, v> and dv = sum_i r c u: the factor's rounding and the product's
        B = c["drop"] * B
        rv = r * c["drop"]
    db = gamma(Dv, u) * B + (0.0 if c["drop"] is None else 2 * u * np.abs(b))
    if side.kind == "reference":  # Delta = <u, a>, a = sum_j r_j c_j v_j: the weights' errors, the M- and Dv-term sums
        ddelta = _weighted(r, (phi + gamma(M, U64) + gamma(Dv, U64)) * B).sum(-1)
        # a loose row: both weight vectors sum to at most 1, so |da_c| <= 2 max_j |c_j v_jc|
        ddelta = ddelta + np.where(loose_row[..., 0], 2 * np.where(c["part"], B, 0.0).max(axis=-1, initial=0.0), 0.0)
    else:  # Delta = <u, a> from the saved output
        ddelta = (absg * (a_err + gamma(Dv, u) * np.abs(c["a"]))).sum(-1)
    ddS = _weighted(r, phi * np.abs(b - delta[..., None]) + db + ddelta[..., None]) + 2 * u * np.abs(dS)
    ddS = np.where(loose, np.abs(b) + db + np.abs(delta)[..., None] + ddelta[..., None] + np.abs(dS), ddS)
    ddZ = ddS  # V1: dbias's terms
    if c["softcap"] is not None:  # V3: dX = dZ (1 - (s/c)^2), as section 12 (the factor from the path's x, then one product)
        eta = sig_path if side.kind != "reference" else sig_ref
        ddS = ddS + np.abs(dS) * (2 * eta / c["softcap"] + 3 * u)
        dS = c["dX"]
    absdS = np.abs(dS)
    Gk = sum_bound(side, side.key_sum(M, dtype, N, backward=True), u)
    Gq = sum_bound(side, side.query_sum(N, dtype), u)
    bq = sc * ((ddS + Gk * absdS) @ absk) + (u_scale + us + store) * c["absdq"]
    dsink = None
    if c["softcap"] is not None and c["sqeuclidean"]:  # dq_i -= scale q_i C_i, C_i = sum_j dX_ij summed in float64 by the path
        dC = ddS.sum(-1) + gamma(M, U64) * absdS.sum(-1)
        absC = np.abs(dS.sum(-1))
        bq = (sc * ((ddS + Gk * absdS) @ absk) + sc * absq * dC[..., None] + (u_scale + us) * sc * c["absAq"]
              + (u_scale + 3 * us) * sc * absq * absC[..., None] + (us + store) * c["absdq"])
    if rsink is not None:  # V5: C_i = sum_j dS_ij = Delta_i r_sink,i = -dLoss/dsink_i
        absC = np.abs(rsink * delta)
        if side.kind == "reference":  # its P_sink within its ulps of the exact, its Delta as above
            phi_s = ulps(REFERENCE_R_ULPS, U64)
        else:  # r_sink = exp(sink - L) in float64 from the path's L: L's error, the subtraction, the exp
            with np.errstate(invalid="ignore"):
                phi_s = L_err + U64 * np.abs(_finite(c["sink"] - c["L"])) + 2 * U64
        dC = np.where(rsink > 0, rsink * (phi_s * np.abs(delta) + ddelta), 0.0) + U64 * absC
        dsink = dC  # per row; summed to the sinks' shape by the caller
        if c["sqeuclidean"] and c["softcap"] is None:  # dq_i -= scale q_i C_i: C's error, two products, the subtraction (as dk's)
            if side.kind == "reference":  # it sums dS over the keys itself
                dC = ddS.sum(-1) + gamma(M, U64) * absdS.sum(-1)
            bq = (sc * ((ddS + Gk * absdS) @ absk) + sc * absq * dC[..., None] + (u_scale + us) * sc * c["absAq"]
                  + (u_scale + 3 * us) * sc * absq * absC[..., None] + (us + store) * c["absdq"])
    bk = sc * (T(ddS + Gq * absdS) @ absq)
    if c["sqeuclidean"]:  # dk_j -= scale k_j C_j: C's sum, two products, the subtraction
        Gc = sum_bound(side, side.column_sum(N, dtype), u)
        bk = (bk + sc * absk * (T(ddS).sum(-1) + Gc * absdS.sum(-2))[..., None]
              + (u_scale + us) * sc * c["absA"] + (u_scale + 2 * us) * sc * absk * c["absC"][..., None]
              + (us + store) * c["absdk"])
    else:
        bk = bk + (u_scale + us + store) * c["absdk"]
    if sc == 0.0:  # every term of dq and dk carries the scale: both are exactly 0 (no 0 * inf from an unbounded term)
        bq, bk = np.zeros_like(bq), np.zeros_like(bk)
    wv = rv * (phi + Gq + (0.0 if c["drop"] is None else 2 * u))
    wv = np.where(loose, (1.0 if c["drop"] is None else c["drop"]) * (1.0 + Gq + 2 * u), wv)
    bv = T(wv) @ absg + store * c["absdv"]
    return bq, bk, bv, dsink, ddZ


def attention_vjp_bounds(path, q, k, v, grad_out, dtype=None, *, scale=None, energy="dot", mask=None, is_causal=False,
                         causal_alignment="top_left", bias=None, alibi_slopes=None, softcap=None, window=None, enable_gqa=False,
                         sinks=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_p=0.0, dropout_mask=None, forward=None):
    """The reference's ``(dq, dk, dv[, dbias][, dsinks])`` and the bounds of ``path`` against them (section 10), at the finite entries.

    ``forward``: the path's :class:`ForwardBounds` for the same call (computed if None).  With the
    logits' variants (V1-V3) the path's side runs on ``dZ`` (``dX`` after a soft-cap) and the
    reference's side is section 12's.

    Examples
    --------
    >>> q = np.array([[0.5, -1.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]]); v = np.array([[1.0], [3.0]])
    >>> refs, bounds = attention_vjp_bounds(REFERENCE, q, k, v, np.array([[1.0]]), np.float64)
    >>> [b.shape for b in bounds], bool(max(b.max() for b in bounds) < 1e-13)
    ([(1, 2), (2, 2), (2, 1)], True)
    """
    from .attention import attention
    from .gradients import _sum_groups, _sum_to_shape, attention_vjp

    from .attention import Competition

    kw = dict(scale=scale, mask=mask, is_causal=is_causal, causal_alignment=causal_alignment, energy=energy, window=window,
              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, bias=bias, alibi_slopes=alibi_slopes, softcap=softcap,
              dropout_p=dropout_p, dropout_mask=dropout_mask)
    refs = attention_vjp(q, k, v, grad_out, enable_gqa=enable_gqa, sinks=sinks, **kw)
    dtype = np.dtype(refs[0].dtype if dtype is None else dtype)
    u = unit_roundoff(dtype)
    if forward is None:
        forward = attention_bounds(path, q, k, v, dtype, enable_gqa=enable_gqa, sinks=sinks, **kw)[2]
    inp, sc, x, take, S = _attention_setup(path, q, k, v, scale, energy, mask, is_causal, causal_alignment, window=window,
                                           enable_gqa=enable_gqa, sinks=sinks, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                           bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                                           dropout_mask=dropout_mask)
    comp = Competition(inp) if _has_logits(inp) or inp.keep is not None else None
    drop = None if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)  # V8's c
    # per query head: keys and values repeated over a group (V6), the batch broadcast
    q64, k64, v64 = (np.asarray(z, np.float64) for z in (inp.q, inp.k, inp.v))
    g64 = np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (inp.n, inp.dv))
    out = attention(q64, k64, v64, return_lse=True, return_responsibilities=True, sinks=inp.sinks, **kw)
    # Special values: every intermediate is taken as 0 where it is not finite.  Under the backward's
    # edge-case policy (README) such a term is either never read (a masked, excluded or dropped pair, a
    # zero routing weight) or makes the gradient entry itself non-finite, where the pattern is compared
    # and no bound applies; the finite entries are sums of finite terms only.
    q64, k64, v64, g64 = (_finite(z) for z in (q64, k64, v64, g64))
    a64, L64, r = (_finite(np.asarray(z, np.float64)) for z in out[:3])
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):  # products of huge finite entries may overflow: also taken as 0
        b = _finite(g64 @ T(v64) if drop is None else drop * (g64 @ T(v64)))
        delta = _finite((g64 * a64).sum(-1))
        dS = _finite(r * (b - delta[..., None]))  # dZ with V1-V3
        dX = dS if inp.softcap is None else dS * (1.0 - (_finite(comp.s) / inp.softcap) ** 2)  # V3
        A, C = _finite(T(dX) @ q64), _finite(dX.sum(-2))  # sum_i dX_ij q_i and sum_i dX_ij
    dk_heads = sc * (A - _finite(k64) * C[..., None]) if energy == "sqeuclidean" else sc * A
    ctx = dict(
        u=u, x=x, S=S, scale=sc, D=inp.q.shape[-1], L=L64, a=a64, r=r, b=b, delta=delta, dS=dS, dX=dX, comp=comp,
        z=x if comp is None or comp.x is None else -comp.e[..., : inp.m], softcap=inp.softcap, drop=drop,
        absg=np.abs(_finite(g64)), absv=np.abs(_finite(v64)), absq=np.abs(_finite(q64)), absk=np.abs(_finite(k64)),
        N=inp.n * inp.group, M=inp.m, Dv=inp.dv, sqeuclidean=energy == "sqeuclidean", absA=np.abs(A), absC=np.abs(C),
        absdq=np.abs(_finite(np.asarray(refs[0], np.float64))), absdk=np.abs(dk_heads), absdv=np.abs(T(r if drop is None else r * drop) @ g64),
        rsink=None if inp.sinks is None else np.asarray(out[3], np.float64),
        part=np.broadcast_to(True if take is None else take, x.shape) & ~np.isneginf(x),  # a superset of the pairs that take part
        sink=None if inp.sinks is None else inp.sinks[..., None], absAq=np.abs(dX @ k64),
    )
    mine = _side_vjp(path, u, dtype, ctx, forward.L_path, forward.a_path)
    sizes = [np.abs(_finite(z)).max(initial=0.0) for z in (q64, k64, v64, g64)]
    floor = 2 * underflow(dtype, inp.m + inp.n * inp.group + inp.q.shape[-1] + inp.dv + 8,
                          (1.0 + sc) * np.prod([1.0 + z for z in sizes]))  # section 3b, both sides
    if comp is not None:  # the reference's side: section 12, then its rounding to the dtype
        ref_store = u if u > U64 else 0.0
        ref12 = variant_vjp_error(q, k, v, grad_out, enable_gqa=enable_gqa, sinks=sinks, **kw)
        ref12 = [e + ref_store * np.abs(_finite(np.asarray(g_, np.float64))) for e, g_ in zip(ref12, refs)]
        total = [mine[0] + ref12[0]] + [_sum_groups(m_, inp.group) + r_ for m_, r_ in zip(mine[1:3], ref12[1:3])]
        rest = ref12[3:]
        if inp.bias is not None:  # dZ in the dtype, summed in float64 over the broadcast entries, rounded once
            absd = np.abs(_finite(np.asarray(refs[3], np.float64)))
            n = max(1, int(np.prod(mine[4].shape)) // max(1, int(np.prod(inp.bias_shape))))
            mine_db = _sum_to_shape(mine[4] + gamma(n, U64) * np.abs(dS), inp.bias_shape) + _store(u, U64) * absd
            total.append(mine_db + rest[0])
            rest = rest[1:]
        if inp.sinks is not None:
            rows = np.prod(inp.batch + (inp.n,), dtype=np.int64) // max(1, int(np.prod(inp.sinks_shape, dtype=np.int64)))
            absd = np.abs(_finite(np.asarray(refs[-1], np.float64)))
            per_row = _finite(mine[3]) + gamma(int(rows), U64) * np.abs(_finite(ctx["rsink"] * delta))
            total.append(_sum_to_shape(per_row.sum(axis=-1), inp.sinks_shape) + _store(u, U64) * absd + rest[0])
        return refs, _with_floor(total, floor, inp)
    ref = _side_vjp(REFERENCE, U64, dtype, ctx)
    total = [m_ + r_ for m_, r_ in zip(mine[:3], ref[:3])]
    if inp.group > 1:
        total[1:] = [_sum_groups(t, inp.group) for t in total[1:]]
    if inp.sinks is not None:  # the rows' bounds summed as the rows are, then each side's float64 sum and rounding
        rows = np.prod(inp.batch + (inp.n,), dtype=np.int64) // max(1, int(np.prod(inp.sinks_shape, dtype=np.int64)))
        absd = np.abs(_finite(np.asarray(refs[3], np.float64)))
        per_row = _finite(mine[3] + ref[3]) + 2 * gamma(int(rows), U64) * np.abs(_finite(ctx["rsink"] * delta))
        total.append(_sum_to_shape(per_row.sum(axis=-1), inp.sinks_shape) + 2 * _store(u, U64) * absd)  # both round to the dtype
    return refs, _with_floor(total, floor, inp)


def _with_floor(total, floor, inp):
    """Section 3b's ``floor`` added to each gradient bound, times the rows (and heads) a ``dbias`` or ``dsinks`` element sums."""
    rows = max(1, int(np.prod(inp.batch + (inp.n, inp.m), dtype=np.int64)))
    return tuple(t + floor * (1 if i < 3 else rows // max(1, t.size)) for i, t in enumerate(total))


# --- 11: logits of the variants -------------------------------------------------------


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
        if inp.softcap is not None:
            a_s = _finite(np.abs(comp.s))
            eta = eta * (1.0 - (a_s / inp.softcap) ** 2) + u * (ax + 5 * a_s)
        if inp.bias is not None:
            eta = eta + u * az
        alibi = inp.alibi()
        if alibi is not None:
            eta = eta + u * (np.abs(alibi) + az)
    return _finite(eta)


# --- 12: backward of the variants --------------------------------------------------------


def variant_vjp_error(q, k, v, grad_out, *, scale=None, energy="dot", **options):
    """Section 12: bounds on ``(dq, dk, dv[, dbias][, dsinks])`` of a float64 implementation of G4/G6.

    ``options``: the keywords of :func:`iem_ref.attention_vjp` (masks,
    causality and the variants); the shapes of the gradients
    :func:`iem_ref.attention_vjp` returns.  Special values: every
    intermediate is taken as 0 where it is not finite, as in
    :func:`attention_vjp_bounds` (the bound holds at the finite entries).
    """
    from .attention import Competition, prepare_attention
    from .competition import responsibilities
    from .gradients import _sum_groups, _sum_to_shape

    inp = prepare_attention(q, k, v, scale=scale, energy=energy, **options)
    comp = Competition(inp)
    u = U64
    M, N, D, Dv, g = inp.m, inp.n, inp.q.shape[-1], inp.dv, inp.group
    T = lambda z: np.swapaxes(z, -1, -2)  # noqa: E731
    part = ~np.isposinf(comp.e) if comp.take is None else comp.take & ~np.isposinf(comp.e)
    with np.errstate(invalid="ignore"):
        P = _finite(np.where(part, responsibilities(comp.e, comp.tau, mask=comp.take), 0.0))
    q64, k64, v64 = (np.abs(_finite(x.astype(np.float64))) for x in (inp.q, inp.k, inp.v))
    uu = _finite(np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (N, Dv)))
    absu = np.abs(uu)
    S = score_sizes(inp.q, inp.k, energy, expanded=False)
    eta = logit_error(comp, gamma(D + 2, u) * _times_scale(inp.scale, S), u)
    if comp.x is None:
        eta = eta + u * np.abs(_finite(comp.d * inp.scale))  # the division by tau inside the exponent
    if inp.sinks is not None:
        eta = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    eta = np.where(P > 0, _finite(eta), 0.0)
    phi = np.where(P > 0, eta + (P * eta).sum(-1, keepdims=True) + 6 * u, 0.0)
    Pk, phik, partk = P[..., :M], phi[..., :M], part[..., :M]
    c = np.ones(partk.shape) if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        b = _finite(np.where(partk, c * (uu @ T(_finite(inp.v.astype(np.float64)))), 0.0))
        db = _finite(gamma(Dv + 1, u) * c * (absu @ T(v64)))
        delta = _finite((Pk * b).sum(-1, keepdims=True))
        # Delta = <u, a>, a = sum_j P_j c_j v_j: the weights' errors and the M- and Dv-term sums, over sum_c |u_c c v_jc|
        ddelta = _weighted(Pk, (phik + gamma(M, u) + gamma(Dv, u)) * _finite(c * (absu @ T(v64)))).sum(-1, keepdims=True)
        dZ = _finite(Pk * (b - delta))
        ddZ = _weighted(Pk, phik * np.abs(b - delta) + db + ddelta) + 2 * u * np.abs(dZ)
    dX, ddX = dZ, ddZ
    if inp.softcap is not None:
        factor = 1.0 - (_finite(comp.s) / inp.softcap) ** 2
        dX = dZ * factor
        ddX = ddZ + np.abs(dZ) * (2 * eta[..., :M] / inp.softcap + 3 * u)
    adX = np.abs(dX)
    sc = inp.scale
    dq = sc * (ddX + gamma(M, u) * adX) @ k64
    dk = sc * T(ddX + gamma(N * g, u) * adX) @ q64
    dv = T(Pk * c * (phik + gamma(N * g, u))) @ absu
    if energy == "sqeuclidean":
        dk = dk + sc * k64 * (ddX.sum(-2) + gamma(N * g, u) * adX.sum(-2))[..., :, None]
        if inp.softcap is not None or inp.sinks is not None:
            dq = dq + sc * q64 * (ddX.sum(-1) + gamma(M, u) * adX.sum(-1))[..., :, None]
    dq = dq + 2 * u * sc * (adX @ k64)
    if sc == 0.0:  # every term of dq and dk carries the scale: both are exactly 0
        dq, dk = np.zeros_like(dq), np.zeros_like(dk)
    if g > 1:
        dk, dv = _sum_groups(dk, g), _sum_groups(dv, g)
    out = [dq, dk, dv]
    if inp.bias is not None:
        n = max(1, int(np.prod(dZ.shape)) // max(1, int(np.prod(inp.bias_shape))))
        out.append(_sum_to_shape(ddZ + gamma(n, u) * np.abs(dZ), inp.bias_shape))
    if inp.sinks is not None:
        Ps, phis = P[..., M], phi[..., M]
        ds = Ps * (phis * np.abs(delta[..., 0]) + ddelta[..., 0])
        n = max(1, int(np.prod(Ps.shape)) // max(1, int(np.prod(inp.sinks_shape))))
        out.append(_sum_to_shape(ds.sum(-1) + gamma(n, u) * np.abs(Ps * delta[..., 0]).sum(-1), inp.sinks_shape))
    return tuple(out)
# --- 11: merges of partials (M2) --------------------------------------------------------
def merge_bounds(levels, P, W, V, A, *, shift=0.0, exp_ulps=1):
    """What ``levels`` M2 merge levels add to a forward bound: ``(da (..., N, Dv), dL (..., N))``.

    Partials ``(m_c, l_c, o_c)`` of key blocks, merged in float64 by M2
    (:func:`iem_ref.streaming.merge_partials`) in a tree (``levels =
    tree_depth(C)`` for ``C`` blocks) or a chain (``C - 1``), against the
    exact merge of the same partials.  Per level, a partial's ``l`` and
    ``o`` are multiplied by one rescale factor ``exp(-(m_c - m)/tau)`` (``1``,
    exact, for the block holding the minimum) and added to the other's:

    * the factor: ``exp`` within ``p = exp_ulps`` ulps of float64 (``np.exp``,
      1 ulp, as :mod:`iem_ref.accel._fastexp` measures it), the same float
      for ``l`` and ``o``: a consistent perturbation of that block's weights
      (section 7); its argument, a subtraction and a division by ``tau``,
      rounds twice per level, and along the levels a block passes these
      arguments telescope to ``|m_c - m|/tau <= |x_j - max x|`` for every key
      ``j`` of the block (section 6): ``delta <= 2 levels p u64 + 2 u64
      shift``, ``shift = max_j |x_j - max x|`` over the participating keys
      (pass 0 where section 6's shift term already counts the arguments, as
      for the CPU path, whose merges extend its tiles' running maximum);
    * the product and the addition: two roundings per level of each term of
      ``l`` and ``o``: ``gamma_{2 levels}(u64)`` (section 8).

    So, as section 9, ``|a^ - a| <= delta min(V/2, W) + gamma_{2 levels}(u64)
    (P + |a|)`` (different blocks' perturbations, each within ``delta``,
    move ``a`` by at most ``delta`` times the mass moved across the mean,
    ``rho (1 - rho) |a_P - a_rest| <= min(V/2, W)``) and
    ``|log l^ - log l| <= delta + gamma_{2 levels}(u64)``.  The finish
    (``a = o / l``, ``L = -m/tau + log l``, the output rounding) is the
    forward's own (section 9's ``out`` and ``log`` terms).  ``P, W, V, A``:
    section 9's ``sum_j r_j |v_j|``, ``sum_j r_j |v_j - a|``, ``max_j |v_j|``
    and ``|a|``; ``shift`` broadcasts to the rows ``(..., N)``.

    Examples
    --------
    >>> da, dL = merge_bounds(3, np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)))
    >>> bool(da[0, 0] == 6 * U64 * 0.5 + gamma(6, U64) * 2), bool(dL[0] == 6 * U64 + gamma(6, U64))
    (True, True)
    """
    levels = int(levels)
    if levels < 0:
        raise ValueError(f"levels must be >= 0; got {levels}")
    delta = levels * ulps(exp_ulps, U64) + 2 * U64 * np.asarray(shift, np.float64)
    G = gamma(2 * levels, U64)
    P, W, V, A = (np.asarray(z, np.float64) for z in (P, W, V, A))
    da = np.asarray(delta)[..., None] * np.minimum(0.5 * V, W) + G * (P + A)
    dL = delta + G + np.zeros(da.shape[:-1])
    return da, dL


# --- 13: a kernel under test, by its precision model -----------------------------------

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
        R = np.broadcast_arrays(*self.R, *self.sigma)
        R, var = R[: len(self.R)], [np.square(s) for s in R[len(self.R):]]
        best = None
        for split in range(1 << len(R)):
            kept, rest = 0.0, 0.0
            for i, (r, v) in enumerate(zip(R, var)):
                if split >> i & 1:
                    kept = kept + r
                else:
                    rest = rest + v
            b = kept + LAMBDA * np.sqrt(rest)
            best = b if best is None else np.minimum(best, b)
        return best


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


class _Forward:
    """The forward's roundings of section 13, kept for the backward (section 14)."""


def _forward_terms(comp, r, a, L, precision):
    """Section 13's terms: ``(ErrorTerms of a, ErrorTerms of L, _Forward context)``."""
    from .precision import unit_roundoff as unit

    inp = comp.inp
    M, D = inp.m, inp.q.shape[-1]
    f = _Forward()
    f.u_s, f.u_p, f.u_a, f.u_o = (unit(getattr(precision, n)) for n in ("scores", "probs", "accumulator", "output"))
    u_s, u_p, u_a, u_o = f.u_s, f.u_p, f.u_a, f.u_o
    p = precision.exp_ulps
    f.x = x = _finite(comp.x if comp.x is not None else inp.scaled_scores(comp.d))  # the scaled scores
    z_all = -comp.e if comp.x is not None else -comp.e * inp.scale  # the logits, the sink's last
    f.S, f.S2 = S, S2 = _kernel_score_sizes(inp, x)
    extra = logit_error(comp, np.zeros(x.shape), u_s) / u_s if comp.x is not None else 0.0  # the variants' steps
    f.r_all = r_all = np.where(np.isfinite(r), r, 0.0)
    f.rr = rr = r_all[..., :M]
    part_all = r_all > 0
    m = np.where(part_all & np.isfinite(z_all), z_all, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
    t = np.where(rr > 0, _finite(np.abs(z_all[..., :M] - np.where(np.isfinite(m), m, 0.0))), 0.0)
    f.v = v = _finite(inp.v.astype(np.float64))
    f.c = c = np.ones(rr.shape) if inp.keep is None else np.where(inp.keep, 1.0 / (1.0 - inp.dropout_p), 0.0)
    f.a = af = _finite(np.asarray(a, np.float64))
    A, absv, ax = np.abs(af), np.abs(v), np.abs(x)
    n_all = r_all.shape[-1]
    f.e = e = gamma(D, u_s) * f.S + u_s * (ax + t + 2 * p + extra)  # a key's own roundings, rigorous
    f.sq = sq = S2 + x**2 + t**2 + 4 * p * p + extra**2  # their squared magnitudes
    f.rc = rc = rr * c
    rc_v = rc @ absv
    f.sum_tree = tree_squares(r_all.sum(-1), (r_all**2).sum(-1), n_all)  # the row sum, relative to itself
    ta = ErrorTerms()
    # a relative error e_j of key j's weight moves a by r_j e_j (c_j v_j - a)
    w = rr**2 * sq
    spread = (w * c * c) @ v**2 - 2 * af * ((w * c) @ v) + af**2 * w.sum(-1, keepdims=True)
    ta.add((rr * e * c) @ absv + A * (rr * e).sum(-1, keepdims=True), u_s * np.sqrt(np.maximum(spread, 0.0)))
    ta.add(u_s * ((rr * ax * c) @ absv + A * (rr * ax).sum(-1, keepdims=True)))  # the scale's rounding, every key alike
    if u_p > u_s:  # the probabilities rounded before the value GEMM
        ta.add(u_p * rc_v, u_p * np.sqrt(rc**2 @ v**2))
    ta.add(tree_depth(n_all) * u_s * A, u_s * A * np.sqrt(f.sum_tree)[..., None])  # the row sum's tree
    ta.add(tree_depth(M) * u_a * rc_v, u_a * np.sqrt(tree_squares(rc_v, rc**2 @ v**2, M, total=rc @ v)))  # the value GEMM's tree
    if inp.keep is not None:
        ta.add(2 * u_a * rc_v)  # V8: c_j rounded and multiplied
    ta.add((u_a + u_o) * A, math.hypot(u_a, u_o) * A)  # the division, the output
    tL = ErrorTerms()
    tL.add((rr * e).sum(-1), u_s * np.sqrt((rr**2 * sq).sum(-1)))
    tL.add(u_s * (rr * ax).sum(-1))  # the scale's rounding
    tL.add(tree_depth(n_all) * u_s * r_all.sum(-1), u_s * np.sqrt(f.sum_tree))  # the row sum's tree
    f.L = Lf = np.abs(_finite(np.asarray(L, np.float64)))
    logM = math.log(max(M, 1))
    # the log (its result, at most log M, and its own 2 ulps), the addition of the maximum and the store
    tL.add(u_s * (logM + 2 * Lf + 2), u_s * np.sqrt(logM**2 + 2 * Lf**2 + 4))
    return ta, tL, f


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
        ta, tL, _ = _forward_terms(comp, r, a, L, precision)
        return ta.bound(bound), tL.bound(bound)


def kernel_vjp_bounds(comp, grad_out, precision, bound="probabilistic"):
    """Section 14: ``(tol_dq, tol_dk, tol_dv)`` for a FlashAttention-style backward of ``precision``.

    ``comp``: the :class:`iem_ref.attention.Competition` of the inputs (dot
    or squared Euclidean energy), ``grad_out`` the upstream gradient
    (broadcast to ``(B..., N, Dv)``).  Shapes as :func:`iem_ref.attention_vjp`
    returns them (``Hkv`` heads with grouped-query heads).
    """
    from .competition import responsibilities
    from .gradients import _sum_groups
    from .precision import unit_roundoff as unit

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
        ta, tL, f = _forward_terms(comp, P_all, a, L, precision)
        u_s, u_a = f.u_s, f.u_a
        z_all = -comp.e if comp.x is not None else -comp.e * inp.scale
        x, S, v64, c = f.x, f.S, f.v, f.c
        eta = gamma(D, u_s) * S + u_s * np.abs(x)
        eta = logit_error(comp, eta, u_s) if comp.x is not None else eta
        tz = _finite(np.abs(z_all[..., :M] - L[..., None]))
        # P_ij recomputed as exp(z_ij - L_i): a key's own roundings (its score, the subtraction, the exp)
        own = eta + u_s * tz + 2 * pe * u_s
        var = logit_error(comp, np.zeros(x.shape), u_s) if comp.x is not None else 0.0
        own_s = u_s * np.sqrt(f.S2 + x**2 + tz**2 + 4 * pe * pe) + var
        u = _finite(np.broadcast_to(np.asarray(grad_out, np.float64), inp.batch + (N, Dv)))
        absu, absv = np.abs(u), np.abs(v64)
        b = np.where(part[..., :M], c * (u @ T(v64)), 0.0)  # dP_ij, with dropout's c
        uv = c * (absu @ T(absv))
        db, db_s = tree_depth(Dv) * u_a * uv, u_a * np.sqrt(tree_squares(uv, c**2 * (u**2 @ T(v64**2)), Dv, total=b))
        delta = (u * a).sum(-1, keepdims=True)
        sL, RL = tL.scale()[..., None], tL.bound("rigorous")[..., None]  # the row's log-partition
        RD, sD = _delta_terms(ta, f, a, u, b, delta, Dv)  # the row's Delta
        dZ = P * (b - delta)
        fcap = 1.0 if inp.softcap is None else 1.0 - (_finite(comp.s) / inp.softcap) ** 2
        dX = dZ * fcap  # a soft-cap's factor (V3)
        bd, adX = np.abs(b - delta), np.abs(dX)
        u_cast = u_in if u_in > u_s else 0.0  # dS and P rounded to the input dtype for the GEMMs
        # dS's own roundings: the subtraction, the product, the cast; the soft-cap's factor
        ds = (2 * u_s + u_cast) * adX + (0.0 if inp.softcap is None else np.abs(dZ) * (2 * eta / inp.softcap + 3 * u_s))
        kf, qf = _finite(inp.k.astype(np.float64)), _finite(inp.q.astype(np.float64))
        absk, absq = np.abs(kf), np.abs(qf)
        sq_e = inp.energy == "sqeuclidean"
        u_store = u_in if u_in > u_a else 0.0  # the accumulator's result rounded to the input dtype

        def gemm(vals, signed, n, transpose, rows=None):
            """The terms of ``sum_i dX_ij vals_i`` (``transpose``) or ``sum_j dX_ij vals_j``: per element
            ``(i, j)`` the key's own roundings, dP's, dS's, and the accumulation's tree over ``n`` terms; and
            the row's ``L_i`` and ``Delta_i``, independent across rows (``rows``: dq's, one row, summed exactly)."""
            tr = T if transpose else (lambda z: z)
            t = ErrorTerms()

            def per_element(R, s):
                t.add(tr(R) @ vals, np.sqrt(tr(s) ** 2 @ vals**2))

            per_element(P * own * bd, P * own_s * bd)
            per_element(P * db, P * db_s)
            per_element(ds, ds)
            acc = tr(adX) @ vals
            t.add(tree_depth(n) * u_a * acc, u_a * np.sqrt(tree_squares(acc, tr(adX**2) @ vals**2, n, total=tr(dX) @ signed)))
            # the row's L_i and Delta_i, both made of the forward's roundings (their scales add linearly)
            if rows is None:
                per_element(P * (RL * bd + RD), P * (sL * bd + sD))
            else:  # L_i moves every dS_ij of the row by the same relative amount, Delta_i by P_ij times it
                dq_exact, Pk = rows
                t.add(RL * dq_exact + RD * Pk, sL * dq_exact + sD * Pk)
            return t

        def squared_euclidean_rows(t, vals, n, axis):
            """``-dS`` summed over the row (or column) times ``q_i`` (``k_j``): its terms, rigorous."""
            loc = P * (own * bd + db + RL * bd + RD) + ds
            t.add(vals * (loc.sum(axis) + tree_depth(n) * u_a * adX.sum(axis))[..., None])

        if sq_e:
            Pk = np.abs((P * fcap) @ kf - (P * fcap).sum(-1, keepdims=True) * qf)
            dq_exact = np.abs(dX @ kf - dX.sum(-1, keepdims=True) * qf)
        else:
            Pk, dq_exact = np.abs((P * fcap) @ kf), np.abs(dX @ kf)
        tq = gemm(absk, kf, M, False, rows=(dq_exact, Pk))
        tk = gemm(absq, qf, N * g, True)
        if sq_e:
            squared_euclidean_rows(tk, absk, N * g, -2)
            if inp.softcap is not None or inp.sinks is not None:
                squared_euclidean_rows(tq, absq, M, -1)
        tq.add((u_a + u_store) * np.abs(dX @ kf))  # the scale's product, the store
        tk.add((u_a + u_store) * np.abs(T(dX) @ qf))
        Pc = P * c
        tv = ErrorTerms()
        for R, s in ((own + u_cast, own_s + u_cast), (RL, sL)):
            tv.add(T(Pc * R) @ absu, np.sqrt(T(Pc * s) ** 2 @ absu**2))
        Pu = T(Pc) @ absu
        tv.add(tree_depth(N * g) * u_a * Pu, u_a * np.sqrt(tree_squares(Pu, T(Pc**2) @ absu**2, N * g, total=T(Pc) @ u)))
        tv.add(u_store * np.abs(T(Pc) @ u))
        blocks = precision.gradient_blocks
        if blocks is not None and u_in > u_a:  # partial sums stored in the input dtype between blocks
            tq.add(*_stored_partials(dX, kf, blocks[1], u_in))
            tk.add(*_stored_partials(T(dX), qf, blocks[0], u_in))
            tv.add(*_stored_partials(T(Pc), u, blocks[0], u_in))
        if g > 1:  # a group's heads: different roundings, independent
            tk, tv = (t.map(lambda z: _sum_groups(z, g)) for t in (tk, tv))
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


def _delta_terms(ta, f, a, u, b, delta, Dv):
    """``(R, sigma)`` of ``Delta_i = sum_c u_ic a_ic`` formed from the kernel's stored output (section 14).

    Rigorous: the output's bound per column (section 13) and the row sum's
    tree.  Scale: the output's roundings that every column shares enter
    ``Delta`` through ``sum_c u_c (c_j v_jc - a_c) = b_ij - Delta_i``; the
    value GEMM's, the division's and the output's own roundings are
    independent across columns.
    """
    u_s, u_p, u_a, u_o = f.u_s, f.u_p, f.u_a, f.u_o
    absu = np.abs(u)
    ua = np.abs(u * a)
    R = (absu * ta.bound("rigorous")).sum(-1, keepdims=True) + tree_depth(Dv) * u_a * ua.sum(-1, keepdims=True) + u_o * ua.sum(-1, keepdims=True)
    rr, rc, sq, ax, v = f.rr, f.rc, f.sq, np.abs(f.x), f.v
    bD = np.abs(b - delta)
    var = u_s**2 * (rr**2 * sq * bD**2).sum(-1, keepdims=True)  # a key's own roundings
    var = var + (u_s * (rr * ax * bD).sum(-1, keepdims=True)) ** 2  # the scale's rounding
    if u_p > u_s:
        var = var + u_p**2 * (rr**2 * b**2).sum(-1, keepdims=True)
    var = var + u_s**2 * delta**2 * f.sum_tree[..., None]  # the row sum's tree
    rc_v, rc_v2 = rc @ np.abs(v), rc**2 @ v**2
    var = var + u_a**2 * (u**2 * tree_squares(rc_v, rc_v2, rr.shape[-1], total=a)).sum(-1, keepdims=True)  # the value GEMM
    var = var + (u_a**2 + 2 * u_o**2) * (ua**2).sum(-1, keepdims=True)  # the division, the output, its product by u
    var = var + u_a**2 * tree_squares(ua.sum(-1, keepdims=True), (ua**2).sum(-1, keepdims=True), Dv, total=delta)  # Delta's row sum
    if f.c is not None and not np.all(f.c == 1.0):
        var = var + (2 * u_a * (absu * rc_v).sum(-1, keepdims=True)) ** 2  # V8
    return R, np.sqrt(var)
