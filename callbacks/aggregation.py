"""The round-boundary callback: aggregate every client's LoRA adapter and write refinements back.

At the last training batch of an aggregation round it reads each client's factors, applies the
data module's update-level contamination to contaminated uploads, runs the configured
aggregator (``clair`` or any engine baseline), and writes each refined update into the client's
adapter at the adapter's rank. Validation then evaluates the refined adapters; at the epoch's
end the round is recorded (flags, scores, truth, detection metrics, per-client task metrics),
logged, printed as one console line, and written to ``summary.json``. The history, the RNG
state and the list of sessions (one per process that trained, so a resumed run shows which
rounds each process trained) live in ``state_dict()``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ..core.aggregators import NEEDS_TRUTH, aggregate
from ..federation.adapters import read_update, write_refined
from ..federation.data import FederatedDataModule
from ..federation.module import FederatedLoRAModule, adapter_name
from ..jsonio import write_json
from ..rounds import (
    SUMMARY,
    aggregate_round,
    benign_mean,
    by_client,
    check_aggregation,
    round_record,
    run_summary,
    with_benign_mean,
)
from .console import evaluation_line, round_line
from .detection_metrics import log_evaluation, log_round


class FederatedAggregation(pl.Callback):
    """Aggregate client adapters every ``period`` rounds with the aggregator ``name``.

    Args:
        name: ``clair`` or a baseline (``local``, ``fedavg``, ``fedit``, ``median``, …).
        period: aggregate every ``period`` rounds (other rounds are purely local).
        options: keyword options of the aggregator (checked against its signature at once).
        nonfinite: ``exclude`` non-finite uploads (reported, the client receives the
            aggregate) or ``raise``.
        seed: seeds the re-initialisation of dead LoRA directions after write-back.
    """

    def __init__(
        self,
        name: str = "clair",
        period: int = 1,
        options: dict[str, Any] | None = None,
        nonfinite: str = "exclude",
        seed: int = 0,
    ):
        super().__init__()
        self.options = check_aggregation(name, period, options, nonfinite)
        self.name = name
        self.period = period
        self.seed = seed
        self.records: list[dict] = []
        self.sessions: list[dict] = []
        self._pending: dict | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._elapsed = 0.0
        self._started: float | None = None
        self._round_started: float | None = None

    # --- checks -----------------------------------------------------------------------------

    def check_options(self, num_clients: int) -> None:
        """Run the aggregator once on a small random federation of ``num_clients`` clients.

        Option values (``threshold: -1``, ``checks: [bogus]``, ``formulation: bogus``, …) are
        checked by the aggregator itself; this makes it happen before the first step.
        """
        generator = torch.Generator().manual_seed(0)
        shared = torch.randn(16, 2, generator=generator)
        updates = [
            {
                "probe": (
                    shared @ torch.randn(2, 2, generator=generator)
                    + 0.1 * torch.randn(16, 2, generator=generator),
                    torch.randn(2, 12, generator=generator),
                )
            }
            for _ in range(num_clients)
        ]
        options = dict(self.options)
        if self.name in NEEDS_TRUTH:
            options["contaminated"] = [False] * num_clients
        try:
            aggregate(self.name, updates, None, **options)
        except (ValueError, TypeError) as error:
            raise ValueError(f"aggregation.options of {self.name!r}: {error}") from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, FederatedLoRAModule):
            raise TypeError(
                f"FederatedAggregation needs a FederatedLoRAModule, got {type(pl_module).__name__}"
            )
        datamodule = trainer.datamodule
        if not isinstance(datamodule, FederatedDataModule):
            raise TypeError("FederatedAggregation needs a FederatedDataModule")
        if datamodule.num_clients != pl_module.num_clients:
            raise ValueError(
                f"the data module has {datamodule.num_clients} clients but the model "
                f"has {pl_module.num_clients} adapters"
            )

    # --- the round --------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self.sessions.append({"after_round": len(self.records), "pid": os.getpid()})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._round_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 != trainer.num_training_batches:
            return
        round_number = trainer.current_epoch + 1
        if round_number % self.period:
            self._pending = {"round": round_number, "aggregated": False}
        else:
            self._pending = self._aggregate(trainer, pl_module, round_number)

    def _aggregate(
        self, trainer: pl.Trainer, pl_module: FederatedLoRAModule, round_number: int
    ) -> dict:
        datamodule: FederatedDataModule = trainer.datamodule
        participants = datamodule.participants(round_number)
        uploads = [read_update(pl_module.model, adapter_name(k)) for k in participants]
        uploads = datamodule.contaminate_updates(uploads, round_number, clients=participants)
        result, fields = aggregate_round(
            self.name,
            self.options,
            uploads,
            [datamodule.train_sizes[k] for k in participants],
            [datamodule.contaminated[k] for k in participants],
        )
        started = time.perf_counter()
        adapters = [adapter_name(k) for k in participants]
        errors = write_refined(pl_module.model, adapters, result.refined, uploads, self._generator)
        truncation = {
            participants[k]: max(module_errors.values()) for k, module_errors in errors.items()
        }
        fields["write_back_seconds"] = time.perf_counter() - started
        return {
            "round": round_number,
            **by_client(fields, participants, pl_module.num_clients),
            "truncation_error": truncation,
            "participants": participants,
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        datamodule: FederatedDataModule = trainer.datamodule
        participants = datamodule.participants(pending["round"])
        pending.setdefault("participants", participants)
        idle = {
            k: "not sampled this round"
            for k in range(datamodule.num_clients)
            if k not in set(participants)
        }
        record = round_record(
            pending, datamodule.contaminated, pl_module.client_metrics, missing=idle
        )
        record["session"] = len(self.sessions) - 1
        record["seconds"] = time.perf_counter() - (self._round_started or time.perf_counter())
        self.records.append(record)
        log_round(trainer, record)
        _print(trainer, round_line(record, trainer.max_epochs))
        self._write_summary(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is not None:
            self._elapsed += time.perf_counter() - self._started
            self._started = None
        if trainer.interrupted:
            return
        pl_module.save_adapters(Path(trainer.default_root_dir) / "adapters")
        self._write_summary(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, "validate", pl_module.client_metrics)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_summary(trainer, test_metrics=pl_module.test_client_metrics)
        self._report(trainer, "test", pl_module.test_client_metrics)

    def _report(self, trainer: pl.Trainer, split: str, client_metrics: list[dict]) -> None:
        """Print and log an evaluation of the trained adapters (benign means per metric)."""
        truth = trainer.datamodule.contaminated
        means = benign_mean(client_metrics, truth)
        log_evaluation(trainer, split, means, step=len(self.records))
        _print(trainer, evaluation_line(split, means, len(self.records), truth))

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        elapsed = self._elapsed
        if self._started is not None:
            elapsed += time.perf_counter() - self._started
        return {
            "records": self.records,
            "sessions": self.sessions,
            "generator": self._generator.get_state(),
            "elapsed": elapsed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self.sessions = list(state_dict.get("sessions", []))
        self._generator.set_state(state_dict["generator"])
        self._elapsed = float(state_dict.get("elapsed", 0.0))

    # --- summary ------------------------------------------------------------------------------

    def _write_summary(self, trainer: pl.Trainer, test_metrics: list[dict] | None = None) -> None:
        directory = Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        datamodule: FederatedDataModule = trainer.datamodule
        path = directory / SUMMARY
        previous = json.loads(path.read_text()) if path.exists() else {}
        elapsed = self._elapsed + (time.perf_counter() - self._started if self._started else 0)
        summary = run_summary(
            {"name": self.name, "period": self.period, "options": self.options},
            {
                "recipe": type(datamodule).__module__,
                "num_clients": datamodule.num_clients,
                "contamination": datamodule.contamination,
                "contaminated": datamodule.contaminated,
                "seed": datamodule.seed,
                "local_steps": datamodule.local_steps,
                "train_sizes": datamodule.train_sizes,
            },
            elapsed,
            self.records,
            previous.get("test"),
            task_metric=datamodule.TASK_METRIC,
            sessions=self.sessions,
        )
        if test_metrics:
            summary["test"] = with_benign_mean(test_metrics, datamodule.contaminated)
        write_json(path, summary)


def _print(trainer: pl.Trainer, line: str) -> None:
    """One console line, above the progress bar when there is one."""
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled:
        bar.print(line)
    else:
        print(line, flush=True)
