"""CLAIR's false-positive rate with no attacker, on synthetic federations, as the README table.

    python benchmarks/false_positives.py                         # prints the table
    python benchmarks/false_positives.py --update-readme README.md

Per heterogeneity level and client count: the share of benign clients flagged over 15 seeds x
3 off-subspace noise levels (0, 0.1, 0.3) of ``clair_lightning.core.synthetic``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clair_lightning import clair_aggregate
from clair_lightning.compare.report import update_readme
from clair_lightning.core.synthetic import synthetic_federation

HETEROGENEITY = (0.3, 0.5, 1.0, 1.5)
CLIENTS = (10, 20, 40)
NOISE = (0.0, 0.1, 0.3)
SEEDS = range(15)


def flagged(num_clients: int, heterogeneity: float) -> int:
    total = 0
    for seed in SEEDS:
        for noise in NOISE:
            federation = synthetic_federation(
                num_clients,
                heterogeneity=heterogeneity,
                noise=noise,
                generator=torch.Generator().manual_seed(seed),
            )
            total += sum(clair_aggregate(federation.updates).contaminated)
    return total


def table() -> str:
    lines = [
        "| heterogeneity | " + " | ".join(f"{k} clients" for k in CLIENTS) + " |",
        "|---|" + "---|" * len(CLIENTS),
    ]
    for heterogeneity in HETEROGENEITY:
        cells = []
        for num_clients in CLIENTS:
            count, total = (
                flagged(num_clients, heterogeneity),
                num_clients * len(SEEDS) * len(NOISE),
            )
            cells.append(
                f"0 / {total}" if count == 0 else f"{count / total:.1%} ({count} / {total})"
            )
        lines.append(f"| {heterogeneity} | " + " | ".join(cells) + " |")
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
