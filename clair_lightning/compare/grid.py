"""The grid of cells a comparison runs, and the record one cell produces."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

NO_CONTAMINATION = "none"


@dataclass(frozen=True)
class Cell:
    """One run: a recipe, an aggregator, a contamination scenario and a seed."""

    recipe: str
    aggregator: str
    contamination: str
    seed: int

    @property
    def key(self) -> str:
        """A file-system-safe name, stable across runs (used to resume)."""
        return f"{self.recipe}__{self.aggregator}__{self.contamination}__seed{self.seed}"

    def as_dict(self) -> dict:
        return asdict(self)


def expand_grid(
    recipe: str, aggregators: Sequence[str], contaminations: Sequence[str], seeds: Sequence[int]
) -> list[Cell]:
    """Every combination, contamination-major so early results cover all aggregators."""
    for name, values in (
        ("aggregators", aggregators),
        ("contaminations", contaminations),
        ("seeds", seeds),
    ):
        if not values:
            raise ValueError(f"{name} must not be empty")
        duplicates = sorted({v for v in values if list(values).count(v) > 1})
        if duplicates:
            raise ValueError(f"{name} has duplicates: {duplicates}")
    return [
        Cell(recipe, aggregator, contamination, seed)
        for contamination, seed, aggregator in itertools.product(contaminations, seeds, aggregators)
    ]
