"""Low-precision inputs, the precision model and the derived tolerances of iem_ref.testing.

- float16, bfloat16 and float8 inputs: the reference and the exact tier take
  them, round once and correctly (against the exact tier), promote as
  documented;
- ``round_to``: one correct rounding from float64 (never through a float32
  double rounding), checked against exact neighbours;
- the precision model's inference and the tolerances' power: correct
  kernels pass over many seeds (the emulation in :mod:`iem_ref.lowp`
  everywhere, torch where installed), kernels 10-100x less accurate fail.
"""

import decimal
from decimal import Decimal

import numpy as np
import pytest

import iem_ref as R
from iem_ref import exact as X
from iem_ref import lowp
from iem_ref.precision import Precision, infer_precision, low_precision_dtype, round_to, unit_roundoff
from iem_ref.testing import assert_attention_close, assert_attention_vjp_close

BF16, F16 = low_precision_dtype("bfloat16"), np.dtype(np.float16)
E4M3, E5M2 = low_precision_dtype("float8_e4m3fn"), low_precision_dtype("float8_e5m2")


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [F16, BF16, E4M3, E5M2], ids=["f16", "bf16", "e4m3", "e5m2"])
def test_round_to_is_one_correct_rounding(rng, dtype):
    """Every result is the nearest representable value (ties to even), judged by the exact neighbours."""
    x = rng.normal(size=400) * np.exp(rng.uniform(-6, 6, 400))
    y = round_to(x, dtype)
    exact = X.to_float([Decimal(float(v)) for v in x], dtype)  # nearest by exact comparison with the neighbours
    same = (y == exact) | (np.isnan(y.astype(np.float64)) & np.isnan(exact.astype(np.float64)))
    assert same.all(), x[~same]


def test_round_to_avoids_the_float32_double_rounding():
    x = np.array([1.0 + 2.0**-8 + 2.0**-40])  # above a bfloat16 midpoint by less than a float32 ulp
    assert float(round_to(x, BF16)[0]) == 1.0 + 2.0**-7
    assert float(x.astype(np.float32).astype(BF16)[0]) == 1.0  # the double rounding it avoids


def test_exact_to_float_on_either_side_of_a_midpoint():
    with decimal.localcontext(decimal.Context(prec=80)):
        m = Decimal(1) + Decimal(2) ** -8  # a bfloat16 midpoint between 1 and 1 + 2**-7
        eps = Decimal(2) ** -200
        got = [float(X.to_float([m + s], "bfloat16")[0]) for s in (eps, -eps, 0)]
    assert got == [1.0 + 2.0**-7, 1.0, 1.0]  # up, down, ties to even


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_reference_takes_low_precision_and_rounds_once_correctly(rng, dtype):
    q, k, v = (rng.normal(size=s).astype(dtype) for s in [(3, 4), (5, 4), (5, 2)])
    a, lse = R.attention(q, k, v, return_lse=True)
    assert a.dtype == dtype and lse.dtype == dtype
    a_x, lse_x = X.attention(q, k, v, return_lse=True)
    # the float64 reference is within a few float64 ulps: its one rounding is the correct one unless the
    # value lies that close to a midpoint, which these seeds do not
    np.testing.assert_array_equal(a, X.to_float(a_x, dtype))
    np.testing.assert_array_equal(lse, X.to_float(lse_x, dtype))
    dq, dk, dv = R.attention_vjp(q, k, v, np.ones((3, 2), dtype))
    assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_promotion_rules():
    from iem_ref._validation import result_dtype

    arr = lambda dt: np.zeros(1, dt)  # noqa: E731
    assert result_dtype(arr(BF16), arr(BF16)) == BF16
    assert result_dtype(arr(BF16), arr(F16)) == np.float32  # neither holds the other
    assert result_dtype(arr(E4M3), arr(BF16)) == BF16
    assert result_dtype(arr(E4M3), arr(E5M2)) == F16
    assert result_dtype(arr(BF16), arr(np.float32)) == np.float32
    assert result_dtype(arr(F16), arr(np.float64)) == np.float64


def test_unit_roundoffs():
    assert unit_roundoff(BF16) == 2.0**-8 and unit_roundoff(F16) == 2.0**-11
    assert unit_roundoff(E4M3) == 2.0**-4 and unit_roundoff(E5M2) == 2.0**-3


# ---------------------------------------------------------------- the precision model


def test_precision_inferred_from_the_lowest_dtype():
    p = infer_precision(np.dtype(np.float32), BF16)
    assert (p.inputs, p.scores, p.probs, p.accumulator, p.output) == (BF16, np.float32, BF16, np.float32, BF16)
    assert Precision.of("float64").scores == np.float64
    assert Precision.of(BF16, accumulator="bfloat16").accumulator == BF16
    with pytest.raises(TypeError, match="Precision.scores"):
        Precision.of("float32", scores="int32")


