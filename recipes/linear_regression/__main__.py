"""Run every claim of the linear-regression recipe and write the report.

python -m clair_lightning.recipes.linear_regression --output runs/linear_regression
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ...compare.report import update_readme
from ...jsonio import write_json
from . import experiments, report

FULL = {
    "seeds": 10,
    "noise_levels": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0],
    "sample_sizes": [22, 30, 50, 100, 200, 400],
    "fractions": [0.0, 0.1, 0.2, 0.3, 0.4],
    "heterogeneity": [0.0, 0.1, 0.2, 0.4, 0.8, 1.6],
}
QUICK = {
    "seeds": 2,
    "noise_levels": [0.0, 1.0, 4.0],
    "sample_sizes": [22, 50, 400],
    "fractions": [0.0, 0.3],
    "heterogeneity": [0.0, 1.6],
}
README = Path(__file__).with_name("README.md")


def run(output: Path, grid: dict) -> dict:
    """All experiments on ``grid``; writes results.json, results.md and plots to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    seeds = range(grid["seeds"])
    aggregators = experiments.comparison_aggregators()
    started = time.perf_counter()
    results = {
        "exact_recovery": experiments.exact_recovery(seeds),
        "stable_recovery": experiments.stable_recovery(seeds, grid["noise_levels"]),
        "consistency": experiments.consistency(seeds, grid["sample_sizes"]),
        "refinement_vs_samples": experiments.refinement_vs_samples(
            seeds, grid["sample_sizes"], aggregators
        ),
        "refinement_vs_contamination": experiments.refinement_vs_contamination(
            seeds, grid["fractions"], aggregators
        ),
        "heterogeneity_cost": experiments.heterogeneity_cost(seeds, grid["heterogeneity"]),
    }
    results["config"] = {
        **grid,
        "aggregators": aggregators,
        "seconds": time.perf_counter() - started,
    }
    verdicts = report.claims(results)
    results["claims"] = verdicts
    command = "python -m clair_lightning.recipes.linear_regression" + (
        " --quick" if grid is QUICK else ""
    )
    write_json(output / "results.json", results)
    (output / "results.md").write_text(report.markdown(results, verdicts, command))
    report.plots(results, output)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/linear_regression"))
    parser.add_argument("--quick", action="store_true", help="2 seeds, short grids (for tests)")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="write the results table into the recipe README",
    )
    args = parser.parse_args(argv)
    results = run(args.output, QUICK if args.quick else FULL)
    markdown = (args.output / "results.md").read_text()
    print(markdown)
    if args.update_readme:
        update_readme(README, "results", markdown)
    failed = [v["claim"] for v in results["claims"] if v["holds"] is False]
    if failed:
        print("Claims that did not hold: " + "; ".join(failed), file=sys.stderr)
    print(f"Results, table and plots in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
