"""Bad input ends in an error that names the client and module, before any linear algebra."""

import pytest
import torch

from clair_lightning import UpdateValidationError, aggregate
from clair_lightning.core.updates import validate_updates


def _client(d_out=6, d_in=5, rank=2, seed=0, name="q_proj"):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(d_out, rank, generator=generator),
            torch.randn(rank, d_in, generator=generator),
        )
    }


def _federation(n=4):
    return [_client(seed=k) for k in range(n)]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda u: u[2].pop("q_proj") and u[2].update(v_proj=u[0]["q_proj"]),
            r"client 2: modules differ from client 0 "
            r"\(missing \['q_proj'\], unexpected \['v_proj'\]\)",
        ),
        (
            lambda u: u[1].update(q_proj=(torch.randn(7, 2), torch.randn(2, 5))),
            r"client 1, module 'q_proj': update is 7x5 \(d_out x d_in\) but client 0's is 6x5",
        ),
        (
            lambda u: u[3].update(q_proj=(torch.randn(6, 2), torch.randn(3, 5))),
            r"client 3, module 'q_proj': B is \(6, 2\) and A is \(3, 5\)",
        ),
        (
            lambda u: u[1].update(q_proj=(torch.randn(6), torch.randn(2, 5))),
            r"client 1, module 'q_proj': B and A must be matrices",
        ),
        (
            lambda u: u[1].update(q_proj=(torch.ones(6, 2, dtype=torch.int64), torch.randn(2, 5))),
            r"client 1, module 'q_proj': factors must be floating point",
        ),
        (
            lambda u: [v.update(q_proj=(torch.randn(0, 2), torch.randn(2, 5))) for v in u],
            r"client 0, module 'q_proj': update is 0x5 \(d_out x d_in\); both must be at least 1",
        ),
        (
            lambda u: u[0].update(q_proj=(torch.randn(6, 2),)),
            r"client 0, module 'q_proj': expected a pair \(B, A\)",
        ),
        (
            lambda u: u[0].update(q_proj=([[1.0]], torch.randn(2, 5))),
            r"client 0, module 'q_proj': B and A must be torch tensors",
        ),
    ],
)
def test_structural_problems_name_client_and_module(mutate, message):
    updates = _federation()
    mutate(updates)
    with pytest.raises(UpdateValidationError, match=message):
        validate_updates(updates)


def test_not_a_list_of_updates():
    with pytest.raises(UpdateValidationError, match="one dict"):
        validate_updates(_client())
    with pytest.raises(UpdateValidationError, match="empty"):
        validate_updates([])
    with pytest.raises(UpdateValidationError, match="client 1: an update must be a dict"):
        validate_updates([_client(), [1, 2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_values_are_rejected_or_excluded(bad):
    updates = _federation(5)
    a = updates[4]["q_proj"][1].clone()
    a[1, 2] = bad
    updates[4]["q_proj"] = (updates[4]["q_proj"][0], a)
    with pytest.raises(
        UpdateValidationError, match="client 4: module 'q_proj': A has 1 non-finite"
    ):
        validate_updates(updates)
    validated = validate_updates(updates, nonfinite="exclude")
    assert validated.included == [0, 1, 2, 3]
    assert validated.excluded == {4: "module 'q_proj': A has 1 non-finite value(s)"}
    assert float(validated.weights[4]) == 0.0
    assert float(validated.weights.sum()) == pytest.approx(1.0)


def test_too_few_clients_left_after_exclusion():
    updates = _federation(2)
    b = updates[0]["q_proj"][0].clone()
    b[0, 0] = float("nan")
    updates[0]["q_proj"] = (b, updates[0]["q_proj"][1])
    with pytest.raises(UpdateValidationError, match="only 1 of 2 clients can be aggregated"):
        validate_updates(updates, nonfinite="exclude")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0], "weights has 2 entries but there are 4 clients"),
        ([1.0, -1.0, 1.0, 1.0], "finite and non-negative"),
        ([1.0, float("nan"), 1.0, 1.0], "finite and non-negative"),
        ([0.0, 0.0, 0.0, 0.0], "sum to zero"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(UpdateValidationError, match=message):
        validate_updates(_federation(), weights)


def test_zero_weight_client_is_excluded_and_weights_are_normalised():
    validated = validate_updates(_federation(), [2.0, 0.0, 1.0, 1.0])
    assert validated.excluded == {1: "weight is zero"}
    torch.testing.assert_close(
        validated.weights, torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    )


def test_unequal_ranks_are_accepted():
    updates = [_client(rank=r, seed=r) for r in (1, 2, 3, 4)]
    assert validate_updates(updates).ranks("q_proj") == [1, 2, 3, 4]


def test_unknown_aggregator_lists_known_names():
    with pytest.raises(
        ValueError, match="unknown aggregator 'fedprox'; known aggregators: .*clair"
    ):
        aggregate("fedprox", _federation())
