"""Attention (A1-A4 composed, T1, H1, P1) and the posterior statistics P2-P4.

The independent reference is a per-row loop: energies from plain formulas
(``q @ k.T`` or ``scipy.spatial.distance.cdist``), the participating keys
selected by index, ``scipy.special.softmax`` of the scores, a weighted sum.

Error argument for an output row (float64, ``u = 2**-53``): if every
energy is within ``e`` of exact, each ``r_j`` moves by ``<= 2 e * scale``
relative; SciPy's softmax adds ``(|s_j - max s| + 2 |max s| + M + 4) u``
relative and ours 6u; the weighted sum of ``M`` terms adds ``(M + 1) u``
per side.  Hence ``|a_i - a_ref_i| <= rel_i * sum_j r_ij |v_j|``.
"""

import itertools

import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy.spatial.distance import cdist

import iem_ref as R
from tests.conftest import U32, U64
from tests.tolerances import assert_within

N, M, D, DV = 5, 7, 4, 3

# Plain formulas, independent of iem_ref.energies, for every named energy.
PLAIN = {
    "dot": lambda q, k: -(q @ k.T),
    "sqeuclidean": lambda q, k: cdist(q, k, "sqeuclidean") / 2,
    "laplace": lambda q, k: cdist(q, k, "cityblock"),
    "cosine": lambda q, k: cdist(q, k, "cosine"),
    "student_t": lambda q, k: np.log1p(cdist(q, k, "sqeuclidean")),
    "huber": lambda q, k: scipy.special.huber(1.0, cdist(q, k, "euclidean")),
    "pseudo_huber": lambda q, k: scipy.special.pseudo_huber(1.0, cdist(q, k, "euclidean")),
}


def naive_attention(q, k, v, scale, take=None, energy="dot"):
    """Row-by-row attention (2-D q, k, v): select, softmax the scores, weigh the values."""
    d = PLAIN[energy](q, k)
    take = np.ones(d.shape, bool) if take is None else np.broadcast_to(take, d.shape)
    a = np.zeros((q.shape[0], v.shape[1]))
    lse = np.full(q.shape[0], -np.inf)
    r = np.zeros(d.shape)
    for i in range(q.shape[0]):
        sel = np.flatnonzero(take[i])
        if sel.size == 0:
            continue
        s = -d[i, sel] * scale
        r[i, sel] = scipy.special.softmax(s)
        a[i] = r[i, sel] @ v[sel]
        lse[i] = scipy.special.logsumexp(s)
    return a, lse, r, d


def attention_bound(q, k, v, scale, r, d):
    """``rel_i * sum_j r_ij |v_j|`` (see the module docstring), shape (N, Dv).

    Every kernel here is a sum of D terms built from the coordinates, so its
    absolute error per side is <= 4 (D + 4) u (|d| + |q|^2 + |k|^2)
    (the cosine adds a constant of the same order: we add 1 to the bracket).
    """
    e = 2 * 4 * (D + 4) * U64 * (np.abs(d).max() + (q**2).sum(-1).max() + (k**2).sum(-1).max() + 1)
    s = -d * scale
    s_rel = U64 * (np.abs(s - s.max(-1, keepdims=True)).max(-1) + 2 * np.abs(s).max(-1) + M + 4)
    rel = 2 * e * scale + s_rel + 6 * U64 + 2 * (M + 1) * U64
    return rel[:, None] * (r @ np.abs(v))


@pytest.fixture
def qkv(rng):
    return rng.normal(size=(N, D)), rng.normal(size=(M, D)), rng.normal(size=(M, DV))


# ---------------------------------------------------------------- A1-A4, T1, P1


