"""The ServerApp: read the experiment, build the initial adapter, run ``ClairStrategy``.

The run folder (``summary.json``, ``config.yaml``, the W&B run) is on the server's machine,
under the config's ``run.output_dir`` or the run config's ``output-dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import wandb
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..core.aggregators import NEEDS_TRUTH
from ..rounds import SUMMARY
from .experiment import Experiment, RunSettings
from .messages import encode_update
from .strategy import ClairStrategy

log = logging.getLogger("flwr.clair_lightning")


def server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp for ``settings`` (simulation), or reading them from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings or RunSettings.from_run_config(dict(context.run_config)))

    return app


def prepare(settings: RunSettings) -> tuple[Experiment, Path]:
    """Parse and check the experiment and claim its run folder; raises ``ValueError``."""
    experiment = Experiment.load(settings)
    name = experiment.aggregation.name
    if not settings.simulation and name in NEEDS_TRUTH:
        raise ValueError(f"aggregator {name!r} needs the ground truth, which only simulation has")
    run_dir = experiment.run_dir()
    if (run_dir / SUMMARY).exists():
        if not experiment.config.run.overwrite:
            raise ValueError(
                f"run folder {run_dir} already holds a run; choose another --run.name or pass "
                "--run.overwrite true"
            )
        shutil.rmtree(run_dir)
    return experiment, run_dir


def run_federation(grid: Grid, settings: RunSettings) -> Path:
    """All rounds of the experiment on ``grid``; returns the run folder."""
    experiment, run_dir = prepare(settings)
    if not settings.simulation and experiment.datamodule.update_attack:
        log.warning(
            "update-level contamination %r is a simulation device; a deployment does not apply it",
            experiment.datamodule.contamination,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings.config_yaml)
    initial = experiment.client_module().update()
    strategy = ClairStrategy(experiment, initial, run_dir)
    os.environ.setdefault("WANDB_MODE", "offline")
    strategy.wandb_run = wandb.init(
        project=experiment.config.run.wandb_project,
        name=run_dir.name,
        group=experiment.wandb_group(),
        dir=str(run_dir),
        config={"settings": settings.as_run_config() | {"config-yaml": None}},
    )
    try:
        strategy.start(
            grid,
            encode_update(initial),
            num_rounds=experiment.rounds,
            timeout=settings.round_timeout,
        )
    finally:
        strategy.write_summary()
        strategy.wandb_run.finish()
    return run_dir


app = server_app()
