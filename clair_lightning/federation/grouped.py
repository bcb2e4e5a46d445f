"""Several clients' batches through the frozen base in one pass, each through its own adapter.

The clients' batches are concatenated; peft's LoRA layers compute only the base output, and a
forward hook adds client ``k``'s term ``dropout(x_k) A_kᵀ B_kᵀ · scaling`` to its own rows with
two ``bmm`` over ``x`` viewed as ``(K, rows·length, d_in)``. The factors are stacked from the
clients' own peft parameters, so each client's gradient lands on its adapter, and the adapters
stay peft's (save, load and aggregation see no difference). LoRA dropout, when set, draws one
mask over the group rather than one per client (same distribution, other draws).

Packed (``pack_client_groups``), the group's sequences lose their padding: they share rows of
one to two times the longest length (``packed_rows``), position ids restart at each one
(transformers' masks then keep attention within a sequence), and each client's LoRA term is one
product over its own tokens. Packing
trusts the model to honour restarted position ids and needs right-padded rows; both are
checked (``check_packing``) before the first packed step, and refused in one line otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import Tensor

from .adapters import lora_layers
from .task import StepOutput, eval_mode, step_output, target_logits_only, token_statistics


@dataclass
class PackedTokens:
    """Which client each token of a packed group pass belongs to, for the LoRA hooks: ``order``
    lists the flattened tokens client by client, ``counts`` how many each client has."""

    order: Tensor | None = None
    counts: list[int] = field(default_factory=list)


def _add_grouped_terms(
    layer, args, output: Tensor, adapters: Sequence[str], packed: PackedTokens
) -> Tensor:
    a = torch.stack([layer.lora_A[name].weight for name in adapters])  # (K, r, d_in)
    b = torch.stack([layer.lora_B[name].weight for name in adapters]) * layer.scaling[adapters[0]]
    x = layer.lora_dropout[adapters[0]](args[0].to(a.dtype))
    if packed.order is None:  # equal contiguous blocks, one per client
        groups = x.reshape(len(adapters), -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(groups, a.mT), b.mT)
    else:  # sort the tokens by client, one product per client, and put them back
        own = x.reshape(-1, x.shape[-1])[packed.order].split(packed.counts)
        by_client = torch.cat(
            [x_k @ a_k.T @ b_k.T for x_k, a_k, b_k in zip(own, a, b, strict=True)]
        )
        delta = torch.empty_like(by_client).index_copy(0, packed.order, by_client)
    return output + delta.reshape(output.shape).to(output.dtype)


@contextlib.contextmanager
def grouped_lora(model: PeftModel, adapters: Sequence[str]) -> Iterator[PackedTokens]:
    """Inside, a forward of the concatenated batches of ``adapters`` (equal row counts, in that
    order) trains each adapter on its own rows; on exit ``adapters[0]`` is the active one.
    Backward belongs inside too: on exit only ``adapters[0]`` requires gradients, and gradient
    checkpointing re-runs the forward during backward. What it yields is filled in by
    ``grouped_completion_steps(..., packed=)`` when the sequences are packed."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        if len({layer.scaling[name] for name in adapters}) != 1:
            raise ValueError("grouped clients need one LoRA scaling (lora_alpha / rank)")
    packed = PackedTokens()
    handles = []
    try:
        for layer in layers:
            layer.set_adapter([])  # no active adapter: peft's forward returns the base output
            for name in adapters:
                layer.lora_A[name].weight.requires_grad_(True)
                layer.lora_B[name].weight.requires_grad_(True)
            hook = functools.partial(_add_grouped_terms, adapters=adapters, packed=packed)
            handles.append(layer.register_forward_hook(hook))
        yield packed
    finally:
        for handle in handles:
            handle.remove()
        model.set_adapter(adapters[0])


def grouped_completion_steps(
    model: PeftModel, batches: Sequence[dict[str, Tensor]], packed: PackedTokens | None = None
) -> list[StepOutput]:
    """``completion_step`` of each batch through its adapter, all in one forward pass (inside
    ``grouped_lora`` of the batches' adapters, in the same order).

    Batches shorter than the longest are right-padded (attention mask 0, label -100); under
    causal attention the padding changes nothing for the real positions, and each batch's
    statistics are taken on its own positions only. With ``packed`` (what ``grouped_lora``
    yields) the real tokens of every sequence are packed instead (``packed_rows``).
    """
    counts = {len(batch["input_ids"]) for batch in batches}
    if len(counts) != 1:
        raise ValueError(f"grouped clients need equal batch sizes, got {sorted(counts)}")
    length = max(batch["input_ids"].shape[1] for batch in batches)

    def padded(batch: dict[str, Tensor], key: str, value: int) -> Tensor:
        tensor = batch[key] if key in batch else torch.ones_like(batch["input_ids"])
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    input_ids = torch.cat([padded(batch, "input_ids", 0) for batch in batches])
    attention_mask = torch.cat([padded(batch, "attention_mask", 0) for batch in batches])
    labels = torch.cat([padded(batch, "labels", -100) for batch in batches])
    if packed is None:
        keep = target_logits_only(model, labels)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **keep)
        statistics = token_statistics(outputs.logits, labels)
    else:
        packed.counts = [0] * len(batches)
        rows_per_client = len(batches[0]["input_ids"])
        statistics = _packed_statistics(
            model, input_ids, attention_mask, labels, rows_per_client, packed
        )
    # One pass over the group's logits, then each client's rows: slicing the logits per client
    # would make backward fill and add a zero gradient of all the logits once per client.
    rows = [len(batch["input_ids"]) for batch in batches]
    per_client = (part.split(rows) for part in statistics)
    return [step_output(*own) for own in zip(*per_client, strict=True)]


