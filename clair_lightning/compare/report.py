"""From cell records to results.json, report.md, PNG plots, a README table and W&B runs.

Every figure in the report is computed here from the per-client records, so the tables, plots
and README table cannot disagree with ``results.json``.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_roc  # noqa: E402

from ..metrics import detection_metrics, unit_interval_scores  # noqa: E402
from .grid import NO_CONTAMINATION, Cell  # noqa: E402

ROBUST_BASELINES = ("median", "trimmed_mean", "krum", "multikrum", "geomedian")
DETECTION_NAMES = ("precision", "recall", "f1", "auroc", "fpr")
F1_GOAL = 0.95
ATTACK_SUCCESS = "attack_success"  # backdoor probes' exact match, when the recipe has probes


def summarise_cell(record: dict) -> dict[str, Any]:
    """Per-round benign means and detection metrics, and the cell's headline figures."""
    metric = record["task"]["metric"]
    rounds = []
    for round_record in record["rounds"]:
        clients = round_record["clients"]
        benign = [c["metrics"][metric] for c in clients if not c["contaminated"]]
        scores = [c["score"] for c in clients]
        detection = detection_metrics(
            [c["flag"] for c in clients],
            None if any(s is None for s in scores) else scores,
            [c["contaminated"] for c in clients],
        )
        attack = [
            c["metrics"][ATTACK_SUCCESS]
            for c in clients
            if not c["contaminated"] and ATTACK_SUCCESS in c["metrics"]
        ]
        rounds.append(
            {
                "round": round_record["round"],
                "benign_mean": statistics.fmean(benign) if benign else None,
                "benign_attack_success": statistics.fmean(attack) if attack else None,
                **{name: detection[name] for name in DETECTION_NAMES},
            }
        )
    final = rounds[-1]
    return {
        "rounds": rounds,
        "final_benign": final["benign_mean"],
        "final_attack_success": final["benign_attack_success"],
        **{f"final_{name}": final[name] for name in DETECTION_NAMES},
        **{name: _mean([r[name] for r in rounds]) for name in DETECTION_NAMES},
        "runtime_seconds": record["runtime_seconds"],
    }


