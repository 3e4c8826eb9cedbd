"""Responsibilities are gradients: G1-G4 against central finite differences.

How the step and the tolerance are chosen (see ``tests/tolerances.py``):
the central difference ``(f(x+h) - f(x-h)) / 2h`` differs from ``f'(x)`` by
at most ``h^2 max|f'''| / 6`` (truncation) plus ``eps_f / h`` (rounding),
where ``eps_f`` bounds the error of one evaluation of ``f``.  For each test
we bound ``|f'''|`` analytically (below) and ``eps_f`` from the reference's
accuracy, take the step ``h = (3 eps_f / |f'''|)^(1/3)`` that minimises the
sum (rounded to a power of two, so ``x +- h`` is exact for ``|x| < 1``) and
assert the analytic gradient within ``h^2 |f'''| / 6 + eps_f / h``.

Third-derivative bounds used (``tau`` the temperature):

- a log-partition along one energy is the cumulant-generating function of
  a Bernoulli(``r_j``) variable: ``|d^3 L / d d_j^3| = |r(1-r)(1-2r)| / tau^3
  <= 1 / (6 sqrt(3) tau^3)``;
- a responsibility along one energy is a logistic function of it (or a
  constant times one): ``|d^3 r_i / d d_j^3| <= max|sigma'''| / tau^3 =
  1 / (8 tau^3)``;
- a posterior mean ``E_r[b]`` whose scores move as ``s + delta c`` has third
  derivative ``E[(b - Eb)(c - Ec)^3] - 3 Cov(b, c) Var(c)``, bounded by
  ``(1 + 3/4) B C^3`` with ``B`` and ``C`` the ranges of ``b`` and ``c`` over
  the participating keys.
"""

import math

import numpy as np
import pytest

import iem_ref as R
from tests.conftest import U32, U64
from tests.tolerances import assert_within, central_difference, fd_bound, fd_step

L_THIRD = 1 / (6 * math.sqrt(3))
R_THIRD = 1 / 8


@pytest.mark.equation("G1")
@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_log_partition_gradient_is_minus_responsibilities(rng, tau):
    d = rng.normal(scale=2.0, size=(3, 7))
    g = R.log_partition_gradient(d, tau)
    r = R.responsibilities(d, tau)
    assert_within(g, -r / tau, U64 * r / tau, "G1 = -r/tau")
    # The log-partition is within (2 + kappa) ulps: eps_f = 2u (2|L| + sum r|d|/tau).
    third = L_THIRD / tau**3
    for i in range(d.shape[0]):
        L = R.log_partition(d[i], tau)
        eps_f = 2 * U64 * (2 * abs(L) + (r[i] * np.abs(d[i])).sum() / tau + 1)
        h = fd_step(eps_f, third)
        for j in range(d.shape[1]):
            fd = central_difference(lambda x: R.log_partition(x, tau), d[i], j, h)
            assert abs(fd - g[i, j]) <= fd_bound(h, eps_f, third), (i, j, fd, g[i, j])


@pytest.mark.equation("G1")
def test_log_partition_gradient_with_mask_and_axis(rng):
    d = rng.normal(size=(4, 5))
    mask = np.array([True, False, True, True, False])
    g = R.log_partition_gradient(d, 1.0, mask=mask)
    assert np.all(g[:, ~mask] == 0)
    assert np.array_equal(g[:, mask], R.log_partition_gradient(d[:, mask]))
    assert np.array_equal(R.log_partition_gradient(d.T, axis=0), R.log_partition_gradient(d).T)
    # Rows of G1 sum to -1/tau: the gradient of L along a shared shift is -1/tau (T3).
    assert np.all(np.abs(R.log_partition_gradient(d, 2.0).sum(-1) + 0.5) <= 8 * U64)


