"""Streaming: block partials (M1) and their merge (M2) against the one-pass result.

Error argument for a merged result (float64, ``u = 2**-53``).  A key ``j``
in block ``B`` ends with weight ``exp(-(d_j - m_B)/tau) * prod_l c_l``, each
merge ``l`` on its way to the root contributing ``c_l = exp(-y_l)`` with
``y_l >= 0`` and ``sum_l y_l = (m_B - m)/tau``.  Forming ``x_B = (d_j - m_B)/tau``
costs ``2u x_B`` in the exponent (subtraction, division) and ``exp`` 2u;
each ``c_l`` costs ``2u y_l + 2u`` and its product u.  So with ``X_j =
(d_j - m)/tau`` and a tree of depth at most ``k``, the weight is within
``delta_j = u (2 X_j + 2 + 3k)`` relative; the block sums of ``Mb`` terms
and one addition per merge add ``(Mb + k) u`` relative to the sums.  A
relative perturbation ``delta_j`` of the weights moves ``a = o / l`` by
``<= sum_j r_j delta_j (|v_j| + |a|)`` and ``L = -m/tau + log l`` by
``sum_j r_j delta_j``; the division, ``-m/tau`` and the log add ``u`` each.
The one-pass reference (``softmin_summary``) adds its own 6u + (M + 1)u
and ``(2 + kappa)`` ulps.
"""

import numpy as np
import pytest

import iem_ref as R
from tests.conftest import U64
from tests.tolerances import assert_within

N, M, DV = 4, 37, 3


def _bounds(d, v, tau, take, k, mb):
    """Bounds (a: (N, Dv), L: (N,)) for a merge tree of depth <= k over blocks of <= mb keys."""
    r = R.responsibilities(d, tau, mask=take)
    a, L = R.softmin_summary(d, v, tau, mask=take)
    m = np.where(take, d, np.inf).min(-1, keepdims=True)
    X = np.where(take, (d - m) / tau, 0.0)
    delta = U64 * (2 * X + 2 + 3 * k + mb + k)
    rd = r * delta  # (N, M)
    vv = np.where(take[..., None], np.abs(v)[None, :, :], 0.0)  # (N, M, Dv)
    a_b = (rd[..., None] * (vv + np.abs(a)[:, None, :])).sum(1) + U64 * np.abs(a) + (6 + M + 1) * U64 * (r @ np.abs(v))
    cond = (r * np.abs(np.where(take, d, 0.0) / tau)).sum(-1)
    L_b = rd.sum(-1) + U64 * (2 * np.abs(m[:, 0] / tau) + 2 * np.abs(L) + 1) + 2 * U64 * (2 * np.abs(L) + cond)
    return a, L, a_b, L_b


def _random_blocks(rng, m, nblocks):
    """Split range(m) into nblocks consecutive-or-shuffled blocks, some possibly empty."""
    cuts = np.sort(rng.integers(0, m + 1, size=nblocks - 1))
    order = rng.permutation(m) if rng.random() < 0.5 else np.arange(m)
    return [order[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, m])]


def _merge_random_tree(rng, parts):
    """Merge partials in a random tree shape and order; return (result, depth)."""
    pool = [(p, 0) for p in parts]
    while len(pool) > 1:
        i, j = rng.choice(len(pool), size=2, replace=False)
        (p, di), (q, dj) = pool[i], pool[j]
        merged = (R.merge_partials(p, q), max(di, dj) + 1)
        pool = [x for n, x in enumerate(pool) if n not in (i, j)] + [merged]
    return pool[0]


@pytest.mark.equation("M1")
def test_one_block_partial_is_the_softmin_summary(rng):
    d = rng.normal(scale=3.0, size=(N, M))
    v = rng.normal(size=(M, DV))
    take = np.ones((N, M), bool)
    for tau in (1.0, 0.4):
        p = R.partial_posterior(d, v, tau)
        assert p.m.shape == (N,) and p.l.shape == (N,) and p.o.shape == (N, DV)
        assert np.array_equal(p.m, d.min(-1))
        # M1 literally: l = sum exp(-(d - m)/tau), o = sum exp(-(d - m)/tau) v.
        w = np.exp(-(d - p.m[:, None]) / tau)
        assert_within(p.l, w.sum(-1), 2 * M * U64 * w.sum(-1), "M1 l")
        assert_within(p.o, w @ v, 2 * (M + 1) * U64 * (w @ np.abs(v)), "M1 o")
        assert np.all(p.l >= 1)  # the minimum contributes exactly 1
        a, L = R.finalize_partial(p)
        a_ref, L_ref, a_b, L_b = _bounds(d, v, tau, take, 0, M)
        assert_within(a, a_ref, a_b, "M1 finalize a")
        assert_within(L, L_ref, L_b, "M1 finalize L")


