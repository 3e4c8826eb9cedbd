"""Regression tests, each named after the bug it pins."""

import importlib

import numpy as np
import pytest

import iem_ref as R
from iem_ref import exact


@pytest.mark.equation("S4", "P5")
def test_tanh_from_signed_gaussian_keeps_evidence_beyond_2_to_53_m():
    # For |z| >= 2**53 m, z - m and z + m round to the same float: the quadratic energies
    # became equal and the result was 0 instead of sign(z).  tanh saturates to exactly +-1
    # in float64 for |z| > 19.1, so the expected values are exact.
    z = np.array([1e16, -3e16, 1e200, -1e300])
    expected = np.sign(z)
    np.testing.assert_array_equal(R.tanh_from_signed_gaussian(z), expected)
    np.testing.assert_array_equal(R.prototype_activation(z, [1.0, -1.0], [1.0, -1.0]), expected)


@pytest.mark.equation("G4")
def test_attention_vjp_nan_query_row_stays_inside_its_causal_window():
    # A NaN query row made r NaN on every entry of its row, masked ones included, and the
    # matmuls of dk and dv spread it to keys the row cannot see.  Query 1 (top-left causal)
    # sees keys 0 and 1 only: keys 2 and 3 must keep finite gradients.
    rng = np.random.default_rng(5)
    q, k, v, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    q[1, 0] = np.nan
    dq, dk, dv = R.attention_vjp(q, k, v, u, is_causal=True)
    assert np.isnan(dk[:2]).all() and np.isnan(dv[:2]).all()
    assert np.isfinite(dk[2:]).all() and np.isfinite(dv[2:]).all()
    assert np.isnan(dq[1]).all() and np.isfinite(np.delete(dq, 1, axis=0)).all()


@pytest.mark.equation("G4")
@pytest.mark.parametrize("path", ["cpu", "cuda"])
def test_accelerated_vjp_nan_query_row_has_the_reference_nan_pattern(path):
    mod = importlib.import_module(f"iem_ref.accel.{path}")
    rng = np.random.default_rng(5)
    q, k, v, u = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    q[1, 0] = np.nan
    for got, ref in zip(mod.attention_vjp(q, k, v, u, is_causal=True), R.attention_vjp(q, k, v, u, is_causal=True)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))


def _paths():
    return [R] + [importlib.import_module(f"iem_ref.accel.{name}") for name in ("cpu", "cuda")]


@pytest.mark.equation("K2", "T2")
def test_sqeuclidean_energy_that_overflows_is_excluded_at_scale_zero():
    # accel.cpu scored a key whose squared distance overflows to +inf as +inf (certain) at scale = 0,
    # instead of -inf (excluded): a row of such keys gave the mean of their values and L = +inf, not
    # the empty row, and a row with one such key took it alone.
    v = np.array([[1.0], [2.0]])
    q = np.array([[1e300, 0.0]])
    k = np.array([[0.0, 0.0], [1.0, 0.0]])
    q2 = np.array([[1e300, 0.0], [0.0, 0.0]])
    k2 = np.array([[0.0, 0.0], [1e300, 0.0]])
    # (the exact tier forms energies without overflow, 5e599 here: a float path's energy is +inf)
    ex = np.array([[2.0], [1.0]])
    for mod in _paths():
        with np.errstate(over="ignore"):
            a, L = mod.attention(q, k, v, scale=0.0, energy="sqeuclidean", return_lse=True)
            np.testing.assert_array_equal(a, [[0.0]])
            np.testing.assert_array_equal(L, [-np.inf])
            a2, L2 = mod.attention(q2, k2, v, scale=0.0, energy="sqeuclidean", return_lse=True)
        np.testing.assert_array_equal(a2, ex)
        np.testing.assert_array_equal(L2, [0.0, 0.0])  # log 1: one key left in each row


@pytest.mark.equation("A4")
@pytest.mark.parametrize("dtype, scale", [(np.float32, 1.0), (np.float64, 10.0)])
def test_infinite_value_whose_weight_underflows_gives_inf_not_nan(dtype, scale):
    # The weight exp(-100) of the key with value inf flushed to 0 in float32 (exp(-1000) in float64,
    # also in the reference), and 0 * inf gave NaN; the exact weight is positive, the output inf.
    q = np.array([[10.0]], dtype)
    k = np.array([[10.0], [0.0]], dtype)
    v = np.array([[1.0], [np.inf]], dtype)
    assert exact.to_float(exact.attention(q, k, v, scale=scale), dtype)[0, 0] == np.inf
    for mod in _paths():
        a, L = mod.attention(q, k, v, scale=scale, return_lse=True)
        assert a[0, 0] == np.inf, mod.__name__
        assert L[0] == np.float32(100.0 * scale) if dtype == np.float32 else L[0] == 100.0 * scale


