"""Every row of the README's backward edge-case policy, on the reference, ``accel.cpu`` and ``accel.cuda``.

Each case states its policy row and what the row implies, independently of
any path: exact zeros, the NaN pattern, or the gradients of a smaller
problem from which the policy says the special entries drop out (compared
through the agreement suite's bounds, :func:`iem_ref.bounds.attention_vjp_bounds`).
The exact tier has no backward: the reference's rule is the oracle there.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import iem_ref
from iem_ref import bounds
from tests.tolerances import assert_within

INF, NAN = np.inf, np.nan


@pytest.fixture(params=["reference", "cpu", "cuda"])
def path(request):
    return request.param


def vjp(path, q, k, v, g, **kw):
    fn = iem_ref.attention_vjp if path == "reference" else importlib.import_module(f"iem_ref.accel.{path}").attention_vjp
    with np.errstate(all="ignore"):
        return tuple(np.asarray(x, np.float64) for x in fn(q, k, v, g, **kw))


def agrees(path, got, q, k, v, g, **kw):
    """``got`` (some of ``dq, dk, dv``, or ``None`` to skip one) are the gradients of the problem ``(q, k, v, g, kw)``."""
    side = bounds.REFERENCE if path == "reference" else importlib.import_module(f"iem_ref.accel.{path}").arithmetic()
    with np.errstate(all="ignore"):
        refs, bnds = bounds.attention_vjp_bounds(side, q, k, v, g, np.float64, **kw)
    for name, x, y, bd in zip(("dq", "dk", "dv"), got, refs, bnds):
        if x is not None:
            assert_within(x, np.asarray(y, np.float64), bd, f"{path} {name}")


def problem(n=4, m=5, d=3, dv=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal((m, dv)),
            rng.standard_normal((n, dv)))


# --- empty rows: zero gradients for q, and no contribution to k, v, bias or sinks ----------------------------


def test_empty_row_fully_masked(path):
    q, k, v, g = problem()
    mask = np.ones((4, 5), bool)
    mask[1] = False
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.all(dq[1] == 0)
    keep = [0, 2, 3]  # the other rows' gradients, as if row 1 were not there
    agrees(path, (dq[keep], dk, dv), q[keep], k, v, g[keep], mask=mask[keep])


def test_empty_row_all_energies_infinite(path):
    q, k, v, g = problem()
    q[2] = [INF, 0.0, 0.0]  # squared distances +inf to every (finite) key: weight 0 everywhere
    dq, dk, dv = vjp(path, q, k, v, g, energy="sqeuclidean")
    assert np.all(dq[2] == 0)
    keep = [0, 1, 3]
    agrees(path, (dq[keep], dk, dv), q[keep], k, v, g[keep], energy="sqeuclidean")


def test_no_keys(path):
    q, _, _, g = problem()
    dq, dk, dv = vjp(path, q, np.zeros((0, 3)), np.zeros((0, 2)), g)
    assert np.all(dq == 0) and dk.shape == (0, 3) and dv.shape == (0, 2)


def test_empty_row_with_bias_and_sink_adds_nothing(path):
    q, k, v, g = problem()
    mask = np.ones((4, 5), bool)
    mask[0] = False
    bias = np.linspace(-1.0, 1.0, 20).reshape(4, 5)
    dq, dk, dv, dbias, dsink = vjp(path, q, k, v, g, mask=mask, bias=bias, sinks=np.array([0.3]))
    assert np.all(dq[0] == 0) and np.all(dbias[0] == 0)
    keep = [1, 2, 3]  # with a sink the row is not empty but the sink takes all its mass: a = 0, Delta = 0
    _, _, _, _, dsink_rest = vjp(path, q[keep], k, v, g[keep], mask=mask[keep], bias=bias[keep], sinks=np.array([0.3]))
    np.testing.assert_allclose(dsink, dsink_rest, rtol=1e-12)  # the same three rows' terms, summed in another order


# --- keys that do not take part: no gradient flows to them, whatever they hold --------------------------------


@pytest.mark.parametrize("garbage", [pytest.param(NAN, id="nan"), pytest.param(INF, id="inf")])
def test_masked_key_gets_nothing_and_leaks_nothing(path, garbage):
    q, k, v, g = problem()
    k[3], v[3] = garbage, -garbage
    mask = np.ones((4, 5), bool)
    mask[:, 3] = False
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.all(dk[3] == 0) and np.all(dv[3] == 0)
    keep = [0, 1, 2, 4]
    agrees(path, (dq, dk[keep], dv[keep]), q, k[keep], v[keep], g)


def test_excluded_key_by_minus_inf_bias(path):
    q, k, v, g = problem()
    bias = np.zeros((4, 5))
    bias[:, 1] = -INF
    dq, dk, dv, dbias = vjp(path, q, k, v, g, bias=bias)
    assert np.all(dk[1] == 0) and np.all(dv[1] == 0) and np.all(dbias[:, 1] == 0)


# --- certain rows: the output is constant under finite changes of q, k and the logits -------------------------


def test_one_certain_key(path):
    q, k, v, g = problem()
    q[:, 0] = [1.0, -1.0, 2.0, -0.5]
    k[0] = [INF, 0.0, 0.0]  # energy -inf for rows 0 and 2 (certain), +inf for rows 1 and 3 (excluded)
    dq, dk, dv = vjp(path, q, k, v, g)
    assert np.all(dq[[0, 2]] == 0) and np.all(dk[0] == 0)
    np.testing.assert_array_equal(dv[0], g[0] + g[2])  # r = 1 on the certain key: dv_0 = u_0 + u_2
    rest = [1, 3]  # the certain rows add nothing to the other keys
    agrees(path, (dq[rest], dk[1:], dv[1:]), q[rest], k[1:], v[1:], g[rest])


def test_several_certain_keys_share(path):
    q, k, v, g = problem()
    q[:, 0] = np.abs(q[:, 0]) + 0.1
    k[1], k[4] = [INF, 0.0, 1.0], [INF, 2.0, 0.0]  # two keys of energy -inf in every row
    dq, dk, dv = vjp(path, q, k, v, g)
    assert np.all(dq == 0) and np.all(dk == 0)
    np.testing.assert_array_equal(dv[[0, 2, 3]], 0.0)
    np.testing.assert_allclose(dv[1], g.sum(0) / 2, rtol=4 * np.finfo(float).eps)
    np.testing.assert_array_equal(dv[1], dv[4])


def test_certain_by_plus_inf_bias(path):
    q, k, v, g = problem()
    bias = np.zeros((4, 5))
    bias[2, 3] = INF
    dq, dk, dv, dbias = vjp(path, q, k, v, g, bias=bias)
    assert np.all(dq[2] == 0) and np.all(dbias[2] == 0)
    rest = [0, 1, 3]
    agrees(path, (dq[rest], None, None), q[rest], k, v, g[rest], bias=bias[rest])


def test_sink_of_plus_inf_takes_all_mass(path):
    q, k, v, g = problem()
    dq, dk, dv, dsink = vjp(path, q, k, v, g, sinks=np.array([INF]))
    assert np.all(dq == 0) and np.all(dk == 0) and np.all(dv == 0) and np.all(dsink == 0)


# --- special values in a key that takes part, in q, k, v or grad_out ------------------------------------------


def test_infinite_value_spoils_the_logit_gradients_of_the_rows_that_read_it(path):
    q, k, v, g = problem()
    v[2, 1] = INF
    mask = np.ones((4, 5), bool)
    mask[[0, 3], 2] = False  # rows 1 and 2 read the infinite value
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[[1, 2]]).all() and np.isfinite(dq[[0, 3]]).all()
    assert np.isnan(dk).all()  # rows 1 and 2 see every key
    v_fin = v.copy()
    v_fin[2, 1] = 0.0  # dv does not read v
    agrees(path, (None, None, dv), q, k, v_fin, g, mask=mask)


def test_nan_query_spoils_its_row(path):
    q, k, v, g = problem()
    q[1, 2] = NAN
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False  # row 1 sees keys 0-2
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[1]).all() and np.isfinite(dq[[0, 2, 3]]).all()
    assert np.isnan(dk[:3]).all() and np.isnan(dv[:3]).all()
    assert np.isfinite(dk[3:]).all() and np.isfinite(dv[3:]).all()


def test_nan_key_spoils_the_rows_that_see_it(path):
    q, k, v, g = problem()
    k[4, 0] = NAN
    mask = np.ones((4, 5), bool)
    mask[:, 4] = [False, True, False, False]  # only row 1 sees key 4
    mask[1, :2] = False  # and row 1 sees keys 2-4
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[1]).all() and np.isfinite(dq[[0, 2, 3]]).all()
    assert np.isnan(dk[2:]).all() and np.isnan(dv[2:]).all()
    assert np.isfinite(dk[:2]).all() and np.isfinite(dv[:2]).all()


def test_nan_value_spoils_logit_gradients_only(path):
    q, k, v, g = problem()
    v[0, 1] = NAN
    mask = np.ones((4, 5), bool)
    mask[[0, 1], 0] = False  # rows 2 and 3 read it
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[[2, 3]]).all() and np.isfinite(dq[[0, 1]]).all()
    assert np.isnan(dk).all() and np.isfinite(dv).all()


@pytest.mark.parametrize("special", [pytest.param(NAN, id="nan"), pytest.param(INF, id="inf")])
def test_special_upstream_gradient(path, special):
    q, k, v, g = problem()
    g[3, 0] = special
    mask = np.ones((4, 5), bool)
    mask[3, 4] = False  # row 3 sees keys 0-3
    dq, dk, dv = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[3]).all() and np.isfinite(dq[:3]).all()
    assert np.isnan(dk[:4]).all() and np.isfinite(dk[4]).all()
    np.testing.assert_array_equal(np.isnan(dv[:4, 0]), np.isnan(special))  # dv reads u_3 as the forward reads a value
    np.testing.assert_array_equal(dv[:4, 0], special)
    assert np.isfinite(dv[:, 1]).all() and np.isfinite(dv[4]).all()


# --- scale 0, soft-capped infinities, dropout ------------------------------------------------------------------


def test_scale_zero(path):
    q, k, v, g = problem()
    dq, dk, dv = vjp(path, q, k, v, g, scale=0.0)
    assert np.all(dq == 0) and np.all(dk == 0)
    np.testing.assert_allclose(dv, np.broadcast_to(g.sum(0) / 5, dv.shape), rtol=8 * np.finfo(float).eps)


def test_soft_capped_infinite_score(path):
    q, k, v, g = problem()
    q[:, 0] = [1.0, -1.0, 2.0, -0.5]
    k[0] = [INF, 0.0, 0.0]  # score +inf, capped to +c, in rows 0 and 2; -inf (excluded) in rows 1 and 3
    dq, dk, dv, dbias = vjp(path, q, k, v, g, softcap=5.0, bias=np.zeros((4, 5)))
    assert np.isfinite(dq).all() and np.all(dk[0] == 0)  # the cap's derivative is 0 there: k_0 is not read
    assert np.isfinite(dbias).all() and np.all(dbias[[1, 3], 0] == 0) and np.all(dbias[[0, 2], 0] != 0)


def test_dropout_every_key_dropped_and_dropped_garbage(path):
    q, k, v, g = problem()
    v[1] = NAN  # dropped in every row: never read
    keep = np.ones((4, 5), bool)
    keep[:, 1] = False
    keep[3] = False  # row 3 drops every key: output 0
    dq, dk, dv = vjp(path, q, k, v, g, dropout_p=0.25, dropout_mask=keep)
    assert np.all(dq[3] == 0) and np.all(dv[1] == 0)
    assert np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()
    v_fin = v.copy()
    v_fin[1] = 0.0
    agrees(path, (dq, dk, dv), q, k, v_fin, g, dropout_p=0.25, dropout_mask=keep)


# --- iem_ref.testing holds a kernel to the policy ---------------------------------------------------------------


def special_cases():
    q, k, v, g = problem()
    q[:, 0] = [1.0, -1.0, 2.0, -0.5]
    certain = (q, k.copy(), v, g, {})
    certain[1][0] = [INF, 0.0, 0.0]
    spoilt = (q, k, v.copy(), g, {})
    spoilt[2][2, 1] = INF
    dropped = (q, k, v.copy(), g, dict(dropout_p=0.25, dropout_mask=np.arange(20).reshape(4, 5) % 3 != 0))
    dropped[2][0] = NAN  # dropped in rows 0 and 3 ... and read by rows 1 and 2
    masked = (q, k.copy(), v.copy(), g, dict(mask=np.arange(20).reshape(4, 5) % 5 != 3))
    masked[1][3], masked[2][3] = NAN, INF
    bias = np.zeros((4, 5))
    bias[2, 3] = INF
    capped = (q, certain[1], v, g, dict(softcap=5.0))
    nan_query = (q.copy(), k, v, g, {})
    nan_query[0][1, 2] = NAN
    return {"certain": certain, "spoilt": spoilt, "dropped": dropped, "masked": masked,
            "certain_bias": (q, k, v, g, dict(bias=bias)), "capped": capped, "sink": (q, k, v, g, dict(sinks=np.array([INF]))),
            "scale0_certain": (q, certain[1], v, g, dict(scale=0.0)), "nan_query": nan_query}


@pytest.mark.parametrize("case", ["certain", "spoilt", "dropped", "masked", "certain_bias", "capped", "sink", "scale0_certain",
                                  "nan_query"])
def test_vjp_oracle_holds_kernels_to_the_policy(case):
    from iem_ref.testing import assert_attention_vjp_close

    q, k, v, g, kw = special_cases()[case]
    with np.errstate(all="ignore"):
        grads = [np.asarray(x) for x in iem_ref.attention_vjp(q, k, v, g, **kw)[:3]]
    assert assert_attention_vjp_close(*grads, q, k, v, g, **kw) < 1
    for which, name in enumerate(("dq", "dk", "dv")):  # each gradient's finite entries: the tolerance there is finite
        finite = np.argwhere(np.isfinite(grads[which]))
        if len(finite):
            wrong_value = [x.copy() for x in grads]
            wrong_value[which][tuple(finite[-1])] += 1.0
            with pytest.raises(AssertionError, match=f"{name}: arrays are not close"):
                assert_attention_vjp_close(*wrong_value, q, k, v, g, **kw)
    wrong_pattern = [x.copy() for x in grads]  # NaN where the policy has a number, or a number where it has NaN
    wrong_pattern[0][0, 0] = 0.0 if np.isnan(grads[0][0, 0]) else NAN
    with pytest.raises(AssertionError, match="non-finite mismatch"):
        assert_attention_vjp_close(*wrong_pattern, q, k, v, g, **kw)


# --- torch SDPA's backward in the same cases: the README's comparison column -----------------------------------


def torch_vjp(q, k, v, g, **kw):
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    kw = {key: torch.tensor(val) if isinstance(val, np.ndarray) else val for key, val in kw.items()}
    torch.nn.functional.scaled_dot_product_attention(*t, **kw).backward(torch.tensor(g))
    return [x.grad.numpy() for x in t]


def test_torch_sdpa_backward_where_it_differs():
    """What the README says torch SDPA (float64, CPU) does in the policy's cases, measured."""
    q, k, v, g = problem()
    mask = np.ones((4, 5), bool)
    mask[1] = False
    assert np.all(torch_vjp(q, k, v, g, attn_mask=mask)[0][1] == 0)  # empty row: zeros, as here
    q, k, v, g = problem()
    k[3], v[3] = NAN, NAN
    mask = np.ones((4, 5), bool)
    mask[:, 3] = False
    dq, dk, dv = torch_vjp(q, k, v, g, attn_mask=mask)  # a masked key's NaN: leaks into every dq, and its own dk, dv
    assert np.isnan(dq).any(axis=1).all() and np.isnan(dk[3]).all() and np.isnan(dv[3]).all()
    q, k, v, g = problem()
    q[:, 0] = [1.0, -1.0, 2.0, -0.5]
    k[0] = [INF, 0.0, 0.0]
    dq, dk, dv = torch_vjp(q, k, v, g)  # a certain key: NaN in every dk and dv (here: dq = 0 on its rows, dv_0 = u_0 + u_2)
    assert np.isnan(dk).all() and np.isnan(dv).all() and np.isnan(dq[[0, 2]]).all()
    q, k, v, g = problem()
    bias = np.zeros((4, 5))
    bias[2, 3] = INF
    dq, dk, dv = torch_vjp(q, k, v, g, attn_mask=bias)  # a +inf bias: NaN in its row's dq and every dk, dv
    assert np.isnan(dq[2]).all() and np.isfinite(dq[[0, 1, 3]]).all() and np.isnan(dk).all() and np.isnan(dv).all()
    q, k, v, g = problem()
    q[1, 2] = NAN
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    dq, dk, dv = torch_vjp(q, k, v, g, attn_mask=mask)  # a NaN query: NaN also in the keys its row does not see
    assert np.isnan(dk[3:]).all() and np.isnan(dv[3:]).all() and np.isfinite(dq[[0, 2, 3]]).all()
    q, k, v, g = problem()
    v[2, 1] = INF
    dq, dk, dv = torch_vjp(q, k, v, g)  # an infinite value: NaN dq, dk, finite dv, as here
    assert np.isnan(dq).all() and np.isnan(dk).all() and np.isfinite(dv).all()
    q, k, v, g = problem()
    dq, dk, _ = torch_vjp(q, k, v, g, scale=0.0)
    assert np.all(dq == 0) and np.all(dk == 0)


