"""The exact tier (iem_ref.exact) against an independent high-precision computation.

The independent truth is mpmath at 400 digits, written from the equations
directly (no log1p trick, no shift tricks beyond the shared minimum), so it
shares nothing with ``iem_ref.exact`` but the formulas.  Each check is
*equality* of the float64 (or float32) rounding: the exact tier promises
correct rounding, so any difference is a defect.  400 digits decide the
rounding of every value below (the closest a value here comes to a float64
midpoint is far above 1e-380 relative).
"""

from decimal import Decimal

import mpmath as mp
import numpy as np
import pytest

from iem_ref import exact

mp.mp.dps = 400


def mp_log_partition(d, tau=1.0):
    x = [mp.mpf(float(v)) for v in d]
    T = mp.mpf(float(tau))
    m = min(x)
    return -m / T + mp.log(mp.fsum(mp.exp(-(v - m) / T) for v in x))


def mp_responsibilities(d, tau=1.0):
    x = [mp.mpf(float(v)) for v in d]
    T = mp.mpf(float(tau))
    m = min(x)
    w = [mp.exp(-(v - m) / T) for v in x]
    s = mp.fsum(w)
    return [wj / s for wj in w]


ADVERSARIAL = {
    "dominant_40": [0.0, 40.0],
    "dominant_700": [0.0, 700.0],  # L ~ 1e-304
    "cancellation": [0.6931471805599453, 0.6931471805599453],  # L ~ 2e-17
    "huge": [1e300, 1e300 * (1 + 2**-50), 1.5e300],
    "huge_negative": [-1e300, -1e300 * (1 + 2**-52), 0.0],
    "equal": [3.0] * 7,
    "equal_exact": [3.0] * 4,  # r = 1/4 exactly: no rounding anywhere
    "spread": [0.0, 123.456, 257.0, 499.99, 10.0],
    "subnormal_weight": [0.0, 740.0, 745.5],
    "near_equal": [0.5 + k * 2**-52 for k in range(6)],
    "normal30": list(np.random.default_rng(3).normal(0, 30, 40)),
}


@pytest.mark.equation("G1")
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("tau", [1.0, 3.0, 0.1])
def test_log_partition_correctly_rounded(name, tau):
    d = ADVERSARIAL[name]
    assert float(exact.log_partition(d, tau)) == float(mp_log_partition(d, tau))


