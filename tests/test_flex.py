"""FlexAttention's score_mod and mask_mod (F1-F3): the documented examples against the built-in variants, the
index conventions, the edge-case policy, validation, the derivative, and the tiers that refuse them.

Tolerances: where a built-in variant and its score_mod are the same arithmetic in the same order (masks, an added
bias, ALiBi, the soft-cap's ``c tanh(x / c)``) the results are equal bit for bit, and the tests say so; where the
paths round differently (the soft-cap's slope ``1 - (s/c)^2`` against the complex step) the tolerance is the sum
of the two float64 computations' own derived bounds (``iem_ref.bounds.variant_vjp_error``, section 12).
"""

import numpy as np
import pytest

import iem_ref as R
from iem_ref import flex
from iem_ref.bounds import variant_vjp_error
from iem_ref.testing import assert_attention_close, assert_attention_vjp_close

from .conftest import U64

B, H, N, M, D, DV = 2, 3, 7, 9, 4, 3
SLOPES = np.array([0.5, 0.25, 0.125])
DOCS = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])  # three documents packed on N = M = 9 tokens
CU = np.array([0, 3, 7, 9])


def _case(seed=0, n=N, m=M):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, H, n, D)), rng.normal(size=(B, H, m, D)), rng.normal(size=(B, H, m, DV)),
            rng.normal(size=(B, H, n, DV)))


#: FlexAttention's documented examples and the built-in call each one equals: (flex keywords, built-in keywords, n)
EXAMPLES = [
    pytest.param(dict(mask_mod=flex.causal), dict(is_causal=True), N, id="causal"),
    pytest.param(dict(mask_mod=flex.sliding_window(2)), dict(window=(2, 0), is_causal=True), N, id="sliding_window"),
    pytest.param(dict(mask_mod=flex.prefix_lm(3)), dict(mask=(np.arange(M)[None, :] < 3) | (np.arange(M)[None, :] <= np.arange(N)[:, None])),
                 N, id="prefix_lm"),
    pytest.param(dict(mask_mod=flex.document(DOCS)), dict(cu_seqlens_q=CU, cu_seqlens_k=CU), M, id="document"),
    pytest.param(dict(mask_mod=flex.document(DOCS, causal=True)), dict(cu_seqlens_q=CU, cu_seqlens_k=CU, is_causal=True), M,
                 id="document_causal"),
    pytest.param(dict(score_mod=flex.relative_position), dict(bias=(np.arange(N)[:, None] - np.arange(M)[None, :]).astype(float)), N,
                 id="relative_position"),
    pytest.param(dict(score_mod=flex.alibi(SLOPES), mask_mod=flex.causal), dict(alibi_slopes=SLOPES, is_causal=True), N, id="alibi"),
    pytest.param(dict(score_mod=flex.softcap(2.0)), dict(softcap=2.0), N, id="softcap"),
]


@pytest.mark.equation("F1", "F2")
@pytest.mark.parametrize("mods,builtin,n", EXAMPLES)
def test_flexattention_examples_equal_the_builtin_variants_forward(mods, builtin, n):
    q, k, v, _ = _case(n=n)
    a, L = R.attention(q, k, v, return_lse=True, **mods)
    a0, L0 = R.attention(q, k, v, return_lse=True, **builtin)
    # the same arithmetic in the same order: the same numbers
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(L, L0)


@pytest.mark.equation("F3")
@pytest.mark.parametrize("mods,builtin,n", EXAMPLES)
def test_flexattention_examples_equal_the_builtin_variants_backward(mods, builtin, n):
    q, k, v, u = _case(n=n)
    got = R.attention_vjp(q, k, v, u, **mods)
    want = R.attention_vjp(q, k, v, u, **builtin)[:3]
    if "softcap" not in builtin:  # masks and added priors: slope exactly 1 (the complex step of x + c is h / h)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)
        return
    # V3's slope 1 - (s/c)^2 against the complex step's: each computation within its own bound of the truth
    tols = [a + b for a, b in zip(variant_vjp_error(q, k, v, u, **mods)[:3], variant_vjp_error(q, k, v, u, **builtin)[:3])]
    for x, y, tol in zip(got, want, tols):
        assert np.all(np.abs(x - y) <= tol)


