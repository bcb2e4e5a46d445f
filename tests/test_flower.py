"""The Flower layer: the strategy's fault handling, and simulation parity with the Lightning
path through `clair compare --engine flower`.

The comparison test runs Flower's Ray runtime (1.5 minutes on 2 cores); it is marked ``flower``
and runs in the default suite.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from clair_lightning.flower.experiment import Experiment, RunSettings
from clair_lightning.flower.messages import METRICS, NUM_EXAMPLES, UPDATE, encode_update
from clair_lightning.flower.server_app import prepare
from clair_lightning.flower.strategy import ClairStrategy, FederationError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "text_copy_smoke.yaml"


# --- the strategy's reply handling, with real Message objects ---------------------------------


class _Grid:
    """The two Grid calls the strategy makes before sending (nodes are already identified)."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture(scope="module")
def deployment_experiment(tmp_path_factory):
    output = tmp_path_factory.mktemp("strategy")
    settings = RunSettings.from_file(SMOKE, output_dir=str(output), min_clients=2, node_wait=1)
    experiment = Experiment.load(settings)
    return experiment, experiment.client_module().update()


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages are built inside a run; the ServerApp runtime sets this identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(deployment_experiment, tmp_path):
    experiment, initial = deployment_experiment
    strategy = ClairStrategy(experiment, initial, tmp_path / "run")
    strategy.nodes = {100 + k: k for k in range(4)}
    messages = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(range(100, 104)))
    )
    for index, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"train-{index}"  # as the SuperLink does
    return strategy, messages, initial


def _reply(message, update, examples=16):
    content = RecordDict(
        {UPDATE: encode_update(update), METRICS: MetricRecord({NUM_EXAMPLES: examples})}
    )
    return Message(content, reply_to=message)


def _trained(initial, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(b.shape, generator=generator) * 0.1, a.clone())
        for m, (b, a) in initial.items()
    }


def test_the_strategy_trains_the_clients_clair_fit_samples(tmp_path):
    overrides = ["--data.init_args.clients_per_round=2"]
    settings = RunSettings.from_file(SMOKE, overrides, output_dir=str(tmp_path), node_wait=1)
    experiment = Experiment.load(settings)
    strategy = ClairStrategy(experiment, experiment.client_module().update(), tmp_path / "run")
    assert strategy.min_clients == 2
    strategy.nodes = {100 + k: k for k in range(4)}
    sent = []
    for server_round in (1, 2, 3, 4):
        grid = _Grid(range(100, 104))
        list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        sampled = experiment.datamodule.participants(server_round)
        assert [partition for _, partition in strategy._sent] == sampled
        others = set(range(4)) - set(sampled)
        assert strategy._missing == {k: "not sampled this round" for k in others}
        sent.append(tuple(sampled))
    assert len(set(sent)) > 1, "the sample never changed over four rounds"

    too_many = RunSettings.from_file(SMOKE, overrides, output_dir=str(tmp_path), min_clients=3)
    with pytest.raises(ValueError, match=r"min-clients must be in \[2, 2\] \(clients sampled"):
        ClairStrategy(Experiment.load(too_many), experiment.client_module().update(), tmp_path)


def test_malformed_and_non_finite_replies_are_left_out_with_a_reason(
    deployment_experiment, tmp_path, caplog
):
    strategy, messages, initial = _strategy(deployment_experiment, tmp_path)
    good = [_trained(initial, seed) for seed in range(4)]
    module = next(iter(initial))
    non_finite = {
        **good[2],
        module: (good[2][module][0].clone().fill_(math.nan), good[2][module][1]),
    }
    wrong_shape = {**good[3], module: (good[3][module][0][:, :-1], good[3][module][1])}
    replies = [
        _reply(messages[0], good[0]),
        _reply(messages[1], good[1]),
        _reply(messages[2], non_finite),
        _reply(messages[3], wrong_shape),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr.clair_lightning"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 2
    assert f"client 2 left out: non-finite values in module '{module}'" in caplog.text
    assert "client 3 left out: module" in caplog.text and "has shapes" in caplog.text

    evaluations = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), None))
    assert [m.metadata.dst_node_id for m in evaluations] == [100, 101]
    for index, message in enumerate(evaluations):
        message.metadata.__dict__["_message_id"] = f"evaluate-{index}"
    metric_replies = [
        Message(
            RecordDict(
                {METRICS: MetricRecord({"loss": 1.0, "token_accuracy": 0.5, "exact_match": 0.25})}
            ),
            reply_to=message,
        )
        for message in evaluations
    ]
    strategy.aggregate_evaluate(1, metric_replies)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    record = summary["rounds"][0]
    assert record["participants"] == [0, 1]
    assert set(record["missing"]) == {"2", "3"}
    assert record["missing"]["2"].startswith("non-finite values")
    assert summary["engine"]["mode"] == "deployment"
    assert summary["data"]["contaminated"] is None and record["detection"] == {}
    assert "no ground truth" in summary["engine"]["ground_truth"]
    assert record["clients"][0]["metrics"]["exact_match"] == 0.25
    assert record["clients"][2]["metrics"] == {}
    assert record["train_seconds"] > 0 and record["evaluate_seconds"] > 0