@pytest.mark.equation("A3", "T2")
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_responsibilities_correctly_rounded(name, tau):
    d = ADVERSARIAL[name]
    got = exact.to_float(exact.responsibilities(d, tau))
    want = np.array([float(v) for v in mp_responsibilities(d, tau)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.equation("G1")
def test_issue_anchors():
    """The two anchors of the problem: a tiny result and heavy cancellation."""
    assert float(exact.log_partition([0.0, 700.0])) == float(mp.log1p(mp.exp(-700)))
    assert 9.8e-305 < float(exact.log_partition([0.0, 700.0])) < 9.9e-305
    c = 0.6931471805599453
    assert float(exact.log_partition([c, c])) == float(mp.log(2) - mp.mpf(c))


def test_fixed_precision_is_not_enough(monkeypatch):
    """A fixed working precision cannot serve every input: the loop must raise it.

    ``tanh_from_signed_gaussian(1e-300)`` is ``r_+ - r_-`` with ``r_+- = 1/2 +- 5e-301``:
    300 digits cancel.  With the loop capped at its first precision the tier
    refuses (instead of returning a wrongly rounded value); uncapped it is
    correct (test_tanh_from_signed_gaussian).  The log1p form keeps the tiny
    log-partition anchor at the first precision.
    """
    monkeypatch.setattr(exact, "MAX_DIGITS", exact.START_DIGITS)
    with pytest.raises(ArithmeticError):
        exact.tanh_from_signed_gaussian(1e-300)
    assert float(exact.log_partition([0.0, 700.0])) == float(mp.log1p(mp.exp(-700)))


@pytest.mark.equation("A3")
def test_float32_inputs_are_taken_exactly():
    d32 = np.array([0.1, 0.7, 2.3], dtype=np.float32)
    got = exact.to_float(exact.responsibilities(d32))
    want = np.array([float(v) for v in mp_responsibilities(d32.astype(np.float64))])
    np.testing.assert_array_equal(got, want)
    got32 = exact.to_float(exact.responsibilities(d32), np.float32)
    assert got32.dtype == np.float32


def test_float32_rounding_is_not_double_rounding():
    x = Decimal((2**60 + 2**36 + 1) * 5**60).scaleb(-60)  # 1 + 2**-24 + 2**-60 exactly; just above a float32 midpoint
    assert np.float32(float(x)) == np.float32(1.0)  # what double rounding gives
    assert exact.round_to_float32(x) == np.float32(1.0) + np.float32(2.0**-23)
    assert exact.round_to_float32(Decimal(1) + Decimal(2) ** -24) == np.float32(1.0)  # tie to even
    big = Decimal(2**128 - 2**103)  # the float32 overflow threshold: ties to inf
    assert np.isinf(exact.round_to_float32(big))
    assert exact.round_to_float32(Decimal(2**128 - 2**103 - 1)) == np.finfo(np.float32).max
    assert exact.round_to_float32(Decimal("1e-46")) == np.float32(0.0)
    assert exact.round_to_float32(Decimal("1.1e-45")) == np.float32(1.401298464324817e-45)


@pytest.mark.equation("A4", "P2")
def test_posterior_mean_exact_midpoint():
    """An exact result on a float64 midpoint settles (no Inexact signal) and rounds to even."""
    one = 1.0
    assert float(exact.posterior_mean([0.5, 0.5], [one, one + 2.0**-52])) == 1.0
    assert float(exact.posterior_mean([0.5, 0.5], [one + 2.0**-52, one + 2.0**-51])) == one + 2.0**-51
    g = np.array([[1.0, 2.0], [3.0, np.nan]])
    a = exact.posterior_mean([[0.25, 0.75]], g, mask=[[True, True]])
    assert float(a[0, 0]) == 2.5 and a[0, 1].is_nan()
    a = exact.posterior_mean([1.0, 0.0], g, mask=[True, False])  # the masked NaN cannot leak
    assert [float(x) for x in a] == [1.0, 2.0]


def _mp_attention(q, k, v, scale, take, energy):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros((q.shape[0], v.shape[1]))
    lse = np.zeros(q.shape[0])
    for i in range(q.shape[0]):
        idx = [j for j in range(k.shape[0]) if take[i, j]]
        if energy == "dot":
            d = [-mp.fsum(mp.mpf(float(a)) * mp.mpf(float(b)) for a, b in zip(q[i], k[j])) for j in idx]
        else:
            d = [mp.fsum((mp.mpf(float(a)) - mp.mpf(float(b))) ** 2 for a, b in zip(q[i], k[j])) / 2 for j in idx]
        x = [-dj * scale for dj in d]
        mx = max(x)
        w = [mp.exp(xj - mx) for xj in x]
        s = mp.fsum(w)
        lse[i] = float(mx + mp.log(s))
        for c in range(v.shape[1]):
            out[i, c] = float(mp.fsum(wj / s * mp.mpf(float(v[j, c])) for wj, j in zip(w, idx)))
    return out, lse


@pytest.mark.equation("A1", "A3", "A4", "T1", "K2")
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_attention_correctly_rounded(rng, energy, causal):
    N, M, D, Dv = 3, 5, 3, 2
    q, k, v = rng.normal(0, 2, (N, D)), rng.normal(0, 2, (M, D)), rng.normal(0, 1, (M, Dv))
    mask = rng.random((N, M)) < 0.8
    mask[:, 0] = True
    kw = dict(mask=mask, energy=energy)
    if causal:
        kw.update(is_causal=True, causal_alignment=causal)
    a, lse = exact.attention(q, k, v, return_lse=True, **kw)  # default scale: exact 1/sqrt(3)
    take = mask.copy()
    if causal:
        off = 0 if causal == "top_left" else M - N
        take &= np.arange(M)[None, :] <= np.arange(N)[:, None] + off
    want_a, want_lse = _mp_attention(q, k, v, 1 / mp.sqrt(D), take, energy)
    np.testing.assert_array_equal(exact.to_float(a), want_a)
    np.testing.assert_array_equal(exact.to_float(lse), want_lse)


@pytest.mark.equation("S4")
@pytest.mark.parametrize("z", [0.5, -3.0, 1e-300, 20.0, -1e-17, 400.0])
@pytest.mark.parametrize("m, sigma", [(1.0, 1.0), (2.0, 0.7)])
def test_tanh_from_signed_gaussian(z, m, sigma):
    want = mp.tanh(mp.mpf(m) * mp.mpf(z) / mp.mpf(sigma) ** 2)
    assert float(exact.tanh_from_signed_gaussian(z, m, sigma)) == float(want)


@pytest.mark.equation("H3")
@pytest.mark.parametrize("z", [0.0, -745.0, -30.0, 1.0, 36.7, 800.0, -1e-20])
@pytest.mark.parametrize("tau", [1.0, 0.5, 7.0])
def test_softplus(z, tau):
    T = mp.mpf(tau)
    want = T * mp.log1p(mp.exp(mp.mpf(z) / T))
    assert float(exact.softplus(z, tau)) == float(want)


def test_softplus_limits():
    assert float(exact.softplus(-np.inf)) == 0.0
    assert float(exact.softplus(np.inf)) == np.inf
    assert float(exact.softplus(1.0, np.inf)) == np.inf
    assert exact.softplus(np.nan).is_nan()


def test_to_float_shapes_and_types():
    r = exact.responsibilities(np.zeros((2, 3)))
    assert r.dtype == object and r.shape == (2, 3)
    f32 = exact.to_float(r, np.float32)
    assert f32.dtype == np.float32 and f32.shape == (2, 3)
    assert exact.to_float(r, np.float16).dtype == np.float16 and exact.to_float(r, "bfloat16").dtype.name == "bfloat16"
    with pytest.raises(TypeError):
        exact.to_float(r, np.int32)
    assert isinstance(exact.log_partition([1.0, 2.0]), Decimal)


def _run_doctests(module):
    import doctest

    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    tests = finder.find(module, module.__name__, globs={"np": np, "Decimal": Decimal, **vars(module)})
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
    return tests


def test_docstring_examples_run_and_every_public_function_has_one():
    tests = _run_doctests(exact)
    with_examples = {t.name.rsplit(".", 1)[-1] for t in tests if t.examples}
    assert set(exact.__all__) - {"MAX_DIGITS"} <= with_examples


@pytest.mark.equation("A4", "T2")
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_regression_average_on_a_midpoint_settles(scale):
    """Uniform weights 1/3 (scale 0, or three tied keys) and a mean that is exactly a float64 midpoint.

    (v0 + v1 + v2) / 3 = 1 + 2**-53: the Ziv loop never settles if the mean is
    formed as sum (1/3 rounded) v_j; the exact tier divides once at the end, so
    the exact case is recognised and rounds half to even (to 1.0).
    """
    v = np.array([[1 + 2.0**-52], [1 + 2.0**-52], [1 - 2.0**-53]])
    k = np.ones((3, 2))  # identical keys: tied energies at any scale
    a = exact.attention(np.array([[0.3, -0.2]]), k, v, scale=scale)
    assert exact._EXACT.multiply(a[0, 0], Decimal(2**53)) == 2**53 + 1  # a = 1 + 2**-53 exactly
    assert float(a[0, 0]) == 1.0


def test_a_value_within_digits_of_a_low_precision_midpoint_settles_for_float64_only():
    """``L = -0.6875 + log1p(exp(-11787.3125))``: float64 and float32 round to -0.6875; float8_e5m2 cannot be decided.

    ``-0.6875`` is a float8_e5m2 midpoint and ``L`` lies about ``7e-5120`` above it,
    beyond the Ziv loop's digits: the value comes back :class:`iem_ref.exact.Unsettled`.
    """
    L = exact.log_partition(np.array([11788.0, 0.6875]), 1.0)
    assert isinstance(L, exact.Unsettled)
    assert exact.to_float(np.array([L]))[0] == -0.6875 and exact.to_float(np.array([L]), np.float32)[0] == np.float32(-0.6875)
    with pytest.raises(ArithmeticError, match="float8_e5m2"):
        exact.to_float(np.array([L]), "float8_e5m2")
    assert not isinstance(exact.log_partition(np.array([0.0, 700.0]), 1.0), exact.Unsettled)