@pytest.mark.equation("G2")
@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_responsibilities_jacobian_by_finite_differences(rng, tau):
    d = rng.normal(size=6)
    J = R.responsibilities_jacobian(d, tau)
    r = R.responsibilities(d, tau)
    # Closed form -(diag r - r r^T)/tau: three roundings per entry.
    assert_within(J, -(np.diag(r) - np.outer(r, r)) / tau, 4 * U64 * (np.diag(r) + np.outer(r, r)) / tau, "G2 form")
    assert np.array_equal(J, J.T)
    assert np.all(np.abs(J.sum(0)) <= 8 * U64 / tau)  # sum_i r_i = 1 for every d
    # Each r_i within 3 ulps: eps_f = 6u (r_i <= 1).
    eps_f = 6 * U64
    third = R_THIRD / tau**3
    h = fd_step(eps_f, third)
    for j in range(d.size):
        fd = central_difference(lambda x: R.responsibilities(x, tau), d, j, h)
        assert_within(fd, J[:, j], fd_bound(h, eps_f, third), f"G2 column {j}")


@pytest.mark.equation("G2")
def test_responsibilities_jacobian_batched_and_masked(rng):
    d = rng.normal(size=(2, 3, 5))
    J = R.responsibilities_jacobian(d, 0.7)
    assert J.shape == (2, 3, 5, 5)
    assert np.array_equal(J[1, 2], R.responsibilities_jacobian(d[1, 2], 0.7))
    mask = np.array([True, True, False, True, True])
    Jm = R.responsibilities_jacobian(d[0, 0], mask=mask)
    assert np.all(Jm[~mask] == 0) and np.all(Jm[:, ~mask] == 0)
    assert np.array_equal(Jm[np.ix_(mask, mask)], R.responsibilities_jacobian(d[0, 0][mask]))


@pytest.mark.equation("G3")
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_neg_log_softmin_jacobian_by_finite_differences(rng, tau):
    d = rng.normal(size=6)
    J = R.neg_log_softmin_jacobian(d, tau)
    r = R.responsibilities(d, tau)
    assert_within(J, (np.eye(6) - r[None, :]) / tau, 2 * U64 * (np.eye(6) + r[None, :]) / tau, "G3 form")
    # y_i = d_i/tau + L: its third derivative is L's; each y_i within 3 ulps (6u |y_i|).
    y = R.neg_log_softmin(d, tau)
    eps_f = 6 * U64 * (np.abs(y).max() + 1)
    third = L_THIRD / tau**3
    h = fd_step(eps_f, third)
    for j in range(d.size):
        fd = central_difference(lambda x: R.neg_log_softmin(x, tau), d, j, h)
        assert_within(fd, J[:, j], fd_bound(h, eps_f, third), f"G3 column {j}")
    # exp(-y) = r makes J = d(-log r)/dd = -(1/r) dr/dd: consistent with G2.
    J2 = R.responsibilities_jacobian(d, tau)
    assert_within(J, -J2 / r[:, None], 8 * U64 * np.abs(J) + 8 * U64 / tau, "G3 = -G2 / r")


# ---------------------------------------------------------------- G4


N, M, D, DV = 4, 6, 3, 2


def _loss(u, **kw):
    return lambda q, k, v: float((u * R.attention(q, k, v, **kw)).sum())


def _g4_budget(q, k, v, u, scale, energy, take):
    """(eps_f, B_i, per-row energy error) for the scalar loss sum(u * attention).

    Energies: dot ``-<q, k>`` within (D + 1) u sum|q_t k_t|; sqeuclidean
    ``||q - k||^2 / 2`` within (D + 3) u of itself.  A perturbation ``e`` of
    the energies moves r by <= 2 e scale relative; the softmin adds 6u, the
    weighted sum (M + 1) u; the loss sums N Dv products (N Dv u).
    """
    if energy == "dot":
        e = (D + 1) * U64 * (np.abs(q) @ np.abs(k).T)
    else:
        e = (D + 3) * U64 * ((q[:, None, :] - k[None, :, :]) ** 2).sum(-1) / 2
    e = np.where(take, e, 0.0).max(-1)
    rel = 2 * e * scale + (6 + M + 1) * U64
    vmax = np.abs(v).max(0)  # (Dv,)
    a = R.attention(q, k, v, scale=scale, energy=energy, mask=take)
    eps_f = (rel * (np.abs(u) @ vmax)).sum() + N * DV * U64 * np.abs(u * a).sum()
    b = u @ v.T  # b_ij = <u_i, v_j>
    bmax = np.where(take, b, -np.inf).max(-1)
    bmin = np.where(take, b, np.inf).min(-1)
    B = np.where(np.isfinite(bmax), bmax - bmin, 0.0)
    return eps_f * 1.01, B, take  # 1.01: magnitudes move by <= h <= 2^-10 under the perturbation


