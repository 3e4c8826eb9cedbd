"""Property-based tests (hypothesis) over wide ranges: reference and exact tier.

* responsibilities are non-negative, at most 1, and sum to one within
  ``2u + (log2 M)^2 u^2 + O(u^2)`` (derivation: tests/test_accuracy.py);
* T3: a shared shift ``d -> d + c`` and a joint rescaling ``(d, tau) -> (c d, c tau)``
  leave r unchanged.  In floating point the transformed energies must be the
  *same real numbers* for the claim to apply, so shifts are drawn where
  ``d + c`` is exact (multiples of 2**-20 below 2**30) and scales are powers
  of two; then the exact tier must give identical floats (correct rounding
  of the same real value) and so must the reference (it forms ``d_j - min d``
  exactly by TwoSum, and ``(c s) / (c tau) = s / tau`` bit for bit);
* reference ~ exact on random small inputs: ``L`` within
  :func:`iem_ref.bounds.log_partition_error` (section 4),
  ``r`` within 3 ulps componentwise where the exact value is normal.
"""

import decimal
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iem_ref import attention, exact, log_partition, responsibilities
from iem_ref.bounds import log_partition_error
from iem_ref.testing import ulp_error
from tests.test_accuracy import sum_to_one_bound

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

wide = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-800.0, max_value=800.0, allow_nan=False, allow_infinity=False)
energies = st.one_of(
    st.lists(wide, min_size=1, max_size=8),
    st.lists(moderate, min_size=1, max_size=12),
    st.lists(st.floats(min_value=-5.0, max_value=5.0), min_size=1, max_size=40),
)
taus = st.one_of(st.sampled_from([1.0, 0.5, 3.0, 1e-3, 1e3]), st.floats(min_value=1e-6, max_value=1e6))
grid = st.integers(min_value=-(2**40), max_value=2**40).map(lambda n: n * 2.0**-20)  # d + c exact


@pytest.mark.equation("A3")
@SETTINGS
@given(d=energies, tau=taus)
def test_nonnegative_and_sum_to_one(d, tau):
    r = responsibilities(np.array(d), tau)
    assert np.all(r >= 0) and np.all(r <= 1)
    s = sum((Decimal(float(x)) for x in r), Decimal(0))
    assert abs(float(s - 1)) <= sum_to_one_bound(len(d))


@pytest.mark.equation("T3")
@SETTINGS
@given(d=st.lists(grid, min_size=1, max_size=10), c=grid, tau=taus)
def test_shift_invariance(d, c, tau):
    d = np.array(d)
    shifted = d + c
    assert np.array_equal(shifted - c, d)  # the shift is exact
    np.testing.assert_array_equal(responsibilities(shifted, tau), responsibilities(d, tau))
    np.testing.assert_array_equal(exact.to_float(exact.responsibilities(shifted, tau)), exact.to_float(exact.responsibilities(d, tau)))


@pytest.mark.equation("T3")
@SETTINGS
@given(d=st.lists(moderate, min_size=1, max_size=10), k=st.integers(min_value=-30, max_value=30), tau=taus)
def test_joint_rescaling_invariance(d, k, tau):
    d = np.array(d)
    c = 2.0**k
    np.testing.assert_array_equal(responsibilities(c * d, c * tau), responsibilities(d, tau))
    np.testing.assert_array_equal(exact.to_float(exact.responsibilities(c * d, c * tau)), exact.to_float(exact.responsibilities(d, tau)))


with_infinities = st.lists(st.one_of(moderate, st.sampled_from([np.inf, -np.inf])), min_size=1, max_size=8)


@pytest.mark.equation("A3", "G1")
@SETTINGS
@given(d=with_infinities, mask=st.lists(st.booleans(), min_size=8, max_size=8), tau=taus)
def test_policy_cases_agree_between_tiers(d, mask, tau):
    """+inf excluded, -inf certain, masks select, empty rows: the two tiers give the same floats."""
    d = np.array(d)
    take = np.array(mask[: d.size])
    r_ref = responsibilities(d, tau, mask=take)
    r_ex = exact.to_float(exact.responsibilities(d, tau, mask=take))
    np.testing.assert_array_equal(np.isnan(r_ref), np.isnan(r_ex))
    np.testing.assert_array_equal(r_ref == 0, r_ex == 0)
    np.testing.assert_array_max_ulp(r_ref, r_ex, maxulp=3)
    L_ref = log_partition(d, tau, mask=take)
    L_ex = float(exact.log_partition(d, tau, mask=take))
    assert L_ref == L_ex or (np.isfinite(L_ex) and np.isfinite(L_ref))  # infinities and NaN agree exactly


