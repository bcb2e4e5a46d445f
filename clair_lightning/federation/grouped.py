"""Several clients' batches through the frozen base in one pass, each through its own adapter.

The clients' batches are concatenated; peft's LoRA layers compute only the base output, and a
forward hook adds client ``k``'s term ``dropout(x_k) A_kᵀ B_kᵀ · scaling`` to its own rows with
two ``bmm`` over ``x`` viewed as ``(K, rows·length, d_in)``. The factors are stacked from the
clients' own peft parameters, so each client's gradient lands on its adapter, and the adapters
stay peft's (save, load and aggregation see no difference). LoRA dropout, when set, draws one
mask over the group rather than one per client (same distribution, other draws).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from torch import Tensor

from .adapters import lora_layers
from .task import StepOutput, step_output, token_statistics


def _add_grouped_terms(layer, args, output: Tensor, adapters: Sequence[str]) -> Tensor:
    a = torch.stack([layer.lora_A[name].weight for name in adapters])  # (K, r, d_in)
    b = torch.stack([layer.lora_B[name].weight for name in adapters])  # (K, d_out, r)
    x = layer.lora_dropout[adapters[0]](args[0].to(a.dtype))
    groups = x.reshape(len(adapters), -1, x.shape[-1])
    delta = torch.bmm(torch.bmm(groups, a.mT), b.mT * layer.scaling[adapters[0]])
    return output + delta.reshape(output.shape).to(output.dtype)


@contextlib.contextmanager
def grouped_lora(model: PeftModel, adapters: Sequence[str]) -> Iterator[None]:
    """Inside, a forward of the concatenated batches of ``adapters`` (equal row counts, in that
    order) trains each adapter on its own rows; on exit ``adapters[0]`` is the active one.
    Backward belongs inside too: on exit only ``adapters[0]`` requires gradients, and gradient
    checkpointing re-runs the forward during backward."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        if len({layer.scaling[name] for name in adapters}) != 1:
            raise ValueError("grouped clients need one LoRA scaling (lora_alpha / rank)")
    handles = []
    try:
        for layer in layers:
            layer.set_adapter([])  # no active adapter: peft's forward returns the base output
            for name in adapters:
                layer.lora_A[name].weight.requires_grad_(True)
                layer.lora_B[name].weight.requires_grad_(True)
            hook = functools.partial(_add_grouped_terms, adapters=adapters)
            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.set_adapter(adapters[0])


def grouped_completion_steps(
    model: PeftModel, batches: Sequence[dict[str, Tensor]]
) -> list[StepOutput]:
    """``completion_step`` of each batch through its adapter, all in one forward pass (inside
    ``grouped_lora`` of the batches' adapters, in the same order).

    Batches shorter than the longest are right-padded (attention mask 0, label -100); under
    causal attention the padding changes nothing for the real positions, and each batch's
    statistics are taken on its own positions only.
    """
    counts = {len(batch["input_ids"]) for batch in batches}
    if len(counts) != 1:
        raise ValueError(f"grouped clients need equal batch sizes, got {sorted(counts)}")
    length = max(batch["input_ids"].shape[1] for batch in batches)

    def padded(batch: dict[str, Tensor], key: str, value: int) -> Tensor:
        tensor = batch[key] if key in batch else torch.ones_like(batch["input_ids"])
        return torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)

    logits = model(
        input_ids=torch.cat([padded(batch, "input_ids", 0) for batch in batches]),
        attention_mask=torch.cat([padded(batch, "attention_mask", 0) for batch in batches]),
    ).logits
    labels = torch.cat([padded(batch, "labels", -100) for batch in batches])
    # One pass over the group's logits, then each client's rows: slicing the logits per client
    # would make backward fill and add a zero gradient of all the logits once per client.
    rows = [len(batch["input_ids"]) for batch in batches]
    per_client = (part.split(rows) for part in token_statistics(logits, labels))
    return [step_output(*own) for own in zip(*per_client, strict=True)]