def test_unknown_module_error_reply_and_silence_stop_the_round_below_the_minimum(
    deployment_experiment, tmp_path, caplog
):
    strategy, messages, initial = _strategy(deployment_experiment, tmp_path)
    good = _trained(initial, 0)
    unknown = {**good, "model.layers.9.mlp.up_proj": next(iter(good.values()))}
    replies = [
        _reply(messages[0], good),
        _reply(messages[1], unknown),
        Message(Error(code=5, reason="node unavailable"), reply_to=messages[2]),
        # partition 3 never answers
    ]
    with caplog.at_level(logging.WARNING, logger="flwr.clair_lightning"):
        with pytest.raises(
            FederationError, match="only 1 valid train replies, fewer than min-clients=2"
        ):
            strategy.aggregate_train(1, replies)
    assert "client 1 left out: unknown module 'model.layers.9.mlp.up_proj/B'" in caplog.text
    assert "client 2 left out: error reply (code 5): node unavailable" in caplog.text
    assert "client 3 left out: no reply before the round timeout" in caplog.text


def test_too_few_nodes_online_is_an_error_after_a_bounded_wait(deployment_experiment, tmp_path):
    experiment, initial = deployment_experiment
    strategy = ClairStrategy(experiment, initial, tmp_path / "run")
    with pytest.raises(FederationError, match="1 SuperNode\\(s\\) online after 1 s"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([7]))


def test_an_aggregator_that_needs_truth_is_refused_outside_simulation(tmp_path):
    settings = RunSettings.from_file(
        SMOKE, ["--aggregation.name", "oracle"], output_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="needs the ground truth, which only simulation has"):
        prepare(settings)
    assert not any(tmp_path.iterdir())


