"""Bad input: the right error class and a message that names the argument (and shapes).

The rules (README, "API conventions"): complex, object, string, bool (except
as a mask) and longdouble inputs are ``TypeError``; shapes that do
not broadcast, masks of the wrong shape, ``tau <= 0`` or NaN, negative /
infinite / NaN ``scale``, out-of-range ``axis`` and unknown option names are
``ValueError``.  Every case is checked with ``pytest.raises(..., match=...)``
so that a message that stops naming the argument fails.
"""

import numpy as np
import pytest

import iem_ref as R

rng = np.random.default_rng(0)
q, k, v = rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), rng.normal(size=(7, 3))
d = rng.normal(size=(5, 7))
z = rng.normal(size=6)

BAD_DTYPES = {
    "complex": d.astype(complex),
    "object": d.astype(object),
    "str": d.astype(str),
    "bool": d > 0,
}
if np.dtype(np.longdouble) != np.dtype(np.float64):
    BAD_DTYPES["longdouble"] = d.astype(np.longdouble)

# Functions of energies d (name of the energy argument is "d").
D_FUNCS = {
    "likelihoods": R.likelihoods,
    "log_partition": R.log_partition,
    "free_energy": R.free_energy,
    "responsibilities": R.responsibilities,
    "canonical_energies": R.canonical_energies,
    "hard_responsibilities": R.hard_responsibilities,
    "neg_log_softmin": R.neg_log_softmin,
    "log_partition_gradient": R.log_partition_gradient,
    "responsibilities_jacobian": R.responsibilities_jacobian,
    "neg_log_softmin_jacobian": R.neg_log_softmin_jacobian,
}
TAU_FUNCS = {n: f for n, f in D_FUNCS.items() if n != "hard_responsibilities"}
AXIS_FUNCS = ["log_partition", "free_energy", "responsibilities", "canonical_energies", "hard_responsibilities", "neg_log_softmin", "log_partition_gradient"]
MASK_FUNCS = [n for n in D_FUNCS if n != "likelihoods"]


@pytest.mark.parametrize("dtype", sorted(BAD_DTYPES))
@pytest.mark.parametrize("name", sorted(D_FUNCS))
def test_energy_functions_refuse_bad_dtypes(name, dtype):
    with pytest.raises(TypeError, match=r"\bd\b.*" + ("bool" if dtype == "bool" else "")):
        D_FUNCS[name](BAD_DTYPES[dtype])


@pytest.mark.parametrize("tau", [0.0, -1.0, np.nan, -np.inf, np.float32(0.0)])
@pytest.mark.parametrize("name", sorted(TAU_FUNCS))
def test_tau_must_be_positive(name, tau):
    with pytest.raises(ValueError, match="tau"):
        TAU_FUNCS[name](d, tau)


@pytest.mark.parametrize("tau", ["1", [1.0, 2.0], None, True, 1 + 0j])
def test_tau_must_be_a_real_scalar(tau):
    with pytest.raises(TypeError, match="tau"):
        R.responsibilities(d, tau)


@pytest.mark.parametrize("name", AXIS_FUNCS)
def test_axis_out_of_range(name):
    fn = D_FUNCS[name]
    for axis in (2, -3):
        with pytest.raises(ValueError, match=f"axis={axis}.*2 dimension"):
            fn(d, axis=axis) if name == "hard_responsibilities" else fn(d, 1.0, axis)
    with pytest.raises(TypeError, match="axis"):
        fn(d, axis=1.0)


@pytest.mark.parametrize("name", MASK_FUNCS)
def test_masks_of_the_wrong_shape_or_dtype(name):
    fn = D_FUNCS[name]
    with pytest.raises(ValueError, match=r"mask of shape \(3,\).*\(5, 7\)"):
        fn(d, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5, 7\)"):
        fn(d, mask=np.ones((2, 5, 7), bool))  # a mask broadcasts to d, not d to the mask
    for bad in (np.ones((5, 7), int), np.ones((5, 7)), np.ones((5, 7), object)):
        with pytest.raises(TypeError, match=f"mask.*{bad.dtype}"):
            fn(d, mask=bad)


