"""Differential fuzzing: every path against the reference on random inputs (hypothesis).

The paths: the reference (:mod:`iem_ref`, the judge), the exact tier
(:mod:`iem_ref.exact`, small inputs), :mod:`iem_ref.accel.cpu` and
:mod:`iem_ref.accel.cuda` (the Numba CUDA simulator without a GPU: small
shapes).  The entry points that exist on more than one path: ``attention``
(with ``return_lse``), ``attention_vjp``, ``softmin_summary`` and the scalar
activations.

A case is drawn as structure (shapes with empty axes and broadcast batch
axes, M much larger than N, several key tiles and the CPU's key splits,
dtypes, memory layouts: Fortran order, negative and non-unit strides,
big-endian, read-only, zero-stride broadcast views; masks with fully masked
rows, causality with both alignments, scales from 0 to 40, both energies,
``empty``) and special values at random positions (NaN, +-inf, +-1e300 and
1e-310 in float64; in float32 NaN, +-inf, +-1e15 and 1e-40), the array
entries from a seeded generator.  Properties, on every path:

- the same result as the reference within the bound of :mod:`iem_ref.bounds`
  for that path (the agreement suite's bounds), the same NaN / inf pattern
  (:func:`tests.tolerances.assert_within`), the same dtype and shape;
- or the same error class, always ``TypeError`` or ``ValueError`` on bad input;
- the inputs unchanged afterwards (values, byte order, flags).

Finite magnitudes are kept where each path's arithmetic is defined alike: in
float32 the accelerated paths form scores in float32, the reference in
float64, so float32 specials stop at 1e15 (a product of two stays finite in
float32); the exact tier forms energies without overflow (``1e300`` squared
is finite there, ``+inf`` in every float path), so it is compared on cases
whose float64 energies are finite where the inputs are.

Budgets: the ``fuzz-ci`` profile (derandomized: the same examples on every
run, no database) runs a fixed number of examples per test (``BUDGET``: 562
in all, about 25 seconds on two cores); the ``slow`` twins (collected only
when ``-m`` selects ``slow``: see ``conftest.py``) run the
``fuzz-long`` profile (random, with hypothesis' example database, 10x the
examples).  Every
failure found becomes a named test in tests/test_regressions.py.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iem_ref
from iem_ref import bounds, exact
from tests.conftest import CUDA_SIMULATED, U64
from tests.tolerances import assert_within

settings.register_profile(
    "fuzz-ci", derandomize=True, deadline=None, max_examples=50, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz-long", derandomize=False, deadline=None, max_examples=500, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CI = settings.get_profile("fuzz-ci")
LONG = settings.get_profile("fuzz-long")

#: examples per test and path in CI (the simulator runs each CUDA thread in Python: fewer there)
BUDGET = {"attention": {"cpu": 150, "cuda": 40}, "vjp": {"cpu": 80, "cuda": 12}, "summary": {"cpu": 80, "cuda": 25},
          "scalar": {"cpu": 40, "cuda": 15}, "exact": 60, "bad": 60, "oracles": 120}
LONG_FACTOR = 10


def fuzz_tests(strategy, ci):
    """A CI test (``fuzz-ci``, ``ci`` examples) and its ``slow`` twin (``fuzz-long``, 10x) for one property."""
    def deco(check):
        fast = settings(CI, max_examples=ci)(given(strategy)(check))
        slow = pytest.mark.slow(settings(LONG, max_examples=LONG_FACTOR * ci)(given(strategy)(check)))
        return fast, slow
    return deco


def module(name):
    return importlib.import_module(f"iem_ref.accel.{name}")


SMALL = {"cpu": False, "cuda": CUDA_SIMULATED}
INF = math.inf
SPECIALS = {np.float64: [np.nan, INF, -INF, 1e300, -1e300, 1e-310], np.float32: [np.nan, INF, -INF, 1e15, -1e15, 1e-40]}
LAYOUTS = ["C", "C", "F", "reversed", "strided", "bigendian", "readonly", "zerostride"]


# --- building arrays -------------------------------------------------------------------------------
def laid_out(x, layout):
    """``x`` with the same values in another memory layout (``zerostride`` replaces rows by the first one)."""
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "reversed" and x.ndim >= 2:
        return np.ascontiguousarray(x[..., ::-1, :])[..., ::-1, :]
    if layout == "strided" and x.ndim >= 1:
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "bigendian":
        return x.astype(x.dtype.newbyteorder(">"))
    if layout == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    if layout == "zerostride" and x.ndim >= 2 and x.shape[-2] > 0:
        return np.broadcast_to(x[..., :1, :], x.shape)
    return x


def plant(rng, x, dtype, count):
    """``count`` special values of ``dtype``'s list at random positions of ``x`` (a fresh array)."""
    x = np.array(x)
    if x.size and count:
        flat = x.reshape(-1)
        for _ in range(count):
            flat[rng.integers(x.size)] = SPECIALS[dtype][rng.integers(len(SPECIALS[dtype]))]
    return x