@pytest.mark.equation("A4", "M2")
def test_infinite_value_survives_a_rescale_that_underflows_and_certain_keys():
    # The running sum o = inf was multiplied by the rescale factor exp(m_old - m_new), which is 0 in
    # floating point beside a much larger later score (or exactly 0 when a later key is certain):
    # 0 * inf = NaN.  The key with value inf takes part with a positive weight in every case.
    M = 3000  # the CPU's key tiles are at most 2048 keys wide: the large score comes in a later tile
    q = np.array([[1.0]])
    k = np.zeros((M, 1))
    k[-1, 0] = 800.0
    v = np.zeros((M, 2))
    v[0] = [np.inf, 1.0]
    v[1, 0] = -np.inf  # both signs in column 0: NaN
    v[2, 1] = -np.inf
    small = slice(0, 20)  # the simulator's key tiles are 8 wide
    k_small = np.concatenate([k[:19], k[-1:]])
    k_cert = np.concatenate([k[:19], [[np.inf]]])  # the last key is certain: energy -inf
    for mod in _paths():
        kk = k if mod.__name__.endswith("cpu") or mod is R else k_small
        vv = v if kk is k else v[small]
        a = mod.attention(q, kk, vv, scale=1.0)
        assert np.isnan(a[0, 0]) and a[0, 1] == -np.inf, mod.__name__
        a = mod.attention(q, k_cert, v[small], scale=1.0)
        assert np.isnan(a[0, 0]) and a[0, 1] == -np.inf, mod.__name__
        a = mod.attention(q, k_cert, v[small][:, 1:], scale=1.0)
        assert a[0, 0] == -np.inf, mod.__name__
    ex = exact.to_float(exact.attention(q, k_cert, v[small], scale=1.0))
    assert np.isnan(ex[0, 0]) and ex[0, 1] == -np.inf


@pytest.mark.parametrize("dtype", [">f8", ">f4"])
def test_big_endian_float_inputs_are_their_float_dtype(dtype):
    # A big-endian float64 / float32 array was refused with TypeError on every path, as if it were
    # not a float: it is the same values, and computes (and returns) as the native dtype.
    q, k, v = np.ones((2, 3), dtype), np.ones((4, 3), dtype), np.arange(8.0).reshape(4, 2).astype(dtype)
    native = np.dtype(dtype).newbyteorder("=")
    expected = np.broadcast_to(v.astype(native).mean(axis=0), (2, 2))
    for mod in _paths():
        a = mod.attention(q, k, v)
        assert a.dtype == native
        np.testing.assert_array_equal(a, expected)
    assert R.softplus(np.zeros(2, dtype)).dtype == native


def test_streaming_partials_at_infinite_temperature_beside_a_minus_inf_energy():
    """tau = inf with a -inf energy in a block: the finite keys got NaN weights (inf / inf); they have none."""
    d = np.array([[-np.inf, 0.0, 1.0, -np.inf]])
    v = np.array([[1.0], [5.0], [7.0], [3.0]])
    whole = R.finalize_partial(R.partial_posterior(d, v, np.inf))
    split = R.finalize_partial(R.merge_partials(R.partial_posterior(d[:, :2], v[:2], np.inf),
                                                R.partial_posterior(d[:, 2:], v[2:], np.inf)))
    expected = R.softmin_summary(d, v, np.inf)
    for a, L in (whole, split):
        np.testing.assert_array_equal(a, expected[0])  # the two -inf keys share the mass: (1 + 3) / 2
        np.testing.assert_array_equal(L, expected[1])
    assert whole[0][0, 0] == 2.0


def _vjp_case(q, k, v, g, **kw):
    return dict(q=q, k=k, v=v, g=g, kw=kw, dtype=np.result_type(q, k, v, g), saved=False)


