"""Aggregators by name, so configs and command lines can choose one with a string."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import baselines
from .clair import clair_aggregate
from .result import AggregationResult
from .updates import ClientUpdate

Aggregator = Callable[..., AggregationResult]

AGGREGATORS: dict[str, Aggregator] = {
    "clair": clair_aggregate,
    "local": baselines.local,
    "fedavg": baselines.fedavg,
    "oracle": baselines.oracle,
    "fedit": baselines.fedit,
    "median": baselines.median,
    "trimmed_mean": baselines.trimmed_mean,
    "krum": baselines.krum,
    "multikrum": baselines.multikrum,
    "geomedian": baselines.geomedian,
}

# Aggregators that need the ground-truth contamination mask (simulation only).
NEEDS_TRUTH = frozenset({"oracle"})


def get_aggregator(name: str) -> Aggregator:
    """The aggregator registered under ``name``; a clear error lists the known names."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        known = ", ".join(sorted(AGGREGATORS))
        raise ValueError(f"unknown aggregator {name!r}; known aggregators: {known}") from None


def aggregate(
    name: str,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | None = None,
    **options: Any,
) -> AggregationResult:
    """Run the aggregator ``name`` on ``updates`` with its keyword ``options``."""
    function = get_aggregator(name)
    if name in NEEDS_TRUTH and options.get("contaminated") is None:
        raise ValueError(
            f"aggregator {name!r} needs contaminated=[...]: the ground-truth mask, one bool per "
            "client (simulation only)"
        )
    return function(updates, weights, **options)