@pytest.mark.flower
def test_flower_simulation_repeats_the_lightning_path_through_clair_compare(tmp_path, capsys):
    """A tiny grid through `clair compare` on both engines: the same files, the same report
    layout (only numbers and the command differ), the same flags, scores and metrics.

    Same seed, data and local steps: both paths draw the same initial adapter (seeded), train
    each client on the same batches with AdamW and the same clipping, contaminate and
    aggregate with the same call, and fit refined updates to the adapter rank with the same
    function, so they agree to float rounding (measured: identical to the printed digits on
    one thread; a Trainer per client in a Ray worker instead of one module for all clients
    may change reduction order in the last bits).
    """
    from clair_lightning.compare.__main__ import main as compare

    reports = {}
    for engine in ("lightning", "flower"):
        output = tmp_path / engine
        argv = ["--config", str(SMOKE), "--aggregators", "clair,fedavg"]
        argv += ["--contaminations", "reversed_targets", "--seeds", "0", "--output", str(output)]
        assert compare([*argv, "--engine", engine]) == 0
        reports[engine] = output
    files = {engine: sorted(p.name for p in path.iterdir()) for engine, path in reports.items()}
    assert files["flower"] == files["lightning"]

    def layout(path: Path) -> list[str]:
        lines = (path / "report.md").read_text().splitlines()
        return [re.sub(r"\d+(\.\d+)?", "#", line) for line in lines if "Produced" not in line]

    assert layout(reports["flower"]) == layout(reports["lightning"])
    flower = json.loads((reports["flower"] / "results.json").read_text())
    lightning = json.loads((reports["lightning"] / "results.json").read_text())
    for ours, theirs in zip(flower["cells"], lightning["cells"], strict=True):
        assert ours["cell"] == theirs["cell"]
        run_dir = Path(ours["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["engine"] == {**summary["engine"], "name": "flower", "mode": "simulation"}
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(ours["rounds"]) == len(theirs["rounds"]) == 2
        for our_round, their_round in zip(ours["rounds"], theirs["rounds"], strict=True):
            pairs = zip(our_round["clients"], their_round["clients"], strict=True)
            for a, b in pairs:
                assert (a["flag"], a["contaminated"]) == (b["flag"], b["contaminated"])
                if b["score"] is None:
                    assert a["score"] is None
                else:
                    assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)
                for name, value in b["metrics"].items():
                    assert a["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    clair = next(c for c in flower["cells"] if c["cell"]["aggregator"] == "clair")
    contaminated = [c["client"] for c in clair["rounds"][0]["clients"] if c["contaminated"]]
    assert all(clair["rounds"][0]["clients"][k]["flag"] for k in contaminated)


# --- a stopped server resumes -------------------------------------------------------------------


def test_resume_refuses_a_missing_or_foreign_state(tmp_path):
    from clair_lightning.flower.server_state import STATE

    settings = RunSettings.from_file(SMOKE, output_dir=str(tmp_path), simulation=True, resume=True)
    with pytest.raises(ValueError, match="nothing to resume: .*server_state.pt does not exist"):
        prepare(settings)
    experiment = Experiment.load(settings)
    strategy = ClairStrategy(experiment, experiment.client_module().update(), experiment.run_dir())
    strategy.save_state(1)
    assert prepare(settings)[1] == experiment.run_dir()
    other = RunSettings.from_file(
        SMOKE, ["--data.init_args.local_steps=4"], output_dir=str(tmp_path), resume=True
    )
    with pytest.raises(ValueError, match="started with another config or overrides"):
        prepare(other)
    (experiment.run_dir() / STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume from .*server_state.pt"):
        prepare(settings)


def test_a_simulation_killed_after_round_two_resumes_at_round_three(tmp_path):
    """SIGKILL the whole `clair flower simulate` process group once round 2 is saved; the same
    command with --resume trains only the rounds after the last saved one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from clair_lightning.flower.server_state import STATE
    from clair_lightning.flower.simulation import simulate

    rounds = ["--trainer.max_epochs=5"]
    command = [sys.executable, "-c", "from clair_lightning.cli import main; main()"]
    command += ["flower", "simulate", "--config", str(SMOKE), "--output-dir", str(tmp_path)]
    killed = subprocess.Popen(
        [*command, *rounds],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ray's processes too
    )
    experiment = Experiment.load(RunSettings.from_file(SMOKE, rounds, output_dir=str(tmp_path)))
    state = experiment.run_dir() / STATE
    deadline = time.monotonic() + 400
    while not state.exists() or torch.load(state, weights_only=False)["completed_rounds"] < 2:
        if killed.poll() is not None or time.monotonic() > deadline:
            os.killpg(killed.pid, signal.SIGKILL)
            raise AssertionError(f"round 2 was never saved: {killed.communicate()[1][-3000:]}")
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    saved = torch.load(state, weights_only=False)["completed_rounds"]
    assert 2 <= saved < 5

    run_dir = simulate(SMOKE, overrides=rounds, output_dir=str(tmp_path), resume=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4, 5]
    # The mechanism: the killed process trained rounds 1..saved, this one only the rest.
    assert [r["session"] for r in summary["rounds"]] == [0] * saved + [1] * (5 - saved)
    assert summary["sessions"] == [
        {"after_round": 0, "pid": killed.pid},
        {"after_round": saved, "pid": os.getpid()},
    ]
    # Rounds of the killed session are those of an uninterrupted run (the Lightning path, which
    # Flower repeats exactly); later rounds restart the clients' AdamW moments, so only the
    # contaminated client's flag is asserted there.
    from clair_lightning.cli import run

    straight = run(SMOKE, [*rounds, "--run.output_dir", str(tmp_path / "straight")])
    reference = json.loads((straight / "summary.json").read_text())["rounds"]
    contaminated = [k for k, truth in enumerate(summary["data"]["contaminated"]) if truth]
    for ours, theirs in zip(summary["rounds"], reference, strict=True):
        flags = [c["flag"] for c in ours["clients"]]
        if ours["round"] <= saved:
            assert flags == [c["flag"] for c in theirs["clients"]]
            for a, b in zip(ours["clients"], theirs["clients"], strict=True):
                assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)
        assert all(flags[k] for k in contaminated)
    assert torch.load(state, weights_only=False)["completed_rounds"] == 5
