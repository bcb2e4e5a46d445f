"""Update-level attacks: protocol-valid, deterministic, and the products they claim."""

import math

import pytest
import torch

from clair_lightning.core import UpdateValidationError, validate_updates
from clair_lightning.core.attacks import ATTACKS, a_little_is_enough_z, contaminate
from clair_lightning.core.baselines import fedavg
from clair_lightning.core.synthetic import synthetic_federation

NUM_CLIENTS = 10
ATTACKERS = [0, 3, 7]
MASK = [k in ATTACKERS for k in range(NUM_CLIENTS)]
BENIGN = [k for k in range(NUM_CLIENTS) if k not in ATTACKERS]
RANKS = [4, 5, 3, 4, 4, 3, 5, 4, 4, 3]


def _federation(noise=0.05, seed=0, dtype=torch.float64, ranks=RANKS, d_in=12):
    return synthetic_federation(
        NUM_CLIENTS,
        d_out=20,
        d_in=d_in,
        rank=ranks,
        subspace_rank=3,
        noise=noise,
        num_modules=2,
        generator=torch.Generator().manual_seed(seed),
        dtype=dtype,
    )


def _attack(updates, attack, seed=1, **params):
    return contaminate(
        updates, MASK, attack, generator=torch.Generator().manual_seed(seed), **params
    )


def _product(update, name):
    b, a = update[name]
    return b @ a


