"""Gaussian mixtures (G5, with K3): the classical E-step is the same softmin.

The independent computation is ``scipy.stats.multivariate_normal``'s
densities, weighted and normalised by hand.  Error argument (float64,
``u = 2**-53``): a Gaussian log-density computed through a factorisation
is within ``c D kappa u (maha/2 + |log det|/2 + 1)`` of exact, ``kappa`` the
condition number of the covariance, ``c = 4`` covering the factorisation and
the triangular solves (as in ``test_energies``), plus ``u |log w|`` for the
weight.  A relative error ``e_j`` in each weighted density moves the
normalised ``r_j`` by ``<= 2 max_j e_j`` relative; the hand normalisation
(K terms) and the softmin add ``(K + 1) u`` and ``6u``.
"""

import numpy as np
import pytest
import scipy.stats

import iem_ref as R
from tests.conftest import U32, U64
from tests.tolerances import assert_within

K, D, NPTS = 4, 3, 25


@pytest.fixture
def mixture(rng):
    means = rng.normal(scale=2.0, size=(K, D))
    A = rng.normal(size=(K, D, D))
    covs = A @ np.swapaxes(A, -1, -2) + 0.5 * np.eye(D)
    weights = rng.dirichlet(np.ones(K))
    x = rng.normal(scale=2.5, size=(NPTS, D))
    return x, means, covs, weights


def _scipy_log_density(x, means, covs, weights):
    return np.stack([np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x) for m, c, w in zip(means, covs, weights)], -1)


def _log_density_error(x, means, covs, weights):
    kappa = np.linalg.cond(covs)
    maha = R.mahalanobis_energy(x, means, covs)
    logdet = np.linalg.slogdet(covs)[1]
    return 4 * D * kappa * U64 * (maha / 2 + np.abs(logdet) / 2 + 1) + U64 * np.abs(np.log(weights))


@pytest.mark.equation("G5", "K3")
def test_mixture_responsibilities_match_scipy_gaussian_densities(mixture):
    x, means, covs, weights = mixture
    r = R.mixture_responsibilities(x, means, covs, weights)
    dens = np.stack([w * scipy.stats.multivariate_normal(m, c).pdf(x) for m, c, w in zip(means, covs, weights)], -1)
    ref = dens / dens.sum(-1, keepdims=True)  # p(j | x), by hand
    e = _log_density_error(x, means, covs, weights)
    e_scipy = e  # the same budget for SciPy's own evaluation
    rel = 2 * (e + e_scipy).max(-1, keepdims=True) + (K + 1 + 6 + 2) * U64  # exp: 2u
    assert_within(r, ref, rel * ref + 1e-300, "G5 vs scipy.stats")
    assert np.all(np.abs(r.sum(-1) - 1) <= (6 + K) * U64)


@pytest.mark.equation("G5")
def test_mixture_energies_are_negative_log_joint_up_to_a_constant(mixture):
    x, means, covs, weights = mixture
    d = R.mixture_energies(x, means, covs, weights)
    logjoint = _scipy_log_density(x, means, covs, weights)
    # d_j = -log(pi_j N(x; mu_j, Sigma_j)) - (D/2) log(2 pi): the constant cancels in A3 (T3).
    const = D / 2 * np.log(2 * np.pi)
    e = _log_density_error(x, means, covs, weights)
    assert_within(d, -logjoint - const, 2 * e + 2 * U64 * (np.abs(d) + const), "G5 energies")
    # A3 of these energies is the E-step; a shared covariance works too.
    shared = R.mixture_responsibilities(x, means, covs[0], weights)
    ref_shared = R.responsibilities(-_scipy_log_density(x, means, np.broadcast_to(covs[0], covs.shape), weights))
    e_sh = _log_density_error(x, means, np.broadcast_to(covs[0], covs.shape), weights)
    assert_within(shared, ref_shared, (4 * e_sh.max(-1, keepdims=True) + 12 * U64) * ref_shared + 1e-300, "shared covariance")


@pytest.mark.equation("G5")
def test_zero_weight_component_has_zero_responsibility(mixture):
    x, means, covs, weights = mixture
    w = np.array([0.5, 0.0, 0.25, 0.25])
    r = R.mixture_responsibilities(x, means, covs, w)
    assert np.all(r[:, 1] == 0)
    assert np.all(np.isposinf(R.mixture_energies(x, means, covs, w)[:, 1]))
    keep = [0, 2, 3]
    ref = R.mixture_responsibilities(x, means[keep], covs[keep], w[keep])
    assert_within(r[:, keep], ref, 14 * U64 * ref, "weight 0 = removed")


@pytest.mark.equation("G5")
def test_one_em_step_does_not_decrease_the_likelihood(mixture):
    # The E-step here, with the textbook M-step, is classical EM: the
    # log-likelihood sum_n L(d_n) is non-decreasing (Dempster, Laird & Rubin).
    # Rounding: each L_n within (2 + kappa) ulps, so the sum within
    # NPTS * 2u (2 |L| + sum r|d|) per evaluation.
    x, means, covs, weights = mixture

    def loglik(means, covs, weights):
        d = R.mixture_energies(x, means, covs, weights)
        L = R.log_partition(d, 1.0)
        r = R.responsibilities(d)
        return L.sum(), (2 * U64 * (2 * np.abs(L) + (r * np.abs(d)).sum(-1))).sum()

    ll, err = loglik(means, covs, weights)
    for _ in range(3):
        r = R.mixture_responsibilities(x, means, covs, weights)
        nk = r.sum(0)
        weights = nk / nk.sum()
        means = (r.T @ x) / nk[:, None]
        diff = x[None, :, :] - means[:, None, :]
        covs = np.einsum("nk,knd,kne->kde", r, diff, diff) / nk[:, None, None] + 1e-9 * np.eye(D)
        new, new_err = loglik(means, covs, weights)
        assert new >= ll - err - new_err
        ll, err = new, new_err


def test_mixture_float32(mixture):
    # Dyadic weights: the same vector in both precisions, summing to exactly 1.
    x, means, covs, weights = (np.asarray(a, np.float32) for a in (*mixture[:3], [0.125, 0.25, 0.375, 0.25]))
    r = R.mixture_responsibilities(x, means, covs, weights)
    r64 = R.mixture_responsibilities(*(a.astype(np.float64) for a in (x, means, covs, weights)))
    assert r.dtype == np.float32 and R.mixture_energies(x, means, covs, weights).dtype == np.float32
    # Energies are rounded to float32 before the softmin: (d_j - m) moves by
    # u32 (|d_j| + |m|), r relatively by twice that, plus the final rounding.
    d = R.mixture_energies(*(a.astype(np.float64) for a in (x, means, covs, weights)))
    rel = 2 * U32 * (np.abs(d) + np.abs(d).min(-1, keepdims=True)).max(-1, keepdims=True) * 2 + U32
    assert_within(r, r64, rel * r64 + 1e-45, "G5 float32")