@pytest.mark.equation("M2", "M1")
@pytest.mark.parametrize("trial", range(6))
def test_any_split_merged_in_any_order_equals_one_pass(rng, trial):
    d = rng.normal(scale=4.0, size=(N, M))
    v = rng.normal(size=(M, DV))
    tau = (1.0, 0.3, 2.5)[trial % 3]
    take = rng.random((N, M)) < 0.8
    take[:, 5] = True
    nblocks = int(rng.integers(2, 9))
    blocks = _random_blocks(rng, M, nblocks)
    parts = [R.partial_posterior(d[:, b], v[b], tau, mask=take[:, b]) for b in blocks]
    mb = max(len(b) for b in blocks)
    a_ref, L_ref, a_b, L_b = _bounds(d, v, tau, take, nblocks - 1, mb)
    for _ in range(4):  # several random tree shapes and merge orders
        merged, depth = _merge_random_tree(rng, parts)
        assert depth <= nblocks - 1
        a, L = R.finalize_partial(merged)
        assert_within(a, a_ref, a_b, f"M2 a, blocks {[len(b) for b in blocks]}")
        assert_within(L, L_ref, L_b, f"M2 L, blocks {[len(b) for b in blocks]}")
    # The left fold (the online softmin of the fused kernels) too.
    acc = parts[0]
    for p in parts[1:]:
        acc = R.merge_partials(acc, p)
    a, L = R.finalize_partial(acc)
    assert_within(a, a_ref, a_b, "M2 left fold a")
    assert_within(L, L_ref, L_b, "M2 left fold L")


@pytest.mark.equation("M2")
def test_merge_is_commutative_with_the_empty_partial_as_identity(rng):
    d = rng.normal(size=(N, 8))
    v = rng.normal(size=(8, DV))
    p = R.partial_posterior(d[:, :3], v[:3])
    q = R.partial_posterior(d[:, 3:], v[3:])
    pq, qp = R.merge_partials(p, q), R.merge_partials(q, p)
    for x, y in zip(pq[:3], qp[:3]):
        assert np.array_equal(x, y)  # IEEE addition and min are commutative
    empty = R.partial_posterior(np.zeros((N, 0)), np.zeros((0, DV)))
    assert np.all(np.isposinf(empty.m)) and np.all(empty.l == 0) and np.all(empty.o == 0)
    for x, y in zip(R.merge_partials(p, empty)[:3], p[:3]):
        assert np.array_equal(x, y)
    for x, y in zip(R.merge_partials(empty, p)[:3], p[:3]):
        assert np.array_equal(x, y)
    # A fully masked block is empty too; the finalised empty partial is (0, -inf).
    masked = R.partial_posterior(d[:, :3], v[:3], mask=np.zeros(3, bool))
    assert np.all(np.isposinf(masked.m)) and np.all(masked.l == 0)
    a, L = R.finalize_partial(empty)
    assert np.all(a == 0) and np.all(np.isneginf(L))
    assert np.all(np.isnan(R.finalize_partial(empty, empty="nan")[0]))
    # Partials with different temperatures do not merge.
    with pytest.raises(ValueError, match="tau"):
        R.merge_partials(p, R.partial_posterior(d[:, 3:], v[3:], tau=2.0))


@pytest.mark.equation("M2")
def test_merge_matches_attention_lse(rng):
    # Split-K attention: partials over key blocks of the scaled energies, merged,
    # equal attention(..., return_lse=True) within the same bound.
    q = rng.normal(size=(N, 5))
    k = rng.normal(size=(M, 5))
    v = rng.normal(size=(M, DV))
    a_att, lse = R.attention(q, k, v, return_lse=True)
    d = R.dot_energy(q, k)
    tau = np.sqrt(5)
    parts = [R.partial_posterior(d[:, b], v[b], tau) for b in np.array_split(np.arange(M), 4)]
    acc = parts[0]
    for p in parts[1:]:
        acc = R.merge_partials(acc, p)
    a, L = R.finalize_partial(acc)
    _, _, a_b, L_b = _bounds(d, v, tau, np.ones((N, M), bool), 3, 10)
    assert_within(a, a_att, a_b, "split-K a")
    assert_within(L, lse, L_b, "split-K lse")


def test_partials_accumulate_in_float64(rng):
    # Documented: partials (and what finalize returns) are float64 accumulators,
    # as FlashAttention keeps float32 accumulators for half inputs.
    d = rng.normal(size=(2, 5)).astype(np.float32)
    v = rng.normal(size=(5, 2)).astype(np.float32)
    p = R.partial_posterior(d, v)
    assert p.m.dtype == p.l.dtype == p.o.dtype == np.float64
    a, L = R.finalize_partial(p)
    a_ref, L_ref = R.softmin_summary(d.astype(np.float64), v.astype(np.float64))
    _, _, a_b, L_b = _bounds(d.astype(np.float64), v.astype(np.float64), 1.0, np.ones((2, 5), bool), 0, 5)
    assert_within(a, a_ref, a_b, "float32 inputs a")
    assert_within(L, L_ref, L_b, "float32 inputs L")
