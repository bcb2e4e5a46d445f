"""Extreme magnitudes and zeros are data: scale-free CLAIR, absurd norms left out, idle rounds."""

import pytest
import torch

from clair_lightning import aggregate, clair_aggregate
from clair_lightning.core.updates import ABSURD_NORM_RATIO, update_norm


def _federation(num_clients=8, seed=0):
    """Clients sharing a rank-2 direction in ``q``, with their own noise; ``v`` is free."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(32, 2, generator=generator)

    def client():
        mix = torch.randn(2, 4, generator=generator)
        return {
            "q": (
                shared @ mix + 0.1 * torch.randn(32, 4, generator=generator),
                torch.randn(4, 16, generator=generator),
            ),
            "v": (torch.randn(32, 4, generator=generator), torch.randn(4, 16, generator=generator)),
        }

    return [client() for _ in range(num_clients)]


def _scaled(update, factor):
    return {name: (factor * b, a) for name, (b, a) in update.items()}


def test_update_norm_is_exact_and_does_not_overflow_float32():
    update = _federation()[0]
    dense = sum(float((b.double() @ a.double()).square().sum()) for b, a in update.values())
    # float32 factors of moderate entries: float32 Grams, to float32's rounding.
    assert update_norm(update) == pytest.approx(dense**0.5, rel=1e-6)
    assert update_norm(_scaled(update, 1e20)) == pytest.approx(1e20 * dense**0.5, rel=1e-6)
    assert update_norm(_scaled(update, 1e-20)) == pytest.approx(1e-20 * dense**0.5, rel=1e-6)
    assert update_norm({name: (torch.zeros_like(b), a) for name, (b, a) in update.items()}) == 0
    # float64 factors may hold squares beyond float64's range: they take the scaled path.
    wide = {name: (b.double(), a.double()) for name, (b, a) in update.items()}
    assert update_norm(wide) == pytest.approx(dense**0.5, rel=1e-12)
    assert update_norm(_scaled(wide, 1e200)) == pytest.approx(1e200 * dense**0.5, rel=1e-10)


def test_a_client_scaled_by_1e20_is_left_out_with_its_reason_and_the_rest_is_unchanged():
    updates = _federation()
    attacked = list(updates)
    attacked[3] = _scaled(updates[3], 1e20)
    assert float(attacked[3]["q"][0].abs().max()) > 1e19  # float32 ‖B‖ ≈ 1e19 and more

    result = clair_aggregate(attacked)  # default nonfinite="raise": still no exception
    assert result.contaminated[3] and result.scores[3] == float("inf")
    assert list(result.excluded) == [3]
    assert "times the median client's" in result.excluded[3]
    assert f"{ABSURD_NORM_RATIO:g}" in result.excluded[3]
    without = clair_aggregate([u for k, u in enumerate(updates) if k != 3])
    assert [f for k, f in enumerate(result.contaminated) if k != 3] == without.contaminated
    for k in (0, 5):
        b, a = result.refined[k]["q"]
        assert torch.isfinite(b).all() and torch.isfinite(a).all()
    refined = result.refined[3]  # the excluded client receives the consensus, a finite update
    assert update_norm(refined) < 10 * update_norm(updates[0])


def test_every_baseline_leaves_the_absurd_client_out_instead_of_returning_inf():
    attacked = _federation()
    attacked[2] = _scaled(attacked[2], 1e20)
    for name in ("fedavg", "median", "trimmed_mean", "geomedian", "fedit"):
        result = aggregate(name, attacked)
        assert list(result.excluded) == [2], name
        b, a = result.refined[0]["q"]
        assert torch.isfinite(b @ a).all(), name


def test_clair_is_scale_free_a_common_factor_of_1e19_changes_no_flag_or_score():
    updates = _federation()
    updates[5] = {name: (3 * b.flip(0), a) for name, (b, a) in updates[5].items()}
    plain = clair_aggregate(updates)
    scaled = clair_aggregate([_scaled(u, 1e19) for u in updates])
    assert plain.contaminated == scaled.contaminated
    assert plain.contaminated[5]
    assert scaled.scores == pytest.approx(plain.scores, rel=1e-3, abs=1e-3)
    ratio = update_norm(scaled.refined[1]) / update_norm(_scaled(updates[1], 1e19))
    assert ratio == pytest.approx(update_norm(plain.refined[1]) / update_norm(updates[1]), rel=1e-3)


def test_a_round_in_which_no_client_moved_has_a_defined_result():
    updates = [
        {name: (torch.zeros_like(b), a) for name, (b, a) in update.items()}
        for update in _federation()
    ]  # every adapter at LoRA's initialisation: B = 0
    result = clair_aggregate(updates)
    assert result.contaminated == [False] * 8
    assert result.scores == [0.0] * 8
    assert result.diagnostics["unmoved"] is True
    assert result.subspaces["q"].shape == (32, 0)
    for k in range(8):
        assert result.refined[k]["q"][0] is updates[k]["q"][0]  # everyone keeps ΔW = 0


def test_a_module_no_client_moved_and_a_single_idle_client_are_aggregated():
    updates = _federation()
    idle_module = [{"q": u["q"], "v": (torch.zeros_like(u["v"][0]), u["v"][1])} for u in updates]
    result = clair_aggregate(idle_module)
    assert not any(result.contaminated)
    assert result.subspaces["v"].shape[1] == 0
    assert torch.equal(result.refined[0]["v"][0] @ result.refined[0]["v"][1], torch.zeros(32, 16))

    idle_client = list(updates)
    idle_client[4] = {name: (torch.zeros_like(b), a) for name, (b, a) in updates[4].items()}
    result = clair_aggregate(idle_client)
    assert result.contaminated[4]  # a client that did not move is far off the norm consensus
    assert not result.excluded