@pytest.mark.equation("A4", "A1", "A3")
@pytest.mark.parametrize("energy", sorted(R.ENERGIES))
def test_attention_is_the_posterior_mean_for_every_energy(qkv, energy):
    q, k, v = qkv
    for scale in (None, 0.7, 3.0):
        s = 1 / np.sqrt(D) if scale is None else scale
        a, lse, r = R.attention(q, k, v, scale=scale, energy=energy, return_lse=True, return_responsibilities=True)
        a_ref, lse_ref, r_ref, d = naive_attention(q, k, v, s, energy=energy)
        assert a.shape == (N, DV) and lse.shape == (N,) and r.shape == (N, M)
        assert_within(a, a_ref, attention_bound(q, k, v, s, r_ref, d), f"A4 {energy} scale={scale}")
        rel = attention_bound(q, k, v, s, r_ref, d)[:, :1] / (r_ref @ np.abs(v))[:, :1]
        assert_within(r, r_ref, rel * r_ref + 1e-300, f"P1 {energy}")
        # LSE: the energies' error e * scale, plus (2 + kappa) ulps and logsumexp's own.
        assert_within(lse, lse_ref, rel[:, 0] * (np.abs(lse_ref) + (r_ref * np.abs(d * s)).sum(-1) + 1), f"LSE {energy}")
        # A4 literally: the output is r @ v (one matmul, (M + 1) u).
        assert_within(a, r @ v, 2 * (M + 1) * U64 * (r @ np.abs(v)), "a = r v")


@pytest.mark.equation("T1", "P1")
def test_scaled_dot_product_attention_is_softmin_at_tau_sqrt_d(qkv):
    q, k, v = qkv
    r = R.attention_responsibilities(q, k)
    ref = scipy.special.softmax(q @ k.T / np.sqrt(D), axis=-1)
    _, _, _, d = naive_attention(q, k, v, 1 / np.sqrt(D))
    rel = attention_bound(q, k, v, 1 / np.sqrt(D), ref, d)[:, :1] / (ref @ np.abs(v))[:, :1]
    assert_within(r, ref, rel * ref, "T1 vs scipy softmax")
    # ... which is A3 at tau = sqrt(D) on the unscaled energies -<q, k>.
    r3 = R.responsibilities(-(q @ k.T), tau=np.sqrt(D))
    assert_within(r, r3, (2 * (D + 1) * U64 * (np.abs(q) @ np.abs(k).T).max() * 2 / np.sqrt(D) + 12 * U64) * r3, "T1 = A3")
    # and the weights of attention() itself.
    assert np.array_equal(R.attention(q, k, v, return_responsibilities=True)[1], r)


@pytest.mark.equation("A4", "P1")
def test_callable_energy_and_return_order(qkv):
    q, k, v = qkv
    f = lambda qq, kk: cdist(qq, kk, "chebyshev")  # noqa: E731 - any f(q, k) -> d
    a, r = R.attention(q, k, v, energy=f, scale=1.0, return_responsibilities=True)
    ref = scipy.special.softmax(-cdist(q, k, "chebyshev"), axis=-1)
    assert_within(r, ref, (M + 20) * U64 * ref, "callable energy")
    a2, lse2, r2 = R.attention(q, k, v, energy=f, scale=1.0, return_lse=True, return_responsibilities=True)
    assert np.array_equal(a, a2) and np.array_equal(r, r2) and lse2.shape == (N,)
    # The "multiple alternatives contribute" of the note: every key has weight > 0.
    assert np.all(r > 0)


@pytest.mark.equation("A4")
def test_batch_axes_broadcast(rng):
    q = rng.normal(size=(2, 1, N, D))
    k = rng.normal(size=(1, 3, M, D))
    v = rng.normal(size=(3, M, DV))
    a, lse = R.attention(q, k, v, return_lse=True)
    assert a.shape == (2, 3, N, DV) and lse.shape == (2, 3, N)
    for i, j in itertools.product(range(2), range(3)):
        a1, l1 = R.attention(q[i, 0], k[0, j], v[j], return_lse=True)
        assert np.array_equal(a[i, j], a1) and np.array_equal(lse[i, j], l1)


@pytest.mark.equation("A4")
def test_mask_broadcasting_and_selection(rng, qkv):
    q, k, v = qkv
    full = rng.random((N, M)) < 0.6
    full[:, 2] = True
    for mask in (full, full[0], full[:1]):
        a = R.attention(q, k, v, mask=mask)
        assert a.shape == (N, DV)
        a_ref, _, r_ref, d = naive_attention(q, k, v, 1 / np.sqrt(D), take=np.broadcast_to(mask, (N, M)))
        assert_within(a, a_ref, attention_bound(q, k, v, 1 / np.sqrt(D), r_ref, d), f"mask {mask.shape}")
    # Masked keys are removed by selection: NaN or inf there cannot leak.
    kk, vv = k.copy(), v.copy()
    kk[~full[0]] = np.nan
    vv[~full[0]] = np.inf
    assert np.array_equal(R.attention(q, kk, vv, mask=full[0]), R.attention(q, k, v, mask=full[0]))
    assert np.array_equal(R.attention(q, k, v, mask=full[0]), R.attention(q, k[full[0]], v[full[0]]))
    # A batch mask over batched inputs.
    qb = np.stack([q, 2 * q])
    mb = rng.random((2, 1, M)) < 0.7
    mb[..., 0] = True
    ab = R.attention(qb, k, v, mask=mb)
    for b in range(2):
        assert np.array_equal(ab[b], R.attention(qb[b], k, v, mask=mb[b, 0]))


