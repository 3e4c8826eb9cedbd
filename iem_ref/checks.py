"""``iem-ref check``: every equation evaluated on built-in inputs against an independent computation.

Each check returns ``(against, error, tolerance)``: what the reference was
compared with, the largest error found, and the bound it must stay within.
Bounds are stated in units of the float64 roundoff ``u = 2**-53`` with the
reason next to them, built from the primitives of :mod:`iem_ref.bounds`
(``u``, ``gamma_n`` for ``n`` roundings, ``k`` ulps = ``2 k u`` relative).
"decimal" means a 50-digit computation with the standard library's
``decimal`` module on the same float inputs (independent of the reference's
floating-point arithmetic and of ``iem_ref.exact``).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import scipy.special
import scipy.stats
from scipy.spatial.distance import cdist

import iem_ref as R

from .bounds import REFERENCE_R_ULPS, U64, gamma, ulps

U = U64
CHECKS = {}


def check(eq_id):
    def register(fn):
        CHECKS[eq_id] = fn
        return fn

    return register


def _inputs():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(5, 4))
    k = rng.normal(size=(7, 4))
    v = rng.normal(size=(7, 3))
    d = rng.normal(scale=3.0, size=(6, 9))
    return q, k, v, d


def _dec(x):
    return Decimal(float(x))


def _dec_softmin(row, tau=1.0):
    """Responsibilities and log-partition of one row, in 50-digit decimal."""
    with localcontext() as ctx:
        ctx.prec = 50
        w = [(-_dec(x) / _dec(tau)).exp() for x in row]
        s = sum(w)
        return [float(x / s) for x in w], float(s.ln())


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(float).tiny)))


def _abs(a, b):
    return float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))


def _central_difference(f, x, h):
    """d f / d x_j for every entry of x (f returns an array)."""
    grads = []
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        grads.append((f(xp) - f(xm)) / (2 * h))
    grads = np.stack(grads, axis=-1)
    return grads.reshape(grads.shape[:-1] + x.shape)


# Finite differences: step h = 1e-5 on O(1) inputs.  Truncation error
# h^2/6 |f'''| <= ~2e-11 (third derivatives of these smooth maps are O(1) here);
# rounding error ~ 4 u |f| / (2h) <= ~1e-10 for |f| <= 5.  Tolerance 1e-9 covers both.
FD_STEP, FD_TOL = 1e-5, 1e-9


@check("A1")
def _a1():
    q, k, _, _ = _inputs()
    # the exact products (Fractions) summed exactly and rounded once: within u |d| of the true value
    ref = np.array([[-float(sum(Fraction(a) * Fraction(b) for a, b in zip(qi, kj))) for kj in k] for qi in q])
    # matmul: D products summed, error <= gamma_D sum_c |q_ic k_jc|; the reference's one rounding: u |d|
    D = q.shape[1]
    tol = float(np.max(gamma(D, U) * (np.abs(q) @ np.abs(k).T) + U * np.abs(ref)))
    return "exact sum of the exact products, rounded once", _abs(R.dot_energy(q, k), ref), tol


@check("A2")
def _a2():
    _, _, _, d = _inputs()
    ref = [[math.exp(-x / 2.0) for x in row] for row in d]
    return "math.exp", _rel(R.likelihoods(d, tau=2.0), ref), 2 * U  # two correctly-rounded-ish exps


@check("A3")
def _a3():
    _, _, _, d = _inputs()
    ref = [_dec_softmin(row)[0] for row in d]
    return "decimal softmin", _rel(R.responsibilities(d), ref), 3 * 2 * U  # 3 ulps componentwise


@check("A4")
def _a4():
    q, k, v, _ = _inputs()
    scale = 0.5
    d = R.dot_energy(q, k) * scale
    with localcontext() as ctx:
        ctx.prec = 50
        ref = []
        for row in d:
            r = [_dec(x) for x in _dec_softmin(row)[0]]
            ref.append([float(sum(r[j] * _dec(v[j, c]) for j in range(len(r)))) for c in range(v.shape[1])])
    a = R.attention(q, k, v, scale=scale)
    # r_j within 3 ulps (6u) and an M-term matmul: |error| <= (6u + gamma_M) sum_j r_j |v_j|; energies:
    # d within gamma_D |q||k| (the matmul), moving r_j by twice that times scale, relative: + 2 gamma_D max|q k| scale max|v|.
    M, D = k.shape
    vmax = float(np.max(np.abs(v)))
    tol = (ulps(REFERENCE_R_ULPS, U) + gamma(M, U)) * vmax + 2 * gamma(D, U) * scale * float(np.max(np.abs(q) @ np.abs(k).T)) * vmax
    return "decimal posterior mean", _abs(a, ref), tol


@check("T1")
def _t1():
    q, k, _, _ = _inputs()
    s = q @ k.T / np.sqrt(q.shape[1])
    ref = scipy.special.softmax(s, axis=-1)
    # scipy rounds s_j - max(s): relative error in r_j up to |s_j - max| u * 2 + a few ulps.
    tol = (2 * float(np.ptp(s)) + 8) * U * 2
    return "scipy.special.softmax(qk^T/sqrt(D))", _rel(R.attention_responsibilities(q, k), ref), tol


@check("T2")
def _t2():
    _, _, _, d = _inputs()
    ref = [_dec_softmin(row, 2.5)[0] for row in d]
    err = _rel(R.responsibilities(d, tau=2.5), ref)
    uniform = _abs(R.responsibilities(d, tau=np.inf), np.full(d.shape, 1.0 / d.shape[1]))
    return "decimal softmin at tau = 2.5; uniform at tau = inf", max(err, uniform), 3 * 2 * U


@check("T3")
def _t3():
    # Energies on a 1/8 grid, shift 1024 and scale 4: every transformed energy is exact,
    # so both sides approximate the same exact r within 3 ulps each.
    d = np.round(_inputs()[3] * 8) / 8
    r = R.responsibilities(d, tau=1.5)
    err = max(_rel(R.responsibilities(d + 1024.0, tau=1.5), r), _rel(R.responsibilities(4.0 * d, tau=6.0), r))
    return "r(d + c), r(c d, c tau)", err, 2 * 3 * 2 * U


@check("H1")
def _h1():
    d = np.array([[3.0, 1.0, 2.0], [1.0, 0.5, 0.5], [-np.inf, 0.0, -np.inf]])
    ref = np.array([[0, 1, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]])
    return "explicit argmin with split ties", _abs(R.hard_responsibilities(d), ref), 0.0


@check("H2")
def _h2():
    d = np.array([0.0, 0.3, 1.0, 2.0])
    worst = 0.0
    for tau in (0.1, 0.05, 0.02):
        gap_bound = 2 * np.exp(-(d[1:] - d[0]) / tau).sum()  # |r - hard|_1 <= 2 sum_{j>0} e^{-(d_j - d_0)/tau}
        worst = max(worst, float(np.abs(R.responsibilities(d, tau) - R.hard_responsibilities(d)).sum() / gap_bound))
    return "hard limit, |r - H1|_1 / (2 sum e^{-gap/tau})", worst, 1.0


@check("H3")
def _h3():
    z = np.linspace(-3, 3, 13)
    with localcontext() as ctx:
        ctx.prec = 50
        ref = [float(_dec(0.5) * (1 + (_dec(x) / _dec(0.5)).exp()).ln()) for x in z]
    err_sp = _rel(R.softplus(z, 0.5), ref)
    limit = float(np.max(np.abs(R.softplus(z, 1e-3) - R.relu(z))) / (1e-3 * math.log(2)))  # <= tau log 2
    sig = _rel(R.softplus_derivative(z, 0.5), scipy.special.expit(z / 0.5))
    err = max(err_sp / (4 * U), limit, sig / (4 * U))
    # The relu bound is attained at z = 0 (softplus_tau(0) = tau log 2): allow its rounding, 16 u.
    return "decimal softplus; relu within tau log 2; expit(z/tau)  [ratio to bound]", err, 1.0 + 16 * U


@check("S1")
def _s1():
    z = np.linspace(-2, 2, 9)
    ref = np.stack([(z - 1.5) ** 2 / (2 * 0.49), (z + 1.5) ** 2 / (2 * 0.49)], axis=-1)
    return "(z - s m)^2 / (2 sigma^2), s = +1, -1", _rel(R.signed_gaussian_energies(z, 1.5, 0.7), ref), 4 * U


@check("S2")
def _s2():
    z = np.linspace(-2, 2, 9)
    ref = [_dec_softmin(row)[0] for row in np.stack([-z, z], axis=-1)]
    return "decimal two-way softmin", _rel(R.sign_responsibilities(-z, z), ref), 3 * 2 * U


@check("S3")
def _s3():
    z = np.linspace(-2, 2, 9)
    r = R.sign_responsibilities(-z, z)
    # a = r_+ - r_-: one subtraction of two values each within 3 ulps of <= 1: absolute 6u + u.
    return "r_+ - r_-", _abs(R.sign_posterior_mean(-z, z), r[:, 0] - r[:, 1]), 7 * 2 * U


@check("S4")
def _s4():
    z = np.linspace(-3, 3, 25)
    # r_+, r_- within 3 ulps of values <= 1, subtraction, np.tanh within 1 ulp: absolute 8u.
    return "np.tanh(m z / sigma^2)", _abs(R.tanh_from_signed_gaussian(z, 1.5, 0.9), np.tanh(1.5 * z / 0.81)), 8 * 2 * U + 4 * U


@check("S5")
def _s5():
    z = np.linspace(-3, 3, 25)
    return "np.tanh(alpha z)", _abs(R.tanh_as_attention(z, 0.7), np.tanh(0.7 * z)), 8 * 2 * U + 4 * U


@check("P1")
def _p1():
    q, k, v, _ = _inputs()
    _, r = R.attention(q, k, v, return_responsibilities=True)
    err = max(_abs(r.sum(axis=-1), 1.0), _abs(r, R.responsibilities(R.dot_energy(q, k), tau=2.0)))
    return "rows sum to 1; = responsibilities(d, sqrt(D))", err, 8 * U  # M = 7 values within 3 ulps, one sum


@check("P2")
def _p2():
    q, _, v, d = _inputs()
    r = R.responsibilities(d[:, :7])
    with localcontext() as ctx:
        ctx.prec = 50
        ref = [[float(sum(_dec(r[i, j]) * _dec(v[j, c]) for j in range(7))) for c in range(3)] for i in range(6)]
    # a 7-term matmul: gamma_7 sum_h r_h |g_h|; the decimal value rounded once: u |ref|
    tol = gamma(7, U) * float(np.max(np.abs(v))) + U * float(np.max(np.abs(ref)))
    return "decimal sum_h r_h g_h", _abs(R.posterior_mean(r, v), ref), tol


@check("P3")
def _p3():
    d = np.array([[0.3, -1.0, 2.0], [0.0, 0.0, 1.0]])
    g = np.array([10.0, 20.0, 30.0])
    return "g(argmin d), ties averaged", _abs(R.posterior_mode(d, g), [20.0, 15.0]), 0.0


@check("P4")
def _p4():
    _, _, _, d = _inputs()
    r = R.responsibilities(d)
    g = np.linspace(-1, 1, d.shape[1])
    with localcontext() as ctx:
        ctx.prec = 50
        var, ent = [], []
        for row in r:
            rr = [_dec(x) for x in row]
            mean = sum(a * _dec(b) for a, b in zip(rr, g))
            var.append(float(sum(a * (_dec(b) - mean) ** 2 for a, b in zip(rr, g))))
            ent.append(float(-sum(a * a.ln() for a in rr if a > 0)))
    err = max(_abs(R.posterior_variance(r, g), var), _abs(R.posterior_entropy(r), ent))
    return "decimal variance and entropy", err, 32 * U  # sums of 9 terms of size <= log 9


@check("P5")
def _p5():
    z = np.linspace(-2, 2, 9)
    return "tanh(z) for prototypes +-1", _abs(R.prototype_activation(z, [1.0, -1.0], [1.0, -1.0]), np.tanh(z)), 20 * U


def _kernel_check(fn, metric, transform=lambda x: x, **kw):
    q, k, _, _ = _inputs()
    ref = transform(cdist(q, k, metric, **kw))
    return _rel(fn(q, k), ref)


@check("K1")
def _k1():
    q, k, _, _ = _inputs()
    # two D-term dot products in different orders: each within gamma_D sum_c |q_c k_c|
    tol = 2 * gamma(q.shape[1], U) * float(np.max(np.abs(q) @ np.abs(k).T))
    return "-(q @ k.T) by einsum", _abs(R.dot_energy(q, k), -np.einsum("nd,md->nm", q, k)), tol


@check("K2")
def _k2():
    return "scipy cdist sqeuclidean / 2", _kernel_check(R.sqeuclidean_energy, "sqeuclidean", lambda x: x / 2), 16 * U


@check("K3")
def _k3():
    q, k, _, _ = _inputs()
    cov = np.array([[2.0, 0.3, 0, 0], [0.3, 1.0, 0, 0], [0, 0, 1.5, 0.2], [0, 0, 0.2, 0.7]])
    ref = cdist(q, k, "mahalanobis", VI=np.linalg.inv(cov)) ** 2
    return "scipy cdist mahalanobis^2", _rel(R.mahalanobis_energy(q, k, cov), ref), 1e3 * U * np.linalg.cond(cov)


@check("K4")
def _k4():
    return "scipy cdist cityblock", _kernel_check(R.laplace_energy, "cityblock"), 8 * U


@check("K5")
def _k5():
    return "scipy cdist cosine", _kernel_check(R.cosine_energy, "cosine"), 64 * U


@check("K6")
def _k6():
    q, k, _, _ = _inputs()
    ref = np.log1p(cdist(q, k, "sqeuclidean") / (3.0 * 0.25))
    return "log1p(cdist / (nu sigma^2))", _rel(R.student_t_energy(q, k, nu=3.0, sigma=0.5), ref), 32 * U


@check("K7")
def _k7():
    q, k, _, _ = _inputs()
    r = cdist(q, k)
    huber = np.array([[scipy.special.huber(1.3, x) for x in row] for row in r])
    pseudo = np.array([[scipy.special.pseudo_huber(1.3, x) for x in row] for row in r])
    err = max(_rel(R.huber_energy(q, k, 1.3), huber), _rel(R.pseudo_huber_energy(q, k, 1.3), pseudo))
    return "scipy.special.huber / pseudo_huber", err, 64 * U


@check("K8")
def _k8():
    z = np.linspace(-4, 4, 17)
    return "log1p(exp(-alpha (z - mu)))", _rel(R.logistic_energy(z, 0.5, 2.0), np.log1p(np.exp(-2.0 * (z - 0.5)))), 8 * U


@check("G1")
def _g1():
    _, _, _, d = _inputs()
    fd = _central_difference(lambda x: R.log_partition(x), d[0], FD_STEP)
    return "central difference of log_partition", _abs(R.log_partition_gradient(d[0]), fd), FD_TOL


@check("G2")
def _g2():
    _, _, _, d = _inputs()
    fd = _central_difference(lambda x: R.responsibilities(x, tau=1.5), d[0], FD_STEP)
    return "central difference of responsibilities", _abs(R.responsibilities_jacobian(d[0], tau=1.5), fd), FD_TOL


@check("G3")
def _g3():
    _, _, _, d = _inputs()
    y = R.neg_log_softmin(d[0])
    fd = _central_difference(lambda x: R.neg_log_softmin(x), d[0], FD_STEP)
    # exp(-y) vs r: y within a few ulps of -log r, so exp(-y) within |y| * few u + 1 ulp of r: 8 ulps here.
    err = max(_rel(np.exp(-y), R.responsibilities(d[0])) / (8 * 2 * U), _abs(R.neg_log_softmin_jacobian(d[0]), fd) / FD_TOL)
    return "exp(-y) = r; central difference of y  [ratio to bound]", err, 1.0


@check("G4")
def _g4():
    q, k, v, _ = _inputs()
    u = np.random.default_rng(1).normal(size=(5, 3))
    loss = lambda q_, k_, v_: float((u * R.attention(q_, k_, v_, is_causal=True)).sum())  # noqa: E731
    dq, dk, dv = R.attention_vjp(q, k, v, u, is_causal=True)
    err = 0.0
    for arr, grad, which in ((q, dq, 0), (k, dk, 1), (v, dv, 2)):
        def f(x, which=which):
            args = [q, k, v]
            args[which] = x
            return np.array(loss(*args))
        err = max(err, _abs(grad, _central_difference(f, arr, FD_STEP)))
    return "central difference of <u, attention>", err, FD_TOL


@check("G5")
def _g5():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 2))
    means = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    covs = np.array([[[1.0, 0.2], [0.2, 0.5]], [[0.7, 0.0], [0.0, 0.7]], [[2.0, -0.3], [-0.3, 1.0]]])
    w = np.array([0.5, 0.3, 0.2])
    dens = np.stack([w[j] * scipy.stats.multivariate_normal(means[j], covs[j]).pdf(x) for j in range(3)], axis=-1)
    ref = dens / dens.sum(axis=-1, keepdims=True)
    return "scipy.stats densities normalised", _rel(R.mixture_responsibilities(x, means, covs, w), ref), 1e3 * U


@check("M1")
def _m1():
    _, _, v, d = _inputs()
    p = R.partial_posterior(d[:, :7], v)
    a, L = R.finalize_partial(p)
    ra, rL = R.softmin_summary(d[:, :7], v)
    return "one-block partial = softmin_summary", max(_abs(a, ra), _abs(L, rL)), 32 * U * float(np.max(np.abs(v)) + np.max(np.abs(rL)))


@check("M2")
def _m2():
    _, _, v, d = _inputs()
    d = d[:, :7]
    blocks = [(0, 2), (2, 3), (3, 7)]
    parts = [R.partial_posterior(d[:, a:b], v[a:b]) for a, b in blocks]
    left = R.merge_partials(R.merge_partials(parts[0], parts[1]), parts[2])
    right = R.merge_partials(parts[2], R.merge_partials(parts[1], parts[0]))
    ra, rL = R.softmin_summary(d, v)
    err = 0.0
    for merged in (left, right):
        a, L = R.finalize_partial(merged)
        err = max(err, _abs(a, ra), _abs(L, rL))
    # Each exp / product / sum in the merge adds a few u; 7 keys, 2 merges: 32 u |values| covers it.
    return "any split and merge order = one pass", err, 32 * U * float(np.max(np.abs(v)) + np.max(np.abs(rL)))


def _variant_case():
    """Two heads over 4 queries and 5 keys (one key head: grouped-query), with every variant's inputs."""
    rng = np.random.default_rng(11)
    q, k, v = rng.normal(size=(2, 4, 3)), rng.normal(size=(1, 5, 3)), rng.normal(size=(1, 5, 2))
    bias = rng.normal(size=(2, 4, 5))
    return q, k, v, bias


