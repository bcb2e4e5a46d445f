"""CLAIR end to end on small synthetic federations: recovery, detection, refinement, errors."""

import math

import pytest
import torch

from clair_lightning import AggregationResult, UpdateValidationError, clair_aggregate
from clair_lightning.core.synthetic import synthetic_federation


def _subspace_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors."""
    return float(torch.linalg.matrix_norm(estimate @ estimate.T - truth @ truth.T, ord=2))


def _off_subspace_attack(federation, clients, generator):
    """Replace ``clients`` by random updates of benign norm: they leave the shared subspace."""
    updates = [dict(u) for u in federation.updates]
    for k in clients:
        for name, (b, a) in updates[k].items():
            random_b = torch.randn(b.shape, generator=generator, dtype=b.dtype)
            updates[k][name] = (random_b * (b.norm() / random_b.norm()), a)
    return updates


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_modules", [1, 3])
def test_noiseless_off_subspace_contamination_is_recovered_exactly(seed, num_modules):
    generator = torch.Generator().manual_seed(seed)
    federation = synthetic_federation(
        20, rank=[4, 5, 3, 4] * 5, num_modules=num_modules, generator=generator
    )
    contaminated = list(range(6))  # 30%
    updates = _off_subspace_attack(federation, contaminated, generator)

    result = clair_aggregate(updates)

    assert result.contaminated == [k in contaminated for k in range(20)]
    for name, truth in federation.subspaces.items():
        assert result.subspaces[name].shape == truth.shape
        assert _subspace_error(result.subspaces[name], truth) < 1e-4


@pytest.mark.parametrize("attack", ["sign_flip", "scaling", "inner_product"])
def test_in_subspace_attackers_are_flagged(attack):
    generator = torch.Generator().manual_seed(7)
    federation = synthetic_federation(20, heterogeneity=0.5, noise=0.05, generator=generator)
    updates = [dict(u) for u in federation.updates]
    attackers = [0, 1, 2, 3, 4, 5]
    benign_mean = {
        name: sum(u[name][0] @ u[name][1] for u in updates[6:]) / 14 for name in updates[0]
    }
    for k in attackers:
        for name, (b, a) in updates[k].items():
            if attack == "sign_flip":
                updates[k][name] = (-b, a)
            elif attack == "scaling":
                updates[k][name] = (10 * b, a)
            else:  # −ε · benign mean, refactorised exactly (rank d_in)
                eye = torch.eye(a.shape[1], dtype=a.dtype)
                updates[k][name] = (-0.5 * benign_mean[name], eye)

    result = clair_aggregate(updates)

    assert result.contaminated == [k in attackers for k in range(20)]
    benign_scores = [result.scores[k] for k in range(6, 20)]
    assert min(result.scores[k] for k in attackers) > max(benign_scores)


@pytest.mark.parametrize("num_clients", [10, 20, 40])
def test_no_false_positives_on_heterogeneous_benign_clients(num_clients):
    """Client-specific variation 30% of the shared part, several noise levels, many seeds."""
    flagged = 0
    for seed in range(15):
        for noise in (0.0, 0.1, 0.3):
            generator = torch.Generator().manual_seed(seed)
            federation = synthetic_federation(
                num_clients, heterogeneity=0.3, noise=noise, generator=generator
            )
            flagged += sum(clair_aggregate(federation.updates).contaminated)
    assert flagged == 0


@pytest.mark.parametrize("heterogeneity", [0.5, 1.0])
def test_no_false_positives_up_to_heterogeneity_one(heterogeneity):
    """As heterogeneous as the shared part itself, a benign client's cosine to the centre can
    be as small as a contaminated one's; the direction check also needs the component that
    makes it small to be atypical, so nobody is flagged (10 clients, the smallest federation
    of benchmarks/false_positives.py)."""
    flagged = 0
    for seed in range(15):
        generator = torch.Generator().manual_seed(seed)
        federation = synthetic_federation(
            10, heterogeneity=heterogeneity, noise=0.1, generator=generator
        )
        flagged += sum(clair_aggregate(federation.updates).contaminated)
    assert flagged == 0


def test_updates_orthogonal_to_the_consensus_inside_the_subspace_are_flagged():
    """Data-level contamination often lands inside the shared subspace but off its consensus."""
    generator = torch.Generator().manual_seed(8)
    federation = synthetic_federation(20, heterogeneity=0.3, noise=0.05, generator=generator)
    updates = [dict(u) for u in federation.updates]
    for k in range(5):
        for name, (b, a) in updates[k].items():
            subspace = federation.subspaces[name]
            inside = subspace @ torch.randn(
                subspace.shape[1], b.shape[1], generator=generator, dtype=b.dtype
            )
            updates[k][name] = (inside * (b.norm() / inside.norm()), a)
    assert clair_aggregate(updates).contaminated == [k < 5 for k in range(20)]


def test_refinement_is_exact():
    """Refined product = P_U Θ_k + (I − P_U) Σ_S w_j Θ_j, with S the collaborative set."""
    generator = torch.Generator().manual_seed(3)
    federation = synthetic_federation(8, noise=0.2, num_modules=2, generator=generator)
    updates = _off_subspace_attack(federation, [0, 1], generator)
    weights = torch.arange(1.0, 9.0)

    result = clair_aggregate(updates, weights)

    assert result.collaborative_set == list(range(2, 8))
    set_weights = weights[2:] / weights[2:].sum()
    for name, subspace in result.subspaces.items():
        projector = subspace @ subspace.T
        average = sum(
            w * (updates[j][name][0] @ updates[j][name][1])
            for w, j in zip(set_weights, range(2, 8), strict=True)
        )
        outside = torch.eye(projector.shape[0], dtype=projector.dtype) - projector
        for k in range(2, 8):
            b, a = result.refined[k][name]
            own = updates[k][name][0] @ updates[k][name][1]
            torch.testing.assert_close(b @ a, projector @ own + outside @ average)
        # Flagged clients keep their own update by default.
        b, a = result.refined[0][name]
        torch.testing.assert_close(b @ a, updates[0][name][0] @ updates[0][name][1])


def test_refinement_reduces_off_subspace_noise_for_benign_clients():
    generator = torch.Generator().manual_seed(11)
    clean = synthetic_federation(30, noise=0.0, generator=generator)
    noisy = synthetic_federation(30, noise=0.3, generator=torch.Generator().manual_seed(11))
    result = clair_aggregate(noisy.updates)
    name = "layers.0.proj"
    local_error = refined_error = 0.0
    for k in range(30):
        truth = clean.updates[k][name][0] @ clean.updates[k][name][1]
        local = noisy.updates[k][name][0] @ noisy.updates[k][name][1]
        b, a = result.refined[k][name]
        local_error += float((local - truth).norm())
        refined_error += float((b @ a - truth).norm())
    assert refined_error < 0.5 * local_error


def test_flagged_clients_can_receive_the_consensus():
    generator = torch.Generator().manual_seed(5)
    federation = synthetic_federation(10, generator=generator)
    updates = _off_subspace_attack(federation, [0], generator)
    result = clair_aggregate(updates, flagged_policy="consensus")
    name = "layers.0.proj"
    expected = sum(updates[j][name][0] @ updates[j][name][1] for j in range(1, 10)) / 9
    b, a = result.refined[0][name]
    torch.testing.assert_close(b @ a, expected)


def test_nonfinite_client_is_excluded_when_asked_and_reported():
    generator = torch.Generator().manual_seed(2)
    updates = [dict(u) for u in synthetic_federation(8, generator=generator).updates]
    name = "layers.0.proj"
    b, a = updates[3][name]
    poisoned = b.clone()
    poisoned[0, 0] = float("nan")
    updates[3][name] = (poisoned, a)

    with pytest.raises(UpdateValidationError, match=r"client 3: module 'layers.0.proj': B has 1"):
        clair_aggregate(updates)

    result = clair_aggregate(updates, nonfinite="exclude")
    assert set(result.excluded) == {3} and "non-finite" in result.excluded[3]
    assert result.contaminated[3] and math.isinf(result.scores[3])
    assert 3 not in result.collaborative_set
    refined_b, refined_a = result.refined[3][name]
    assert torch.isfinite(refined_b @ refined_a).all()


def test_same_input_gives_same_flags_and_scores():
    generator = torch.Generator().manual_seed(9)
    federation = synthetic_federation(12, noise=0.1, generator=generator)
    updates = _off_subspace_attack(federation, [0, 1, 2], generator)
    first, second = clair_aggregate(updates), clair_aggregate(updates)
    assert first.contaminated == second.contaminated
    assert first.scores == second.scores


def test_stable_formulation_keeps_the_low_rank_part_low_rank_under_noise():
    generator = torch.Generator().manual_seed(4)
    federation = synthetic_federation(
        30, d_out=96, d_in=80, rank=8, subspace_rank=6, noise=0.4, generator=generator
    )
    updates = _off_subspace_attack(federation, range(9), generator)
    exact = clair_aggregate(updates)
    stable = clair_aggregate(updates, formulation="stable", noise_level=0.4)
    assert stable.contaminated == exact.contaminated == [k < 9 for k in range(30)]
    stable_rank = stable.diagnostics["low_rank_ranks"]["layers.0.proj"]
    exact_rank = exact.diagnostics["low_rank_ranks"]["layers.0.proj"]
    assert 2 * stable_rank <= exact_rank
    assert stable_rank <= 2 * 6
    estimate, truth = stable.subspaces["layers.0.proj"], federation.subspaces["layers.0.proj"]
    outside_estimate = truth - estimate @ (estimate.T @ truth)
    assert float(torch.linalg.matrix_norm(outside_estimate, ord=2)) < 0.2


def test_float32_and_half_precision_inputs_are_supported():
    generator = torch.Generator().manual_seed(1)
    federation = synthetic_federation(10, dtype=torch.float32, generator=generator)
    updates = _off_subspace_attack(federation, [0, 1], generator)
    half = [
        {n: (b.to(torch.bfloat16), a.to(torch.bfloat16)) for n, (b, a) in u.items()}
        for u in updates
    ]
    for inputs in (updates, half):
        result = clair_aggregate(inputs)
        assert result.contaminated == [k < 2 for k in range(10)]
        assert result.refined[5]["layers.0.proj"][0].dtype == torch.float32


def test_result_shape_and_lazy_refined_sequence():
    generator = torch.Generator().manual_seed(0)
    federation = synthetic_federation(6, generator=generator)
    result = clair_aggregate(federation.updates)
    assert isinstance(result, AggregationResult)
    assert len(result.contaminated) == len(result.scores) == len(result.refined) == 6
    assert set(result.score_components) >= {"off_subspace_z", "direction_z", "norm_z"}
    steps = result.diagnostics["seconds"]
    assert set(result.diagnostics["cpu_seconds"]) == set(steps) >= {"compress", "collusion_groups"}
    last = result.refined[-1]["layers.0.proj"]
    torch.testing.assert_close(
        last[0] @ last[1],
        result.refined[5]["layers.0.proj"][0] @ result.refined[5]["layers.0.proj"][1],
    )
    assert len(result.refined[1:3]) == 2
    with pytest.raises(IndexError):
        result.refined[6]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"checks": ("spectral",)}, "checks must be"),
        ({"flagged_policy": "drop"}, "flagged_policy"),
        ({"threshold": 0}, "threshold"),
        ({"formulation": "robust"}, "formulation"),
        ({"lam_factor": -1.0}, "lam_factor"),
        ({"subspace_rank": "largest"}, "subspace_rank"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"threshold": float("nan")}, "threshold must be a positive finite number, got nan"),
        ({"off_subspace_floor": -0.02}, "off_subspace_floor must be a positive finite number"),
        ({"excursion_floor": "0.05"}, "excursion_floor must be a positive finite number"),
        ({"tolerance": 2.0}, "tolerance must be below 1"),
        ({"max_iterations": 0}, "max_iterations must be at least 1"),
        ({"max_subspace_rank": 2.5}, "max_subspace_rank must be an int"),
        ({"seed": "zero"}, "seed must be an int"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    federation = synthetic_federation(6)
    with pytest.raises(ValueError, match=message):
        clair_aggregate(federation.updates, **options)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="lamda"):
        clair_aggregate(synthetic_federation(4).updates, lamda=1.0)


def test_gap_rule_counts_missing_singular_values_as_zero():
    """Noiseless rank-3 updates give a 3-row core; the gap rule must still choose 3."""
    from clair_lightning.core.subspace import choose_rank

    values = torch.tensor([5.0, 1.0, 0.9], dtype=torch.float64)
    assert choose_rank(values, "gap", cap=10, decomposition_rank=1) == 3
    assert (
        choose_rank(
            torch.tensor([5.0, 1.0, 0.9, 0.001, 0.0009]), "gap", cap=10, decomposition_rank=1
        )
        == 3
    )
    tiny = torch.tensor([5.0, 0.01, 0.009])
    assert choose_rank(tiny, "gap", cap=10, decomposition_rank=1) == 3
    # Below the float32 floor the small values are rounding noise, not directions.
    assert choose_rank(tiny, "gap", cap=10, decomposition_rank=1, relative_floor=3e-3) == 1


def test_coefficient_gram_from_the_row_basis_grams_matches_the_dense_coefficients(monkeypatch):
    """With the collusion check on, the direction and norm checks take their coefficient Gram
    from its row-basis Grams on the cores and map the subspace to ``d_out`` once, at the end.
    Without those Grams they use every client's dense coefficients against the ambient
    subspace: same flags, scores, subspaces and refined updates."""
    from clair_lightning.core import clair
    from clair_lightning.core.attacks import contaminate

    federation = synthetic_federation(
        16,
        d_out=40,
        d_in=30,
        rank=[3, 4] * 8,
        subspace_rank=3,
        noise=0.05,
        num_modules=2,
        heterogeneity=0.5,
        generator=torch.Generator().manual_seed(3),
        dtype=torch.float64,
    )
    attackers = [2, 9, 13]
    updates = contaminate(federation.updates, [k in attackers for k in range(16)], "sign_flip")
    paths = []
    from_bases, dense = clair._coefficient_gram_from_bases, clair._coefficient_gram
    monkeypatch.setattr(
        clair, "_coefficient_gram_from_bases", lambda *a: paths.append("bases") or from_bases(*a)
    )
    monkeypatch.setattr(clair, "_coefficient_gram", lambda *a: paths.append("dense") or dense(*a))
    fast = clair_aggregate(updates)
    compress_all = clair._compress_all
    monkeypatch.setattr(clair, "_compress_all", lambda *a: (*compress_all(*a)[:3], {}))
    reference = clair_aggregate(updates)

    assert paths == ["bases", "dense"]
    assert fast.contaminated == reference.contaminated == [k in attackers for k in range(16)]
    for name in ("direction_z", "consensus_projection", "norm_z", "scores"):
        got = fast.scores if name == "scores" else fast.score_components[name]
        expected = reference.scores if name == "scores" else reference.score_components[name]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-9, atol=1e-9)
    for name, basis in fast.subspaces.items():
        torch.testing.assert_close(basis, reference.subspaces[name], rtol=0, atol=0)
    _assert_same_refined_updates(fast, reference)


def _assert_same_refined_updates(result, reference):
    """Every client's refined ``ΔW = B A`` equal within float tolerance, module by module."""
    for got, expected in zip(result.refined, reference.refined, strict=True):
        for name, (b, a) in got.items():
            torch.testing.assert_close(b @ a, expected[name][0] @ expected[name][1])


