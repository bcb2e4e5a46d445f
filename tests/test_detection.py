"""Collusion evidence and the direction check on small cases: who is flagged and why."""

import torch

from clair_lightning import clair_aggregate
from clair_lightning.core.attacks import contaminate
from clair_lightning.core.clair import _one_direction_share, _padded_blocks
from clair_lightning.core.compression import compress_module
from clair_lightning.core.detection import direction_scores, robust_z
from clair_lightning.core.synthetic import synthetic_federation
from clair_lightning.core.updates import validate_updates
from clair_lightning.recipes.linear_regression.data import make_federation

K = 20
THRESHOLD = 4.5


def _federation(seed=0):
    return synthetic_federation(
        K,
        heterogeneity=0.5,
        noise=0.1,
        num_modules=2,
        generator=torch.Generator().manual_seed(seed),
    )


def _subspace_error(estimate, truth):
    return float(torch.linalg.matrix_norm(estimate @ estimate.T - truth @ truth.T, ord=2))


def test_identical_colluders_are_flagged_as_a_group():
    """Six attackers send one copy of the benign mean: typical on every one-client check."""
    federation = _federation()
    attackers = [2, 5, 8, 11, 14, 17]
    updates = contaminate(
        federation.updates,
        [k in attackers for k in range(K)],
        "inner_product_manipulation",
        epsilon=-1.0,  # −ε·mean with ε = −1: exactly the benign mean
    )
    result = clair_aggregate(updates)
    closeness = result.score_components["closeness_z"]
    collusion = result.score_components["collusion_z"]
    assert result.contaminated == [k in attackers for k in range(K)]
    for k in range(K):
        if k in attackers:
            # Near-identical, and far more typical than any independent client.
            assert closeness[k] > THRESHOLD and collusion[k] > THRESHOLD
            for check in ("off_subspace_z", "direction_z", "norm_z"):
                assert abs(result.score_components[check][k]) < THRESHOLD
        else:
            assert closeness[k] < THRESHOLD and collusion[k] == 0.0


def test_honest_duplicates_are_not_flagged_for_similarity_alone():
    """Two clients with the same data, and a mimicked client with its three copies, are found as
    near-duplicate groups, but measured against the others they are ordinary benign updates."""
    federation = _federation(seed=1)
    updates = [dict(u) for u in federation.updates]
    updates[1] = dict(updates[0])  # two clients with the same data
    mimic = [5, 9, 13]
    updates = contaminate(updates, [k in mimic for k in range(K)], "mimic", victim=3)
    result = clair_aggregate(updates)
    closeness = result.score_components["closeness_z"]
    assert not any(result.contaminated)
    assert all(closeness[k] > THRESHOLD for k in [0, 1, 3, *mimic])
    assert all(closeness[k] < THRESHOLD for k in range(K) if k not in [0, 1, 3, *mimic])
    assert max(result.score_components["collusion_z"]) < THRESHOLD


def _small_federation(num_clients=10, seed=4):
    """Few clients with a 4-dimensional shared subspace: one client moves its own estimate."""
    return synthetic_federation(
        num_clients,
        d_out=32,
        d_in=24,
        rank=4,
        subspace_rank=4,
        heterogeneity=0.5,
        noise=0.3,
        num_modules=2,
        generator=torch.Generator().manual_seed(seed),
    )


def test_copies_count_once_in_the_shared_subspace():
    """Three mimics copying client 0: the shared subspace is the one of the seven independent
    clients, as if the copies were not there (counted three times they tilt it to client 0)."""
    federation = _small_federation()
    copies = [k in (1, 2, 3) for k in range(10)]
    mimicked = clair_aggregate(contaminate(federation.updates, copies, "mimic", victim=0))
    without_copies = clair_aggregate([u for k, u in enumerate(federation.updates) if not copies[k]])
    assert not any(mimicked.contaminated)
    for name, subspace in without_copies.subspaces.items():
        assert mimicked.subspaces[name].shape == subspace.shape
        assert _subspace_error(mimicked.subspaces[name], subspace) < 1e-6


