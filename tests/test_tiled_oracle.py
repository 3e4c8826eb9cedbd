"""The tiled oracle (iem_ref.accel.verdict): the same sums, the same verdicts and reports as the reference, in bounded memory.

The sums of section 13 formed tile by tile agree with the ``N x M`` NumPy
forms; the verdicts (the worst error over its tolerance) of an emulated
low-precision kernel agree on every variant; a defective kernel gets the
same report; the default oracle is chosen as documented; and the NumPy
arrays a verdict allocates stay far below one ``N x M`` float64 array.
"""

import tracemalloc

import numpy as np
import pytest

from iem_ref import flex, lowp
from iem_ref.accel import cpu
from iem_ref.accel.verdict import forward_chunks
from iem_ref.attention import Competition, prepare_attention
from iem_ref.bounds import U64, forward_sums
from iem_ref.precision import Precision, round_to
from iem_ref.testing import TILED_PAIRS, assert_attention_close

B, H, N, M, D, DV = 2, 3, 45, 140, 16, 8
BF16 = Precision.of("bfloat16")


def _operands(rng, gqa=False):
    """bfloat16 values (the emulated kernels' inputs), held in float64."""
    hk = 1 if gqa else H
    return tuple(round_to(rng.normal(size=shape), "bfloat16").astype(np.float64)
                 for shape in ((B, H, N, D), (B, hk, M, D), (B, hk, M, DV)))


