"""The oracle catches real kernel bugs: a mutation suite.

``tests/flash_kernels.py`` is a flash-attention kernel in NumPy (key tiles,
online softmax, ``P`` rounded before the value GEMM, FlashAttention-2's
backward) in bf16, fp16 or float32, with switches for classic one-line bugs.
With the **default** derived tolerances of :mod:`iem_ref.testing`
(``precision`` inferred from the arrays, the probabilistic bound):

* the correct kernel passes ``assert_attention_close`` (output and LSE) and
  ``assert_attention_vjp_close``, in every configuration;
* every bug fails, in bf16 and fp16 (and float32 for the float32-only bugs),
  in the pass it breaks: the forward for the forward's lines, the backward for
  the backward's and for every forward line that the backward recomputes or
  reads (the logits, the saved output).

One listed bug is not an accuracy bug and is documented as such:
``delta_unrounded_o`` forms ``delta = rowsum(dO * O)`` from the
accumulator's output instead of the stored rounded one.  That ``O`` is closer
to the exact output (by the output's rounding), so the gradient is at least
as accurate; no tolerance against the truth can flag it.  The test checks
that the helper accepts it.

Sizes: ``N = M = 256, D = 64`` by default (``N = M / 2`` for the bottom-right
causal case, where ``N != M`` is the point): four key tiles of 64, where
every bug is already caught and the correct kernel passes in every
configuration; ``N = M = 1024`` and ``4096`` with ``D = 64`` and ``128``
are marked ``slow`` (run with ``-m slow``; ``bench/mutations.py``
records every size).
"""

import functools

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes", reason="optional peer ml_dtypes absent")

from iem_ref import lowp  # noqa: E402
from iem_ref.flex import prefix_lm  # noqa: E402
from iem_ref.testing import assert_attention_close  # noqa: E402

from .flash_kernels import BUGS, FlashKernel  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
BLOCK_K = 64

#: name -> (keyword arguments of the call, (query heads, key/value heads), N = M // n_div)
CONFIGS = {
    "plain": (dict(), (1, 1), 1),
    "causal": (dict(is_causal=True), (1, 1), 1),
    "causal_br": (dict(is_causal=True, causal_alignment="bottom_right"), (1, 1), 2),
    "window": (dict(window=(64, 16)), (1, 1), 1),
    "gqa": (dict(enable_gqa=True), (4, 2), 1),
    "softcap": (dict(softcap=2.0), (1, 1), 1),
    "softcap_bias": (dict(softcap=2.0, bias="random"), (1, 1), 1),
    # FlexAttention's: a curved score_mod that reads the positions, a prefix-LM mask_mod (not symmetric in i, j)
    "flex_score": (dict(score_mod=lambda s, b, h, qi, ki: 3.0 * np.tanh(s / 3.0) + 0.01 * (ki - qi)), (1, 1), 1),
    "flex_mask": (dict(mask_mod=prefix_lm(40)), (1, 1), 1),
}


#: bug -> (configuration that exercises it, passes it breaks)
BUG_CASES = {
    "no_rescale": ("plain", ("forward", "backward")),
    "lse_base2": ("plain", ("forward",)),
    "log2e_twice": ("plain", ("forward", "backward")),
    "causal_top_left": ("causal_br", ("forward", "backward")),
    "window_off_by_one": ("window", ("forward", "backward")),
    "gqa_mod": ("gqa", ("forward", "backward")),
    "softcap_after_bias": ("softcap_bias", ("forward", "backward")),
    "scale_after_softcap": ("softcap", ("forward", "backward")),
    "no_delta": ("plain", ("backward",)),
    "no_division_single_tile": ("causal", ("forward", "backward")),
    # the backward alone: its gradients are 1-3x the correct kernel's error, inside the tolerance; the forward's
    # output and LSE catch it (and a kernel is checked forward and backward)
    "round_before_max": ("plain", ("forward",)),
    "exp_1e-4": ("plain", ("forward", "backward")),
    "p_bf16": ("plain", ("forward",)),
    "score_mod_unscaled": ("flex_score", ("forward", "backward")),
    "score_mod_no_slope": ("flex_score", ("backward",)),
    "mask_mod_transposed": ("flex_mask", ("forward", "backward")),
}
FLOAT32_ONLY = {"exp_1e-4", "p_bf16"}
assert set(BUG_CASES) | {"delta_unrounded_o"} == set(BUGS)

FAST = [(256, 64)]
SLOW = [(1024, 64), (1024, 128), (4096, 64), (4096, 128)]
SIZES = [pytest.param(s, id=f"N{s[0]}-D{s[1]}") for s in FAST] + [
    pytest.param(s, id=f"N{s[0]}-D{s[1]}", marks=pytest.mark.slow) for s in SLOW
]
DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")]


@functools.lru_cache(maxsize=4)
def _problem(config, size, dtype):
    """Random normal q, k, v, grad_out in ``dtype`` (seeded by the case), and the call's keywords."""
    kw, (hq, hkv), n_div = CONFIGS[config]
    m, d = size
    n = m // n_div
    rng = np.random.default_rng([m, d, n_div, hq, len(config)])
    q = rng.standard_normal((hq, n, d)).astype(dtype)
    k = rng.standard_normal((hkv, m, d)).astype(dtype)
    v = rng.standard_normal((hkv, m, d)).astype(dtype)
    g = rng.standard_normal((hq, n, d)).astype(dtype)
    kw = dict(kw)
    if kw.get("bias") == "random":
        kw["bias"] = rng.standard_normal((hq, n, m)).astype(np.float32)
    return q, k, v, g, kw