def snapshot(arrays):
    return [(a.tobytes(), a.dtype.str, a.strides, a.flags.writeable) for a in arrays if isinstance(a, np.ndarray)]


@st.composite
def attention_cases(draw, tiny=False, specials=True):
    """A random attention call: ``dict(q, k, v, kw, dtype)``; ``tiny`` keeps shapes for the simulator or the exact tier."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    energy = draw(st.sampled_from(["dot", "sqeuclidean"]))
    size = "tiny" if tiny else draw(st.sampled_from(["tiny"] * 6 + ["tiles", "decode"]))
    if size == "tiny":
        N, M = draw(st.integers(0, 9)), draw(st.integers(0, 17))
        D, Dv = draw(st.integers(0, 5)), draw(st.integers(0, 4 if tiny else 17))
    elif size == "tiles":  # N >= 64: key tiles of 256 (float64) / 512 (float32), several of them
        N, M, D, Dv = draw(st.integers(64, 70)), draw(st.integers(257, 1100)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    else:  # few queries, many keys: tiles of 2048 keys, split over the cores and merged (M2)
        N, M, D, Dv = draw(st.integers(1, 3)), draw(st.integers(16385, 17000)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rank = draw(st.integers(0, 2)) if size == "tiny" else 0
    batch = tuple(draw(st.sampled_from([0, 1, 2, 3] if not tiny else [0, 1, 2])) for _ in range(rank))

    def own_batch():  # an operand's batch axes: each axis its size or 1, leading axes possibly absent
        axes = tuple(b if draw(st.booleans()) else 1 for b in batch)
        return axes[draw(st.integers(0, len(axes))):]

    spread = 0.5 if energy == "sqeuclidean" else 1.0
    q = (spread * rng.standard_normal(own_batch() + (N, D))).astype(dtype)
    k = (spread * rng.standard_normal(own_batch() + (M, D))).astype(dtype)
    v = rng.standard_normal(own_batch() + (M, Dv)).astype(dtype)
    nspecial = draw(st.sampled_from([0, 0, 0, 1, 2, 4])) if specials else 0
    q, k, v = (plant(rng, x, dtype, draw(st.integers(0, nspecial))) for x in (q, k, v))
    mixed = draw(st.sampled_from([None] * 5 + ["q", "k", "v"]))
    if mixed is not None and dtype == np.float32:  # one operand in float64: the call computes in float64
        q, k, v = (x.astype(np.float64) if name == mixed else x for x, name in ((q, "q"), (k, "k"), (v, "v")))
    q, k, v = (laid_out(x, draw(st.sampled_from(LAYOUTS))) for x in (q, k, v))
    kw = dict(energy=energy)
    scale = draw(st.sampled_from([None, None, 0.0, 1e-3, 0.3, 1.0, 4.0, 40.0]))
    if scale is not None:
        kw["scale"] = scale
    mask_kind = draw(st.sampled_from([None, None, "full", "keys", "rows"]))
    if mask_kind == "full":
        mask = rng.random(own_batch() + (N, M)) < 0.7
        if N:
            mask[..., rng.integers(N), :] = False  # a fully masked row
        kw["mask"] = laid_out(mask, draw(st.sampled_from(["C", "F", "reversed", "readonly"])))
    elif mask_kind == "keys":
        kw["mask"] = rng.random(M) < 0.5
    elif mask_kind == "rows":
        kw["mask"] = rng.random((N, 1)) < 0.5
    if draw(st.booleans()):
        kw["is_causal"] = True
        kw["causal_alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        kw["empty"] = "nan"
    return dict(q=q, k=k, v=v, kw=kw, dtype=np.dtype(dtype))


def outcome(fn):
    """``("ok", result)`` or ``("error", exception class)``."""
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return "error", type(exc)


def same_failure(got, ref, what):
    """Both calls raised the same class (``TypeError`` / ``ValueError``), or neither did."""
    assert got[0] == ref[0], f"{what}: {got[0]} {got[1]!r} where the reference gave {ref[0]} {ref[1]!r}"
    if ref[0] == "error":
        assert got[1] is ref[1], f"{what}: {got[1].__name__} where the reference raised {ref[1].__name__}"
        assert issubclass(ref[1], (TypeError, ValueError)), f"{what}: the reference raised {ref[1].__name__}"
    return ref[0] == "ok"


# --- attention (forward, return_lse) ------------------------------------------------------------------
def check_attention(path, case):
    q, k, v, kw, dtype = case["q"], case["k"], case["v"], case["kw"], case["dtype"]
    before = snapshot([q, k, v, kw.get("mask")])
    mod = module(path)
    with np.errstate(all="ignore"):
        ref = outcome(lambda: iem_ref.attention(q, k, v, return_lse=True, **kw))
        got = outcome(lambda: mod.attention(q, k, v, return_lse=True, **kw))
    assert snapshot([q, k, v, kw.get("mask")]) == before, f"{path} changed its inputs"
    if not same_failure(got, ref, path):
        return
    (a, L), (a_ref, L_ref) = got[1], ref[1]
    assert a.dtype == a_ref.dtype and L.dtype == L_ref.dtype and a.shape == a_ref.shape and L.shape == L_ref.shape
    bkw = {key: val for key, val in kw.items() if key != "empty"}
    with np.errstate(all="ignore"):
        _, _, fb = bounds.attention_bounds(module(path).arithmetic(), q, k, v, a_ref.dtype, **bkw)
    assert_within(a, a_ref, fb.a, f"{path} attention a")
    assert_within(L, L_ref, fb.L, f"{path} attention L")


@fuzz_tests(attention_cases(), BUDGET["attention"]["cpu"])
def _attention_cpu(case):
    check_attention("cpu", case)


test_fuzz_attention_cpu, test_fuzz_attention_cpu_long = _attention_cpu


@fuzz_tests(attention_cases(tiny=CUDA_SIMULATED), BUDGET["attention"]["cuda"])
def _attention_cuda(case):
    check_attention("cuda", case)


test_fuzz_attention_cuda, test_fuzz_attention_cuda_long = _attention_cuda


# --- the exact tier ---------------------------------------------------------------------------------------
def float64_energies_overflow(case):
    """Finite inputs whose float64 energies are not finite (the exact tier forms them without overflow)."""
    q, k = (np.asarray(x, np.float64) for x in (case["q"], case["k"]))
    with np.errstate(all="ignore"):
        qf, kf = np.where(np.isfinite(q), q, 0.0), np.where(np.isfinite(k), k, 0.0)
        if case["kw"]["energy"] == "dot":
            e = qf @ np.swapaxes(kf, -1, -2)
            big = np.abs(qf) @ np.swapaxes(np.abs(kf), -1, -2)
        else:
            e = big = 0.5 * ((qf[..., :, None, :] - kf[..., None, :, :]) ** 2).sum(-1)
    return not (np.isfinite(e).all() and np.isfinite(big).all())


@fuzz_tests(attention_cases(tiny=True), BUDGET["exact"])
def _attention_exact(case):
    q, k, v, kw = case["q"], case["k"], case["v"], case["kw"]
    if float64_energies_overflow(case):
        return
    before = snapshot([q, k, v, kw.get("mask")])
    with np.errstate(all="ignore"):
        ref = outcome(lambda: iem_ref.attention(q, k, v, return_lse=True, **kw))
        got = outcome(lambda: exact.attention(q, k, v, return_lse=True, **kw))
    assert snapshot([q, k, v, kw.get("mask")]) == before, "the exact tier changed its inputs"
    if not same_failure(got, ref, "exact"):
        return
    a_ref, L_ref = ref[1]
    a, L = (exact.to_float(x, a_ref.dtype) for x in got[1])
    # The exact tier has no error of its own (correctly rounded); the reference's is bounded by section 4
    # of iem_ref.bounds, which forward_bounds with the reference's own arithmetic counts (twice, as for
    # two float64 paths: an upper bound).
    bkw = {key: val for key, val in kw.items() if key != "empty"}
    with np.errstate(all="ignore"):
        _, _, fb = bounds.attention_bounds(bounds.REFERENCE, q, k, v, a_ref.dtype, **bkw)
    assert_within(a, a_ref, fb.a, "exact attention a")
    assert_within(L, L_ref, fb.L, "exact attention L")


test_fuzz_attention_exact, test_fuzz_attention_exact_long = _attention_exact


# --- the two oracles of iem_ref.testing ------------------------------------------------------------------
def verdict(fn):
    """``("pass", ratio)``, ``("fail", mismatch count)`` or ``("error", exception class)``."""
    try:
        return "pass", fn()
    except AssertionError as exc:
        line = next(t for t in str(exc).splitlines() if "mismatched elements" in t)
        return "fail", int(line.split(":")[1].split("/")[0])
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return "error", type(exc)


@fuzz_tests(attention_cases(), BUDGET["oracles"])
def _oracles(case):
    """A float32 kernel (the CPU path) judged by the tiled oracle and by the reference: the same verdict (pass, or
    the same number of mismatched elements, or the same error class), and where both pass, the worst ratios within
    ``1e-6 + 4 u64 zmax`` of each other: the two tolerances differ by the oracles' own errors, and so do their
    expected values, each a few ulps of float64 (``1e-8`` of a float32 tolerance at most); and each evaluates a
    key's ``t = L - z`` in float64 from its own ``L``, within ``2 u64 (|L| + |z|) <= 4 u64 zmax`` (``zmax`` a bound
    on the logits' magnitude) of the other's, where a weight's own error is at least ``2 p u_s`` with ``p >= 1``.
    Special values in the inputs reach both: the tiled oracle's non-finite handling against the reference's."""
    from iem_ref.accel import cpu
    from iem_ref.testing import assert_attention_close

    q, k, v, kw = case["q"], case["k"], case["v"], case["kw"]
    if case["dtype"] != np.float32 or kw["energy"] != "dot":  # the tiled oracle's kernels: below float64, dot products
        return
    before = snapshot([q, k, v, kw.get("mask")])
    with np.errstate(all="ignore"):
        out = outcome(lambda: cpu.attention(q, k, v, return_lse=True, **kw))
        if out[0] != "ok":
            return
        a, lse = out[1]
        check = dict(kw, precision="float32")
        ref = verdict(lambda: assert_attention_close(a, q, k, v, lse=lse, oracle="reference", **check))
        tiled = verdict(lambda: assert_attention_close(a, q, k, v, lse=lse, oracle="tiled", **check))
    assert snapshot([q, k, v, kw.get("mask")]) == before, "the oracles changed their inputs"
    assert tiled[0] == ref[0], f"tiled {tiled} where the reference gave {ref}"
    if ref[0] == "pass":
        qf, kf = (np.abs(np.where(np.isfinite(x), x, 0.0)).max(initial=0.0) for x in (q, k))
        scale = kw.get("scale", 1.0 / math.sqrt(max(q.shape[-1], 1)))
        zmax = scale * q.shape[-1] * float(qf) * float(kf)
        assert tiled[1] == pytest.approx(ref[1], rel=1e-6 + 4 * U64 * zmax, abs=1e-6), (tiled, ref)
    else:
        assert tiled[1] == ref[1], (tiled, ref)


test_fuzz_oracles_agree, test_fuzz_oracles_agree_long = _oracles


# --- attention_vjp ----------------------------------------------------------------------------------------
@st.composite
def vjp_cases(draw, tiny=False):
    case = draw(attention_cases(tiny=tiny))
    q, k, v = case["q"], case["k"], case["v"]
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        batch = ()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = rng.standard_normal(batch + (q.shape[-2], v.shape[-1])).astype(case["dtype"])
    g = plant(rng, g, case["dtype"].type, draw(st.sampled_from([0, 0, 0, 1, 2])))
    case["g"] = laid_out(g, draw(st.sampled_from(LAYOUTS)))
    case["kw"].pop("empty", None)
    case["saved"] = draw(st.booleans())
    return case


def check_vjp(path, case):
    """The backward, special values in ``q``, ``k``, ``v`` and ``grad_out`` included: the README's backward policy on every path."""
    q, k, v, g, kw = case["q"], case["k"], case["v"], case["g"], case["kw"]
    before = snapshot([q, k, v, g, kw.get("mask")])
    mod = module(path)
    with np.errstate(all="ignore"):
        ref = outcome(lambda: iem_ref.attention_vjp(q, k, v, g, **kw))
        saved = {}
        if case["saved"] and ref[0] == "ok":
            a, L = mod.attention(q, k, v, return_lse=True, **kw)
            saved = dict(out=a, lse=L)
        got = outcome(lambda: mod.attention_vjp(q, k, v, g, **saved, **kw))
    assert snapshot([q, k, v, g, kw.get("mask")]) == before, f"{path} changed its inputs"
    if not same_failure(got, ref, f"{path} vjp"):
        return
    with np.errstate(all="ignore"):
        _, bnds = bounds.attention_vjp_bounds(module(path).arithmetic(), q, k, v, g, ref[1][0].dtype, **kw)
    for name, x, y, bd in zip(("dq", "dk", "dv"), got[1], ref[1], bnds):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert_within(x, y, bd, f"{path} vjp {name}")


