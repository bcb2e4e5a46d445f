"""Baseline aggregators against brute-force dense computations on small float64 inputs."""

import math

import pytest
import torch

from clair_lightning.core import (
    AGGREGATORS,
    UpdateValidationError,
    aggregate,
    baselines,
    get_aggregator,
)
from clair_lightning.core.baselines import (
    fedavg,
    fedit,
    geomedian,
    krum,
    local,
    median,
    multikrum,
    oracle,
    trimmed_mean,
)

MODULES = {"q": (6, 5), "v": (4, 7)}  # name: (d_out, d_in)


def _random_updates(num_clients, ranks=None, seed=0, scale=None):
    """Per client a dict of random float64 factors; ranks vary across clients by default."""
    generator = torch.Generator().manual_seed(seed)
    ranks = ranks or [2 + k % 3 for k in range(num_clients)]
    updates = []
    for k in range(num_clients):
        update = {}
        for name, (d_out, d_in) in MODULES.items():
            b = torch.randn(d_out, ranks[k], generator=generator, dtype=torch.float64)
            a = torch.randn(ranks[k], d_in, generator=generator, dtype=torch.float64)
            update[name] = (b * (1.0 if scale is None else scale[k]), a)
        updates.append(update)
    return updates


def _dense(update):
    return {name: b @ a for name, (b, a) in update.items()}


def _flat(update):
    """All modules' products as one vector (the vector the robust rules see)."""
    return torch.cat([(b @ a).flatten() for _, (b, a) in sorted(update.items())])


def _assert_aggregate(result, expected, clients=None):
    """Every client (or those listed) received products equal to ``expected`` per module."""
    clients = range(len(result.refined)) if clients is None else clients
    for k in clients:
        received = _dense(result.refined[k])
        for name in MODULES:
            torch.testing.assert_close(received[name], expected[name])


def _relative_distances(updates, expected, clients):
    distances = torch.stack(
        [
            sum((_dense(updates[k])[n] - expected[n]).square().sum() for n in MODULES).sqrt()
            for k in clients
        ]
    )
    return distances / distances.quantile(0.5)


def _brute_krum_scores(updates, f):
    vectors = [_flat(u) for u in updates]
    n = len(vectors)
    scores = []
    for i in range(n):
        others = sorted(float((vectors[i] - vectors[j]).square().sum()) for j in range(n) if j != i)
        scores.append(sum(others[: n - f - 2]))
    return scores


def test_fedavg_is_the_weighted_average_of_products():
    updates = _random_updates(5)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    expected = {
        n: sum(w * _dense(u)[n] for w, u in zip(weights, updates, strict=True)) / 15
        for n in MODULES
    }
    _assert_aggregate(fedavg(updates, weights), expected)


def test_oracle_averages_the_benign_clients_and_reports_the_truth():
    updates = _random_updates(4)
    truth = [True, False, False, True]
    result = oracle(updates, contaminated=truth)
    expected = {n: (_dense(updates[1])[n] + _dense(updates[2])[n]) / 2 for n in MODULES}
    _assert_aggregate(result, expected)
    assert result.contaminated == truth


def test_local_keeps_every_update():
    updates = _random_updates(3)
    result = local(updates)
    for k in range(3):
        _assert_aggregate(result, _dense(updates[k]), clients=[k])


def test_fedit_averages_factors_separately_and_differs_from_fedavg():
    updates = _random_updates(4, ranks=[3] * 4, seed=1)
    weights = [1.0, 1.0, 2.0, 4.0]
    w = torch.tensor(weights, dtype=torch.float64) / 8
    result = fedit(updates, weights)
    fedavg_products = _dense(fedavg(updates, weights).refined[0])
    for name in MODULES:
        b_bar = sum(wk * u[name][0] for wk, u in zip(w, updates, strict=True))
        a_bar = sum(wk * u[name][1] for wk, u in zip(w, updates, strict=True))
        b, a = result.refined[0][name]
        torch.testing.assert_close(b, b_bar)
        torch.testing.assert_close(a, a_bar)
        # The gap to FedAvg is exactly the weighted cross-covariance of the factors.
        covariance = sum(
            wk * (u[name][0] - b_bar) @ (u[name][1] - a_bar)
            for wk, u in zip(w, updates, strict=True)
        )
        torch.testing.assert_close(fedavg_products[name] - b @ a, covariance)
        assert float(covariance.norm()) > 0.1 * float(fedavg_products[name].norm())


def test_fedit_equals_fedavg_when_a_is_shared():
    updates = _random_updates(4, ranks=[3] * 4, seed=2)
    for update in updates[1:]:
        for name in MODULES:
            update[name] = (update[name][0], updates[0][name][1])
    _assert_aggregate(fedit(updates), _dense(fedavg(updates).refined[0]))


def test_fedit_rejects_unequal_ranks_naming_module_and_ranks():
    updates = _random_updates(3, ranks=[2, 3, 2])
    with pytest.raises(UpdateValidationError, match=r"module 'q' has ranks \{0: 2, 1: 3, 2: 2\}"):
        fedit(updates)