def build_results(comparison: dict) -> dict:
    """``results.json``: the grid, every cell with every round, and per-group statistics."""
    cells = []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in comparison["cells"]:
        summary = summarise_cell(record)
        cells.append({**record, "summary": summary})
        cell = record["cell"]
        groups[(cell["aggregator"], cell["contamination"])].append(
            {"seed": cell["seed"], **summary}
        )
    table = []
    for (aggregator, contamination), runs in groups.items():
        row = {"aggregator": aggregator, "contamination": contamination, "seeds": len(runs)}
        names = ("final_benign", "final_attack_success", *DETECTION_NAMES, "final_f1")
        for name in (*names, "runtime_seconds"):
            values = [run[name] for run in runs if run[name] is not None]
            row[name] = _mean(values)
            row[f"{name}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        row["per_seed_benign"] = {run["seed"]: run["final_benign"] for run in runs}
        table.append(row)
    results = {key: comparison[key] for key in ("config", "recipe", "task", "grid")}
    results["groups"] = table
    results["cells"] = cells
    results["claims"] = claims(results)
    return results


def claims(results: dict) -> list[dict]:
    """The paper's headline, checked per contaminated scenario, plus the no-contamination cost."""
    higher = results["task"]["higher_is_better"]
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    aggregators = results["grid"]["aggregators"]
    verdicts = []
    if "clair" not in aggregators:
        return verdicts
    for contamination in results["grid"]["contaminations"]:
        clair = groups[("clair", contamination)]
        if contamination == NO_CONTAMINATION:
            fedavg = groups.get(("fedavg", contamination))
            cost = (
                f"; benign {results['task']['metric']} {clair['final_benign']:.4f} vs FedAvg "
                f"{fedavg['final_benign']:.4f}"
                if fedavg
                else ""
            )
            verdicts.append(
                {
                    "contamination": contamination,
                    "claim": "no contamination: false-positive rate and cost versus FedAvg",
                    "measured": f"FPR {clair['fpr']:.3f}{cost}",
                    "holds": None,
                }
            )
            continue
        # A grid on which every aggregator ends with the same benign metric (e.g. a smoke
        # config) cannot tell aggregators apart: its benign claims are reported, not judged.
        finals = {g["final_benign"] for (_, c), g in groups.items() if c == contamination}
        indistinct = len(groups) > 1 and len(finals) == 1
        too_small = " (not judged: every aggregator ends equal; the grid is too small)"
        verdicts.append(
            {
                "contamination": contamination,
                "claim": f"detection F1 >= {F1_GOAL} on average over seeds (final round)",
                "measured": f"final-round F1 {_fmt(clair['final_f1'])} (over all rounds "
                f"{_fmt(clair['f1'])}), AUROC {_fmt(clair['auroc'])}, FPR {_fmt(clair['fpr'])}",
                "holds": clair["final_f1"] is not None and clair["final_f1"] >= F1_GOAL,
            }
        )
        for rival in ("local", "fedavg"):
            if (rival, contamination) not in groups:
                continue
            other = groups[(rival, contamination)]["per_seed_benign"]
            wins = [
                better(clair["per_seed_benign"][s], other[s])
                for s in other
                if s in clair["per_seed_benign"]
            ]
            rival_mean = groups[(rival, contamination)]["final_benign"]
            verdicts.append(
                {
                    "contamination": contamination,
                    "claim": f"benign {results['task']['metric']} better than {rival} "
                    "in every seed",
                    "measured": f"better in {sum(wins)}/{len(wins)} seeds (mean "
                    f"{clair['final_benign']:.4f} vs {rival_mean:.4f})"
                    + (too_small if indistinct else ""),
                    "holds": None if indistinct else bool(wins) and all(wins),
                }
            )
        robust = [
            groups[(name, contamination)]
            for name in ROBUST_BASELINES
            if (name, contamination) in groups
        ]
        if robust:
            best = (max if higher else min)(robust, key=lambda g: g["final_benign"])
            verdicts.append(
                {
                    "contamination": contamination,
                    "claim": "benign metric at least as good as the best robust baseline",
                    "measured": f"CLAIR {clair['final_benign']:.4f} vs {best['aggregator']} "
                    f"{best['final_benign']:.4f}" + (too_small if indistinct else ""),
                    "holds": None
                    if indistinct
                    else not better(best["final_benign"], clair["final_benign"]),
                }
            )
    return verdicts


def markdown(results: dict, command: str) -> str:
    """The report: claims, benign metric table, detection table."""
    metric = results["task"]["metric"]
    direction = "higher is better" if results["task"]["higher_is_better"] else "lower is better"
    grid = results["grid"]
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    lines = [
        f"# Comparison on `{results['recipe']}`",
        "",
        f"Produced by `{command}`: {len(grid['aggregators'])} aggregators x "
        f"{len(grid['contaminations'])} contamination scenarios x {len(grid['seeds'])} seeds.",
        "",
        "## Claims",
        "",
        "| scenario | claim | measured | holds |",
        "|---|---|---|---|",
    ]
    for verdict in results["claims"]:
        mark = {True: "yes", False: "**NO**", None: "(reported)"}[verdict["holds"]]
        lines.append(
            f"| {verdict['contamination']} | {verdict['claim']} | {verdict['measured']} | {mark} |"
        )
    lines += [
        "",
        f"## Benign-client {metric} after the last round ({direction}; mean ± std over seeds)",
        "",
        "| aggregator | " + " | ".join(grid["contaminations"]) + " |",
        "|---" * (len(grid["contaminations"]) + 1) + "|",
    ]
    for aggregator in grid["aggregators"]:
        cells = []
        for contamination in grid["contaminations"]:
            group = groups[(aggregator, contamination)]
            cells.append(f"{group['final_benign']:.4f} ± {group['final_benign_std']:.4f}")
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    attacked = [
        c
        for c in grid["contaminations"]
        if any(groups[(a, c)]["final_attack_success"] is not None for a in grid["aggregators"])
    ]
    if attacked:
        lines += [
            "",
            "## Benign-client attack success on triggered held-out prompts after the last round "
            "(lower is better)",
            "",
            "| aggregator | " + " | ".join(attacked) + " |",
            "|---" * (len(attacked) + 1) + "|",
        ]
        for aggregator in grid["aggregators"]:
            rates = [_fmt(groups[(aggregator, c)]["final_attack_success"]) for c in attacked]
            lines.append(f"| {aggregator} | " + " | ".join(rates) + " |")
    lines += [
        "",
        "## Detection (positive = contaminated; mean over rounds and seeds)",
        "",
        "Precision, recall and F1 use the aggregator's flags; AUROC its scores. Rules that do "
        "not flag are omitted; `–` marks a metric undefined for the scenario (no contaminated "
        "client).",
        "",
        "| aggregator | scenario | precision | recall | F1 | AUROC | FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for aggregator in grid["aggregators"]:
        if (
            not any(
                groups[(aggregator, c)]["fpr"] or groups[(aggregator, c)]["recall"]
                for c in grid["contaminations"]
            )
            and aggregator != "clair"
        ):
            continue
        for contamination in grid["contaminations"]:
            group = groups[(aggregator, contamination)]
            lines.append(
                f"| {aggregator} | {contamination} | "
                + " | ".join(_fmt(group[name]) for name in DETECTION_NAMES)
                + " |"
            )
    lines += ["", "Plots: `benign_metric.png`, `score_heatmaps.png`, `roc_curves.png`.", ""]
    return "\n".join(lines)


def readme_table(results: dict) -> str:
    """litgpt-style table: one row per aggregator, averaged over contaminated scenarios."""
    metric = results["task"]["metric"]
    contaminated = [c for c in results["grid"]["contaminations"] if c != NO_CONTAMINATION]
    scenarios = contaminated or results["grid"]["contaminations"]
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    lines = [
        f"| recipe | aggregator | benign {metric} | detection F1 (all rounds) "
        "| runtime per run (s) |",
        "|---|---|---|---|---|",
    ]
    for aggregator in results["grid"]["aggregators"]:
        rows = [groups[(aggregator, c)] for c in scenarios]
        f1 = _mean([row["f1"] for row in rows if row["f1"] is not None])
        flags = aggregator == "clair" or any(row["recall"] for row in rows)
        lines.append(
            f"| {results['recipe']} | {aggregator} | "
            f"{_mean([row['final_benign'] for row in rows]):.4f} | "
            f"{_fmt(f1) if flags else '–'} | "
            f"{_mean([row['runtime_seconds'] for row in rows]):.1f} |"
        )
    return "\n".join(lines) + (
        f"\n\nBenign {metric} after the last round and detection F1 over all rounds, averaged "
        f"over {', '.join(scenarios)} and {len(results['grid']['seeds'])} seeds; runtime is "
        "wall-clock per run on the machine that ran the grid.\n"
    )


def scenario_table(results: dict) -> str:
    """One row per scenario: CLAIR's detection F1, AUROC and FPR, then every aggregator's
    benign metric (mean over seeds, last round)."""
    metric = results["task"]["metric"]
    grid = results["grid"]
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    detection = ["F1", "AUROC", "FPR"] if "clair" in grid["aggregators"] else []
    header = ["scenario", *(f"CLAIR {name}" for name in detection)]
    header += [f"{aggregator} {metric}" for aggregator in grid["aggregators"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for contamination in grid["contaminations"]:
        cells = [contamination]
        if detection:
            clair = groups[("clair", contamination)]
            cells += [_fmt(clair[name]) for name in ("f1", "auroc", "fpr")]
        cells += [f"{groups[(a, contamination)]['final_benign']:.4f}" for a in grid["aggregators"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nPer scenario, mean over {len(grid['seeds'])} seeds (detection over all rounds; "
        "`–`: undefined, no contaminated client).\n"
    )


def update_readme(readme: Path, block_name: str, text: str) -> None:
    """Replace (or append) the generated block ``<!-- block_name:start/end -->`` in a README."""
    start, end = f"<!-- {block_name}:start -->", f"<!-- {block_name}:end -->"
    block = f"{start}\n{text}{end}"
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    readme.write_text(text)


def plots(results: dict, output: Path) -> list[Path]:
    """Benign metric per aggregator, CLAIR score heatmaps over rounds, ROC curves."""
    written = [_benign_bars(results, output / "benign_metric.png")]
    if "clair" in results["grid"]["aggregators"]:
        written.append(_score_heatmaps(results, output / "score_heatmaps.png"))
        written.append(_roc_curves(results, output / "roc_curves.png"))
    return written


def _benign_bars(results: dict, path: Path) -> Path:
    grid = results["grid"]
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    width = 0.8 / len(grid["aggregators"])
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(grid["contaminations"])), 4))
    for index, aggregator in enumerate(grid["aggregators"]):
        xs = [c + index * width for c in range(len(grid["contaminations"]))]
        rows = [groups[(aggregator, c)] for c in grid["contaminations"]]
        axis.bar(
            xs,
            [r["final_benign"] for r in rows],
            width,
            yerr=[r["final_benign_std"] for r in rows],
            label=aggregator,
            capsize=2,
            edgecolor="black" if aggregator == "clair" else None,
        )
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(grid["contaminations"]))])
    axis.set_xticklabels(grid["contaminations"], rotation=15)
    axis.set_ylabel(f"benign {results['task']['metric']}")
    axis.set_title(f"{results['recipe']}: benign clients after the last round")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def _score_heatmaps(results: dict, path: Path) -> Path:
    scenarios = results["grid"]["contaminations"]
    seed = results["grid"]["seeds"][0]
    figure, axes = plt.subplots(
        1, len(scenarios), figsize=(3.2 * len(scenarios), 3.6), squeeze=False
    )
    for axis, contamination in zip(axes[0], scenarios, strict=True):
        cell = next(
            c
            for c in results["cells"]
            if c["cell"]["aggregator"] == "clair"
            and c["cell"]["contamination"] == contamination
            and c["cell"]["seed"] == seed
        )
        clients = cell["rounds"][0]["clients"]
        scores = torch.tensor([[_finite(c["score"]) for c in r["clients"]] for r in cell["rounds"]])
        image = axis.imshow(
            scores.T.clamp(max=20), aspect="auto", cmap="viridis", interpolation="nearest"
        )
        axis.set_yticks(range(len(clients)))
        axis.set_yticklabels(
            [f"{c['client']}{' *' if c['contaminated'] else ''}" for c in clients], fontsize=6
        )
        for position, c in enumerate(clients):
            if c["contaminated"]:
                axis.get_yticklabels()[position].set_color("red")
        axis.set_xticks(range(len(cell["rounds"])))
        axis.set_xticklabels([r["round"] for r in cell["rounds"]], fontsize=7)
        axis.set(xlabel="round", title=f"{contamination} (seed {seed})")
        figure.colorbar(image, ax=axis, fraction=0.05)
    axes[0][0].set_ylabel("client (* red = contaminated)")
    figure.suptitle("CLAIR scores per client and round (clipped at 20)")
    return _save(figure, path)


