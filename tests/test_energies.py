"""Energies: A1, T1's scaled dot product, the kernels K1-K8 and the signed energies of S1/S4.

Each kernel is checked against a straightforward independent formula,
mostly ``scipy.spatial.distance.cdist`` and ``scipy.special``/``scipy.stats``.
Error arguments (float64, ``u = 2**-53``): a sum of ``D`` products is within
``gamma_D ~ D u`` of exact relative to the sum of absolute products; a
difference ``x - mu`` is within ``u`` of itself; a square or product adds
``u``; both sides of a comparison carry their own budget, so bounds are the
sum of the two.
"""

import importlib

import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy.spatial.distance import cdist

import iem_ref as R
from iem_ref import energies as E
from tests.conftest import U32, U64
from tests.tolerances import assert_within

N, M, D = 5, 7, 3


@pytest.fixture
def xmu(rng):
    return rng.normal(size=(N, D)), rng.normal(size=(M, D))


@pytest.mark.equation("A1", "K1")
def test_dot_energy_is_minus_inner_product(xmu):
    x, mu = xmu
    d = R.dot_energy(x, mu)
    ref = np.array([[-sum(a * b for a, b in zip(xi, mj)) for mj in mu] for xi in x])
    # Both sides sum D products: (D + 1) u each, relative to sum |x_t mu_t|.
    absprod = np.abs(x) @ np.abs(mu).T
    assert_within(d, ref, 2 * (D + 1) * U64 * absprod, "K1")
    assert d.shape == (N, M)
    # One input vector gives (M,).
    assert_within(R.dot_energy(x[0], mu), ref[0], 2 * (D + 1) * U64 * absprod[0], "K1 1-D")


@pytest.mark.equation("A1", "T1")
def test_scaled_dot_energy_default_scale_is_inverse_sqrt_dim(xmu):
    x, mu = xmu
    d = R.scaled_dot_energy(x, mu)
    ref = -(x @ mu.T) / np.sqrt(D)
    absprod = np.abs(x) @ np.abs(mu).T / np.sqrt(D)
    # Matmul (D u) twice plus the scale's rounding and application (2u each side).
    assert_within(d, ref, (2 * D + 4) * U64 * absprod, "A1 scaled")
    assert_within(R.scaled_dot_energy(x, mu, scale=0.5), -(x @ mu.T) * 0.5, (2 * D + 2) * U64 * absprod, "scale=0.5")
    # T1: its softmin is scaled dot-product attention's softmax.
    r = R.responsibilities(d)
    ref_r = scipy.special.softmax((x @ mu.T) / np.sqrt(D), axis=-1)
    # Energies differ by <= (2D+4) u |.|; r moves twice that relative, plus
    # 6u (ours) and scipy's (|x - max| + M + 4) u.
    e = (2 * D + 4) * U64 * absprod.max()
    s = (x @ mu.T) / np.sqrt(D)
    assert_within(r, ref_r, ref_r * (2 * e + U64 * (np.abs(s - s.max(-1, keepdims=True)) + 2 * np.abs(s).max() + M + 10)), "T1")


@pytest.mark.equation("K2")
@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_sqeuclidean_energy_matches_cdist(xmu, sigma):
    x, mu = xmu
    d = R.sqeuclidean_energy(x, mu, sigma)
    ref = cdist(x, mu, "sqeuclidean") / (2 * sigma**2)
    # Per side: D differences (u), squares (u), sum (D u), scaling (2u): (2D + 4) u relative.
    assert_within(d, ref, 2 * (2 * D + 4) * U64 * ref, "K2")


