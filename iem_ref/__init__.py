"""iem_ref: the reference implementation of the implicit-EM view of attention and activations.

Energies compete through a softmin (responsibilities, the E-step) and a
posterior statistic summarises them (attention's ``sum_j r_j v_j``, tanh's
``r_+ - r_-``, the hard argmin of ReLU and hard attention).  Every function
cites its equation ID; ``iem_ref.equations.REGISTRY`` maps IDs to functions,
derivations and tests.

Tiers: this package's NumPy functions are the float64 reference;
``iem_ref.exact`` the arbitrary-precision ground truth; ``iem_ref.accel.cpu``
(Numba) and ``iem_ref.accel.cuda`` (numba-cuda) the fast paths with the same
signatures.  The attention variants (bias, ALiBi, softcap, windows, sinks,
grouped-query heads, packed segments, dropout; V1-V8) are keywords of
:func:`attention` and :func:`attention_vjp`, their equations in
:mod:`iem_ref.variants`; so are FlexAttention's ``score_mod`` and
``mask_mod`` (F1-F3, :mod:`iem_ref.flex`).  Importing ``iem_ref`` needs only NumPy (and SciPy for some
checks): Numba is imported by the ``accel`` modules alone.
"""

from .activations import (
    prototype_activation,
    relu,
    sign_posterior_mean,
    sign_responsibilities,
    softplus,
    softplus_derivative,
    tanh_as_attention,
    tanh_from_signed_gaussian,
)
from .attention import attention, attention_responsibilities, causal_mask, hard_attention
from .competition import (
    canonical_energies,
    free_energy,
    hard_responsibilities,
    likelihoods,
    log_partition,
    neg_log_softmin,
    responsibilities,
)
from .energies import (
    ENERGIES,
    SIGNS,
    cosine_energy,
    dot_energy,
    huber_energy,
    laplace_energy,
    logistic_energy,
    mahalanobis_energy,
    pseudo_huber_energy,
    scaled_dot_energy,
    signed_gaussian_energies,
    signed_linear_energies,
    sqeuclidean_energy,
    student_t_energy,
)
from .gradients import attention_vjp, log_partition_gradient, neg_log_softmin_jacobian, responsibilities_jacobian
from .mixtures import mixture_energies, mixture_responsibilities
from .streaming import Partial, finalize_partial, merge_partials, partial_posterior
from .summaries import posterior_entropy, posterior_mean, posterior_mode, posterior_variance, softmin_summary
from . import flex, variants

__version__ = "0.1.0"