@functools.lru_cache(maxsize=16)
def _run(config, size, dtype, bug):
    q, k, v, g, kw = _problem(config, size, dtype)
    ker = FlashKernel(q, k, v, block_k=BLOCK_K, bugs=() if bug is None else (bug,), **kw)
    fwd = ker.forward()
    return fwd, ker.backward(g, fwd)


def _check(config, size, dtype, bug, which):
    q, k, v, g, kw = _problem(config, size, dtype)
    (out, lse, _), grads = _run(config, size, dtype, bug)
    if which == "forward":
        assert_attention_close(out, q, k, v, lse=lse, **kw)
    else:
        from iem_ref.testing import assert_attention_vjp_close

        assert_attention_vjp_close(*grads, q, k, v, g, **kw)


# the top decorator varies fastest: a size's cases run together, forward next to backward (the kernel's run is cached)
@pytest.mark.parametrize("which", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES)
def test_correct_kernel_passes(which, config, dtype, size):
    _check(config, size, dtype, None, which)


@pytest.mark.parametrize("size", [pytest.param(s, id=f"N{s[0]}-D{s[1]}") for s in FAST])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_correct_float32_kernel_passes(which, size):
    _check("plain", size, F32, None, which)


def _bug_cases(dtypes):
    for bug, (config, passes) in BUG_CASES.items():
        for which in passes:
            for dt in dtypes if bug not in FLOAT32_ONLY else [pytest.param(F32, id="fp32")]:
                yield pytest.param(bug, config, which, dt.values[0], id=f"{bug}-{which}-{dt.id}")


@pytest.mark.parametrize("bug,config,which,dtype", list(_bug_cases(DTYPES)))
@pytest.mark.parametrize("size", SIZES)
def test_bug_is_caught(bug, config, which, dtype, size):
    with pytest.raises(AssertionError):
        _check(config, size, dtype, bug, which)


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_from_the_unrounded_output_is_not_an_accuracy_bug(dtype):
    """|O_acc - O_exact| <= |O_stored - O_exact| + u_o |O|: the gradient is at least as accurate, and accepted."""
    _check("plain", FAST[0], dtype, "delta_unrounded_o", "backward")


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_correct_kernel_is_the_emulation(config, dtype):
    """Without bugs the kernel computes what iem_ref.lowp computes, bit for bit (the same model, the same order)."""
    q, k, v, g, kw = _problem(config, (128, 16), dtype)
    ker = FlashKernel(q, k, v, block_k=32, **kw)
    out, lse, _ = fwd = ker.forward()
    e_out, e_lse = lowp.attention(q, k, v, block_k=32, return_lse=True, **kw)
    assert out.dtype == e_out.dtype == dtype
    assert np.array_equal(out, e_out) and np.array_equal(lse, e_lse)
    grads = ker.backward(g, fwd)
    e_grads = lowp.attention_vjp(q, k, v, g, out=out, lse=lse, block_k=32, **kw)
    for mine, theirs in zip(grads, e_grads):
        assert mine.dtype == theirs.dtype == dtype and np.array_equal(mine, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", ["plain", "causal", "gqa"])
def test_kernel_storing_its_gradients_per_block_passes_under_its_model(config, dtype):
    """A backward that adds each block into gradients stored in the input dtype (torch's CPU kernel) is a
    correct kernel of ``Precision.gradient_blocks``: accepted under that model, with the blocks' roundings
    in the tolerance (a tighter model than an input-dtype accumulator)."""
    from iem_ref.precision import Precision
    from iem_ref.testing import assert_attention_vjp_close

    q, k, v, g, kw = _problem(config, FAST[0], dtype)
    model = Precision.of(dtype, gradient_blocks=(BLOCK_K, BLOCK_K))
    ker = FlashKernel(q, k, v, model, block_k=BLOCK_K, **kw)
    grads = ker.backward(g, ker.forward())
    ratio = assert_attention_vjp_close(*grads, q, k, v, g, precision=model, **kw)
    loose = assert_attention_vjp_close(*grads, q, k, v, g, precision=Precision.of(dtype, accumulator=dtype), **kw)
    assert ratio < 1 and loose < ratio


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cpu_backward_passes_under_its_block_model(dtype):
    """torch's CPU flash backward (ATen's ``cpu_flash_attention_backward``) stores dq, dk, dv in the input
    dtype every 64 queries / 512 keys at N = 512: described by ``gradient_blocks=(64, 512)``."""
    torch = pytest.importorskip("torch", reason="optional peer torch absent")
    from iem_ref.precision import Precision
    from iem_ref.testing import assert_attention_vjp_close

    rng = np.random.default_rng(7)
    q, k, v, g = (torch.tensor(rng.standard_normal((2, 512, 64))).to(getattr(torch, dtype)) for _ in range(4))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0].backward(g)
    model = Precision.of(dtype, gradient_blocks=(64, 512))
    assert assert_attention_vjp_close(q.grad, k.grad, v.grad, q, k, v, g, is_causal=True, precision=model) < 1
