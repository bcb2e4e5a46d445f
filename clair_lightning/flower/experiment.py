"""The experiment a Flower run executes: the same YAML config (and overrides) ``clair`` reads.

The config is parsed by the ``clair`` command's own parser, so defaults, links and checks are
identical; only the pieces a Flower process needs are built from it (the data module, the base
model source, one client module), never the in-process federation of K adapters. The YAML text
travels in Flower's run config, so every SuperNode reads exactly the server's config.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..callbacks import FederatedAggregation
from ..experiment import ClairCLI

# Flower's run config holds flat scalars; these keys carry the experiment and the engine's
# settings from `flwr run` (or `clair flower simulate`) to the ServerApp and every ClientApp.
RUN_CONFIG_KEYS = (
    "config-yaml",
    "config-name",
    "overrides",
    "simulation",
    "output-dir",
    "min-clients",
    "round-timeout",
    "node-wait",
    "resume",
)


@dataclass(frozen=True)
class RunSettings:
    """What one Flower run executes and how patiently the server waits for clients.

    ``resume`` continues the run in the run folder after its last finished round.
    ``simulation`` is the simulation-only setting under which clients report whether they are
    contaminated (the ground truth); a real deployment leaves it off. ``min_clients`` = 0 means
    a majority of the clients sampled per round
    (at least two).
    """

    config_yaml: str
    config_name: str
    overrides: tuple[str, ...] = ()
    simulation: bool = False
    output_dir: str = ""
    min_clients: int = 0
    round_timeout: float = 600.0
    node_wait: float = 120.0
    resume: bool = False

    @classmethod
    def from_file(cls, config: str | Path, overrides=(), **settings: Any) -> RunSettings:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"cannot read config {config}: {error}") from None
        return cls(text, path.stem, tuple(overrides), **settings)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Settings from Flower's run config (the app's ``[tool.flwr.app.config]``)."""
        if not run_config.get("config-yaml"):
            raise ValueError(
                "the Flower run config has no 'config-yaml'; build the app with "
                "`clair flower app --config <recipe.yaml>`"
            )
        overrides = json.loads(str(run_config.get("overrides") or "[]"))
        return cls(
            config_yaml=str(run_config["config-yaml"]),
            config_name=str(run_config.get("config-name") or "experiment"),
            overrides=tuple(str(o) for o in overrides),
            simulation=bool(run_config.get("simulation", False)),
            output_dir=str(run_config.get("output-dir") or ""),
            min_clients=int(run_config.get("min-clients", 0)),
            round_timeout=float(run_config.get("round-timeout", 600.0)),
            node_wait=float(run_config.get("node-wait", 120.0)),
            resume=bool(run_config.get("resume", False)),
        )

    def as_run_config(self) -> dict[str, Any]:
        return {
            "config-yaml": self.config_yaml,
            "config-name": self.config_name,
            "overrides": json.dumps(list(self.overrides)),
            "simulation": self.simulation,
            "output-dir": self.output_dir,
            "min-clients": self.min_clients,
            "round-timeout": self.round_timeout,
            "node-wait": self.node_wait,
            "resume": self.resume,
        }


@dataclass
class Experiment:
    """A parsed ``clair`` config and the objects a Flower process builds from it."""

    settings: RunSettings
    config: Any = field(repr=False)

    @classmethod
    def load(cls, settings: RunSettings) -> Experiment:
        """Parse the YAML with the ``clair`` parser; a bad config raises ``ValueError``."""
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"{settings.config_name}.yaml"
            path.write_text(settings.config_yaml)
            try:
                cli = _ConfigOnly(args=["--config", str(path), *settings.overrides], run=False)
            except SystemExit:
                raise ValueError(
                    f"config {settings.config_name!r} does not parse as a clair config"
                ) from None
        experiment = cls(settings, cli.config)
        experiment.aggregation_options  # noqa: B018 - checks the aggregator settings at once
        return experiment

    # --- the config's pieces -----------------------------------------------------------------

    @property
    def seed(self) -> int:
        return int(self.config.seed_everything)

    @property
    def rounds(self) -> int:
        return int(self.config.trainer.max_epochs or 1)

    @property
    def aggregation(self):
        return self.config.aggregation

    @cached_property
    def aggregation_options(self) -> dict[str, Any]:
        """The aggregator's options, checked exactly as ``clair fit`` checks them."""
        callback = FederatedAggregation(**self.aggregation.as_dict())
        callback.check_options(self.datamodule.num_clients)
        return callback.options

    @cached_property
    def datamodule(self):
        """The recipe's data module, every client's examples built (same seed as ``clair``)."""
        return _instantiate(self.config.data)

    def client_module(self):
        """One client's ``ClientLoRAModule`` with the config's LoRA and optimiser settings."""
        from ..federation import ClientLoRAModule

        model = self.config.model
        return ClientLoRAModule(
            base_model=_instantiate(model.base_model),
            lora_rank=model.lora_rank,
            lora_alpha=model.lora_alpha,
            lora_dropout=model.lora_dropout,
            target_modules=model.target_modules,
            learning_rate=model.learning_rate,
            weight_decay=model.weight_decay,
            lr_schedule=model.lr_schedule,
            warmup_steps=model.warmup_steps,
            total_steps=max(1, self.rounds * self.datamodule.local_steps),
        )

    @property
    def max_grad_norm(self) -> float | None:
        return self.config.model.max_grad_norm

    # --- the server's run folder ---------------------------------------------------------------

    def run_dir(self) -> Path:
        """``<output_dir>/<run.name>``; the default name is ``clair fit``'s plus ``-flower``."""
        data = self.config.data.init_args
        base = f"{self.settings.config_name}-{self.aggregation.name}-{data.contamination}"
        name = self.config.run.name or f"{base}-seed{self.seed}-flower"
        return Path(self.settings.output_dir or self.config.run.output_dir) / name

    def wandb_group(self) -> str:
        data = self.config.data.init_args
        base = f"{self.settings.config_name}-{self.aggregation.name}-{data.contamination}"
        return self.config.run.wandb_group or f"{base}-flower"


class _ConfigOnly(ClairCLI):
    """The ``clair`` parser without instantiating the federation or a Trainer."""

    def instantiate_classes(self) -> None:
        pass


def _instantiate(namespace) -> Any:
    """An object from a jsonargparse ``class_path`` / ``init_args`` namespace."""
    module_name, _, class_name = namespace.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    arguments = namespace.get("init_args")
    return cls(**(arguments.as_dict() if arguments is not None else {}))


def offline_environment(flwr_home: str | Path | None = None) -> dict[str, str]:
    """Environment that keeps Flower off the network and out of ``~/.flwr``."""
    environment = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
    }
    if flwr_home is not None:
        environment["FLWR_HOME"] = str(flwr_home)
    return environment
