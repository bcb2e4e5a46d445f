"""Detection metrics for flagged clients, from torchmetrics (positive class = contaminated).

Precision, recall and F1 use the boolean flags; AUROC and average precision use the raw scores.
Metrics that are undefined for a round (no contaminated client, or no benign one) are ``None``,
so a round without contamination reports its false-positive rate alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

METRIC_NAMES = ("precision", "recall", "f1", "auroc", "average_precision", "fpr")


def detection_metrics(
    flags: Sequence[bool], scores: Sequence[float] | None, truth: Sequence[bool]
) -> dict[str, float | int | None]:
    """Operating-point and threshold-free detection metrics for one round."""
    if not len(flags) == len(truth) or (scores is not None and len(scores) != len(truth)):
        raise ValueError(
            f"flags ({len(flags)}), scores ({None if scores is None else len(scores)}) and "
            f"truth ({len(truth)}) must have one entry per client"
        )
    predicted = torch.tensor([bool(f) for f in flags], dtype=torch.long)
    target = torch.tensor([bool(t) for t in truth], dtype=torch.long)
    positives, negatives = int(target.sum()), int((1 - target).sum())
    false_positives = int(((predicted == 1) & (target == 0)).sum())
    metrics: dict[str, float | int | None] = {
        "true_positives": int(((predicted == 1) & (target == 1)).sum()),
        "false_positives": false_positives,
        "false_negatives": int(((predicted == 0) & (target == 1)).sum()),
        "true_negatives": int(((predicted == 0) & (target == 0)).sum()),
        "fpr": false_positives / negatives if negatives else None,
        "precision": None,
        "recall": None,
        "f1": None,
        "auroc": None,
        "average_precision": None,
    }
    if positives:
        metrics["precision"] = float(binary_precision(predicted, target, zero_division=0))
        metrics["recall"] = float(binary_recall(predicted, target))
        metrics["f1"] = float(binary_f1_score(predicted, target, zero_division=0))
    if positives and negatives and scores is not None:
        ranked = unit_interval_scores(scores)
        metrics["auroc"] = float(binary_auroc(ranked, target))
        metrics["average_precision"] = float(binary_average_precision(ranked, target))
    return metrics


def unit_interval_scores(scores: Sequence[float | str]) -> torch.Tensor:
    """Monotone map of scores into [0, 1] (``inf`` → 1), so torchmetrics neither applies a
    sigmoid nor saturates distinct large scores into ties."""
    values = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    finite = values[torch.isfinite(values)]
    low = float(finite.min()) if finite.numel() else 0.0
    high = float(finite.max()) if finite.numel() else 1.0
    span = high - low if high > low else 1.0
    mapped = ((values - low) / span * 0.999).clamp(0.0, 0.999)
    return torch.where(values == float("inf"), torch.ones_like(values), mapped).float()
