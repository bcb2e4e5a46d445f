"""Client tasks of the text-copying recipe and their data-level contaminations.

Every benign client copies through a cipher: the shared part swaps ``shared_pairs`` pairs of
tokens (all benign clients agree); the client-specific part rewrites one private input token
(different for each client) into one of the shared output tokens. So benign clients share the
output side of their update (a shared column space) and differ in which inputs they rewrite
(client-specific coefficients): one global model is wrong on every client's private token.
Contaminated clients train on random, shuffled or reversed targets, or noisy labels; every
client is evaluated on clean held-out data of its own task.
"""

from __future__ import annotations

from typing import Any

import torch

from ...federation.data import NO_CONTAMINATION, ClientExamples, FederatedDataModule
from .model import completion_tensors
from .vocabulary import content_token, vocabulary_size


class TextCopyDataModule(FederatedDataModule):
    """K clients with cipher-copy tasks, ``contaminated_fraction`` of them contaminated."""

    DATA_CONTAMINATIONS = ("random_targets", "shuffled_targets", "reversed_targets", "label_noise")

    def __init__(
        self,
        num_clients: int = 10,
        contaminated_fraction: float = 0.3,
        contamination: str = NO_CONTAMINATION,
        attack_options: dict[str, Any] | None = None,
        local_steps: int = 10,
        batch_size: int = 16,
        eval_batch_size: int = 128,
        seed: int = 0,
        clients_per_round: int | float | None = None,
        content_tokens: int = 24,
        sequence_length: int = 8,
        output_tokens: int = 6,
        shared_pairs: int = 0,
        private_rewrites: int = 3,
        train_examples: int = 64,
        val_examples: int = 128,
        test_examples: int = 256,
        label_noise: float = 0.5,
        benign_label_noise: float = 0.0,
    ):
        super().__init__(
            num_clients,
            contaminated_fraction,
            contamination,
            attack_options,
            local_steps,
            batch_size,
            eval_batch_size,
            seed,
            clients_per_round,
        )
        if not 1 <= output_tokens < content_tokens:
            raise ValueError(f"output_tokens must be in [1, content_tokens={content_tokens})")
        if not 0 <= 2 * shared_pairs <= output_tokens:
            raise ValueError(f"shared_pairs={shared_pairs} needs 2 * shared_pairs <= output_tokens")
        if not 0 <= private_rewrites <= content_tokens - output_tokens:
            raise ValueError(
                f"private_rewrites must be in [0, {content_tokens - output_tokens}] "
                f"(content_tokens - output_tokens), got {private_rewrites}"
            )
        if not 0 < label_noise <= 1:
            raise ValueError(f"label_noise must be in (0, 1], got {label_noise}")
        if not 0 <= benign_label_noise < label_noise:
            raise ValueError(
                f"benign_label_noise must be in [0, label_noise={label_noise}), "
                f"got {benign_label_noise}"
            )
        for name, value in (
            ("train_examples", train_examples),
            ("val_examples", val_examples),
            ("test_examples", test_examples),
            ("sequence_length", sequence_length),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.content_tokens = content_tokens
        self.sequence_length = sequence_length
        self.output_tokens = output_tokens
        self.shared_pairs = shared_pairs
        self.private_rewrites = private_rewrites
        self.sizes = {"train": train_examples, "val": val_examples, "test": test_examples}
        self.label_noise = label_noise
        self.benign_label_noise = benign_label_noise

    def client_mapping(self, client: int) -> torch.Tensor:
        """Content index → content index: shared swaps inside the output set, plus the client's
        own rewrites of ``private_rewrites`` input tokens into the output set."""
        mapping = torch.arange(self.content_tokens)
        for pair in range(self.shared_pairs):
            mapping[2 * pair], mapping[2 * pair + 1] = 2 * pair + 1, 2 * pair
        generator = torch.Generator().manual_seed(1_000 + client)
        inputs = (
            self.output_tokens
            + torch.randperm(self.content_tokens - self.output_tokens, generator=generator)[
                : self.private_rewrites
            ]
        )
        mapping[inputs] = torch.randint(
            self.output_tokens, (self.private_rewrites,), generator=generator
        )
        return mapping

    def client_examples(
        self, client: int, data_contamination: str | None, generator: torch.Generator
    ) -> ClientExamples:
        mapping = self.client_mapping(client)
        splits = {}
        for split, size in self.sizes.items():
            x = torch.randint(
                self.content_tokens, (size, self.sequence_length), generator=generator
            )
            y = mapping[x]
            if split == "train" and data_contamination is not None:
                y = self._contaminate(data_contamination, y, generator)
            elif split == "train" and self.benign_label_noise > 0:
                y = self._noisy(y, self.benign_label_noise, generator)
            tensors = completion_tensors(content_token(x), content_token(y))
            splits[split] = [{key: value[i] for key, value in tensors.items()} for i in range(size)]
        return ClientExamples(**splits)

    def _contaminate(
        self, contamination: str, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        if contamination == "random_targets":
            return torch.randint(self.content_tokens, y.shape, generator=generator)
        if contamination == "shuffled_targets":
            return y[torch.randperm(y.shape[0], generator=generator)]
        if contamination == "reversed_targets":
            return y.flip(1)
        return self._noisy(y, self.label_noise, generator)

    def _noisy(self, y: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
        """Replace each target token by a random one with probability ``rate``."""
        noisy = torch.rand(y.shape, generator=generator) < rate
        random = torch.randint(self.content_tokens, y.shape, generator=generator)
        return torch.where(noisy, random, y)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        model = getattr(self.trainer, "lightning_module", None) if self.trainer else None
        embeddings = getattr(getattr(model, "model", None), "get_input_embeddings", None)
        needed = vocabulary_size(self.content_tokens)
        if embeddings is not None and embeddings().num_embeddings < needed:
            raise ValueError(
                f"the base model has {embeddings().num_embeddings} token embeddings but the data "
                f"uses {needed}; give the base and the data the same content_tokens"
            )
