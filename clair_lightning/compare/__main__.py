"""``clair compare``: run an aggregator x contamination x seed grid and write the report.

    clair compare --config configs/linear_regression.yaml \
        --aggregators clair,local,fedavg,oracle --contaminations none,random_targets \
        --seeds 0,1,2 --output results/linear_regression
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ..jsonio import write_json
from . import report
from .runner import run_comparison


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a comparison like Ctrl-C: running cells stop, finished ones stay."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clair compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="recipe config (YAML)")
    parser.add_argument("--aggregators", type=_names, default=["clair", "local", "fedavg"])
    parser.add_argument(
        "--contaminations",
        "--contamination",
        type=_names,
        required=True,
        help="comma-separated scenarios; 'none' runs without contamination",
    )
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("results"))
    parser.add_argument("--workers", type=int, default=1, help="cells run in parallel")
    parser.add_argument(
        "--engine",
        choices=("lightning", "flower"),
        default="lightning",
        help="run each cell in process (lightning) or on Flower's simulation runtime",
    )
    parser.add_argument("--group", default=None, help="W&B group (default: output folder name)")
    parser.add_argument("--no-wandb", action="store_true", help="skip W&B logging")
    parser.add_argument(
        "--update-readme",
        type=Path,
        default=None,
        metavar="README",
        help="write the results table into this README between markers",
    )
    parser.add_argument(
        "--readme-block",
        default=None,
        help="marker name of the README block (default compare:<recipe>)",
    )
    parser.add_argument(
        "--per-scenario",
        action="store_true",
        help="the README block is one row per scenario instead of one per aggregator",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)

    try:
        comparison = run_comparison(
            args.config,
            args.aggregators,
            args.contaminations,
            args.seeds,
            args.output,
            workers=args.workers,
            engine=args.engine,
        )
    except ValueError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print(
            f"clair compare: interrupted; finished cells are kept in {args.output / 'cells'}, "
            "the same command resumes",
            file=sys.stderr,
        )
        return 130
    results = report.build_results(comparison)
    command = "clair compare " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.output / "results.json", results)
    (args.output / "report.md").write_text(report.markdown(results, command))
    table = report.readme_table(results)
    (args.output / "readme_table.md").write_text(table)
    scenarios = report.scenario_table(results)
    (args.output / "scenario_table.md").write_text(scenarios)
    images = report.plots(results, args.output)
    if not args.no_wandb:
        report.log_to_wandb(
            results,
            args.output,
            args.group or args.output.name,
            images,
            log_cells=comparison["recipe"] == "linear_regression",
        )
    if args.update_readme:
        block = args.readme_block or f"compare:{results['recipe']}"
        report.update_readme(args.update_readme, block, scenarios if args.per_scenario else table)
    print((args.output / "report.md").read_text())
    failed = [v for v in results["claims"] if v["holds"] is False]
    for verdict in failed:
        print(
            f"claim did not hold ({verdict['contamination']}): {verdict['claim']}: "
            f"{verdict['measured']}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
