"""The float64 reference against the exact tier, with the bound computed per case.

Claims (README "Accuracy", ``iem_ref._accurate``), ``u = 2**-53``:

* ``log_partition``: within ``2 + kappa`` ulps, ``kappa = sum_j r_j |d_j/tau| / |L|``
  (the relative condition number; Blanchard, Higham & Higham 2021).
* ``responsibilities``: within 3 ulps componentwise for every component whose
  exact value is a normal float; a subnormal component within
  ``6u r_j + 3 * 2**-1074``.
* the returned ``r_j`` sum to one within ``2u + (log2 M)^2 u^2 + O(u^2)`` (their
  exact sum; :func:`sum_to_one_bound` gives it exactly).  Why not ``u``: ``r_j = fl(w_j / S)`` with ``S`` the (almost correctly
  rounded) sum of the *computed* weights, so the weights' own errors cancel
  and ``sum_j w_j / S = 1 + theta``, ``|theta| <= u + (log2 M)^2 u^2`` (the
  cascade's rounding of ``S``); the ``M`` divisions then add
  ``sum_j r_j delta_j`` with ``|delta_j| <= u``, which reaches ``u`` when the
  quotients round the same way.  One unit roundoff would need correctly
  rounded *and* sum-preserving components, which no componentwise rounding
  guarantees (even correctly rounded ``r_j`` give ``|sum - 1| <= u`` only
  for their exact sum).  Measured: at most ``0.7 u`` on the suite below.
* attention (A4): see :func:`attention_bound`.

The float32 path computes in float64 and rounds once: within
``0.5 + 6 * 2**-29`` float32 ulps of the truth (``r``), ``0.5 + (2 + kappa) 2**-28`` (``L``).
"""

import functools
import decimal
import math
from decimal import Decimal

import numpy as np
import pytest

from iem_ref import attention, exact, log_partition, responsibilities
from iem_ref.testing import ulp_error
from tests.conftest import U64

TINY = np.finfo(np.float64).tiny


def _suite():
    rng = np.random.default_rng(20261129)
    logits = {
        "dominant_40": np.array([0.0, -40.0]),
        "dominant_700": np.array([0.0, -700.0]),
        "near_1e300": np.array([1e300, 1e300 * (1 - 2**-50), 0.9e300, -1e300]),
        "equal_3000": np.full(3000, 3.7),  # 1e5 in bench/accuracy.py
        "mixed_-inf": np.array([-np.inf, 1.0, 2.0, -np.inf, 0.5]),
        "spread_hundreds": -500.0 * rng.random(300),  # not uniform(-500, 0): its grid makes x - max exact
        "one_large": np.r_[50.0, rng.normal(0, 1, 2000)],
        "normal_sd30": rng.normal(0, 30, 1000),
        "near_equal": 1.0 + 1e-10 * rng.normal(0, 1, 2000),
        "cancellation": np.array([-0.6931471805599453] * 2),
        "subnormal_weights": np.array([0.0, -740.0, -745.0, -700.0]),
    }
    return logits


SUITE = _suite()


@functools.lru_cache(maxsize=None)
def exact_of(name, tau, dtype=np.float64):
    """Exact L and r of a suite case (cached: the exact tier is slow on thousands of terms)."""
    d = (-SUITE[name]).astype(dtype)
    return exact.log_partition(d, tau), exact.responsibilities(d, tau)


def sum_to_one_bound(M):
    """Bound on |sum_j r_hat_j - 1| (exact sum of the returned floats), module docstring.

    ``S_hat = T (1 + theta)`` with ``|theta| <= u + (log2 M)^2 u^2`` (final
    rounding of the cascade, plus the rounding of its accumulated error
    terms, ``log2 M`` levels each ``<= u T``), and ``r_hat_j = (w_j / S_hat)(1 + delta_j)``,
    ``|delta_j| <= u``: ``|sum - 1| <= (theta + u (1 + theta)) / (1 - theta)``.
    """
    u = U64
    theta = u + math.log2(max(M, 1)) ** 2 * u * u
    return (theta + u * (1 + theta)) / (1 - theta)


def kappa(d, tau, r, L):
    """Relative condition number of L: sum_j r_j |d_j / tau| / |L| (exact r, L)."""
    with decimal.localcontext(exact._context(50)):  # the exact results span 10**-2e8 .. 10**300
        return _kappa_wide(d, tau, r, L)


def _kappa_wide(d, tau, r, L):
    if not L.is_finite() or L == 0:
        return math.inf if L == 0 else 0.0
    num = sum((rj * abs(Decimal(float(dj)) / Decimal(tau)) for dj, rj in zip(d, r) if rj != 0 and np.isfinite(dj)), Decimal(0))
    return float(num / abs(L))


