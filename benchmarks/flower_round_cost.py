"""What a Flower round costs: start-up and per-round seconds, simulation vs loopback deployment.

    python benchmarks/flower_round_cost.py                 # text-copy smoke config, 4 clients
    python benchmarks/flower_round_cost.py --rounds 3 --config configs/text_copy.yaml

Runs the same config three ways, one after the other on the same machine: in process
(``clair fit``), on Flower's simulation runtime (Ray, one SuperNode per client) and as a real
deployment on 127.0.0.1 (one SuperLink, one SuperNode per partition, ``flwr run``). A round is
its train phase plus its evaluate phase (means over rounds, as the server's ``summary.json``
records them); start-up and shut-down is the rest of the wall time: Ray or the processes
starting, the ServerApp loading the experiment, waiting for and identifying the nodes (one
query message each), closing W&B. In a deployment every message starts a fresh ClientApp
process (imports, base loaded from the recipe's disk cache), which dominates a small round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clair_lightning.experiment import run as clair_fit
from clair_lightning.flower.app_folder import write_app
from clair_lightning.flower.experiment import Experiment, RunSettings
from clair_lightning.flower.loopback import LoopbackDeployment
from clair_lightning.flower.simulation import simulate


def round_seconds(run_dir: Path) -> tuple[list[float], list[float], float]:
    """Train and evaluate phase seconds per round, and the seconds spent finding the nodes."""
    rounds = json.loads((run_dir / "summary.json").read_text())["rounds"]
    return (
        [r["train_seconds"] for r in rounds],
        [r["evaluate_seconds"] for r in rounds],
        sum(r["identify_seconds"] for r in rounds),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/text_copy_smoke.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    overrides = [f"--trainer.max_epochs={args.rounds}", "--run.overwrite=true"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flower-cost-") as folder:
        folder = Path(folder)
        os.environ.setdefault("CLAIR_CACHE_DIR", str(folder / "cache"))
        settings = RunSettings.from_file(args.config, overrides, output_dir=str(folder / "dep"))
        experiment = Experiment.load(settings)
        experiment.client_module()  # pre-train / load the base once, outside every timing
        clients = experiment.datamodule.num_clients

        started = time.perf_counter()
        clair_fit(args.config, [*overrides, "--run.output_dir", str(folder / "fit")])
        rows.append(("in process (clair fit)", time.perf_counter() - started, None, None, 0.0))

        started = time.perf_counter()
        run_dir = simulate(args.config, overrides=overrides, output_dir=str(folder / "sim"))
        total = time.perf_counter() - started
        rows.append(("Flower simulation (Ray)", total, *round_seconds(run_dir)))

        app = write_app(folder / "app", settings)
        started = time.perf_counter()
        with LoopbackDeployment(folder / "deployment", clients) as deployment:
            returncode = deployment.run(app).wait()
        total = time.perf_counter() - started
        if returncode:
            raise SystemExit(deployment.log("flwr-run")[-3000:])
        rows.append(
            (
                f"Flower deployment ({clients} SuperNodes)",
                total,
                *round_seconds(experiment.run_dir()),
            )
        )

    print(
        f"{args.config}, {clients} clients, {args.rounds} rounds, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "| path | total s | start-up and shut-down s (finding the nodes) | train phase s | "
        "evaluate phase s |"
    )
    print("|---|---|---|---|---|")
    for name, total, train, evaluate, identify in rows:
        if train is None:
            print(f"| {name} | {total:.1f} | – | – | – |")
            continue
        startup = total - sum(train) - sum(evaluate)
        print(
            f"| {name} | {total:.1f} | {startup:.1f} ({identify:.1f}) | "
            f"{statistics.fmean(train):.1f} | {statistics.fmean(evaluate):.1f} |"
        )


if __name__ == "__main__":
    main()
