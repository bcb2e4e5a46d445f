"""`clair compare` end to end on a tiny grid: outputs exist, agree with results.json, resume."""

import json
import re
from pathlib import Path

import pytest

from clair_lightning.compare.__main__ import main
from clair_lightning.compare.backends import backend_for
from clair_lightning.compare.grid import expand_grid

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "linear_regression.yaml"
REPORT_FILES = (
    "report.md",
    "readme_table.md",
    "benign_metric.png",
    "score_heatmaps.png",
    "roc_curves.png",
)


def _run(output: Path, *extra: str) -> None:
    main(
        [
            "--config",
            str(CONFIG),
            "--aggregators",
            "clair,local,fedavg,krum",
            "--contaminations",
            "none,random_targets,sign_flip",
            "--seeds",
            "0,1",
            "--output",
            str(output),
            *extra,
        ]
    )


def test_tiny_grid_writes_a_report_that_agrees_with_results(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\ntext before\n")
    _run(tmp_path / "out", "--update-readme", str(readme))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())

    assert len(results["cells"]) == 4 * 3 * 2
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B runs"

    # Every number in the benign table is the mean over seeds of the final-round benign mean.
    text = (out / "report.md").read_text()
    for group in results["groups"]:
        cells = [
            c
            for c in results["cells"]
            if c["cell"]["aggregator"] == group["aggregator"]
            and c["cell"]["contamination"] == group["contamination"]
        ]
        benign = [
            sum(x["metrics"]["error"] for x in c["rounds"][-1]["clients"] if not x["contaminated"])
            / sum(not x["contaminated"] for x in c["rounds"][-1]["clients"])
            for c in cells
        ]
        assert group["final_benign"] == pytest.approx(sum(benign) / len(benign))
        assert f"{group['final_benign']:.4f} ±" in text

    clair = next(
        g
        for g in results["groups"]
        if g["aggregator"] == "clair" and g["contamination"] == "random_targets"
    )
    assert re.search(rf"\| clair \| random_targets \| .* \| {clair['f1']:.3f} \|", text)
    scenarios = (out / "scenario_table.md").read_text()
    assert f"| random_targets | {clair['f1']:.3f} | {clair['auroc']:.3f} |" in scenarios
    table = (out / "readme_table.md").read_text()
    assert "| linear_regression | clair |" in table
    assert table in readme.read_text() and readme.read_text().startswith("# Project")
    verdicts = {(v["contamination"], v["claim"]): v for v in results["claims"]}
    assert verdicts[("random_targets", "benign error better than local in every seed")]["holds"]


def test_finished_cells_are_not_rerun(tmp_path, capsys):
    output = tmp_path / "out"
    _run(output, "--no-wandb")
    stamps = {p.name: p.stat().st_mtime_ns for p in (output / "cells").glob("*.json")}
    capsys.readouterr()
    _run(output, "--no-wandb")
    assert "resuming: 24 of 24 cells already finished" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (output / "cells").glob("*.json")}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--aggregators", "clair,fedprox"], "unknown aggregator"),
        (["--contaminations", "reversed_targets"], "unknown contamination"),
        (["--seeds", "0,x"], "seeds must be integers"),
    ],
)
def test_bad_grids_are_refused_before_running(tmp_path, capsys, arguments, message):
    base = {"--aggregators": "clair", "--contaminations": "none", "--seeds": "0"}
    base.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    argv = ["--config", str(CONFIG), "--output", str(tmp_path / "out")]
    for key, value in base.items():
        argv += [key, value]
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "cells").exists() or not any(
        (tmp_path / "out" / "cells").iterdir()
    )