def _softmax_rows(z, v, sink=None):
    """softmax over the last axis (a sink logit appended), times v: the check's own composition."""
    full = z if sink is None else np.concatenate([z, np.broadcast_to(sink, z.shape[:-1] + (1,))], axis=-1)
    top = np.max(np.where(np.isfinite(full), full, -np.inf), axis=-1, keepdims=True)
    w = np.where(np.isfinite(full), np.exp(full - top), 0.0)
    r = w / w.sum(-1, keepdims=True)
    return r[..., : z.shape[-1]] @ v, np.log(w.sum(-1)) + top[..., 0]


# The variants' checks compare with a plain composition of 5 keys: each logit takes a few roundings
# (a product, a tanh, two additions: <= 8 u |z| with |z| < 8 here), the softmax and the mean a few
# more: 2**8 u of the values' size (|v| < 4) bounds both sides with room.
_VTOL = 2**8 * U * 4


@check("V1")
def _v1():
    q, k, v, bias = _variant_case()
    z = 0.5 * q @ k[0].T + bias
    a = R.attention(q, k, v, scale=0.5, bias=bias)
    return "softmax(scale q k^T + bias) v", _abs(a, _softmax_rows(z, v[0])[0]), _VTOL


@check("V2")
def _v2():
    q, k, v, _ = _variant_case()
    slopes = np.array([0.5, 0.25])
    i, j = np.arange(4)[:, None] + 1, np.arange(5)[None, :]  # bottom-right: i' = i + M - N
    z = 0.5 * q @ k[0].T - slopes[:, None, None] * np.abs(i - j)
    a = R.attention(q, k, v, scale=0.5, alibi_slopes=slopes, causal_alignment="bottom_right")
    return "bias -slope |i + M - N - j|", _abs(a, _softmax_rows(z, v[0])[0]), _VTOL


