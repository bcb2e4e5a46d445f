"""Run comparison cells through the Lightning path (``clair fit``) for any federated recipe."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from .grid import Cell


class LightningBackend:
    """A LightningCLI config of a ``FederatedDataModule`` recipe; one ``clair fit`` per cell."""

    task_metric = "exact_match"
    higher_is_better = True

    def __init__(self, config: Path):
        self.config = Path(config)
        settings = yaml.safe_load(self.config.read_text()) or {}
        data = settings.get("data") or {}
        class_path = data.get("class_path") if isinstance(data, dict) else None
        if not class_path:
            raise ValueError(f"config {config} has no data.class_path (a FederatedDataModule)")
        module_name, _, class_name = class_path.rpartition(".")
        try:
            self.datamodule_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"config {config}: cannot import data class {class_path}: {error}"
            ) from None
        self.recipe = self.config.stem
        self.task_metric = getattr(self.datamodule_class, "TASK_METRIC", "exact_match")

    def contaminations(self) -> tuple[str, ...]:
        return tuple(self.datamodule_class.contaminations())

    def run(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        from .backends import record

        overrides = [
            "--aggregation.name",
            cell.aggregator,
            "--data.init_args.contamination",
            cell.contamination,
            "--seed_everything",
            str(cell.seed),
            "--run.output_dir",
            str(workdir.parent),
            "--run.name",
            workdir.name,
            "--run.wandb_group",
            workdir.parent.parent.name,
            "--run.overwrite",
            "true",
        ]
        started = time.perf_counter()
        run_dir = self.execute(overrides)
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [
            {
                "round": round_record["round"],
                "clients": [
                    {
                        "client": client["client"],
                        "contaminated": client["contaminated"],
                        "flag": client["flag"],
                        "score": client["score"],
                        "metrics": client["metrics"],
                    }
                    for client in round_record["clients"]
                ],
            }
            for round_record in summary["rounds"]
        ]
        result = record(cell, self, rounds, time.perf_counter() - started)
        result["run_dir"] = str(run_dir)
        return result

    def execute(self, overrides: list[str]) -> Path:
        """Run the config with ``overrides`` in process (``clair fit``); returns the run folder."""
        from ..experiment import run

        return run(self.config, [*overrides, "--trainer.enable_progress_bar", "false"])