def test_unreadable_or_unknown_config(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("just: [a, list")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("recipe: protein_folding\n")
    for config, message in (
        (tmp_path / "missing.yaml", "cannot read config"),
        (broken, "not valid YAML"),
        (unknown, "names no known recipe"),
    ):
        with pytest.raises(ValueError, match=message):
            backend_for(config)


def test_grid_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicates"):
        expand_grid("r", ["clair", "clair"], ["none"], [0])


def test_tiny_lightning_grid_end_to_end(tmp_path, capsys):
    """The same command runs the text-copying recipe through the Lightning path."""
    output = tmp_path / "out"
    main(
        [
            "--config",
            "configs/text_copy_smoke.yaml",
            "--aggregators",
            "clair,fedavg",
            "--contaminations",
            "none,reversed_targets",
            "--seeds",
            "0",
            "--output",
            str(output),
        ]
    )
    results = json.loads((output / "results.json").read_text())
    assert results["recipe"] == "text_copy_smoke"
    assert results["task"] == {"metric": "exact_match", "higher_is_better": True}
    assert len(results["cells"]) == 4
    for name in REPORT_FILES:
        assert (output / name).stat().st_size > 0, name
    for cell in results["cells"]:
        run_dir = Path(cell["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["aggregator"]["name"] == cell["cell"]["aggregator"]
        assert summary["data"]["contamination"] == cell["cell"]["contamination"]
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        final = summary["rounds"][-1]
        assert cell["summary"]["final_benign"] == pytest.approx(final["benign_mean"]["exact_match"])
    text = (output / "report.md").read_text()
    group = next(
        g
        for g in results["groups"]
        if g["aggregator"] == "clair" and g["contamination"] == "reversed_targets"
    )
    assert f"{group['final_benign']:.4f} ±" in text


def test_compare_command_runs_offline_without_a_wandb_account(tmp_path):
    """A fresh shell: no WANDB_MODE, no API key. The command must not try to log in."""
    import os
    import subprocess

    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    environment["HOME"] = str(tmp_path)  # no ~/.netrc, no wandb settings
    completed = subprocess.run(
        _compare_command(
            CONFIG,
            "--aggregators",
            "clair,fedavg",
            "--contaminations",
            "random_targets",
            "--seeds",
            "0",
            "--output",
            str(tmp_path / "o"),
        ),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert list((tmp_path / "o" / "wandb").glob("offline-run-*"))


def test_a_pool_of_workers_gives_the_same_cells_as_one_process(tmp_path):
    arguments = [
        "--config",
        str(CONFIG),
        "--aggregators",
        "clair,fedavg",
        "--contaminations",
        "random_targets",
        "--seeds",
        "0,1",
        "--no-wandb",
    ]
    main([*arguments, "--output", str(tmp_path / "one")])
    main([*arguments, "--output", str(tmp_path / "pool"), "--workers", "2"])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    pool = json.loads((tmp_path / "pool" / "results.json").read_text())
    assert len(one["cells"]) == len(pool["cells"]) == 4
    for a, b in zip(one["cells"], pool["cells"], strict=True):
        assert a["cell"] == b["cell"]
        for client_a, client_b in zip(
            a["rounds"][-1]["clients"], b["rounds"][-1]["clients"], strict=True
        ):
            # Identical decisions; floats equal up to BLAS summation order across processes.
            assert client_a["flag"] == client_b["flag"]
            if client_a["score"] is None:
                assert client_b["score"] is None
            else:
                assert client_a["score"] == pytest.approx(client_b["score"], rel=1e-9, abs=1e-12)
            assert client_a["metrics"]["error"] == pytest.approx(
                client_b["metrics"]["error"], rel=1e-9
            )


def test_a_grid_where_every_aggregator_ends_equal_is_not_judged_on_benign_claims():
    from clair_lightning.compare.report import claims

    def group(aggregator, final):
        return {
            "aggregator": aggregator,
            "contamination": "sign_flip",
            "final_benign": final,
            "per_seed_benign": {0: final},
            "final_f1": 1.0,
            "f1": 1.0,
            "auroc": 1.0,
            "fpr": 0.0,
        }

    def results(finals):
        return {
            "task": {"metric": "exact_match", "higher_is_better": True},
            "grid": {"aggregators": list(finals), "contaminations": ["sign_flip"], "seeds": [0]},
            "groups": [group(name, final) for name, final in finals.items()],
        }

    equal = claims(results({"clair": 0.042, "fedavg": 0.042, "median": 0.042}))
    benign = [v for v in equal if "benign" in v["claim"]]
    assert benign and all(v["holds"] is None and "not judged" in v["measured"] for v in benign)
    assert [v["holds"] for v in equal if "F1" in v["claim"]] == [True]
    apart = claims(results({"clair": 0.5, "fedavg": 0.1, "median": 0.3}))
    assert [v["holds"] for v in apart if "benign" in v["claim"]] == [True, True]


def _compare_command(config: Path, *arguments: str) -> list[str]:
    """``clair compare`` on ``config``, as a fresh process runs it."""
    import sys

    return [
        sys.executable,
        "-c",
        "from clair_lightning.cli import main; raise SystemExit(main())",
        "compare",
        "--config",
        str(config),
        *arguments,
    ]


INTERRUPTED_GRID = (
    "--aggregators", "clair,fedavg,local", "--contaminations", "random_targets", "--seeds", "0,1,2",
)  # fmt: skip


def _start_compare(config: Path, output: Path):
    import subprocess

    command = _compare_command(
        config, *INTERRUPTED_GRID, "--workers", "2", "--no-wandb", "--output", str(output)
    )
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers_once_records_grow(process, cells: Path, more_than: int):
    """The comparison's worker processes, once more than ``more_than`` cells are recorded."""
    import time

    import psutil

    deadline = time.monotonic() + 300
    while len(list(cells.glob("*.json"))) <= more_than:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no new cell was recorded: {process.communicate()}")
        time.sleep(0.1)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "the comparison runs no worker processes"
    return workers


def test_a_killed_or_terminated_comparison_leaves_no_workers_and_resumes(tmp_path, capsys):
    import signal

    import psutil

    output, cells = tmp_path / "o", tmp_path / "o" / "cells"
    # Cells of a few seconds each (the default regression cell takes milliseconds), so that an
    # interruption always lands in the middle of the grid.
    config = tmp_path / "slow.yaml"
    config.write_text(
        CONFIG.read_text()
        .replace("d_out: 30", "d_out: 400")
        .replace("d_in: 20", "d_in: 300")
        .replace("samples: 50", "samples: 2000")
    )
    assert "d_out: 400" in config.read_text() and "samples: 2000" in config.read_text()
    total = len(
        expand_grid(
            "linear_regression", ["clair", "fedavg", "local"], ["random_targets"], [0, 1, 2]
        )
    )

    killed = _start_compare(config, output)
    workers = _workers_once_records_grow(killed, cells, 0)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"workers outlived a SIGKILLed comparison: {alive}"
    after_kill = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    assert 1 <= len(after_kill) < total

    terminated = _start_compare(config, output)
    workers = _workers_once_records_grow(terminated, cells, len(after_kill))
    terminated.send_signal(signal.SIGTERM)
    out, err = terminated.communicate(timeout=60)
    assert terminated.returncode == 130, err[-2000:]
    assert f"resuming: {len(after_kill)} of {total} cells already finished" in out
    assert "interrupted; finished cells are kept in" in err and "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"workers outlived a terminated comparison: {alive}"
    after_term = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    assert len(after_kill) < len(after_term) < total

    main(["--config", str(config), *INTERRUPTED_GRID, "--no-wandb", "--output", str(output)])
    assert (
        f"resuming: {len(after_term)} of {total} cells already finished" in capsys.readouterr().out
    )
    final = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    assert len(final) == total
    # The mechanism: cells finished before an interruption were never run again.
    assert all(final[name] == mtime for name, mtime in after_term.items())
    assert len(json.loads((output / "results.json").read_text())["cells"]) == total
