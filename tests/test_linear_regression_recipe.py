"""The regression recipe: refinement beats local fitting, FedAvg loses under contamination."""

import json
import statistics

import pytest

from clair_lightning.recipes.linear_regression import __main__ as recipe
from clair_lightning.recipes.linear_regression.data import make_federation
from clair_lightning.recipes.linear_regression.experiments import benign_error


@pytest.mark.parametrize("contamination", ["random_targets", "foreign_subspace"])
def test_refinement_beats_local_and_fedavg_is_worse_than_local(contamination):
    errors = {name: [] for name in ("local", "fedavg", "clair")}
    for seed in range(3):
        federation = make_federation(samples=50, contamination=contamination, seed=seed)
        for name in errors:
            errors[name].append(benign_error(federation, name)["benign_error"])
    clair, local, fedavg = (statistics.fmean(errors[n]) for n in ("clair", "local", "fedavg"))
    assert clair < 0.6 * local
    assert fedavg > 1.3 * local
    assert all(c < l for c, l in zip(errors["clair"], errors["local"], strict=True))


def test_noiseless_recovery_is_exact():
    federation = make_federation(noise=0.0, seed=4)
    row = benign_error(federation, "clair")
    assert row["set_exact"] and row["subspace_error"] < 1e-8 and row["benign_error"] < 1e-8


def test_one_command_writes_results_table_and_plots(tmp_path):
    results = recipe.run(tmp_path, recipe.QUICK)
    for name in (
        "results.json",
        "results.md",
        "stable_recovery.png",
        "consistency.png",
        "refinement_vs_samples.png",
        "refinement_vs_contamination.png",
        "heterogeneity_cost.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"] for c in saved["claims"]] == [c["claim"] for c in results["claims"]]
    assert all(c["holds"] is not False for c in results["claims"]), results["claims"]
    table = (tmp_path / "results.md").read_text()
    assert "| Refinement beats local fitting |" in table and "| clair |" in table


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"contamination": "label_flip"}, "contamination must be one of"),
        ({"contaminated_fraction": 0.5}, r"contaminated_fraction must be in \[0, 0.5\)"),
        ({"samples": 10}, "least squares needs samples >= d_in"),
    ],
)
def test_bad_recipe_settings(options, message):
    with pytest.raises(ValueError, match=message):
        make_federation(**options)