@pytest.mark.equation("K3")
def test_mahalanobis_energy_matches_cdist(rng, xmu):
    x, mu = xmu
    A = rng.normal(size=(M, D, D))
    cov = A @ np.swapaxes(A, -1, -2) + D * np.eye(D)  # SPD, condition number modest
    kappa = np.linalg.cond(cov).max()
    d = R.mahalanobis_energy(x, mu, cov)
    ref = np.stack([cdist(x, mu[j : j + 1], "mahalanobis", VI=np.linalg.inv(cov[j]))[:, 0] ** 2 for j in range(M)], -1)
    # A solve and an explicit inverse are each backward stable: the quadratic
    # form is within ~ c D kappa u of itself relative to ||x - mu||^2 / lambda_min;
    # c = 4 covers the two triangular solves and the products on each side.
    lam_min = np.linalg.eigvalsh(cov).min(-1)
    scale = cdist(x, mu, "sqeuclidean") / lam_min[None, :]
    assert_within(d, ref, 2 * 4 * D * kappa * U64 * (scale + ref), "K3")
    # Options: half the form, plus half the log-determinant (a Gaussian's energy).
    dh = R.mahalanobis_energy(x, mu, cov, half=True, log_det=True)
    logdet = np.linalg.slogdet(cov)[1]
    assert_within(dh, d / 2 + logdet / 2, 4 * U64 * (np.abs(dh) + np.abs(logdet)), "K3 half+logdet")
    # A shared (D, D) covariance; identity gives twice the Gaussian energy.
    assert_within(R.mahalanobis_energy(x, mu, np.eye(D)), cdist(x, mu, "sqeuclidean"), 4 * (D + 2) * U64 * cdist(x, mu, "sqeuclidean"), "K3 identity")


@pytest.mark.equation("K4")
def test_laplace_energy_matches_cityblock(xmu):
    x, mu = xmu
    for b in (1.0, 2.5):
        d = R.laplace_energy(x, mu, b)
        ref = cdist(x, mu, "cityblock") / b
        assert_within(d, ref, 2 * (D + 2) * U64 * ref, f"K4 b={b}")


@pytest.mark.equation("K5")
def test_cosine_energy_matches_cdist(xmu):
    x, mu = xmu
    d = R.cosine_energy(x, mu)
    ref = cdist(x, mu, "cosine")
    # 1 - c with c = <x, mu>/(|x||mu|) in [-1, 1] known to (2D + 6) u per side:
    # an absolute error (the subtraction from 1 is exact or adds u).
    assert_within(d, ref, 2 * (2 * D + 8) * U64, "K5")
    assert np.all((d >= -4 * D * U64) & (d <= 2 + 4 * D * U64))
    # Scale invariance: only the direction matters.
    assert_within(R.cosine_energy(3.0 * x, 0.5 * mu), d, 4 * (2 * D + 8) * U64, "K5 scale")
    # A zero vector has no direction: NaN.
    z = R.cosine_energy(np.zeros((1, D)), mu)
    assert np.all(np.isnan(z))


@pytest.mark.equation("K6")
def test_student_t_energy(xmu):
    x, mu = xmu
    for nu, sigma in ((1.0, 1.0), (3.0, 0.7)):
        d = R.student_t_energy(x, mu, nu, sigma)
        sq = cdist(x, mu, "sqeuclidean")
        ref = np.log1p(sq / (nu * sigma**2))
        # sq to (2D + 2)u relative per side; log1p has condition <= 1 and 1 ulp.
        assert_within(d, ref, 2 * (2 * D + 6) * U64 * ref, f"K6 nu={nu}")
    # exact_scale: (nu + D)/2 * log(1 + ...) is minus the multivariate t log-density
    # up to a constant shared by all centres: differences between centres agree.
    nu, sigma = 4.0, 1.3
    d = R.student_t_energy(x, mu, nu, sigma, exact_scale=True)
    logpdf = np.stack([scipy.stats.multivariate_t(loc=m, shape=sigma**2 * np.eye(D), df=nu).logpdf(x) for m in mu], -1)
    diff_ref = -(logpdf - logpdf[:, :1])
    # Each log-density to ~ (2D + 8) u relative of its size (Cholesky, log1p,
    # the constant); the difference of two of them adds both.
    budget = 2 * (2 * D + 16) * U64 * (np.abs(logpdf) + np.abs(logpdf[:, :1]) + np.abs(d) + np.abs(d[:, :1]))
    assert_within(d - d[:, :1], diff_ref, budget, "K6 exact scale vs scipy.stats.multivariate_t")


