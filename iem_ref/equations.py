"""The equation registry: every equation ID -> its functions, derivation and tests.

IDs follow ``derivations/README.md`` (groups A, T, H, S, P, K, G, M, V, F).  The
registry is data; ``tests/test_registry.py`` fails when an ID lacks a
function that resolves, a derivation section or a test, and ``iem-ref
equations`` prints it.

Tests declare what they check with ``@pytest.mark.equation("A3", ...)``;
:func:`tests_for` finds them by scanning the ``tests/`` folder of a source
checkout (an installed wheel has no tests, and reports none).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Equation", "REGISTRY", "GROUPS", "resolve", "tests_for", "derivation_path"]

ROOT = Path(__file__).resolve().parent.parent

#: group letter -> (title, derivation file)
GROUPS = {
    "A": ("Attention as explicit competition", "derivations/A_attention.md"),
    "T": ("Temperature and scaling", "derivations/T_temperature.md"),
    "H": ("Hard attention, zero temperature, ReLU", "derivations/H_hard_limit.md"),
    "S": ("Scalar activations as collapsed posteriors", "derivations/S_scalar_activations.md"),
    "P": ("Posterior statistics", "derivations/P_posterior_statistics.md"),
    "K": ("Kernels rather than dot products", "derivations/K_kernels.md"),
    "G": ("Responsibilities are gradients", "derivations/G_gradients.md"),
    "M": ("Streaming and merging", "derivations/M_streaming.md"),
    "V": ("Attention variants as implicit EM", "derivations/V_variants.md"),
    "F": ("FlexAttention's score_mod and mask_mod", "derivations/F_flex.md"),
}


@dataclass(frozen=True)
class Equation:
    id: str
    statement: str
    functions: tuple  # names relative to the iem_ref package, e.g. "competition.responsibilities"

    @property
    def group(self):
        return self.id[0]

    @property
    def derivation(self):
        return GROUPS[self.group][1]


_E = Equation
REGISTRY = {
    e.id: e
    for e in [
        _E("A1", "d_j(q) = -<q, k_j> (or a scaled / kernel variant)", ("energies.dot_energy", "energies.scaled_dot_energy")),
        _E("A2", "P_j(q) = exp(-d_j(q))", ("competition.likelihoods",)),
        _E("A3", "r_j = exp(-d_j) / sum_j' exp(-d_j')", ("competition.responsibilities",)),
        _E("A4", "a(q) = sum_j r_j(q) v_j", ("summaries.posterior_mean", "attention.attention")),
        _E("T1", "r_j = softmax(<q, k_j> / sqrt(D)) = A3 at tau = sqrt(D)", ("attention.attention_responsibilities", "energies.scaled_dot_energy")),
        _E("T2", "r_j = exp(-d_j/tau) / sum_j' exp(-d_j'/tau); tau -> inf gives uniform r", ("competition.responsibilities",)),
        _E("T3", "r invariant under d -> d + c and (d, tau) -> (c d, c tau)", ("competition.canonical_energies",)),
        _E("H1", "r_j = 1{j = argmin_j' d_j'} (the note's argmax d_j is an argmin over energies); ties split", ("competition.hard_responsibilities", "attention.hard_attention")),
        _E("H2", "lim_{tau -> 0+} softmin(d/tau) = H1", ("competition.responsibilities", "competition.hard_responsibilities")),
        _E("H3", "softplus_tau(z) = -F({0, -z}) -> ReLU(z); d softplus_tau/dz = sigmoid(z/tau) = r_on", ("activations.softplus", "activations.relu", "activations.softplus_derivative", "competition.free_energy")),
        _E("S1", "two hypotheses s in {+1, -1} with energies d_+(z), d_-(z)", ("energies.SIGNS", "energies.signed_gaussian_energies")),
        _E("S2", "r_+ = exp(-d_+) / (exp(-d_+) + exp(-d_-)), r_- = 1 - r_+", ("activations.sign_responsibilities",)),
        _E("S3", "a(z) = r_+ - r_- = E[s | z]", ("activations.sign_posterior_mean",)),
        _E("S4", "d_s(z) = (z - s m)^2 / (2 sigma^2) gives a(z) = tanh(m z / sigma^2)", ("activations.tanh_from_signed_gaussian", "energies.signed_gaussian_energies", "energies.signed_linear_energies")),
        _E("S5", "tanh(alpha z) = attention(q=[z], keys=[+1,-1], values=[+1,-1], scale=alpha)", ("activations.tanh_as_attention",)),
        _E("P1", "the full responsibility vector (r_1, ..., r_K)", ("competition.responsibilities", "attention.attention")),
        _E("P2", "posterior mean sum_h r_h g(h)", ("summaries.posterior_mean",)),
        _E("P3", "posterior mode g(argmin_h d_h)", ("summaries.posterior_mode", "attention.hard_attention")),
        _E("P4", "posterior variance sum_h r_h g_h^2 - P2^2 and entropy -sum_h r_h log r_h", ("summaries.posterior_variance", "summaries.posterior_entropy")),
        _E("P5", "prototype activation a(z) = sum_h softmin(d_h(z)/tau) g_h", ("activations.prototype_activation",)),
        _E("K1", "dot product: -<x, mu>", ("energies.dot_energy",)),
        _E("K2", "Gaussian: ||x - mu||^2 / (2 sigma^2)", ("energies.sqeuclidean_energy",)),
        _E("K3", "Mahalanobis: (x - mu)^T Sigma^{-1} (x - mu)", ("energies.mahalanobis_energy",)),
        _E("K4", "Laplace: ||x - mu||_1 / b", ("energies.laplace_energy",)),
        _E("K5", "cosine: 1 - <x, mu> / (||x|| ||mu||)", ("energies.cosine_energy",)),
        _E("K6", "Student-t: log(1 + ||x - mu||^2 / (nu sigma^2))", ("energies.student_t_energy",)),
        _E("K7", "Huber and pseudo-Huber of r = ||x - mu||", ("energies.huber_energy", "energies.pseudo_huber_energy")),
        _E("K8", "logistic / softplus: log(1 + exp(-alpha (z - mu)))", ("energies.logistic_energy",)),
        _E("G1", "L = log sum_j exp(-d_j), dL/dd_j = -r_j", ("competition.log_partition", "gradients.log_partition_gradient")),
        _E("G2", "dr_i/dd_j = -r_i (delta_ij - r_j) (divide by tau)", ("gradients.responsibilities_jacobian",)),
        _E("G3", "y_j = d_j + log sum_k exp(-d_k); exp(-y_j) = r_j; dy_i/dd_j = delta_ij - r_j", ("competition.neg_log_softmin", "gradients.neg_log_softmin_jacobian")),
        _E("G4", "attention backward: dS_ij = r_ij (b_ij - sum_j' r_ij' b_ij'), dv_j = sum_i r_ij u_i", ("gradients.attention_vjp",)),
        _E("G5", "Gaussian-mixture E-step p(j | x) = A3 with d_j = K3/2 + 1/2 log det - log pi_j", ("mixtures.mixture_energies", "mixtures.mixture_responsibilities")),
        _E("G6", "variants backward: dZ = P (c b - Delta), dsink = -P_sink Delta, dX = dZ (1 - (s/c)^2), dbias = dZ", ("gradients.attention_vjp",)),
        _E("M1", "block partial (m_B, l_B, o_B)", ("streaming.partial_posterior",)),
        _E("M2", "merge: m = min(m1, m2), l = l1 e^{-(m1-m)} + l2 e^{-(m2-m)}, o likewise; a = o/l, L = -m + log l", ("streaming.merge_partials", "streaming.finalize_partial")),
        _E("V1", "bias: z = s + bias, bias = log pi a log prior; -inf excludes", ("variants.log_prior_scores", "attention.attention")),
        _E("V2", "ALiBi: bias = -slope |i' - j|, a Laplace prior over positions", ("variants.alibi_bias", "variants.relative_positions")),
        _E("V3", "softcap: s = c tanh(x / c), a bounded energy", ("variants.softcap",)),
        _E("V4", "window: key j takes part when i' - left <= j <= i' + right", ("variants.window_mask", "variants.relative_positions")),
        _E("V5", "sinks: one more hypothesis with logit sink and value 0, a null hypothesis", ("variants.with_sink",)),
        _E("V6", "grouped-query heads: query head h reads key head h // g", ("variants.repeat_kv_heads",)),
        _E("V7", "packed segments: keys compete only inside their segment (block-diagonal)", ("variants.segment_mask", "variants.relative_positions")),
        _E("V8", "dropout: a = sum_j r_j keep_j v_j / (1 - p), r and L before dropout", ("variants.dropout_mean",)),
        _E("F1", "score_mod: y_ij = f(x_ij, b, h, i, j) on the scaled scores, before softcap and priors; -inf excludes", ("flex.modified_scores", "attention.attention")),
        _E("F2", "mask_mod: take_ij &= m(b, h, i, j), a hypothesis set given by a rule on the indices", ("flex.mod_mask",)),
        _E("F3", "score_mod backward: dX = dY f'(x), f' by the complex step Im f(x + ih) / h (or given)", ("flex.score_mod_slope", "gradients.attention_vjp")),
    ]
}


def resolve(name):
    """Return the object that a registry function name ("module.attr") refers to."""
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(f"iem_ref.{module}"), attr)


def derivation_path(eq_id):
    return ROOT / REGISTRY[eq_id].derivation


_MARK = re.compile(r"equation\(([^)]*)\)")


def tests_for(tests_dir=None):
    """Map each ID to the test functions marked ``@pytest.mark.equation(ID)`` in ``tests_dir``."""
    tests_dir = Path(tests_dir) if tests_dir else ROOT / "tests"
    found = {eq_id: [] for eq_id in REGISTRY}
    if not tests_dir.is_dir():
        return found
    for path in sorted(tests_dir.glob("test_*.py")):
        pending = []
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("@pytest.mark.equation("):
                pending += re.findall(r"[\"']([A-Z]\d)[\"']", _MARK.search(stripped).group(1))
            elif stripped.startswith(("def test_", "class Test")) and pending:
                name = stripped.split()[1].split("(")[0].rstrip(":")
                for eq_id in pending:
                    if eq_id in found:
                        found[eq_id].append(f"{path.relative_to(tests_dir.parent)}::{name}")
                pending = []
            elif stripped.startswith("def ") or stripped.startswith("class "):
                pending = []
    return found
