"""Energies: how compatible a hypothesis is with an input (lower is better).

Equations A1 (attention's dot-product energy), K1-K8 (kernels) and the signed
energies of S1/S4.

Shape legend for the vector kernels: ``x (..., N, D)`` inputs (queries),
``mu (..., M, D)`` hypothesis centres (keys); the result ``d (..., N, M)``
has hypotheses on the last axis, and leading axes broadcast.  A 1-D ``x``
of shape ``(D,)`` is one input and gives ``(..., M)``.  The scalar kernels
(K8, S4) take ``z (...)`` and give ``(..., K)``.

Every kernel computes in float64 from the inputs' exact values and returns
the common float dtype of its inputs (float32 only if all are float32).
Distances are formed from differences ``x - mu`` (not from the expansion
``|x|^2 - 2<x, mu> + |mu|^2``, which cancels): this costs ``O(N M D)``
memory, which is the price of an oracle.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from ._validation import as_float_array, broadcast_batch, check_positive, need_ndim, result_dtype, to_dtype

__all__ = [
    "dot_energy",
    "scaled_dot_energy",
    "sqeuclidean_energy",
    "mahalanobis_energy",
    "laplace_energy",
    "cosine_energy",
    "student_t_energy",
    "huber_energy",
    "pseudo_huber_energy",
    "logistic_energy",
    "SIGNS",
    "signed_gaussian_energies",
    "signed_linear_energies",
    "ENERGIES",
    "ScoreTerms",
    "Energy",
    "ENERGY_RECORDS",
    "energy_of",
]

#: S1: the two hypotheses of a scalar unit, in the order used on the last axis.
SIGNS = np.array([+1.0, -1.0])


def _pair(x, mu, names=("x", "mu")):
    """Validate ``x (..., N, D)`` / ``mu (..., M, D)``; return float64 views and the output dtype."""
    x = as_float_array(x, names[0])
    mu = as_float_array(mu, names[1])
    dtype = result_dtype(x, mu)
    need_ndim(mu, names[1], 2, "(..., M, D)")
    single = x.ndim == 1
    if single:
        x = x[None, :]
    if x.shape[-1] != mu.shape[-1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must share the feature dimension D: "
            f"{names[0]} has shape {x.shape}, {names[1]} has shape {mu.shape}"
        )
    _, (x, mu) = broadcast_batch([(names[0], x), (names[1], mu)], [2, 2])
    return x.astype(np.float64), mu.astype(np.float64), dtype, single


def _done(d, dtype, single):
    d = to_dtype(d, dtype)
    return d[..., 0, :] if single else d


def _differences(x, mu):
    """``x_n - mu_m`` for every pair: (..., N, M, D)."""
    return x[..., :, None, :] - mu[..., None, :, :]


def dot_energy(x, mu):
    """A1 / K1: ``d_j(x) = -<x, mu_j>``.

    Examples
    --------
    >>> dot_energy([[1.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])
    array([[-1., -2.]])
    """
    x, mu, dtype, single = _pair(x, mu, ("q", "k"))
    d = -(x @ np.swapaxes(mu, -1, -2))
    return _done(d, dtype, single)


def scaled_dot_energy(x, mu, scale=None):
    """A1 (scaled variant) / T1: ``d_j(x) = -<x, mu_j> * scale``, default ``scale = 1/sqrt(D)``.

    ``softmin(scaled_dot_energy(q, k))`` is scaled dot-product attention (T1).

    Examples
    --------
    >>> scaled_dot_energy([[2.0, 2.0, 2.0, 2.0]], [[1.0, 0.0, 0.0, 0.0]])
    array([[-1.]])
    """
    x, mu, dtype, single = _pair(x, mu, ("q", "k"))
    scale = 1.0 / np.sqrt(x.shape[-1]) if scale is None else check_positive(scale, "scale")
    d = -(x @ np.swapaxes(mu, -1, -2)) * scale
    return _done(d, dtype, single)


def sqeuclidean_energy(x, mu, sigma=1.0):
    """K2: Gaussian kernel energy ``d_j(x) = ||x - mu_j||^2 / (2 sigma^2)``.

    Examples
    --------
    >>> sqeuclidean_energy([[0.0, 0.0]], [[3.0, 4.0]])
    array([[12.5]])
    """
    x, mu, dtype, single = _pair(x, mu)
    sigma = check_positive(sigma, "sigma")
    diff = _differences(x, mu)
    d = (diff**2).sum(axis=-1) / (2.0 * sigma**2)
    return _done(d, dtype, single)


def mahalanobis_energy(x, mu, cov, *, half=False, log_det=False):
    """K3: ``d_j(x) = (x - mu_j)^T Sigma_j^{-1} (x - mu_j)``.

    With ``half=True`` the quadratic form is halved, and ``log_det=True`` adds
    ``1/2 log det Sigma_j``: together they give the energy of a Gaussian
    mixture component up to a shared constant (G5).

    Parameters
    ----------
    x : (..., N, D)
    mu : (M, D)
    cov : (M, D, D) or (D, D)
        Symmetric positive-definite covariances (per component or shared).

    Examples
    --------
    >>> mahalanobis_energy([[2.0, 0.0]], [[0.0, 0.0]], [[4.0, 0.0], [0.0, 1.0]])
    array([[1.]])
    """
    x, mu, dtype, single = _pair(x, mu)
    cov = as_float_array(cov, "cov").astype(np.float64)
    M, D = mu.shape[-2:]
    if cov.shape == (D, D):
        cov = np.broadcast_to(cov, (M, D, D))
    if cov.shape != (M, D, D):
        raise ValueError(f"cov must have shape (M, D, D) = {(M, D, D)} or (D, D); got {cov.shape}")
    if M and D and np.any(np.linalg.eigvalsh(cov)[..., 0] <= 0):
        raise ValueError("cov must be positive definite (an eigenvalue is <= 0)")
    diff = _differences(x, mu)  # (..., N, M, D)
    solved = np.linalg.solve(cov, diff[..., None])[..., 0]  # Sigma^{-1} (x - mu)
    d = (diff * solved).sum(axis=-1)
    if half:
        d = d / 2.0
    if log_det:
        _, logdet = np.linalg.slogdet(cov)
        d = d + logdet / 2.0
    return _done(d, dtype, single)


def laplace_energy(x, mu, b=1.0):
    """K4: Laplace kernel energy ``d_j(x) = ||x - mu_j||_1 / b``.

    Examples
    --------
    >>> laplace_energy([[0.0, 0.0]], [[3.0, -4.0]])
    array([[7.]])
    """
    x, mu, dtype, single = _pair(x, mu)
    b = check_positive(b, "b")
    d = np.abs(_differences(x, mu)).sum(axis=-1) / b
    return _done(d, dtype, single)


def cosine_energy(x, mu):
    """K5: angular energy ``d_j(x) = 1 - <x, mu_j> / (||x|| ||mu_j||)``, in [0, 2].

    A zero vector has no direction: its energies are NaN (and, by the NaN
    policy, so is every row it takes part in).

    Examples
    --------
    >>> cosine_energy([[1.0, 0.0]], [[0.0, 2.0], [-3.0, 0.0]])
    array([[1., 2.]])
    """
    x, mu, dtype, single = _pair(x, mu)
    norms = np.linalg.norm(x, axis=-1)[..., :, None] * np.linalg.norm(mu, axis=-1)[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 - (x @ np.swapaxes(mu, -1, -2)) / np.where(norms == 0, np.nan, norms)
    return _done(d, dtype, single)


def student_t_energy(x, mu, nu=1.0, sigma=1.0, *, exact_scale=False):
    """K6: Student-t energy ``d_j(x) = log(1 + ||x - mu_j||^2 / (nu sigma^2))``.

    With ``exact_scale=True`` the energy is multiplied by ``(nu + D)/2``, the
    negative log-density of a multivariate t up to a constant.

    Examples
    --------
    >>> student_t_energy([[0.0]], [[1.0]])  # log 2
    array([[0.69314718]])
    """
    x, mu, dtype, single = _pair(x, mu)
    nu, sigma = check_positive(nu, "nu"), check_positive(sigma, "sigma")
    sq = (_differences(x, mu) ** 2).sum(axis=-1)
    d = np.log1p(sq / (nu * sigma**2))
    if exact_scale:
        d = d * (nu + x.shape[-1]) / 2.0
    return _done(d, dtype, single)


def huber_energy(x, mu, delta=1.0):
    """K7: Huber energy of the distance ``r = ||x - mu_j||``.

    ``0.5 r^2`` for ``r <= delta``, else ``delta (r - delta/2)``: quadratic near
    the centre, linear (robust) far away.

    Examples
    --------
    >>> huber_energy([[0.0], [3.0]], [[0.0], [0.5]])[:, 1]
    array([0.125, 2.   ])
    """
    x, mu, dtype, single = _pair(x, mu)
    delta = check_positive(delta, "delta")
    r = np.sqrt((_differences(x, mu) ** 2).sum(axis=-1))
    d = np.where(r <= delta, 0.5 * r**2, delta * (r - delta / 2.0))
    return _done(d, dtype, single)


def pseudo_huber_energy(x, mu, delta=1.0):
    """K7: pseudo-Huber energy ``delta^2 (sqrt(1 + (r/delta)^2) - 1)``, ``r = ||x - mu_j||``.

    Examples
    --------
    >>> pseudo_huber_energy([[0.0]], [[0.0], [1.0]])
    array([[0.        , 0.41421356]])
    """
    x, mu, dtype, single = _pair(x, mu)
    delta = check_positive(delta, "delta")
    r2 = (_differences(x, mu) ** 2).sum(axis=-1)
    # sqrt(1 + t) - 1 = t / (sqrt(1 + t) + 1): no cancellation for small r.
    t = r2 / delta**2
    d = delta**2 * t / (np.sqrt(1.0 + t) + 1.0)
    return _done(d, dtype, single)


def logistic_energy(z, mu=0.0, alpha=1.0):
    """K8: logistic / softplus energy ``d(z) = log(1 + exp(-alpha (z - mu)))``.

    A scalar kernel: ``z (...)`` against centres ``mu (K,)`` (or a scalar)
    gives ``(..., K)`` (or ``z``'s shape).  Evaluated as
    ``logaddexp(0, -alpha (z - mu))`` so it never overflows.

    Examples
    --------
    >>> float(logistic_energy(0.0))  # log 2
    0.6931471805599453
    """
    z = as_float_array(z, "z")
    mu_arr = as_float_array(mu, "mu")
    dtype = result_dtype(z, mu_arr)
    z64 = z.astype(np.float64)
    if mu_arr.ndim:
        z64 = z64[..., None]
    d = np.logaddexp(0.0, -alpha * (z64 - mu_arr.astype(np.float64)))
    return to_dtype(d, dtype)[()]


def signed_gaussian_energies(z, m=1.0, sigma=1.0):
    """S1 / S4: energies of the signs ``s in {+1, -1}``: ``d_s(z) = (z - s m)^2 / (2 sigma^2)``.

    Returns ``(..., 2)``: ``[d_+, d_-]`` (the order of :data:`SIGNS`).
    Their difference is linear, ``d_+ - d_- = -2 m z / sigma^2``: the quadratic
    parts are shared and cancel in the softmin (T3).

    Examples
    --------
    >>> signed_gaussian_energies(1.0)
    array([0., 2.])
    """
    z = as_float_array(z, "z")
    z64 = z.astype(np.float64)[..., None]
    d = (z64 - SIGNS * m) ** 2 / (2.0 * sigma**2)
    return d.astype(z.dtype, copy=False)


def signed_linear_energies(z, alpha=1.0):
    """S4 (linear form): ``d_+(z) = -alpha z``, ``d_-(z) = +alpha z``.

    The signed Gaussian energies minus their shared quadratic part, with
    ``alpha = m / sigma^2``: the same responsibilities (T3).

    Examples
    --------
    >>> signed_linear_energies(2.0, alpha=0.5)
    array([-1.,  1.])
    """
    z = as_float_array(z, "z")
    d = -alpha * z.astype(np.float64)[..., None] * SIGNS
    return d.astype(z.dtype, copy=False)


class ScoreTerms(NamedTuple):
    """How a kernel forms an energy's score from ``D`` per-feature terms ``y_c`` (:mod:`iem_ref.bounds`, sections 5 and 13).

    ``sizes(q, k)``: ``S = sum_c |y_c|``; ``squares(q, k)``: ``sum_c y_c^2``
    (both ``(..., N, M)`` from finite float64 ``q (..., N, D)``, ``k (..., M, D)``);
    ``roundings``: the roundings each term carries before the sum, as
    multiples of ``y_c^2`` at the sum's level 0.
    """

    sizes: Callable
    squares: Callable
    roundings: float


class Energy(NamedTuple):
    """One energy and its view on every tier, in one record (as :class:`~iem_ref.precision.Precision` is for rounding).

    ``reference``: the NumPy form ``(x, mu) -> d``; ``exact``: the exact
    tier forms it; ``kernel``: its code in the accelerated kernels
    (:mod:`iem_ref.accel`), None where they do not compute it; ``gradient``:
    :func:`iem_ref.attention_vjp` differentiates it; ``score``: its score's
    terms for the derived tolerances, None where no bound is derived.  A
    tier that lacks a view says so by name (:meth:`require`).
    """

    name: str
    reference: Callable
    exact: bool = False
    kernel: Optional[int] = None
    gradient: bool = False
    score: Optional[ScoreTerms] = None

    def require(self, view, tier):
        """This record if it has ``view`` (a field name); else a ``ValueError`` naming ``tier`` and the energies it supports."""
        if not self.has(view):
            names = sorted(name for name, rec in ENERGY_RECORDS.items() if rec.has(view))
            raise ValueError(f"{tier} supports energy in {names}; got {self.label}")
        return self

    @property
    def label(self):
        """The name as a message gives it: quoted for a named energy."""
        return repr(self.name) if self.name in ENERGY_RECORDS else self.name

    def has(self, view):
        """Whether the record has ``view`` (a field set to something other than None or False; a kernel code may be 0)."""
        value = getattr(self, view)
        return value is not None and value is not False


def _differences64(q, k):
    return q[..., :, None, :] - k[..., None, :, :]


#: The vector kernels selectable by name (``energy=``), each with its views.  Score terms: dot ``y_c = q_c k_c``
#: (the product's rounding is the sum's level 0); squared Euclidean ``y_c = (q_c - k_c)^2 / 2`` (the difference,
#: doubled by the square, and the square: 4 more); Laplace (``b = 1``, as attention calls it) ``y_c = |q_c - k_c|``
#: (the difference: 1 more).
ENERGY_RECORDS = {
    "dot": Energy("dot", dot_energy, exact=True, kernel=0, gradient=True,
                  score=ScoreTerms(lambda q, k: np.abs(q) @ np.swapaxes(np.abs(k), -1, -2),
                                   lambda q, k: q**2 @ np.swapaxes(k**2, -1, -2), 0.0)),
    "sqeuclidean": Energy("sqeuclidean", sqeuclidean_energy, exact=True, kernel=1, gradient=True,
                          score=ScoreTerms(lambda q, k: 0.5 * (_differences64(q, k) ** 2).sum(-1),
                                           lambda q, k: 0.25 * (_differences64(q, k) ** 4).sum(-1), 4.0)),
    "laplace": Energy("laplace", laplace_energy,
                      score=ScoreTerms(lambda q, k: np.abs(_differences64(q, k)).sum(-1),
                                       lambda q, k: (_differences64(q, k) ** 2).sum(-1), 1.0)),
    "cosine": Energy("cosine", cosine_energy),
    "student_t": Energy("student_t", student_t_energy),
    "huber": Energy("huber", huber_energy),
    "pseudo_huber": Energy("pseudo_huber", pseudo_huber_energy),
}

#: Vector kernels selectable by name in :func:`iem_ref.attention` (``energy=``): their NumPy forms.
ENERGIES = {name: rec.reference for name, rec in ENERGY_RECORDS.items()}


def energy_of(energy):
    """The :class:`Energy` record of ``energy``: a name of :data:`ENERGY_RECORDS`, or a callable (the reference view only).

    Examples
    --------
    >>> energy_of("dot").kernel, energy_of("cosine").score is None
    (0, True)
    """
    if callable(energy):
        return Energy(f"a callable ({getattr(energy, '__name__', type(energy).__name__)})", energy)
    if isinstance(energy, str) and energy in ENERGY_RECORDS:
        return ENERGY_RECORDS[energy]
    raise ValueError(f"energy must be a callable or one of {sorted(ENERGY_RECORDS)}; got {energy!r}")
