"""Every case of the README's edge-case policy, on the reference AND the exact tier.

Each test states the policy line it pins.  Both tiers are checked against
the same expected values (the exact tier through its correctly rounded
floats), so the policy is one policy, not two.
"""

import numpy as np
import pytest

import iem_ref as R

from iem_ref import attention, exact, hard_attention, hard_responsibilities, log_partition, responsibilities

ALL_TAUS = [1.0, 2.5]


def both_r(d, tau=1.0, **kw):
    return np.asarray(responsibilities(d, tau, **kw)), exact.to_float(exact.responsibilities(d, tau, **kw))


def both_L(d, tau=1.0, **kw):
    return np.asarray(log_partition(d, tau, **kw), dtype=np.float64), exact.to_float(exact.log_partition(d, tau, **kw))


def both_attention(q, k, v, **kw):
    ref = attention(q, k, v, return_lse=True, return_responsibilities=True, **kw)
    ex = exact.attention(q, k, v, return_lse=True, return_responsibilities=True, **kw)
    return ref, tuple(exact.to_float(x) for x in ex)


# --- empty key set / fully masked row: r = 0, output 0, L = -inf; empty="nan" gives NaN ---


def test_no_keys():
    for r in both_r(np.zeros((2, 0))):
        assert r.shape == (2, 0)
    for L in both_L(np.zeros((2, 0))):
        np.testing.assert_array_equal(L, [-np.inf, -np.inf])
    q, k, v = np.ones((2, 3)), np.zeros((0, 3)), np.zeros((0, 4))
    for a, lse, r in both_attention(q, k, v):
        np.testing.assert_array_equal(a, np.zeros((2, 4)))
        np.testing.assert_array_equal(lse, [-np.inf, -np.inf])
    assert np.isnan(exact.to_float(exact.attention(q, k, v, empty="nan"))).all()


def test_no_keys_empty_nan_reference():
    # Regression: with M = 0, r is NaN but has no entries, so r @ v gave zeros.
    q, k, v = np.ones((2, 3)), np.zeros((0, 3)), np.zeros((0, 4))
    assert np.isnan(attention(q, k, v, empty="nan")).all()
    assert np.isnan(R.softmin_summary(np.zeros((2, 0)), v, empty="nan")[0]).all()
    assert np.isnan(R.hard_attention(q, k, v, empty="nan")).all()


def test_fully_masked_row():
    d = np.array([[1.0, 2.0], [3.0, np.nan]])
    mask = np.array([[True, True], [False, False]])  # the NaN is masked: it cannot leak
    for r in both_r(d, mask=mask):
        np.testing.assert_array_equal(r[1], [0.0, 0.0])
        assert np.isfinite(r[0]).all()
    for r in both_r(d, mask=mask, empty="nan"):
        assert np.isnan(r[1]).all() and np.isfinite(r[0]).all()
    for L in both_L(d, mask=mask):
        assert L[1] == -np.inf and np.isfinite(L[0])


def test_fully_masked_attention_row_and_sdpa_convention():
    q, k, v = np.ones((2, 2)), np.eye(2), np.array([[1.0], [3.0]])
    mask = np.array([[True, True], [False, False]])
    for a, lse, r in both_attention(q, k, v, mask=mask):
        assert a[1, 0] == 0.0 and lse[1] == -np.inf and (r[1] == 0).all()
        assert a[0, 0] == 2.0
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = lambda x: torch.tensor(x)  # noqa: E731
    # The default matches torch SDPA with a boolean mask (output 0) ...
    np.testing.assert_array_equal(sdpa(t(q), t(k), t(v), attn_mask=t(mask)).numpy()[1], [0.0])


# --- +inf energy: weight 0, as if masked; its value is not read ---


@pytest.mark.parametrize("tau", ALL_TAUS)
def test_plus_inf_energy_is_excluded(tau):
    d = np.array([np.inf, 1.0, 2.0])
    for r, rm in zip(both_r(d, tau), both_r(d, tau, mask=np.array([False, True, True]))):
        np.testing.assert_array_equal(r, rm)
        assert r[0] == 0.0
    q, k, v = np.array([[1.0]]), np.array([[-np.inf], [1.0]]), np.array([[np.nan], [5.0]])
    for a, lse, r in both_attention(q, k, v, scale=1.0):  # d_0 = -(1 * -inf) = +inf
        np.testing.assert_array_equal(a, [[5.0]])
        np.testing.assert_array_equal(r, [[0.0, 1.0]])


def test_all_plus_inf_is_empty():
    for r in both_r(np.array([np.inf, np.inf])):
        np.testing.assert_array_equal(r, [0.0, 0.0])
    for L in both_L(np.array([np.inf, np.inf])):
        assert L == -np.inf


