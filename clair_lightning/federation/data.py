"""Per-client data, the contamination truth, and one round of local steps per Trainer epoch.

A recipe subclasses ``FederatedDataModule`` and implements ``client_examples`` (and lists its
data-level contaminations in ``DATA_CONTAMINATIONS``). Update-level contaminations (the core's
attack generators) are applied to the factors a contaminated client uploads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core import ATTACKS, ClientUpdate, contaminate

NO_CONTAMINATION = "none"
Example = dict[str, Tensor]


@dataclass(frozen=True)
class ClientExamples:
    """One client's train, validation and test examples (lists of tensor dicts).

    ``probe`` holds optional held-out attack probes (e.g. triggered prompts whose completion is
    a backdoor's target): validation reports their exact match as ``attack_success``.
    """

    train: list[Example]
    val: list[Example]
    test: list[Example]
    probe: list[Example] = field(default_factory=list)


class FederatedDataModule(pl.LightningDataModule):
    """K clients' data; each Trainer epoch is one round of ``local_steps`` batches per client.

    ``contaminated_fraction`` of the clients (chosen by ``seed``) are contaminated with
    ``contamination``: a data-level scenario of the recipe, an update-level attack name from
    ``clair_lightning.core.attacks``, or ``"none"``.

    ``clients_per_round`` (a count, or a fraction of ``num_clients``; default all) samples the
    round's participants from ``(seed, round)``: only they train and are aggregated, the others
    keep their adapter, and a resumed run samples the same clients.
    """

    DATA_CONTAMINATIONS: tuple[str, ...] = ()
    TASK_METRIC = "exact_match"  # the headline metric of reports (higher is better)

    def __init__(
        self,
        num_clients: int = 10,
        contaminated_fraction: float = 0.3,
        contamination: str = NO_CONTAMINATION,
        attack_options: dict[str, Any] | None = None,
        local_steps: int = 10,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int = 0,
        clients_per_round: int | float | None = None,
    ):
        super().__init__()
        if num_clients < 2:
            raise ValueError(
                f"a federation needs at least two clients, got num_clients={num_clients}"
            )
        if not 0 <= contaminated_fraction < 0.5:
            raise ValueError(
                f"contaminated_fraction must be in [0, 0.5), got {contaminated_fraction}"
            )
        known = self.contaminations()
        if contamination not in known:
            raise ValueError(f"unknown contamination {contamination!r}; known: {', '.join(known)}")
        if contamination == NO_CONTAMINATION and contaminated_fraction > 0:
            contaminated_fraction = 0.0
        for name, value in (
            ("local_steps", local_steps),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.num_clients = num_clients
        self.contamination = contamination
        self.attack_options = dict(attack_options or {})
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        order = torch.randperm(num_clients, generator=torch.Generator().manual_seed(seed))
        chosen = set(order[: round(contaminated_fraction * num_clients)].tolist())
        if contamination != NO_CONTAMINATION and contaminated_fraction > 0 and not chosen:
            raise ValueError(
                f"contaminated_fraction={contaminated_fraction} of {num_clients} clients rounds to "
                "no contaminated client"
            )
        self.contaminated = [k in chosen for k in range(num_clients)]
        self.clients_per_round = _participant_count(clients_per_round, num_clients)
        self._clients: list[ClientExamples] | None = None

    def participants(self, round_number: int) -> list[int]:
        """The clients that train and are aggregated in round ``round_number`` (1-based)."""
        if self.clients_per_round == self.num_clients:
            return list(range(self.num_clients))
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + round_number) * 31 + 7)
        order = torch.randperm(self.num_clients, generator=generator)
        return sorted(order[: self.clients_per_round].tolist())

    @classmethod
    def contaminations(cls) -> tuple[str, ...]:
        """Every scenario this recipe accepts."""
        return (NO_CONTAMINATION, *cls.DATA_CONTAMINATIONS, *sorted(ATTACKS))

    @property
    def update_attack(self) -> str | None:
        return self.contamination if self.contamination in ATTACKS else None

    def client_examples(
        self, client: int, data_contamination: str | None, generator: torch.Generator
    ) -> ClientExamples:
        """Build one client's examples; ``data_contamination`` is set for contaminated clients."""
        raise NotImplementedError

    # --- data -------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self._clients is not None:
            return
        clients = []
        for client in range(self.num_clients):
            generator = torch.Generator().manual_seed(self.seed * 100_003 + client)
            poisoned = self.contaminated[client] and self.contamination in self.DATA_CONTAMINATIONS
            examples = self.client_examples(
                client, self.contamination if poisoned else None, generator
            )
            for split in ("train", "val", "test"):
                if not getattr(examples, split):
                    raise ValueError(f"client {client} has no {split} examples")
            clients.append(examples)
        self._clients = clients

    @property
    def train_sizes(self) -> list[int]:
        """Training examples per client: the aggregation weights."""
        self.setup()
        return [len(c.train) for c in self._clients]

    def train_dataloader(self) -> DataLoader:
        """This round's local steps; when the model steps ``client_group_size`` clients together,
        each batch is a list of their batches for one local step."""
        module = self.trainer.lightning_module if self.trainer else None
        return self._round_loader(
            self._current_round,
            lambda round_index: self.participants(round_index + 1),
            getattr(module, "client_group_size", 1),
        )

    def client_round_dataloader(self, client: int, round_index: int) -> DataLoader:
        """One client's ``local_steps`` training batches of round ``round_index`` (0-based),
        the very batches ``train_dataloader`` gives that client in that round."""
        return self._round_loader(lambda: round_index, [client])

    def _round_loader(self, current_round, clients, group_size: int = 1) -> DataLoader:
        self.setup()
        sampler = RoundBatchSampler(
            self.train_sizes,
            self.local_steps,
            self.batch_size,
            self.seed,
            current_round,
            clients=clients,
            group_size=group_size,
        )
        return DataLoader(
            _ClientDataset(self._clients, "train"),
            batch_sampler=sampler,
            collate_fn=collate if group_size == 1 else collate_clients,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Every client's validation examples; a second loader holds attack probes, if any."""
        self.setup()
        if any(c.probe for c in self._clients):
            return [self._evaluation_loader("val"), self._evaluation_loader("probe")]
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def client_dataloader(
        self,
        client: int,
        split: str = "train",
        shuffle: bool = False,
        batch_size: int | None = None,
    ) -> DataLoader:
        """One client's examples, e.g. to fine-tune a ``ClientLoRAModule`` on its own data;
        ``split="probe"`` gives its attack probes (empty where the scenario has none)."""
        self.setup()
        if split not in ("train", "val", "test", "probe"):
            raise ValueError(f"split must be 'train', 'val', 'test' or 'probe', got {split!r}")
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client must be in [0, {self.num_clients}), got {client}")
        keys = [(client, i) for i in range(len(getattr(self._clients[client], split)))]
        return DataLoader(
            keys,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            collate_fn=lambda batch: collate(
                [_ClientDataset(self._clients, split)[key] for key in batch]
            ),
        )

    def _evaluation_loader(self, split: str) -> DataLoader:
        self.setup()
        batches = []
        for client, examples in enumerate(self._clients):
            items = [(client, i) for i in range(len(getattr(examples, split)))]
            batches += [
                items[i : i + self.eval_batch_size]
                for i in range(0, len(items), self.eval_batch_size)
            ]
        return DataLoader(
            _ClientDataset(self._clients, split), batch_sampler=batches, collate_fn=collate
        )

    def _current_round(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else trainer.current_epoch

    # --- update-level contamination ---------------------------------------------------------

    def contaminate_updates(
        self,
        updates: list[ClientUpdate],
        round_index: int,
        clients: Sequence[int] | None = None,
    ) -> list[ClientUpdate]:
        """Replace contaminated clients' uploads by the configured attack (others untouched).

        ``clients`` says whose uploads ``updates`` are when only some clients answered.
        """
        clients = range(self.num_clients) if clients is None else clients
        truth = [self.contaminated[k] for k in clients]
        if self.update_attack is None or not any(truth):
            return updates
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return contaminate(
            updates,
            truth,
            self.update_attack,
            generator=generator,
            **self.attack_options,
        )


def _participant_count(clients_per_round: int | float | None, num_clients: int) -> int:
    """Participants per round from a count or a fraction; at least two, at most everyone."""
    if clients_per_round is None:
        return num_clients
    if isinstance(clients_per_round, float) and not clients_per_round.is_integer():
        if not 0 < clients_per_round <= 1:
            raise ValueError(
                f"clients_per_round as a fraction must be in (0, 1], got {clients_per_round}"
            )
        count = round(clients_per_round * num_clients)
    else:
        count = int(clients_per_round)
    if not 2 <= count <= num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} gives {count} of {num_clients} clients per "
            "round; it must give between two and num_clients"
        )
    return count


class RoundBatchSampler(Sampler[list[tuple[int, int]]]):
    """``local_steps`` batches per client per round; the order depends only on (seed, round).

    With ``group_size`` > 1, clients go in groups of that many, and each batch holds the
    group's batches of one local step side by side (each client's batches are unchanged).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        local_steps: int,
        batch_size: int,
        seed: int,
        current_round,
        clients: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
        group_size: int = 1,
    ):
        self.sizes = list(sizes)
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self.current_round = current_round
        if clients is None:
            clients = range(len(self.sizes))
        self.clients = clients if callable(clients) else list(clients)
        self.group_size = group_size

    def __len__(self) -> int:
        groups = math.ceil(len(self._clients(self.current_round())) / self.group_size)
        return groups * self.local_steps

    def _clients(self, round_index: int) -> Sequence[int]:
        return self.clients(round_index) if callable(self.clients) else self.clients

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        round_index = self.current_round()
        clients = list(self._clients(round_index))
        for first in range(0, len(clients), self.group_size):
            group = clients[first : first + self.group_size]
            for steps in zip(*(self._batches(k, round_index) for k in group), strict=True):
                yield [key for step in steps for key in step]

    def _batches(self, client: int, round_index: int) -> list[list[tuple[int, int]]]:
        """The client's ``local_steps`` batches of the round."""
        size = self.sizes[client]
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + round_index) * 10_007 + client
        )
        needed = self.local_steps * self.batch_size
        order: list[int] = []
        while len(order) < needed:
            order += torch.randperm(size, generator=generator).tolist()
        return [
            [
                (client, index)
                for index in order[step * self.batch_size : (step + 1) * self.batch_size]
            ]
            for step in range(self.local_steps)
        ]


class _ClientDataset(Dataset):
    def __init__(self, clients: list[ClientExamples], split: str):
        self.clients = clients
        self.split = split

    def __len__(self) -> int:
        return sum(len(getattr(c, self.split)) for c in self.clients)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Example]:
        client, index = key
        return client, getattr(self.clients[client], self.split)[index]


def collate(items: list[tuple[int, Example]]) -> dict[str, Tensor]:
    """Stack one client's examples; ``client`` says whose adapter the batch trains."""
    clients = {client for client, _ in items}
    if len(clients) != 1:
        raise ValueError(f"a batch must hold one client's examples, got clients {sorted(clients)}")
    batch = {key: torch.stack([example[key] for _, example in items]) for key in items[0][1]}
    batch["client"] = torch.tensor(clients.pop())
    return batch


def collate_clients(items: list[tuple[int, Example]]) -> list[dict[str, Tensor]]:
    """Several clients' examples (each client's together): one ``collate`` batch per client."""
    groups: dict[int, list[tuple[int, Example]]] = {}
    for item in items:
        groups.setdefault(item[0], []).append(item)
    return [collate(group) for group in groups.values()]
