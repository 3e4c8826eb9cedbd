"""The attention variants V1-V8 (and their backward, G6) on the reference and the exact tier.

Judges, each independent of the code under test:

- ``composed``: a plain float64 composition of each variant's formula,
  written here with explicit loops over positions and segments, sharing no
  code with :mod:`iem_ref` (the peers' ``attention_ref`` style);
- the exact tier (small inputs), itself checked against the composition;
- central differences of the exact tier for the gradients: inputs on a
  ``2**-20`` grid and a step ``h = 2**-40`` (so ``x +- h`` is exact); the
  exact tier's values carry at least 38 correct digits, so the rounding part
  ``1e-38 |f| / h`` is below ``1e-25``, and the truncation ``h^2 / 6 max|f'''|``
  is below ``1.5e-25 max|f'''|``; with inputs in ``[-1, 1]``, ``D <= 3``, scale
  ``<= 1``, ``|v|, |u| <= 1`` and soft-caps ``>= 1`` every third derivative of
  the loss is below ``10**4``, so the difference quotient is the gradient to
  ``1e-20``, far below the float64 bounds it is compared with;
- torch autograd in float64 (an optional peer).

Tolerances: :func:`iem_ref.testing.assert_attention_close` for outputs (its
documented model, which includes the variants' logits), :func:`lse_tolerance`
for the log-partition and :func:`iem_ref.bounds.variant_vjp_error` for the
gradients.
"""

import decimal
import math
from decimal import Decimal

import numpy as np
import pytest

import iem_ref as R
from iem_ref import exact as X
from iem_ref.attention import Competition, prepare_attention
from iem_ref.bounds import U64, gamma, logit_error, score_sizes, tree_depth, variant_vjp_error
from iem_ref.testing import assert_attention_close

# ---------------------------------------------------------------- the independent composition


