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
_MAX_TRIMMING_ROUNDS = 5


def robust_z(values: Tensor, reference: Tensor, floor: float) -> Tensor:
    """Robust z-scores of ``values`` against the median and MAD of ``values[reference]``."""
    centre, scale = _centre_and_scale(values[reference], floor)
    return (values - centre) / scale


def _centre_and_scale(population: Tensor, floor: float) -> tuple[float, float]:
    """Median and MAD by ``Tensor.median``, the lower of the two middle values at an even count:
    the threshold and floors were measured with it. The true median (d4ed533, reverted) widened
    the benign margin (largest benign direction z 4.41 -> 3.83) but missed text-copy attackers
    (``random_targets`` F1 1.000 -> 0.694 over 3 seeds, ``min_sum_std`` round 1)."""
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


def direction_scores(
    gram: Tensor, reference: Tensor, weights: Tensor, floor: float, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``1 − cos`` to the robust centre ``c`` of the reference vectors, the projection
    ``⟨Θ_k, c⟩ / ‖c‖²``, and the direction z-score.

    Works on the Gram matrix of the vectors. A small cosine catches sign-flipped,
    inner-product-manipulated or projected updates inside the shared subspace, where the
    column-space decomposition is blind. The cosine is a ratio of the component along ``c``
    and the component orthogonal to it; each is light-tailed over benign clients, their ratio
    is not (a benign client whose component along ``c`` is a plain 3σ draw can have a cosine
    near 0). The direction z-score is therefore the cosine's robust z-score capped by the
    larger of those of the two components (along ``c`` too small, orthogonal too large, both
    in units of ``‖c‖``): a flag needs the cosine *and* the component that makes it small to
    be beyond the threshold. The centre and the scales are re-estimated without the clients
    whose cosine is beyond ``threshold`` until that set is stable, so a large contaminated
    share does not widen the benign spread and hide itself. ``floor`` is the smallest scale of
    every z-score.
    """
    trimmed = reference
    for _ in range(_MAX_TRIMMING_ROUNDS):
        distance, along, across = _components(gram, trimmed, weights)
        distance_z = robust_z(distance, trimmed, floor)
        kept = reference & (distance_z <= threshold)
        if torch.equal(kept, trimmed):
            break
        trimmed = kept
    else:
        distance, along, across = _components(gram, trimmed, weights)
        distance_z = robust_z(distance, trimmed, floor)
    component_z = torch.maximum(robust_z(-along, trimmed, floor), robust_z(across, trimmed, floor))
    return distance, along, torch.minimum(distance_z, component_z)


def _components(gram: Tensor, reference: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``1 − cos`` to the reference's robust centre ``c``, and each vector's components along
    and orthogonal to ``c`` in units of ``‖c‖``."""
    reference_index = reference.nonzero().flatten()
    inner = gram[reference_index][:, reference_index]
    coefficients = geometric_median_coefficients(inner, weights[reference_index])
    to_centre = gram[:, reference_index] @ coefficients
    centre_square = float(coefficients @ inner @ coefficients)
    if centre_square <= 0:
        zeros = torch.zeros_like(to_centre)
        return zeros, torch.ones_like(to_centre), zeros
    squares = gram.diagonal().clamp_min(1e-300)
    along = to_centre / centre_square
    across = (squares / centre_square - along.square()).clamp_min(0).sqrt()
    return 1.0 - to_centre / (squares * centre_square).sqrt(), along, across