def _special_vjp_cases():
    rng = np.random.default_rng(11)
    f32 = np.float32
    # float32, squared distance with a 1e15 query: the expanded form's rounding (1e22) exceeds the
    # scores' spread (1e14), and section 10's first-order terms gave a bound of 1e-28 where the
    # weights may be anything in [0, 1]
    yield "float32-expanded-sqeuclidean", _vjp_case(np.array([[1e15]], f32), np.array([[-0.06605243], [0.32021132]], f32),
                                                    np.array([[0.10490011], [-0.5356694]], f32), np.array([[0.12573022]], f32),
                                                    energy="sqeuclidean")
    # a key of weight 0 whose <u_i, v_j> overflows (1e300 * 1e300): the reference formed Delta as sum_j P_ij b_ij
    # (0 * inf = NaN) and spoilt the row; every path forms Delta = <u_i, a_i>, finite here
    q, k, v = rng.normal(size=(1, 2)), rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    q[0] = [0.97, -1.14]
    k[3, 1], v[1, 1] = -1e300, -1e300
    yield "overflowed-b-at-zero-weight", _vjp_case(q, k, v, np.array([[0.73, -1e300]]))
    # scale 0 with a certain key (an infinite key entry) and 1e300 values: 0 * inf in the bound of dq
    q, k, v = rng.normal(size=(1, 3)), rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    q[0, 2] = -0.31
    k[2, 2], v[1, 1] = -np.inf, 1e300
    yield "scale-zero-certain", _vjp_case(q, k, v, np.array([[0.73, -1e300]]), scale=0.0)
    # a 1e300 query beside keys of 1e300 and inf: two certain keys (1e600 overflows to inf), score errors of
    # 1e284 at the finite ones; section 10's first-order terms overflowed and met the inf key's 0 size (0 * inf)
    q, k, v = rng.normal(size=(2, 1)), rng.normal(size=(40, 1)), rng.normal(size=(40, 1))
    q[0, 0], k[3, 0], k[7, 0] = 1e300, 1e300, np.inf
    yield "huge-query-loose-row", _vjp_case(q, k, v, rng.normal(size=(2, 1)))
    # scale 0 with a 1e300 query and key: the score's size overflows (1e600), and 0 * inf made the bound NaN
    q, k, v = rng.normal(size=(2, 1)), rng.normal(size=(40, 1)), rng.normal(size=(40, 1))
    q[0, 0], k[5, 0] = 1e300, 1e300
    yield "scale-zero-overflowed-size", _vjp_case(q, k, v, rng.normal(size=(2, 1)), scale=0.0)


@pytest.mark.equation("G4")
@pytest.mark.parametrize("path", ["cpu", "cuda"])
@pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in _special_vjp_cases()])
def test_vjp_bounds_hold_where_special_values_defeat_first_order_terms(path, case):
    from tests.test_fuzz import check_vjp

    check_vjp(path, case)


@pytest.mark.equation("A4")
@pytest.mark.parametrize("path", ["cpu", "cuda"])
def test_forward_bound_holds_for_a_subnormal_output(path):
    # Uniform weights over two values of 1e-310 (D = 0, scale 0): the reference's 0.5 * 1e-310 + 0.5 * 1e-310
    # rounds in the subnormal range, one eta off the path's, and the forward bound, relative only, was 0 there.
    from tests.test_fuzz import check_attention

    v = np.array([[0.345584192, 1e-310], [0.345584192, 1e-310]])
    check_attention(path, dict(q=np.zeros((1, 0)), k=np.zeros((2, 0)), v=v, kw=dict(energy="dot", scale=0.0),
                               dtype=np.dtype(np.float64)))


@pytest.mark.equation("G6")
def test_vjp_oracle_tolerance_is_finite_beside_a_nan_row_at_an_excluded_key():
    # A NaN row (a NaN bias entry) beside a key excluded by a -inf bias whose value is NaN: the expected dk, dv of
    # that key are finite (no weight reaches it), but the kernel model's Delta of the NaN row (NaN) times the
    # pair's weight (0) made its tolerance NaN, and assert_attention_vjp_close raised instead of judging.
    from iem_ref.testing import assert_attention_vjp_close

    rng = np.random.default_rng(7)
    q, k, v, u = rng.normal(size=(5, 3)), rng.normal(size=(6, 3)), rng.normal(size=(6, 2)), rng.normal(size=(5, 2))
    v[2] = np.nan
    bias = np.zeros((5, 6))
    bias[1, 0], bias[:, 2] = np.nan, -np.inf
    grads = R.attention_vjp(q, k, v, u, bias=bias)[:3]
    assert np.isfinite(grads[1][2]).all() and np.isnan(grads[0][1]).all()
    assert assert_attention_vjp_close(*grads, q, k, v, u, bias=bias) < 1