def test_scalar_energies_and_options():
    with pytest.raises(ValueError, match=r"\bd\b.*at least one dimension"):
        R.responsibilities(1.0)
    with pytest.raises(ValueError, match="empty.*'zero'"):
        R.responsibilities(d, empty="zeros")
    with pytest.raises(ValueError, match="ties.*'first'"):
        R.hard_responsibilities(d, ties="last")
    with pytest.raises(ValueError, match="empty"):
        R.hard_responsibilities(d, empty=None)


def test_integers_are_promoted_not_refused():
    assert R.responsibilities(np.arange(4)).dtype == np.float64
    assert R.responsibilities([1, 2, 3], tau=2).dtype == np.float64
    assert R.attention(np.ones((2, 3), int), np.ones((4, 3), np.int8), np.ones((4, 1), np.uint16)).dtype == np.float64


# ---------------------------------------------------------------- attention


ATTN = {"attention": R.attention, "hard_attention": R.hard_attention, "attention_vjp": None}


def _call(name, q_, k_, v_, **kw):
    if name == "attention":
        return R.attention(q_, k_, v_, **kw)
    if name == "hard_attention":
        kw.pop("scale", None)
        return R.hard_attention(q_, k_, v_, **kw)
    return R.attention_vjp(q_, k_, v_, np.ones(q_.shape[:-1] + (v_.shape[-1],)) if hasattr(q_, "shape") and q_.ndim >= 2 else np.ones((5, 3)), **kw)


@pytest.mark.parametrize("name", sorted(ATTN))
def test_attention_shape_mismatches_name_arguments_and_shapes(name):
    with pytest.raises(ValueError, match=r"q .*k .*D.*\(5, 4\).*\(7, 5\)"):
        _call(name, q, rng.normal(size=(7, 5)), v)
    with pytest.raises(ValueError, match=r"k .*v .*M.*\(7, 4\).*\(6, 3\)"):
        _call(name, q, k, rng.normal(size=(6, 3)))
    with pytest.raises(ValueError, match=r"batch.*q \(2, 5, 4\).*k \(3, 7, 4\)"):
        _call(name, np.stack([q, q]), np.stack([k, k, k]), v)
    with pytest.raises(ValueError, match=r"\bq\b.*at least 2.*\(4,\)"):
        _call(name, q[0], k, v)
    with pytest.raises(ValueError, match=r"\bk\b.*at least 2"):
        _call(name, q, k[0], v)


@pytest.mark.parametrize("dtype", sorted(BAD_DTYPES))
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_attention_bad_dtypes(arg, dtype):
    args = {"q": q, "k": k, "v": v}
    args[arg] = args[arg].astype(BAD_DTYPES[dtype].dtype)
    for name in sorted(ATTN):
        with pytest.raises(TypeError, match=rf"\b{arg}\b"):
            _call(name, args["q"], args["k"], args["v"])


