"""Detection of the robust-FL literature's update-level attacks on synthetic LoRA federations.

    python benchmarks/attack_detection.py                 # K = 20, 20% and 40%, 5 seeds
    python benchmarks/attack_detection.py --seeds 2       # quicker
    python benchmarks/attack_detection.py --update-readme README.md
    python benchmarks/attack_detection.py --checks off_subspace,direction,norm,collusion
    python benchmarks/attack_detection.py --seeds 10 --save-results results/synthetic

Benign clients share a column subspace (two modules) with heterogeneous in-subspace
coefficients and off-subspace estimation noise; the attackers (chosen at random per seed)
replace their updates by each attack of ``clair_lightning.core.attacks``. Prints per attack and
contaminated share: CLAIR's detection F1, AUROC and FPR (mean over seeds), and the benign
clients' relative error against their noiseless truth for CLAIR and the baselines.
``--save-results DIR`` also writes every seed's cell, per share, to
``DIR/synthetic_<share>pct/results.json`` in ``clair compare``'s format, which
``benchmarks/benign_vs_filing.py`` pairs with the same run under another version of the code.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from clair_lightning.compare.report import update_readme
from clair_lightning.core import ATTACKS, aggregate, contaminate
from clair_lightning.core.clair import CHECKS
from clair_lightning.core.synthetic import synthetic_federation
from clair_lightning.jsonio import write_json
from clair_lightning.metrics import detection_metrics

BASELINES = ("local", "fedavg", "median", "multikrum", "oracle")
SETTINGS = {"d_out": 64, "d_in": 48, "rank": 4, "subspace_rank": 3, "num_modules": 2}


def federation(num_clients, heterogeneity, noise, seed):
    """Noisy benign updates and their noiseless truth (same seed: same benign part)."""
    noisy, clean = (
        synthetic_federation(
            num_clients,
            heterogeneity=heterogeneity,
            noise=level,
            generator=torch.Generator().manual_seed(seed),
            **SETTINGS,
        )
        for level in (noise, 0.0)
    )
    return noisy.updates, clean.updates


def benign_error(result, truth, benign):
    errors = []
    for k in benign:
        squared = total = 0.0
        for name, (b, a) in truth[k].items():
            rb, ra = result.refined[k][name]
            squared += float((rb @ ra - b @ a).square().sum())
            total += float((b @ a).square().sum())
        errors.append((squared / total) ** 0.5)
    return statistics.mean(errors)


def run_cell(attack, fraction, num_clients, heterogeneity, noise, seed, aggregators, checks):
    updates, truth = federation(num_clients, heterogeneity, noise, seed)
    order = torch.randperm(num_clients, generator=torch.Generator().manual_seed(1000 + seed))
    attackers = set(order[: round(fraction * num_clients)].tolist())
    mask = [k in attackers for k in range(num_clients)]
    benign = [k for k in range(num_clients) if k not in attackers]
    attacked = contaminate(updates, mask, attack, generator=torch.Generator().manual_seed(seed))
    row = {}
    for name in aggregators:
        options = {"contaminated": mask} if name == "oracle" else {}
        if name == "clair" and checks is not None:
            options["checks"] = checks
        result = aggregate(name, attacked, **options)
        row[f"error_{name}"] = benign_error(result, truth, benign)
        if name == "clair":
            metrics = detection_metrics(result.contaminated, result.scores, mask)
            row.update({key: metrics[key] for key in ("f1", "auroc", "fpr")})
    return row


def save_results(folder: Path, cells: list[tuple[str, float, int, dict]], aggregators) -> None:
    """Every seed's cell as ``clair compare`` writes it, one folder per contaminated share."""
    task = {"name": "synthetic", "metric": "error", "higher_is_better": False}
    for fraction in sorted({fraction for _, fraction, _, _ in cells}):
        rows = [
            {
                "cell": {"aggregator": name, "contamination": attack, "seed": seed},
                "summary": {
                    "final_benign": row[f"error_{name}"],
                    **{key: row[key] if name == "clair" else None for key in ("f1", "fpr")},
                },
            }
            for attack, share, seed, row in cells
            if share == fraction
            for name in aggregators
        ]
        target = folder / f"synthetic_{round(100 * fraction)}pct"
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / "results.json", {"task": task, "cells": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fractions", default="0.2,0.4")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--heterogeneity", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument(
        "--attacks", default=",".join(a for a in sorted(ATTACKS) if a != "nonfinite")
    )
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument(
        "--checks", default=None, help="CLAIR's checks, comma-separated or 'all' (default: its own)"
    )
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README")
    parser.add_argument(
        "--save-results",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write every seed's cell to DIR/synthetic_<share>pct/results.json",
    )
    args = parser.parse_args()
    checks = (
        None
        if args.checks is None
        else (CHECKS if args.checks == "all" else tuple(args.checks.split(",")))
    )
    if checks is not None and args.update_readme:
        parser.error("--update-readme writes the default checks' table; drop --checks")
    torch.set_num_threads(1)
    aggregators = ["clair", *[b for b in args.baselines.split(",") if b]]
    print(
        f"K = {args.clients}, heterogeneity {args.heterogeneity}, noise {args.noise}, "
        f"{args.seeds} seeds, {SETTINGS}, threads {torch.get_num_threads()}, "
        f"checks {checks or 'default'}"
    )
    header = ["attack", "share", "F1", "AUROC", "FPR", *[f"err {a}" for a in aggregators]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print(*lines, sep="\n")
    seed_cells = []
    for attack in args.attacks.split(","):
        for fraction in (float(f) for f in args.fractions.split(",")):
            rows = [
                run_cell(
                    attack,
                    fraction,
                    args.clients,
                    args.heterogeneity,
                    args.noise,
                    seed,
                    aggregators,
                    checks,
                )
                for seed in range(args.seeds)
            ]
            seed_cells += [(attack, fraction, seed, row) for seed, row in enumerate(rows)]
            means = {
                key: statistics.mean(r[key] for r in rows if r[key] is not None) for key in rows[0]
            }
            cells = [
                attack,
                f"{fraction:.0%}",
                *(f"{means[k]:.2f}" for k in ("f1", "auroc", "fpr")),
            ]
            cells += [f"{means[f'error_{a}']:.3f}" for a in aggregators]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if args.update_readme:
        update_readme(args.update_readme, "attack-detection", "\n".join(lines) + "\n")
    if args.save_results:
        save_results(args.save_results, seed_cells, aggregators)


if __name__ == "__main__":
    main()
