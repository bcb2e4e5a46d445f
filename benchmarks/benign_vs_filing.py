"""CLAIR's benign metric per attack: the defence when issue 11 was filed (b590dfb) against now.

Issue 11 asks for detection "with benign error never worse than today's", today being b590dfb,
the parent of the first issue-11 commit. This script reads two ``clair compare`` output folders
of the same grid, one run with the code at b590dfb and one with the current code, pairs their
cells by scenario and seed (same seed: same data, same attackers, same attack messages) and
prints one Markdown table per recipe and share.

Produce the folders from the repository root (the attacks added since b590dfb are overlaid on
the old code: on the same benign updates their messages are bit-identical to the current ones,
and the old code trains the same benign updates):

    git worktree add --detach ../filing b590dfb
    cp clair_lightning/core/attacks.py ../filing/clair_lightning/core/attacks.py
    # an editable install resolves clair_lightning.recipes and .callbacks to the installed
    # checkout; these links make the old package use its own
    ln -s ../recipes ../filing/clair_lightning/recipes
    ln -s ../callbacks ../filing/clair_lightning/callbacks
    ATTACKS=none,a_little_is_enough,adaptive_in_subspace,gaussian,inner_product_manipulation
    ATTACKS=$ATTACKS,inner_product_manipulation_large,mimic,min_max_std,min_max_unit_vector
    ATTACKS=$ATTACKS,min_sum_std,min_sum_unit_vector,partial_off_subspace,rank1_off_subspace
    ATTACKS=$ATTACKS,scaling,sign_flip
    for stem in text_copy_20pct text_copy_40pct linear_regression_20pct linear_regression_40pct
    do
        # nonfinite (uploads dropped at validation) only where the recipe excludes them
        extra=$(case $stem in text_copy*) echo ,nonfinite;; esac)
        for version in filing now; do
            tree=$([ $version = filing ] && echo ../filing || echo .)
            OMP_NUM_THREADS=1 PYTHONPATH=$tree python -m clair_lightning.compare \\
                --config configs/$stem.yaml --aggregators clair --contaminations $ATTACKS$extra \\
                --seeds 0,1,2 --no-wandb --output results/benign_vs_filing/$version/$stem
        done
    done
    # the synthetic federations of benchmarks/attack_detection.py (issue 11's own setting)
    for version in filing now; do
        tree=$([ $version = filing ] && echo ../filing || echo .)
        OMP_NUM_THREADS=1 PYTHONPATH=$tree python benchmarks/attack_detection.py --seeds 10 \\
            --baselines '' --save-results results/benign_vs_filing/$version
    done
    python benchmarks/benign_vs_filing.py results/benign_vs_filing/{filing,now} \\
        --update-readme README.md

The attacks are the README's per-attack list; the configs are today's for both runs (b590dfb
accepts them unchanged). Every subfolder present in both roots with a ``results.json`` gives a
table. A difference is called worse (or better) when the mean of the
per-seed paired differences exceeds twice its standard error, else "within noise"; "same" when
every seed's difference is float rounding (at most 1e-6). The last column counts the seeds
where today's figure is the reference scenario's (``nonfinite`` where it ran, else
``gaussian``): what the benign clients get when every attacker's upload is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from clair_lightning.compare.report import update_readme

AGGREGATOR = "clair"
# Differences this small are float rounding of the two code paths (exact match moves in steps of
# 1/512 on the text-copy recipe), not a change of the result.
ROUNDING = 1e-6
# Scenarios whose attackers are all left out of the refinement (uploads dropped at validation,
# or every attacker flagged in every round): the first present is each table's reference.
REFERENCES = ("nonfinite", "gaussian")


def load_cells(folder: Path) -> tuple[dict, dict[tuple[str, int], dict]]:
    """The task (metric name and direction) and CLAIR's cell summaries by (scenario, seed)."""
    results = json.loads((folder / "results.json").read_text())
    cells = {
        (c["cell"]["contamination"], c["cell"]["seed"]): c["summary"]
        for c in results["cells"]
        if c["cell"]["aggregator"] == AGGREGATOR
    }
    return results["task"], cells


