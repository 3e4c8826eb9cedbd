"""iem_ref.lowp: the emulation of a low-precision kernel rounds where its precision model says, and nowhere else.

* in the float64 model it is a float64 flash kernel: within the derived bounds of
  :mod:`iem_ref.bounds` (sections 5-10) of the reference, forward and backward,
  for the arithmetic of a kernel whose state and sums stay in the dtype
  (``Arithmetic`` of kind ``"cuda"`` with the emulation's key tile);
* in the float32 model it agrees with a plain float32 NumPy composition, both
  within the same derived bound of the reference;
* in bfloat16 it returns, on a tiny case, exactly the value that a hand
  computation with float32 arithmetic and the bf16 roundings gives;
* blockwise (``block_k``) and one tile differ by at most the sum of their
  derived bounds (sections 6-9: the rescalings, the shift, the sums), plus the
  rounding of ``P`` to the probabilities' dtype and of the output.
"""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes", reason="optional peer ml_dtypes absent")

from iem_ref import attention, lowp  # noqa: E402
from iem_ref.bounds import Arithmetic, attention_bounds, attention_vjp_bounds  # noqa: E402
from iem_ref.precision import Precision, unit_roundoff  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def _flash(tile):
    """The emulation's arithmetic for iem_ref.bounds: state, sums and accumulators in the dtype.

    Its sums are a pairwise sum of the tile's weights plus two roundings per later tile (the
    rescale and the addition), and a GEMM (one rounding, or ``b`` in float64's BLAS) plus two
    per tile: within the sequential accumulator ``k_T = n + R`` of section 8.  The ``exp`` is
    ``np.exp``, within 1 ulp in float64 and correctly rounded in the lower models: 2 ulps
    (section 6) covers both, and the rescale factors alike (section 7).
    """
    return Arithmetic("cuda", exp_ulps=2, rescale_exp_ulps=2, state_float64=False, score_extra=2,
                      expanded_sqeuclid=False, tiles=lambda n_queries, n_keys, dtype, backward: (None, tile))


def _inputs(rng, shape_q, shape_k, dv, dtype=np.float64):
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal(shape_k).astype(dtype)
    v = rng.standard_normal(shape_k[:-1] + (dv,)).astype(dtype)
    return q, k, v


MASKING = [
    dict(),
    dict(is_causal=True),
    dict(is_causal=True, causal_alignment="bottom_right"),
    dict(mask="random"),
]


def _kw(rng, kw, n, m):
    kw = dict(kw)
    if kw.get("mask") == "random":
        mask = rng.random((n, m)) < 0.7
        mask[:, 0] = True
        kw["mask"] = mask
    return kw


@pytest.mark.parametrize("block_k", [None, 16])
@pytest.mark.parametrize("kw", MASKING, ids=["plain", "causal", "causal_br", "mask"])
def test_float64_model_within_reference_bounds(rng, kw, block_k):
    n, m, d = 40, 72, 16
    q, k, v = _inputs(rng, (2, n, d), (2, m, d), 8)
    g = rng.standard_normal((2, n, 8))
    kw = _kw(rng, kw, n, m)
    p64 = Precision.of(np.float64)
    path = _flash(block_k or m)
    out, lse = lowp.attention(q, k, v, p64, block_k=block_k, return_lse=True, **kw)
    a_ref, L_ref, fb = attention_bounds(path, q, k, v, np.float64, **kw)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert np.all(np.abs(out - a_ref) <= fb.a)
    assert np.all(np.abs(lse - L_ref) <= fb.L)
    grads = lowp.attention_vjp(q, k, v, g, p64, block_k=block_k, **kw)
    refs, bounds = attention_vjp_bounds(path, q, k, v, g, np.float64, forward=fb, **kw)
    for mine, ref, b in zip(grads, refs, bounds):
        assert mine.dtype == np.float64
        assert np.all(np.abs(mine - ref) <= b)


def test_float32_model_agrees_with_a_float32_composition(rng):
    """Both are float32 kernels of one tile (scores, exp, sum, GEMM, division in float32)."""
    n, m, d = 64, 96, 32
    q, k, v = _inputs(rng, (n, d), (m, d), 16, np.float32)
    sc = np.float32(1 / np.sqrt(d))
    s = (q @ k.T) * sc
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    plain = (e @ v) / e.sum(axis=-1, keepdims=True)
    emul = lowp.attention(q, k, v)  # Precision.of(float32)
    assert emul.dtype == np.float32 and plain.dtype == np.float32
    a_ref, _, fb = attention_bounds(_flash(m), q, k, v, np.float32)
    assert np.all(np.abs(emul - a_ref) <= fb.a)
    assert np.all(np.abs(plain - a_ref) <= fb.a)
    assert np.all(np.abs(emul.astype(np.float64) - plain) <= 2 * fb.a_path)  # each within a_path of the truth


