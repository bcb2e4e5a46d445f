"""The ServerApp: read the experiment, build the initial adapter, run ``ClairStrategy``.

The run folder (``summary.json``, ``config.yaml``, ``checkpoints/server_state.pt``, the W&B run)
is on the server's machine, under the config's ``run.output_dir`` or the run config's
``output-dir``. With ``resume`` the server continues that run after its last finished round.
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
from .server_state import STATE, load_state
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
    if settings.resume:
        load_state(run_dir, settings.config_yaml, settings.overrides)  # one clear error now
    elif (run_dir / SUMMARY).exists():
        if not experiment.config.run.overwrite:
            raise ValueError(
                f"run folder {run_dir} already holds a run; --resume continues it, another "
                "--run.name or --run.overwrite true starts afresh"
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
    resumed = None
    if settings.resume:
        resumed = load_state(run_dir, settings.config_yaml, settings.overrides)
        if resumed.completed_rounds >= experiment.rounds:
            log.info("the run in %s has finished all %d rounds", run_dir, experiment.rounds)
            return run_dir
        log.info(
            "resuming after round %d of %d from %s",
            resumed.completed_rounds,
            experiment.rounds,
            run_dir / STATE,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(settings.config_yaml)
    initial = experiment.client_module().update()
    strategy = ClairStrategy(experiment, initial, run_dir, resumed)
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
            num_rounds=experiment.rounds - strategy.completed_rounds,
            timeout=settings.round_timeout,
        )
    finally:
        strategy.write_summary()
        strategy.wandb_run.finish()
    return run_dir


app = server_app()