@pytest.mark.parametrize(
    ("attack", "options"),
    [("inner_product_manipulation", {"epsilon": -1.0}), ("rank1_off_subspace", {})],
)
def test_leave_group_out_subspace_is_warm_started_with_the_same_result(
    monkeypatch, attack, options
):
    """A group's rest (identical colluders; carriers of a minority direction) is estimated
    from the reference set's leading vectors (one power iteration instead of a random sketch
    and two): same flags and scores, and the same subspace and refined updates within float
    tolerance, as the cold randomized SVD."""
    from clair_lightning.core import clair
    from clair_lightning.core.attacks import contaminate

    federation = synthetic_federation(
        40,
        d_out=160,
        d_in=24,
        rank=8,
        subspace_rank=4,
        noise=0.05,
        generator=torch.Generator().manual_seed(5),
        dtype=torch.float64,
    )
    colluders = [k < 8 for k in range(40)]  # 320 core columns: the randomized SVD
    updates = contaminate(
        federation.updates, colluders, attack, generator=torch.Generator().manual_seed(0), **options
    )
    starts = []
    nearest = clair._SubspaceEstimator._nearest_superset
    monkeypatch.setattr(
        clair._SubspaceEstimator,
        "_nearest_superset",
        lambda self, members: starts.append(nearest(self, members)) or starts[-1],
    )
    warm = clair_aggregate(updates)
    monkeypatch.setattr(clair._SubspaceEstimator, "_nearest_superset", lambda *a: None)
    cold = clair_aggregate(updates)

    assert starts and all(start is not None for start in starts)
    assert warm.contaminated == cold.contaminated == colluders
    torch.testing.assert_close(torch.tensor(warm.scores), torch.tensor(cold.scores))
    for name, basis in warm.subspaces.items():
        torch.testing.assert_close(basis @ basis.T, cold.subspaces[name] @ cold.subspaces[name].T)
    _assert_same_refined_updates(warm, cold)


