"""Shared tolerance helpers for the reference tests.

Every bound used in the suite is built here from the unit roundoff ``u``
(``U64``/``U32`` in ``conftest``) and a stated error argument; the helpers
only do the bookkeeping and print the worst points when an assertion fails
(max and mean differences, as scipy's and FlashAttention's tests do).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np


def assert_within(actual, expected, bound, what=""):
    """Assert ``|actual - expected| <= bound`` elementwise (``bound`` broadcasts).

    NaN must match NaN and infinities must match exactly; the message shows
    the worst absolute difference, the ratio error/bound and where it is.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), np.broadcast_shapes(actual.shape, expected.shape))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN pattern differs at {np.argwhere(nan_a != nan_e)[:5].tolist()}"
    inf_e = np.isinf(expected)
    assert np.array_equal(actual[inf_e], expected[inf_e]), f"{what}: infinities differ"
    ok = ~(nan_e | inf_e)
    assert not np.isnan(bound[ok]).any(), f"{what}: the bound is NaN somewhere (a defect of the test)"
    err = np.where(ok, np.abs(actual - expected), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, err / bound, 0.0)
    bad = ratio > 1
    if bad.any():
        worst = np.unravel_index(np.argmax(ratio), ratio.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {ok.sum()} values exceed the bound; worst at {worst}: "
            f"actual {actual[worst]!r}, expected {expected[worst]!r}, |diff| {err[worst]:.3e}, "
            f"bound {bound[worst]:.3e} (ratio {ratio[worst]:.2f}); max |diff| {err.max():.3e}, "
            f"mean |diff| {err[ok].mean() if ok.any() else 0:.3e}"
        )


def ulps(actual, exact):
    """Distance in ulps of the (float64) ``exact`` value: ``|actual - exact| / spacing(exact)``."""
    exact = np.asarray(exact, dtype=np.float64)
    return np.abs(np.asarray(actual, dtype=np.float64) - exact) / np.spacing(np.abs(exact))


def fd_step(eps_f, third, floor=2.0**-30, ceil=2.0**-4):
    """The central-difference step that balances truncation and rounding, as a power of two.

    The central difference ``(f(x+h) - f(x-h)) / 2h`` has truncation error
    ``<= h^2 |f'''| / 6`` and rounding error ``<= eps_f / h`` when each
    evaluation of ``f`` is within ``eps_f`` of its exact value; the sum is
    minimised at ``h = (3 eps_f / |f'''|)^(1/3)``.  A power of two keeps
    ``x +- h`` and the step exact for ``|x| < 1``.
    """
    h = (3.0 * eps_f / max(third, 1e-300)) ** (1.0 / 3.0)
    h = min(max(h, floor), ceil)
    return 2.0 ** round(math.log2(h))


def fd_bound(h, eps_f, third):
    """Truncation + rounding bound of a central difference at step ``h`` (see :func:`fd_step`)."""
    return h * h * third / 6.0 + eps_f / h


def central_difference(f, x, index, h):
    """``d f / d x[index]`` by a central difference of step ``h``.

    The actual step is ``(x+h) - (x-h)`` as represented (computed exactly by
    Sterbenz's lemma), so a rounded ``x +- h`` does not bias the quotient.
    """
    xp = np.array(x, dtype=np.float64, copy=True)
    xm = np.array(x, dtype=np.float64, copy=True)
    xp[index] = x[index] + h
    xm[index] = x[index] - h
    step = xp[index] - xm[index]
    return (np.asarray(f(xp), dtype=np.float64) - np.asarray(f(xm), dtype=np.float64)) / step


def decimal_softmin(row, tau=1.0, digits=50):
    """Responsibilities and log-partition of one row of float energies in ``digits``-digit decimal.

    Independent of the reference's floating-point arithmetic: the float inputs
    are converted exactly, and only the final results are rounded.
    """
    with localcontext() as ctx:
        ctx.prec = digits
        t = Decimal(float(tau))
        e = [Decimal(float(x)) / t for x in row]
        m = min(e)
        w = [(-(x - m)).exp() for x in e]
        s = sum(w)
        r = [float(x / s) for x in w]
        L = float(-m + s.ln())
    return np.array(r), L