@pytest.mark.equation("A4")
@pytest.mark.parametrize("n, m", [(5, 5), (3, 7), (7, 3)])
def test_causal_alignments_equal_explicit_masks(rng, n, m):
    q, k, v = rng.normal(size=(n, D)), rng.normal(size=(m, D)), rng.normal(size=(m, DV))
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    top_left = j <= i
    bottom_right = j <= i + (m - n)
    a_tl, l_tl = R.attention(q, k, v, is_causal=True, return_lse=True)
    assert np.array_equal(a_tl, R.attention(q, k, v, mask=top_left))
    assert np.array_equal(l_tl, R.attention(q, k, v, mask=top_left, return_lse=True)[1])
    a_br = R.attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert np.array_equal(a_br, R.attention(q, k, v, mask=bottom_right))
    assert np.array_equal(R.causal_mask(n, m), top_left)
    assert np.array_equal(R.causal_mask(n, m, "bottom_right"), bottom_right)
    # Combined with a mask by AND.
    mask = rng.random((n, m)) < 0.7
    assert np.array_equal(R.attention(q, k, v, mask=mask, is_causal=True), R.attention(q, k, v, mask=mask & top_left))
    # Query 0 top-left sees key 0 only: its output is v_0.
    assert np.array_equal(a_tl[0], v[0])
    # bottom-right with n > m: the first n - m queries see no key (empty -> 0, LSE -inf).
    if n > m:
        a, lse = R.attention(q, k, v, is_causal=True, causal_alignment="bottom_right", return_lse=True)
        assert np.all(a[: n - m] == 0) and np.all(np.isneginf(lse[: n - m]))
        assert np.all(np.isfinite(lse[n - m :]))


@pytest.mark.equation("A4")
def test_return_lse_is_the_log_partition_of_the_scaled_energies(qkv):
    q, k, v = qkv
    for energy in ("dot", "laplace"):
        a, lse = R.attention(q, k, v, scale=0.3, energy=energy, return_lse=True)
        d = R.ENERGIES[energy](q, k)
        assert np.array_equal(lse, R.log_partition(d, tau=1 / 0.3))
        # and equals softmin_summary on the same energies, output included.
        a2, L2 = R.softmin_summary(d, v, 1 / 0.3)
        assert np.array_equal(L2, lse) and np.array_equal(a2, a)


@pytest.mark.equation("T2")
def test_scale_zero_is_uniform(qkv):
    q, k, v = qkv
    a, r = R.attention(q, k, v, scale=0.0, return_responsibilities=True)
    assert np.array_equal(r, np.full((N, M), 1 / M))
    assert_within(a, np.broadcast_to(v.mean(0), (N, DV)), 2 * (M + 1) * U64 * np.abs(v).mean(0), "scale 0")


# ---------------------------------------------------------------- hard attention (H1, H2, P3)


@pytest.mark.equation("H1", "P3")
def test_hard_attention_takes_the_value_of_the_highest_score(qkv):
    q, k, v = qkv
    a, r = R.hard_attention(q, k, v, return_responsibilities=True)
    win = np.argmax(q @ k.T, axis=-1)  # highest score = lowest energy
    assert np.array_equal(a, v[win])
    assert np.array_equal(r, np.eye(M)[win])
    # With a mask hiding each winner, the runner-up takes over.
    mask = np.ones((N, M), bool)
    mask[np.arange(N), win] = False
    a2 = R.hard_attention(q, k, v, mask=mask)
    assert np.array_equal(a2, v[np.argmax(np.where(mask, q @ k.T, -np.inf), -1)])
    # Causal: query 0 sees key 0 only.
    assert np.array_equal(R.hard_attention(q, k, v, is_causal=True)[0], v[0])