def test_a_copied_client_is_not_flagged_but_colluders_sending_a_crafted_message_are():
    """The same four identical updates are a copied benign client under mimic and a Min-Max
    message otherwise. Left out of the rest's subspace the copied client scored z 6.2 against
    the rest measured in sample; against the rest's own left-out shares it is ordinary."""
    federation = _small_federation()
    copies = [k in (1, 2, 3) for k in range(10)]
    mimicked = clair_aggregate(contaminate(federation.updates, copies, "mimic", victim=0))
    closeness = mimicked.score_components["closeness_z"]
    assert all(closeness[k] > THRESHOLD for k in (0, 1, 2, 3))
    assert max(mimicked.score_components["collusion_z"]) < THRESHOLD
    assert not any(mimicked.contaminated)
    crafted = clair_aggregate(contaminate(federation.updates, copies, "min_max_std"))
    assert crafted.contaminated == copies
    assert all(crafted.score_components["collusion_z"][k] > THRESHOLD for k in (1, 2, 3))


def test_two_identical_colluders_are_flagged():
    """Two of ten clients send one ALIE message: a pair, flagged on the evidence against it."""
    federation = synthetic_federation(
        10, heterogeneity=0.5, noise=0.1, num_modules=2, generator=torch.Generator().manual_seed(4)
    )
    attackers = [3, 7]
    updates = contaminate(
        federation.updates, [k in attackers for k in range(10)], "a_little_is_enough"
    )
    result = clair_aggregate(updates)
    assert result.contaminated == [k in attackers for k in range(10)]
    assert all(result.score_components["collusion_z"][k] > THRESHOLD for k in attackers)


def test_colluders_departing_from_the_benign_mean_along_one_direction_are_flagged():
    """Four of ten noisy clients send one ALIE message, ``μ − z·σ``: about as far from the
    others and outside their subspace as a benign client, but its departure from their mean is
    the nearly rank-one ``σ``. Benign departures spread over their updates' directions, and so
    does a copy of a benign client's, so mimics sending those four updates are not flagged."""
    federation = synthetic_federation(
        10, heterogeneity=0.5, noise=0.6, num_modules=2, generator=torch.Generator().manual_seed(0)
    )
    attackers = [k in (1, 4, 6, 8) for k in range(10)]
    updates = contaminate(federation.updates, attackers, "a_little_is_enough")
    assert clair_aggregate(updates).contaminated == attackers
    assert not any(clair_aggregate(updates, excursion_floor=1e9).contaminated)
    mimicked = contaminate(federation.updates, attackers, "mimic", victim=0)
    result = clair_aggregate(mimicked)
    assert all(result.score_components["closeness_z"][k] > THRESHOLD for k in (0, 1, 4, 6, 8))
    assert not any(result.contaminated)


def test_the_one_direction_share_matches_the_dense_singular_values():
    federation = synthetic_federation(
        8, rank=[2, 3, 4, 4, 3, 2, 4, 4], noise=0.3, generator=torch.Generator().manual_seed(2)
    )
    validated = validate_updates(federation.updates)
    measured = torch.tensor([True] * 7 + [False])
    rest = torch.tensor([False, True, True, True, True, True, False, False])
    weights = torch.arange(1.0, 9.0, dtype=torch.float64)
    share = _one_direction_share(validated, measured, rest, weights)
    (name,) = validated.module_names
    products = [b @ a for b, a in (federation.updates[k][name] for k in range(8))]
    mean = sum(weights[k] * products[k] for k in range(1, 6)) / weights[1:6].sum()
    for k in range(8):
        if k == 7:
            assert share[k] == 0.0
            continue
        singular = torch.linalg.svdvals(products[k] - mean).square()
        assert abs(float(share[k]) - float(singular[0] / singular.sum())) < 1e-10


