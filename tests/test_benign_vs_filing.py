"""benchmarks/benign_vs_filing.py: cells paired by seed, "worse" in the task's own direction."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "benign_vs_filing.py"
spec = importlib.util.spec_from_file_location("benign_vs_filing", SCRIPT)
benign_vs_filing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benign_vs_filing)


def _folder(root: Path, name: str, higher_is_better: bool, benign: dict) -> None:
    """A compare folder whose results.json holds CLAIR cells with the given final benign metric."""
    cells = [
        {
            "cell": {"aggregator": aggregator, "contamination": scenario, "seed": seed},
            "summary": {"final_benign": value, "f1": 1.0, "fpr": 0.0},
        }
        for (scenario, seed), value in benign.items()
        for aggregator in ("clair", "local")
    ]
    task = {"metric": "m", "higher_is_better": higher_is_better}
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps({"task": task, "cells": cells}))


def test_worse_follows_the_metric_direction_and_rounding_is_the_same():
    up, down = [0.80, 0.81, 0.82], [0.78, 0.78, 0.79]
    assert benign_vs_filing.paired_verdict(up, down, higher_is_better=True)["verdict"] == "worse"
    assert benign_vs_filing.paired_verdict(up, down, higher_is_better=False)["verdict"] == "better"
    noisy = benign_vs_filing.paired_verdict(up, [0.70, 0.90, 0.83], higher_is_better=True)
    assert noisy["verdict"] == "within noise" and noisy["seeds_worse"] == 1
    rounded = benign_vs_filing.paired_verdict(up, [v + 1e-9 for v in up], higher_is_better=False)
    assert rounded["verdict"] == "same" and rounded["seeds_worse"] == 0
    cancelling = benign_vs_filing.paired_verdict(up, [0.79, 0.82, 0.82], higher_is_better=True)
    assert abs(cancelling["mean_worse"]) < 1e-12 and cancelling["verdict"] == "within noise"


def test_tables_pair_cells_by_scenario_and_seed(tmp_path, capsys):
    filing = {("none", 0): 0.5, ("none", 1): 0.5, ("gaussian", 0): 0.30, ("gaussian", 1): 0.32}
    now = {("gaussian", 1): 0.22, ("gaussian", 0): 0.20, ("none", 0): 0.5, ("none", 1): 0.5}
    _folder(tmp_path / "filing", "recipe_20pct", False, filing)
    _folder(tmp_path / "now", "recipe_20pct", False, now)
    _folder(tmp_path / "filing", "only_filing", False, filing)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n")
    roots = [str(tmp_path / "filing"), str(tmp_path / "now")]
    assert benign_vs_filing.main([*roots, "--update-readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert f"<!-- benign_vs_filing:recipe_20pct:start -->\n{printed}" in readme.read_text()
    lines = printed.splitlines()
    assert lines[0].startswith("**recipe_20pct**") and not any("only_filing" in x for x in lines)
    none, gaussian = lines[4], lines[5]
    assert none.startswith("| none |") and "| same |" in none
    assert gaussian.startswith("| gaussian | 0.3100 ± 0.0141 | 0.2100 ± 0.0141 | -0.1000 ± 0.0000")
    assert "| 0/2 | better |" in gaussian


def test_the_last_column_counts_seeds_at_the_reference_scenario(tmp_path, capsys):
    filing = {("gaussian", 0): 0.30, ("gaussian", 1): 0.30, ("rank1", 0): 0.20, ("rank1", 1): 0.2}
    now = {("gaussian", 0): 0.31, ("gaussian", 1): 0.33, ("rank1", 0): 0.31, ("rank1", 1): 0.25}
    _folder(tmp_path / "filing", "recipe_40pct", False, filing)
    _folder(tmp_path / "now", "recipe_40pct", False, now)
    assert benign_vs_filing.main([str(tmp_path / "filing"), str(tmp_path / "now")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].endswith("| seeds now at `gaussian`'s |")
    assert lines[4].startswith("| gaussian |") and lines[4].endswith("| 2/2 |")
    assert lines[5].startswith("| rank1 |")
    assert lines[5].endswith("| worse | 1.000 → 1.000 | 0.000 → 0.000 | 1/2 |")


def test_attack_detection_saves_cells_that_benign_vs_filing_pairs(tmp_path, capsys, monkeypatch):
    """The synthetic federations' per-seed cells, in the compare format, read back and paired."""
    script = SCRIPT.parent / "attack_detection.py"
    spec = importlib.util.spec_from_file_location("attack_detection", script)
    attack_detection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attack_detection)
    for version in ("filing", "now"):
        argv = ["attack_detection.py", "--seeds", "2", "--attacks", "gaussian,sign_flip"]
        argv += ["--baselines", "", "--save-results", str(tmp_path / version)]
        monkeypatch.setattr("sys.argv", argv)
        attack_detection.main()
    saved = json.loads((tmp_path / "now" / "synthetic_20pct" / "results.json").read_text())
    assert saved["task"]["higher_is_better"] is False and len(saved["cells"]) == 4
    assert {c["cell"]["seed"] for c in saved["cells"]} == {0, 1}
    capsys.readouterr()
    assert benign_vs_filing.main([str(tmp_path / "filing"), str(tmp_path / "now")]) == 0
    printed = capsys.readouterr().out
    assert "**synthetic_20pct**" in printed and "**synthetic_40pct**" in printed
    assert "| gaussian |" in printed and "| same | 1.000 → 1.000 | 0.000 → 0.000 | 2/2 |" in printed
