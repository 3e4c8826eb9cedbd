"""Regression tests, each named after the bug it pins."""

import importlib

import numpy as np
import pytest

import iem_ref as R


@pytest.mark.equation("S4", "P5")
def test_tanh_from_signed_gaussian_keeps_evidence_beyond_2_to_53_m():
    # For |z| >= 2**53 m, z - m and z + m round to the same float: the quadratic energies
    # became equal and the result was 0 instead of sign(z).  tanh saturates to exactly +-1
    # in float64 for |z| > 19.1, so the expected values are exact.
    z = np.array([1e16, -3e16, 1e200, -1e300])
    expected = np.sign(z)
    np.testing.assert_array_equal(R.tanh_from_signed_gaussian(z), expected)
    np.testing.assert_array_equal(R.prototype_activation(z, [1.0, -1.0], [1.0, -1.0]), expected)


@pytest.mark.equation("G4")
def test_attention_vjp_nan_query_row_stays_inside_its_causal_window():
    # A NaN query row made r NaN on every entry of its row, masked ones included, and the
    # matmuls of dk and dv spread it to keys the row cannot see.  Query 1 (top-left causal)
    # sees keys 0 and 1 only: keys 2 and 3 must keep finite gradients.
    rng = np.random.default_rng(5)
    q, k, v, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    q[1, 0] = np.nan
    dq, dk, dv = R.attention_vjp(q, k, v, u, is_causal=True)
    assert np.isnan(dk[:2]).all() and np.isnan(dv[:2]).all()
    assert np.isfinite(dk[2:]).all() and np.isfinite(dv[2:]).all()
    assert np.isnan(dq[1]).all() and np.isfinite(np.delete(dq, 1, axis=0)).all()


@pytest.mark.equation("G4")
@pytest.mark.parametrize("path", ["cpu", "cuda"])
def test_accelerated_vjp_nan_query_row_has_the_reference_nan_pattern(path):
    mod = importlib.import_module(f"iem_ref.accel.{path}")
    rng = np.random.default_rng(5)
    q, k, v, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    q[1, 0] = np.nan
    for got, ref in zip(mod.attention_vjp(q, k, v, u, is_causal=True), R.attention_vjp(q, k, v, u, is_causal=True)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
