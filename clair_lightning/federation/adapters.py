"""LoRA factors between a peft model holding one adapter per client and CLAIR's updates.

A client's update maps each LoRA module (its path in the base model) to ``(B, A)`` with the
LoRA scaling folded into ``B``, so ``ΔW = B @ A`` is exactly what the adapter adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ..core import ClientUpdate, LoraFactors, Refactorized, RefinedUpdates
from ..core.result import at_rank

_PREFIX = "base_model.model."


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """Every LoRA layer by its module path in the base model (without peft's prefix)."""
    return {
        name.removeprefix(_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def read_update(model: PeftModel, adapter: str) -> ClientUpdate:
    """The adapter's factors with the scaling folded into ``B`` (detached float copies)."""
    update: ClientUpdate = {}
    for name, layer in lora_layers(model).items():
        b = layer.lora_B[adapter].weight.detach() * layer.scaling[adapter]
        a = layer.lora_A[adapter].weight.detach()
        update[name] = (b.float().clone(), a.float().clone())
    return update


@torch.no_grad()
def write_update(
    model: PeftModel, adapter: str, update: ClientUpdate, generator: torch.Generator
) -> dict[str, float]:
    """Write an exact update into the adapter at its own rank; return each module's truncation
    (see ``fit_to_adapter``)."""
    errors = {}
    for name, layer in lora_layers(model).items():
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scaling = layer.scaling[adapter]
        b, a = update[name]
        fitted = fit_to_adapter(b, a, lora_b.float() * scaling, lora_a.float(), generator)
        if fitted is None:
            errors[name] = 0.0
            continue
        new_b, new_a, errors[name] = fitted
        lora_b.copy_((new_b / scaling).to(lora_b.dtype))
        lora_a.copy_(new_a.to(lora_a.dtype))
    return errors


@torch.no_grad()
def fit_to_adapter(
    b: torch.Tensor,
    a: torch.Tensor,
    old_b: torch.Tensor,
    old_a: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The factors at the adapter's rank that stand for ``b @ a`` over an adapter holding
    ``(old_b, old_a)`` (scaling folded into ``B``), and the relative truncation error; ``None``
    when the product is unchanged.

    Factors already at the adapter's rank are kept as given (factor-level rules such as
    FedIT need one basis across clients). Others are re-factorised to the adapter's rank (best
    rank-r approximation), then rotated onto the adapter's current factors so the optimizer's
    per-coordinate state keeps matching the parameters (re-factorising without the rotation
    cost 0.08 exact match on the text-copying recipe). Directions of zero singular value would
    be dead under LoRA's gradients (both factors zero), so their ``A`` rows are re-drawn as peft
    initialises them while ``B`` stays zero.
    """
    b, a = b.to(torch.float32), a.to(torch.float32)
    if _same_product(b, a, old_b, old_a):
        return None
    new_b, new_a, error = _fit(at_rank(b, a, old_a.shape[0]), old_b)
    dead = new_b.abs().sum(0) == 0
    if bool(dead.any()):
        new_a = new_a.clone()
        new_a[dead] = _fresh_rows(int(dead.sum()), old_a.shape[1], generator)
    return new_b, new_a, error


@torch.no_grad()
def fit_refined(
    refined: RefinedUpdates,
    uploads: Sequence[ClientUpdate],
    current: Callable[[int, str], LoraFactors],
    write: Callable[[int, str, torch.Tensor, torch.Tensor], None],
    generator: torch.Generator,
) -> dict[int, dict[str, float]]:
    """``fit_to_adapter`` for every client and module, streaming ``refined.at_rank``.

    The aggregator shares the re-factorisation work across clients (CLAIR computes each
    module's common part once), and only one module's factors are alive at a time.
    ``current(client, module)`` is the adapter's ``(B, A)`` (scaling folded into ``B``);
    ``write(client, module, B, A)`` stores new factors. A module whose refined factors are the
    client's upload itself is left alone (a flagged client keeping its own adapter); so is one
    whose product is unchanged. Dead directions are re-drawn (``write`` is called again) after
    all modules, client by client in the upload's module order, so the draws are those of
    ``fit_to_adapter`` called client by client. Returns, per client with a module considered,
    each module's truncation error.
    """
    ranks = {name: current(0, name)[1].shape[0] for name in uploads[0]}
    errors: dict[int, dict[str, float]] = {}
    dead: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, received in refined.at_rank(ranks):
        for client, factors in enumerate(received):
            upload_b, upload_a = uploads[client][name]
            if isinstance(factors, tuple) and factors[0] is upload_b and factors[1] is upload_a:
                continue
            old_b, old_a = current(client, name)
            if old_a.shape[0] != ranks[name]:
                raise ValueError(f"module {name!r}: the adapters have different LoRA ranks")
            new_b, new_a, errors.setdefault(client, {})[name] = _fit(factors, old_b)
            if _same_product(new_b, new_a, old_b, old_a):
                continue
            write(client, name, new_b, new_a)
            columns = new_b.abs().sum(0) == 0
            if bool(columns.any()):
                dead[client, name] = (new_b, new_a, columns)
    for client in range(len(uploads)):
        for name in uploads[client]:
            if (client, name) in dead:
                new_b, new_a, columns = dead[client, name]
                new_a = new_a.clone()
                new_a[columns] = _fresh_rows(int(columns.sum()), new_a.shape[1], generator)
                write(client, name, new_b, new_a)
    return errors


@torch.no_grad()
def write_refined(
    model: PeftModel,
    adapters: Sequence[str],
    refined: RefinedUpdates,
    uploads: Sequence[ClientUpdate],
    generator: torch.Generator,
) -> dict[int, dict[str, float]]:
    """``fit_refined`` into the model's adapters (``adapters[k]`` holds client ``k``)."""
    layers = lora_layers(model)

    def current(client: int, module: str) -> LoraFactors:
        layer, adapter = layers[module], adapters[client]
        b = layer.lora_B[adapter].weight.float() * layer.scaling[adapter]
        return b, layer.lora_A[adapter].weight.float()

    def write(client: int, module: str, b: torch.Tensor, a: torch.Tensor) -> None:
        layer, adapter = layers[module], adapters[client]
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        lora_b.copy_((b / layer.scaling[adapter]).to(lora_b.dtype))
        lora_a.copy_(a.to(lora_a.dtype))

    return fit_refined(refined, uploads, current, write, generator)


def _fit(factors: LoraFactors | Refactorized, old_b: torch.Tensor):
    """Rank-r factors to store: ``Refactorized`` ones rotated onto the adapter's ``B``, a pair
    already at the rank as given (float32), with the truncation error."""
    if isinstance(factors, Refactorized):
        b, a = factors.b.to(torch.float32), factors.a.to(torch.float32)
        return (*align_factors(b, a, old_b), factors.relative_error)
    b, a = factors
    return b.to(torch.float32), a.to(torch.float32), 0.0


def _fresh_rows(count: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``A`` rows drawn as peft initialises them, for directions whose ``B`` column is zero."""
    bound = 1.0 / width**0.5
    return (torch.rand(count, width, generator=generator) * 2 - 1) * bound


@torch.no_grad()
def set_factors(model: PeftModel, adapter: str, update: ClientUpdate) -> None:
    """Store factors already at the adapter's rank exactly as given (scaling folded into B)."""
    for name, layer in lora_layers(model).items():
        b, a = update[name]
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        lora_b.copy_((b / layer.scaling[adapter]).to(lora_b.dtype))
        lora_a.copy_(a.to(lora_a.dtype))


def _same_product(
    b: torch.Tensor,
    a: torch.Tensor,
    old_b: torch.Tensor,
    old_a: torch.Tensor,
    tolerance: float = 1e-6,
) -> bool:
    """Whether ``b @ a`` equals ``old_b @ old_a`` (relative Frobenius), from factors alone.

    Float64: the Gram form subtracts squared norms, which cancels badly in float32.
    """
    b, a, old_b, old_a = (x.double() for x in (b, a, old_b, old_a))
    stacked_b = torch.cat([b, -old_b], dim=1)
    stacked_a = torch.cat([a, old_a], dim=0)
    difference = ((stacked_b.T @ stacked_b) * (stacked_a @ stacked_a.T)).sum().clamp_min(0)
    reference = ((old_b.T @ old_b) * (old_a @ old_a.T)).sum().clamp_min(1e-30)
    return float(difference.sqrt()) <= tolerance * float(reference.sqrt())


def align_factors(b: torch.Tensor, a: torch.Tensor, reference_b: torch.Tensor):
    """Re-express ``b @ a`` as ``(b R)(Rᵀ a)`` with the rotation ``R`` that brings ``b R``
    closest to ``reference_b`` (orthogonal Procrustes): the product and the balance of the
    factors are unchanged, and the columns keep their meaning for the optimizer's state."""
    u, _, vh = torch.linalg.svd(b.T @ reference_b)
    rotation = u @ vh
    return b @ rotation, rotation.T @ a


@torch.no_grad()
def copy_adapter(model: PeftModel, source: str, target: str) -> None:
    """Make ``target``'s weights equal to ``source``'s (clients start from one initial adapter)."""
    for layer in lora_layers(model).values():
        layer.lora_A[target].weight.copy_(layer.lora_A[source].weight)
        layer.lora_B[target].weight.copy_(layer.lora_B[source].weight)
