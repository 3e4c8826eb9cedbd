"""Scalar activations as collapsed posteriors: S1-S5, H3 and the prototype unit P5.

Error arguments (float64, ``u = 2**-53``): the reference's responsibilities
are within 3 ulps (6u relative) of the exact softmin of the energies it
formed, so a summary ``a = r_+ - r_-`` is within ``6u (r_+ + r_-) + u |a| =
(6 + |a|) u`` of the exact summary *of those energies*; rounding of the
energies themselves moves the argument ``x`` of tanh by ``dx``, hence ``a``
by ``sech^2(x) |dx|``.  ``np.tanh`` is within 1 ulp (``2u |tanh|``).
"""

import math

import numpy as np
import pytest
import scipy.special

import iem_ref as R
from tests.conftest import U32, U64
from tests.tolerances import assert_within, central_difference, fd_bound, fd_step


def sech2(x):
    return 1.0 / np.cosh(np.clip(x, -350, 350)) ** 2


@pytest.fixture
def z(rng):
    return np.concatenate([rng.normal(scale=3.0, size=40), [0.0, 1e-12, -1e-12, 25.0, -25.0, 400.0, -400.0]])


@pytest.mark.equation("S1", "S2")
def test_sign_responsibilities_are_a_sigmoid(rng):
    dp, dm = rng.normal(scale=5.0, size=(2, 30))
    r = R.sign_responsibilities(dp, dm)
    assert r.shape == (30, 2)
    x = dm - dp  # r_+ = sigmoid(d_- - d_+)
    ref = np.stack([scipy.special.expit(x), scipy.special.expit(-x)], -1)
    # x rounds (u |x|): expit's relative sensitivity is (1 - sigma)|x| <= |x|;
    # expit <= 2 ulps, ours 6u.
    assert_within(r, ref, ref * U64 * (np.abs(x)[:, None] + 4 + 6) + 1e-300, "S2")
    # r_- = 1 - r_+ (each 6u relative, the sum exact to 12u).
    assert np.all(np.abs(r.sum(-1) - 1) <= 13 * U64)
    # S1: the order is SIGNS = (+1, -1); broadcasting of the two energies.
    assert R.sign_responsibilities(np.zeros((3, 1)), np.zeros(4)).shape == (3, 4, 2)


@pytest.mark.equation("S3")
def test_sign_posterior_mean_is_r_plus_minus_r_minus(rng):
    dp, dm = rng.normal(scale=5.0, size=(2, 30))
    a = R.sign_posterior_mean(dp, dm)
    r = R.sign_responsibilities(dp, dm)
    assert_within(a, r[:, 0] - r[:, 1], U64 * np.abs(a), "S3 = r+ - r-")
    # E[s | z] = tanh((d_- - d_+)/2): the argument rounds (u |x|), so a moves by sech^2 u|x|.
    x = (dm - dp) / 2
    assert_within(a, np.tanh(x), U64 * (sech2(x) * np.abs(x) + 6 + np.abs(a) + 2 * np.abs(a)), "S3 = tanh")
    assert np.all(np.abs(a) <= 1)


@pytest.mark.equation("S4")
@pytest.mark.parametrize("m, sigma", [(1.0, 1.0), (2.0, 0.5), (0.3, 1.7)])
def test_tanh_from_signed_gaussian(z, m, sigma):
    a = R.tanh_from_signed_gaussian(z, m, sigma)
    x = m * z / sigma**2
    ref = np.tanh(x)
    # d_s = (z - s m)^2 / (2 sigma^2) rounds in four operations (4u relative
    # each), so x = (d_- - d_+)/2 moves by <= 2u (d_+ + d_-); computing
    # m z / sigma^2 here costs 3u |x|.
    d = R.signed_gaussian_energies(z, m, sigma)
    dx = 2 * U64 * d.sum(-1) + 3 * U64 * np.abs(x)
    bound = sech2(x) * dx + U64 * (6 + np.abs(a)) + 2 * U64 * np.abs(ref)
    assert_within(a, ref, bound, f"S4 m={m} sigma={sigma}")
    # In ulps of tanh where |tanh| is in [0.5, 1) (one ulp = u there), the
    # bound above is (6 + |a| + 2|tanh|) u <= 9 ulps plus the energies' part.
    away = (np.abs(ref) >= 0.5) & (np.abs(ref) < 1)
    assert away.any()
    assert np.all(np.abs(a - ref)[away] <= 9 * np.spacing(np.abs(ref[away])) + sech2(x[away]) * dx[away])