@pytest.mark.equation("H1", "P3")
def test_hard_attention_ties_split_or_first():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    k = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # query 0 ties keys 0 and 1
    v = np.array([[2.0], [4.0], [8.0], [16.0]])
    split = R.hard_attention(q, k, v)
    assert np.array_equal(split, [[3.0], [8.0]])
    first = R.hard_attention(q, k, v, ties="first")
    assert np.array_equal(first, [[2.0], [8.0]])
    _, r = R.hard_attention(q, k, v, return_responsibilities=True)
    assert np.array_equal(r, [[0.5, 0.5, 0, 0], [0, 0, 1, 0]])


@pytest.mark.equation("H2", "H1")
def test_soft_attention_tends_to_hard_attention(qkv):
    # |a_soft - a_hard| = |sum_{j != win} r_j (v_j - v_win)| <= (1 - r_win) max_j |v_j - v_win|.
    q, k, v = qkv
    hard = R.hard_attention(q, k, v)
    s = q @ k.T
    win = np.argmax(s, -1)
    spread = np.abs(v - v[win][:, None, :]).max(1)  # (N, DV)
    prev = np.inf
    for scale in (1.0, 10.0, 100.0, 1e4):
        a, r = R.attention(q, k, v, scale=scale, return_responsibilities=True)
        losers = 1 - r[np.arange(N), win]
        err = np.abs(a - hard)
        assert np.all(err <= losers[:, None] * spread + 4 * (M + 2) * U64 * np.abs(v).max())
        assert err.max() <= prev or err.max() < 1e-14
        prev = err.max()
    assert err.max() == 0.0


# ---------------------------------------------------------------- P2-P4


@pytest.mark.equation("P2")
def test_posterior_mean_scalar_and_vector_statistics(rng):
    r = R.responsibilities(rng.normal(size=(4, 6)))
    g = rng.normal(size=6)
    gv = rng.normal(size=(6, 3))
    assert_within(R.posterior_mean(r, g), np.array([sum(ri * gi for ri, gi in zip(row, g)) for row in r]), 2 * 7 * U64 * (r @ np.abs(g)), "P2 scalar")
    assert_within(R.posterior_mean(r, gv), np.einsum("nk,kd->nd", r, gv), 2 * 7 * U64 * (r @ np.abs(gv)), "P2 vector")
    # Masked hypotheses contribute nothing, even if their statistic is NaN.
    mask = np.array([True, True, False, True, False, True])
    g_bad = np.where(mask, g, np.nan)
    # (Summation order differs from the subset's: (K + 1) u per side.)
    assert_within(R.posterior_mean(r, g_bad, mask=mask), R.posterior_mean(r[:, mask], g[mask]), 2 * 7 * U64 * (r @ np.abs(g)), "P2 mask")
    # A participating NaN poisons exactly the rows that weigh it.
    g_nan = g.copy()
    g_nan[0] = np.nan
    assert np.all(np.isnan(R.posterior_mean(r, g_nan)))


@pytest.mark.equation("P3", "H2")
def test_posterior_mode_is_the_zero_temperature_limit_of_the_mean(rng):
    d = rng.normal(size=(5, 6))
    g = rng.normal(size=(6, 2))
    mode = R.posterior_mode(d, g)
    win = np.argmin(d, -1)
    assert np.array_equal(mode, g[win])
    spread = np.abs(g - g[win][:, None, :]).max(1)
    for tau in (1.0, 0.1, 0.01, 1e-3):
        r = R.responsibilities(d, tau)
        mean = R.posterior_mean(r, g)
        # mean - mode = sum_{j != win} r_j (g_j - g_win).
        losers = 1 - r[np.arange(5), win]
        assert np.all(np.abs(mean - mode) <= losers[:, None] * spread + 16 * U64 * np.abs(g).max())
    assert np.allclose(mean, mode, rtol=0, atol=16 * U64 * np.abs(g).max())
    # Ties: averaged (split) or first.
    dt = np.array([0.0, 0.0, 1.0])
    gt = np.array([1.0, 3.0, 100.0])
    assert float(R.posterior_mode(dt, gt)) == 2.0
    assert float(R.posterior_mode(dt, gt, ties="first")) == 1.0


