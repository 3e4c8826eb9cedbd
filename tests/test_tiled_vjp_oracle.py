"""The tiled backward oracle (iem_ref.accel.verdict_vjp): section 14's tolerances and the verdicts of the reference, panel by panel.

The tolerance terms formed a panel of query rows at a time agree with the
``N x M`` NumPy forms; an emulated low-precision backward gets the same
verdict under both oracles; a defective one fails under both; what the
tiled backward cannot judge is named, and the default oracle chooses as
documented.
"""

import numpy as np
import pytest

from iem_ref import lowp
from iem_ref.accel import verdict_vjp
from iem_ref.accel.verdict_vjp import vjp_chunks
from iem_ref.attention import Competition, prepare_attention
from iem_ref.bounds import kernel_vjp_bounds
from iem_ref.precision import Precision, round_to
from iem_ref.testing import assert_attention_vjp_close

B, H, N, M, D, DV = 2, 2, 37, 90, 16, 8
BF16 = Precision.of("bfloat16")


def _operands(rng, gqa=False):
    """bfloat16 values (the emulated kernels' inputs and upstream gradient), held in float64."""
    hk = 1 if gqa else H
    return tuple(round_to(rng.normal(size=shape), "bfloat16").astype(np.float64)
                 for shape in ((B, H, N, D), (B, hk, M, D), (B, hk, M, DV), (B, H, N, DV)))


CASES = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(is_causal=True), id="causal"),
    pytest.param(dict(is_causal=True, causal_alignment="bottom_right"), id="causal-bottom-right"),
    pytest.param(dict(mask=np.random.default_rng(3).random((N, M)) > 0.2), id="mask"),
    pytest.param(dict(window=(20, 3)), id="window"),
    pytest.param(dict(enable_gqa=True, is_causal=True), id="gqa"),
]


BLOCKED = Precision.of("bfloat16", gradient_blocks=(16, 32))  # torch's CPU backward: partial sums stored per block

PRECISIONS = [pytest.param(BF16, id="bf16"), pytest.param(BLOCKED, id="bf16-stored-blocks")]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("bound", ["probabilistic", "rigorous"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_tolerances_agree_with_the_reference(rng, monkeypatch, kw, bound, precision):
    """Section 14 from the panels' sums and from ``N x M`` arrays: the same terms summed in another order (float64,
    nonnegative terms: within ``1e-9`` relative).  Panels of 8 query rows (stored blocks: whole blocks of 16), each
    against the keys its causality or window leaves it."""
    monkeypatch.setattr(verdict_vjp, "PANEL_BYTES", 8 * 24 * M * 8)
    q, k, v, u = _operands(rng, kw.get("enable_gqa", False))
    inp = prepare_attention(q, k, v, **kw)
    ref = kernel_vjp_bounds(Competition(inp), u, precision, bound)
    parts = [[], [], []]
    for ch in vjp_chunks(q, k, v, u, precision, chunk=1, **kw):
        for part, t, s in zip(parts, ch.terms, (inp.scale, inp.scale, 1.0)):
            part.append(s * t.bound(bound))
    for part, r in zip(parts, ref):
        got = np.concatenate(part).reshape(r.shape)
        live = r > 0
        np.testing.assert_array_equal(got > 0, live)
        np.testing.assert_allclose(got[live], r[live], rtol=1e-9)


@pytest.mark.parametrize("kw", CASES)
def test_verdicts_agree_with_the_reference(rng, kw):
    """An emulated bf16 backward's worst error / tolerance under both oracles: the tolerances differ by the oracles'
    own errors (below ``1e-9`` of them in bf16), so the ratios agree to ``1e-6``."""
    q, k, v, u = _operands(rng, kw.get("enable_gqa", False))
    grads = lowp.attention_vjp(q, k, v, u, BF16, **kw)[:3]
    ref = assert_attention_vjp_close(*grads, q, k, v, u, precision=BF16, oracle="reference", **kw)
    tiled = assert_attention_vjp_close(*grads, q, k, v, u, precision=BF16, oracle="tiled", **kw)
    assert 0 < ref < 1
    assert tiled == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["dq", "dk", "dv"])
def test_a_defective_backward_fails_under_both_oracles(rng, which):
    """One gradient element off by half of itself fails under both oracles, one mismatch each, named the same."""
    q, k, v, u = _operands(rng)
    grads = [np.array(g, np.float64) for g in lowp.attention_vjp(q, k, v, u, BF16)[:3]]
    grads[which][1, 0, 5, 3] *= 1.5
    name = ("dq", "dk", "dv")[which]
    for oracle in ("reference", "tiled"):
        with pytest.raises(AssertionError, match=f"{name}: arrays are not close") as info:
            assert_attention_vjp_close(*grads, q, k, v, u, precision=BF16, oracle=oracle)
        assert "mismatched elements: 1 / " in str(info.value)
    with pytest.raises(AssertionError, match="tiled float64 oracle"):
        assert_attention_vjp_close(*grads, q, k, v, u, precision=BF16, oracle="tiled")


@pytest.mark.parametrize("kw, named", [
    pytest.param(dict(softcap=3.0), "softcap", id="softcap"),
    pytest.param(dict(sinks=[0.5, -1.0]), "sinks", id="sinks"),
    pytest.param(dict(energy="sqeuclidean"), "energy 'sqeuclidean'", id="sqeuclidean"),
])
def test_the_tiled_backward_names_what_it_cannot_judge(rng, kw, named):
    q, k, v, u = _operands(rng)
    kw = dict(kw)
    precision = kw.pop("precision", BF16)
    grads = lowp.attention_vjp(q, k, v, u, BF16)[:3]
    with pytest.raises(ValueError, match=f"oracle='tiled' cannot judge .*{named}"):
        assert_attention_vjp_close(*grads, q, k, v, u, precision=precision, oracle="tiled", **kw)


@pytest.mark.parametrize("n, expected", [
    pytest.param(2048, "tiled float64 oracle", id="tiled"),
    pytest.param(2047, "float32, scores float32", id="below-the-size"),
])
def test_the_default_oracle(rng, n, expected):
    """From TILED_PAIRS pairs on (below float64 scores, a call the tiled backward supports): tiled; else the reference."""
    q, k, v, u = (rng.normal(size=(1, 1, size, 2)).astype(np.float32) for size in (n, 2048, 2048, n))
    zeros = [np.zeros_like(x) for x in (q, k, v)]  # wrong on purpose: the report names the oracle
    with pytest.raises(AssertionError, match=expected) as info:
        assert_attention_vjp_close(*zeros, q, k, v, u)
    assert ("tiled float64 oracle" in str(info.value)) == (n == 2048)