@pytest.mark.parametrize("scale", [-1.0, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", ["attention", "attention_vjp"])
def test_attention_scale_must_be_finite_and_non_negative(name, scale):
    with pytest.raises(ValueError, match="scale"):
        _call(name, q, k, v, scale=scale)


def test_attention_scale_type_and_zero_dimension():
    with pytest.raises(TypeError, match="scale"):
        R.attention(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match="scale.*D = 0"):
        R.attention(np.zeros((2, 0)), np.zeros((3, 0)), v[:3])


@pytest.mark.parametrize("name", sorted(ATTN))
def test_attention_masks_and_options(name):
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\).*\(5, 7\)"):
        _call(name, q, k, v, mask=np.ones((5, 6), bool))
    with pytest.raises(TypeError, match="mask.*int"):
        _call(name, q, k, v, mask=np.ones((5, 7), int))
    with pytest.raises(ValueError, match="energy"):
        _call(name, q, k, v, energy="euclid")
    with pytest.raises(ValueError, match="causal_alignment"):
        _call(name, q, k, v, is_causal=True, causal_alignment="bottom_left")
    with pytest.raises(TypeError, match="is_causal"):
        _call(name, q, k, v, is_causal=1)
    if name != "attention_vjp":  # the backward pass takes named energies only
        with pytest.raises(ValueError, match=r"energy returned shape \(7, 5\)"):
            _call(name, q, k, v, energy=lambda a, b: np.zeros((7, 5)))


def test_attention_option_names():
    with pytest.raises(ValueError, match="empty"):
        R.attention(q, k, v, empty="none")
    with pytest.raises(ValueError, match="ties"):
        R.hard_attention(q, k, v, ties="random")
    with pytest.raises(ValueError, match="empty"):
        R.attention_responsibilities(q, k, empty=0)
    with pytest.raises(ValueError, match="causal_alignment"):
        R.causal_mask(2, 3, "center")
    # The backward pass supports dot and sqeuclidean energies only.
    with pytest.raises(ValueError, match="energy.*'dot'"):
        R.attention_vjp(q, k, v, np.ones((5, 3)), energy="laplace")
    with pytest.raises(ValueError, match=r"grad_out.*\(2, 3\)"):
        R.attention_vjp(q, k, v, np.ones((2, 3)))
    with pytest.raises(TypeError, match="grad_out"):
        R.attention_vjp(q, k, v, np.ones((5, 3), complex))


# ---------------------------------------------------------------- energies, summaries, activations, mixtures, streaming


KERNELS = dict(R.ENERGIES, mahalanobis=lambda a, b: R.mahalanobis_energy(a, b, np.eye(4)))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_inputs(name):
    fn = KERNELS[name]
    first, second = ("q", "k") if name == "dot" else ("x", "mu")
    with pytest.raises(ValueError, match=rf"{first} and {second}.*D.*\(5, 4\).*\(7, 3\)"):
        fn(q, k[:, :3])
    with pytest.raises(ValueError, match=rf"\b{second}\b.*at least 2"):
        fn(q, k[0])
    with pytest.raises(ValueError, match=rf"batch.*{first} \(2, 5, 4\).*{second} \(3, 7, 4\)"):
        fn(np.stack([q, q]), np.stack([k, k, k]))
    for dtype in ("complex", "str", "bool"):
        with pytest.raises(TypeError, match=rf"\b{first}\b"):
            fn(q.astype(BAD_DTYPES[dtype].dtype), k)
        with pytest.raises(TypeError, match=rf"\b{second}\b"):
            fn(q, k.astype(BAD_DTYPES[dtype].dtype))


def test_mahalanobis_covariance():
    with pytest.raises(ValueError, match=r"cov.*\(7, 4, 4\).*\(3, 3\)"):
        R.mahalanobis_energy(q, k, np.eye(3))
    # -I in even dimension has determinant +1: the check must look at eigenvalues
    # (regression: the sign of the determinant alone let it through).
    for cov in (-np.eye(4), np.diag([1.0, 1.0, 1.0, -1.0])):
        with pytest.raises(ValueError, match="cov.*positive definite"):
            R.mahalanobis_energy(q, k, cov, log_det=True)
    with pytest.raises(TypeError, match="cov"):
        R.mahalanobis_energy(q, k, np.eye(4, dtype=complex))


def test_scalar_kernels():
    with pytest.raises(TypeError, match=r"\bz\b"):
        R.logistic_energy(z.astype(complex))
    with pytest.raises(TypeError, match=r"\bmu\b"):
        R.logistic_energy(z, np.array(["a"]))
    for fn in (R.signed_gaussian_energies, R.signed_linear_energies):
        with pytest.raises(TypeError, match=r"\bz\b"):
            fn(z > 0)


def test_summaries():
    r = R.responsibilities(d)
    with pytest.raises(ValueError, match=r"\bg\b.*K = 7.*\(6,\)"):
        R.posterior_mean(r, np.ones(6))
    with pytest.raises(ValueError, match=r"\bg\b.*K = 7.*\(6, 3\)"):
        R.posterior_mean(r, np.ones((6, 3)))
    with pytest.raises(TypeError, match=r"\br\b"):
        R.posterior_mean(r.astype(complex), np.ones(7))
    with pytest.raises(TypeError, match=r"\bg\b"):
        R.posterior_variance(r, np.ones(7, dtype=object))
    with pytest.raises(ValueError, match=r"mask of shape \(6,\)"):
        R.posterior_mean(r, np.ones(7), mask=np.ones(6, bool))
    with pytest.raises(ValueError, match=r"\bg\b"):
        R.posterior_mode(d, np.ones(3))
    with pytest.raises(ValueError, match="ties"):
        R.posterior_mode(d, np.ones(7), ties="middle")
    with pytest.raises(ValueError, match="axis"):
        R.posterior_entropy(r, axis=2)
    with pytest.raises(TypeError, match=r"\br\b"):
        R.posterior_entropy(r.astype(np.complex128))
    with pytest.raises(ValueError, match=r"d .*v .*M.*\(5, 7\).*\(6, 3\)"):
        R.softmin_summary(d, np.ones((6, 3)))
    with pytest.raises(ValueError, match="tau"):
        R.softmin_summary(d, v, 0.0)
    with pytest.raises(ValueError, match="empty"):
        R.softmin_summary(d, v, empty="inf")


def test_activations():
    with pytest.raises(ValueError, match=r"d_plus \(3,\) and d_minus \(4,\)"):
        R.sign_responsibilities(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="d_minus"):
        R.sign_posterior_mean(z, z.astype(complex))
    for fn in (R.softplus, R.softplus_derivative):
        with pytest.raises(ValueError, match="tau"):
            fn(z, 0.0)
        with pytest.raises(ValueError, match="tau"):
            fn(z, np.nan)
        with pytest.raises(TypeError, match=r"\bz\b"):
            fn(z.astype(str))
    for fn in (R.relu, R.tanh_from_signed_gaussian, R.tanh_as_attention):
        with pytest.raises(TypeError, match=r"\bz\b"):
            fn(z.astype(complex))
    with pytest.raises(ValueError, match="alpha"):
        R.tanh_as_attention(z, alpha=-1.0)
    for sigma in (0.0, -1.0, np.nan, np.inf):  # regression: sigma = 0 raised ZeroDivisionError
        with pytest.raises(ValueError, match="sigma"):
            R.tanh_from_signed_gaussian(z, sigma=sigma)
    with pytest.raises(ValueError, match=r"centres.*\(3,\).*values.*\(2,\)"):
        R.prototype_activation(z, np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="tau"):
        R.prototype_activation(z, np.zeros(2), np.zeros(2), tau=-1.0)
    with pytest.raises(TypeError, match="centres"):
        R.prototype_activation(z, np.zeros(2, complex), np.zeros(2))


def test_mixtures():
    means, covs = k[:3], np.broadcast_to(np.eye(4), (3, 4, 4))
    for w in ([0.5, 0.5, 0.5], [1.5, -0.25, -0.25], [[0.5, 0.5, 0.0]]):
        with pytest.raises(ValueError, match="weights"):
            R.mixture_responsibilities(q, means, covs, w)
    with pytest.raises(TypeError, match="weights"):
        R.mixture_energies(q, means, covs, np.array([0.5, 0.5, 0.0], complex))
    # float32 weights that sum to 1 in float32 are accepted (regression: a
    # float64-only 1e-12 tolerance refused them).
    w32 = np.random.default_rng(3).dirichlet(np.ones(3)).astype(np.float32)
    assert R.mixture_responsibilities(q.astype(np.float32), means.astype(np.float32), covs.astype(np.float32), w32).dtype == np.float32


def test_streaming():
    with pytest.raises(ValueError, match=r"d .*v .*Mb.*\(5, 7\).*\(6, 3\)"):
        R.partial_posterior(d, np.ones((6, 3)))
    with pytest.raises(ValueError, match=r"\bd\b.*at least 2"):
        R.partial_posterior(d[0], v)
    with pytest.raises(ValueError, match="tau"):
        R.partial_posterior(d, v, tau=0.0)
    with pytest.raises(TypeError, match=r"\bv\b"):
        R.partial_posterior(d, v.astype(complex))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\)"):
        R.partial_posterior(d, v, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="empty"):
        R.finalize_partial(R.partial_posterior(d, v), empty="null")


@pytest.mark.parametrize(
    "fn, kwarg",
    [
        (R.sqeuclidean_energy, "sigma"),
        (R.laplace_energy, "b"),
        (R.student_t_energy, "nu"),
        (R.student_t_energy, "sigma"),
        (R.huber_energy, "delta"),
        (R.pseudo_huber_energy, "delta"),
        (R.scaled_dot_energy, "scale"),
    ],
)
@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_kernel_parameters_must_be_finite_and_positive(fn, kwarg, bad):
    x, mu = np.zeros((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match=kwarg):
        fn(x, mu, **{kwarg: bad})


def test_mahalanobis_rejects_a_non_positive_definite_covariance_without_log_det():
    with pytest.raises(ValueError, match="positive definite"):
        R.mahalanobis_energy(np.zeros((1, 2)), np.ones((1, 2)), -np.eye(2))