@pytest.mark.equation("P4")
def test_posterior_variance_against_the_raw_form(rng):
    r = R.responsibilities(rng.normal(scale=2.0, size=(6, 9)))
    g = rng.normal(size=9) + 3.0
    var = R.posterior_variance(r, g)
    # The raw form sum r g^2 - (sum r g)^2 cancels: its error is about
    # (K + 4) u (sum r g^2 + a^2); the centred reference's is far smaller.
    a = r @ g
    raw = r @ g**2 - a**2
    assert_within(var, raw, 2 * (9 + 4) * U64 * (r @ g**2 + a**2), "P4 variance vs raw")
    assert np.all(var >= 0)
    # Vector statistic: per feature.
    gv = rng.normal(size=(9, 2))
    var_v = R.posterior_variance(r, gv)
    raw_v = r @ gv**2 - (r @ gv) ** 2
    assert_within(var_v, raw_v, 2 * 13 * U64 * (r @ gv**2 + (r @ gv) ** 2), "P4 vector")
    # Special cases: one-hot -> 0; fair sign -> 1.
    assert R.posterior_variance([0.0, 1.0, 0.0], [5.0, -2.0, 7.0]) == 0.0
    assert R.posterior_variance([0.5, 0.5], [1.0, -1.0]) == 1.0
    # A mask removes hypotheses even with NaN statistics.
    mask = np.arange(9) % 3 != 0
    r_m = R.responsibilities(rng.normal(size=(2, 9)), mask=mask)
    assert np.array_equal(R.posterior_variance(r_m, np.where(mask, g, np.nan), mask=mask), R.posterior_variance(r_m[:, mask], g[mask]))


@pytest.mark.equation("P4")
def test_posterior_entropy_bounds(rng):
    K = 11
    for tau in (0.1, 1.0, 10.0):
        r = R.responsibilities(rng.normal(size=(5, K)), tau)
        H = R.posterior_entropy(r)
        ref = scipy.stats.entropy(r, axis=-1)
        # Sum of K terms r log r, each within ~3u of itself (log, product): (K + 3) u per side.
        # SciPy also renormalises r by its sum (1 within 7u, see test_competition),
        # which moves r_j by that much relative: d(-r log r)/dr = -(1 + log r).
        renorm = (np.abs(r.sum(-1) - 1) + 2 * U64) * (r * np.abs(1 + np.log(r))).sum(-1)
        assert_within(H, ref, 2 * (K + 3) * U64 * np.abs(r * np.log(r)).sum(-1) + renorm, "P4 entropy")
        assert np.all(H >= 0) and np.all(H <= np.log(K) * (1 + 4 * K * U64))
    assert R.posterior_entropy(np.eye(K)[3]) == 0.0
    assert abs(R.posterior_entropy(np.full(K, 1 / K)) - np.log(K)) <= 2 * (K + 3) * U64 * np.log(K)
    # Entropy decreases as the posterior collapses (tau -> 0).
    d = rng.normal(size=K)
    Hs = [R.posterior_entropy(R.responsibilities(d, t)) for t in (10.0, 1.0, 0.1, 0.01)]
    assert all(a > b for a, b in zip(Hs, Hs[1:]))


# ---------------------------------------------------------------- dtypes


def test_float32_in_float32_out(rng):
    f = np.float32
    q, k, v = (rng.normal(size=s).astype(f) for s in ((N, D), (M, D), (M, DV)))
    outs = R.attention(q, k, v, return_lse=True, return_responsibilities=True)
    ref = R.attention(*(x.astype(np.float64) for x in (q, k, v)), return_lse=True, return_responsibilities=True)
    for o, o64 in zip(outs, ref):
        assert o.dtype == f
        assert np.array_equal(o, o64.astype(f))  # float64 inside, rounded once
    for o in R.hard_attention(q, k, v, return_responsibilities=True):
        assert o.dtype == f
    assert R.attention_responsibilities(q, k).dtype == f
    r = R.responsibilities(rng.normal(size=(N, M)).astype(f))
    assert R.posterior_mean(r, v).dtype == f
    assert R.posterior_mode(r, v).dtype == f
    assert R.posterior_variance(r, v).dtype == f
    assert R.posterior_entropy(r).dtype == f
    assert all(x.dtype == f for x in R.softmin_summary(r, v))
    # Mixed precision gives float64.
    assert R.attention(q, k, v.astype(np.float64)).dtype == np.float64
    assert_within(outs[0], ref[0], U32 * np.abs(ref[0]) + 1e-45, "float32 attention")