@pytest.mark.equation("G1")
@pytest.mark.parametrize("name", sorted(SUITE))
@pytest.mark.parametrize("tau", [1.0, 3.0, 0.1])
def test_log_partition_within_2_plus_kappa_ulps(name, tau):
    d = -SUITE[name]
    L_exact, r_exact = exact_of(name, tau)
    got = log_partition(d, tau)
    k = kappa(d, tau, r_exact, L_exact)
    err = float(ulp_error(got, L_exact))
    assert err <= 2 + k, f"{name}, tau={tau}: {err} ulps > 2 + kappa = {2 + k}"


@pytest.mark.equation("A3", "T2")
@pytest.mark.parametrize("name", sorted(SUITE))
@pytest.mark.parametrize("tau", [1.0, 3.0, 0.1])
def test_responsibilities_within_3_ulps(name, tau):
    d = -SUITE[name]
    _, r_exact = exact_of(name, tau)
    got = responsibilities(d, tau)
    ex = exact.to_float(r_exact)
    normal = np.abs(ex) >= TINY
    err = ulp_error(got, r_exact)
    assert np.all(err[normal] <= 3.0), f"{name}: max {err[normal].max()} ulps"
    sub = ~normal
    assert np.all(np.abs(got[sub] - ex[sub]) <= 6 * U64 * ex[sub] + 3 * 2.0**-1074)


@pytest.mark.equation("A3")
@pytest.mark.parametrize("name", sorted(SUITE))
def test_sum_to_one(name):
    d = -SUITE[name]
    r = responsibilities(d)
    s = sum((Decimal(float(x)) for x in r), Decimal(0))  # the exact sum of the returned floats
    assert abs(float(s - 1)) <= sum_to_one_bound(d.size)


@pytest.mark.equation("A3", "G1")
@pytest.mark.parametrize("name", ["normal_sd30", "spread_hundreds", "one_large", "dominant_40", "mixed_-inf"])
def test_float32_rounds_once(name):
    d = (-SUITE[name]).astype(np.float32)
    L_exact, r_exact = exact_of(name, 1.0, np.float32)
    got = responsibilities(d)
    assert got.dtype == np.float32
    ex32 = exact.to_float(r_exact, np.float32)
    normal = np.abs(ex32) >= np.finfo(np.float32).tiny
    err = ulp_error(got, r_exact)
    assert np.all(err[normal] <= 0.5 + 6 * 2.0**-29)
    k = kappa(d.astype(np.float64), 1.0, r_exact, L_exact)
    assert float(ulp_error(log_partition(d), L_exact)) <= 0.5 + (2 + k) * 2.0**-28