def test_a_direction_carried_by_a_colluding_minority_leaves_the_subspace():
    """Eight identical ALIE messages (40%) add a direction to everyone's subspace; estimated
    without the group it is gone, the group is flagged and the subspace is the benign one."""
    federation = _federation()
    attackers = list(range(0, 16, 2))
    updates = contaminate(
        federation.updates, [k in attackers for k in range(K)], "a_little_is_enough"
    )
    everyone = clair_aggregate(updates, checks=("off_subspace", "direction", "norm"))
    result = clair_aggregate(updates, checks=("off_subspace", "direction", "norm", "collusion"))
    true_ranks = {name: u.shape[1] for name, u in federation.subspaces.items()}
    assert not any(everyone.contaminated)
    assert any(everyone.diagnostics["subspace_ranks"][n] > r for n, r in true_ranks.items())
    assert result.contaminated == [k in attackers for k in range(K)]
    assert result.diagnostics["subspace_ranks"] == true_ranks
    for name, truth in federation.subspaces.items():
        assert _subspace_error(result.subspaces[name], truth) < 0.2


def test_a_direction_carried_by_a_minority_of_distinct_clients_leaves_the_subspace():
    """Eight attackers (40%) keep their own updates and share one off-subspace column: not
    near-duplicates, but the column is carried by fewer than half of the clients."""
    federation = _federation(seed=2)
    attackers = list(range(1, 17, 2))
    updates = contaminate(
        federation.updates, [k in attackers for k in range(K)], "rank1_off_subspace"
    )
    without = clair_aggregate(updates, checks=("off_subspace", "direction", "norm", "collusion"))
    result = clair_aggregate(updates)
    true_ranks = {name: u.shape[1] for name, u in federation.subspaces.items()}
    assert not any(without.contaminated)
    assert any(without.diagnostics["subspace_ranks"][n] > r for n, r in true_ranks.items())
    assert result.contaminated == [k in attackers for k in range(K)]
    support = result.score_components["support_z"]
    closeness = result.score_components["closeness_z"]
    assert all(support[k] > THRESHOLD and closeness[k] < THRESHOLD for k in attackers)
    assert result.diagnostics["subspace_ranks"] == true_ranks
    for name, truth in federation.subspaces.items():
        assert _subspace_error(result.subspaces[name], truth) < 0.2


def test_copies_do_not_shrink_the_robust_scales():
    """Eight mimics copying one regression client (nine identical of twenty) would shrink the
    MAD of the off-subspace share and flag an ordinary benign client; counting each group of
    copies once as a reference client keeps the scale of the independent clients."""
    settings = {
        "num_clients": 20, "d_out": 30, "d_in": 20, "subspace_rank": 3, "samples": 50,
        "noise": 1.0, "heterogeneity": 1.0,
    }  # fmt: skip
    federation = make_federation(**settings, contaminated_fraction=0.0, seed=0)
    mimics = [k in (4, 7, 10, 11, 13, 14, 16, 17) for k in range(20)]
    updates = contaminate(federation.updates, mimics, "mimic", victim=0)
    weights = federation.sample_counts
    scaled_by_copies = clair_aggregate(updates, weights, checks=("off_subspace",))
    result = clair_aggregate(updates, weights)
    assert any(scaled_by_copies.contaminated)
    assert not any(result.contaminated)
    assert all(result.score_components["closeness_z"][k] > THRESHOLD for k in (0, 4, 7, 17))


def test_the_support_check_alone_flags_four_clients_sharing_a_direction():
    """Four of twenty clients add one shared off-subspace column: flagged by the support check
    alone (pairs: see test_two_colluders_sharing_a_direction_in_every_module_are_flagged)."""
    federation = _federation(seed=2)
    four = [k in (4, 9, 12, 15) for k in range(K)]
    updates = contaminate(federation.updates, four, "rank1_off_subspace")
    assert clair_aggregate(updates, checks=("support",)).contaminated == four


