"""Baseline aggregators with CLAIR's interface: client updates in, refined updates out.

Every rule works on the exact products ``B_k A_k`` (not on A and B separately) unless its name
says otherwise (``fedit``). Global rules give every client the same aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .dense import DEFAULT_CHUNK_ELEMENTS, product_row_blocks
from .factors import stack_products
from .gram import geometric_median_coefficients, product_gram, squared_distances
from .result import AggregationResult, RefinedUpdates
from .updates import (
    ClientUpdate,
    NonFinitePolicy,
    UpdateValidationError,
    ValidatedUpdates,
    validate_updates,
)

Weights = Sequence[float] | Tensor | None

# Coordinates sorted at a time by the coordinate-wise rules: 4096 x 64 clients is 1 MiB in
# float32, within a core's L2 cache with the block slice it is copied from.
COORDINATES_PER_SLICE = 4096


def local(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """No collaboration: every client keeps its own update."""
    validated = validate_updates(updates, weights, nonfinite=nonfinite, min_clients=1)
    return AggregationResult(
        refined=RefinedUpdates.from_list(validated.updates),
        contaminated=[False] * validated.num_clients,
        excluded=validated.excluded,
    )


def fedavg(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """FedAvg on exact products: ``Σ_k w_k B_k A_k`` in stacked factored form (rank ≤ Σ r_k)."""
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    average = weighted_average(validated, validated.included, validated.weights)
    return _global_result(validated, average)


def oracle(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    contaminated: Sequence[bool],
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """FedAvg over the clients the caller says are benign: the target a robust rule should reach."""
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    if len(contaminated) != validated.num_clients:
        raise ValueError(
            f"oracle: contaminated has {len(contaminated)} entries "
            f"for {validated.num_clients} clients"
        )
    benign = [k for k in validated.included if not contaminated[k]]
    if not benign:
        raise ValueError("oracle: no benign client among the included clients")
    average = weighted_average(validated, benign, validated.weights)
    result = _global_result(validated, average)
    result.contaminated = [bool(flag) for flag in contaminated]
    return result


def weighted_average(
    validated: ValidatedUpdates, clients: Sequence[int], weights: Tensor
) -> ClientUpdate:
    """Exact ``Σ_{k∈clients} w̄_k B_k A_k`` per module, weights renormalised over ``clients``."""
    selected = weights[list(clients)]
    selected = selected / selected.sum()
    return {
        name: stack_products(
            [
                (float(w), *validated.updates[k][name])
                for k, w in zip(clients, selected.tolist(), strict=True)
            ]
        )
        for name in validated.module_names
    }


def fedit(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """FedIT: average ``A`` and ``B`` separately, ``(Σ w_k B_k)(Σ w_k A_k)`` (the common rule).

    Inexact: it differs from FedAvg on products by the weighted cross-covariance of the factors,
    ``Σ w_k B_k A_k − B̄ Ā = Σ w_k (B_k − B̄)(A_k − Ā)``, which vanishes only when every client
    has the same ``A`` or the same ``B``. Requires equal LoRA ranks per module.
    """
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    clients = validated.included
    client_weights = validated.weights[clients].to(validated.dtype)
    average: ClientUpdate = {}
    for name in validated.module_names:
        ranks = validated.ranks(name)
        if len(set(ranks)) > 1:
            by_client = dict(zip(clients, ranks, strict=True))
            raise UpdateValidationError(
                f"fedit averages A and B separately, so every client needs the same LoRA rank; "
                f"module {name!r} has ranks {by_client} (client: rank). Use fedavg instead."
            )
        b_stack = torch.stack([validated.updates[k][name][0] for k in clients])
        a_stack = torch.stack([validated.updates[k][name][1] for k in clients])
        average[name] = (
            torch.einsum("k,kij->ij", client_weights, b_stack),
            torch.einsum("k,kij->ij", client_weights, a_stack),
        )
    return _global_result(validated, average)


def median(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """Coordinate-wise median of the products (Yin et al., 2018), exact and dense.

    The result is returned as factors ``(D, I_{d_in})``: a coordinate-wise statistic has no
    low-rank structure. Weights are ignored (as in Flower's FedMedian), except that a zero
    weight excludes a client; an even number of clients takes the mean of the two middle
    values. ``chunk_elements`` caps the dense block (clients x rows x d_in) formed at a time.
    ``scores``: each client's distance to the aggregate relative to the median distance.
    """
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    return _coordinatewise(validated, _middle_value, chunk_elements)


def trimmed_mean(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    trim_fraction: float = 0.2,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """Coordinate-wise trimmed mean of the products (Yin et al., 2018), exact and dense.

    Per coordinate, drops the ``⌊trim_fraction · K⌋`` largest and smallest values and averages
    the rest. ``trim_fraction=0.2`` is Flower's FedTrimmedAvg default; it must be at least the
    contaminated fraction to bound their influence. Output, weights, chunking and scores as in
    ``median``.
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(
            f"trim_fraction must be in [0, 0.5): that share is dropped from each end, so 0.5 "
            f"or more would drop every client; got {trim_fraction}"
        )
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    cut = int(trim_fraction * len(validated.included))

    def trimmed(ordered: Tensor) -> Tensor:
        return ordered[:, cut : ordered.shape[1] - cut].mean(dim=1)

    result = _coordinatewise(validated, trimmed, chunk_elements)
    result.diagnostics["trimmed_per_side"] = cut
    return result


def krum(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    num_byzantine: int | None = None,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """Krum (Blanchard et al., 2017) on exact product distances from the K x K Gram matrix.

    A client's score is the sum of squared distances to its ``K − f − 2`` nearest other clients;
    the lowest-scoring client's own update is the aggregate. ``num_byzantine`` (f) defaults to
    the largest value Krum tolerates, ``⌊(K − 1)/2⌋ − 1`` (it needs ``K > 2f + 2``), with K the
    number of included clients. Every other client is flagged; ``scores`` are Krum scores.
    """
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    scores, byzantine = _krum_scores(validated, num_byzantine, "krum")
    chosen = validated.included[int(scores.argmin())]
    aggregate = weighted_average(validated, [chosen], validated.weights)
    return _global_result(
        validated,
        aggregate,
        scores=scores,
        selected=[chosen],
        diagnostics={"selected": [chosen], "num_byzantine": byzantine},
    )


def multikrum(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    num_byzantine: int | None = None,
    num_selected: int | None = None,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """Multi-Krum: the weighted average of the ``m`` clients with the lowest Krum scores.

    ``num_byzantine`` as in ``krum``; ``num_selected`` (m) defaults to ``K − f``, every client
    Krum's assumption allows to be benign (``m = 1`` is Krum). The average is exact, in stacked
    factored form, with the caller's weights renormalised over the selected clients (as in
    Flower). Clients not selected are flagged; ``scores`` are Krum scores.
    """
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    scores, byzantine = _krum_scores(validated, num_byzantine, "multikrum")
    num_clients = len(validated.included)
    count = num_clients - byzantine if num_selected is None else num_selected
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_clients:
        raise ValueError(
            f"multikrum: num_selected must be an int in [1, {num_clients}] (the included "
            f"clients), got {num_selected!r}"
        )
    ranked = torch.sort(scores, stable=True).indices[:count].tolist()
    selected = sorted(validated.included[position] for position in ranked)
    aggregate = weighted_average(validated, selected, validated.weights)
    return _global_result(
        validated,
        aggregate,
        scores=scores,
        selected=selected,
        diagnostics={"selected": selected, "num_byzantine": byzantine, "num_selected": count},
    )


def geomedian(
    updates: Sequence[ClientUpdate],
    weights: Weights = None,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-8,
    smoothing: float = 1e-6,
    nonfinite: NonFinitePolicy = "raise",
) -> AggregationResult:
    """Weighted geometric median of the products (RFA, Pillutla et al.) by smoothed Weiszfeld.

    The iterations run on coefficient vectors over the K x K product Gram matrix, so no dense
    update is formed; the median ``Σ c_k B_k A_k`` is returned in exact stacked factored form.
    ``smoothing`` (ν) is relative to the largest client norm, so the rule is scale-free (RFA's
    reference uses ν = 1e-6); ``tolerance`` bounds the ℓ1 change of the coefficients at
    convergence. Iterations only cost K x K products, hence the generous ``max_iterations``
    (RFA's 3–5 count communication rounds). ``scores``: distance of each client to the median
    relative to the median of those distances.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
        raise ValueError(f"geomedian: max_iterations must be an int, got {max_iterations!r}")
    if max_iterations < 1 or not tolerance >= 0 or not smoothing > 0:
        raise ValueError(
            "geomedian needs max_iterations >= 1, tolerance >= 0 and smoothing > 0, got "
            f"{max_iterations}, {tolerance}, {smoothing}"
        )
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    clients = validated.included
    gram = product_gram(validated)
    coefficients = geometric_median_coefficients(
        gram,
        validated.weights[clients],
        iterations=max_iterations,
        smoothing=smoothing,
        tolerance=tolerance,
    )
    projected = gram @ coefficients
    squared = coefficients @ projected - 2 * projected + gram.diagonal()
    aggregate = {
        name: stack_products(
            [
                (c, *validated.updates[k][name])
                for k, c in zip(clients, coefficients.tolist(), strict=True)
            ]
        )
        for name in validated.module_names
    }
    return _global_result(
        validated, aggregate, scores=_relative_to_median(squared.clamp_min(0).sqrt())
    )


def _coordinatewise(
    validated: ValidatedUpdates, reduce: Callable[[Tensor], Tensor], chunk_elements: int
) -> AggregationResult:
    """Reduce the included clients' sorted values per coordinate, a block of rows at a time.

    ``reduce`` maps ``(coordinates, K)`` rows, each coordinate's client values in ascending
    order, to one value per coordinate. Within a block the coordinates go in slices whose values
    are transposed into a small buffer (so each coordinate's K values are contiguous) and sorted
    there, while the slice is still in cache: on the CPU numpy's vectorised sort of short rows is
    about 13x faster than selecting along the clients in place (``benchmarks/median_speed.py``).
    """
    clients = validated.included
    squared = torch.zeros(len(clients), dtype=torch.float64, device=validated.device)
    by_coordinate = torch.empty(
        COORDINATES_PER_SLICE, len(clients), dtype=validated.dtype, device=validated.device
    )
    aggregate: ClientUpdate = {}
    for name in validated.module_names:
        d_out, d_in = validated.shapes[name]
        dense = torch.empty(d_out, d_in, dtype=validated.dtype, device=validated.device)
        flat = dense.view(-1)
        factors = [validated.updates[k][name] for k in clients]
        for rows, products in product_row_blocks(factors, chunk_elements):
            values = products.reshape(len(clients), -1)
            offset = rows.start * d_in
            for start in range(0, values.shape[1], COORDINATES_PER_SLICE):
                block = values[:, start : start + COORDINATES_PER_SLICE]
                ordered = by_coordinate[: block.shape[1]]
                ordered.copy_(block.T)
                reduced = flat[offset + start : offset + start + block.shape[1]]
                reduced.copy_(reduce(_sort_rows_(ordered)))
                squared += block.sub(reduced).square_().sum(dim=1).to(torch.float64)
        identity = torch.eye(d_in, dtype=validated.dtype, device=validated.device)
        aggregate[name] = (dense, identity)
    return _global_result(validated, aggregate, scores=_relative_to_median(squared.sqrt()))


def _sort_rows_(values: Tensor) -> Tensor:
    """Sort each row of ``values`` in place (numpy's SIMD sort on the CPU) and return it."""
    if values.device.type == "cpu":
        values.numpy().sort(axis=1)
    else:
        values.copy_(values.sort(dim=1).values)
    return values


def _middle_value(ordered: Tensor) -> Tensor:
    """Median of each sorted row; the mean of the two middle values for an even count."""
    count = ordered.shape[1]
    return (ordered[:, (count - 1) // 2] + ordered[:, count // 2]) / 2


def _krum_scores(
    validated: ValidatedUpdates, num_byzantine: int | None, rule: str
) -> tuple[Tensor, int]:
    """Krum score of each included client, and the number of Byzantine clients assumed."""
    num_clients = len(validated.included)
    byzantine = max(0, (num_clients - 1) // 2 - 1) if num_byzantine is None else num_byzantine
    if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
        raise ValueError(f"{rule}: num_byzantine must be a non-negative int, got {num_byzantine!r}")
    if num_clients <= 2 * byzantine + 2:
        raise ValueError(
            f"{rule} needs more than 2f + 2 = {2 * byzantine + 2} clients for f = {byzantine} "
            f"Byzantine clients, but {num_clients} are included"
        )
    distances = squared_distances(product_gram(validated))
    distances.fill_diagonal_(math.inf)
    nearest = distances.sort(dim=1).values[:, : num_clients - byzantine - 2]
    return nearest.sum(dim=1), byzantine


def _relative_to_median(distances: Tensor) -> Tensor:
    """Distances divided by their median (by the largest when more than half are zero)."""
    scale = float(distances.quantile(0.5))
    if scale <= 0:
        scale = float(distances.max())
    return distances / scale if scale > 0 else distances


def _global_result(
    validated: ValidatedUpdates,
    aggregate: ClientUpdate,
    *,
    scores: Tensor | None = None,
    selected: Sequence[int] | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> AggregationResult:
    """Every client, excluded ones included, receives ``aggregate``.

    ``scores`` are per included client (excluded clients score ``inf``). Rules that select
    clients flag everyone outside ``selected``, excluded clients too (as CLAIR does).
    """
    contaminated = [False] * validated.num_clients
    if selected is not None:
        chosen = set(selected)
        contaminated = [k not in chosen for k in range(validated.num_clients)]
    per_client: list[float] | None = None
    if scores is not None:
        per_client = [math.inf] * validated.num_clients
        for client, score in zip(validated.included, scores.tolist(), strict=True):
            per_client[client] = score
    return AggregationResult(
        refined=RefinedUpdates.same_for_all(aggregate, validated.num_clients),
        contaminated=contaminated,
        scores=per_client,
        excluded=validated.excluded,
        diagnostics=diagnostics or {},
    )
