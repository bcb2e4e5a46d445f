"""A real Flower deployment on loopback: one SuperLink, four SuperNodes, `flwr run`.

One deployment serves every assertion (starting one costs about a minute on 2 cores): round 1
runs with all four partitions and must flag the contaminated one; in round 2 one SuperNode is
SIGKILLed mid-round, the server must aggregate the other three and name the missing client.
Every process is stopped by ``LoopbackDeployment`` on exit, also when an assertion fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clair_lightning.flower.app_folder import write_app
from clair_lightning.flower.experiment import Experiment, RunSettings
from clair_lightning.flower.loopback import LoopbackDeployment

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "text_copy_smoke.yaml"


def _rounds(summary: Path) -> int:
    try:
        return len(json.loads(summary.read_text())["rounds"])
    except (OSError, ValueError):
        return 0


@pytest.mark.flower
def test_loopback_deployment_flags_the_contaminated_client_and_survives_a_killed_supernode(
    tmp_path,
):
    settings = RunSettings.from_file(
        SMOKE,
        output_dir=str(tmp_path / "runs"),
        min_clients=3,
        round_timeout=240,
        node_wait=120,
    )
    experiment = Experiment.load(settings)
    experiment.client_module()  # the base is pre-trained once into the shared cache
    truth = experiment.datamodule.contaminated
    victim = max(k for k, bad in enumerate(truth) if not bad)
    app = write_app(tmp_path / "app", settings)
    summary_path = experiment.run_dir() / "summary.json"

    with LoopbackDeployment(tmp_path / "deployment", num_supernodes=4) as deployment:
        run = deployment.run(app)
        deadline = time.monotonic() + 600
        while _rounds(summary_path) < 1:
            assert run.poll() is None, deployment.log("flwr-run")[-3000:]
            assert time.monotonic() < deadline, "round 1 did not finish in 10 minutes"
            time.sleep(1)
        time.sleep(5)  # round 2's messages are out; the ClientApps are starting
        deployment.kill(victim)
        returncode = run.wait(timeout=600)
        log = deployment.log("flwr-run")
    assert returncode == 0, log[-3000:]

    summary = json.loads(summary_path.read_text())
    assert summary["engine"]["mode"] == "deployment"
    assert summary["data"]["contaminated"] is None, "a deployment has no ground truth"
    first, second = summary["rounds"]
    assert "missing" not in first and first["participants"] == [0, 1, 2, 3]
    flagged = [c["client"] for c in first["clients"] if c["flag"]]
    assert [k for k, bad in enumerate(truth) if bad][0] in flagged
    assert all(c["metrics"] for c in first["clients"])

    assert list(second["missing"]) == [str(victim)]
    assert second["participants"] == [k for k in range(4) if k != victim]
    reason = second["missing"][str(victim)]
    assert "error reply" in reason or "no reply before the round timeout" in reason
    assert f"client {victim} left out" in log
    assert second["clients"][victim]["metrics"] == {}
    assert all(second["clients"][k]["metrics"] for k in second["participants"])
    assert not (tmp_path / "deployment" / "home" / ".flwr").exists()
