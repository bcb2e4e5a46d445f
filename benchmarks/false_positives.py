"""CLAIR's false-positive rate with no attacker, on synthetic federations, as the README table.

    python benchmarks/false_positives.py                         # prints the table
    python benchmarks/false_positives.py --update-readme README.md

Per heterogeneity level and client count: the share of benign clients flagged over 15 seeds x
3 off-subspace noise levels (0, 0.1, 0.3) of ``clair_lightning.core.synthetic``; below the
table, the largest benign direction z-score at heterogeneity <= 1.0 (the margin to the
threshold of the check that comes closest).
"""

from __future__ import annotations

import argparse
import inspect
import math
from pathlib import Path

import torch

from clair_lightning import clair_aggregate
from clair_lightning.compare.report import update_readme
from clair_lightning.core.synthetic import synthetic_federation

HETEROGENEITY = (0.3, 0.5, 1.0, 1.5)
CLIENTS = (10, 20, 40)
NOISE = (0.0, 0.1, 0.3)
SEEDS = range(15)


def flagged(num_clients: int, heterogeneity: float) -> tuple[int, float]:
    """Benign clients flagged over the seeds and noise levels, and the largest direction z."""
    total, largest_direction_z = 0, -math.inf
    for seed in SEEDS:
        for noise in NOISE:
            federation = synthetic_federation(
                num_clients,
                heterogeneity=heterogeneity,
                noise=noise,
                generator=torch.Generator().manual_seed(seed),
            )
            result = clair_aggregate(federation.updates)
            total += sum(result.contaminated)
            largest_direction_z = max(largest_direction_z, *result.score_components["direction_z"])
    return total, largest_direction_z


def table() -> str:
    lines = [
        "| heterogeneity | " + " | ".join(f"{k} clients" for k in CLIENTS) + " |",
        "|---|" + "---|" * len(CLIENTS),
    ]
    margin = (-math.inf, 0, 0.0)
    for heterogeneity in HETEROGENEITY:
        cells = []
        for num_clients in CLIENTS:
            count, direction_z = flagged(num_clients, heterogeneity)
            total = num_clients * len(SEEDS) * len(NOISE)
            cells.append(
                f"0 / {total}" if count == 0 else f"{count / total:.1%} ({count} / {total})"
            )
            if heterogeneity <= 1.0:
                margin = max(margin, (direction_z, num_clients, heterogeneity))
        lines.append(f"| {heterogeneity} | " + " | ".join(cells) + " |")
    direction_z, num_clients, heterogeneity = margin
    lines.append(
        f"\nLargest benign direction z-score at heterogeneity <= 1.0: {direction_z:.2f} "
        f"({num_clients} clients, heterogeneity {heterogeneity}), against the threshold "
        f"{inspect.signature(clair_aggregate).parameters['threshold'].default}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README")
    args = parser.parse_args()
    text = table()
    print(text, end="")
    if args.update_readme:
        update_readme(args.update_readme, "false-positives", text)


if __name__ == "__main__":
    main()