def paired_verdict(filing: list[float], now: list[float], higher_is_better: bool) -> dict:
    """Per-seed differences signed so that positive means now is worse, and their verdict."""
    worse = [(f - n) if higher_is_better else (n - f) for f, n in zip(filing, now, strict=True)]
    worse = [0.0 if abs(d) <= ROUNDING else d for d in worse]
    mean = statistics.fmean(worse)
    error = statistics.stdev(worse) / math.sqrt(len(worse)) if len(worse) > 1 else math.inf
    if not any(worse):
        verdict = "same"
    elif abs(mean) > 2 * error:
        verdict = "worse" if mean > 0 else "better"
    else:
        verdict = "within noise"
    return {
        "mean_worse": mean,
        "standard_error": error,
        "seeds_worse": sum(d > 0 for d in worse),
        "verdict": verdict,
    }


def _spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def _mean(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.fmean(known):.3f}" if known else "–"


def table(name: str, filing_folder: Path, now_folder: Path) -> str:
    """One recipe and share: every scenario both folders ran, over the seeds both ran."""
    task, filing = load_cells(filing_folder)
    now_task, now = load_cells(now_folder)
    if task != now_task:
        raise ValueError(f"{name}: the two folders measure different tasks: {task} vs {now_task}")
    common = sorted(set(filing) & set(now))
    if not common:
        raise ValueError(f"{name}: no scenario and seed in common")
    scenarios = list(dict.fromkeys(s for s, _ in sorted(common, key=lambda key: key[0] != "none")))
    metric = task["metric"]
    seeds = sorted({seed for _, seed in common})
    reference = next((s for s in REFERENCES if s in scenarios), None)
    lines = [
        f"**{name}**: benign {metric} "
        f"({'higher' if task['higher_is_better'] else 'lower'} is better), "
        f"mean ± std over seeds {', '.join(map(str, seeds))}",
        "",
        f"| scenario | filing {metric} | now {metric} | now worse by (paired ± s.e.) "
        "| seeds worse | verdict | F1 filing → now | FPR filing → now "
        f"| seeds now at {f'`{reference}`' if reference else 'a reference'}'s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        keys = [key for key in common if key[0] == scenario]
        old = [filing[key]["final_benign"] for key in keys]
        new = [now[key]["final_benign"] for key in keys]
        paired = paired_verdict(old, new, task["higher_is_better"])
        f1 = f"{_mean([filing[k]['f1'] for k in keys])} → {_mean([now[k]['f1'] for k in keys])}"
        fpr = f"{_mean([filing[k]['fpr'] for k in keys])} → {_mean([now[k]['fpr'] for k in keys])}"
        at_reference = "–"
        if reference is not None:
            pairs = [(now[k], now.get((reference, k[1]))) for k in keys]
            known = [(a, b) for a, b in pairs if b is not None]
            matching = sum(abs(a["final_benign"] - b["final_benign"]) <= ROUNDING for a, b in known)
            at_reference = f"{matching}/{len(known)}"
        lines.append(
            f"| {scenario} | {_spread(old)} | {_spread(new)} | "
            f"{paired['mean_worse']:+.4f} ± {paired['standard_error']:.4f} | "
            f"{paired['seeds_worse']}/{len(keys)} | {paired['verdict']} | {f1} | {fpr} "
            f"| {at_reference} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("filing", type=Path, help="root of the compare folders run at b590dfb")
    parser.add_argument("now", type=Path, help="root of the same compare folders run now")
    parser.add_argument(
        "--update-readme",
        type=Path,
        default=None,
        metavar="README",
        help="also write each table into this README's block benign_vs_filing:<folder>",
    )
    args = parser.parse_args(argv)
    names = sorted(
        p.parent.name
        for p in args.filing.glob("*/results.json")
        if (args.now / p.parent.name / "results.json").is_file()
    )
    if not names:
        print(
            f"benign_vs_filing: no compare folder with results.json in both {args.filing} and "
            f"{args.now}",
            file=sys.stderr,
        )
        return 2
    try:
        tables = {name: table(name, args.filing / name, args.now / name) for name in names}
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        print(f"benign_vs_filing: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print("\n".join(tables.values()), end="")
    if args.update_readme:
        for name, text in tables.items():
            update_readme(args.update_readme, f"benign_vs_filing:{name}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