@pytest.mark.equation("G1", "A3")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=energies, tau=taus)
@example(d=[667.0, 669.0, 670.0], tau=613.0)  # L = 0.0078 from terms of 1.09: 242 ulps, 1.9 u64 absolute
@example(d=[11788.0, 0.6875], tau=1.0)  # L = -0.6875 + 7e-5120: settled for float64, not for float8_e5m2 (a midpoint)
def test_reference_matches_exact(d, tau):
    d = np.array(d)
    L_exact = exact.log_partition(d, tau)
    r_exact = exact.responsibilities(d, tau)
    m_over_tau = abs(Decimal(float(d.min())) / Decimal(tau)) if L_exact.is_finite() else 0
    with decimal.localcontext(exact._context(50)):
        err = abs(Decimal(float(log_partition(d, tau))) - L_exact) if L_exact.is_finite() else Decimal(0)
        assert err <= Decimal(log_partition_error(float(abs(L_exact)) if L_exact.is_finite() else 0.0, float(m_over_tau)))
    err = ulp_error(responsibilities(d, tau), r_exact)
    normal = np.abs(exact.to_float(r_exact)) >= np.finfo(np.float64).tiny
    assert np.all(err[normal] <= 3.0)


def mp_to_float(f):
    """The float64 rounding of the real number ``f()`` (an mpmath expression), decided at rising precision.

    A fixed precision cannot decide a value next to a rounding midpoint:
    ``tanh(x)`` for ``x = 1.5 * 3.87e-268`` lies ``x**3 / 3`` (1e-535
    relative) below ``x``, a midpoint.  So widen the result by ``10**-p`` of itself
    (mpmath is accurate to its working precision; 10 guard digits) and
    accept when both ends round alike.  The ends go through a decimal string,
    which float() rounds correctly: mpmath's own float() rounds to 53 bits
    and then again to the subnormal grid.
    """
    import mpmath as mp

    p = 64
    while p <= 4096:
        with mp.workdps(p + 10):
            t = f()
            ends = [float(mp.nstr(t + s * abs(t) * mp.mpf(10) ** -p, p + 10)) for s in (-1, 1)]
        if ends[0] == ends[1]:
            return ends[0]
        p *= 2
    raise ArithmeticError("the rounding was not settled at 4096 digits")


@pytest.mark.equation("S4")
@SETTINGS
@given(z=st.floats(min_value=-50.0, max_value=50.0), m=st.floats(min_value=0.1, max_value=3.0))
@example(z=1.1577205315433633e-307, m=0.1015625)  # a subnormal tanh
@example(z=3.8726452922817475e-268, m=1.5)  # m z is a float64 midpoint; tanh lies 1e-535 relative below it
def test_exact_tanh_is_tanh(z, m):
    """S4 on the exact tier: r_+ - r_- of the signed Gaussian energies is tanh(m z) (sigma = 1), correctly rounded.

    The reference's ``np.tanh`` is not correctly rounded, so compare with an
    independent mpmath evaluation whose precision rises until it decides the rounding.
    """
    import mpmath as mp

    want = mp_to_float(lambda: mp.tanh(mp.mpf(m) * mp.mpf(z)))
    assert float(exact.tanh_from_signed_gaussian(z, m, 1.0)) == want


@pytest.mark.equation("A1", "A3", "A4", "T1")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3)),
    spread=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
    scale=st.one_of(st.none(), st.floats(min_value=0.0, max_value=4.0)),
    energy=st.sampled_from(["dot", "sqeuclidean"]),
    causal=st.sampled_from([None, "top_left", "bottom_right"]),
)
def test_attention_reference_within_derived_bound(seed, shape, spread, scale, energy, causal):
    from tests.test_accuracy import attention_bound

    N, M, D, Dv = shape
    g = np.random.default_rng(seed)
    q, k, v = g.normal(0, spread, (N, D)), g.normal(0, spread, (M, D)), g.normal(0, 1, (M, Dv))
    mask = g.random((N, M)) < 0.8
    kw = dict(scale=scale, mask=mask, energy=energy, is_causal=causal is not None, causal_alignment=causal or "top_left")
    a_exact, r_exact = exact.attention(q, k, v, return_responsibilities=True, **kw)
    got = attention(q, k, v, **kw)
    take = mask.copy()
    if causal:
        off = 0 if causal == "top_left" else M - N
        take &= np.arange(M)[None, :] <= np.arange(N)[:, None] + off
    s = 1 / np.sqrt(D) if scale is None else scale
    bound = attention_bound(q, k, v, exact.to_float(r_exact), scale=s, energy=energy, take=take)
    with decimal.localcontext(exact._context(60)):
        err = np.array([[float(abs(Decimal(float(x)) - y)) for x, y in zip(gr, er)] for gr, er in zip(got, a_exact)])
    assert np.all(err <= bound)