def test_bfloat16_tiny_case_by_hand():
    """q = (1, 0), keys (0, 0), (1, 0), (2, 0), scale 1: logits z = (0, 1, 2); v = (1, 2, 3).

    float32 arithmetic (each operation one rounding; exp and log from float64, rounded once) and the
    bf16 roundings of P and of the output.
    """
    f = np.float32
    q = np.array([[1, 0]], dtype=BF16)
    k = np.array([[0, 0], [1, 0], [2, 0]], dtype=BF16)
    v = np.array([[1], [2], [3]], dtype=BF16)
    e1, e2 = f(np.exp(-1.0)), f(np.exp(-2.0))
    bf = lambda x: float(np.asarray(x, np.float32).astype(BF16))  # noqa: E731  (float32 -> bf16: one rounding)
    assert bf(e1) == 0.3671875 and bf(e2) == 0.1357421875
    # one tile: m = 2, P~ = (e^-2, e^-1, 1), l = (P~0 + P~1) + P~2 (pairwise), acc = bf(P~) . v (one rounding)
    l = f(f(e2 + e1) + f(1))
    acc = f(0.1357421875 * 1 + 0.3671875 * 2 + 1 * 3)
    want = bf(f(acc / l))
    out, lse = lowp.attention(q, k, v, scale=1.0, return_lse=True)
    assert out.dtype == BF16 and lse.dtype == np.float32
    assert float(out[0, 0]) == want == 2.578125
    assert float(lse[0]) == float(f(f(2) + f(np.log(float(l)))))
    # two tiles of 2 keys: tile 1 m = 1, l1 = e^-1 + 1, acc1 = bf(e^-1) 1 + 1 * 2;
    # tile 2 m = 2, alpha = e^-1: l2 = alpha l1 + 1, acc2 = alpha acc1 + 1 * 3
    l1 = f(e1 + f(1))
    acc1 = f(0.3671875 * 1 + 1 * 2)
    l2 = f(f(e1 * l1) + f(1))
    acc2 = f(f(e1 * acc1) + f(3))
    out2, lse2 = lowp.attention(q, k, v, scale=1.0, block_k=2, return_lse=True)
    assert float(out2[0, 0]) == bf(f(acc2 / l2))
    assert float(lse2[0]) == float(f(f(2) + f(np.log(float(l2)))))
    # the rounding of P to bf16 is where the two differ from float32: P kept in float32 changes acc
    p32 = Precision.of(BF16, probs=np.float32)
    acc_p32 = f(f(e2) * 1 + f(e1) * 2 + 3)  # the exact products' sum of float32 P, rounded once
    assert float(lowp.attention(q, k, v, p32, scale=1.0)[0, 0]) == bf(f(acc_p32 / l))


def _blockwise_tolerance(q, k, v, precision, tile, kw):
    """|one tile - blockwise| <= the two kernels' bounds against the truth, each (sections 6-9)

    in the model's float32 arithmetic (scores, state, sums: ``attention_bounds`` in float32 with the
    kernel's tile), plus what float32 bounds do not see: ``P`` rounded to the probabilities' dtype
    before the value GEMM (relative ``u_p`` per term of ``o`` only: ``u_p sum_j r_j |v_j|``, and for
    a P below the dtype's smallest normal an absolute ``tiny_p u_p`` per term, over ``l >= 1``:
    ``tiny_p u_p sum_j |v_j|``) and the output's rounding (``u_o |a|``).
    """
    m = k.shape[-2]
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    _, _, fb_one = attention_bounds(_flash(m), q64, k64, v64, np.float32, **kw)
    _, _, fb_blk = attention_bounds(_flash(tile), q64, k64, v64, np.float32, **kw)
    a, r = attention(q64, k64, v64, return_responsibilities=True, **kw)
    up, uo = unit_roundoff(precision.probs), unit_roundoff(precision.output)
    tiny = float(ml_dtypes.finfo(precision.probs).tiny) if precision.probs == BF16 else float(np.finfo(precision.probs).tiny)
    take = np.ones(r.shape, bool) if kw.get("mask") is None and not kw.get("is_causal") else r > 0
    per_kernel = up * (r @ np.abs(v64)) + tiny * up * (take @ np.abs(v64)) + uo * np.abs(a)
    return fb_one.a_path + fb_blk.a_path + 2 * per_kernel * (1 + 4 * up)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True)], ids=["plain", "causal"])
def test_blockwise_equals_one_tile_within_the_rescaling_bound(rng, dtype, kw):
    n, m, d, tile = 64, 256, 32, 32
    q, k, v = _inputs(rng, (2, n, d), (2, m, d), 16, dtype)
    p = Precision.of(dtype)
    one = lowp.attention(q, k, v, block_k=None, **kw).astype(np.float64)
    blk = lowp.attention(q, k, v, block_k=tile, **kw).astype(np.float64)
    tol = _blockwise_tolerance(q, k, v, p, tile, kw)
    assert np.all(np.abs(one - blk) <= tol)
    assert not np.array_equal(one, blk)  # the tiles' roundings do show