@pytest.mark.equation("K7")
def test_huber_and_pseudo_huber_match_scipy_special(rng, xmu):
    x, mu = xmu
    x = np.vstack([x, mu[0] + 0.1])  # one pair well inside every delta
    r = cdist(x, mu, "euclidean")
    for delta in (0.5, 1.0, 3.0):
        # Both sides compute r from differences (D + 3) u relative; Huber is
        # 1-Lipschitz in r for r > delta and r <= delta there.
        h = R.huber_energy(x, mu, delta)
        ref = scipy.special.huber(delta, r)
        assert_within(h, ref, 2 * (D + 6) * U64 * (ref + delta * r), f"Huber delta={delta}")
        ph = R.pseudo_huber_energy(x, mu, delta)
        ref = scipy.special.pseudo_huber(delta, r)
        # scipy's sqrt(1 + t) - 1 cancels: absolute error ~ 4 u delta^2, ours is
        # relative; sum both.
        assert_within(ph, ref, 4 * U64 * delta**2 + 2 * (D + 6) * U64 * ref, f"pseudo-Huber delta={delta}")
    # Both branches of Huber are exercised, and pseudo-Huber stays relative for tiny r.
    assert (r <= 0.5).any() and (r > 3.0).any()
    tiny = R.pseudo_huber_energy([[1e-9, 0.0]], [[0.0, 0.0]], delta=1.0)
    assert abs(tiny[0, 0] - 0.5e-18) <= 4 * U64 * 0.5e-18 + 0.5e-18 * 0.25e-18


@pytest.mark.equation("K8")
def test_logistic_energy_is_minus_log_sigmoid(rng):
    z = rng.normal(scale=20.0, size=50)
    mu = np.array([-1.0, 0.0, 2.5])
    for alpha in (1.0, 0.3):
        d = R.logistic_energy(z, mu, alpha)
        x = alpha * (z[:, None] - mu)
        ref = -scipy.special.log_expit(x)
        # x rounds (2u relative); d's condition number w.r.t. x is
        # |x sigmoid(-x) / d| <= 1; log_expit and logaddexp are ~2 ulps each.
        assert_within(d, ref, U64 * (4 + 2 * 4) * ref + 1e-300, f"K8 alpha={alpha}")
        assert d.shape == (50, 3)
    # Scalar centre: z's shape; no overflow for huge arguments.
    assert R.logistic_energy(np.array([1.0, 2.0])).shape == (2,)
    big = R.logistic_energy(np.array([-1e4, 1e4]))
    assert big[0] == 1e4 and 0 <= big[1] < 1e-300


@pytest.mark.equation("S1", "S4")
def test_signed_energies(rng):
    z = rng.normal(size=(4, 3))
    assert np.array_equal(R.SIGNS, [1.0, -1.0])
    for m, sigma in ((1.0, 1.0), (2.0, 0.5)):
        d = R.signed_gaussian_energies(z, m, sigma)
        assert d.shape == (4, 3, 2)
        ref = np.stack([(z - m) ** 2, (z + m) ** 2], -1) / (2 * sigma**2)
        assert_within(d, ref, 4 * U64 * ref, "S4 energies")
        # d_+ - d_- = -2 m z / sigma^2: the quadratic part cancels (to the
        # energies' rounding, 4u each, relative to their size).
        lin = -2 * m * z / sigma**2
        assert_within(d[..., 0] - d[..., 1], lin, 6 * U64 * (d[..., 0] + d[..., 1]), "S4 difference")
    lin = R.signed_linear_energies(z, alpha=0.7)
    assert np.array_equal(lin, np.stack([-0.7 * z, 0.7 * z], -1))


def test_batch_axes_broadcast(rng):
    x = rng.normal(size=(2, 1, N, D))
    mu = rng.normal(size=(3, M, D))
    for name, fn in R.ENERGIES.items():
        d = fn(x, mu)
        assert d.shape == (2, 3, N, M), name
        for a in range(2):
            for b in range(3):
                assert np.array_equal(d[a, b], fn(x[a, 0], mu[b])), name


