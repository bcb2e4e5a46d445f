"""LoRA factors in Flower records, and the checks a reply must pass before it is aggregated.

An adapter travels as one ``ArrayRecord`` with keys ``<module>/B`` and ``<module>/A`` (LoRA
scaling folded into ``B``, as everywhere in this project). A reply that is an error, lacks a
record, names an unknown module, has the wrong shapes or non-finite values is refused with a
``MalformedReply`` whose text says what was wrong; the strategy leaves that client out.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, Message

from ..core import ClientUpdate

UPDATE = "update"
SENT_ADAPTER = "adapter"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
CONTAMINATED = "contaminated"
EVALUATION_METRICS = ("loss", "token_accuracy", "exact_match")

Shapes = dict[str, tuple[tuple[int, int], tuple[int, int]]]


class MalformedReply(ValueError):
    """A client's reply cannot be used; the message says why."""


def encode_update(update: ClientUpdate) -> ArrayRecord:
    """``{module: (B, A)}`` as an ``ArrayRecord`` (float32, contiguous CPU tensors)."""
    arrays = {}
    for module, (b, a) in update.items():
        arrays[f"{module}/B"] = b.detach().to("cpu", torch.float32).contiguous()
        arrays[f"{module}/A"] = a.detach().to("cpu", torch.float32).contiguous()
    return ArrayRecord(arrays)


def shapes_of(update: ClientUpdate) -> Shapes:
    return {m: (tuple(b.shape), tuple(a.shape)) for m, (b, a) in update.items()}


def decode_update(record: ArrayRecord, shapes: Shapes) -> ClientUpdate:
    """The factors in ``record``, checked against the adapter's modules and shapes."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key in record.keys():
        module, _, part = key.rpartition("/")
        if module not in shapes or part not in ("A", "B"):
            raise MalformedReply(f"unknown module {key!r}")
        try:
            tensors.setdefault(module, {})[part] = torch.from_numpy(record[key].numpy().copy())
        except (TypeError, ValueError) as error:
            raise MalformedReply(f"unreadable array {key!r}: {error}") from None
    update: ClientUpdate = {}
    for module, (b_shape, a_shape) in shapes.items():
        parts = tensors.get(module, {})
        if set(parts) != {"A", "B"}:
            raise MalformedReply(f"missing factors of module {module!r}")
        b, a = parts["B"].float(), parts["A"].float()
        if tuple(b.shape) != b_shape or tuple(a.shape) != a_shape:
            raise MalformedReply(
                f"module {module!r} has shapes B {tuple(b.shape)}, A {tuple(a.shape)}; "
                f"expected B {b_shape}, A {a_shape}"
            )
        if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
            raise MalformedReply(f"non-finite values in module {module!r}")
        update[module] = (b, a)
    return update


def reply_error(reply: Message) -> str | None:
    """Why a reply is an error message (``None`` when it carries content)."""
    if reply.has_error():
        error = reply.error
        return f"error reply (code {error.code}): {error.reason}"
    return None


def train_reply(reply: Message, shapes: Shapes, simulation: bool):
    """``(update, num_examples, contaminated)`` from a train reply, or ``MalformedReply``."""
    error = reply_error(reply)
    if error:
        raise MalformedReply(error)
    content = reply.content
    if UPDATE not in content.array_records:
        raise MalformedReply(f"no {UPDATE!r} record")
    if METRICS not in content.metric_records:
        raise MalformedReply(f"no {METRICS!r} record")
    metrics = content.metric_records[METRICS]
    examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(examples, int | float) or not math.isfinite(examples) or examples <= 0:
        raise MalformedReply(f"{NUM_EXAMPLES!r} must be a positive number, got {examples!r}")
    contaminated = None
    if simulation:
        if CONTAMINATED not in metrics:
            raise MalformedReply(f"no {CONTAMINATED!r} truth in a simulation reply")
        contaminated = bool(metrics[CONTAMINATED])
    return decode_update(content.array_records[UPDATE], shapes), examples, contaminated


def evaluate_reply(reply: Message) -> dict[str, float]:
    """The task metrics of an evaluate reply (at least ``EVALUATION_METRICS``), or
    ``MalformedReply``."""
    error = reply_error(reply)
    if error:
        raise MalformedReply(error)
    if METRICS not in reply.content.metric_records:
        raise MalformedReply(f"no {METRICS!r} record")
    metrics = reply.content.metric_records[METRICS]
    missing = [name for name in EVALUATION_METRICS if name not in metrics]
    if missing:
        raise MalformedReply(f"missing metrics {missing}")
    return {
        name: float(value)
        for name, value in metrics.items()
        if name != PARTITION_ID and isinstance(value, int | float)
    }
