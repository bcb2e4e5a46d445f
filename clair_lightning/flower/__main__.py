"""``clair flower``: run a recipe's config on Flower.

    clair flower simulate --config configs/text_copy.yaml --num-supernodes 10
    clair flower simulate --config configs/text_copy.yaml --num-supernodes 10 --resume
    clair flower app --config configs/text_copy.yaml --output flower_app --output-dir "$PWD/runs"
    flwr run flower_app my-superlink --stream

Arguments the command does not know are ``clair`` config overrides, e.g.
``--aggregation.name fedavg`` or ``--seed_everything 1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import USER_ERRORS, one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clair flower", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser("simulate", help="run on Flower's simulation runtime (Ray)")
    app = commands.add_parser("app", help="write the Flower App folder for `flwr run`")
    for command in (simulate, app):
        command.add_argument("--config", type=Path, required=True, help="recipe config (YAML)")
        command.add_argument(
            "--min-clients",
            type=int,
            default=0,
            help="fewest valid replies a round aggregates (default: a majority, at least 2)",
        )
        command.add_argument(
            "--round-timeout", type=float, default=600.0, help="seconds a round waits for replies"
        )
        command.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in the run folder after its last finished round",
        )
    simulate.add_argument(
        "--num-supernodes", type=int, default=None, help="clients (default: the config's)"
    )
    simulate.add_argument("--output-dir", default="", help="run folders (default: run.output_dir)")
    simulate.add_argument("--cpus-per-client", type=float, default=1.0)
    app.add_argument("--output", type=Path, required=True, help="folder to write the app into")
    app.add_argument(
        "--output-dir", default="", help="run folders on the server's machine (absolute path)"
    )
    app.add_argument(
        "--node-wait", type=float, default=120.0, help="seconds to wait for SuperNodes in round 1"
    )
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        if args.command == "simulate":
            from .simulation import simulate as run_simulation
            from .strategy import FederationError

            try:
                run_dir = run_simulation(
                    args.config,
                    args.num_supernodes,
                    overrides,
                    output_dir=args.output_dir,
                    min_clients=args.min_clients,
                    round_timeout=args.round_timeout,
                    cpus_per_client=args.cpus_per_client,
                    resume=args.resume,
                )
            except FederationError as error:
                raise ValueError(str(error)) from None
            print(f"summary: {run_dir / 'summary.json'}")
        else:
            from .app_folder import write_app
            from .experiment import Experiment, RunSettings

            settings = RunSettings.from_file(
                args.config,
                overrides,
                output_dir=args.output_dir,
                min_clients=args.min_clients,
                round_timeout=args.round_timeout,
                node_wait=args.node_wait,
                resume=args.resume,
            )
            Experiment.load(settings)  # a bad config fails here, not on the SuperLink
            print(f"Flower App written to {write_app(args.output, settings)}")
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in ("flwr", "ray"):
            print(
                "clair flower: error: install the extra: pip install 'clair-lightning[flower]'",
                file=sys.stderr,
            )
            return 2
        raise
    except USER_ERRORS as error:
        print(f"clair flower: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