def test_an_upcast_bf16_output_is_judged_as_bf16(rng):
    q, k, v = (rng.normal(size=s).astype(BF16) for s in [(2, 64, 32), (2, 96, 32), (2, 96, 32)])
    out = lowp.attention(q, k, v)
    assert_attention_close(out.astype(np.float32), q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                           precision=infer_precision(BF16))
    assert_attention_close(out, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))  # inferred from `out`
    with pytest.raises(AssertionError, match="float32"):  # judged as a float32 kernel it is far off
        assert_attention_close(out.astype(np.float32), q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))


# ---------------------------------------------------------------- power: correct kernels pass, worse ones fail


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_correct_emulated_kernels_pass_over_100_seeds(dtype):
    """The emulation of a correct kernel (key tiles of 32): no false failure over 100 seeds, forward and backward."""
    dt = low_precision_dtype(dtype) if dtype != "float32" else np.dtype(np.float32)
    worst_f = worst_b = 0.0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        q, k, v, g = (rng.normal(size=(1, 48, 16)).astype(dt) for _ in range(4))
        kw = dict(is_causal=bool(seed % 2))
        out, lse = lowp.attention(q, k, v, block_k=32, return_lse=True, **kw)
        worst_f = max(worst_f, assert_attention_close(out, q, k, v, lse=lse, **kw))
        grads = lowp.attention_vjp(q, k, v, g, out=out, lse=lse, block_k=32, **kw)
        worst_b = max(worst_b, assert_attention_vjp_close(*grads, q, k, v, g, **kw))
    assert worst_f < 1 and worst_b < 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_sdpa_forward_passes_over_100_seeds(dtype):
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    tdt = getattr(torch, dtype)
    for seed in range(100):
        rng = np.random.default_rng(seed)
        q, k, v = (torch.tensor(rng.normal(size=(2, 64, 32))).to(tdt) for _ in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bool(seed % 2))
        assert_attention_close(out, q, k, v, is_causal=bool(seed % 2))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_sdpa_backward_passes_over_100_seeds(dtype):
    """torch's CPU backward under its model: float32 throughout, or bf16 gradients stored every 32 queries /
    512 keys at N = 64 (``Precision.gradient_blocks``)."""
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    from iem_ref.precision import Precision
    from iem_ref.testing import assert_attention_vjp_close

    tdt = getattr(torch, dtype)
    model = Precision.of(dtype) if dtype == "float32" else Precision.of(dtype, gradient_blocks=(32, 512))
    for seed in range(100):
        rng = np.random.default_rng(seed)
        q, k, v, g = (torch.tensor(rng.normal(size=(2, 64, 32))).to(tdt) for _ in range(4))
        for x in (q, k, v):
            x.requires_grad_(True)
        causal = bool(seed % 2)
        torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=causal)[0].backward(g)
        assert_attention_vjp_close(q.grad, k.grad, v.grad, q, k, v, g, is_causal=causal, precision=model)


def _float32_attention(q, k, v, exp=np.exp):
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(q.shape[-1] ** -0.5)
    p = exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_an_exp_with_1e4_relative_error_is_caught(rng):
    """A float32 kernel whose exp is 1e-4 off (about 100x a correct kernel's error) fails the default."""
    q, k, v = (rng.normal(size=(1024, 64)).astype(np.float32) for _ in range(3))
    signs = np.where(rng.random((1024, 1024)) < 0.5, -1, 1).astype(np.float32)
    bad = _float32_attention(q, k, v, exp=lambda x: np.exp(x) * (1 + np.float32(1e-4) * signs))
    good = _float32_attention(q, k, v)
    assert assert_attention_close(good, q, k, v) < 1
    with pytest.raises(AssertionError, match="probabilistic"):
        assert_attention_close(bad, q, k, v)


def test_lse_in_base_2_and_the_emulated_baseline(rng):
    q, k, v = (rng.normal(size=(2, 40, 16)).astype(BF16) for _ in range(3))
    out, lse = lowp.attention(q, k, v, return_lse=True)
    assert_attention_close(out, q, k, v, lse=lse / np.log(2.0), lse_base=2)
    with pytest.raises(AssertionError, match="log-partition"):
        assert_attention_close(out, q, k, v, lse=lse / np.log(2.0))  # a log2 LSE read as natural
    assert assert_attention_close(out, q, k, v, baseline="emulated") <= 1  # the emulation against itself
    worse = round_to(out.astype(np.float64) * (1 + 2.0**-6), BF16)
    with pytest.raises(AssertionError, match="baseline"):
        assert_attention_close(worse, q, k, v, baseline="emulated")
    # the baseline judges the LSE by the same rule: the emulation's own passes, one off by 2^-8 (a bf16 rounding) fails
    assert assert_attention_close(out, q, k, v, lse=lse, baseline="emulated") <= 1
    with pytest.raises(AssertionError, match="log-partition"):
        assert_attention_close(out, q, k, v, lse=lse + 2.0**-8, baseline="emulated")


