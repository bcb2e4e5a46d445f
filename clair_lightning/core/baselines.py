"""Baseline aggregators with CLAIR's input and output: a list of client updates in, refined updates out.

Every rule works on the exact products ``B_k A_k`` (not on A and B separately) unless its name
says otherwise (``fedit``). Global rules give every client the same aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .factors import stack_products
from .result import AggregationResult, RefinedUpdates
from .updates import ClientUpdate, NonFinitePolicy, ValidatedUpdates, validate_updates

Weights = Sequence[float] | Tensor | None


def local(
    updates: Sequence[ClientUpdate], weights: Weights = None, *, nonfinite: NonFinitePolicy = "raise"
) -> AggregationResult:
    """No collaboration: every client keeps its own update."""
    validated = validate_updates(updates, weights, nonfinite=nonfinite, min_clients=1)
    return AggregationResult(
        refined=RefinedUpdates.from_list(validated.updates),
        contaminated=[False] * validated.num_clients,
        excluded=validated.excluded,
    )


def fedavg(
    updates: Sequence[ClientUpdate], weights: Weights = None, *, nonfinite: NonFinitePolicy = "raise"
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
            f"oracle: contaminated has {len(contaminated)} entries for {validated.num_clients} clients"
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


def _global_result(validated: ValidatedUpdates, aggregate: ClientUpdate) -> AggregationResult:
    return AggregationResult(
        refined=RefinedUpdates.same_for_all(aggregate, validated.num_clients),
        contaminated=[False] * validated.num_clients,
        excluded=validated.excluded,
    )
