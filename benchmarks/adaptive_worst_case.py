"""How far an attacker who stays inside CLAIR's benign ranges can move a benign refined update.

    python benchmarks/adaptive_worst_case.py                      # table and docs/ figure
    python benchmarks/adaptive_worst_case.py --update-readme README.md

The attackers (20% and 40% of K = 20, synthetic federation as in attack_detection.py) keep
their own benign update and add a coordinated rank-1 direction outside the benign subspace
(``rank1_off_subspace``) carrying a growing share ``energy`` of their update's squared norm: the
strongest shared push that no single-client statistic sees, since each attacker stays close to
its own honest update. For each share: whether CLAIR flags them (recall) and the benign
clients' refined updates' relative shift ``‖Θ̃_k(attacked) − Θ̃_k(clean)‖ / ‖Θ̃_k(clean)‖``
(mean and max over benign clients and seeds). The largest shift while undetected is the worst
case the README reports.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from attack_detection import federation  # noqa: E402

from clair_lightning import clair_aggregate  # noqa: E402
from clair_lightning.compare.report import update_readme  # noqa: E402
from clair_lightning.core import contaminate  # noqa: E402

ENERGIES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.3, 0.7)
FIGURE = Path("docs/adaptive_worst_case.png")


def shift(attacked, clean, k):
    squared = total = 0.0
    for name, (b, a) in clean.refined[k].items():
        rb, ra = attacked.refined[k][name]
        squared += float((rb @ ra - b @ a).square().sum())
        total += float((b @ a).square().sum())
    return (squared / total) ** 0.5


def measure(fraction, energy, seeds, num_clients=20):
    recalls, shifts = [], []
    for seed in range(seeds):
        updates, _ = federation(num_clients, 0.5, 0.1, seed)
        order = torch.randperm(num_clients, generator=torch.Generator().manual_seed(1000 + seed))
        attackers = set(order[: round(fraction * num_clients)].tolist())
        mask = [k in attackers for k in range(num_clients)]
        attacked = contaminate(
            updates,
            mask,
            "rank1_off_subspace",
            energy=energy,
            generator=torch.Generator().manual_seed(seed),
        )
        clean, result = clair_aggregate(updates), clair_aggregate(attacked)
        recalls.append(sum(result.contaminated[k] for k in attackers) / len(attackers))
        shifts += [shift(result, clean, k) for k in range(num_clients) if k not in attackers]
    return statistics.mean(recalls), statistics.mean(shifts), max(shifts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--update-readme", type=Path, default=None, metavar="README")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "| attackers | energy | recall | mean benign shift | max benign shift |",
        "|---|---|---|---|---|",
    ]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for fraction in (0.2, 0.4):
        rows = [(energy, *measure(fraction, energy, args.seeds)) for energy in ENERGIES]
        for energy, recall, mean_shift, max_shift in rows:
            lines.append(
                f"| {fraction:.0%} | {energy} | {recall:.2f} | {mean_shift:.3f} | {max_shift:.3f} |"
            )
        axis.plot(
            [r[0] for r in rows],
            [r[3] for r in rows],
            marker="o",
            label=f"{fraction:.0%} attackers, max over benign clients",
        )
        for energy, recall, _, max_shift in rows:
            if recall < 0.5:
                axis.scatter([energy], [max_shift], s=120, facecolors="none", edgecolors="red")
    axis.set_xlabel("share of each attacker's update on the shared off-subspace direction")
    axis.set_ylabel("benign refined update shift")
    axis.set_title("Adaptive worst case (red rings: attackers not flagged)")
    axis.legend(fontsize=8)
    FIGURE.parent.mkdir(exist_ok=True)
    figure.tight_layout()
    figure.savefig(FIGURE, dpi=90)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    print(f"figure: {FIGURE}")
    if args.update_readme:
        update_readme(args.update_readme, "adaptive-worst-case", text)


if __name__ == "__main__":
    main()
