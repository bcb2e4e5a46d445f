"""Data-driven flagging of contaminated clients (CLAIR step 3).

Every statistic is turned into a robust z-score against the clients themselves
(``(x − median) / (1.4826 · MAD)``), so the threshold adapts to how heterogeneous the benign
clients are. A floor on the scale keeps near-identical benign clients from being flagged for
tiny deviations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gram import geometric_median_coefficients

MAD_TO_STD = 1.4826


def robust_z(values: Tensor, reference: Tensor, floor: float) -> Tensor:
    """Robust z-scores of ``values`` against the median and MAD of ``values[reference]``."""
    population = values[reference]
    centre = population.median()
    spread = MAD_TO_STD * (population - centre).abs().median()
    return (values - centre) / max(float(spread), floor)


def direction_distance(gram: Tensor, reference: Tensor, weights: Tensor) -> Tensor:
    """``1 − cos`` between each vector and the robust centre of the reference vectors (0 … 2).

    Works on the Gram matrix of the vectors. Catches sign-flipped, inner-product-manipulated or
    projected updates inside the shared subspace, where the column-space decomposition is blind.
    """
    reference_index = reference.nonzero().flatten()
    coefficients = geometric_median_coefficients(
        gram[reference_index][:, reference_index], weights[reference_index]
    )
    to_centre = gram[:, reference_index] @ coefficients
    centre_norm = float(coefficients @ gram[reference_index][:, reference_index] @ coefficients)
    if centre_norm <= 0:
        return torch.zeros_like(to_centre)
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return 1.0 - to_centre / (norms * centre_norm**0.5)