def _range(c, take_row):
    c = np.where(take_row, c, np.nan)
    return 0.0 if np.isnan(c).all() else np.nanmax(c) - np.nanmin(c)


@pytest.mark.equation("G4")
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
@pytest.mark.parametrize("options", ["plain", "mask", "causal", "mask+causal"])
def test_attention_vjp_by_finite_differences(rng, energy, options):
    q = rng.uniform(-1, 1, size=(N, D))
    k = rng.uniform(-1, 1, size=(M, D))
    v = rng.uniform(-1, 1, size=(M, DV))
    u = rng.normal(size=(N, DV))
    scale = 0.9
    kw = dict(scale=scale, energy=energy)
    take = np.ones((N, M), bool)
    if "mask" in options:
        kw["mask"] = rng.random((N, M)) < 0.7
        kw["mask"][:, 0] = True
        kw["mask"][:, 3] = False  # a key no query sees: its dk, dv are exactly 0
        take &= kw["mask"]
    if "causal" in options:
        # Both alignments: top-left (query i sees keys j <= i) alone, bottom-right
        # (the last query sees every key) with the mask.
        align = "bottom_right" if "mask" in options else "top_left"
        kw["is_causal"] = True
        kw["causal_alignment"] = align
        take &= R.causal_mask(N, M, align)
    dq, dk, dv = R.attention_vjp(q, k, v, u, **kw)
    assert dq.shape == (N, D) and dk.shape == (M, D) and dv.shape == (M, DV)
    loss = _loss(u, **kw)
    eps_f, B, _ = _g4_budget(q, k, v, u, scale, energy, take)

    # dv: the loss is linear in v (third derivative 0): only rounding, at a large step.
    h = 2.0**-10
    for j in range(M):
        for c in range(DV):
            fd = central_difference(lambda x: loss(q, k, x), v, (j, c), h)
            assert abs(fd - dv[j, c]) <= eps_f / h, ("dv", j, c, fd, dv[j, c])

    # dq: row i's scores move by delta c_j with c_j = scale k_jt (dot) or
    # -scale (q_it - k_jt) (sqeuclidean; the shared delta^2 term cancels, T3).
    for i in range(N):
        for t in range(D):
            c = scale * k[:, t] if energy == "dot" else -scale * (q[i, t] - k[:, t])
            third = 1.75 * B[i] * _range(c, take[i]) ** 3
            h = min(fd_step(eps_f, third), 2.0**-10)
            fd = central_difference(lambda x: loss(x, k, v), q, (i, t), h)
            assert abs(fd - dq[i, t]) <= fd_bound(h, eps_f, third), ("dq", i, t, fd, dq[i, t])

    # dk: key j's score in every row i moves by g(delta) = c_i delta + e delta^2
    # with c_i = scale q_it, e = 0 (dot) or c_i = scale (q_it - k_jt), e = -scale/2
    # (sqeuclidean).  With F(x) the row's mean when key j's score moves by x,
    # |F'|, |F''| <= B_i and |F'''| <= 1.75 B_i (indicator range 1), so
    # |f'''| <= sum_i B_i (1.75 |g'|^3 + 3 |g'| |g''|), |g'| <= |c_i| + 2|e| h.
    e = 0.0 if energy == "dot" else scale / 2
    for j in range(M):
        for t in range(D):
            c = scale * q[:, t] if energy == "dot" else scale * (q[:, t] - k[j, t])
            gp = np.abs(c) + 2 * e * 2.0**-10
            third = float((np.where(take[:, j], B, 0.0) * (1.75 * gp**3 + 3 * gp * 2 * e)).sum())
            h = min(fd_step(eps_f, third), 2.0**-10)
            fd = central_difference(lambda x: loss(q, x, v), k, (j, t), h)
            assert abs(fd - dk[j, t]) <= fd_bound(h, eps_f, third), ("dk", j, t, fd, dk[j, t])

    if "mask" in options:
        assert np.all(dk[3] == 0) and np.all(dv[3] == 0)


