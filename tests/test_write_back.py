"""Write-back at a LoRA rank: the shared-work path equals re-factorising each refined update."""

from __future__ import annotations

import pytest
import torch

from clair_lightning import clair_aggregate, refactorize
from clair_lightning.core import RefinedUpdates, refinement
from clair_lightning.core.baselines import fedavg
from clair_lightning.core.compression import RowBasisGram
from clair_lightning.core.factors import Refactorized
from clair_lightning.core.refinement import module_refinement, refine, refined_at_rank
from clair_lightning.core.result import at_rank
from clair_lightning.core.synthetic import synthetic_federation
from clair_lightning.core.updates import validate_updates
from clair_lightning.federation import ConfigBase, FederatedLoRAModule
from clair_lightning.federation.adapters import (
    read_update,
    write_refined,
    write_update,
)

from .test_federation import TINY_LLAMA


def _federation(num_clients, d_out, d_in, rank, dtype, subspace_rank=None, shared_a=None):
    generator = torch.Generator().manual_seed(0)
    updates = synthetic_federation(
        num_clients,
        d_out=d_out,
        d_in=d_in,
        rank=rank,
        subspace_rank=subspace_rank or rank,
        noise=0.05,
        generator=generator,
        dtype=dtype,
    ).updates
    updates = [dict(update) for update in updates]
    if shared_a is not None:  # clients that started from one adapter: A nearly or exactly equal
        for update in updates:
            for name, (b, a) in update.items():
                noise = torch.randn(a.shape, generator=generator, dtype=dtype)
                update[name] = (b, updates[0][name][1] + shared_a * noise)
    return updates


def _straightforward(validated, name, subspace, collaborative, rank, split):
    pieces = {name: module_refinement(validated, name, subspace, collaborative)}
    return [
        refactorize(*refine({name: validated.updates[k][name]}, pieces)[name], rank, split=split)
        for k in collaborative
    ]


@pytest.mark.parametrize(
    ("shape", "dtype", "rank", "options", "tolerance"),
    [
        ((12, 40, 30, 3), torch.float64, 3, {}, 1e-7),  # Σr >= d_in: identity row basis
        ((12, 40, 30, 3), torch.float64, 50, {}, 1e-7),  # rank above the product's: zero padding
        ((12, 40, 80, 4), torch.float64, 4, {}, 1e-7),  # Cholesky row basis, subspace iteration
        ((12, 40, 80, 4), torch.float32, 4, {}, 1e-5),
        ((12, 40, 80, 4), torch.float32, 4, {"shared_a": 1e-3}, 1e-5),  # float64 Cholesky
        ((12, 40, 80, 4), torch.float32, 4, {"shared_a": 0.0}, 1e-5),  # singular: eigh basis
        ((12, 40, 80, 4), torch.float64, 6, {"subspace_rank": 2}, 1e-7),  # noise directions too
    ],
)
@pytest.mark.parametrize("split", ["balanced", "orthonormal_a"])
def test_refined_at_rank_equals_refactorizing_each_refined_update(
    shape, dtype, rank, options, tolerance, split
):
    num_clients, d_out, d_in, client_rank = shape
    updates = _federation(num_clients, d_out, d_in, client_rank, dtype, **options)
    result = clair_aggregate(updates)
    validated = validate_updates(updates)
    collaborative = result.collaborative_set
    for name in validated.module_names:
        subspace = result.subspaces[name]
        fast = refined_at_rank(validated, name, subspace, collaborative, rank, split)
        slow = _straightforward(validated, name, subspace, collaborative, rank, split)
        for ours, reference in zip(fast, slow, strict=True):
            assert ours.b.shape == reference.b.shape and ours.a.shape == reference.a.shape
            assert ours.b.dtype == dtype
            product, expected = ours.b @ ours.a, reference.b @ reference.a
            assert float((product - expected).norm() / expected.norm()) < tolerance
            assert ours.relative_error == pytest.approx(reference.relative_error, abs=1e-5)
            if split == "balanced":
                torch.testing.assert_close(
                    ours.b.norm(dim=0), ours.a.norm(dim=1), rtol=1e-4, atol=1e-6
                )
            else:
                kept = ours.a.norm(dim=1) > 0
                gram = ours.a[kept] @ ours.a[kept].T
                torch.testing.assert_close(
                    gram, torch.eye(len(gram), dtype=dtype), atol=1e-5, rtol=0
                )