@check("V3")
def _v3():
    q, k, v, _ = _variant_case()
    z = 2.0 * np.tanh(3.0 * q @ k[0].T / 2.0)
    return "scores 2 tanh(x / 2)", _abs(R.attention(q, k, v, scale=3.0, softcap=2.0), _softmax_rows(z, v[0])[0]), _VTOL


@check("V4")
def _v4():
    q, k, v, _ = _variant_case()
    i, j = np.arange(4)[:, None], np.arange(5)[None, :]
    z = np.where((j >= i - 1) & (j <= i + 1), 0.5 * q @ k[0].T, -np.inf)
    a = R.attention(q, k, v, scale=0.5, window=(1, 1))
    return "band |i - j| <= 1", _abs(a, _softmax_rows(z, v[0])[0]), _VTOL


@check("V5")
def _v5():
    q, k, v, _ = _variant_case()
    sinks = np.array([0.3, -1.0])
    ref_a, ref_L = _softmax_rows(0.5 * q @ k[0].T, v[0], sinks[:, None, None])
    a, L = R.attention(q, k, v, scale=0.5, sinks=sinks, return_lse=True)
    return "one more logit in the denominator", max(_abs(a, ref_a), _abs(L, ref_L)), _VTOL


@check("V6")
def _v6():
    q, k, v, _ = _variant_case()
    a = R.attention(q, np.concatenate([k, k]), np.concatenate([v, v]), scale=0.5)
    return "= the call with repeated key heads", _abs(R.attention(q, k, v, scale=0.5, enable_gqa=True), a), 0.0