def test_a_cluster_carrying_a_direction_weakly_is_not_flagged():
    """Four clients share one extra direction: with a tenth of their energy in it, as a benign
    cluster sharing a task carries it, the support check leaves them alone; with half, as
    colluders who add a term to move the aggregate, they are flagged and it leaves the
    subspace."""
    federation = _federation(seed=2)
    cluster = [k in (4, 9, 12, 15) for k in range(K)]
    weak = contaminate(federation.updates, cluster, "rank1_off_subspace", energy=0.1)
    result = clair_aggregate(weak, checks=("support",))
    assert not any(result.contaminated)
    assert max(result.score_components["support_z"]) == 0.0
    strong = contaminate(federation.updates, cluster, "rank1_off_subspace", energy=0.5)
    assert clair_aggregate(strong).contaminated == cluster


def test_a_benign_cosine_near_zero_is_not_flagged_when_its_components_are_typical():
    """Heterogeneity as large as the shared part: benign client 0's component along the centre
    is a plain 3σ draw, so its cosine is near 0 (robust z above the threshold). Neither
    component is beyond the threshold, so it is left alone; a sign flip is flagged."""
    federation = synthetic_federation(
        K, heterogeneity=1.0, noise=0.0, generator=torch.Generator().manual_seed(3)
    )
    result = clair_aggregate(federation.updates)
    components = result.score_components
    cosine_z = robust_z(
        torch.tensor(components["direction_distance"]), torch.ones(K, dtype=torch.bool), 0.075
    )
    assert float(cosine_z[0]) > THRESHOLD
    assert components["direction_z"][0] < THRESHOLD
    assert not any(result.contaminated)

    flipped = [dict(update) for update in federation.updates]
    flipped[5] = {name: (-b, a) for name, (b, a) in flipped[5].items()}
    result = clair_aggregate(flipped)
    assert [k for k in range(K) if result.contaminated[k]] == [5]


def test_a_large_contaminated_share_does_not_hide_in_the_spread_it_widens():
    """Six of 20 regression clients fit shuffled targets: inside the subspace, cosine near 0.
    Scored against everyone their spread hides them (z below the threshold); the centre and
    scales re-estimated without the clients beyond the threshold find them all."""
    federation = make_federation(
        contamination="shuffled_targets", contaminated_fraction=0.3, seed=1
    )
    contaminated = torch.tensor(federation.contaminated)
    coefficients = torch.stack([federation.subspace.T @ e for e in federation.estimates])
    gram = coefficients.flatten(1) @ coefficients.flatten(1).T
    everyone, weights = torch.ones(K, dtype=torch.bool), torch.ones(K, dtype=torch.float64)

    *_, untrimmed = direction_scores(gram, everyone, weights, 0.075, float("inf"))
    *_, trimmed = direction_scores(gram, everyone, weights, 0.075, THRESHOLD)
    assert float(untrimmed[contaminated].max()) < THRESHOLD
    assert float(trimmed[contaminated].min()) > THRESHOLD
    assert float(trimmed[~contaminated].max()) < THRESHOLD
    result = clair_aggregate(federation.updates, federation.sample_counts)
    assert result.contaminated == federation.contaminated


def _directions_absorbed(updates, **options):
    """CLAIR with a fixed subspace rank wide enough to absorb the extra directions, and λ large
    enough that the decomposition flags nobody, so only the support check can see them."""
    return clair_aggregate(updates, lam_factor=3.0, **options)