@pytest.mark.parametrize("shared_a", [None, 1e-3, 0.0])
def test_the_write_back_takes_its_row_basis_from_the_collusion_checks_gram(monkeypatch, shared_a):
    """``at_rank`` forms no Gram of the stacked ``A`` (the collusion check's row-basis Gram
    gives it), and the factors equal the straightforward path's, also where the row basis falls
    back to float64 (nearly equal ``A``) or to an eigendecomposition (equal ``A``)."""
    updates = _federation(12, 40, 80, 4, torch.float32, shared_a=shared_a)
    result = clair_aggregate(updates)
    validated = validate_updates(updates)
    reused, formed = [], []
    original_gram = RowBasisGram.stacked_a_gram
    original_symmetric = refinement.symmetric_gram

    def stacked_a_gram(self, clients):
        reused.append(clients)
        return original_gram(self, clients)

    def symmetric_gram(rows):
        formed.append((rows.shape, rows.dtype))
        return original_symmetric(rows)

    monkeypatch.setattr(RowBasisGram, "stacked_a_gram", stacked_a_gram)
    monkeypatch.setattr(refinement, "symmetric_gram", symmetric_gram)
    streamed = dict(result.refined.at_rank(4))
    collaborative = result.collaborative_set
    assert reused == [collaborative] * len(streamed)
    rows = 4 * len(collaborative)
    float32_grams = [shape for shape, dtype in formed if dtype == torch.float32]
    assert float32_grams == [(rows, 40)] * len(streamed)  # the off-subspace factors' Gram only
    for name, received in streamed.items():
        slow = _straightforward(
            validated, name, result.subspaces[name], collaborative, 4, "balanced"
        )
        for k, reference in zip(collaborative, slow, strict=True):
            product, expected = received[k].b @ received[k].a, reference.b @ reference.a
            assert float((product - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_the_subspace_iteration_finds_the_top_eigenpairs_past_its_structured_start(
    monkeypatch, scale
):
    """Clients whose top eigenvectors are not in the start basis iterate with dense bases; each
    client's top eigenpairs of ``diag(d) + Y_kᵀY_k`` equal a dense eigendecomposition's."""
    generator = torch.Generator().manual_seed(2)
    diagonal = torch.rand(160, generator=generator, dtype=torch.float64).sort(descending=True)[0]
    low_rank = scale * torch.randn(6, 3, 160, generator=generator, dtype=torch.float64)
    later_bases = []
    original = refinement._orthonormal_columns

    def orthonormal_columns(vectors):
        later_bases.append(vectors.shape[0])
        return original(vectors)

    monkeypatch.setattr(refinement, "_orthonormal_columns", orthonormal_columns)
    values, vectors = refinement._top_eigenpairs(diagonal, low_rank, 4, 1e-12)
    assert later_bases  # some clients went past the structured start
    expected_values, expected_vectors = refinement._dense_top_eigenpairs(diagonal, low_rank, 4)
    torch.testing.assert_close(values, expected_values, atol=1e-10, rtol=0)
    projector = vectors @ vectors.mT
    torch.testing.assert_close(projector, expected_vectors @ expected_vectors.mT, atol=1e-5, rtol=0)


def test_refined_at_rank_in_client_groups_equals_all_at_once(monkeypatch):
    updates = _federation(12, 40, 80, 4, torch.float64)
    result = clair_aggregate(updates)
    validated = validate_updates(updates)
    subspace = result.subspaces["layers.0.proj"]
    together = refined_at_rank(validated, "layers.0.proj", subspace, result.collaborative_set, 4)
    monkeypatch.setattr("clair_lightning.core.refinement._ITERATION_ENTRIES", 1)
    grouped = refined_at_rank(validated, "layers.0.proj", subspace, result.collaborative_set, 4)
    for ours, reference in zip(grouped, together, strict=True):
        torch.testing.assert_close(ours.b @ ours.a, reference.b @ reference.a)


@pytest.mark.parametrize("flagged_policy", ["own", "consensus"])
def test_at_rank_gives_every_client_what_refined_holds(flagged_policy):
    updates = _federation(10, 24, 40, 3, torch.float64)
    generator = torch.Generator().manual_seed(1)
    updates[2] = {
        name: (50 * torch.randn(b.shape, generator=generator, dtype=b.dtype), a)
        for name, (b, a) in updates[2].items()
    }
    updates[5] = {name: (b * float("nan"), a) for name, (b, a) in updates[5].items()}
    result = clair_aggregate(updates, flagged_policy=flagged_policy, nonfinite="exclude")
    assert result.contaminated[2] and 5 in result.excluded
    streamed = dict(result.refined.at_rank(3))
    assert sorted(streamed) == sorted(updates[0])
    for name, received in streamed.items():
        assert len(received) == 10
        for k, factors in enumerate(received):
            expected = at_rank(*result.refined[k][name], 3)
            if k == 2 and flagged_policy == "own":
                assert factors[0] is updates[2][name][0]  # its own upload, untouched
                continue
            assert isinstance(factors, Refactorized)
            torch.testing.assert_close(factors.b @ factors.a, expected.b @ expected.a)
        assert received[5] is received[2 if flagged_policy == "consensus" else 5]


def test_at_rank_never_builds_a_full_refined_update(monkeypatch):
    """Exact refined updates are rank r + Σr; the stream must not build one, not even to list
    the modules."""
    updates = _federation(8, 24, 40, 3, torch.float64)
    result = clair_aggregate(updates)
    assert not result.contaminated[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a full refined update was built")

    monkeypatch.setattr("clair_lightning.core.clair.refine", refuse)
    monkeypatch.setattr("clair_lightning.core.clair.module_refinement", refuse)
    assert [name for name, _ in result.refined.at_rank(3)] == ["layers.0.proj"]


def test_a_global_aggregate_is_refactorized_once_per_module():
    updates = _federation(6, 24, 40, 3, torch.float64)
    result = fedavg(updates)
    for name, received in result.refined.at_rank({"layers.0.proj": 3}):
        assert all(factors is received[0] for factors in received)
        expected = refactorize(*result.refined[0][name], 3)
        torch.testing.assert_close(received[0].b @ received[0].a, expected.b @ expected.a)


@pytest.mark.parametrize("aggregator", ["clair", "rank_one"])
def test_write_refined_writes_the_adapters_as_write_update_does_client_by_client(aggregator):
    """Same adapters, same truncation errors, same random re-draws as the per-client path.

    ``rank_one`` gives every client one update at rank 2 whose second column of B is zero:
    every adapter gets that dead direction re-drawn, in the same order as client by client.
    """
    streamed = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=6, lora_rank=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in streamed.model.named_parameters():
            if "lora_" in name:
                parameter.normal_(generator=generator)
            if "lora_B" in name and "client_4" in name and aggregator == "clair":
                parameter.zero_()  # flagged, keeps its own adapter
    reference = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=6, lora_rank=2)
    reference.model.load_state_dict(streamed.model.state_dict())
    adapters = [f"client_{k}" for k in range(6)]
    uploads = [read_update(streamed.model, adapter) for adapter in adapters]
    if aggregator == "clair":
        refined = clair_aggregate(uploads, threshold=2.0).refined
    else:
        rank_one = {name: (b * (torch.arange(2) == 0), a) for name, (b, a) in uploads[0].items()}
        refined = RefinedUpdates.same_for_all(rank_one, 6)

    errors = write_refined(
        streamed.model, adapters, refined, uploads, torch.Generator().manual_seed(3)
    )
    draws = torch.Generator().manual_seed(3)
    for k, adapter in enumerate(adapters):
        if all(refined[k][m][0] is uploads[k][m][0] for m in uploads[k]):
            assert k not in errors
            continue
        expected = write_update(reference.model, adapter, refined[k], draws)
        assert errors[k] == pytest.approx(expected, abs=1e-4)
    assert len(errors) == (5 if aggregator == "clair" else 6)
    redrawn = not torch.equal(draws.get_state(), torch.Generator().manual_seed(3).get_state())
    assert redrawn == (aggregator == "rank_one")
    for (name, ours), theirs in zip(
        streamed.model.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-3, msg=name)