@pytest.mark.equation("F1", "F2")
@pytest.mark.parametrize("batch", [pytest.param((), id="no-batch"), pytest.param((H,), id="heads"),
                                   pytest.param((B, H), id="batch-heads"), pytest.param((2, B, H), id="two-batch-axes")])
def test_indices_number_the_leading_batch_axes_and_the_heads(batch):
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=batch + (3, 2)), rng.normal(size=batch + (4, 2)), rng.normal(size=batch + (4, 1))
    seen = {}

    def record(score, b, h, q_idx, kv_idx):
        seen.update(b=np.broadcast_to(b, score.shape), h=np.broadcast_to(h, score.shape),
                    q=np.broadcast_to(q_idx, score.shape), kv=np.broadcast_to(kv_idx, score.shape))
        return score

    R.attention(q, k, v, score_mod=record)
    shape = batch + (3, 4)
    heads = batch[-1] if batch else 1
    lead = int(np.prod(batch[:-1], dtype=np.int64)) if batch else 1
    np.testing.assert_array_equal(seen["h"], np.broadcast_to((np.arange(lead * heads) % heads).reshape(batch + (1, 1)), shape))
    np.testing.assert_array_equal(seen["b"], np.broadcast_to((np.arange(lead * heads) // heads).reshape(batch + (1, 1)), shape))
    np.testing.assert_array_equal(seen["q"], np.broadcast_to(np.arange(3)[:, None], shape))
    np.testing.assert_array_equal(seen["kv"], np.broadcast_to(np.arange(4)[None, :], shape))


def test_grouped_query_heads_give_the_query_head():
    q, k, v, _ = _case()
    kv = slice(0, 1)
    per_head = lambda s, b, h, qi, ki: s + 0.3 * h  # noqa: E731
    a = R.attention(q, k[:, kv], v[:, kv], enable_gqa=True, score_mod=per_head)
    a0 = R.attention(q, np.repeat(k[:, kv], H, axis=1), np.repeat(v[:, kv], H, axis=1), score_mod=per_head)
    np.testing.assert_array_equal(a, a0)


# ------------------------------------------------------------------------------------- the edge-case policy
def _drop_key(j):
    return lambda s, b, h, qi, ki: np.where(ki == j, -np.inf, s)


@pytest.mark.parametrize("empty", ["zero", "nan"])
def test_minus_infinity_from_the_score_mod_excludes_the_key_as_a_mask_does(empty):
    q, k, v, u = _case()
    v = v.copy()
    v[..., 2, :] = np.nan  # an excluded key's value is never read
    mask = np.ones((N, M), bool)
    mask[:, 2] = False
    a = R.attention(q, k, v, score_mod=_drop_key(2), empty=empty)
    a0 = R.attention(q, k, v, mask=mask, empty=empty)
    assert np.isfinite(a).all()
    # the logits' path (x = -d scale, then exp) against the plain path (exp(-(d - m) / tau)): a few ulps per
    # weight on |v| < 5 over 8 keys: 2**8 u64 x 8 covers both sides
    assert np.max(np.abs(a - a0)) <= 2**8 * U64 * 8
    grads = R.attention_vjp(q, k, v, u, score_mod=_drop_key(2))
    assert all(np.isfinite(g_).all() for g_ in grads[:2]) and np.all(grads[2][..., 2, :] == 0)


@pytest.mark.parametrize("empty,expected", [pytest.param("zero", 0.0, id="zero"), pytest.param("nan", np.nan, id="nan")])
def test_a_row_the_mods_leave_without_keys_is_empty(empty, expected):
    q, k, v, _ = _case()
    nothing = lambda b, h, qi, ki: (qi < 3) | (ki < 0)  # noqa: E731 - rows 3.. keep no key
    a, L = R.attention(q, k, v, mask_mod=nothing, empty=empty, return_lse=True)
    np.testing.assert_array_equal(a[..., 3:, :], np.full(a[..., 3:, :].shape, expected))
    assert np.all(np.isneginf(L[..., 3:])) and np.isfinite(a[..., :3, :]).all()
    a2 = R.attention(q, k, v, score_mod=lambda s, b, h, qi, ki: np.where(qi < 3, s, -np.inf), empty=empty)
    np.testing.assert_array_equal(np.isnan(a2), np.isnan(a))


def test_a_key_excluded_before_the_score_mod_stays_excluded():
    q, k, v, _ = _case()
    lift = lambda s, b, h, qi, ki: np.where(np.isneginf(s), 5.0, s)  # noqa: E731 - tries to revive excluded keys
    bias = np.zeros((N, M))
    bias[:, 4] = -np.inf  # a -inf bias comes after the score_mod: it excludes
    a = R.attention(q, k, v, energy=lambda qq, kk: np.where(np.arange(M) == 4, np.inf, -qq @ np.swapaxes(kk, -1, -2)),
                    score_mod=lift)
    mask = np.ones((N, M), bool)
    mask[:, 4] = False
    assert np.max(np.abs(a - R.attention(q, k, v, mask=mask))) <= 2**8 * U64 * 8
    np.testing.assert_array_equal(R.attention(q, k, v, bias=bias, score_mod=lift), R.attention(q, k, v, bias=bias))


def test_nan_from_the_score_mod_spoils_its_row_only():
    q, k, v, u = _case()
    spoil = lambda s, b, h, qi, ki: np.where((qi == 1) & (ki == 0), np.nan, s)  # noqa: E731
    a = R.attention(q, k, v, score_mod=spoil)
    assert np.isnan(a[..., 1, :]).all() and np.isfinite(np.delete(a, 1, axis=-2)).all()
    dq = R.attention_vjp(q, k, v, u, score_mod=spoil)[0]
    assert np.isnan(dq[..., 1, :]).all() and np.isfinite(np.delete(dq, 1, axis=-2)).all()


def test_the_inputs_and_the_scores_are_never_modified():
    q, k, v, u = _case()
    copies = [x.copy() for x in (q, k, v, u)]

    def in_place(score, b, h, q_idx, kv_idx):
        score += 1.0
        return score

    with pytest.raises(ValueError, match="read-only"):
        R.attention(q, k, v, score_mod=in_place)
    R.attention_vjp(q, k, v, u, score_mod=flex.softcap(2.0), mask_mod=flex.causal)
    for x, c in zip((q, k, v, u), copies):
        np.testing.assert_array_equal(x, c)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw,error,match", [
    pytest.param(dict(score_mod=3.0), TypeError, "score_mod must be a callable", id="score_mod-not-callable"),
    pytest.param(dict(mask_mod="causal"), TypeError, "mask_mod must be a callable", id="mask_mod-not-callable"),
    pytest.param(dict(score_mod=flex.ScoreMod(flex.relative_position, ulps=-1.0)), ValueError, "ulps", id="negative-ulps"),
    pytest.param(dict(score_mod=flex.ScoreMod(flex.relative_position, grad=1.0)), TypeError, "grad", id="grad-not-callable"),
    pytest.param(dict(mask_mod=lambda b, h, qi, ki: qi - ki), TypeError, "booleans", id="mask_mod-not-bool"),
    pytest.param(dict(score_mod=lambda s, b, h, qi, ki: s > 0), TypeError, "real numbers", id="score_mod-bool"),
    pytest.param(dict(score_mod=lambda s, b, h, qi, ki: s[..., :2]), ValueError, "broadcast", id="score_mod-shape"),
    pytest.param(dict(mask_mod=lambda b, h, qi, ki: np.ones((2, 2), bool)), ValueError, "broadcast", id="mask_mod-shape"),
])
def test_bad_mods_are_refused_by_name(kw, error, match):
    q, k, v, _ = _case()
    with pytest.raises(error, match=match):
        R.attention(q, k, v, **kw)


# --------------------------------------------------------------------------------------------- the derivative
def _leaky(score, b, h, q_idx, kv_idx):
    return np.where(score > 0, score, 0.5 * score)  # NumPy orders complex numbers by their real part first


def _leaky_grad(score, b, h, q_idx, kv_idx):
    return np.where(score > 0, 1.0, 0.5)


def _quantised(score, b, h, q_idx, kv_idx):
    return np.floor(4.0 * score) / 4.0  # floor has no complex form


@pytest.mark.equation("F3")
@pytest.mark.parametrize("mod", [pytest.param(_leaky, id="complex-step"),
                                 pytest.param(flex.ScoreMod(_leaky, grad=_leaky_grad), id="given-grad")])
def test_a_piecewise_score_mod_against_central_differences(mod):
    q, k, v, u = _case()
    dq = R.attention_vjp(q, k, v, u, score_mod=mod)[0]
    # central difference in q[1, 2, 3, 0]: the step 1e-6 moves the row's scores x = q k^T / 2 by at most
    # 1e-6 |k_j0| / 2, less than any |x_j| of the row, so each stays on its side of 0, where the map is linear in
    # the scores: truncation ~ (second derivative of the softmax, O(1)) 1e-12, rounding ~ 4 u |loss| / 2e-6 < 1e-8
    x_row = k[1, 2] @ q[1, 2, 3] / 2.0
    assert np.min(np.abs(x_row)) > 1e-6 * np.max(np.abs(k[1, 2, :, 0])) / 2.0
    loss = lambda qq: float((u * R.attention(qq, k, v, score_mod=_leaky)).sum())  # noqa: E731
    e = np.zeros_like(q)
    e[1, 2, 3, 0] = 1e-6
    assert abs(dq[1, 2, 3, 0] - (loss(q + e) - loss(q - e)) / 2e-6) < 1e-8


def test_a_score_mod_without_a_complex_form_needs_its_derivative():
    q, k, v, u = _case()
    assert np.isfinite(R.attention(q, k, v, score_mod=_quantised)).all()  # the forward needs no derivative
    with pytest.raises(TypeError, match="grad="):
        R.attention_vjp(q, k, v, u, score_mod=_quantised)
    flat = flex.ScoreMod(_quantised, grad=lambda s, b, h, qi, ki: np.zeros_like(s))  # a step function: slope 0
    dq, dk, dv = R.attention_vjp(q, k, v, u, score_mod=flat)
    assert not dq.any() and not dk.any() and np.isfinite(dv).all()


@pytest.mark.equation("F3")
def test_the_complex_step_is_as_accurate_as_the_function():
    # tanh's slope sech^2 x = 1 / cosh^2 x (three roundings and cosh's ulp: within 4 ulps) and the complex step's
    # Im tanh(x + i h) / h (numpy's complex tanh to a few ulps; h^2 |f'''| / 6 < 2**-200 relative): 8 u between
    # them, relative, where 1 - tanh^2 x would have lost every digit to cancellation for |x| > 19
    x = np.linspace(-20.0, 20.0, 401)[None, :]
    idx = flex.flex_indices((), 1, x.shape[-1])
    g = flex.score_mod_slope(lambda s, b, h, qi, ki: np.tanh(s), x, idx)
    np.testing.assert_allclose(g, (1.0 / np.cosh(x)) ** 2, rtol=8 * U64, atol=0)
    # infinite scores have slope 0
    inf = np.array([[np.inf, -np.inf, 1.0]])
    assert flex.score_mod_slope(flex.relative_position, inf, flex.flex_indices((), 1, 3)).tolist() == [[0.0, 0.0, 1.0]]


# -------------------------------------------------------------------------------------- the tiers that refuse
def test_other_tiers_refuse_the_mods_by_name():
    q, k, v, u = _case()
    from iem_ref import exact

    with pytest.raises(TypeError, match="score_mod"):
        exact.attention(q[0, 0, :2], k[0, 0, :3], v[0, 0, :3], score_mod=flex.relative_position)
    a = R.attention(q, k, v, score_mod=flex.relative_position)
    with pytest.raises(ValueError, match="exact tier"):
        assert_attention_close(a, q, k, v, exact=True, score_mod=flex.relative_position)
    grads = R.attention_vjp(q, k, v, u, mask_mod=flex.causal)
    with pytest.raises(ValueError, match="mask_mod"):
        assert_attention_vjp_close(*(g.astype(np.float32) for g in grads), *(x.astype(np.float32) for x in (q, k, v, u)),
                                   oracle="tiled", mask_mod=flex.causal)


def test_accel_cuda_refuses_the_mods_by_name():
    pytest.importorskip("numba")
    from iem_ref.accel import cuda

    q, k, v, _ = _case()
    with pytest.raises(TypeError, match="score_mod"):
        cuda.attention(q, k, v, score_mod=flex.relative_position)


def test_the_emulated_baseline_runs_the_mods():
    """baseline="emulated" judges a kernel by iem_ref.lowp's emulation, which runs the mods as the kernel model says."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from iem_ref import lowp

    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k, v, _ = (x.astype(bf16) for x in _case())
    kw = dict(score_mod=_curved, mask_mod=flex.prefix_lm(3))
    out = lowp.attention(q, k, v, **kw)
    assert assert_attention_close(out, q, k, v, baseline="emulated", **kw) <= 1
    with pytest.raises(AssertionError):  # the emulation without its score_mod is another kernel
        assert_attention_close(lowp.attention(q, k, v, mask_mod=flex.prefix_lm(3)), q, k, v, baseline="emulated", **kw)


def test_the_oracle_judges_a_float32_kernel_with_mods_by_default():
    """At sizes where a plain call would go to the tiled oracle, a call with mods is judged by the reference."""
    q, k, v, u = (x.astype(np.float32) for x in _case())
    kw = dict(score_mod=flex.softcap(2.0), mask_mod=flex.causal)
    a = R.attention(q, k, v, **kw)
    assert assert_attention_close(a, q, k, v, **kw) < 1
    assert assert_attention_vjp_close(*R.attention_vjp(q, k, v, u, **kw), q, k, v, u, **kw) < 1
    with pytest.raises(AssertionError):  # the same output judged without the score_mod
        assert_attention_close(a, q, k, v, mask_mod=flex.causal)


# ------------------------------------------------------------------------------------------------ accel.cpu
# Each score_mod compiles kernels of its own (a few seconds each): the default tier runs float32, where the kernel's
# scores round to a coarser dtype than its float64 score_mod, and the slow tier float64 too.
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64", marks=pytest.mark.slow)]


@pytest.mark.equation("F1", "F2")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mods,builtin,n", EXAMPLES)
def test_accel_cpu_runs_the_examples_as_its_builtin_variants(mods, builtin, n, dtype):
    """The kernel compiles the score_mod in and evaluates it in float64 where it evaluates V1-V3, and takes the
    mask_mod as a mask: the same numbers as its own built-in variants, forward; backward where the slope is 1."""
    pytest.importorskip("numba")
    from iem_ref.accel import cpu

    q, k, v, u = (x.astype(dtype) for x in _case(n=n))
    a, L = cpu.attention(q, k, v, return_lse=True, **mods)
    if "cu_seqlens_q" in builtin:  # packed segments cut the query blocks at their starts: another order, judged
        assert assert_attention_close(a, q, k, v, lse=L, **mods) < 1
        assert assert_attention_vjp_close(*cpu.attention_vjp(q, k, v, u, **mods), q, k, v, u, **mods) < 1
        return
    a0, L0 = cpu.attention(q, k, v, return_lse=True, **builtin)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(L, L0)
    grads = cpu.attention_vjp(q, k, v, u, **mods)
    if "softcap" in builtin:  # the slopes round differently: judged as a kernel by the oracle
        assert assert_attention_vjp_close(*grads, q, k, v, u, **mods) < 1
        return
    for x, y in zip(grads, cpu.attention_vjp(q, k, v, u, **builtin)[:3]):
        np.testing.assert_array_equal(x, y)


def _plain_python(x):
    return x  # not compiled by Numba: a score_mod that calls it cannot be


def _curved(s, b, h, q_idx, kv_idx):
    """A score_mod that reads every index: a cap, a per-head positional slope, a per-batch shift."""
    return 3.0 * np.tanh(s / 3.0) + 0.01 * (h + 1) * (kv_idx - q_idx) + 0.1 * b


@pytest.mark.equation("F1", "F2", "F3")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [
    pytest.param(dict(enable_gqa=True, mask_mod=flex.prefix_lm(40)), id="gqa-prefix_lm"),
    pytest.param(dict(cu_seqlens_q=[0, 80, 200], cu_seqlens_k=[0, 250, 600], is_causal=True), id="segments-causal"),
    pytest.param(dict(softcap=2.0, bias="random", sinks=[0.5, -1.0, 0.0, 2.0]), id="softcap-bias-sinks"),
    pytest.param(dict(energy="sqeuclidean", window=(64, 16)), id="sqeuclidean-window"),
])
def test_accel_cpu_with_a_score_mod_is_judged_correct_by_the_oracle(extra, dtype):
    """Two key tiles and key splits (N = 200, M = 600), every index read by the score_mod, with the variants
    it combines with: accel.cpu judged as a kernel by iem_ref.testing (the reference oracle, derived tolerances)."""
    pytest.importorskip("numba")
    from iem_ref.accel import cpu

    rng = np.random.default_rng(5)
    heads_kv = 2 if extra.get("enable_gqa") else 4
    q, k, v, u = (rng.normal(size=s).astype(dtype) for s in ((2, 4, 200, 16), (2, heads_kv, 600, 16), (2, heads_kv, 600, 5), (2, 4, 200, 5)))
    kw = dict(extra, score_mod=_curved)
    if kw.get("bias") == "random":
        kw["bias"] = rng.normal(size=(4, 200, 600))
    a, lse = cpu.attention(q, k, v, return_lse=True, **kw)
    assert assert_attention_close(a, q, k, v, lse=lse, **kw) < 1
    grads = cpu.attention_vjp(q, k, v, u, out=a, lse=lse, **kw)
    assert assert_attention_vjp_close(*grads[:3], q, k, v, u, **kw) < 1


@pytest.mark.parametrize("mod,match", [
    pytest.param(lambda s, b, h, qi, ki: _plain_python(s), "did not compile", id="calls-plain-python"),
    pytest.param(_quantised, "slope", id="no-complex-form"),
])
def test_accel_cpu_names_a_score_mod_it_cannot_compile(mod, match):
    pytest.importorskip("numba")
    from iem_ref.accel import cpu

    q, k, v, _ = _case()
    with pytest.raises(TypeError, match=match):
        cpu.attention(q, k, v, score_mod=mod)


def test_accel_cpu_takes_the_derivative_when_given():
    pytest.importorskip("numba")
    from iem_ref.accel import cpu

    q, k, v, u = _case()
    flat = flex.ScoreMod(_quantised, grad=lambda s, b, h, qi, ki: 0.0)
    dq, dk, dv = cpu.attention_vjp(q, k, v, u, score_mod=flat)
    assert not dq.any() and not dk.any()
    np.testing.assert_allclose(dv, R.attention_vjp(q, k, v, u, score_mod=flat)[2], rtol=0, atol=2**8 * U64 * 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accel_cpu_keeps_the_policy_with_mods(dtype):
    """-inf from the score_mod excludes (its NaN value never read), NaN spoils its row, a row left without keys is
    empty: the oracle compares the NaN and inf patterns exactly."""
    pytest.importorskip("numba")
    from iem_ref.accel import cpu

    q, k, v, u = (x.astype(dtype) for x in _case())
    v[..., 2, :] = np.nan
    mod = lambda s, b, h, qi, ki: np.where(ki == 2, -np.inf, np.where((qi == 1) & (ki == 0), np.nan, s))  # noqa: E731
    scalar = lambda s, b, h, qi, ki: -np.inf if ki == 2 else (np.nan if (qi == 1 and ki == 0) else s)  # noqa: E731
    rule = lambda b, h, qi, ki: (qi != 4) | (ki < 0)  # noqa: E731 - row 4 keeps no key
    for empty in ("zero", "nan"):
        a, lse = cpu.attention(q, k, v, score_mod=scalar, mask_mod=rule, empty=empty, return_lse=True)
        assert assert_attention_close(a, q, k, v, lse=lse, score_mod=mod, mask_mod=rule, empty=empty) < 1
        assert np.isnan(a[..., 1, :]).all()
    grads = cpu.attention_vjp(q, k, v, u, score_mod=scalar, mask_mod=rule)
    assert assert_attention_vjp_close(*grads, q, k, v, u, score_mod=mod, mask_mod=rule) < 1


# ------------------------------------------------------------------------------------------------ fuzzing
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fuzz import BUDGET, CI, attention_cases  # noqa: E402


@st.composite
def _table_cases(draw):
    """A fuzz case (special values, masks, causality, both energies and dtypes) with a random boolean and a finite float table."""
    case = draw(attention_cases(tiny=True))
    n, m = case["q"].shape[-2], case["k"].shape[-2]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keep = rng.random((n, m)) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    prior = np.round(rng.normal(size=(n, m)) * 4.0, 2)
    return case, keep, prior


@pytest.mark.equation("F1", "F2", "F3")
@settings(CI, max_examples=BUDGET["oracles"] // 2)
@given(_table_cases())
def test_fuzz_table_mods_equal_the_mask_and_bias_they_encode(drawn):
    """A mask_mod that reads a boolean table is that mask, and a score_mod that adds a finite table is that bias: the
    same numbers, the same NaN and inf pattern, forward and backward, through every special value of the fuzz cases."""
    case, keep, prior = drawn
    q, k, v, kw = case["q"], case["k"], case["v"], dict(case["kw"])
    base = kw.pop("mask", None)
    mask = keep if base is None else base & keep
    mods = dict(mask_mod=lambda b, h, qi, ki: keep[qi, ki], score_mod=lambda s, b, h, qi, ki: s + prior[qi, ki],
                **({} if base is None else dict(mask=base)))
    try:
        a0, L0 = R.attention(q, k, v, return_lse=True, mask=mask, bias=prior, **kw)
    except (TypeError, ValueError) as exc:  # bad input (scale=None with D = 0): the same error class
        with pytest.raises(type(exc)):
            R.attention(q, k, v, return_lse=True, **mods, **kw)
        return
    a, L = R.attention(q, k, v, return_lse=True, **mods, **kw)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(L, L0)
    kw.pop("empty", None)
    g = np.random.default_rng(0).normal(size=a.shape).astype(a.dtype)
    grads = R.attention_vjp(q, k, v, g, **mods, **kw)
    grads0 = R.attention_vjp(q, k, v, g, mask=mask, bias=prior, **kw)[:3]
    if kw["energy"] == "dot":  # the slope of s + c is exactly 1 (the complex step's h / h): the same sums
        for x, y in zip(grads, grads0):
            np.testing.assert_array_equal(x, y)
        return
    # squared Euclidean: with a score_mod dq also subtracts scale q_i sum_j dX_ij, which is 0 in exact arithmetic
    # here (no sink) and rounds to a few ulps of its terms: each side within its own float64 bound (section 12)
    tols = [t0 + t1 for t0, t1 in zip(variant_vjp_error(q, k, v, g, **mods, **kw)[:3],
                                      variant_vjp_error(q, k, v, g, mask=mask, bias=prior, **kw)[:3])]
    for x, y, tol in zip(grads, grads0, tols):
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        with np.errstate(invalid="ignore"):
            assert np.all((x == y) | np.isnan(x) | (np.abs(x - y) <= tol))


@pytest.mark.parametrize("mod,builtin", [
    pytest.param(flex.causal, dict(left=None, right=0), id="causal"),
    pytest.param(flex.sliding_window(3), dict(left=3, right=0), id="sliding_window"),
    pytest.param(flex.document(DOCS), dict(left=None, right=None, cu_seqlens=(CU, CU)), id="document"),
])
def test_a_mask_mod_narrows_the_kernels_key_ranges_as_the_builtin_structure_does(mod, builtin):
    """accel.cpu skips the key tiles a mask_mod masks wholly: its key ranges become those of the built-in structure."""
    from iem_ref.accel._problem import UNBOUNDED, key_ranges, mask_key_ranges

    mask = flex.mod_mask(mod, flex.flex_indices((), M, M), (M, M))[None]
    left = UNBOUNDED if builtin["left"] is None else builtin["left"]
    right = UNBOUNDED if builtin["right"] is None else builtin["right"]
    expected = key_ranges(M, M, left, right, cu_seqlens=builtin.get("cu_seqlens"))
    np.testing.assert_array_equal(mask_key_ranges(key_ranges(M, M), mask), expected)


def test_a_mask_mod_of_no_interval_shape_keeps_every_key_range():
    from iem_ref.accel._problem import key_ranges, mask_key_ranges

    stripes = flex.mod_mask(lambda b, h, qi, ki: (qi + ki) % 3 != 0, flex.flex_indices((), N, M), (N, M))[None]
    keys = key_ranges(N, M)
    np.testing.assert_array_equal(mask_key_ranges(keys, stripes), keys)
