"""Log one round's detection metrics, benign means and per-client table through the loggers.

Everything is logged with ``step = round`` so W&B and CSV axes follow rounds. W&B also gets a
``clients`` table (client, score, flag, truth, task metrics) each round.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from ..rounds import TABLE_COLUMNS, client_rows, round_scalars


def log_round(trainer: pl.Trainer, record: dict) -> None:
    """Send a finished round record (see ``FederatedAggregation``) to every logger."""
    step = record["round"]
    scalars = round_scalars(record)
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
        if isinstance(logger, WandbLogger):
            logger.log_table(
                key="clients", columns=TABLE_COLUMNS, data=client_rows(record), step=step
            )


def log_evaluation(trainer: pl.Trainer, split: str, benign_mean: dict, step: int) -> None:
    """Benign means of a ``validate``/``test`` evaluation, as ``<split>/benign/<metric>``."""
    scalars = {
        f"{split}/benign/{name}": float(value)
        for name, value in benign_mean.items()
        if value is not None and math.isfinite(value)
    }
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