def attention_bound(q, k, v, r_exact, *, scale, energy, take):
    """Error bound of the float64 reference attention output, per element.

    The reference evaluates ``a = fl(r_hat @ v)`` with ``r_hat`` the softmin of
    the computed energies ``d_hat`` at the computed temperature ``tau_hat``:

    1. energies: ``|d_hat_j - d_j| <= eps_j``, ``eps_j = gamma_D sum_l |q_l k_jl|``
       (dot, a float64 matmul) or ``gamma_{D+1} d_j`` (sqeuclidean:
       difference, square, sum); ``gamma_n = n u / (1 - n u)``;
    2. temperature: ``tau_hat = fl(1/scale)`` (or ``fl(sqrt(D))``), relative
       error ``u``; the reference divides the shifted energies exactly, so the
       exponent ``x_j = -(d_j - m) / tau`` is off by at most ``gamma_1 t_j``,
       ``t_j = (d_j - m) scale``;
    3. so ``|x_hat_j - x_j| <= eta_j = scale (eps_j + max_k eps_k) + gamma_1 t_j``
       (the shift is shared), and ``|log r_j(d_hat) - log r_j| <= zeta_j =
       eta_j + sum_k r_k eta_k``;
    4. the softmin itself: 3 ulps, ``|r_hat_j - r_j(d_hat)| <= 6u r_j(d_hat)``;
    5. the matmul: ``gamma_M sum_j r_hat_j |v_j|``.

    Hence ``|a_hat - a| <= sum_j |v_j| r_j ((1 + 6u) expm1(zeta_j) + 6u)
    + gamma_M sum_j r_j e^{zeta_j} (1 + 6u) |v_j|``.
    """
    u = U64
    D = q.shape[-1]
    M = k.shape[-2]

    def gamma(n):
        return n * u / (1 - n * u)

    if energy == "dot":
        eps = gamma(D) * (np.abs(q) @ np.abs(k).T)
        d = -(q @ k.T)
    else:
        d = ((q[:, None, :] - k[None, :, :]) ** 2).sum(-1) / 2
        eps = gamma(D + 1) * d * (1 + 4 * u)
    d = np.where(take, d, np.inf)
    eps = np.where(take, eps, 0.0)
    m = d.min(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a fully masked row: no weights, bound 0
    with np.errstate(invalid="ignore"):  # masked entries (inf * 0 at scale 0) are discarded
        t = np.where(take, (d - m) * scale, 0.0)
    eta = np.where(take, scale * (eps + eps.max(axis=-1, keepdims=True)) + gamma(1) * t, 0.0)
    zeta = eta + (r_exact * eta).sum(-1, keepdims=True)
    va = np.abs(v)
    per_weight = r_exact * ((1 + 6 * u) * np.expm1(zeta) + 6 * u)
    mult = r_exact * np.exp(zeta) * (1 + 6 * u)
    return (per_weight @ va + gamma(M) * (mult @ va)) * (1 + 2.0**-20)


@pytest.mark.equation("A1", "A3", "A4", "T1", "K2")
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
@pytest.mark.parametrize("scale, D", [(None, 3), (None, 4), (1.7, 5), (0.1, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_within_derived_bound(rng, energy, scale, D, causal):
    N, M, Dv = 4, 9, 3
    q = rng.normal(0, 3, (N, D))
    k = rng.normal(0, 3, (M, D))
    v = rng.normal(0, 1, (M, Dv)) * np.array([1.0, 1e3, 1e-3])
    mask = rng.random((N, M)) < 0.85
    mask[:, 0] = True
    kw = dict(scale=scale, mask=mask, energy=energy, is_causal=causal)
    a_exact, r_exact = exact.attention(q, k, v, return_responsibilities=True, **kw)
    got = attention(q, k, v, **kw)
    take = mask & (np.arange(M)[None, :] <= np.arange(N)[:, None] if causal else True)
    s = 1 / np.sqrt(D) if scale is None else scale
    bound = attention_bound(q, k, v, exact.to_float(r_exact), scale=s, energy=energy, take=take)
    exact_f = exact.to_float(a_exact)
    err = np.array([[float(abs(Decimal(float(x)) - y)) for x, y in zip(gr, er)] for gr, er in zip(got, a_exact)])
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound)}; exact {exact_f}"


def test_attention_bound_is_not_vacuous(rng):
    """The bound above must be tight enough to catch a real error: 1e-13 relative fails it."""
    q, k, v = rng.normal(0, 3, (4, 3)), rng.normal(0, 3, (9, 3)), rng.normal(0, 1, (9, 2))
    a_exact, r_exact = exact.attention(q, k, v, return_responsibilities=True)
    bound = attention_bound(q, k, v, exact.to_float(r_exact), scale=1 / np.sqrt(3), energy="dot", take=np.ones((4, 9), bool))
    wrong = exact.to_float(a_exact) * (1 + 1e-13)
    assert np.any(np.abs(wrong - exact.to_float(a_exact)) > bound)


@pytest.mark.equation("A3")
def test_3_ulp_claim_can_fail():
    """The 3-ulp check is not vacuous: scipy's softmax (rounded ``x - max``) fails it on N(0, 30)."""
    import scipy.special as scipy_special

    _, r_exact = exact_of("normal_sd30", 1.0)
    err = ulp_error(scipy_special.softmax(SUITE["normal_sd30"]), r_exact)
    assert err.max() > 3.0


@pytest.mark.equation("A3", "G1")
@pytest.mark.parametrize(
    "d, tau",
    [
        ([1.7e308, -1.7e308], 1.0),  # d_j - m overflows: TwoSum's error term was NaN (r was NaN)
        ([0.0, 1e300], 1e305),  # Dekker's split of tau overflowed
        ([0.0, 1e300, 2e300], 1e300),
        ([0.0, 3e-320, 1e-319], 1e-320),  # subnormal tau: the split lost bits to underflow
        ([0.0, 1e-300, 0.7e-300], 3.3e-301),
    ],
)
def test_regression_extreme_range_of_d_and_tau(d, tau):
    L_exact, r_exact = exact.log_partition(d, tau), exact.responsibilities(d, tau)
    k = kappa(np.array(d), tau, r_exact, L_exact)
    assert float(ulp_error(log_partition(d, tau), L_exact)) <= 2 + k
    err = ulp_error(responsibilities(d, tau), r_exact)
    normal = np.abs(exact.to_float(r_exact)) >= TINY
    assert np.all(err[normal] <= 3.0)