def test_two_colluders_sharing_a_direction_in_every_module_are_flagged():
    """Two of ten clients add one shared off-subspace column to both modules: a pair carrying
    two minority directions, flagged by the support check. The same pair sharing a direction
    in one module only, as two benign clients with overlapping tasks do, is left alone."""
    federation = synthetic_federation(
        10, heterogeneity=0.5, noise=0.1, num_modules=2, generator=torch.Generator().manual_seed(0)
    )
    pair = [k in (3, 7) for k in range(10)]
    everywhere = contaminate(federation.updates, pair, "rank1_off_subspace")
    first_module = next(iter(federation.updates[0]))
    one_module = [dict(update) for update in federation.updates]
    for k in (3, 7):
        one_module[k][first_module] = everywhere[k][first_module]
    flagged = _directions_absorbed(everywhere, subspace_rank=4)
    left_alone = _directions_absorbed(one_module, subspace_rank=4)
    for result in (flagged, left_alone):
        assert all(result.score_components["off_subspace_z"][k] < THRESHOLD for k in (3, 7))
        assert max(result.score_components["collusion_z"]) == 0.0
    assert flagged.contaminated == pair
    assert all(flagged.score_components["support_z"][k] > THRESHOLD for k in (3, 7))
    assert not any(left_alone.contaminated)
    assert max(left_alone.score_components["support_z"]) == 0.0


def test_colluders_are_measured_apart_from_benign_carriers_of_their_own_directions():
    """Four colluders share one column while five benign clients each carry a direction of
    their own: together the carriers are nine of ten clients, no minority, but the colluders'
    group, measured against everyone outside it, leaves the subspace."""
    federation = synthetic_federation(
        10, heterogeneity=0.5, noise=0.1, num_modules=2, generator=torch.Generator().manual_seed(0)
    )
    colluders = [k in (1, 4, 6, 8) for k in range(10)]
    updates = contaminate(federation.updates, colluders, "rank1_off_subspace")
    for k in (0, 2, 3, 5, 7):
        own = contaminate(
            federation.updates,
            [j == k for j in range(10)],
            "rank1_off_subspace",
            energy=0.3,
            generator=torch.Generator().manual_seed(100 + k),
        )
        updates[k] = own[k]
    result = _directions_absorbed(updates, subspace_rank=9)
    assert max(result.score_components["off_subspace_z"]) < THRESHOLD
    assert result.contaminated == colluders
    support = result.score_components["support_z"]
    assert all((support[k] > THRESHOLD) == colluders[k] for k in range(10))


def test_a_large_group_off_the_subspace_does_not_mask_itself():
    """Eight of twenty regression clients add their own off-subspace perturbations: against
    the median and MAD of everyone they score under the threshold (the group inflates both),
    against the clients below the gap far above it, and they are flagged."""
    settings = {
        "num_clients": 20, "d_out": 30, "d_in": 20, "subspace_rank": 3, "samples": 50,
        "noise": 1.0, "heterogeneity": 1.0,
    }  # fmt: skip
    truth = make_federation(**settings, contaminated_fraction=0.4, seed=2).contaminated
    federation = make_federation(**settings, contaminated_fraction=0.0, seed=2)
    updates = contaminate(
        federation.updates,
        truth,
        "partial_off_subspace",
        generator=torch.Generator().manual_seed(2),
    )
    result = clair_aggregate(updates, federation.sample_counts, checks=("off_subspace",))
    residual = torch.tensor(result.score_components["off_subspace_fraction"])
    against_everyone = robust_z(residual, torch.ones(20, dtype=torch.bool), 0.02)
    attackers = torch.tensor(truth)
    assert float(against_everyone[attackers].max()) < THRESHOLD
    assert result.contaminated == list(truth)
    assert min(result.score_components["off_subspace_z"][k] for k in range(20) if truth[k]) > 10


def test_support_check_pads_clients_of_lower_rank():
    """Clients of different ranks are batched with zero columns padding the narrower blocks:
    each block is kept as it was, and the four carriers are still the ones flagged."""
    federation = _federation(seed=2)
    four = [k in (4, 9, 12, 15) for k in range(K)]
    updates = contaminate(federation.updates, four, "rank1_off_subspace")
    for k in (0, 7, 12):
        updates[k] = {name: (b[:, :-1], a[:-1]) for name, (b, a) in updates[k].items()}
    validated = validate_updates(updates, None)
    module = compress_module(validated, validated.module_names[0], validated.included)
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(5, module.blocks[-1].stop, generator=generator)
    padded = _padded_blocks(coefficients, module)
    widths = [block.stop - block.start for block in module.blocks]
    assert len(set(widths)) == 2
    for position, block in enumerate(module.blocks):
        assert torch.equal(padded[position, :, : widths[position]], coefficients[:, block])
        assert not padded[position, :, widths[position] :].any()
    assert clair_aggregate(updates, checks=("support",)).contaminated == four