@pytest.mark.equation("G4")
def test_routing_gradient_is_the_advantage(rng):
    # dLoss/ds_ij = r_ij (b_ij - sum_j' r_ij' b_ij'), checked on precomputed
    # energies (d = -s, tau = 1) through softmin_summary: the loss is a
    # posterior mean E_r[b_i] along one score, third derivative <= 1.75 B_i.
    d = rng.normal(size=(3, 5))
    v = rng.normal(size=(5, 2))
    u = rng.normal(size=(3, 2))
    r = R.responsibilities(d)
    b = u @ v.T
    dS = r * (b - (r * b).sum(-1, keepdims=True))
    loss = lambda x: float((u * R.softmin_summary(x, v)[0]).sum())  # noqa: E731
    eps_f = 1.01 * (6 + 5 + 1 + 6) * U64 * (np.abs(u) @ np.abs(v).max(0)).sum()
    for i in range(3):
        third = 1.75 * (b[i].max() - b[i].min())
        h = min(fd_step(eps_f, third), 2.0**-10)
        for j in range(5):
            fd = central_difference(loss, d, (i, j), h)
            assert abs(-fd - dS[i, j]) <= fd_bound(h, eps_f, third)
    # The advantage sums to zero over keys; dv is the responsibility-weighted upstream gradient.
    assert np.all(np.abs(dS.sum(-1)) <= 8 * U64 * (r * np.abs(b)).sum(-1))
    q = rng.normal(size=(3, 4))
    k = rng.normal(size=(5, 4))
    _, r = R.attention(q, k, v, return_responsibilities=True)
    dq, dk, dv = R.attention_vjp(q, k, v, u)
    assert_within(dv, r.T @ u, 2 * 4 * U64 * (r.T @ np.abs(u)), "dv = r^T u")


@pytest.mark.equation("G4")
def test_attention_vjp_batched_and_float32(rng):
    q = rng.normal(size=(2, 1, N, D))
    k = rng.normal(size=(1, 3, M, D))
    v = rng.normal(size=(3, M, DV))
    u = rng.normal(size=(2, 3, N, DV))
    dq, dk, dv = R.attention_vjp(q, k, v, u)
    assert dq.shape == (2, 3, N, D) and dk.shape == (2, 3, M, D) and dv.shape == (2, 3, M, DV)
    one = R.attention_vjp(q[1, 0], k[0, 2], v[2], u[1, 2])
    for full, single in zip((dq, dk, dv), one):
        assert np.array_equal(full[1, 2], single)
    f = np.float32
    args32 = [x.astype(f) for x in (q[0, 0], k[0, 0], v[0], u[0, 0])]
    out32 = R.attention_vjp(*args32)
    out64 = R.attention_vjp(*(x.astype(np.float64) for x in args32))
    for o32, o64 in zip(out32, out64):
        assert o32.dtype == f
        assert np.array_equal(o32, o64.astype(f))
        assert_within(o32, o64, U32 * np.abs(o64) + 1e-45, "float32 vjp")
    for fn in (R.log_partition_gradient, R.responsibilities_jacobian, R.neg_log_softmin_jacobian):
        assert fn(rng.normal(size=4).astype(f)).dtype == f
