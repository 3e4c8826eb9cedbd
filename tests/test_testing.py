"""iem_ref.testing: the helpers catch real defects, pass correct kernels, and say why.

Each "passes" test uses a correct implementation of the standard algorithm
in the stated dtype (the model the default tolerances are derived from,
iem_ref/testing.py); each "fails" test uses a defect a user could make and
checks that the report names what a person needs to act on.
"""

import numpy as np
import pytest

from iem_ref.testing import (
    assert_attention_close,
    assert_close_to_reference,
    assert_log_partition_close,
    assert_responsibilities_close,
    assert_softmax_close,
    ulp_error,
)


def naive_softmax(x):
    """What many first kernels do: no max subtraction (exp overflows for x > 88 in float32)."""
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def stable_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def naive_attention(q, k, v, scale):
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    return naive_softmax(s) @ v


@pytest.fixture
def spread_logits(rng):
    return rng.normal(0, 30, (4, 1000)).astype(np.float32)


def test_naive_float32_softmax_overflow_is_caught_with_a_readable_report(spread_logits):
    with np.errstate(over="ignore", invalid="ignore"):
        bad = naive_softmax(spread_logits)
    with pytest.raises(AssertionError) as info:
        assert_softmax_close(bad, spread_logits)
    msg = str(info.value)
    assert "NaN where the oracle is not NaN" in msg
    assert "first at index (" in msg
    assert "float32" in msg and "M = 1000" in msg
    assert "entropy of r" in msg


def test_stable_float32_softmax_passes(spread_logits):
    assert_softmax_close(stable_softmax(spread_logits), spread_logits)
    assert_softmax_close(stable_softmax(spread_logits[:, :50]), spread_logits[:, :50], exact=True)


def test_float64_kernels_pass_at_float64_tolerances(rng):
    x = rng.normal(0, 30, (3, 500))
    assert_softmax_close(stable_softmax(x), x)
    d = -x
    lse = -d.min(-1) + np.log(np.exp(-(d - d.min(-1, keepdims=True))).sum(-1))
    assert_log_partition_close(lse, d)


def test_small_error_is_caught_and_located(rng):
    x = rng.normal(0, 3, (3, 200)).astype(np.float32)
    r = stable_softmax(x)
    r[1, 17] *= np.float32(1 + 2.0**-17)  # 128 float32 ulps on one element
    with pytest.raises(AssertionError) as info:
        assert_softmax_close(r, x)
    msg = str(info.value)
    assert "mismatched elements: 1 / 600" in msg
    assert "at index (1, 17)" in msg
    assert "ulp (float32)" in msg and "condition 2|t_j| + 2 tbar" in msg


def test_default_tolerance_is_not_vacuous(rng):
    """A relative error of 2**-18 (64 u, u = 2**-24) on every element fails at spread ~3: tolerance ~ (9 + 6 + 5) u."""
    x = rng.normal(0, 1, (2, 64)).astype(np.float32)
    r = (stable_softmax(x.astype(np.float64)) * (1 + 2.0**-18)).astype(np.float32)
    with pytest.raises(AssertionError):
        assert_softmax_close(r, x)


def test_nan_and_inf_positions_must_match():
    d = np.array([[1.0, np.nan], [1.0, 2.0]])
    good = np.array([[np.nan, np.nan], [0.7310585786300049, 0.2689414213699951]])
    assert_responsibilities_close(good, d)
    wrong = good.copy()
    wrong[0] = [0.5, 0.5]  # finite where the policy says NaN
    with pytest.raises(AssertionError, match="oracle has NaN or inf"):
        assert_responsibilities_close(wrong, d)
    with pytest.raises(AssertionError, match="inf where the oracle is finite"):
        assert_log_partition_close(np.array([np.inf, -1.0]), np.array([[0.0, 1.0], [1.0, 2.0]]))
    assert_log_partition_close(np.array([np.inf]), np.array([[0.0, -np.inf]]))  # L = +inf is the policy


def test_log_partition_bound_is_absolute_and_rtol_makes_it_strict():
    d = np.array([0.0, 40.0])  # logits [0, -40]; L = 4.2e-18
    assert_log_partition_close(np.float64(0.0), d)  # max + log(sum): within its derived absolute bound
    with pytest.raises(AssertionError, match="rel err 1.000e\\+00"):
        assert_log_partition_close(np.float64(0.0), d, rtol=4 * 2.0**-53, atol=0.0)


def test_naive_float32_log_partition_overflow(spread_logits):
    with np.errstate(over="ignore"):
        lse = np.log(np.exp(spread_logits).sum(-1))
    with pytest.raises(AssertionError) as info:
        assert_log_partition_close(lse, -spread_logits)
    assert "inf where the oracle is finite" in str(info.value) and "kappa" in str(info.value)


def test_attention_helper(rng):
    q = rng.normal(0, 4, (2, 5, 8)).astype(np.float32)
    k = rng.normal(0, 4, (2, 7, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, 3)).astype(np.float32)
    scale = 1 / np.sqrt(8)
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(scale)
    good = stable_softmax(s) @ v
    assert_attention_close(good, q, k, v)
    assert_attention_close(good[:1], q[:1], k[:1], v[:1], exact=True)
    big_q = q * np.float32(40)  # scores in the thousands: exp overflows in float32
    with np.errstate(over="ignore", invalid="ignore"):
        bad = naive_attention(big_q, k, v, np.float32(scale))
    with pytest.raises(AssertionError) as info:
        assert_attention_close(bad, big_q, k, v)
    assert "NaN where the oracle is not NaN" in str(info.value) and "query (" in str(info.value)


def test_attention_helper_catches_the_wrong_causal_alignment(rng):
    q, k, v = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    bottom_right = np.arange(5)[None, :] <= np.arange(3)[:, None] + 2
    s = np.where(bottom_right, q @ k.T / 2, -np.inf)
    out = stable_softmax(s) @ v
    assert_attention_close(out, q, k, v, is_causal=True, causal_alignment="bottom_right")
    with pytest.raises(AssertionError, match="attention: arrays are not close"):
        assert_attention_close(out, q, k, v, is_causal=True)


def test_against_torch_sdpa_when_installed(rng):
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(2, 6, 16), (2, 9, 16), (2, 9, 4)])
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)  # a tensor that requires grad
    assert_attention_close(out, tq, tk, tv)
    assert_softmax_close(torch.softmax(tq, -1), tq)


def test_general_helper_and_ulp_error():
    assert_close_to_reference(np.float32(0.1), 0.1)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close_to_reference(np.zeros(3), np.zeros(4))
    with pytest.raises(AssertionError, match="ulp"):
        assert_close_to_reference(np.array([1.0 + 2.0**-40]), np.array([1.0]), reduction_length=4)
    assert ulp_error(np.float64(1.0) + 2.0**-52, 1.0) == 1.0
    assert ulp_error(np.float32(1.0), 1.0 + 2.0**-30) == pytest.approx(2.0**-7)
    assert ulp_error(np.nan, np.nan) == 0.0 and ulp_error(np.inf, 1.0) == np.inf


def test_docstring_examples_run_and_every_public_function_has_one():
    import iem_ref.testing as T
    from tests.test_exact import _run_doctests

    tests = _run_doctests(T)
    with_examples = {t.name.rsplit(".", 1)[-1] for t in tests if t.examples}
    functions = {name for name in T.__all__ if callable(getattr(T, name))}
    assert functions - {"assert_softmin_close"} <= with_examples