NOT_RIGHT_PADDED = (
    "pack_client_groups: the batches are not right-padded (attention mask 1s then 0s in every "
    "row); pad on the right or set model.pack_client_groups false"
)
CHECK_TOKENS = 8  # of each of the two sequences the packing check runs


def _right_padded(mask: Tensor) -> bool:
    columns = torch.arange(mask.shape[1], device=mask.device)
    return torch.equal(mask.bool(), columns < mask.sum(1)[:, None])


@torch.no_grad()
def check_packing(model: PeftModel, batches: Sequence[dict[str, Tensor]]) -> bool:
    """Refuse packing, in one line, when the model would train on wrong gradients with it: the
    batches are not right-padded, or the model attends across packed sequences (it ignores the
    restarted position ids: a custom model or another attention implementation). Two short real
    sequences of the batches run packed into one row and separately, in eval mode (no dropout),
    and their logits must agree. False when the batches hold no two sequences of two tokens."""
    if not all(
        _right_padded(batch["attention_mask"]) for batch in batches if "attention_mask" in batch
    ):
        raise ValueError(NOT_RIGHT_PADDED)
    sequences = []
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        for ids, real in zip(batch["input_ids"], mask.sum(1).tolist(), strict=True):
            if real >= 2:
                sequences.append(ids[: min(real, CHECK_TOKENS)])
    if len(sequences) < 2:
        return False
    first, second = sequences[:2]
    with eval_mode(model):
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in (first, second)]
        positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])
        packed = model(
            input_ids=torch.cat([first, second])[None],
            position_ids=positions[None].to(first.device),
            use_cache=False,
        ).logits[0]
    base = model.get_base_model()
    exact = base.dtype == packed.dtype == torch.float32
    tolerance = 1e-3 if exact and not torch.is_autocast_enabled(first.device.type) else 5e-2
    expected = torch.cat(alone).float()
    difference = float((packed.float() - expected).abs().max())
    if difference > tolerance * (1 + float(expected.abs().max())):
        name = type(base).__name__
        raise ValueError(
            f"pack_client_groups: {name} attends across packed sequences (it ignores restarted "
            "position ids); set model.pack_client_groups false"
        )
    return True


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sequences (by index) into rows of at most ``capacity`` tokens, first fit by decreasing
    length: the group's rows hold little more than its real tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(capacity)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def packed_rows(lengths: Sequence[int], longest: int) -> tuple[list[list[int]], int]:
    """The packing (``pack_sequences``) and its row length, chosen between ``longest`` and twice
    it, in eighths, for the fewest token positions: in rows of exactly the longest length every
    sequence over half of it leaves the rest of its row empty (the SmolLM2 benchmark's 665
    tokens took 864 positions so, and take 672 in rows of 48)."""
    candidates = range(longest, 2 * longest + 1, max(1, longest // 8))
    row_length = min(candidates, key=lambda c: (len(pack_sequences(lengths, c)) * c, c))
    return pack_sequences(lengths, row_length), row_length


def _packed_statistics(
    model: PeftModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    rows_per_client: int,
    packed: PackedTokens,
) -> tuple[Tensor, Tensor, Tensor]:
    """``token_statistics`` of the padded group, computed on its sequences packed into rows
    (``packed_rows``); position ids restart at each sequence, which makes the model's
    attention block-diagonal (no sequence sees another), and the first token of each sequence
    is no target (unpacked, nothing predicts it)."""
    device = input_ids.device  # the layout is built on the CPU, element by element
    input_ids, attention_mask, labels = input_ids.cpu(), attention_mask.cpu(), labels.cpu()
    total_rows, length = input_ids.shape
    lengths = attention_mask.sum(1)
    if not _right_padded(attention_mask):
        raise ValueError(NOT_RIGHT_PADDED)
    layout, row_length = packed_rows(lengths.tolist(), length)
    packed_ids = torch.zeros(len(layout), row_length, dtype=input_ids.dtype)
    packed_labels = torch.full_like(packed_ids, -100)
    positions = torch.zeros_like(packed_ids)
    owner = torch.zeros_like(packed_ids)  # padding goes with client 0: no loss depends on it
    source = torch.full((total_rows, length - 1), -1)  # where each padded target went, shifted
    for row, sequences in enumerate(layout):
        offset = 0
        for sequence in sequences:
            n = int(lengths[sequence])
            packed_ids[row, offset : offset + n] = input_ids[sequence, :n]
            packed_labels[row, offset + 1 : offset + n] = labels[sequence, 1:n]
            positions[row, offset : offset + n] = torch.arange(n)
            owner[row, offset : offset + n] = sequence // rows_per_client
            targets = max(n - 1, 0)  # an empty row has none
            source[sequence, :targets] = row * (row_length - 1) + offset + torch.arange(targets)
            offset += n
        positions[row, offset:] = torch.arange(row_length - offset)  # padding: a segment of its own
    packed.order = torch.argsort(owner.flatten(), stable=True).to(device)
    packed.counts = torch.bincount(owner.flatten(), minlength=len(packed.counts)).tolist()
    packed_labels = packed_labels.to(device)
    logits = model(
        input_ids=packed_ids.to(device),
        position_ids=positions.to(device),
        use_cache=False,
        **target_logits_only(model, packed_labels),
    ).logits
    source = source.to(device)
    blank = source < 0
    return tuple(
        torch.where(blank, torch.zeros((), dtype=part.dtype), part.flatten()[source.clamp_min(0)])
        for part in token_statistics(logits, packed_labels)
    )