def test_randomized_leading_singular_vectors_match_the_full_svd():
    """Wide stackings take the randomized SVD (its small final SVD on the R of a QR), cold or
    warm-started from a superset's leading vectors: the full SVD's values and vectors."""
    from clair_lightning.core.subspace import leading_left_singular

    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(300, 8, generator=generator, dtype=torch.float64))[0]
    values = torch.linspace(80.0, 10.0, 8, dtype=torch.float64)
    stacked = (left * values) @ torch.randn(8, 320, generator=generator, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(stacked[:, :300], full_matrices=False)
    superset, _ = leading_left_singular(stacked, 8, generator)
    for start in (None, superset):
        basis, found = leading_left_singular(stacked[:, :300], 8, generator, start)
        torch.testing.assert_close(found, s[:8], rtol=1e-9, atol=0)
        alignment = (basis * u[:, :8]).sum(dim=0).abs()
        torch.testing.assert_close(alignment, torch.ones_like(alignment))


def test_leading_singular_vectors_from_the_gram_match_the_svd():
    """The small cores' subspace estimate from their Gram's weighted block: the SVD's values and
    leading subspace, in float64 and in float32 with column scales near 1e19 (their squares
    would overflow a Gram scaled directly); the noise directions' values as accurate as a
    Gram allows."""
    from clair_lightning.core.subspace import leading_left_singular_from_gram

    generator = torch.Generator().manual_seed(1)
    for dtype, magnitude, tolerance in ((torch.float64, 1.0, 1e-10), (torch.float32, 1e19, 1e-5)):
        left = torch.linalg.qr(torch.randn(40, 6, generator=generator, dtype=torch.float64))[0]
        values = torch.linspace(9.0, 3.0, 6, dtype=torch.float64)
        signal = (left * values) @ torch.randn(6, 30, generator=generator, dtype=torch.float64)
        core = signal + 0.01 * torch.randn(40, 30, generator=generator, dtype=torch.float64)
        scales = magnitude * (0.5 + torch.rand(30, generator=generator, dtype=torch.float64))
        core, scales = core.to(dtype), scales.to(dtype)
        stacked = core * scales
        basis, singular = leading_left_singular_from_gram(stacked, core.T @ core, scales, 8)
        u, s, _ = torch.linalg.svd(stacked.double(), full_matrices=False)
        assert basis.shape == (40, 8) and torch.isfinite(basis).all()
        torch.testing.assert_close(
            basis.T.double() @ basis.double(),
            torch.eye(8, dtype=torch.float64),
            atol=tolerance,
            rtol=0,
        )
        # A Gram's eigenvalues are accurate to about n ε σ₁², so σ_i to n ε σ₁² / σ_i.
        bound = 30 * torch.finfo(dtype).eps * s[0] ** 2 / s[:8]
        assert ((singular.double() - s[:8]).abs() <= bound).all(), (singular, s[:8])
        torch.testing.assert_close(singular[:6].double(), s[:6], rtol=tolerance, atol=0)
        leading = basis.double()[:, :6]
        torch.testing.assert_close(
            leading @ leading.T, u[:, :6] @ u[:, :6].T, atol=tolerance, rtol=0
        )


def _svd_subspaces(stacked, gram, scales, count):
    """The SVD path's estimate, in place of the one from the Gram."""
    from clair_lightning.core.subspace import leading_left_singular

    return leading_left_singular(stacked, count)


def test_small_cores_subspaces_from_the_gram_give_the_svds_flags_and_refined_updates(monkeypatch):
    """Cores up to 256 columns keep their Gram and the subspace step takes its weighted block
    instead of an SVD of the weighted core: same flags and ranks, scores and refined updates
    within float tolerance of the SVD path (float32 and float64 federations with attackers)."""
    from clair_lightning.core import clair as clair_module

    for dtype in (torch.float32, torch.float64):
        generator = torch.Generator().manual_seed(7)
        federation = synthetic_federation(
            12,
            d_out=80,
            d_in=40,
            rank=4,
            subspace_rank=3,
            noise=0.05,
            num_modules=2,
            generator=generator,
            dtype=dtype,
        )
        updates = _off_subspace_attack(federation, [0, 4, 9], generator)
        fast = clair_aggregate(updates)
        assert all(core.gram is not None for core in _cores(updates))
        with monkeypatch.context() as patch:
            patch.setattr(clair_module, "leading_left_singular_from_gram", _svd_subspaces)
            reference = clair_aggregate(updates)
        assert fast.contaminated == reference.contaminated and fast.contaminated[0]
        assert fast.diagnostics["subspace_ranks"] == reference.diagnostics["subspace_ranks"]
        torch.testing.assert_close(
            torch.tensor(fast.scores), torch.tensor(reference.scores), rtol=1e-4, atol=1e-4
        )
        for name, basis in fast.subspaces.items():
            expected = reference.subspaces[name]
            torch.testing.assert_close(basis @ basis.T, expected @ expected.T)
        _assert_same_refined_updates(fast, reference)


def _cores(updates):
    from clair_lightning.core.compression import compress_with_gram, stacking_core
    from clair_lightning.core.updates import validate_updates

    validated = validate_updates(updates)
    for name in validated.module_names:
        module, gram, _ = compress_with_gram(validated, name, validated.included)
        yield stacking_core(module, gram)


def test_support_projectors_match_the_blocks_svd():
    """The support check's per-client projectors from the eigendecomposition of each block's
    small Gram equal the ones from the blocks' left singular vectors, for float32 blocks with
    a zero-padded column, a rank-deficient block and a floor between singular values."""
    from clair_lightning.core.clair import _support_projectors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randn(6, 5, 4, generator=generator)
    blocks[:, :, 3] = 0  # a narrower client's padding
    blocks[2] = torch.outer(
        torch.randn(5, generator=generator), torch.randn(4, generator=generator)
    )
    left, singular, _ = torch.linalg.svd(blocks.to(torch.float64), full_matrices=False)
    floor = singular[:, 1].square() * 0.999  # keeps the two leading directions of most blocks
    floor[2] = singular[2, 0].square() * 1e-6  # far above its zero singular values' rounding
    supported = left * (singular.square() >= floor[:, None])[:, None, :]
    expected = supported @ supported.transpose(1, 2)

    projectors = _support_projectors(blocks, floor)

    assert projectors.dtype == torch.float64
    torch.testing.assert_close(projectors, expected, rtol=0, atol=1e-10)
    ranks = torch.linalg.matrix_rank(projectors).tolist()
    assert ranks == [2, 2, 1, 2, 2, 2]