@check("V7")
def _v7():
    q, k, v, _ = _variant_case()
    cu_q, cu_k = np.array([0, 1, 4]), np.array([0, 2, 5])
    a = R.attention(q, k, v, scale=0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    parts = [R.attention(q[:, cu_q[s]:cu_q[s + 1]], k[:, cu_k[s]:cu_k[s + 1]], v[:, cu_k[s]:cu_k[s + 1]], scale=0.5) for s in range(2)]
    return "= one call per segment", _abs(a, np.concatenate(parts, axis=1)), _VTOL


@check("V8")
def _v8():
    q, k, v, _ = _variant_case()
    keep = np.random.default_rng(2).random((2, 4, 5)) < 0.7
    r = R.attention_responsibilities(q, k, scale=0.5)
    a = R.attention(q, k, v, scale=0.5, dropout_mask=keep, dropout_p=0.25)
    return "(r * keep / (1 - p)) v", _abs(a, (r * keep / 0.75) @ v[0]), _VTOL


@check("G6")
def _g6():
    q, k, v, bias = _variant_case()
    u = np.random.default_rng(5).normal(size=(2, 4, 2))
    kw = dict(scale=0.5, softcap=2.0, enable_gqa=True, is_causal=True)
    sinks = np.array([0.3, -1.0])
    grads = R.attention_vjp(q, k, v, u, bias=bias, sinks=sinks, **kw)
    loss = lambda b, s: np.array(float((u * R.attention(q, k, v, bias=b, sinks=s, **kw)).sum()))  # noqa: E731
    err = max(
        _abs(grads[3], _central_difference(lambda b: loss(b, sinks), bias, FD_STEP)),
        _abs(grads[4], _central_difference(lambda s: loss(bias, s), sinks, FD_STEP)),
    )
    return "central difference in bias and sinks", err, FD_TOL


def _f_mod(score, b, h, q_idx, kv_idx):
    """The checks' score_mod: a curved, head- and position-dependent modification (a bounded energy plus a prior)."""
    return 1.5 * np.tanh(score / 1.5) + 0.1 * (h + 1) * (kv_idx - q_idx)


@check("F1")
def _f1():
    q, k, v, _ = _variant_case()
    i, j, h = np.arange(4)[:, None], np.arange(5)[None, :], np.arange(2)[:, None, None]
    z = _f_mod(0.5 * q @ k[0].T, 0, h, i, j)
    a = R.attention(q, k, v, scale=0.5, score_mod=_f_mod, enable_gqa=True)
    return "softmax(score_mod(scale q k^T)) v", _abs(a, _softmax_rows(z, v[0])[0]), _VTOL


@check("F2")
def _f2():
    q, k, v, _ = _variant_case()
    i, j = np.arange(4)[:, None], np.arange(5)[None, :]
    keep = (j % 2 == 0) | (j <= i)  # a rule on the indices
    a = R.attention(q, k, v, scale=0.5, mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx % 2 == 0) | (kv_idx <= q_idx), enable_gqa=True)
    return "softmax over the keys the rule keeps", _abs(a, _softmax_rows(np.where(keep, 0.5 * q @ k[0].T, -np.inf), v[0])[0]), _VTOL


