"""Floating-point error bounds, derived once: the primitives, the accelerated paths and the kernels under test.

Every tolerance of the agreement tests (an accelerated path against the
reference), of :mod:`iem_ref.testing` and of :mod:`iem_ref.checks` is built
from the terms below.  Each term is a count of roundings, or a documented
accuracy, with the reason next to it.  The bounds are first order in the
unit roundoff (products of two error terms are dropped), as is usual for
bounds evaluated on the computed or reference values.

Each module holds its sections of the derivation beside the code that
evaluates them:

- :mod:`~iem_ref.bounds.primitives`: 1. unit roundoff, 2. ``gamma_n``, 3. sums
  and dot products, 3b. gradual underflow;
- :mod:`~iem_ref.bounds.paths`: 4. the reference, 6. one weight, 7. rescalings,
  8. tiled sums: what each path does, as :class:`Arithmetic` records;
- :mod:`~iem_ref.bounds.scores`: 5. scores, 11. logits of the variants;
- :mod:`~iem_ref.bounds.forward`: 9. forward bounds of the accelerated paths;
- :mod:`~iem_ref.bounds.backward`: 10. their backward bounds;
- :mod:`~iem_ref.bounds.oracle`: 12. the oracle's own error in the backward
  (float64, by the formulas);
- :mod:`~iem_ref.bounds.merges`: merges of partials (M2);
- :mod:`~iem_ref.bounds.kernels`: 13. and 14. a kernel under test, by its
  precision model (:mod:`iem_ref.testing`).

Examples
--------
>>> from iem_ref.bounds import gamma, unit_roundoff, tree_depth
>>> unit_roundoff(np.float32) == 2.0**-24, unit_roundoff(np.float64) == 2.0**-53
(True, True)
>>> float(gamma(1, 2.0**-53)) == 2.0**-53 / (1 - 2.0**-53)
True
>>> tree_depth(1000)
10
"""

from __future__ import annotations

import numpy as np  # noqa: F401 - the examples above use it

from .backward import attention_vjp_bounds
from .forward import ForwardBounds, attention_bounds, forward_bounds
from .kernels import (BackwardSums, ErrorTerms, ForwardSums, LAMBDA, RowErrors, backward_terms, delta_sums, forward_sums, forward_terms,
                      kernel_forward_bounds, kernel_vjp_bounds, key_roundings, pair_roundings, value_roundings)
from .merges import merge_bounds
from .oracle import variant_vjp_error
from .paths import Arithmetic, REFERENCE, sum_bound
from .primitives import (
    REFERENCE_R_ULPS,
    U32,
    U64,
    gamma,
    log_partition_error,
    scale_rounding,
    tree_depth,
    tree_squares,
    ulps,
    underflow,
    unit_roundoff,
)
from .scores import logit_error, score_error, score_form, score_sizes, score_squares

#: the modules, in the order of the derivation
MODULES = ("primitives", "paths", "scores", "forward", "backward", "oracle", "merges", "kernels")

__all__ = [
    "U32",
    "U64",
    "REFERENCE_R_ULPS",
    "unit_roundoff",
    "gamma",
    "ulps",
    "tree_depth",
    "log_partition_error",
    "tree_squares",
    "scale_rounding",
    "Arithmetic",
    "REFERENCE",
    "sum_bound",
    "score_form",
    "score_sizes",
    "score_squares",
    "score_error",
    "ForwardBounds",
    "forward_bounds",
    "attention_bounds",
    "attention_vjp_bounds",
    "logit_error",
    "variant_vjp_error",
    "merge_bounds",
    "LAMBDA",
    "ErrorTerms",
    "kernel_forward_bounds",
    "ForwardSums",
    "forward_sums",
    "forward_terms",
    "key_roundings",
    "kernel_vjp_bounds",
    "BackwardSums",
    "RowErrors",
    "backward_terms",
    "delta_sums",
    "pair_roundings",
    "value_roundings",
    "underflow",
    "MODULES",
]