def _roc_curves(results: dict, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for contamination in results["grid"]["contaminations"]:
        scores, truth = [], []
        for cell in results["cells"]:
            if (
                cell["cell"]["aggregator"] == "clair"
                and cell["cell"]["contamination"] == contamination
            ):
                for r in cell["rounds"]:
                    scores += [float(c["score"]) for c in r["clients"]]
                    truth += [int(c["contaminated"]) for c in r["clients"]]
        if not any(truth) or all(truth):
            continue
        fpr, tpr, _ = binary_roc(unit_interval_scores(scores), torch.tensor(truth))
        axis.plot(fpr.numpy(), tpr.numpy(), label=contamination)
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--")
    axis.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title="CLAIR ROC (all rounds and seeds)",
    )
    axis.legend(fontsize=7)
    return _save(figure, path)


def log_to_wandb(
    results: dict, output: Path, group: str, images: list[Path], log_cells: bool
) -> None:
    """One offline-by-default W&B run per cell (when the backend did not log) plus a report run."""
    import wandb

    directory = output  # W&B writes its runs under <output>/wandb/
    project = "clair-lightning-compare"
    if log_cells:
        for cell in results["cells"]:
            run = wandb.init(
                project=project,
                group=group,
                name=Cell(**cell["cell"]).key,
                dir=directory,
                config=cell["cell"],
                reinit="finish_previous",
                job_type="cell",
            )
            for round_summary in cell["summary"]["rounds"]:
                run.log(
                    {k: v for k, v in round_summary.items() if v is not None and k != "round"},
                    step=round_summary["round"],
                )
            run.finish()
    run = wandb.init(
        project=project,
        group=group,
        name=f"{group}-report",
        dir=directory,
        config=results["grid"],
        reinit="finish_previous",
        job_type="report",
    )
    columns = ["aggregator", "contamination", "final_benign", *DETECTION_NAMES, "runtime_seconds"]
    run.log(
        {
            "groups": wandb.Table(
                columns=columns, data=[[g[c] for c in columns] for g in results["groups"]]
            ),
            **{path.stem: wandb.Image(str(path)) for path in images},
        }
    )
    run.finish()


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _finite(score: float | str | None) -> float:
    if score is None:
        return 0.0
    if score in ("inf", float("inf")):
        return 1e6
    return float(score)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
