"""One client's LoRA adapter on a causal LM, as a LightningModule of its own.

The standalone unit: train one client with an ordinary Trainer (local fine-tuning), hand its
update to an aggregator, load a refined update or a saved adapter back. It shares the task step,
metrics and factor I/O with ``FederatedLoRAModule``, which holds many clients over one base.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from peft import PeftModel

from ..core import ClientUpdate
from .adapters import read_update, write_update
from .base import BaseModelSource
from .module import LrSchedule, build_lora_model, lr_factor
from .task import ClientMetrics, completion_step

ADAPTER = "default"


class ClientLoRAModule(pl.LightningModule):
    """A causal LM with one trainable LoRA adapter (new, or loaded from ``adapter_path``)."""

    def __init__(
        self,
        base_model: BaseModelSource,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        adapter_path: str | None = None,
        lr_schedule: LrSchedule = "constant",
        warmup_steps: int = 0,
        total_steps: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["base_model"])
        if adapter_path is not None:
            base = base_model.build().train()
            for parameter in base.parameters():
                parameter.requires_grad_(False)
            self.model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
        else:
            self.model, _ = build_lora_model(
                base_model, lora_rank, lora_alpha, lora_dropout, target_modules, ADAPTER
            )
        self.metrics: dict[str, float] = {}
        self._metrics = ClientMetrics(1)
        self._generator = torch.Generator().manual_seed(0)

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )
        factor = functools.partial(
            lr_factor,
            schedule=self.hparams.lr_schedule,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=self.hparams.total_steps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = completion_step(self.model, batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._metrics = ClientMetrics(1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._metrics.update(0, completion_step(self.model, batch))

    def on_validation_epoch_end(self) -> None:
        self.metrics = self._metrics.compute()[0]
        self.log_dict({f"val/{name}": value for name, value in self.metrics.items()})

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.metrics = self._metrics.compute()[0]
        self.log_dict({f"test/{name}": value for name, value in self.metrics.items()})

    def update(self) -> ClientUpdate:
        """The adapter as an aggregator input: ``{module: (B, A)}``, scaling folded into B."""
        return read_update(self.model, ADAPTER)

    def load_update(self, update: ClientUpdate) -> dict[str, float]:
        """Write an aggregated update into the adapter; returns the truncation error per module."""
        return write_update(self.model, ADAPTER, update, self._generator)

    def save_adapter(self, directory: str | Path) -> None:
        """Save the adapter in peft format (``PeftModel.from_pretrained(base, directory)``)."""
        self.model.save_pretrained(str(directory))
