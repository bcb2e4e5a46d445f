"""Loss and metrics of a prompt → completion task on a causal LM, shared by every module.

Labels are ``-100`` on prompt positions. Teacher-forced argmax predictions that match every
target token are exactly what greedy decoding would produce, so exact match needs no decoding.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StepOutput:
    """Summed statistics of one batch (sums, so clients can be accumulated exactly)."""

    loss: Tensor
    loss_sum: Tensor
    target_tokens: Tensor
    correct_tokens: Tensor
    exact_sequences: Tensor
    sequences: Tensor


def completion_step(model: torch.nn.Module, batch: dict[str, Tensor]) -> StepOutput:
    """Forward a batch, return its mean loss (for backward) and summed statistics."""
    labels = batch["labels"]
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        **target_logits_only(model, labels),
    )
    return step_output(*token_statistics(outputs.logits, labels))


def predicts_target(labels: Tensor) -> Tensor:
    """The positions whose next token is a target, as ``logits_to_keep`` for the model: the LM
    head and its vocabulary-wide logits are computed there only (SmolLM2's 49152 words made the
    head and the log-softmax of every prompt and padding position a fifth of a training step)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def target_logits_only(model: torch.nn.Module, labels: Tensor) -> dict[str, Tensor]:
    """``logits_to_keep=predicts_target(labels)`` for a model that honours a boolean mask there
    (transformers' causal LMs of recent 5.x releases), else no option: the model's logits at
    every position then serve the same statistics, only slower."""
    return {"logits_to_keep": predicts_target(labels)} if keeps_target_logits(model) else {}


_KEEPS_TARGET_LOGITS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def keeps_target_logits(model: torch.nn.Module) -> bool:
    """Whether the model returns logits at the True positions of a boolean ``logits_to_keep``
    only; probed once per model on a two-token sequence in eval mode (no dropout, so no random
    numbers are drawn). Older transformers, custom models and models without the option fail
    the probe or ignore it."""
    if model not in _KEEPS_TARGET_LOGITS:
        device = next(model.parameters()).device
        try:
            with eval_mode(model):
                logits = model(
                    input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                    logits_to_keep=torch.tensor([[True, False]], device=device),
                ).logits
            _KEEPS_TARGET_LOGITS[model] = tuple(logits.shape[:-1]) == (1,)
        except (TypeError, ValueError, IndexError, RuntimeError):
            _KEEPS_TARGET_LOGITS[model] = False
    return _KEEPS_TARGET_LOGITS[model]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for a probe, every submodule's mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def token_statistics(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each position's next-token loss, whether it is a target, and whether its argmax is right,
    from the logits at the targets only (``target_logits_only``: one row per target in
    row-major order) or at every position; rows stay apart, so several clients' rows can be
    split after one pass over the vocabulary."""
    mask = labels[:, 1:] != -100
    targets = labels[:, 1:][mask]
    if logits.dim() == 3 and logits.shape[:2] == labels.shape:
        logits = logits[:, :-1][mask]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"expected logits at the {len(targets)} target positions or at all "
            f"{tuple(labels.shape)} positions, got shape {tuple(logits.shape)}"
        )
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    token_losses = losses.new_zeros(mask.shape).masked_scatter(mask, losses)
    correct = torch.zeros_like(mask).masked_scatter(mask, logits.argmax(-1) == targets)
    return token_losses, mask, correct


def step_output(token_losses: Tensor, mask: Tensor, correct: Tensor) -> StepOutput:
    """A batch's mean loss and summed statistics from its rows of ``token_statistics``."""
    loss_sum = (token_losses * mask).sum()
    target_tokens = mask.sum()
    exact = (correct | ~mask).all(dim=1)
    return StepOutput(
        loss=loss_sum / target_tokens.clamp_min(1),
        loss_sum=loss_sum.detach(),
        target_tokens=target_tokens,
        correct_tokens=correct.sum(),
        exact_sequences=exact.sum(),
        sequences=torch.tensor(mask.shape[0], device=mask.device),
    )


class ClientMetrics:
    """Per-client running sums over an evaluation pass: loss, token accuracy, exact match."""

    NAMES = ("loss", "perplexity", "token_accuracy", "exact_match")

    def __init__(self, num_clients: int):
        self.sums = torch.zeros(num_clients, 5, dtype=torch.float64)

    def update(self, client: int, output: StepOutput) -> None:
        self.sums[client] += torch.tensor(
            [
                float(output.loss_sum),
                float(output.target_tokens),
                float(output.correct_tokens),
                float(output.exact_sequences),
                float(output.sequences),
            ],
            dtype=torch.float64,
        )

    def compute(self) -> list[dict[str, float]]:
        """One dict per client; clients without data get NaN."""
        loss_sum, tokens, correct, exact, sequences = self.sums.unbind(1)
        nan = float("nan")
        return [
            {
                "loss": float(loss_sum[k] / tokens[k]) if tokens[k] else nan,
                "perplexity": math.exp(min(float(loss_sum[k] / tokens[k]), 700))
                if tokens[k]
                else nan,
                "token_accuracy": float(correct[k] / tokens[k]) if tokens[k] else nan,
                "exact_match": float(exact[k] / sequences[k]) if sequences[k] else nan,
            }
            for k in range(self.sums.shape[0])
        ]

    def seen(self) -> list[bool]:
        """Which clients had at least one example in this pass."""
        return [bool(n) for n in self.sums[:, 4]]