@check("F3")
def _f3():
    q, k, v, _ = _variant_case()
    u = np.random.default_rng(6).normal(size=(2, 4, 2))
    kw = dict(scale=0.5, score_mod=_f_mod, enable_gqa=True, is_causal=True)
    dq, dk, dv = R.attention_vjp(q, k, v, u, **kw)
    loss = lambda q_, k_: np.array(float((u * R.attention(q_, k_, v, **kw)).sum()))  # noqa: E731
    err = max(_abs(dq, _central_difference(lambda x: loss(x, k), q, FD_STEP)),
              _abs(dk, _central_difference(lambda x: loss(q, x), k, FD_STEP)))
    return "central difference in q and k (complex-step slope)", err, FD_TOL


def run_checks():
    """Run every check; return a list of rows (id, functions, against, error, tolerance, ok)."""
    from .equations import REGISTRY

    rows = []
    for eq_id, eq in REGISTRY.items():
        fn = CHECKS.get(eq_id)
        if fn is None:
            rows.append((eq_id, ", ".join(eq.functions), "(no check)", float("nan"), float("nan"), False))
            continue
        try:
            against, err, tol = fn()
            ok = bool(err <= tol)
        except Exception as exc:  # a crash is a failure, reported, not hidden
            against, err, tol, ok = f"raised {type(exc).__name__}: {exc}", float("nan"), float("nan"), False
        rows.append((eq_id, eq.functions[0], against, err, tol, ok))
    return rows