def test_vjp_helper_catches_a_backward_without_delta(rng):
    q, k, v, g = (rng.normal(size=(1, 64, 16)).astype(np.float32) for _ in range(4))
    dq, dk, dv = R.attention_vjp(q, k, v, g)
    assert assert_attention_vjp_close(dq, dk, dv, q, k, v, g) < 1
    r = R.attention_responsibilities(q, k).astype(np.float64)
    dS = r * (g.astype(np.float64) @ np.swapaxes(v, -1, -2).astype(np.float64))  # Delta left out
    bad_dq = (dS @ k.astype(np.float64) / 4.0).astype(np.float32)
    with pytest.raises(AssertionError, match="dq"):
        assert_attention_vjp_close(bad_dq, dk, dv, q, k, v, g)


def test_log_partition_helper_in_base_2(rng):
    from iem_ref.testing import assert_log_partition_close

    x = rng.normal(0, 3, size=(4, 50))
    lse = np.log(np.exp(x).sum(-1))
    assert_log_partition_close(lse / np.log(2.0), -x, base=2)
    with pytest.raises(AssertionError):
        assert_log_partition_close(lse, -x, base=2)  # a natural log where base 2 was declared


@pytest.mark.parametrize("blocks", [(0, 512), (64,), (64.0, 512), (True, 512), "ab"])
def test_gradient_blocks_must_be_two_positive_integers(blocks):
    from iem_ref.precision import Precision

    with pytest.raises(ValueError, match="gradient_blocks"):
        Precision.of("float16", gradient_blocks=blocks)


def test_gradient_blocks_add_the_stored_partials_to_the_backward_bound():
    """Storing the gradients in float16 every 16 queries / keys widens every gradient's tolerance; the
    failure report names the model."""
    from iem_ref.attention import Competition, prepare_attention
    from iem_ref.bounds import kernel_vjp_bounds
    from iem_ref.precision import Precision

    rng = np.random.default_rng(3)
    q, k, v, g = (rng.standard_normal((64, 8)).astype(np.float16).astype(np.float64) for _ in range(4))
    comp = Competition(prepare_attention(q, k, v))
    plain = kernel_vjp_bounds(comp, g, Precision.of("float16"))
    blocked_model = Precision.of("float16", gradient_blocks=(16, 16))
    blocked = kernel_vjp_bounds(comp, g, blocked_model)
    for a, b in zip(plain, blocked):
        assert np.all(b >= a) and np.any(b > a)
    assert "every 16 queries / 16 keys" in blocked_model.describe()


def _float32_laplace_attention(q, k, v, exp=np.exp):
    d = np.abs(q[:, None, :] - k[None, :, :]).sum(-1)  # K4 in float32: each difference rounds, then the sum
    s = -d * np.float32(q.shape[-1] ** -0.5)
    p = exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_laplace_energy_has_its_own_derived_bound(rng):
    """The tolerance is derived for the Laplace score (sum_c |q_c - k_c|), not borrowed from another energy."""
    q, k, v = (rng.normal(size=(256, 16)).astype(np.float32) for _ in range(3))
    assert assert_attention_close(_float32_laplace_attention(q, k, v), q, k, v, energy="laplace") < 1
    signs = np.where(rng.random((256, 256)) < 0.5, -1, 1).astype(np.float32)
    bad = _float32_laplace_attention(q, k, v, exp=lambda x: np.exp(x) * (1 + np.float32(1e-4) * signs))
    with pytest.raises(AssertionError, match="probabilistic"):
        assert_attention_close(bad, q, k, v, energy="laplace")


@pytest.mark.parametrize("energy", [pytest.param(name, id=name) for name in ("cosine", "student_t", "huber", "pseudo_huber")]
                         + [pytest.param(lambda x, mu: -(x @ np.swapaxes(mu, -1, -2)), id="callable")])
def test_energies_without_a_derived_bound_are_refused_by_name(rng, energy):
    q, k, v = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(3))
    out = np.asarray(R.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), energy=energy), np.float32)
    name = "a callable energy" if callable(energy) else f"energy {energy!r}"
    with pytest.raises(ValueError, match=f"no error bound is derived for {name}"):
        assert_attention_close(out, q, k, v, energy=energy)
    assert assert_attention_close(out, q, k, v, energy=energy, rtol=1e-5, atol=1e-6) < 1  # explicit tolerances still work