@fuzz_tests(vjp_cases(), BUDGET["vjp"]["cpu"])
def _vjp_cpu(case):
    check_vjp("cpu", case)


test_fuzz_vjp_cpu, test_fuzz_vjp_cpu_long = _vjp_cpu


@fuzz_tests(vjp_cases(tiny=CUDA_SIMULATED), BUDGET["vjp"]["cuda"])
def _vjp_cuda(case):
    check_vjp("cuda", case)


test_fuzz_vjp_cuda, test_fuzz_vjp_cuda_long = _vjp_cuda


# --- softmin_summary ----------------------------------------------------------------------------------------
@st.composite
def summary_cases(draw, tiny=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    N, M, Dv = draw(st.integers(0, 6)), draw(st.integers(0, 12 if tiny else 700)), draw(st.integers(0, 4))
    bd = draw(st.sampled_from([(), (2,), (1,), (0,)]))
    bv = draw(st.sampled_from([(), bd, (1,) * len(bd)]))
    d = (3.0 * rng.standard_normal(bd + (N, M))).astype(dtype)
    v = rng.standard_normal(bv + (M, Dv)).astype(dtype)
    nspecial = draw(st.sampled_from([0, 0, 1, 3]))
    d, v = (plant(rng, x, dtype, nspecial) for x in (d, v))
    d, v = (laid_out(x, draw(st.sampled_from(LAYOUTS))) for x in (d, v))
    tau = draw(st.sampled_from([1.0, 0.3, 25.0, INF, 1e-3]))
    kw = {}
    if draw(st.booleans()):
        kw["mask"] = rng.random((N, M)) < 0.7
    if draw(st.booleans()):
        kw["empty"] = "nan"
    return dict(d=d, v=v, tau=tau, kw=kw)


def check_summary(path, case):
    d, v, tau, kw = case["d"], case["v"], case["tau"], case["kw"]
    before = snapshot([d, v, kw.get("mask")])
    with np.errstate(all="ignore"):
        ref = outcome(lambda: iem_ref.softmin_summary(d, v, tau, **kw))
        got = outcome(lambda: module(path).softmin_summary(d, v, tau, **kw))
    assert snapshot([d, v, kw.get("mask")]) == before, f"{path} changed its inputs"
    if not same_failure(got, ref, f"{path} softmin_summary"):
        return
    (a, L), (a_ref, L_ref) = got[1], ref[1]
    assert a.dtype == a_ref.dtype and a.shape == a_ref.shape and L.shape == L_ref.shape
    with np.errstate(all="ignore"):
        x = -np.asarray(d, np.float64) / tau
        x = np.where(np.isnan(x), np.nan, x)
        # the score is -d * (1/tau): no dot product (S = 0, D = 0), as in the agreement suite
        fb = bounds.forward_bounds(module(path).arithmetic(), a_ref.dtype, x, np.zeros_like(x), 1 / tau, 0, v, a_ref, L_ref,
                                   take=kw.get("mask"))
    assert_within(a, a_ref, fb.a, f"{path} softmin_summary a")
    assert_within(L, L_ref, fb.L, f"{path} softmin_summary L")


@fuzz_tests(summary_cases(), BUDGET["summary"]["cpu"])
def _summary_cpu(case):
    check_summary("cpu", case)


test_fuzz_softmin_summary_cpu, test_fuzz_softmin_summary_cpu_long = _summary_cpu


@fuzz_tests(summary_cases(tiny=CUDA_SIMULATED), BUDGET["summary"]["cuda"])
def _summary_cuda(case):
    check_summary("cuda", case)


test_fuzz_softmin_summary_cuda, test_fuzz_softmin_summary_cuda_long = _summary_cuda


# --- scalar activations ---------------------------------------------------------------------------------
@st.composite
def scalar_cases(draw, tiny=False):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    shape = draw(st.sampled_from([(), (0,), (7,), (3, 4)] + ([] if tiny else [(300,)])))
    z = plant(rng, (3 * rng.standard_normal(shape)).astype(dtype), dtype, draw(st.integers(0, 3)))
    z2 = plant(rng, (3 * rng.standard_normal(shape)).astype(dtype), dtype, draw(st.integers(0, 3)))
    z, z2 = (laid_out(x, draw(st.sampled_from(LAYOUTS))) for x in (z, z2))
    which = draw(st.sampled_from(["sign", "tanh", "softplus"]))
    param = draw(st.sampled_from([1.0, 0.1, 7.0]))
    return dict(z=z, z2=z2, which=which, param=param)


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def scalar_bound(which, z, z2, param, ref, dtype):
    """The agreement suite's bounds for the scalar activations (tests/test_agreement.py derives each)."""
    u = bounds.unit_roundoff(dtype)
    r64 = _finite(np.asarray(ref, np.float64))
    if which == "sign":  # tanh((d_- - d_+)/2): the difference rounds once, tanh and r_+ - r_- 8 u64, the output u
        x = _finite(np.abs(np.asarray(z2, np.float64) - np.asarray(z, np.float64)))
        return (1 - r64**2) * U64 * x + 8 * U64 + u * np.abs(r64)
    if which == "tanh":  # linear energies -+ alpha z, alpha = m / sigma^2 (sigma = 1 here)
        x = 2 * np.abs(param * _finite(np.asarray(z, np.float64)))
        return (1 - r64**2) * U64 * x + 8 * U64 + u * np.abs(r64)
    y = np.abs(_finite(np.asarray(z, np.float64))) / param  # softplus: 11 u64 + u64 |z|/tau relative, the output u
    return (11 * U64 + U64 * y + u) * np.abs(r64)


def call_scalar(mod, case):
    z, z2, which, p = case["z"], case["z2"], case["which"], case["param"]
    if which == "sign":
        return mod.sign_posterior_mean(z, z2)
    if which == "tanh":
        return mod.tanh_from_signed_gaussian(z, p, 1.0)
    return mod.softplus(z, p)


def check_scalar(path, case):
    before = snapshot([case["z"], case["z2"]])
    with np.errstate(all="ignore"):
        ref = outcome(lambda: call_scalar(iem_ref, case))
        got = outcome(lambda: call_scalar(module(path), case))
    assert snapshot([case["z"], case["z2"]]) == before, f"{path} changed its inputs"
    if not same_failure(got, ref, f"{path} {case['which']}"):
        return
    x, y = np.asarray(got[1]), np.asarray(ref[1])
    assert x.dtype == y.dtype and x.shape == y.shape
    with np.errstate(all="ignore"):
        bound = scalar_bound(case["which"], case["z"], case["z2"], case["param"], y, y.dtype)
    assert_within(x, y, bound, f"{path} {case['which']}")


@fuzz_tests(scalar_cases(), BUDGET["scalar"]["cpu"])
def _scalar_cpu(case):
    check_scalar("cpu", case)


test_fuzz_scalar_activations_cpu, test_fuzz_scalar_activations_cpu_long = _scalar_cpu


@fuzz_tests(scalar_cases(tiny=CUDA_SIMULATED), BUDGET["scalar"]["cuda"])
def _scalar_cuda(case):
    check_scalar("cuda", case)


test_fuzz_scalar_activations_cuda, test_fuzz_scalar_activations_cuda_long = _scalar_cuda


# --- bad input: the same error class everywhere, never another exception --------------------------------
BAD = {
    "complex q": lambda c: dict(q=c["q"].astype(np.complex128)),
    "bool k": lambda c: dict(k=c["k"] > 0),
    "float16 v": lambda c: dict(v=c["v"].astype(np.float16)),
    "longdouble q": lambda c: dict(q=c["q"].astype(np.longdouble)),
    "object v": lambda c: dict(v=c["v"].astype(object)),
    "string k": lambda c: dict(k=np.full(c["k"].shape, "a")),
    "D mismatch": lambda c: dict(k=np.zeros(c["k"].shape[:-1] + (c["k"].shape[-1] + 1,))),
    "M mismatch": lambda c: dict(v=np.concatenate([c["v"], c["v"][..., :1, :]], axis=-2)),
    "1-D q": lambda c: dict(q=np.zeros(3)),
    "0-D v": lambda c: dict(v=np.float64(1.0)),
    "batch mismatch": lambda c: dict(q=np.zeros((2,) + c["q"].shape[-2:]), k=np.zeros((3,) + c["k"].shape[-2:])),
    "scale < 0": lambda c: dict(scale=-1.0),
    "scale inf": lambda c: dict(scale=INF),
    "scale nan": lambda c: dict(scale=np.nan),
    "scale string": lambda c: dict(scale="1"),
    "mask wrong shape": lambda c: dict(mask=np.ones((2, 3, 5, 7), bool)),
    "mask float": lambda c: dict(mask=np.ones(c["q"].shape[-2:-1] + c["k"].shape[-2:-1])),
    "is_causal not bool": lambda c: dict(is_causal="yes"),
    "bad alignment": lambda c: dict(is_causal=True, causal_alignment="middle"),
    "bad empty": lambda c: dict(empty="one"),
    "unknown energy": lambda c: dict(energy="nope"),
    "energy not a string": lambda c: dict(energy=3),
}


@st.composite
def bad_cases(draw):
    case = draw(attention_cases(tiny=True))
    name = draw(st.sampled_from(sorted(BAD)))
    change = BAD[name](case)
    args = dict(q=case["q"], k=case["k"], v=case["v"], **case["kw"])
    args.update(change)
    return name, args


def _vjp_call(mod, args):
    a = dict(args)
    a.pop("empty", None)
    q, k, v = a.pop("q"), a.pop("k"), a.pop("v")
    g = np.zeros(np.shape(q)[:-1] + np.shape(v)[-1:]) if np.ndim(q) >= 1 and np.ndim(v) >= 1 else np.zeros(2)
    return mod.attention_vjp(q, k, v, g, **a)


@settings(CI, max_examples=BUDGET["bad"])
@given(bad_cases())
def test_fuzz_bad_input_same_error_class(bad):
    name, args = bad
    mods = [module("cpu"), module("cuda")]
    fwd = lambda mod: mod.attention(**args)  # noqa: E731
    with np.errstate(all="ignore"):
        ref = outcome(lambda: fwd(iem_ref))
        if ref[0] == "error":
            assert issubclass(ref[1], (TypeError, ValueError)), f"{name}: the reference raised {ref[1].__name__}"
        for mod in mods + ([exact] if args.get("energy") in ("dot", "sqeuclidean") else []):
            same_failure(outcome(lambda: fwd(mod)), ref, f"{mod.__name__} {name}")
        ref = outcome(lambda: _vjp_call(iem_ref, args))
        for mod in mods:
            same_failure(outcome(lambda: _vjp_call(mod, args)), ref, f"{mod.__name__} vjp {name}")