@pytest.mark.parametrize("num_clients", [5, 6])
@pytest.mark.parametrize("chunk_elements", [1, 50, 2**24])
def test_median_is_the_coordinate_wise_median(num_clients, chunk_elements):
    updates = _random_updates(num_clients, seed=3)
    # quantile(0.5) averages the two middle values, like NumPy's median.
    expected = {
        n: torch.stack([_dense(u)[n] for u in updates]).quantile(0.5, dim=0) for n in MODULES
    }
    result = median(updates, [1.0] * num_clients, chunk_elements=chunk_elements)
    _assert_aggregate(result, expected)
    b, a = result.refined[0]["v"]
    assert b.shape == MODULES["v"] and torch.equal(a, torch.eye(7, dtype=torch.float64))
    expected_scores = _relative_distances(updates, expected, range(num_clients))
    torch.testing.assert_close(torch.tensor(result.scores, dtype=torch.float64), expected_scores)
    assert result.contaminated == [False] * num_clients


@pytest.mark.parametrize("num_clients", [7, 8])
def test_median_equals_torch_median_bitwise_with_ties(num_clients, monkeypatch):
    """Sorting slices of transposed coordinates gives exactly torch's middle values.

    Small integer factors (never zero, so no signed zeros) make many coordinates tie; slices of
    7 coordinates and blocks of 3 rows split rows and modules at odd places.
    """
    monkeypatch.setattr(baselines, "COORDINATES_PER_SLICE", 7)
    generator = torch.Generator().manual_seed(9)
    values = torch.tensor([-2.0, -1.0, 1.0, 2.0])

    def draw(*shape):
        return values[torch.randint(0, 4, shape, generator=generator)]

    updates = [
        {n: (draw(d_out, 2), draw(2, d_in)) for n, (d_out, d_in) in MODULES.items()}
        for _ in range(num_clients)
    ]
    updates[3] = updates[1]
    result = median(updates, chunk_elements=3 * num_clients * 7)
    for name in MODULES:
        stacked = torch.stack([b @ a for b, a in (u[name] for u in updates)])
        lower = stacked.median(dim=0).values  # torch.median: the lower of two middle values
        upper = -(-stacked).median(dim=0).values
        expected = (lower + upper) / 2
        received = result.refined[0][name][0]
        assert torch.equal(received.view(torch.int32), expected.view(torch.int32))
        assert ((stacked == lower).sum(dim=0) > 1).float().mean() > 0.5  # ties at the median


@pytest.mark.parametrize(("trim_fraction", "cut"), [(0.2, 1), (0.0, 0), (0.3, 2), (0.45, 3)])
def test_trimmed_mean_drops_the_extremes_per_coordinate(trim_fraction, cut, monkeypatch):
    monkeypatch.setattr(baselines, "COORDINATES_PER_SLICE", 4)
    updates = _random_updates(7, seed=4)
    expected = {}
    for name, (d_out, d_in) in MODULES.items():
        products = [_dense(u)[name] for u in updates]
        expected[name] = torch.tensor(
            [
                [
                    sum(sorted(float(p[i, j]) for p in products)[cut : 7 - cut]) / (7 - 2 * cut)
                    for j in range(d_in)
                ]
                for i in range(d_out)
            ],
            dtype=torch.float64,
        )
    result = trimmed_mean(updates, trim_fraction=trim_fraction, chunk_elements=30)
    _assert_aggregate(result, expected)
    assert result.diagnostics["trimmed_per_side"] == cut
    expected_scores = _relative_distances(updates, expected, range(7))
    torch.testing.assert_close(torch.tensor(result.scores, dtype=torch.float64), expected_scores)


@pytest.mark.parametrize("trim_fraction", [0.5, 0.7, -0.1, math.nan])
def test_trimmed_mean_rejects_fractions_that_trim_everything_or_nothing_sensible(trim_fraction):
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        trimmed_mean(_random_updates(5), trim_fraction=trim_fraction)


@pytest.mark.parametrize("num_byzantine", [None, 0, 1])
def test_krum_scores_and_choice_match_brute_force(num_byzantine):
    updates = _random_updates(7, seed=5)
    f = 2 if num_byzantine is None else num_byzantine  # default ⌊(7 − 1)/2⌋ − 1
    expected_scores = _brute_krum_scores(updates, f)
    result = krum(updates, num_byzantine=num_byzantine)
    torch.testing.assert_close(torch.tensor(result.scores), torch.tensor(expected_scores))
    chosen = min(range(7), key=expected_scores.__getitem__)
    _assert_aggregate(result, _dense(updates[chosen]))
    assert result.contaminated == [k != chosen for k in range(7)]
    assert result.diagnostics == {"selected": [chosen], "num_byzantine": f}