@pytest.mark.equation("S4", "T3")
def test_quadratic_parts_cancel_linear_energies_give_the_same_tanh(z):
    # Shared quadratic parts are a shift of both energies (T3): the linear
    # energies -+ alpha z give the same posterior mean.
    m, sigma = 1.5, 0.8
    alpha = m / sigma**2
    lin = R.signed_linear_energies(z, alpha)
    a_lin = R.sign_posterior_mean(lin[..., 0], lin[..., 1])
    a_gauss = R.tanh_from_signed_gaussian(z, m, sigma)
    d = R.signed_gaussian_energies(z, m, sigma)
    x = alpha * z
    dx = 2 * U64 * d.sum(-1) + 3 * U64 * np.abs(x)
    assert_within(a_gauss, a_lin, sech2(x) * 2 * dx + 2 * U64 * (6 + np.abs(a_lin)), "S4 linear = Gaussian")


@pytest.mark.equation("S5")
@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0, 0.1])
def test_tanh_is_attention_over_two_signed_keys(z, alpha):
    a = R.tanh_as_attention(z, alpha)
    ref = np.tanh(alpha * z)
    # d = -(z * (+-1)) is exact; tau = 1/alpha rounds (u), so the argument
    # z / tau is alpha z within u |alpha z|, and alpha * z here another u.
    x = alpha * z
    bound = sech2(x) * 2 * U64 * np.abs(x) + U64 * (6 + np.abs(a)) + 2 * U64 * np.abs(ref)
    assert_within(a, ref, bound, f"S5 alpha={alpha}")
    # Literally attention(q=[z], keys=[+1, -1], values=[+1, -1], scale=alpha).
    zz = z[:5]
    att = np.array([R.attention([[t]], [[1.0], [-1.0]], [[1.0], [-1.0]], scale=alpha)[0, 0] for t in zz])
    assert np.array_equal(a[:5], att)
    # Shapes: elementwise over any array.
    assert R.tanh_as_attention(np.zeros((3, 4)), alpha).shape == (3, 4)


@pytest.mark.equation("H3")
@pytest.mark.parametrize("tau", [1.0, 0.25, 3.0])
def test_softplus_is_minus_the_free_energy_of_on_off(z, tau):
    sp = R.softplus(z, tau)
    x = z / tau
    ref = tau * np.logaddexp(0.0, x)
    # Ours: (2 + kappa) ulps of L = log(1 + e^x) with the exponent formed
    # exactly, kappa = sigma(x)|x| / L; times tau (u).  NumPy: x rounds (u |x|,
    # amplified by the same kappa), logaddexp ~2 ulps, times tau.
    L = np.logaddexp(0.0, x)
    with np.errstate(invalid="ignore", divide="ignore"):  # L underflows to 0 for x < -745: kappa -> |x|
        kappa = np.where(L > 0, scipy.special.expit(x) * np.abs(x) / L, np.abs(x))
    assert_within(sp, ref, U64 * (2 * (2 + kappa) + 1 + kappa + 4 + 1) * np.abs(ref), f"H3 softplus tau={tau}")
    assert np.array_equal(sp, -R.free_energy(np.stack([np.zeros_like(z), -z], -1), tau))


@pytest.mark.equation("H3")
def test_softplus_tends_to_relu_within_tau_log_2(z):
    relu = R.relu(z)
    assert np.array_equal(relu, np.maximum(z, 0.0))
    assert np.all(np.signbit(R.relu(np.array([-0.0, -3.0]))) == False)  # noqa: E712 - no -0.0
    for tau in (1.0, 0.1, 1e-3, 1e-6):
        sp = R.softplus(z, tau)
        gap = sp - relu
        # softplus_tau(z) - relu(z) = tau log(1 + e^{-|z|/tau}) in [0, tau log 2],
        # and <= tau e^{-|z|/tau}: the rate of the limit.  Rounding: 4 ulps of |sp|.
        slack = 8 * U64 * np.abs(sp)
        assert np.all(gap >= -slack)
        assert np.all(gap <= tau * math.log(2) + slack)
        # (Evaluating tau e^{-|z|/tau} here costs (|z|/tau + 3) u relative: |z|/tau rounds.)
        rate = tau * np.exp(-np.abs(z) / tau)
        assert np.all(gap <= rate * (1 + U64 * (np.abs(z) / tau + 3)) + slack)
        # The worst case is z = 0, where softplus = tau log 2 exactly.
        assert abs(R.softplus(0.0, tau) - tau * math.log(2)) <= 4 * U64 * tau
    # Once e^{-|z|/tau} underflows, softplus is relu up to -tau * (z/tau): exactly
    # when tau is a power of two, else within the two roundings (2u |z|).
    far = np.abs(z) > 1e-3
    assert np.array_equal(R.softplus(z[far], 2.0**-20), relu[far])
    assert_within(R.softplus(z[far], 1e-6), relu[far], 2 * U64 * np.abs(z[far]), "H3 limit")


