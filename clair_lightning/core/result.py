"""What every aggregator returns: refined updates per client, flags, scores and diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from torch import Tensor

from .factors import Refactorized, Split, refactorize
from .updates import ClientUpdate, LoraFactors

AtRank = LoraFactors | Refactorized
ModuleAtRank = Callable[[str, int, Split], list[AtRank]]


class RefinedUpdates(Sequence[ClientUpdate]):
    """One refined update per client, built exactly when it is read.

    Refined updates share large pieces (the averaged off-subspace part, a global aggregate);
    building all of them at once would hold K copies of those pieces. Reading ``refined[k]``
    builds client ``k``'s factors from the shared pieces; nothing is cached. ``at_rank`` brings
    every client's refined update to a LoRA rank, module by module; ``module_at_rank`` lets an
    aggregator do that with work shared across clients.
    """

    def __init__(
        self,
        num_clients: int,
        build: Callable[[int], ClientUpdate],
        module_at_rank: ModuleAtRank | None = None,
        module_names: Sequence[str] | None = None,
    ):
        self._num_clients = num_clients
        self._build = build
        self._module_at_rank = module_at_rank
        self._module_names = None if module_names is None else list(module_names)

    @classmethod
    def from_list(cls, updates: Sequence[ClientUpdate]) -> RefinedUpdates:
        items = list(updates)
        return cls(len(items), items.__getitem__)

    @classmethod
    def same_for_all(cls, update: ClientUpdate, num_clients: int) -> RefinedUpdates:
        """Every client receives the same global aggregate (shared tensors, no copy)."""

        def module_at_rank(name: str, rank: int, split: Split) -> list[AtRank]:
            return [at_rank(*update[name], rank, split)] * num_clients

        return cls(num_clients, lambda _client: dict(update), module_at_rank, list(update))

    def at_rank(
        self, rank: int | Mapping[str, int], split: Split = "balanced"
    ) -> Iterator[tuple[str, list[AtRank]]]:
        """Module by module, every client's refined update at LoRA rank ``rank`` (per module).

        Yields ``(module, factors)`` with one entry per client: the refined ``(B, A)`` exactly as
        built when it already has ``rank`` columns, else the ``Refactorized`` best rank-``rank``
        approximation (as ``refactorize`` gives it). Only one module's results are alive at a
        time, so a caller that writes them out (into adapters, into messages) streams.
        """
        if isinstance(rank, Mapping):
            names = list(rank)
        else:
            names = self._module_names if self._module_names is not None else list(self._build(0))
        for name in names:
            module_rank = rank[name] if isinstance(rank, Mapping) else rank
            if self._module_at_rank is not None:
                yield name, self._module_at_rank(name, module_rank, split)
            else:
                yield (
                    name,
                    [
                        at_rank(*self._build(k)[name], module_rank, split)
                        for k in range(self._num_clients)
                    ],
                )

    def __len__(self) -> int:
        return self._num_clients

    @overload
    def __getitem__(self, index: int) -> ClientUpdate: ...

    @overload
    def __getitem__(self, index: slice) -> list[ClientUpdate]: ...

    def __getitem__(self, index: int | slice) -> ClientUpdate | list[ClientUpdate]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(self._num_clients))]
        if index < 0:
            index += self._num_clients
        if not 0 <= index < self._num_clients:
            raise IndexError(f"client index {index} out of range for {self._num_clients} clients")
        return self._build(index)

    def __iter__(self) -> Iterator[ClientUpdate]:
        return (self._build(k) for k in range(self._num_clients))


def at_rank(b: Tensor, a: Tensor, rank: int, split: Split = "balanced") -> AtRank:
    """``(B, A)`` as given when it has ``rank`` columns, else its best rank-``rank`` factors."""
    return (b, a) if b.shape[1] == rank else refactorize(b, a, rank, split=split)


@dataclass
class AggregationResult:
    """Outcome of one aggregation over K clients.

    ``contaminated[k]`` is the aggregator's flag for client ``k`` (always False for rules that do
    not flag); ``scores[k]`` is larger for more suspicious clients (``None`` for rules without a
    score); ``subspaces`` maps module to an orthonormal ``d_out x r_s`` basis (CLAIR only);
    ``excluded`` maps clients left out before aggregation to the reason.
    """

    refined: RefinedUpdates
    contaminated: list[bool]
    scores: list[float] | None = None
    subspaces: dict[str, Tensor] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    score_components: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def collaborative_set(self) -> list[int]:
        """Clients that neither were flagged nor excluded."""
        return [
            k for k, flag in enumerate(self.contaminated) if not flag and k not in self.excluded
        ]