def _own_directions_federation(seed=1, own=0.5):
    """Eight benign clients share two strong directions and carry two weaker ones a little;
    client 4 carries the weaker ones strongly (a task part of its own); 8 and 9 send noise."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(32, 4, generator=generator))[0]
    strong, weak = directions[:, :2], directions[:, 2:]
    updates = []
    for client in range(10):
        a = torch.linalg.qr(torch.randn(32, 4, generator=generator))[0].T
        if client >= 8:
            b = torch.randn(32, 4, generator=generator)
        else:
            level = own if client == 4 else 0.12
            b = (
                strong @ torch.randn(2, 4, generator=generator)
                + level * weak @ torch.randn(2, 4, generator=generator)
                + 0.05 * torch.randn(32, 4, generator=generator)
            )
        updates.append({"m": (b, a)})
    return updates


def test_a_benign_client_with_directions_past_the_rank_gap_is_not_flagged_off_subspace():
    """The gap rule keeps the two strong directions; client 4's own part lies in the next two, so
    at the chosen rank it leaves the subspace far more than the others. With the subspace at
    twice the rank and every client left out of it, it is typical; the noise senders are not."""
    result = clair_aggregate(_own_directions_federation())
    components = result.score_components
    assert result.contaminated == [False] * 8 + [True, True]
    assert result.diagnostics["subspace_ranks"] == {"m": 2}
    share = torch.tensor(components["off_subspace_fraction"], dtype=torch.float64)
    at_chosen_rank = robust_z(share, ~torch.tensor(result.contaminated), 0.02)
    assert float(at_chosen_rank[4]) > THRESHOLD  # flagged before the widened confirmation
    assert components["off_subspace_z"][4] <= THRESHOLD
    assert min(components["off_subspace_z"][8:]) > THRESHOLD


def test_a_benign_client_is_not_flagged_off_subspace_against_fewer_than_five_others():
    """Five clients, one sending noise. Once it is out, a benign client that the decomposition
    kept in the low-rank part scores beyond the threshold against the median and MAD of the
    other three (the scale is the floor); with fewer than five clients to confirm it against,
    the flag is not confirmed and its off-subspace z-score is zero."""
    generator = torch.Generator().manual_seed(0)
    federation = synthetic_federation(
        5, heterogeneity=0.5, noise=0.1, num_modules=2, generator=generator
    )
    updates = [dict(update) for update in federation.updates]
    for name, (b, a) in updates[0].items():
        noise = torch.randn(b.shape, generator=generator, dtype=b.dtype)
        updates[0][name] = (noise * (b.norm() / noise.norm()), a)
    for name, (b, a) in updates[2].items():
        subspace = federation.subspaces[name]
        off = torch.randn(b.shape, generator=generator, dtype=b.dtype)
        off = off - subspace @ (subspace.T @ off)
        updates[2][name] = (b + 0.14 * off * (b.norm() / off.norm()), a)

    result = clair_aggregate(updates)

    components = result.score_components
    assert result.contaminated == [True, False, False, False, False]
    share = torch.tensor(components["off_subspace_fraction"], dtype=torch.float64)
    against_the_rest = robust_z(share, ~torch.tensor(result.contaminated), 0.02)
    suspect = 1 + int(against_the_rest[1:].argmax())
    assert float(against_the_rest[suspect]) > THRESHOLD  # a flag the confirmation has to drop
    assert components["off_subspace_z"][suspect] == 0.0
