"""The ClientApp: one client (a data partition) trains ``ClientLoRAModule`` with a Trainer.

Identity is the node's ``partition-id`` / ``num-partitions`` (set by ``--node-config`` in a
deployment, automatically in simulation), never Flower's node id, which changes when a node
restarts. Each train message carries the adapter the server refined for this client; the
client writes it, takes the round's local steps (the very batches the in-process path uses),
and replies with its LoRA factors and example count. AdamW's moments survive rounds in
``Context.state``; the learning-rate schedule's position follows from the round number.

The base model, data and client module are built once per process and reused (in simulation a
Ray worker serves many messages; in a deployment every message starts a fresh process that
loads the base from the recipe's on-disk cache).
"""

from __future__ import annotations

import functools
import io
import logging
import warnings

import lightning.pytorch as pl
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..federation.adapters import set_factors
from ..federation.client import ADAPTER
from .experiment import Experiment, RunSettings
from .messages import (
    CONFIG,
    CONTAMINATED,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SENT_ADAPTER,
    UPDATE,
    decode_update,
    encode_update,
    shapes_of,
)

OPTIMIZER_STATE = "clair.optimizer"


def client_app(settings: RunSettings | None = None) -> ClientApp:
    """A ClientApp for ``settings`` (simulation), or reading them from the run config."""
    app = ClientApp()

    def run_settings(context: Context) -> RunSettings:
        return settings or RunSettings.from_run_config(dict(context.run_config))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        partition, partitions = identity(context)
        record = ConfigRecord({PARTITION_ID: partition, NUM_PARTITIONS: partitions})
        return Message(RecordDict({CONFIG: record}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client = _client(run_settings(context))
        partition = client.check(message, context)
        round_number = int(message.content[CONFIG]["round"])
        client.load(message)
        update, examples = client.train(partition, round_number, context)
        metrics = {NUM_EXAMPLES: examples, PARTITION_ID: partition}
        if client.experiment.settings.simulation:
            metrics[CONTAMINATED] = int(client.datamodule.contaminated[partition])
        content = RecordDict({UPDATE: encode_update(update), METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        client = _client(run_settings(context))
        partition = client.check(message, context)
        client.load(message)
        metrics = client.evaluate(partition)
        record = MetricRecord({**metrics, PARTITION_ID: partition})
        return Message(RecordDict({METRICS: record}), reply_to=message)

    return app


def identity(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config; a clear error without them."""
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            "this SuperNode has no partition: start it with --node-config "
            "'partition-id=<k> num-partitions=<K>'"
        ) from None


class _Client:
    """The process's experiment, data and client module, built once."""

    def __init__(self, settings: RunSettings):
        self.experiment = Experiment.load(settings)
        self.datamodule = self.experiment.datamodule
        self.datamodule.setup()
        self.module = self.experiment.client_module()
        self.shapes = shapes_of(self.module.update())

    def check(self, message: Message, context: Context) -> int:
        partition, partitions = identity(context)
        if partitions != self.datamodule.num_clients:
            raise ValueError(
                f"num-partitions={partitions} but the config has "
                f"{self.datamodule.num_clients} clients"
            )
        if not 0 <= partition < partitions:
            raise ValueError(f"partition-id={partition} is not in [0, {partitions})")
        sent_to = int(message.content[CONFIG][PARTITION_ID])
        if sent_to != partition:
            raise ValueError(f"message for partition {sent_to} reached partition {partition}")
        return partition

    def load(self, message: Message) -> None:
        """Write the server's adapter for this client (already at the adapter's rank)."""
        update = decode_update(message.content[SENT_ADAPTER], self.shapes)
        set_factors(self.module.model, ADAPTER, update)

    def train(self, partition: int, round_number: int, context: Context):
        local_steps = self.datamodule.local_steps
        saved = context.state.config_records.get(OPTIMIZER_STATE)
        restore = _RestoreOptimizer(
            None if saved is None else saved["state"], (round_number - 1) * local_steps
        )
        torch.manual_seed(self.experiment.seed * 7_919 + round_number - 1)
        trainer = self._trainer(
            max_steps=local_steps,
            limit_val_batches=0,
            gradient_clip_val=self.experiment.max_grad_norm or None,
            callbacks=[restore],
        )
        loader = self.datamodule.client_round_dataloader(partition, round_number - 1)
        with _quiet():
            trainer.fit(self.module, train_dataloaders=loader)
        buffer = io.BytesIO()
        torch.save(trainer.optimizers[0].state_dict(), buffer)
        context.state[OPTIMIZER_STATE] = ConfigRecord({"state": buffer.getvalue()})
        return self.module.update(), self.datamodule.train_sizes[partition]

    def evaluate(self, partition: int) -> dict[str, float]:
        """Validation metrics, plus ``attack_success`` (exact match on the attack probes) where
        the scenario has probes, as the Lightning federation reports them."""
        metrics = self._validate(self._loader(partition, "val"))
        probes = self._loader(partition, "probe")
        if len(probes.dataset):
            metrics["attack_success"] = self._validate(probes)["exact_match"]
        return metrics

    def _loader(self, partition: int, split: str):
        return self.datamodule.client_dataloader(
            partition, split, batch_size=self.datamodule.eval_batch_size
        )

    def _validate(self, loader) -> dict[str, float]:
        with _quiet():
            self._trainer().validate(self.module, dataloaders=loader, verbose=False)
        return dict(self.module.metrics)

    def _trainer(self, **settings) -> pl.Trainer:
        """A quiet Trainer on the config's accelerator and precision, one device, no logs or
        checkpoints."""
        configured = self.experiment.config.trainer
        if configured.precision is not None:
            settings.setdefault("precision", configured.precision)
        return pl.Trainer(
            accelerator=configured.accelerator or "auto",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **settings,
        )


@functools.lru_cache(maxsize=2)
def _client(settings: RunSettings) -> _Client:
    return _Client(settings)


class _RestoreOptimizer(pl.Callback):
    """Put the saved AdamW state back and move the schedule to the round's first step."""

    def __init__(self, state: bytes | None, steps_done: int):
        self.state = state
        self.steps_done = steps_done

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        if self.state is not None:
            optimizer.load_state_dict(torch.load(io.BytesIO(self.state), weights_only=True))
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        scheduler.last_epoch = self.steps_done - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping before optimizer.step() is intended
            scheduler.step()


class _quiet:
    """Silence Lightning's per-Trainer banners and data-loader hints (many per round)."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("lightning.pytorch").level
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        logging.getLogger("lightning.pytorch").setLevel(self._level)
        self._warnings.__exit__(*exc)


app = client_app()
