"""Test helpers: read offline W&B run files, stop or pause a run at a round boundary."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import lightning.pytorch as pl
from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7  # checksum (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline ``run-<id>.wandb`` file (a LevelDB-style record log).

    wandb 0.31 ships no reader for offline runs, so the log's framing is decoded here and each
    record is parsed with wandb's own protobuf classes.
    """
    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file} is not a W&B run file")
    rows, position, pending = [], _HEADER, []
    while position + _HEADER <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _HEADER:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        if length == 0 and kind == 0:
            position += room
            continue
        payload = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind in (_FULL, _FIRST):
            pending = [payload]
        else:
            pending.append(payload)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pending))
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


class PauseAfterRound(pl.Callback):
    """When round ``rounds + 1`` starts, touch ``marker`` and wait to be killed or interrupted.

    By then round ``rounds`` is recorded and checkpointed, so a test can signal the process at
    a known point.
    """

    def __init__(self, rounds: int, marker: str):
        self.rounds = rounds
        self.marker = marker

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.rounds:
            Path(self.marker).touch()
            while True:
                time.sleep(0.05)


class InterruptAfterRound(pl.Callback):
    """Raise KeyboardInterrupt when round ``rounds + 1`` starts, as a user's Ctrl-C would."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.rounds:
            raise KeyboardInterrupt