# --- -inf energies: r = 1 on one, shared equally by several; L = +inf ---


@pytest.mark.parametrize("tau", ALL_TAUS)
def test_minus_inf_energies_share_the_mass(tau):
    for r in both_r(np.array([1.0, -np.inf, 0.0]), tau):
        np.testing.assert_array_equal(r, [0.0, 1.0, 0.0])
    for r in both_r(np.array([1.0, -np.inf, -np.inf, 2.0, -np.inf, -np.inf]), tau):
        np.testing.assert_array_equal(r, [0.0, 0.25, 0.25, 0.0, 0.25, 0.25])
    for L in both_L(np.array([1.0, -np.inf]), tau):
        assert L == np.inf
    q, k, v = np.array([[1.0]]), np.array([[np.inf], [1.0], [np.inf]]), np.array([[2.0], [100.0], [4.0]])
    for a, lse, r in both_attention(q, k, v, scale=1.0):  # two scores +inf: their values' mean
        np.testing.assert_array_equal(a, [[3.0]])
        assert lse[0] == np.inf


# --- NaN: in the affected rows only ---


def test_nan_energy_poisons_its_row_only():
    d = np.array([[1.0, np.nan], [1.0, 2.0]])
    for r in both_r(d):
        assert np.isnan(r[0]).all() and np.isfinite(r[1]).all()
    for L in both_L(d):
        assert np.isnan(L[0]) and np.isfinite(L[1])


@pytest.mark.parametrize("where", ["key", "value", "query"])
def test_nan_in_attention_inputs_reaches_affected_rows_only(rng, where):
    N = M = 4
    q, k, v = rng.normal(size=(N, 2)), rng.normal(size=(M, 2)), rng.normal(size=(M, 3))
    if where == "key":
        k[3, 0] = np.nan  # seen (causally) by query 3 only
        affected = [3]
    elif where == "value":
        v[3, 1] = np.nan
        affected = [3]
    else:
        q[1, 1] = np.nan
        affected = [1]
    for a, lse, r in both_attention(q, k, v, is_causal=True):
        rows_nan = np.isnan(a).any(axis=-1)
        np.testing.assert_array_equal(np.nonzero(rows_nan)[0], affected)
        if where == "value":  # only the NaN column, only where the key takes part
            assert np.isnan(a[3, 1]) and np.isfinite(a[3, [0, 2]]).all()


def test_nan_value_of_an_unmasked_key_reaches_a_certain_row():
    """Key 0 is certain (score +inf) so key 1 has weight 0, but key 1 takes part: its NaN value shows."""
    q, k, v = np.array([[1.0]]), np.array([[np.inf], [1.0]]), np.array([[2.0], [np.nan]])
    for a, lse, r in both_attention(q, k, v, scale=1.0):
        assert np.isnan(a).all() and lse[0] == np.inf
    for a, lse, r in both_attention(q, k, v, scale=1.0, mask=np.array([[True, False]])):
        np.testing.assert_array_equal(a, [[2.0]])