def test_flash_attention_2_arithmetic_where_it_differs():
    """FlashAttention-2's backward arithmetic (``tests/flash_kernels.py``, step for step) in two of the policy's cases."""
    from tests.flash_kernels import FlashKernel

    q, k, v, g = problem(n=6, m=4)
    dq, _, _ = FlashKernel(q, k, v, is_causal=True, causal_alignment="bottom_right").backward(g)
    assert np.all(dq[:2] == 0)  # rows that see no key (bottom-right causal, N > M): zeros, as here
    q, k, v, g = problem(n=5, m=5)
    v[4, 0] = NAN  # seen by row 4 only (causal): dP = dO V^T is NaN in column 4 for every row, and P = 0 does not select
    with np.errstate(invalid="ignore"):
        dq, _, _ = FlashKernel(q, k, v, is_causal=True).backward(g)
        dq_here = iem_ref.attention_vjp(q, k, v, g, is_causal=True)[0]
    assert np.isnan(dq).all() and np.isfinite(dq_here[:4]).all() and np.isnan(dq_here[4]).all()
    q, k, v, g = problem(n=4, m=5)
    q[:, 0] = np.abs(q[:, 0]) + 0.1
    k[0] = [INF, 0.0, 0.0]  # a certain key: its score is +inf, and exp(inf - inf) is NaN in the online softmax
    with np.errstate(invalid="ignore"):
        out, _, _ = FlashKernel(q, k, v).forward()
        dq, dk, dv = FlashKernel(q, k, v).backward(g)
    assert np.isnan(out).all() and np.isnan(dq).all() and np.isnan(dk).all() and np.all(dv == 0)  # its P = 0 where L is not finite


@pytest.mark.parametrize("dv", [pytest.param(2, id="values"), pytest.param(0, id="no-values")])
def test_nan_energy_beside_certain_keys_spoils_the_row(path, dv):
    q, k, v, g = problem(dv=dv)
    q[:, 0] = np.abs(q[:, 0]) + 0.1
    k[1] = [INF, 0.0, 0.0]  # certain in every row
    k[3, 1] = NAN  # and a NaN energy in every row: NaN wins
    mask = np.ones((4, 5), bool)
    mask[2:, 3] = False  # rows 2 and 3 do not see the NaN key: they stay certain
    dq, dk, dv_ = vjp(path, q, k, v, g, mask=mask)
    assert np.isnan(dq[:2]).all() and np.all(dq[2:] == 0)
    assert np.isnan(dk).all()  # rows 0 and 1 see every key
    if dv:
        assert np.isnan(dv_).all()