@pytest.mark.parametrize("name", sorted(R.ENERGIES) + ["scaled_dot", "mahalanobis"])
def test_kernels_float32_in_float32_out(rng, name):
    x = rng.normal(size=(N, D)).astype(np.float32)
    mu = rng.normal(size=(M, D)).astype(np.float32)
    fn = {
        "scaled_dot": R.scaled_dot_energy,
        "mahalanobis": lambda a, b: R.mahalanobis_energy(a, b, np.eye(D, dtype=np.float32)),
    }.get(name) or R.ENERGIES[name]
    d32, d64 = fn(x, mu), fn(x.astype(np.float64), mu.astype(np.float64))
    assert d32.dtype == np.float32 and d64.dtype == np.float64
    # Computed in float64, rounded once.
    assert np.array_equal(d32, d64.astype(np.float32))
    assert_within(d32, d64, U32 * np.abs(d64) + 1e-45, name)
    # Mixed float32/float64 gives float64.
    assert fn(x, mu.astype(np.float64)).dtype == np.float64


def test_scalar_kernels_float32(rng):
    z = rng.normal(size=5).astype(np.float32)
    assert R.logistic_energy(z, np.float32(0.5)).dtype == np.float32
    assert R.logistic_energy(z, np.array([0.0, 1.0], np.float32)).dtype == np.float32
    assert R.signed_gaussian_energies(z).dtype == np.float32
    assert R.signed_linear_energies(z).dtype == np.float32


# --- one record per energy: every tier does what the record says, and names what it lacks -----------------------


def _tier_calls():
    """``view -> (call(name, q, k, v, g), the tier's name in its message)``."""
    from iem_ref import exact, testing
    from iem_ref.accel import cpu

    return {
        "exact": (lambda name, q, k, v, g: exact.attention(q, k, v, energy=name), "the exact tier"),
        "kernel": (lambda name, q, k, v, g: cpu.attention(q, k, v, energy=name), r"iem_ref\.accel\.cpu"),
        "gradient": (lambda name, q, k, v, g: R.attention_vjp(q, k, v, g, energy=name), "attention_vjp"),
        "score": (lambda name, q, k, v, g: testing.assert_attention_close(R.attention(q, k, v, energy=name), q, k, v, energy=name),
                  "no error bound is derived for"),
    }


@pytest.mark.parametrize("view", ["exact", "kernel", "gradient", "score"])
@pytest.mark.parametrize("name", sorted(E.ENERGY_RECORDS))
def test_every_tier_supports_exactly_what_the_energy_record_says(name, view):
    rec = E.ENERGY_RECORDS[name]
    rng = np.random.default_rng(3)
    q, k, v, g = rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    call, tier = _tier_calls()[view]
    if rec.has(view):
        call(name, q, k, v, g)
    else:
        with pytest.raises(ValueError, match=f"{tier}.*'{name}'"):
            call(name, q, k, v, g)


@pytest.mark.parametrize("path", ["cpu", "cuda"])
@pytest.mark.parametrize("name", [n for n, rec in sorted(E.ENERGY_RECORDS.items()) if rec.has("kernel")])
def test_a_kernel_energy_agrees_on_the_accelerated_paths(name, path):
    from iem_ref import bounds

    rng = np.random.default_rng(4)
    q, k, v = rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    a = R.attention(q, k, v, energy=name)
    np.testing.assert_array_equal(a, R.attention(q, k, v, energy=E.ENERGY_RECORDS[name].reference))
    mod = importlib.import_module(f"iem_ref.accel.{path}")
    _, _, fb = bounds.attention_bounds(mod.arithmetic(), q, k, v, np.float64, energy=name)
    assert_within(mod.attention(q, k, v, energy=name), a, fb.a, f"{path} {name}")


def test_a_callable_energy_is_the_reference_view_alone():
    rec = E.energy_of(lambda x, mu: -(x @ np.swapaxes(mu, -1, -2)))
    assert not any(rec.has(view) for view in ("exact", "kernel", "gradient", "score"))
    with pytest.raises(ValueError, match="iem_ref.accel.cpu.* supports energy in .*; got a callable"):
        rec.require("kernel", "iem_ref.accel.cpu")
    with pytest.raises(ValueError, match="energy must be a callable or one of"):
        E.energy_of("euclid")