def test_multikrum_averages_the_lowest_scores_with_renormalised_weights():
    updates = _random_updates(8, seed=6)
    weights = [float(k + 1) for k in range(8)]
    result = multikrum(updates, weights, num_byzantine=1, num_selected=4)
    scores = _brute_krum_scores(updates, 1)
    selected = sorted(sorted(range(8), key=scores.__getitem__)[:4])
    total = sum(weights[k] for k in selected)
    expected = {
        n: sum(weights[k] * _dense(updates[k])[n] for k in selected) / total for n in MODULES
    }
    _assert_aggregate(result, expected)
    assert result.diagnostics["selected"] == selected
    assert result.contaminated == [k not in selected for k in range(8)]


def _cluster_with_outliers(num_clients, outliers, seed=7):
    """Clients near one common update; ``outliers`` are far off random updates."""
    generator = torch.Generator().manual_seed(seed)
    centre = _random_updates(1, ranks=[3], seed=seed)[0]
    updates = []
    for k in range(num_clients):
        if k in outliers:
            updates.append(_random_updates(1, ranks=[3], seed=100 + k, scale=[20.0])[0])
            continue
        update = {}
        for name, (b, a) in centre.items():
            noise = 0.05 * torch.randn(b.shape, generator=generator, dtype=torch.float64)
            update[name] = (b + noise, a)
        updates.append(update)
    return updates


def test_krum_picks_a_clustered_client_and_multikrum_drops_the_outliers():
    outliers = [1, 4]
    updates = _cluster_with_outliers(9, outliers)
    assert krum(updates).diagnostics["selected"][0] not in outliers
    result = multikrum(updates, num_byzantine=2)
    assert result.contaminated == [k in outliers for k in range(9)]
    assert min(result.scores[k] for k in outliers) > max(
        result.scores[k] for k in range(9) if k not in outliers
    )


@pytest.mark.parametrize("rule", [krum, multikrum])
def test_krum_needs_more_than_2f_plus_2_clients(rule):
    updates = _random_updates(6)
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 6 clients for f = 2"):
        rule(updates, num_byzantine=2)
    with pytest.raises(ValueError, match="more than 2f"):
        rule(_random_updates(2))  # default f clamps to 0, still too few


def test_multikrum_rejects_a_bad_selection_size():
    with pytest.raises(ValueError, match="num_selected must be an int in"):
        multikrum(_random_updates(6), num_byzantine=1, num_selected=0)


def _brute_geometric_median(vectors, weights, iterations=2000):
    median_vector = sum(w * v for w, v in zip(weights, vectors, strict=True))
    for _ in range(iterations):
        inverse = [
            w / max(float((v - median_vector).norm()), 1e-12)
            for w, v in zip(weights, vectors, strict=True)
        ]
        median_vector = sum(i * v for i, v in zip(inverse, vectors, strict=True)) / sum(inverse)
    return median_vector


def test_geomedian_matches_dense_weiszfeld():
    updates = _random_updates(6, seed=8)
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 2.0]
    total = sum(weights)
    vectors = [_flat(u) for u in updates]
    expected = _brute_geometric_median(vectors, [w / total for w in weights])
    result = geomedian(updates, weights, tolerance=1e-13, max_iterations=5000)
    torch.testing.assert_close(_flat(result.refined[0]), expected, atol=1e-6, rtol=1e-6)
    distances = torch.stack([(v - expected).norm() for v in vectors])
    torch.testing.assert_close(
        torch.tensor(result.scores, dtype=torch.float64),
        distances / distances.quantile(0.5),
        atol=1e-5,
        rtol=1e-5,
    )
    assert result.contaminated == [False] * 6


def test_geomedian_resists_one_huge_outlier_where_fedavg_does_not():
    updates = _cluster_with_outliers(7, outliers=[])
    clean_centre = _flat(fedavg(updates).refined[0])
    updates[3] = _random_updates(1, ranks=[3], seed=9, scale=[1e4])[0]
    robust = _flat(geomedian(updates).refined[0])
    naive = _flat(fedavg(updates).refined[0])
    assert float((robust - clean_centre).norm()) < 0.1 * float(clean_centre.norm())
    assert float((naive - clean_centre).norm()) > 10 * float(clean_centre.norm())
    scores = geomedian(updates).scores
    assert scores.index(max(scores)) == 3


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "geomedian"])
def test_excluded_clients_receive_the_global_aggregate(name):
    updates = _random_updates(8, seed=10)
    b, a = updates[2]["q"]
    updates[2]["q"] = (b.clone().index_fill_(0, torch.tensor([0]), math.nan), a)
    result = aggregate(name, updates, nonfinite="exclude")
    assert list(result.excluded) == [2]
    assert result.scores[2] == math.inf
    assert result.contaminated[2] is (name in ("krum", "multikrum"))
    _assert_aggregate(result, _dense(result.refined[0]), clients=[2])
    with pytest.raises(UpdateValidationError, match="client 2"):
        aggregate(name, updates)


def test_registry_has_every_baseline_and_names_the_known_ones_on_a_typo():
    assert {"fedit", "median", "trimmed_mean", "krum", "multikrum", "geomedian"} <= set(AGGREGATORS)
    with pytest.raises(
        ValueError, match="unknown aggregator 'medain'; known aggregators: .*median"
    ):
        get_aggregator("medain")
