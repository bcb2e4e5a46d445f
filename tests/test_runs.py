"""Runs that survive: round checkpoints, resume after SIGKILL/SIGINT, bad values, lock, console."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

from clair_lightning.cli import main, run
from clair_lightning.experiment import RunFolder, read_resume

SMOKE = "configs/text_copy_smoke.yaml"
ROOT = Path(__file__).resolve().parents[1]
ROUNDS = ["--trainer.max_epochs", "4"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-round smoke run every resumed run must reproduce."""
    output = tmp_path_factory.mktemp("straight")
    return run(SMOKE, ["--run.output_dir", str(output), *ROUNDS, "--run.name", "straight"])


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _pause_config(tmp_path: Path, rounds: int) -> tuple[Path, Path]:
    marker = tmp_path / "paused"
    config = tmp_path / "pause.yaml"
    callback = {
        "class_path": "tests.helpers.PauseAfterRound",
        "init_args": {"rounds": rounds, "marker": str(marker)},
    }
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return config, marker


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    the child gets the default, so Ctrl-C is a KeyboardInterrupt however the suite was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_paused_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``clair fit`` in a real process, held at the start of round 3 (round 2 checkpointed)."""
    config, marker = _pause_config(tmp_path, rounds=2)
    command = [sys.executable, "-m", "clair_lightning.cli", "fit", "--config", SMOKE]
    command += ["--config", str(config), "--run.output_dir", str(tmp_path), *ROUNDS]
    process = subprocess.Popen(
        [*command, "--run.name", name],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run never reached round 3: {process.communicate()}")
        time.sleep(0.1)
    return process, tmp_path / name


def _assert_resumed_like_straight(run_dir: Path, straight: Path, killed_pid: int) -> None:
    resumed, reference = _summary(run_dir), _summary(straight)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    # The mechanism: rounds 1-2 come from the killed process, only rounds 3-4 were trained again.
    assert [r["session"] for r in resumed["rounds"]] == [0, 0, 1, 1]
    assert resumed["sessions"][0]["pid"] == killed_pid
    assert resumed["sessions"][1] == {"after_round": 2, "pid": os.getpid()}
    for got, want in zip(resumed["rounds"], reference["rounds"], strict=True):
        assert [c["flag"] for c in got["clients"]] == [c["flag"] for c in want["clients"]]
        assert [c["score"] for c in got["clients"]] == [c["score"] for c in want["clients"]]
        assert [c["metrics"] for c in got["clients"]] == [c["metrics"] for c in want["clients"]]


def test_a_run_killed_with_sigkill_after_round_two_resumes_at_round_three(
    tmp_path, straight, capsys
):
    process, run_dir = _start_paused_run(tmp_path, "killed")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert [r["round"] for r in _summary(run_dir)["rounds"]] == [1, 2]
    assert read_resume(RunFolder(run_dir, "killed", "g"), "last").rounds == 2

    overrides = ["--run.output_dir", str(tmp_path), *ROUNDS, "--run.name", "killed"]
    run(SMOKE, [*overrides, "--ckpt_path", "last"])
    printed = capsys.readouterr().out
    assert f"resuming after round 2 of 4 from {run_dir / 'checkpoints' / 'last.ckpt'}" in printed
    assert "round 1/4" not in printed and "round 3/4" in printed and "round 4/4" in printed
    _assert_resumed_like_straight(run_dir, straight, process.pid)


def test_a_run_interrupted_with_sigint_after_round_two_resumes_at_round_three(tmp_path, straight):
    process, run_dir = _start_paused_run(tmp_path, "interrupted")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert f"clair: interrupted in round 3; round 2 is saved in {checkpoint}" in stderr
    assert "Traceback" not in stderr
    assert not (run_dir / "adapters").exists()  # adapters are written by a finished run only
    overrides = ["--run.output_dir", str(tmp_path), *ROUNDS, "--run.name", "interrupted"]
    run(SMOKE, [*overrides, "--ckpt_path", "last"])
    _assert_resumed_like_straight(run_dir, straight, process.pid)


def test_resuming_a_finished_run_trains_nothing_and_opens_no_wandb_run(straight, capsys):
    wandb_runs = sorted((straight / "wandb").glob("offline-run-*"))
    overrides = ["--run.output_dir", str(straight.parent), *ROUNDS, "--run.name", "straight"]
    run(SMOKE, [*overrides, "--ckpt_path", "last"])
    assert "already finished 4 of 4 rounds; nothing to train" in capsys.readouterr().out
    assert sorted((straight / "wandb").glob("offline-run-*")) == wandb_runs
    assert [r["session"] for r in _summary(straight)["rounds"]] == [0, 0, 0, 0]


def test_a_truncated_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, straight, capsys):
    run_dir = tmp_path / "truncated"
    shutil.copytree(straight, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    overrides = ["--run.output_dir", str(tmp_path), *ROUNDS, "--run.name", "truncated"]
    code = main(["fit", "--config", SMOKE, *overrides, "--ckpt_path", "last"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1
    assert error[0].startswith(f"clair: error: checkpoint {checkpoint} is unreadable")


def test_a_failed_checkpoint_write_keeps_the_previous_round_intact(tmp_path, monkeypatch, capsys):
    import lightning.pytorch as pl

    original = pl.Trainer.save_checkpoint
    calls = []

    def disk_full_in_round_two(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 2:
            Path(filepath).write_bytes(b"half a checkpoint")
            raise OSError(28, "No space left on device", str(filepath))
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", disk_full_in_round_two)
    code = main(["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path), *ROUNDS])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in error if "clair:" in line] == error[-1:]
    assert "No space left on device" in error[-1]
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert read_resume(RunFolder(run_dir, run_dir.name, "g"), "last").rounds == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_second_run_with_the_same_name_is_refused_while_the_first_holds_it(tmp_path, capsys):
    name = "text_copy_smoke-clair-reversed_targets-seed0"
    with FileLock(tmp_path / f".{name}.lock"):  # the first run (another process) holds it
        code = main(["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"clair: error: run folder {tmp_path / name} is in use by another clair process "
        f"(lock {tmp_path / f'.{name}.lock'}); wait for it to finish or choose another --run.name"
    )
    assert not (tmp_path / name).exists()


def test_console_prints_a_round_summary_and_test_and_validate_print_metrics(straight, capsys):
    settings = ["--config", SMOKE, "--run.output_dir", str(straight.parent), *ROUNDS]
    assert main(["validate", *settings, "--run.name", "straight"]) == 0
    assert main(["test", *settings, "--run.name", "straight"]) == 0
    printed = capsys.readouterr().out
    assert "validate after round 4: benign clients (3 of 4) " in printed
    assert "test after round 4: benign clients (3 of 4) " in printed
    test_mean = _summary(straight)["test"]["benign_mean"]
    assert f"exact_match {test_mean['exact_match']:.3f}" in printed.split("test after")[1]
    logged = list((straight / "csv").glob("version_*/metrics.csv"))
    assert any("test/benign/exact_match" in path.read_text() for path in logged)


def test_round_summary_line_says_who_was_flagged_how_well_and_how_long(straight):
    from clair_lightning.callbacks.console import round_line

    record = _summary(straight)["rounds"][0]
    line = round_line(record, 4)
    flagged = [c["client"] for c in record["clients"] if c["flag"]]
    assert line.startswith(f"round 1/4: flagged {flagged} of 4 (truth [")
    assert "F1 " in line and "FPR " in line and "benign exact_match " in line
    assert line.endswith(" s")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--aggregation.options", "{threshold: -1}"],
            "threshold must be a positive finite number, got -1",
        ),
        (["--aggregation.options", "{checks: [bogus]}"], "checks must be a non-empty subset"),
        (["--aggregation.options", "{formulation: bogus}"], "formulation"),
        (["--optimizer", "Adam"], "unrecognized arguments"),
        (["--trainer.max_epochs", "0"], r"max_epochs \(the rounds\) must be at least 1"),
        (["--data.init_args.num_clients", "1"], "at least two clients, got num_clients=1"),
        (["--data.init_args.contaminated_fraction", "0.6"], r"must be in \[0, 0.5\), got 0.6"),
        (["--data.init_args.contamination", "poisoned"], "unknown contamination 'poisoned'"),
        (["--trainer.max_epochs", "x"], "trainer.max_epochs: Expected a <class 'int'>"),
    ],
)
def test_every_bad_value_is_one_line_exit_2_and_no_run_folder(
    tmp_path, capsys, straight, arguments, message
):
    """``straight`` first: the base is then cached, so no pre-training message is printed."""
    import re

    code = main(["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path), *arguments])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("clair: error: ")
    assert re.search(message, error[0]), error[0]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_bad_files_and_values_are_one_line_on_a_real_processs_stderr(tmp_path, straight):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("trainer: [max_epochs: 2\n")
    fit = ["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path / "runs")]  # base cached
    cases = [
        (["fit", "--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["fit", "--config", str(malformed)], "is not valid YAML (line 2, column 1)"),
        (["predict", "--config", SMOKE], "invalid choice"),
        ([*fit, "--data.init_args.num_clients", "1"], "at least two clients"),
        (
            [*fit, "--aggregation.options", "{threshold: -1}"],
            "threshold must be a positive finite number",
        ),
    ]
    script = "import sys; from clair_lightning.cli import main; sys.exit(main(sys.argv[1:]))"
    for arguments, message in cases:
        done = subprocess.run(
            [sys.executable, "-c", script, *arguments],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        error = done.stderr.strip().splitlines()
        assert done.returncode == 2, (arguments, done.stderr)
        assert len(error) == 1 and error[0].startswith("clair: error: "), done.stderr
        assert message in error[0]
    assert not (tmp_path / "runs").exists()


def test_help_mentions_compare_and_no_longer_offers_a_single_optimizer(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "clair compare --help" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--optimizer" not in capsys.readouterr().out


def test_checkpoint_holds_no_frozen_base_and_loads_with_weights_only(straight):
    checkpoint = torch.load(
        straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["epoch"] == 3
    assert all("lora_" in key for key in checkpoint["state_dict"])


def test_clair_fit_survives_a_client_scaled_by_1e20_and_records_its_exclusion(tmp_path):
    run_dir = run(
        SMOKE,
        [
            "--run.output_dir",
            str(tmp_path),
            "--data.init_args.contamination",
            "scaling",
            "--data.init_args.attack_options",
            "{factor: 1e20}",
        ],
    )
    summary = _summary(run_dir)
    attacker = summary["data"]["contaminated"].index(True)
    for record in summary["rounds"]:
        client = record["clients"][attacker]
        assert client["flag"] and "times the median client's" in client["excluded"]
        assert record["detection"]["recall"] == 1.0
        assert all(c["excluded"] is None for c in record["clients"] if c["client"] != attacker)
        assert 0 <= record["benign_mean"]["exact_match"] <= 1


def test_clair_fit_with_updates_that_never_move_gives_the_documented_idle_result(tmp_path):
    run_dir = run(SMOKE, ["--run.output_dir", str(tmp_path), "--model.learning_rate", "0"])
    for record in _summary(run_dir)["rounds"]:  # B stays 0: no client ever moves
        assert record["diagnostics"]["unmoved"] is True
        assert [c["flag"] for c in record["clients"]] == [False] * 4
        assert [c["score"] for c in record["clients"]] == [0.0] * 4


def test_ten_clients_four_per_round_sampled_from_the_seed_and_replayed_on_resume(tmp_path, capsys):
    from clair_lightning.metrics import detection_metrics
    from clair_lightning.recipes.text_copy import TextCopyDataModule

    sampling = ["--data.init_args.num_clients", "10", "--data.init_args.clients_per_round", "4"]
    common = ["--run.output_dir", str(tmp_path), "--trainer.max_epochs", "3", *sampling]
    straight_dir = run(SMOKE, [*common, "--run.name", "straight"])
    rounds = _summary(straight_dir)["rounds"]
    settings = yaml.safe_load(open(SMOKE))["data"]["init_args"]
    data = TextCopyDataModule(**{**settings, "num_clients": 10, "clients_per_round": 4}, seed=0)
    expected = [data.participants(r) for r in (1, 2, 3)]
    assert [r["participants"] for r in rounds] == expected
    assert all(len(p) == 4 for p in expected) and len({tuple(p) for p in expected}) > 1
    for previous, record in zip(rounds, rounds[1:], strict=False):
        sampled = set(record["participants"])
        for client in record["clients"]:
            k = client["client"]
            if k in sampled:
                continue
            assert client["missing"] == "not sampled this round"
            assert not client["flag"] and client["score"] is None
            # Not sampled: its adapter was neither trained nor rewritten.
            assert client["metrics"] == previous["clients"][k]["metrics"]
        present = [c for c in record["clients"] if c["client"] in sampled]
        assert record["detection"] == detection_metrics(
            [c["flag"] for c in present],
            [c["score"] for c in present],
            [c["contaminated"] for c in present],
        )
    assert "flagged " in capsys.readouterr().out.split("round 3/3: ")[1].split(" sampled of 10")[0]

    stop = tmp_path / "stop.yaml"
    interrupt = {"class_path": "tests.helpers.InterruptAfterRound", "init_args": {"rounds": 2}}
    stop.write_text(yaml.safe_dump({"trainer": {"callbacks": [interrupt]}}))
    with pytest.raises(SystemExit):
        run(SMOKE, ["--config", str(stop), *common, "--run.name", "resumed"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    resumed_dir = run(SMOKE, [*common, "--run.name", "resumed", "--ckpt_path", "last"])
    resumed = _summary(resumed_dir)["rounds"]
    assert [r["session"] for r in resumed] == [0, 0, 1]
    assert [r["participants"] for r in resumed] == expected
    assert [c["metrics"] for c in resumed[-1]["clients"]] == [
        c["metrics"] for c in rounds[-1]["clients"]
    ]


@pytest.mark.parametrize("value", ["1", "11", "0.1", "1.5"])
def test_clients_per_round_outside_two_to_all_is_refused(tmp_path, capsys, value):
    arguments = ["--run.output_dir", str(tmp_path), "--data.init_args.clients_per_round", value]
    assert main(["fit", "--config", SMOKE, *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "clients_per_round" in error[0]
    assert not any(tmp_path.iterdir())


def test_saved_adapter_configs_hold_a_portable_base_reference(straight):
    config = json.loads((straight / "adapters" / "client_0" / "adapter_config.json").read_text())
    reference = config["base_model_name_or_path"]
    assert reference.startswith("clair_lightning.recipes.text_copy.model.PretrainedCopyBase(")
    assert '"pretrain_steps": 300' in reference
    assert str(Path.home()) not in reference and "/tmp" not in reference


def test_oracle_without_the_truth_says_what_it_needs():
    from clair_lightning import aggregate

    updates = [{"m": (torch.ones(3, 1), torch.ones(1, 2))} for _ in range(3)]
    with pytest.raises(ValueError, match=r"aggregator 'oracle' needs contaminated=\[\.\.\.\]"):
        aggregate("oracle", updates)
