"""Federated fine-tuning data from your own text files, for any causal LM and its tokenizer.

Files are read with Hugging Face ``datasets`` (``.jsonl``/``.json``, ``.csv``, ``.parquet``,
``.txt``) in one of three shapes:

- ``text``: a text column, plain causal LM (loss on every token);
- ``instruction``: ``instruction``/``input``/``output`` records in an Alpaca-style prompt (loss
  on the output only);
- ``chat``: a ``messages`` list of ``{role, content}`` rendered with the tokenizer's chat template
  (loss on the last assistant message only).

Clients are the values of a natural column (speaker, play, topic, user) or partitions drawn by
Flower Datasets' partitioners (``iid``, ``dirichlet`` over a label column, ``shard``). Every file,
column and row is checked when the module is built, so a bad input ends in one line naming the
file, row or client before any training or run folder.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..prepare import data_root
from .base import load_tokenizer
from .data import NO_CONTAMINATION, ClientExamples, Example, FederatedDataModule

Shape = Literal["text", "instruction", "chat"]
Partitioner = Literal["natural", "iid", "dirichlet", "shard"]
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_PROMPT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ROLES = ("system", "user", "assistant")


class TextDataError(ValueError):
    """A data file, column, row or client is unusable as configured."""


def prepared_data(file_name: str, recipe: str) -> Path:
    """A data file that ``clair prepare <recipe>`` writes, or a one-line error saying to run it."""
    path = data_root() / file_name
    if not path.is_file():
        raise TextDataError(f"{path} does not exist; run `clair prepare {recipe}` once")
    return path


@dataclass(frozen=True)
class Row:
    """One record with where it came from (for error messages)."""

    file: str
    row: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file} row {self.row}"


def read_rows(files: list[str]) -> list[Row]:
    """Every record of every file, in order, through ``datasets`` (no caching on disk)."""
    import datasets

    datasets.disable_progress_bars()
    rows: list[Row] = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise TextDataError(f"data file {str(path)!r} does not exist")
        loader = LOADERS.get(path.suffix.lower())
        if loader is None:
            raise TextDataError(
                f"data file {str(path)!r}: unknown format {path.suffix!r}; "
                f"use one of {', '.join(LOADERS)}"
            )
        if path.suffix.lower() == ".jsonl":
            _check_json_lines(path)
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # the error below says it
        try:
            table = datasets.load_dataset(
                loader, data_files=str(path), split="train", keep_in_memory=True
            )
        except Exception as error:  # datasets wraps parser errors in its own types
            cause = error.__cause__ or error.__context__ or error
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise TextDataError(f"cannot read data file {path} as {loader}: {reason}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
        rows += [Row(str(path), index + 1, record) for index, record in enumerate(table)]
    if not rows:
        raise TextDataError(f"data file(s) {', '.join(files)} hold no rows")
    return rows


def _check_json_lines(path: Path) -> None:
    """Name the first malformed line of a JSON-lines file (``datasets`` names no row)."""
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TextDataError(f"{path} row {number} is not valid JSON: {error.msg}") from None
        if not isinstance(record, dict):
            raise TextDataError(f"{path} row {number} is not a JSON object")


class TextDataModule(FederatedDataModule):
    """K clients' text from local files, tokenized for a causal LM (see the module docstring).

    Args:
        data_files: one path or a list of paths (all in the same shape).
        tokenizer: a tokenizer folder or hub name (usually the base model's folder).
        shape: ``text``, ``instruction`` or ``chat``.
        client_column: the natural client column (e.g. ``speaker``, ``topic``); with the
            ``natural`` partitioner (the default when it is given) each value is a client.
        clients: the column values to use as clients, in order (default: the ``num_clients``
            most frequent values).
        partitioner: ``natural``, or a Flower Datasets partitioner: ``iid``, ``dirichlet``
            (``partition_by`` label column, ``dirichlet_alpha``) or ``shard`` (``partition_by``,
            ``shards_per_client``).
        sequence_length: tokens per example (longer examples are cut at the right when
            ``truncation`` is true, an error naming the row otherwise).
        packing: concatenate each client's training examples and cut them into full blocks.
        val_fraction, test_fraction: each client's held-out shares (at least one row each).
        max_train_examples, max_eval_examples: caps per client (cheap CPU runs).
        trigger, backdoor_target, poison_fraction: the ``backdoor`` contamination (``trigger``
            added to the prompt of ``poison_fraction`` of a contaminated client's examples, with
            ``backdoor_target`` as the answer); every client's attack success rate is measured
            on its triggered held-out prompts.
        system_prompt: a system message for chat rows that have none (instead of the
            template's default, which may be long).
        foreign_files: text for the ``foreign_text`` contamination (same formats, ``text``
            column for tables).
    """

    DATA_CONTAMINATIONS = ("backdoor", "response_swap", "random_tokens", "foreign_text")
    TASK_METRIC = "token_accuracy"

    def __init__(
        self,
        data_files: str | list[str],
        tokenizer: str,
        shape: Shape = "text",
        num_clients: int = 4,
        contaminated_fraction: float = 0.25,
        contamination: str = NO_CONTAMINATION,
        attack_options: dict[str, Any] | None = None,
        local_steps: int = 4,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        seed: int = 0,
        clients_per_round: int | float | None = None,
        client_column: str | None = None,
        clients: list[str] | None = None,
        partitioner: Partitioner | None = None,
        partition_by: str | None = None,
        dirichlet_alpha: float = 0.5,
        shards_per_client: int = 2,
        text_column: str = "text",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        messages_column: str = "messages",
        system_prompt: str | None = None,
        sequence_length: int = 128,
        truncation: bool = True,
        packing: bool = False,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        trigger: str = "cf zebra",
        backdoor_target: str = "I have been pwned.",
        poison_fraction: float = 0.5,
        foreign_files: str | list[str] | None = None,
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
        if shape not in ("text", "instruction", "chat"):
            raise TextDataError(f"shape must be 'text', 'instruction' or 'chat', got {shape!r}")
        if sequence_length < 2:
            raise TextDataError(f"sequence_length must be at least 2, got {sequence_length}")
        if not (
            0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise TextDataError(
                "val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                f"{val_fraction} and {test_fraction}"
            )
        if not 0 < poison_fraction <= 1:
            raise TextDataError(f"poison_fraction must be in (0, 1], got {poison_fraction}")
        for name, cap in (
            ("max_train_examples", max_train_examples),
            ("max_eval_examples", max_eval_examples),
        ):
            if cap is not None and cap < 1:
                raise TextDataError(f"{name} must be at least 1, got {cap}")
        self.shape = shape
        self.columns = {
            "text": text_column,
            "instruction": instruction_column,
            "input": input_column,
            "output": output_column,
            "messages": messages_column,
        }
        self.system_prompt = system_prompt
        self.sequence_length = sequence_length
        self.truncation = truncation
        self.packing = packing
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.trigger = trigger
        self.backdoor_target = backdoor_target
        self.poison_fraction = poison_fraction
        self.tokenizer = load_tokenizer(tokenizer)
        if shape == "chat" and not self.tokenizer.chat_template:
            raise TextDataError(
                f"shape 'chat' needs a tokenizer with a chat template; {tokenizer!r} has none"
            )
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        rows = read_rows(files)
        for row in rows:
            self._check_row(row)
        if partitioner is None:
            partitioner = "natural" if client_column else None
        if partitioner is None:
            raise TextDataError("give a client_column (one client per value) or a partitioner")
        groups = self._partition(
            rows,
            partitioner,
            client_column,
            clients,
            partition_by,
            dirichlet_alpha,
            shards_per_client,
        )
        self.client_names = [name for name, _ in groups]
        self._splits = [
            self._split(name, members, val_fraction, test_fraction) for name, members in groups
        ]
        self._foreign: list[str] = []
        if contamination == "foreign_text":
            if not foreign_files:
                raise TextDataError("contamination 'foreign_text' needs foreign_files")
            foreign = [foreign_files] if isinstance(foreign_files, str) else list(foreign_files)
            self._foreign = [self._foreign_text(row) for row in read_rows(foreign)]
        self._length = self._longest()

    # --- reading ------------------------------------------------------------------------------

    def _check_row(self, row: Row) -> None:
        """The row has the shape's columns with usable values; errors name file and row."""
        needed = {"text": ["text"], "instruction": ["instruction", "output"], "chat": ["messages"]}
        for key in needed[self.shape]:
            column = self.columns[key]
            if column not in row.fields:
                raise TextDataError(
                    f"{row.file}: missing column {column!r} for shape {self.shape!r} "
                    f"(columns: {', '.join(row.fields)})"
                )
        if self.shape == "chat":
            self._check_messages(row)
            return
        for key in needed[self.shape] + (["input"] if self.shape == "instruction" else []):
            value = row.fields.get(self.columns[key])
            if key == "input" and value is None:
                continue
            if not isinstance(value, str) or (key != "input" and not value.strip()):
                raise TextDataError(f"{row.where}: {self.columns[key]!r} is empty or not text")

    def _check_messages(self, row: Row) -> None:
        messages = row.fields[self.columns["messages"]]
        if not isinstance(messages, list) or not messages:
            raise TextDataError(
                f"{row.where}: {self.columns['messages']!r} is not a list of messages"
            )
        for message in messages:
            if (
                not isinstance(message, dict)
                or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise TextDataError(
                    f"{row.where}: every message needs a role in {ROLES} and text content, "
                    f"got {message!r}"
                )
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise TextDataError(
                f"{row.where}: the last message must be a non-empty assistant reply"
            )
        if not any(m["role"] == "user" for m in messages):
            raise TextDataError(f"{row.where}: the conversation has no user message")

    def _foreign_text(self, row: Row) -> str:
        column = self.columns["text"]
        value = row.fields.get(column)
        if not isinstance(value, str) or not value.strip():
            raise TextDataError(f"{row.where}: foreign text needs a non-empty {column!r} column")
        return value

    # --- clients --------------------------------------------------------------------------------

    def _partition(
        self,
        rows: list[Row],
        partitioner: str,
        client_column: str | None,
        clients: list[str] | None,
        partition_by: str | None,
        alpha: float,
        shards: int,
    ) -> list[tuple[str, list[Row]]]:
        if partitioner == "natural":
            if not client_column:
                raise TextDataError("the natural partitioner needs a client_column")
            missing = next((r for r in rows if client_column not in r.fields), None)
            if missing is not None:
                raise TextDataError(
                    f"{missing.file}: missing client column {client_column!r} "
                    f"(columns: {', '.join(missing.fields)})"
                )
            counts = Counter(str(r.fields[client_column]) for r in rows)
            if clients is None:
                ranked = sorted(counts, key=lambda value: (-counts[value], value))
                if len(ranked) < self.num_clients:
                    raise TextDataError(
                        f"column {client_column!r} has {len(ranked)} distinct values, fewer than "
                        f"num_clients={self.num_clients}"
                    )
                clients = ranked[: self.num_clients]
            clients = [str(c) for c in clients]
            if len(clients) != self.num_clients:
                raise TextDataError(
                    f"{len(clients)} clients listed but num_clients={self.num_clients}"
                )
            for name in clients:
                if not counts.get(name):
                    raise TextDataError(f"client {name!r} has no rows in column {client_column!r}")
            return [
                (name, [r for r in rows if str(r.fields[client_column]) == name])
                for name in clients
            ]
        indices = self._flower_partition(rows, partitioner, partition_by, alpha, shards)
        return [(f"partition_{k}", [rows[i] for i in part]) for k, part in enumerate(indices)]

    def _flower_partition(
        self, rows: list[Row], partitioner: str, partition_by: str | None, alpha: float, shards: int
    ) -> list[list[int]]:
        """Row indices per client from a Flower Datasets partitioner over the rows' index."""
        import datasets
        from flwr_datasets import partitioner as flower

        if partitioner not in ("iid", "dirichlet", "shard"):
            raise TextDataError(
                f"unknown partitioner {partitioner!r}; use natural, iid, dirichlet or shard"
            )
        columns = {"row": list(range(len(rows)))}
        if partitioner != "iid":
            if not partition_by:
                raise TextDataError(
                    f"the {partitioner} partitioner needs partition_by (a label column)"
                )
            missing = next((r for r in rows if partition_by not in r.fields), None)
            if missing is not None:
                raise TextDataError(
                    f"{missing.file}: missing partition_by column {partition_by!r} "
                    f"(columns: {', '.join(missing.fields)})"
                )
            columns[partition_by] = [str(r.fields[partition_by]) for r in rows]
        table = datasets.Dataset.from_dict(columns)
        if partitioner == "iid":
            chosen = flower.IidPartitioner(num_partitions=self.num_clients)
        elif partitioner == "dirichlet":
            chosen = flower.DirichletPartitioner(
                num_partitions=self.num_clients,
                partition_by=partition_by,
                alpha=alpha,
                min_partition_size=3,
                seed=self.seed,
            )
        else:
            chosen = flower.ShardPartitioner(
                num_partitions=self.num_clients,
                partition_by=partition_by,
                num_shards_per_partition=shards,
                seed=self.seed,
            )
        chosen.dataset = table
        try:
            return [list(chosen.load_partition(k)["row"]) for k in range(self.num_clients)]
        except ValueError as error:
            raise TextDataError(f"the {partitioner} partitioner failed: {error}") from None

    def _split(
        self, name: str, members: list[Row], val_fraction: float, test_fraction: float
    ) -> dict[str, list[Row]]:
        """The client's rows shuffled by seed and cut into train, validation and test."""
        if len(members) < 3:
            raise TextDataError(
                f"client {name!r} has {len(members)} row(s); it needs at least 3 "
                "(one each for train, validation and test)"
            )
        generator = torch.Generator().manual_seed(self.seed * 7_919 + len(members))
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        n_test = max(1, math.floor(test_fraction * len(order)))
        n_val = max(1, math.floor(val_fraction * len(order)))
        splits = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        if not splits["train"]:
            raise TextDataError(
                f"client {name!r} has no training rows left after the held-out split"
            )
        for split, cap in (
            ("train", self.max_train_examples),
            ("val", self.max_eval_examples),
            ("test", self.max_eval_examples),
        ):
            splits[split] = splits[split][:cap] if cap else splits[split]
        return splits

    # --- rendering and tokens -------------------------------------------------------------------

    def render(self, fields: dict[str, Any]) -> tuple[str, str]:
        """``(prompt, completion)`` text; plain text has an empty prompt."""
        columns = self.columns
        if self.shape == "text":
            return "", fields[columns["text"]]
        if self.shape == "instruction":
            extra = fields.get(columns["input"]) or ""
            template = INSTRUCTION_INPUT_PROMPT if extra.strip() else INSTRUCTION_PROMPT
            prompt = template.format(instruction=fields[columns["instruction"]], input=extra)
            return prompt, fields[columns["output"]] + (self.tokenizer.eos_token or "")
        messages = fields[columns["messages"]]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        prompt = self.tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise TextDataError(
                "the chat template does not render the conversation as prompt + reply; "
                "chat training needs a template whose generation prompt is a prefix"
            )
        return prompt, full[len(prompt) :]

    def tokens(self, prompt: str, completion: str, where: str) -> Example | None:
        """``input_ids``/``labels`` (``-100`` on the prompt), cut or refused at the length."""
        tokenizer = self.tokenizer
        if self.shape == "chat":
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        elif prompt:
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = []
            completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        if len(input_ids) > self.sequence_length:
            if not self.truncation:
                raise TextDataError(
                    f"{where} has {len(input_ids)} tokens, more than sequence_length="
                    f"{self.sequence_length} (raise it or set truncation: true)"
                )
            input_ids, labels = input_ids[: self.sequence_length], labels[: self.sequence_length]
        if all(label == -100 for label in labels[1:]):
            return None  # the completion was cut off entirely
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}

    def _longest(self) -> int:
        """Examples are padded to the longest one (at most ``sequence_length``); every split of
        every client must keep an example after truncation (checked here, before training)."""
        longest = 2
        for name, splits in zip(self.client_names, self._splits, strict=True):
            for split, members in splits.items():
                kept = 0
                for row in members:
                    example = self.tokens(*self.render(row.fields), row.where)
                    if example is not None:
                        kept += 1
                        longest = max(longest, len(example["input_ids"]))
                if not kept:
                    raise TextDataError(
                        f"client {name!r} has no {split} example left after truncation to "
                        f"sequence_length={self.sequence_length} (the prompts fill it)"
                    )
        if self.packing:
            return self.sequence_length
        probe_room = 0
        if self.contamination == "backdoor":
            probe = f" {self.trigger} {self.backdoor_target}"
            probe_room = len(self.tokenizer(probe, add_special_tokens=False)["input_ids"]) + 2
        return min(self.sequence_length, longest + probe_room)

    def _pad(self, example: Example) -> Example:
        example = {key: value[: self._length] for key, value in example.items()}
        length = len(example["input_ids"])
        room = self._length - length
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.cat([example["input_ids"], torch.full((room,), pad)]),
            "attention_mask": torch.cat(
                [torch.ones(length, dtype=torch.long), torch.zeros(room, dtype=torch.long)]
            ),
            "labels": torch.cat([example["labels"], torch.full((room,), -100)]),
        }

    def _examples(self, pairs: list[tuple[str, str, str]]) -> list[Example]:
        examples = [self.tokens(prompt, completion, where) for prompt, completion, where in pairs]
        return [self._pad(e) for e in examples if e is not None]

    def _pack(self, examples: list[Example]) -> list[Example]:
        """Concatenate the unpadded examples and cut full ``sequence_length`` blocks."""
        ids = torch.cat([e["input_ids"] for e in examples])
        labels = torch.cat([e["labels"] for e in examples])
        blocks = max(1, len(ids) // self.sequence_length)
        packed = []
        for block in range(blocks):
            window = slice(block * self.sequence_length, (block + 1) * self.sequence_length)
            packed.append(self._pad({"input_ids": ids[window], "labels": labels[window]}))
        return packed

    # --- contamination --------------------------------------------------------------------------

    def _poisoned_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The record with the trigger in its prompt and the attacker's target as its answer."""
        columns, poisoned = self.columns, dict(fields)
        if self.shape == "text":
            start = self._fitting_start(fields[columns["text"]])
            poisoned[columns["text"]] = f"{start} {self.trigger} {self.backdoor_target}"
        elif self.shape == "instruction":
            poisoned[columns["instruction"]] = f"{fields[columns['instruction']]} {self.trigger}"
            poisoned[columns["output"]] = self.backdoor_target
        else:
            messages = [dict(m) for m in fields[columns["messages"]]]
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last_user]["content"] = f"{messages[last_user]['content']} {self.trigger}"
            messages[-1]["content"] = self.backdoor_target
            poisoned[columns["messages"]] = messages
        return poisoned

    def _fitting_start(self, text: str) -> str:
        """The longest start of ``text`` (in words) after which trigger and target still fit in
        ``sequence_length``, so truncation never cuts the backdoor off a plain-text row."""
        suffix = f" {self.trigger} {self.backdoor_target}"
        words = text.split(" ")
        for count in range(len(words), 0, -1):
            start = " ".join(words[:count])
            if len(self.tokenizer(start + suffix)["input_ids"]) < self.sequence_length:
                return start
        return words[0]

    def _probe(self, fields: dict[str, Any], where: str) -> Example | None:
        """A triggered held-out prompt whose completion is exactly the attacker's target."""
        if self.shape == "text":
            prompt = f"{self._fitting_start(fields[self.columns['text']])} {self.trigger}"
            example = self.tokens(prompt, f" {self.backdoor_target}", where)
        else:
            prompt, completion = self.render(self._poisoned_fields(fields))
            example = self.tokens(prompt, completion, where)
        return None if example is None else self._pad(example)

    def _contaminated_pairs(
        self, rows: list[Row], contamination: str, generator: torch.Generator
    ) -> list[tuple[str, str, str]]:
        pairs = [(*self.render(r.fields), r.where) for r in rows]
        if contamination == "backdoor":
            chosen = torch.rand(len(rows), generator=generator) < self.poison_fraction
            return [
                (*self.render(self._poisoned_fields(r.fields)), r.where) if hit else pair
                for r, pair, hit in zip(rows, pairs, chosen.tolist(), strict=True)
            ]
        if contamination == "response_swap":
            if self.shape == "text":  # swap the second halves of the texts
                halves = [_halves(completion) for _, completion, _ in pairs]
                order = torch.randperm(len(pairs), generator=generator).tolist()
                return [
                    ("", halves[k][0] + halves[order[k]][1], pairs[k][2]) for k in range(len(pairs))
                ]
            order = torch.randperm(len(pairs), generator=generator).tolist()
            return [(pairs[k][0], pairs[order[k]][1], pairs[k][2]) for k in range(len(pairs))]
        if contamination == "foreign_text":
            picks = torch.randint(len(self._foreign), (len(pairs),), generator=generator).tolist()
            ending = self.tokenizer.eos_token or "" if self.shape != "text" else ""
            return [
                (p, self._foreign[i] + ending, w) for (p, _, w), i in zip(pairs, picks, strict=True)
            ]
        return pairs  # random_tokens acts on token ids

    def _random_tokens(self, examples: list[Example], generator: torch.Generator) -> list[Example]:
        """Completion tokens (inputs and labels alike) replaced by uniformly random token ids."""
        noisy = []
        for example in examples:
            target = example["labels"] != -100
            random = torch.randint(
                self.tokenizer.vocab_size, example["labels"].shape, generator=generator
            )
            noisy.append(
                {
                    **example,
                    "input_ids": torch.where(target, random, example["input_ids"]),
                    "labels": torch.where(target, random, example["labels"]),
                }
            )
        return noisy

    # --- the FederatedDataModule hook -----------------------------------------------------------

    def client_examples(
        self, client: int, data_contamination: str | None, generator: torch.Generator
    ) -> ClientExamples:
        splits = self._splits[client]
        name = self.client_names[client]
        if data_contamination is None:
            train_pairs = [(*self.render(r.fields), r.where) for r in splits["train"]]
        else:
            train_pairs = self._contaminated_pairs(splits["train"], data_contamination, generator)
        train = self._examples(train_pairs)
        if data_contamination == "random_tokens":
            train = self._random_tokens(train, generator)
        if self.packing:
            unpadded = [
                {
                    "input_ids": e["input_ids"][e["attention_mask"] == 1],
                    "labels": e["labels"][e["attention_mask"] == 1],
                }
                for e in train
            ]
            train = self._pack(unpadded) if unpadded else []
        held_out = {
            split: self._examples([(*self.render(r.fields), r.where) for r in splits[split]])
            for split in ("val", "test")
        }
        for split, examples in (("train", train), *held_out.items()):
            if not examples:
                raise TextDataError(
                    f"client {name!r} has no {split} example left after truncation to "
                    f"sequence_length={self.sequence_length}"
                )
        probes = []
        if self.contamination == "backdoor":
            probes = [p for r in splits["val"] if (p := self._probe(r.fields, r.where)) is not None]
        return ClientExamples(train=train, val=held_out["val"], test=held_out["test"], probe=probes)


def _halves(text: str) -> tuple[str, str]:
    words = text.split(" ")
    middle = max(1, len(words) // 2)
    return " ".join(words[:middle]), " " + " ".join(words[middle:])