def test_blockwise_float64_is_the_online_softmax(rng):
    """No rescaling at all when the first tile holds every row's maximum: blockwise = one tile, bitwise."""
    n, m, d = 8, 64, 4
    q, k, v = _inputs(rng, (n, d), (m, d), 3)
    k[0] = 0.0
    q = np.abs(q)
    k[1:] = -np.abs(k[1:])  # every score < 0 = the score of key 0: the maximum is in tile 0
    p = Precision.of(np.float64)
    # the sums are grouped differently (tree over 64 vs tiles of 8), hence a float64 bound:
    one = lowp.attention(q, k, v, p)
    blk = lowp.attention(q, k, v, p, block_k=8)
    a_ref, _, fb = attention_bounds(_flash(8), q, k, v, np.float64)
    assert np.all(np.abs(one - blk) <= 2 * fb.a_path)


VARIANTS = [
    ("gqa", dict(enable_gqa=True)),
    ("softcap", dict(softcap=2.0)),
    ("window", dict(window=(5, 3))),
    ("sinks", dict(sinks=np.array([0.5, -1.0, 0.0, 2.0]))),
    ("bias", dict(bias="random")),
    ("alibi", dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]))),
    ("segments", dict(cu_seqlens_q=np.array([0, 10, 24]), cu_seqlens_k=np.array([0, 12, 40]), is_causal=True)),
    ("dropout", dict(dropout_p=0.25, dropout_mask="random")),
]


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variants_float64_model_passes_the_float64_helper(rng, name, kw):
    """In the float64 model every variant agrees with the reference within the float64 helpers'
    derived tolerances (the model of a float64 kernel), forward (one tile and blockwise) and backward."""
    from iem_ref.testing import assert_attention_close, assert_attention_vjp_close

    n, m, d = 24, 40, 8
    q, k, v = _inputs(rng, (4, n, d), (2 if name == "gqa" else 4, m, d), 5)
    kw = dict(kw)
    if kw.get("bias") == "random":
        kw["bias"] = rng.standard_normal((4, n, m))
    if kw.get("dropout_mask") == "random":
        kw["dropout_mask"] = rng.random((4, n, m)) > 0.25
    p = Precision.of(np.float64)
    for bk in (None, 8):
        out = lowp.attention(q, k, v, p, block_k=bk, **kw)
        assert_attention_close(out, q, k, v, **kw)
    g = rng.standard_normal((4, n, 5))
    for bk in (None, 8):
        dq, dk, dv = lowp.attention_vjp(q, k, v, g, p, block_k=bk, **kw)
        assert_attention_vjp_close(dq, dk, dv, q, k, v, g, **kw)


def test_low_precision_dtypes_and_defaults(rng):
    q, k, v = _inputs(rng, (2, 16, 8), (2, 24, 8), 8, BF16)
    out, lse = lowp.attention(q, k, v, return_lse=True)
    assert out.dtype == BF16 and lse.dtype == np.float32 and out.shape == (2, 16, 8)
    dq, dk, dv = lowp.attention_vjp(q, k, v, rng.standard_normal((2, 16, 8)).astype(BF16))
    assert dq.dtype == dk.dtype == dv.dtype == BF16
    e4 = np.dtype(ml_dtypes.float8_e4m3fn)
    out8 = lowp.attention(q, k, v, Precision.of(e4))
    assert out8.dtype == e4
    # float32 inputs under a bf16 model are rounded to bf16 first
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    assert np.array_equal(lowp.attention(q32, k32, v32, Precision.of(BF16)), out)
    # the saved output and LSE give the same backward as recomputing them
    g = rng.standard_normal((2, 16, 8))
    a = lowp.attention_vjp(q, k, v, g, out=out, lse=lse)
    b = lowp.attention_vjp(q, k, v, g)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_empty_rows_and_errors(rng):
    q, k, v = _inputs(rng, (3, 4), (5, 4), 2, BF16)
    mask = np.ones((3, 5), bool)
    mask[1] = False
    out, lse = lowp.attention(q, k, v, mask=mask, return_lse=True, block_k=2)
    assert np.all(out[1].astype(np.float64) == 0) and lse[1] == -np.inf and np.all(np.isfinite(lse[[0, 2]]))
    dq, dk, dv = lowp.attention_vjp(q, k, v, np.ones((3, 2), BF16), mask=mask, block_k=2)
    assert np.all(dq[1].astype(np.float64) == 0)
    with pytest.raises(ValueError, match="dot-product"):
        lowp.attention(q, k, v, energy="sqeuclidean")
    with pytest.raises(ValueError, match="block_k"):
        lowp.attention(q, k, v, block_k=0)
    with pytest.raises(TypeError, match="precision"):
        lowp.attention(q, k, v, "bfloat16")
