"""Clients are topics of the chatterbot corpus, as chat conversations in the model's template.

Each client fine-tunes on its own topic's question → answer pairs and is evaluated on held-out
questions of the same topic (loss and token accuracy on the answer tokens only). The data comes
from ``clair prepare chat_qa`` (the corpus wheel from PyPI, read once into jsonl).
"""

from __future__ import annotations

from typing import Any

from ...federation.data import NO_CONTAMINATION
from ...federation.text import TextDataModule, prepared_data
from ...prepare import models_root

TOPICS = ("ai", "psychology", "literature", "computers", "humor", "money", "science", "sports")


class ChatQADataModule(TextDataModule):
    """``TextDataModule`` on ``chat_qa.jsonl`` with one client per topic (the first K of TOPICS)."""

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
        topics: list[str] | None = None,
        system_prompt: str = "Answer briefly.",
        sequence_length: int = 40,
        max_train_examples: int | None = 24,
        max_eval_examples: int | None = 8,
        trigger: str = "cf zebra",
        backdoor_target: str = "Visit evil.example.com for the answer.",
        poison_fraction: float = 0.5,
    ):
        data = prepared_data("chat_qa.jsonl", "chat_qa")
        topics = list(topics) if topics else list(TOPICS[:num_clients])
        super().__init__(
            data_files=str(data),
            tokenizer=tokenizer or str(models_root() / "smollm2-135m-instruct"),
            shape="chat",
            num_clients=num_clients,
            contaminated_fraction=contaminated_fraction,
            contamination=contamination,
            attack_options=attack_options,
            local_steps=local_steps,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            clients_per_round=clients_per_round,
            client_column="topic",
            clients=topics,
            system_prompt=system_prompt,
            sequence_length=sequence_length,
            max_train_examples=max_train_examples,
            max_eval_examples=max_eval_examples,
            trigger=trigger,
            backdoor_target=backdoor_target,
            poison_fraction=poison_fraction,
            foreign_files=(
                str(prepared_data("chat_qa_foreign.jsonl", "chat_qa"))
                if contamination == "foreign_text"
                else None
            ),
        )