def _variants(rng):
    """Each call's keywords: every variant the oracle takes, one case each."""
    keep = rng.random((B, H, N, M)) > 0.25
    mask = rng.random((N, M)) > 0.2
    return [
        pytest.param(dict(), id="plain"),
        pytest.param(dict(is_causal=True), id="causal"),
        pytest.param(dict(is_causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
        pytest.param(dict(mask=mask), id="mask"),
        pytest.param(dict(window=(30, 4)), id="window"),
        pytest.param(dict(softcap=4.0, bias=rng.normal(size=(H, N, M)), alibi_slopes=[0.05, 0.1, 0.2]), id="softcap-bias-alibi"),
        pytest.param(dict(sinks=[0.5, 2.0, -1.0]), id="sinks"),
        pytest.param(dict(dropout_p=0.25, dropout_mask=keep), id="dropout"),
        pytest.param(dict(enable_gqa=True, is_causal=True), id="gqa"),
        pytest.param(dict(cu_seqlens_q=[0, 20, 45], cu_seqlens_k=[0, 60, 140], is_causal=True), id="segments"),
        pytest.param(dict(scale=0.0), id="scale-0"),
        pytest.param(dict(score_mod=_curved, mask_mod=flex.prefix_lm(50)), id="flex"),
    ]


def _curved(s, b, h, q_idx, kv_idx):
    """FlexAttention's score_mod (F1) reading every index: compiled into the tiled oracle's kernels."""
    return 3.0 * np.tanh(s / 3.0) + 0.01 * (h + 1) * (kv_idx - q_idx) + 0.1 * b


CASES = _variants(np.random.default_rng(7))


@pytest.mark.parametrize("kw", CASES)
def test_sums_agree_with_the_reference(rng, kw):
    """Each sum of :class:`ForwardSums`, tiled against ``N x M``: both are float64 sums of the same nonnegative terms
    (but ``wc_v``), each term within ``(D + 8) u64`` relative plus its weight's ``exp`` of a score that may differ by
    ``gamma_D`` of its size ``S`` (at most ``2 D max S u64`` absolute in the exponent), summed over ``M`` keys: so within
    ``rtol = (M + 4 D (1 + max S) + 16) u64``.  ``wc_v`` is signed: within ``rtol`` of its Cauchy-Schwarz magnitude
    ``sqrt(w wc2_v2)``."""
    q, k, v = _operands(rng, kw.get("enable_gqa", False))
    chunks = list(forward_chunks(q, k, v, BF16, **kw))
    inp = prepare_attention(q, k, v, **kw)
    comp = Competition(inp)
    a, L, r = comp.summary("zero")
    ref = forward_sums(comp, r, L, BF16)
    size = np.abs(q).sum(-1).max() * np.abs(k).max() * inp.scale
    rtol = (M + 4 * D * (1 + size) + 16) * U64
    for name in ref._fields:
        got = np.concatenate([np.asarray(getattr(ch.sums, name)) for ch in chunks]).reshape(np.shape(getattr(ref, name)))
        want = np.asarray(getattr(ref, name))
        if name == "wc_v":
            scale = np.sqrt(np.asarray(ref.w)[..., None] * np.asarray(ref.wc2_v2))
        else:
            scale = np.abs(want)
        np.testing.assert_array_less(np.abs(got - want), rtol * scale + 1e-300, err_msg=name)
    a_t = np.concatenate([ch.a for ch in chunks]).reshape(a.shape)
    np.testing.assert_allclose(a_t, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", CASES)
def test_verdicts_agree_with_the_reference(rng, kw):
    """An emulated bf16 kernel's worst error / tolerance under both oracles: their tolerances differ by the oracles' own
    errors (``8 u64 |a|`` against the tiled oracle's, both below ``1e-12`` relative), so the ratios agree to ``1e-6``."""
    q, k, v = _operands(rng, kw.get("enable_gqa", False))
    out, lse = lowp.attention(q, k, v, BF16, return_lse=True, **kw)
    for bound in ("probabilistic", "rigorous"):
        ref = assert_attention_close(out, q, k, v, lse=lse, precision=BF16, bound=bound, oracle="reference", **kw)
        tiled = assert_attention_close(out, q, k, v, lse=lse, precision=BF16, bound=bound, oracle="tiled", **kw)
        assert 0 < ref < 1
        assert tiled == pytest.approx(ref, rel=1e-6)


def test_a_defective_kernel_gets_the_same_report(rng):
    """A kernel that skips the final division on one query (its output off by the row's weight sum) fails under both
    oracles, at the same element, with the row's entropy and conditioning in the report."""
    q, k, v = _operands(rng)
    out = lowp.attention(q, k, v, BF16).astype(np.float64)
    out[1, 2, 17] *= 1.5
    reports = []
    for oracle in ("reference", "tiled"):
        with pytest.raises(AssertionError) as info:
            assert_attention_close(out, q, k, v, precision=BF16, oracle=oracle)
        reports.append(str(info.value))
    ref, tiled = reports
    assert "mismatched elements: 8 / " in ref and "mismatched elements: 8 / " in tiled
    assert "at index (1, 2, 17, " in ref and "at index (5, 17, " in tiled  # flat batch 1 * 3 + 2
    for msg in reports:
        assert "entropy of r" in msg and "worst weight condition" in msg
    assert "tiled float64 oracle" in tiled
    with pytest.raises(AssertionError, match="NaN where the oracle is not NaN"):
        bad = out.copy()
        bad[0, 0, 0, 0] = np.nan
        assert_attention_close(bad, q, k, v, precision=BF16, oracle="tiled")


@pytest.mark.parametrize("dtype, energy, n, expected", [
    pytest.param(np.float32, "dot", 2048, "tiled float64 oracle", id="float32-tiled"),
    pytest.param(np.float32, "dot", 2047, "float64 reference", id="float32-below-the-size"),
    pytest.param(np.float64, "dot", 2048, "float64 reference", id="float64-reference"),
    pytest.param(np.float32, "laplace", 2048, "float64 reference", id="laplace-reference"),
    pytest.param(np.float32, "sqeuclidean", 2048, "float64 reference", id="sqeuclidean-reference"),
])
def test_the_default_oracle(rng, dtype, energy, n, expected):
    """From TILED_PAIRS pairs on, below float64 scores and for the dot energy: tiled; else the reference."""
    assert TILED_PAIRS == 2048 * 2048
    q, k, v = (rng.normal(size=(1, 1, size, 2)).astype(dtype) for size in (n, 2048, 2048))
    out = np.zeros((1, 1, n, 2), dtype)  # wrong on purpose: the report names the oracle
    with pytest.raises(AssertionError, match=expected):
        assert_attention_close(out, q, k, v, energy=energy)


def test_the_oracle_argument_is_checked(rng):
    q, k, v = (x.astype(np.float32) for x in _operands(rng))
    out = cpu.attention(q, k, v)
    with pytest.raises(ValueError, match="oracle"):
        assert_attention_close(out, q, k, v, oracle="fast")
    with pytest.raises(ValueError, match="exact=True"):
        assert_attention_close(out, q, k, v, oracle="tiled", exact=True)


@pytest.mark.parametrize("energy", ["laplace", "sqeuclidean"])
def test_the_tiled_oracle_names_the_energies_it_judges(rng, energy):
    q, k, v = (x.astype(np.float32) for x in _operands(rng))
    with pytest.raises(ValueError, match=f"supports energy 'dot'; got '{energy}'"):
        assert_attention_close(np.zeros((B, H, N, DV), np.float32), q, k, v, oracle="tiled", energy=energy)


def test_memory_stays_below_one_score_matrix(rng):
    """At ``N = M = 4096`` one float64 score matrix is 134 MB; the tiled verdict's allocations (NumPy's and the kernels'
    scratch, which Numba reports to ``tracemalloc`` too) peak below a quarter of it, where the reference's hold several."""
    n, d = 4096, 16
    q, k, v = (rng.normal(size=(1, 1, n, d)).astype(np.float32) for _ in range(3))
    out = cpu.attention(q, k, v, is_causal=True)
    assert_attention_close(out, q, k, v, is_causal=True, oracle="tiled")  # compile and warm first
    tracemalloc.start()
    try:
        assert_attention_close(out, q, k, v, is_causal=True, oracle="tiled")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * n * 8 / 4, peak
