"""The round checkpoint: ``last.ckpt`` rewritten atomically at the end of every round.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when
``fit`` ends (Lightning 2.6), so an interrupted run had nothing to resume from. This callback
saves after every round, once the round is recorded (checkpoint callbacks run last), into a
temporary file that is flushed to disk and then renamed over ``last.ckpt``: a kill at any
moment leaves the previous round's checkpoint intact.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint


class RoundCheckpoint(Checkpoint):
    """Write ``dirpath/last.ckpt`` atomically after every finished round."""

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.saved_round = 0

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_round = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_atomically(trainer, self.path)
        self.saved_round = trainer.current_epoch + 1

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt):
            saved = f"round {self.saved_round} is saved in {self.path}; resume: --ckpt_path last"
            if not self.saved_round:
                saved = "no round finished, nothing to resume"
            where = f"round {trainer.current_epoch + 1}"
            print(f"clair: interrupted in {where}; {saved}", file=sys.stderr)


def save_atomically(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` into a temporary file, fsync, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        trainer.save_checkpoint(temporary, weights_only=False)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)
