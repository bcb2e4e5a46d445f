"""Log one round's detection metrics, benign means and per-client table through the loggers.

Everything is logged with ``step = round`` so W&B and CSV axes follow rounds. W&B also gets a
``clients`` table (client, score, flag, truth, task metrics) each round.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from ..metrics import METRIC_NAMES

TABLE_COLUMNS = [
    "client",
    "score",
    "flag",
    "contaminated",
    "exact_match",
    "token_accuracy",
    "loss",
    "truncation_error",
]


def log_round(trainer: pl.Trainer, record: dict) -> None:
    """Send a finished round record (see ``FederatedAggregation``) to every logger."""
    step = record["round"]
    scalars: dict[str, float] = {"round": float(step)}
    for name in METRIC_NAMES:
        value = record["detection"].get(name)
        if value is not None:
            scalars[f"detection/{name}"] = float(value)
    for name, value in record["benign_mean"].items():
        if value is not None and math.isfinite(value):
            scalars[f"benign/{name}"] = float(value)
    if record.get("aggregation_seconds") is not None:
        scalars["aggregation/seconds"] = float(record["aggregation_seconds"])
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key="clients",
                columns=TABLE_COLUMNS,
                data=[_row(client) for client in record["clients"]],
                step=step,
            )


def _row(client: dict) -> list:
    metrics = client["metrics"]
    score = client["score"]
    return [
        client["client"],
        None if score is None or not math.isfinite(score) else score,
        client["flag"],
        client["contaminated"],
        metrics.get("exact_match"),
        metrics.get("token_accuracy"),
        metrics.get("loss"),
        client.get("truncation_error"),
    ]