@pytest.mark.equation("H3", "G1")
@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_softplus_derivative_is_sigmoid_is_r_on(z, tau):
    der = R.softplus_derivative(z, tau)
    x = z / tau
    ref = scipy.special.expit(x)
    # expit's argument rounds (relative sensitivity (1 - sigma)|x|), 2 ulps; ours 6u.
    assert_within(der, ref, ref * U64 * (np.abs(x) + 4 + 6) + 1e-300, "H3 derivative = sigmoid")
    # = r_on of the on/off competition (off: 0, on: -z).
    r_on = R.responsibilities(np.stack([np.zeros_like(z), -z], -1), tau)[..., 1]
    assert np.array_equal(der, r_on)
    # = the derivative of softplus, by central differences.  softplus''' =
    # sigma''(x)/tau^2 with |sigma''| <= 1/(6 sqrt 3); each evaluation is within
    # 4 ulps (8u) of |softplus|.
    third = 1 / (6 * math.sqrt(3)) / tau**2
    for i in range(0, z.size, 5):
        eps_f = 8 * U64 * max(abs(R.softplus(z[i], tau)), 1e-300) * 2
        h = fd_step(eps_f, third)
        fd = central_difference(lambda t: R.softplus(t[i], tau), z, i, h)
        assert abs(fd - der[i]) <= fd_bound(h, eps_f, third), (i, z[i], fd, der[i])
    # tau -> 0: the hard responsibility 1{z > 0}, ReLU's derivative, with the
    # tie at z = 0 split (1/2).
    hard = R.softplus_derivative(z, 1e-9)
    big = np.abs(z) > 1e-6
    assert np.array_equal(hard[big], (z[big] > 0).astype(float))
    assert R.softplus_derivative(0.0, 1e-9) == 0.5


@pytest.mark.equation("P5", "S4")
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_prototype_activation_with_two_signed_prototypes_is_tanh(z, tau):
    a = R.prototype_activation(z, [1.0, -1.0], [1.0, -1.0], tau)
    x = z / tau
    ref = np.tanh(x)
    # d_h = (z - c_h)^2 / 2 rounds twice (2u relative each); x = (d_- - d_+)/(2 tau)
    # moves by u (d_+ + d_-)/tau; z / tau here costs u |x|.
    d = (z[:, None] - np.array([1.0, -1.0])) ** 2 / 2
    dx = U64 * d.sum(-1) / tau + U64 * np.abs(x)
    assert_within(a, ref, sech2(x) * dx + U64 * (6 + np.abs(a)) + 2 * U64 * np.abs(ref), f"P5 tanh tau={tau}")


@pytest.mark.equation("P5", "P3")
def test_prototype_activation_general(rng, z):
    c = np.array([-2.0, -0.5, 0.3, 1.7])
    g = np.array([0.0, -1.0, 2.0, 5.0])
    for tau in (1.0, 0.3):
        a = R.prototype_activation(z, c, g, tau)
        d = (z[:, None] - c) ** 2 / 2
        r = scipy.special.softmax(-d / tau, axis=-1)
        ref = r @ g
        # SciPy's softmax error (|x - max| + 2|max| + K + 4) u relative, ours 6u, two sums of K terms.
        x = -d / tau
        rel = U64 * (np.abs(x - x.max(-1, keepdims=True)).max(-1) + 2 * np.abs(x).max(-1) + 4 + 4 + 6 + 2 * 5)
        assert_within(a, ref, rel * (r @ np.abs(g)), f"P5 tau={tau}")
    # tau -> 0: a step function, the posterior mode (P3) of the nearest prototype.
    step = R.prototype_activation(z, c, g, 1e-8)
    mode = R.posterior_mode((z[:, None] - c) ** 2 / 2, g)
    assert np.array_equal(step, mode)


def test_float32_in_float32_out(z):
    z32 = z.astype(np.float32)
    f32 = np.float32
    outs = {
        "sign_responsibilities": (R.sign_responsibilities(z32, -z32), R.sign_responsibilities(z32.astype(float), -z32.astype(float))),
        "sign_posterior_mean": (R.sign_posterior_mean(z32, -z32), R.sign_posterior_mean(z32.astype(float), -z32.astype(float))),
        "tanh_from_signed_gaussian": (R.tanh_from_signed_gaussian(z32), R.tanh_from_signed_gaussian(z32.astype(float))),
        "tanh_as_attention": (R.tanh_as_attention(z32), R.tanh_as_attention(z32.astype(float))),
        "softplus": (R.softplus(z32, 0.5), R.softplus(z32.astype(float), 0.5)),
        "relu": (R.relu(z32), R.relu(z32.astype(float))),
        "softplus_derivative": (R.softplus_derivative(z32, 0.5), R.softplus_derivative(z32.astype(float), 0.5)),
        "prototype_activation": (
            R.prototype_activation(z32, np.array([1, -1], f32), np.array([1, -1], f32)),
            R.prototype_activation(z32.astype(float), [1.0, -1.0], [1.0, -1.0]),
        ),
    }
    for name, (o32, o64) in outs.items():
        assert o32.dtype == f32 and o64.dtype == np.float64, name
        # float64 inside, rounded once to float32.
        assert np.array_equal(o32, o64.astype(f32)), name
        assert_within(o32, o64, U32 * np.abs(o64) + 1e-45, name)