def test_nan_or_inf_in_masked_key_or_value_cannot_leak(rng):
    q, k, v = rng.normal(size=(3, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    k[2] = np.nan
    v[2] = np.inf
    v[3] = np.nan
    mask = np.array([True, True, False, False])
    for a, lse, r in both_attention(q, k, v, mask=mask):
        assert np.isfinite(a).all() and np.isfinite(lse).all()


# --- temperature ---


@pytest.mark.parametrize("tau", [0.0, -1.0, np.nan, -np.inf])
def test_bad_tau_raises(tau):
    for fn in (responsibilities, log_partition, exact.responsibilities, exact.log_partition):
        with pytest.raises(ValueError, match="tau"):
            fn([1.0, 2.0], tau)


@pytest.mark.parametrize("scale", [-1.0, np.inf, np.nan])
def test_bad_scale_raises(scale):
    for fn in (attention, exact.attention):
        with pytest.raises(ValueError, match="scale"):
            fn(np.ones((1, 2)), np.ones((2, 2)), np.ones((2, 1)), scale=scale)


def test_infinite_tau_is_uniform():
    d = np.array([1.0, 500.0, np.inf, -3.0])
    for r in both_r(d, np.inf):
        np.testing.assert_array_equal(r, [1 / 3, 1 / 3, 0.0, 1 / 3])
    L_ref, L_exact = both_L(d, np.inf)
    assert L_exact == np.log(3.0)  # log M over the M = 3 finite hypotheses (correctly rounded)
    np.testing.assert_array_max_ulp(L_ref, np.log(3.0), maxulp=2)  # the reference: 2 + kappa ulps, kappa = 0
    for r in both_r(np.array([1.0, -np.inf]), np.inf):  # certain hypotheses still win
        np.testing.assert_array_equal(r, [0.0, 1.0])
    q, k, v = np.ones((1, 2)), np.array([[1.0, 0.0], [0.0, 9.0]]), np.array([[1.0], [2.0]])
    for a, lse, r in both_attention(q, k, v, scale=0.0):
        np.testing.assert_array_equal(a, [[1.5]])


# --- hard limit: ties split equally (the limit of T2); ties="first" for argmax ---


@pytest.mark.equation("H1", "H2")
def test_ties_split_equally_as_the_limit():
    d = np.array([2.0, 1.0, 1.0, 3.0])
    np.testing.assert_array_equal(hard_responsibilities(d), [0.0, 0.5, 0.5, 0.0])
    np.testing.assert_array_equal(hard_responsibilities(d, ties="first"), [0.0, 1.0, 0.0, 0.0])
    # H2 on the exact tier: at tau = 1e-3 the tied minima hold all but e^-1000 of the mass, equally.
    r = exact.responsibilities(d, 1e-3)
    assert r[1] == r[2] and float(r[1]) == 0.5 and float(r[0]) < 1e-300
    q, k, v = np.array([[1.0]]), np.array([[2.0], [2.0], [1.0]]), np.array([[10.0], [20.0], [99.0]])
    np.testing.assert_array_equal(hard_attention(q, k, v), [[15.0]])
    np.testing.assert_array_equal(hard_attention(q, k, v, ties="first"), [[10.0]])


# --- subnormal and overflowing intermediates; float32 ---


def test_subnormal_results_are_returned_as_such():
    d = np.array([0.0, 745.0])  # r_1 = e^-745 ~ 4.9e-324: the smallest subnormal
    for r in both_r(d):
        assert r[1] == 5e-324
    for L in both_L(np.array([0.0, 745.0])):
        assert L == 5e-324


def test_no_overflow_in_intermediates():
    logits = np.array([1e300, 1e300 * (1 - 2**-50), -1e300])
    for r in both_r(-logits):
        assert np.isfinite(r).all() and r[2] == 0.0 and r[0] == 1.0
    x32 = np.array([100.0, 90.0, -100.0], dtype=np.float32)  # exp(100) overflows float32
    r32 = responsibilities(-x32)
    assert r32.dtype == np.float32 and np.isfinite(r32).all()
    np.testing.assert_array_equal(r32, exact.to_float(exact.responsibilities(-x32), np.float32))
    L32 = log_partition(-x32)
    assert L32.dtype == np.float32 and L32 == exact.to_float(exact.log_partition(-x32), np.float32)


def test_dtypes():
    assert responsibilities(np.ones(3, np.float32)).dtype == np.float32
    assert responsibilities(np.arange(3)).dtype == np.float64  # integers promoted
    np.testing.assert_array_max_ulp(responsibilities(np.arange(3)), exact.to_float(exact.responsibilities(np.arange(3))), maxulp=3)
    for fn in (responsibilities, exact.responsibilities):
        with pytest.raises(TypeError, match="d"):
            fn(np.ones(3, complex))
        with pytest.raises(TypeError, match="d"):
            fn(np.ones(3, bool))
        with pytest.raises(ValueError, match="mask"):
            fn(np.ones((2, 3)), mask=np.ones((3, 2), bool))


# --- causal with N != M: top-left (torch) by default, bottom-right as an option ---


@pytest.mark.parametrize("alignment, first_row_keys", [("top_left", 1), ("bottom_right", 3)])
def test_causal_alignments(rng, alignment, first_row_keys):
    q, k, v = rng.normal(size=(2, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 1))
    for a, lse, r in both_attention(q, k, v, is_causal=True, causal_alignment=alignment):
        assert (r[0] > 0).sum() == first_row_keys
        assert (r[1] > 0).sum() == first_row_keys + 1


def test_shape_errors_name_the_arguments():
    for fn in (attention, exact.attention):
        with pytest.raises(ValueError, match="k .*v|M"):
            fn(np.ones((1, 2)), np.ones((3, 2)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="energy"):
        exact.attention(np.ones((1, 2)), np.ones((3, 2)), np.ones((3, 1)), energy="cosine")


@pytest.mark.parametrize("sigma", [0.0, -1.0, np.nan, np.inf])
def test_bad_kernel_width_raises_on_both_tiers(sigma):
    from iem_ref import tanh_from_signed_gaussian

    for fn in (tanh_from_signed_gaussian, exact.tanh_from_signed_gaussian):
        with pytest.raises(ValueError, match="sigma"):
            fn(0.5, 1.0, sigma)
