"""Regression tests, each named after the bug it pins."""

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
