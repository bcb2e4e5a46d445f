"""Data-driven flagging of contaminated clients (CLAIR step 3).

Every statistic is turned into a robust z-score against the clients themselves
(``(x − median) / (1.4826 · MAD)``), so the threshold adapts to how heterogeneous the benign
clients are. A floor on the scale keeps near-identical benign clients from being flagged for
tiny deviations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gram import geometric_median_coefficients, squared_distances

MAD_TO_STD = 1.4826
_SMALLEST_GROUP = 2


def robust_z(values: Tensor, reference: Tensor, floor: float) -> Tensor:
    """Robust z-scores of ``values`` against the median and MAD of ``values[reference]``."""
    centre, scale = _centre_and_scale(values[reference], floor)
    return (values - centre) / scale


def _centre_and_scale(population: Tensor, floor: float) -> tuple[float, float]:
    centre = population.median()
    spread = MAD_TO_STD * (population - centre).abs().median()
    return float(centre), max(float(spread), floor)


def near_duplicate_groups(
    gram: Tensor, threshold: float, floor: float
) -> tuple[Tensor, list[Tensor]]:
    """Groups of clients far more alike than independent clients are.

    Independent data gives independent estimation noise, so a client's nearest neighbour
    (relative distance ``‖Θ_i − Θ_j‖ / rms(‖Θ_i‖, ‖Θ_j‖)``, from the Gram matrix of the
    products) is about as far as everyone else's; colluders sending one message have it at
    zero. The closeness ``−log`` of that distance is robust-z scored; ``floor`` (in log units)
    keeps genuinely similar but independent clients out. Being in a group is not evidence by
    itself: a mimicked client and its copies, or two clients with the same data, form one too,
    and the caller measures a group against everyone else before flagging it. Returns the
    closeness z-scores and the groups (boolean masks) of clients above ``threshold`` joined by
    distances below the cut-off.
    """
    norms = gram.diagonal()
    relative = squared_distances(gram) / ((norms[:, None] + norms[None, :]) / 2).clamp_min(1e-300)
    closeness = -0.5 * relative.clamp_min(1e-24).log()
    closeness.fill_diagonal_(-float("inf"))
    nearest = closeness.max(dim=1).values
    centre, scale = _centre_and_scale(nearest, floor)
    z = (nearest - centre) / scale
    cut = centre + threshold * scale
    candidate = z > threshold
    linked = (closeness > cut) & candidate[:, None] & candidate[None, :]
    groups = []
    unassigned = candidate.clone()
    while bool(unassigned.any()):
        group = torch.zeros_like(candidate)
        group[int(unassigned.nonzero()[0])] = True
        while True:
            grown = group | linked[group].any(dim=0)
            if torch.equal(grown, group):
                break
            group = grown
        unassigned &= ~group
        if int(group.sum()) >= _SMALLEST_GROUP:
            groups.append(group)
    return z, groups


def centre_distance(gram: Tensor, reference: Tensor, weights: Tensor) -> Tensor:
    """``‖Θ_k − c‖ / ‖Θ_k‖`` with ``c`` the weighted geometric median of the reference clients."""
    reference_index = reference.nonzero().flatten()
    inner = gram[reference_index][:, reference_index]
    coefficients = geometric_median_coefficients(inner, weights[reference_index])
    squared = coefficients @ inner @ coefficients - 2 * gram[:, reference_index] @ coefficients
    squared = squared + gram.diagonal()
    return squared.clamp_min(0).sqrt() / gram.diagonal().clamp_min(1e-300).sqrt()


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
