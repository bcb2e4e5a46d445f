"""``clair flower simulate``: the experiment on Flower's simulation runtime (Ray), offline.

Simulated clients report their ground truth, so detection metrics are computed as in the
Lightning path. Flower's home folder is a temporary one, telemetry and update checks are off.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..rounds import SUMMARY
from .experiment import Experiment, RunSettings, offline_environment


def simulate(
    config: str | Path,
    num_supernodes: int | None = None,
    overrides: Sequence[str] = (),
    *,
    output_dir: str = "",
    min_clients: int = 0,
    round_timeout: float = 600.0,
    cpus_per_client: float = 1.0,
    resume: bool = False,
) -> Path:
    """Run ``config`` with one simulated SuperNode per client; returns the run folder.

    ``resume`` continues the run in the run folder after its last finished round."""
    overrides = list(overrides)
    if num_supernodes is not None:
        overrides.append(f"--data.init_args.num_clients={num_supernodes}")
    settings = RunSettings.from_file(
        config,
        overrides,
        simulation=True,
        output_dir=output_dir,
        min_clients=min_clients,
        round_timeout=round_timeout,
        node_wait=60.0,
        resume=resume,
    )
    from .server_app import prepare

    experiment, run_dir = prepare(settings)  # one clear error before Ray starts
    experiment.client_module()  # builds (or loads) the base once, before any client races to
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as flwr_home:
        previous = {key: os.environ.get(key) for key in _ENVIRONMENT}
        os.environ.update({**offline_environment(flwr_home), "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            _run(settings, experiment, cpus_per_client)
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if not (run_dir / SUMMARY).exists():
        raise RuntimeError(f"the simulation ended without writing {run_dir / SUMMARY}")
    return run_dir


_ENVIRONMENT = (*offline_environment("-"), "RAY_USAGE_STATS_ENABLED")


def _run(settings: RunSettings, experiment: Experiment, cpus_per_client: float) -> None:
    from flwr.simulation import run_simulation

    from .client_app import client_app
    from .server_app import server_app

    run_simulation(
        server_app=server_app(settings),
        client_app=client_app(settings),
        num_supernodes=experiment.datamodule.num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"logging_level": "error", "log_to_driver": True},
        },
    )
