"""What every aggregator returns: refined updates per client, flags, scores and diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from torch import Tensor

from .updates import ClientUpdate


class RefinedUpdates(Sequence[ClientUpdate]):
    """One refined update per client, built exactly when it is read.

    Refined updates share large pieces (the averaged off-subspace part, a global aggregate);
    building all of them at once would hold K copies of those pieces. Reading ``refined[k]``
    builds client ``k``'s factors from the shared pieces; nothing is cached.
    """

    def __init__(self, num_clients: int, build: Callable[[int], ClientUpdate]):
        self._num_clients = num_clients
        self._build = build

    @classmethod
    def from_list(cls, updates: Sequence[ClientUpdate]) -> RefinedUpdates:
        items = list(updates)
        return cls(len(items), items.__getitem__)

    @classmethod
    def same_for_all(cls, update: ClientUpdate, num_clients: int) -> RefinedUpdates:
        """Every client receives the same global aggregate (shared tensors, no copy)."""
        return cls(num_clients, lambda _client: dict(update))

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