def composed(q, k, v, *, scale, bias=None, alibi_slopes=None, softcap=None, window=None, sinks=None, group=1,
             cu_seqlens=None, is_causal=False, bottom_right=False, keep=None, p=0.0, mask=None):
    """softmax(softcap(scale q k^T) + bias + alibi) over the allowed keys (and the sink), times keep/(1-p), times v.

    ``q (H, N, D)``, ``k, v (H / group, M, .)``; per-head ``alibi_slopes``,
    ``sinks`` ``(H,)``; ``cu_seqlens`` one array for queries and keys
    ``(cu_q, cu_k)``.  Returns ``a (H, N, Dv)``, ``lse (H, N)``, ``r (H, N, M)``.
    """
    H, N, _ = q.shape
    M, Dv = k.shape[1], v.shape[2]
    cu_q, cu_k = cu_seqlens if cu_seqlens is not None else ([0, N], [0, M])
    a = np.zeros((H, N, Dv))
    lse = np.full((H, N), -np.inf)
    r = np.zeros((H, N, M))
    for h in range(H):
        kh, vh = k[h // group], v[h // group]
        for i in range(N):
            s_ = max(t for t in range(len(cu_q) - 1) if cu_q[t] <= i)  # this query's segment
            while cu_q[s_ + 1] <= i:
                s_ += 1
            n_s, m_s = cu_q[s_ + 1] - cu_q[s_], cu_k[s_ + 1] - cu_k[s_]
            ipos = i - cu_q[s_] + (m_s - n_s if bottom_right else 0)
            logits = {}
            for j in range(cu_k[s_], cu_k[s_ + 1]):
                jpos = j - cu_k[s_]
                if is_causal and jpos > ipos:
                    continue
                if window is not None and not (ipos - window[0] <= jpos <= ipos + window[1]):
                    continue
                if mask is not None and not mask[h, i, j]:
                    continue
                x = scale * float(np.dot(q[h, i], kh[j]))
                if softcap is not None:
                    x = softcap * math.tanh(x / softcap)
                if bias is not None:
                    x += bias[h, i, j]
                if alibi_slopes is not None:
                    x -= alibi_slopes[h] * abs(ipos - jpos)
                logits[j] = x
            all_logits = list(logits.values()) + ([sinks[h]] if sinks is not None else [])
            if not all_logits:
                continue
            top = max(all_logits)
            total = tree_sum([math.exp(z - top) for z in all_logits])
            lse[h, i] = top + math.log(total)
            terms = []
            for j, z in logits.items():
                r[h, i, j] = math.exp(z - top) / total
                terms.append(r[h, i, j] * (1.0 if keep is None else keep[h, i, j] / (1 - p)) * vh[j])
            if terms:
                a[h, i] = tree_sum(terms)
    return a, lse, r


def tree_sum(xs):
    """Pairwise sum: each term passes through at most ceil(log2 n) additions."""
    xs = list(xs)
    while len(xs) > 1:
        xs = [xs[i] + xs[i + 1] if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
    return xs[0]


def row_errors(inp):
    """``(P, eta, t)``: responsibilities (sink last), the logits' float64 error, the exponents ``|z_j - max z|``.

    ``eta``: :func:`iem_ref.bounds.logit_error` on the score error of
    section 5 (``scale gamma_{D+2} sum |q k|``); the sink's logit is exact.
    """
    comp = Competition(inp)
    P = np.where(np.isfinite(comp.e), R.responsibilities(comp.e, comp.tau, mask=comp.take), 0.0)
    eta = logit_error(comp, inp.scale * gamma(inp.q.shape[-1] + 2, U64) * score_sizes(inp.q, inp.k, "dot", False), U64)
    if inp.sinks is not None:
        eta = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    fin = np.isfinite(comp.e) & (P > 0)
    z = np.where(fin, -comp.e, -np.inf)
    top = z.max(-1, keepdims=True, initial=-np.inf)
    t = np.where(fin, np.abs(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    return P, np.where(P > 0, eta, 0.0), t


def lse_tolerance(inp, L):
    """The log-partitions of the reference and of :func:`composed` (or the exact tier), each against the truth, summed.

    Both: the logits' error through ``dL/dz_j = r_j`` (``sum_j r_j eta_j``).
    The reference's log-sum-exp: ``4 u |L| + 2 u max|z|`` (:mod:`iem_ref.bounds`
    section 4).  The composition's ``top + log(sum_j exp(z_j - top))``: the
    subtractions and exps (``u |z_j - top| + 2 u`` relative per weight, at most
    ``u (max t + 2)`` on the sum), its tree sum (``lg u``), the log (``u
    log(M + 1)``) and the addition (``u |L|``).  Second order: ``1 + 2**-10``.
    """
    P, eta, t = row_errors(inp)
    zmax = np.abs(np.where(np.isfinite(Competition(inp).e), Competition(inp).e, 0.0)).max(-1, initial=0.0)
    aL = np.abs(np.where(np.isfinite(L), L, 0.0))
    M1 = inp.m + 1
    mine = U64 * (t.max(-1, initial=0.0) + 2 + tree_depth(M1) + math.log(M1) + aL)
    return (2 * (P * eta).sum(-1) + 4 * U64 * aL + 2 * U64 * zmax + mine) * (1 + 2.0**-10)


def r_tolerance(inp):
    """Responsibilities of the reference and of :func:`composed`: relative ``2 (eta_j + sum_k r_k eta_k)``
    (both sides' logits), the reference's 3 ulps (``6 u``), the composition's exponent ``u |z_j - top| + 2 u``,
    its tree sum ``lg u`` and division ``u``."""
    P, eta, t = row_errors(inp)
    rel = 2 * (eta + (P * eta).sum(-1, keepdims=True)) + U64 * (6 + t + 2 + tree_depth(inp.m + 1) + 1)
    return (P * rel)[..., : inp.m] * (1 + 2.0**-10)


def grid(rng, shape, lo=-1.0, hi=1.0):
    """Uniform values on a 2**-20 grid (exact under +- 2**-40)."""
    return np.round(rng.uniform(lo, hi, size=shape) * 2**20) / 2**20


H, HKV, N, M, D, DV = 4, 2, 5, 7, 3, 2

CASES = {
    "bias": dict(bias=True),
    "alibi": dict(alibi_slopes=np.array([0.5, 0.25, 0.125, 1.0])),
    "softcap": dict(softcap=1.5),
    "window": dict(window=(2, 1)),
    "window+causal": dict(window=(1, None), is_causal=True),
    "sinks": dict(sinks=np.array([0.3, -1.0, 2.0, 0.0])),
    "gqa": dict(enable_gqa=True),
    "varlen": dict(cu_seqlens_q=np.array([0, 2, 2, 5]), cu_seqlens_k=np.array([0, 3, 4, 7])),
    "varlen+causal": dict(cu_seqlens_q=np.array([0, 2, 5]), cu_seqlens_k=np.array([0, 4, 7]), is_causal=True),
    "dropout": dict(dropout=True),
    "all": dict(bias=True, alibi_slopes=np.array([0.5, 0.25, 0.125, 1.0]), softcap=2.0, window=(3, 0), is_causal=True,
                sinks=np.array([0.3, -1.0, 2.0, 0.0]), enable_gqa=True, dropout=True),
    "all+varlen": dict(cu_seqlens_q=np.array([0, 2, 5]), cu_seqlens_k=np.array([0, 3, 7]), alibi_slopes=np.array([0.5, 0.25, 0.125, 1.0]),
                       softcap=2.0, window=(1, 1), sinks=np.array([0.3, -1.0, 2.0, 0.0]), bias=True, dropout=True),
}


def make_case(rng, spec, align="top_left", n=N, m=M):
    """Inputs and keyword arguments for one case (heads H; H/2 key heads with GQA)."""
    spec = dict(spec)
    hkv = HKV if spec.get("enable_gqa") else H
    q, k, v = grid(rng, (H, n, D)), grid(rng, (hkv, m, D)), grid(rng, (hkv, m, DV))
    kw = dict(scale=0.75, causal_alignment=align)
    if spec.pop("bias", False):
        kw["bias"] = grid(rng, (H, n, m))
    if spec.pop("dropout", False):
        kw["dropout_mask"] = rng.random((H, n, m)) < 0.7
        kw["dropout_p"] = 0.25
    kw.update(spec)
    return q, k, v, kw


def composed_of(q, k, v, kw):
    cu = (kw["cu_seqlens_q"], kw["cu_seqlens_k"]) if "cu_seqlens_q" in kw else None
    window = kw.get("window")
    if window is not None:
        window = tuple(10**9 if w is None or w == -1 else w for w in window)
    return composed(
        q, k, v, scale=kw["scale"], bias=kw.get("bias"), alibi_slopes=kw.get("alibi_slopes"), softcap=kw.get("softcap"),
        window=window, sinks=kw.get("sinks"), group=H // k.shape[0], cu_seqlens=cu, is_causal=kw.get("is_causal", False),
        bottom_right=kw["causal_alignment"] == "bottom_right", keep=kw.get("dropout_mask"), p=kw.get("dropout_p", 0.0),
        mask=None if kw.get("mask") is None else np.broadcast_to(kw["mask"], (H, q.shape[1], k.shape[1])),
    )


# ---------------------------------------------------------------- forward against the composition and the exact tier


@pytest.mark.equation("V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8")
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_an_independent_composition(rng, case, align):
    q, k, v, kw = make_case(rng, CASES[case], align)
    a, lse, r = R.attention(q, k, v, return_lse=True, return_responsibilities=True, **kw)[:3]
    a_c, lse_c, r_c = composed_of(q, k, v, kw)
    # the composition is a float64 kernel; the helper judges it against the reference with the derived tolerance
    assert_attention_close(a_c, q, k, v, **kw)
    tol = lse_tolerance(prepare_attention(q, k, v, **kw), lse)
    assert np.array_equal(np.isfinite(lse), np.isfinite(lse_c))
    fin = np.isfinite(lse)
    assert np.all(np.abs(lse - lse_c)[fin] <= tol[fin]), np.max(np.abs(lse - lse_c)[fin] / tol[fin])
    assert np.all(np.abs(r - r_c) <= r_tolerance(prepare_attention(q, k, v, **kw)))


@pytest.mark.equation("V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8")
@pytest.mark.parametrize("case", ["bias", "alibi", "softcap", "window+causal", "sinks", "gqa", "varlen+causal", "dropout", "all", "all+varlen"])
def test_exact_tier_agrees(rng, case):
    q, k, v, kw = make_case(rng, CASES[case], "bottom_right", n=3, m=4)
    if "cu_seqlens_q" in kw:
        kw["cu_seqlens_q"], kw["cu_seqlens_k"] = np.array([0, 1, 3]), np.array([0, 2, 4])
    res = X.attention(q, k, v, return_lse=True, return_responsibilities=True, **kw)
    a_x, lse_x, r_x = (X.to_float(x) for x in res[:3])
    # the reference, a float64 kernel, within the derived tolerance of the exact answer
    a, lse, r = R.attention(q, k, v, return_lse=True, return_responsibilities=True, **kw)[:3]
    assert_attention_close(a, q, k, v, exact=True, **kw)
    tol = lse_tolerance(prepare_attention(q, k, v, **kw), lse_x)
    fin = np.isfinite(lse_x)
    assert np.array_equal(fin, np.isfinite(lse))
    assert np.all(np.abs(lse - lse_x)[fin] <= tol[fin])
    assert np.all(np.abs(r - r_x) <= r_tolerance(prepare_attention(q, k, v, **kw)))
    if kw.get("sinks") is not None:  # the sink's share: its logit is exact, the rest of the row as for r
        rs, rs_x = R.attention(q, k, v, return_responsibilities=True, **kw)[2], X.to_float(res[3])
        P, eta, _ = row_errors(prepare_attention(q, k, v, **kw))
        assert np.all(np.abs(rs - rs_x) <= rs_x * (2 * (P * eta).sum(-1) + 6 * U64) * (1 + 2.0**-10))


# ---------------------------------------------------------------- backward (G6)


def exact_loss(q, k, v, u, kw):
    a = X.attention(q, k, v, **kw)
    with decimal.localcontext(decimal.Context(prec=120)):  # not the default 28 digits: the difference quotient needs them all
        return sum((Decimal(float(x)) * y for x, y in zip(u.reshape(-1), a.reshape(-1))), Decimal(0))


def exact_gradient(q, k, v, u, kw, name, x0, h=2.0**-40):
    """Central differences of the exact loss ``<u, a>`` in one argument (see the module docstring)."""
    g = np.empty(x0.shape)
    for idx in np.ndindex(x0.shape):
        plus, minus = x0.copy(), x0.copy()
        plus[idx] += h
        minus[idx] -= h
        args = dict(q=q, k=k, v=v, kw=dict(kw))
        for sign, arr in ((1, plus), (-1, minus)):
            if name in ("q", "k", "v"):
                args[name] = arr
            else:
                args["kw"][name] = arr
            val = exact_loss(args["q"], args["k"], args["v"], u, args["kw"])
            if sign == 1:
                fp = val
            else:
                fm = val
        with decimal.localcontext(decimal.Context(prec=120)):
            g[idx] = float((fp - fm) / Decimal(2 * h))
    return g


@pytest.mark.equation("G6")
@pytest.mark.parametrize("case", ["all", "all+varlen"])
@pytest.mark.parametrize("energy", ["dot", "sqeuclidean"])
def test_vjp_matches_central_differences_of_the_exact_tier(rng, case, energy):
    q, k, v, kw = make_case(rng, CASES[case], "bottom_right", n=2, m=3)
    if "cu_seqlens_q" in kw:
        kw["cu_seqlens_q"], kw["cu_seqlens_k"] = np.array([0, 1, 2]), np.array([0, 1, 3])
    kw["energy"] = energy
    u = grid(rng, (H, 2, DV))
    grads = R.attention_vjp(q, k, v, u, **kw)
    bounds = variant_vjp_error(q, k, v, u, **kw)
    names = ["q", "k", "v", "bias", "sinks"]
    for name, g, b in zip(names, grads, bounds):
        x0 = {"q": q, "k": k, "v": v}.get(name, kw.get(name))
        fd = exact_gradient(q, k, v, u, kw, name, np.asarray(x0, dtype=np.float64))
        assert g.shape == fd.shape
        assert np.all(np.abs(g - fd) <= b + 1e-20), (name, np.max(np.abs(g - fd) - b))


@pytest.mark.equation("G6")
@pytest.mark.parametrize("case", sorted(CASES))
def test_vjp_matches_torch_autograd_in_float64(rng, case):
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    q, k, v, kw = make_case(rng, CASES[case], "bottom_right")
    u = grid(rng, (H, N, DV))
    grads = R.attention_vjp(q, k, v, u, **kw)
    bounds = variant_vjp_error(q, k, v, u, **kw)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    tb = torch.tensor(kw["bias"], requires_grad=True) if "bias" in kw else None
    ts = torch.tensor(kw["sinks"], requires_grad=True) if "sinks" in kw else None
    inp = prepare_attention(q, k, v, **kw)
    g = inp.group
    kr, vr = tk.repeat_interleave(g, dim=0), tv.repeat_interleave(g, dim=0)
    x = kw["scale"] * tq @ kr.transpose(-1, -2)
    if inp.softcap is not None:
        x = inp.softcap * torch.tanh(x / inp.softcap)
    if tb is not None:
        x = x + tb
    alibi = inp.alibi()
    if alibi is not None:
        x = x + torch.tensor(np.broadcast_to(alibi, x.shape).copy())
    take = inp.takes_part()
    if take is not None:
        x = x.masked_fill(~torch.tensor(np.ascontiguousarray(take)), -math.inf)
    if ts is not None:
        x = torch.cat([x, ts[:, None, None].expand(H, N, 1)], dim=-1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    P = torch.where(torch.isfinite(lse), torch.exp(x - lse), torch.zeros_like(x))[..., :M]
    if "dropout_mask" in kw:
        P = P * torch.tensor(kw["dropout_mask"]) / (1 - kw["dropout_p"])
    out = P @ vr
    out.backward(torch.tensor(u))
    peers = [tq.grad, tk.grad, tv.grad] + ([tb.grad] if tb is not None else []) + ([ts.grad] if ts is not None else [])
    for ours, theirs, b in zip(grads, peers, bounds):
        assert np.all(np.abs(ours - theirs.numpy()) <= 2 * b)  # two float64 implementations, section 12 each


@pytest.mark.equation("V1", "V6")
def test_bias_and_gqa_match_torch_sdpa_in_float64(rng):
    torch = pytest.importorskip("torch", reason="optional peer torch is not installed")
    F = torch.nn.functional
    q, k, v = grid(rng, (2, H, N, D)), grid(rng, (2, HKV, M, D)), grid(rng, (2, HKV, M, DV))
    bias = grid(rng, (2, H, N, M))
    bias[0, 0, 1, :3] = -np.inf
    tq, tk, tv, tb = (torch.tensor(x, requires_grad=True) for x in (q, k, v, bias))
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tb, enable_gqa=True)
    assert_attention_close(out, q, k, v, bias=bias, enable_gqa=True)
    u = grid(rng, (2, H, N, DV))
    out.backward(torch.tensor(u))
    grads = R.attention_vjp(q, k, v, u, bias=bias, enable_gqa=True)
    bounds = variant_vjp_error(q, k, v, u, bias=bias, enable_gqa=True)
    for ours, theirs, b in zip(grads, (tq.grad, tk.grad, tv.grad, tb.grad), bounds):
        assert ours.shape == theirs.shape
        assert np.all(np.abs(ours - theirs.numpy()) <= 2 * b)


# ---------------------------------------------------------------- properties


def _same(x, y, **kw):
    assert_attention_close(np.asarray(x), **kw) if kw else np.testing.assert_array_equal(x, y)


@pytest.mark.equation("V4")
def test_a_window_as_wide_as_the_sequence_is_no_window(rng):
    q, k, v, kw = make_case(rng, {"is_causal": True}, "bottom_right")
    for window in [(N + M, N + M), (-1, None), (None, None)]:
        np.testing.assert_array_equal(R.attention(q, k, v, window=window, **kw), R.attention(q, k, v, **kw))


@pytest.mark.equation("V7")
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_segments_equal_separate_calls(rng, align):
    q, k, v, kw = make_case(rng, {"is_causal": True, "window": (2, 0), "alibi_slopes": np.array([0.5, 0.25, 0.125, 1.0])}, align)
    cu_q, cu_k = np.array([0, 2, 2, 5]), np.array([0, 3, 5, 7])
    a, lse = R.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    for s in range(3):
        qs, ks, vs = q[:, cu_q[s]:cu_q[s + 1]], k[:, cu_k[s]:cu_k[s + 1]], v[:, cu_k[s]:cu_k[s + 1]]
        lse_s = R.attention(qs, ks, vs, return_lse=True, **kw)[1]
        # the same sums with the other segments' exact zeros in them: equal within the reference's own bounds
        assert_attention_close(a[:, cu_q[s]:cu_q[s + 1]], qs, ks, vs, **kw)
        tol = lse_tolerance(prepare_attention(qs, ks, vs, **kw), lse_s)
        fin = np.isfinite(lse_s)  # an empty segment's rows are -inf on both sides (checked below)
        assert np.all(np.abs(lse[:, cu_q[s]:cu_q[s + 1]][fin] - lse_s[fin]) <= tol[fin])
        assert np.array_equal(np.isfinite(lse[:, cu_q[s]:cu_q[s + 1]]), np.isfinite(lse_s))
    one = R.attention(q, k, v, cu_seqlens_q=[0, N], cu_seqlens_k=[0, M], **kw)
    np.testing.assert_array_equal(one, R.attention(q, k, v, **kw))


@pytest.mark.equation("V6")
def test_gqa_equals_the_repeated_heads_call(rng):
    q, k, v, kw = make_case(rng, {"enable_gqa": True})
    kr, vr = np.repeat(k, 2, axis=0), np.repeat(v, 2, axis=0)
    np.testing.assert_array_equal(R.attention(q, k, v, **kw), R.attention(q, kr, vr, **{**kw, "enable_gqa": False}))
    u = grid(rng, (H, N, DV))
    dq, dk, dv = R.attention_vjp(q, k, v, u, **kw)
    dq_r, dk_r, dv_r = R.attention_vjp(q, kr, vr, u, **{**kw, "enable_gqa": False})
    np.testing.assert_array_equal(dq, dq_r)
    np.testing.assert_array_equal(dk, dk_r[0::2] + dk_r[1::2])
    np.testing.assert_array_equal(dv, dv_r[0::2] + dv_r[1::2])


@pytest.mark.equation("V5")
def test_sinks_at_minus_infinity_are_no_sinks(rng):
    q, k, v, kw = make_case(rng, {"bias": True})
    a, lse = R.attention(q, k, v, sinks=np.full(H, -np.inf), return_lse=True, **kw)
    a0, lse0 = R.attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(lse, lse0)


@pytest.mark.equation("V8")
def test_dropout_keeping_everything_at_p_0_is_no_dropout(rng):
    q, k, v, kw = make_case(rng, {})
    keep = np.ones((H, N, M), bool)
    np.testing.assert_array_equal(R.attention(q, k, v, dropout_mask=keep, dropout_p=0.0, **kw), R.attention(q, k, v, **kw))


@pytest.mark.equation("V3")
def test_softcap_tends_to_no_softcap(rng):
    # x - c tanh(x / c) <= |x|^3 / (3 c^2), and the mean moves by at most 2 max|v| times the largest logit change
    q, k, v, kw = make_case(rng, {})
    a0 = R.attention(q, k, v, **kw)
    xmax = kw["scale"] * np.max(np.abs(q @ np.swapaxes(k, -1, -2)))
    for c in [10.0, 100.0, 1e4]:
        a = R.attention(q, k, v, softcap=c, **kw)
        assert np.max(np.abs(a - a0)) <= 2 * np.max(np.abs(v)) * xmax**3 / (3 * c**2) + 64 * U64


# ---------------------------------------------------------------- the edge-case policy rows


@pytest.mark.parametrize("tier", ["reference", "exact"])
@pytest.mark.equation("V1", "V3", "V4", "V5", "V7", "V8")
def test_edge_cases_of_the_variants(tier):
    att = R.attention if tier == "reference" else (lambda *a, **kw: _floats(X.attention(*a, **kw)))
    q = np.array([[1.0], [2.0]])
    k = np.array([[1.0], [-1.0], [0.5]])
    v = np.array([[1.0], [2.0], [4.0]])
    # a -inf bias excludes its key, even where the score is +inf (no NaN from -inf + inf)
    qi = np.array([[np.inf], [1.0]])
    a = att(qi, np.array([[1.0], [0.5]]), v[:2], scale=1.0, bias=np.array([[-np.inf, 0.0], [0.0, 0.0]]))
    assert np.isfinite(a).all() and a[0, 0] == 2.0
    # a +inf bias is a certain key: it takes all the mass (shared among certain keys)
    a, lse = att(q, k, v, scale=1.0, bias=np.array([[np.inf, 0.0, np.inf]] * 2), return_lse=True)
    np.testing.assert_array_equal(a, [[2.5], [2.5]])
    assert np.all(lse == np.inf)
    # an empty window: no key takes part, the row is empty (zeros, or NaN), the log-partition -inf
    a, lse = att(q, k[:1], v[:1], scale=1.0, window=(0, 0), causal_alignment="top_left", return_lse=True)
    assert a[1, 0] == 0.0 and lse[1] == -np.inf and np.isfinite(lse[0])
    a = att(q, k[:1], v[:1], scale=1.0, window=(0, 0), empty="nan")
    assert np.isnan(a[1, 0]) and a[0, 0] == 1.0
    # every key masked but a sink: not empty; the sink (value 0) takes all the mass
    a, lse = att(q, k, v, scale=1.0, mask=np.zeros((2, 3), bool), sinks=[0.5], empty="nan", return_lse=True)
    np.testing.assert_array_equal(a, [[0.0], [0.0]])
    np.testing.assert_array_equal(lse, [0.5, 0.5])
    # a soft-capped infinite score is c (a bounded energy); a +inf energy stays excluded
    a, lse = att(np.array([[np.inf]]), k[:2], v[:2], scale=1.0, softcap=2.0, return_lse=True)
    np.testing.assert_array_equal(a, [[1.0]])  # key 0: score +inf capped to 2; key 1: energy +inf, excluded
    assert lse[0] == 2.0
    # an empty segment: its queries have no key
    a, lse = att(q, k, v, scale=1.0, cu_seqlens_q=[0, 1, 2], cu_seqlens_k=[0, 3, 3], return_lse=True)
    assert a[1, 0] == 0.0 and lse[1] == -np.inf and np.isfinite(lse[0])
    # dropout_p = 1 is refused (1 / (1 - p))
    with pytest.raises(ValueError, match="dropout_p"):
        att(q, k, v, dropout_p=1.0, dropout_mask=np.ones((2, 3), bool))


def _floats(res):
    return tuple(X.to_float(x) for x in res) if isinstance(res, tuple) else X.to_float(res)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
        (dict(alibi_slopes=np.array([np.inf, 1, 1, 1])), ValueError, "alibi_slopes"),
        (dict(sinks=np.ones((2, 3))), ValueError, "sinks"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(dropout_p=1.0, dropout_mask=np.ones((N, M), bool)), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1, dropout_mask=np.ones((N, M), bool)), ValueError, "dropout_p"),
        (dict(dropout_p=0.5), ValueError, "dropout_mask"),
        (dict(dropout_mask=np.ones((N, M))), TypeError, "dropout_mask"),
        (dict(bias=np.ones((N, M), bool)), TypeError, "bias"),
        (dict(bias=np.ones((3, 3))), ValueError, "bias"),
        (dict(window=(1,)), ValueError, "window"),
        (dict(window=(-2, 0)), ValueError, "window"),
        (dict(window=(1.5, 0)), TypeError, "window"),
        (dict(cu_seqlens_q=[0, 2, 5]), ValueError, "cu_seqlens"),
        (dict(cu_seqlens_q=[0, 3, 2, 5], cu_seqlens_k=[0, 2, 4, 7]), ValueError, "cu_seqlens_q"),
        (dict(cu_seqlens_q=[0, 2, 4], cu_seqlens_k=[0, 3, 7]), ValueError, "cu_seqlens_q"),
        (dict(cu_seqlens_q=[1, 2, 5], cu_seqlens_k=[0, 3, 7]), ValueError, "cu_seqlens_q"),
        (dict(cu_seqlens_q=[0.0, 5.0], cu_seqlens_k=[0, 7]), TypeError, "cu_seqlens_q"),
        (dict(cu_seqlens_q=[0, 2, 5], cu_seqlens_k=[0, 7]), ValueError, "segments"),
        (dict(enable_gqa=True, k_heads=3), ValueError, "multiple"),
        (dict(no_such_variant=1), TypeError, "no_such_variant"),
    ],
)
def test_bad_variant_arguments_raise_naming_the_argument(rng, kw, error, match):
    kw = dict(kw)
    hk = kw.pop("k_heads", H)
    q, k, v = rng.normal(size=(H, N, D)), rng.normal(size=(hk, M, D)), rng.normal(size=(hk, M, DV))
    for fn in (R.attention, X.attention, lambda *a, **k_: R.attention_vjp(*a, np.ones((H, N, DV)), **k_)):
        with pytest.raises(error, match=match):
            fn(q, k, v, **kw)


# ---------------------------------------------------------------- iem_ref.testing with the variants


def test_the_helper_catches_variant_bugs(rng):
    """Variant bugs that a loose tolerance (atol = rtol = 1e-2, common for float32 kernels) lets through: each is caught."""
    q, k, v, kw = make_case(rng, CASES["all"], "bottom_right")
    a_c = composed_of(q, k, v, kw)[0]
    assert_attention_close(a_c, q, k, v, **kw)
    bugs = {
        "soft-cap 1% off": composed_of(q, k, v, dict(kw, softcap=kw["softcap"] * 1.01))[0],
        "ALiBi slopes 1% off": composed_of(q, k, v, dict(kw, alibi_slopes=kw["alibi_slopes"] * 1.01))[0],
        "sink logit 1% off": composed_of(q, k, v, dict(kw, sinks=kw["sinks"] * 1.01))[0],
        "dropout rescaled by 1/(1 - p) twice, p = 0.25, with 1e-2 of it": a_c * (1 + 1e-2 * (1 / 0.75 - 1)),
    }
    for name, a_bad in bugs.items():
        assert np.allclose(a_bad, a_c, rtol=1e-2, atol=1e-2), name  # what a loose tolerance would accept
        with pytest.raises(AssertionError):
            assert_attention_close(a_bad, q, k, v, **kw)


def test_layout_bshd_takes_flashattention_tensors(rng):
    q, k, v, kw = make_case(rng, {"enable_gqa": True, "is_causal": True}, "bottom_right")
    a = R.attention(q, k, v, **kw)
    to_bshd = lambda x: np.ascontiguousarray(np.swapaxes(x[None], 1, 2))  # noqa: E731  (1, N, H, D)
    assert_attention_close(to_bshd(a), to_bshd(q), to_bshd(k), to_bshd(v), layout="bshd", **kw)
    with pytest.raises(AssertionError):
        assert_attention_close(to_bshd(a)[:, ::-1].copy(), to_bshd(q), to_bshd(k), to_bshd(v), layout="bshd", **kw)