def _best_rank(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _benign_products(updates, name):
    return torch.stack([_product(updates[k], name) for k in BENIGN])


def _outside(subspace, matrix):
    """Frobenius norm of the part of ``matrix`` outside the column span of ``subspace``."""
    return float((matrix - subspace @ (subspace.T @ matrix)).norm())


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attacks_keep_shapes_ranks_and_dtype_and_leave_benign_clients_alone(attack, dtype):
    updates = _federation(dtype=dtype).updates
    attacked = _attack(updates, attack)
    assert len(attacked) == NUM_CLIENTS
    for k in range(NUM_CLIENTS):
        for name, (b, a) in updates[k].items():
            new_b, new_a = attacked[k][name]
            assert new_b.shape == b.shape and new_a.shape == a.shape
            assert new_b.dtype == dtype and new_a.dtype == dtype
            if k in BENIGN:
                assert new_b is b and new_a is a
            elif attack != "nonfinite":
                assert not torch.equal(new_b @ new_a, b @ a)
                assert torch.isfinite(new_b).all() and torch.isfinite(new_a).all()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_deterministic_given_the_generator(attack):
    updates = _federation().updates
    first, second = _attack(updates, attack, seed=5), _attack(updates, attack, seed=5)
    other = _attack(updates, attack, seed=6)
    random_attack = attack in ("gaussian", "partial_off_subspace", "rank1_off_subspace")
    for k in ATTACKERS:
        for name in updates[k]:
            torch.testing.assert_close(first[k][name], second[k][name], equal_nan=True)
            differs = not torch.allclose(
                _product(first[k], name), _product(other[k], name), equal_nan=True
            )
            assert differs == random_attack or attack == "nonfinite"


def test_sign_flip_and_scaling_give_the_stated_products():
    updates = _federation().updates
    flipped = _attack(updates, "sign_flip")
    scaled = _attack(updates, "scaling", factor=-3.5)
    for k in ATTACKERS:
        for name in updates[k]:
            own = _product(updates[k], name)
            torch.testing.assert_close(_product(flipped[k], name), -own)
            torch.testing.assert_close(_product(scaled[k], name), -3.5 * own)
            assert flipped[k][name][1] is updates[k][name][1]  # B flipped, A untouched


@pytest.mark.parametrize("epsilon", [0.1, 0.5, 2.0])
def test_inner_product_manipulation_is_minus_epsilon_times_the_benign_mean(epsilon):
    updates = _federation().updates
    attacked = _attack(updates, "inner_product_manipulation", epsilon=epsilon)
    for k in ATTACKERS:
        for name in updates[k]:
            target = -epsilon * _benign_products(updates, name).mean(0)
            # The mean has rank up to Σr; the message is its best rank-r_k approximation.
            expected = _best_rank(target, RANKS[k])
            torch.testing.assert_close(_product(attacked[k], name), expected)


def test_inner_product_manipulation_is_exact_when_benign_clients_share_a():
    updates = _federation(ranks=[4] * NUM_CLIENTS).updates
    for update in updates[1:]:
        for name in update:
            update[name] = (update[name][0], updates[0][name][1])
    attacked = _attack(updates, "inner_product_manipulation")
    for name in updates[0]:
        torch.testing.assert_close(
            _product(attacked[0], name), -0.5 * _benign_products(updates, name).mean(0)
        )


def test_gaussian_has_the_median_benign_norm_and_leaves_the_subspace():
    federation = _federation(noise=0.0)
    attacked = _attack(federation.updates, "gaussian")
    for name, subspace in federation.subspaces.items():
        median_norm = _benign_products(federation.updates, name).flatten(1).norm(dim=1).median()
        for k in ATTACKERS:
            product = _product(attacked[k], name)
            torch.testing.assert_close(product.norm(), median_norm)
            assert _outside(subspace, product) > 0.8 * float(product.norm())


@pytest.mark.parametrize("energy", [0.1, 0.5, 0.9])
def test_partial_off_subspace_adds_an_orthogonal_perturbation_with_the_stated_energy(energy):
    federation = _federation(noise=0.0)
    attacked = _attack(federation.updates, "partial_off_subspace", energy=energy)
    for name, subspace in federation.subspaces.items():
        for k in ATTACKERS:
            result = _product(attacked[k], name)
            perturbation = result - _product(federation.updates[k], name)
            assert _outside(subspace, perturbation) == pytest.approx(float(perturbation.norm()))
            assert float(perturbation.norm() ** 2 / result.norm() ** 2) == pytest.approx(energy)
            assert attacked[k][name][1] is federation.updates[k][name][1]


def test_partial_off_subspace_energy_is_exact_for_noisy_attackers_too():
    federation = _federation(noise=0.3)
    attacked = _attack(federation.updates, "partial_off_subspace", energy=0.25)
    for name in federation.subspaces:
        for k in ATTACKERS:
            result = _product(attacked[k], name)
            perturbation = result - _product(federation.updates[k], name)
            assert float(perturbation.norm() ** 2 / result.norm() ** 2) == pytest.approx(0.25)


def test_rank1_off_subspace_shares_one_orthogonal_column_across_attackers():
    federation = _federation(noise=0.0)
    attacked = _attack(federation.updates, "rank1_off_subspace", energy=0.5)
    for name, subspace in federation.subspaces.items():
        columns = []
        for k in ATTACKERS:
            result = _product(attacked[k], name)
            perturbation = result - _product(federation.updates[k], name)
            singular = torch.linalg.svdvals(perturbation)
            assert float(singular[1]) < 1e-10 * float(singular[0])  # rank one
            assert _outside(subspace, perturbation) == pytest.approx(float(perturbation.norm()))
            assert float(perturbation.norm() ** 2 / result.norm() ** 2) == pytest.approx(0.5)
            columns.append(torch.linalg.svd(perturbation)[0][:, 0])
        for column in columns[1:]:
            assert abs(float(column @ columns[0])) == pytest.approx(1.0)


def test_adaptive_in_subspace_lies_in_the_benign_subspace_at_benign_norm():
    updates = _federation(noise=0.1).updates
    attacked = _attack(updates, "adaptive_in_subspace", subspace_rank=3)
    for name in updates[0]:
        benign = _benign_products(updates, name)
        stacking = torch.cat(list(benign), dim=1)
        subspace = torch.linalg.svd(stacking, full_matrices=False)[0][:, :3]
        median_norm = benign.flatten(1).norm(dim=1).median()
        mean = benign.mean(0)
        for k in ATTACKERS:
            product = _product(attacked[k], name)
            assert _outside(subspace, product) < 1e-8 * float(product.norm())
            torch.testing.assert_close(product.norm(), median_norm)
            cosine = float((product * mean).sum() / (product.norm() * mean.norm()))
            assert cosine < -0.9


def test_adaptive_in_subspace_can_flip_the_attackers_own_update():
    federation = _federation(noise=0.0)
    attacked = _attack(federation.updates, "adaptive_in_subspace", target="negative_own")
    for name in federation.subspaces:
        for k in ATTACKERS:
            own = _product(federation.updates[k], name)
            product = _product(attacked[k], name)
            # Noiseless updates lie in the subspace already: the result is −own at benign norm.
            torch.testing.assert_close(product / product.norm(), -own / own.norm())


def test_a_little_is_enough_shifts_the_benign_mean_by_z_standard_deviations():
    # Attackers of rank ≥ d_in: no truncation, the message is the dense shift itself.
    ranks = [8 if k in ATTACKERS else 4 for k in range(NUM_CLIENTS)]
    updates = _federation(ranks=ranks, d_in=6).updates
    attacked = _attack(updates, "a_little_is_enough", z=0.7)
    for name in updates[0]:
        benign = _benign_products(updates, name)
        expected = benign.mean(0) - 0.7 * benign.std(0)
        for k in ATTACKERS:
            torch.testing.assert_close(_product(attacked[k], name), expected)


def test_a_little_is_enough_default_z_and_truncation():
    updates = _federation().updates
    z = a_little_is_enough_z(NUM_CLIENTS, len(ATTACKERS))
    attacked = _attack(updates, "a_little_is_enough")
    for name in updates[0]:
        benign = _benign_products(updates, name)
        dense = benign.mean(0) - z * benign.std(0)
        for k in ATTACKERS:
            torch.testing.assert_close(_product(attacked[k], name), _best_rank(dense, RANKS[k]))


def test_a_little_is_enough_z_formula():
    # Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − f.
    assert a_little_is_enough_z(64, 6) == pytest.approx(0.197, abs=1e-3)
    assert a_little_is_enough_z(50, 12) == pytest.approx(0.583, abs=1e-3)
    assert a_little_is_enough_z(10, 3) == pytest.approx(0.5244, abs=1e-4)  # s = 3, Φ⁻¹(0.7)
    with pytest.raises(ValueError, match="Pass z explicitly"):
        a_little_is_enough_z(10, 6)


def test_nonfinite_updates_are_rejected_or_excluded():
    updates = _federation().updates
    attacked = _attack(updates, "nonfinite", value=math.inf, num_entries=2)
    for k in ATTACKERS:
        for name in updates[k]:
            assert int(torch.isinf(attacked[k][name][0]).sum()) == 2
    with pytest.raises(UpdateValidationError, match="non-finite"):
        validate_updates(attacked)
    assert sorted(fedavg(attacked, nonfinite="exclude").excluded) == ATTACKERS


def test_no_attacker_returns_the_updates_unchanged():
    updates = _federation().updates
    same = contaminate(updates, [False] * NUM_CLIENTS, "gaussian")
    assert all(same[k][n] is updates[k][n] for k in range(NUM_CLIENTS) for n in updates[k])


def test_attack_errors_are_clear():
    updates = _federation().updates
    with pytest.raises(ValueError, match="unknown attack 'signflip'; known attacks: .*sign_flip"):
        contaminate(updates, MASK, "signflip")
    with pytest.raises(ValueError, match=r"does not take \['eps'\]; it takes \['epsilon'\]"):
        contaminate(updates, MASK, "inner_product_manipulation", eps=1.0)
    with pytest.raises(ValueError, match="it takes no options"):
        contaminate(updates, MASK, "sign_flip", factor=2.0)
    with pytest.raises(ValueError, match="3 entries for 10"):
        contaminate(updates, [True, False, False], "sign_flip")
    with pytest.raises(ValueError, match=r"energy .* must be in \[0, 1\)"):
        contaminate(updates, MASK, "partial_off_subspace", energy=1.0)
    with pytest.raises(ValueError, match=r"subspace_rank must be an int in \[1, d_out\)"):
        contaminate(updates, MASK, "rank1_off_subspace", subspace_rank=20)
    with pytest.raises(ValueError, match="needs at least 1 benign"):
        contaminate(updates, [True] * NUM_CLIENTS, "gaussian")
    with pytest.raises(ValueError, match="needs at least 2 benign"):
        contaminate(updates, [k != 0 for k in range(NUM_CLIENTS)], "a_little_is_enough", z=1.0)
    with pytest.raises(ValueError, match="value must be NaN"):
        contaminate(updates, MASK, "nonfinite", value=1.0)
