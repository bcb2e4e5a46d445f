"""One function per claim of the abstract; each returns plain rows (dicts) for the report."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from clair_lightning.core import AGGREGATORS, aggregate
from clair_lightning.core.aggregators import NEEDS_TRUTH
from clair_lightning.metrics import detection_metrics

from .data import CONTAMINATIONS, RegressionFederation, make_federation

IN_SUBSPACE = ("shuffled_targets",)

Row = dict[str, float | int | str | None]


def benign_error(federation: RegressionFederation, name: str, **options) -> Row:
    """Mean relative estimation error over benign clients, plus detection figures if any."""
    if name in NEEDS_TRUTH:
        options = {**options, "contaminated": federation.contaminated}
    result = aggregate(name, federation.updates, federation.sample_counts, **options)
    errors = []
    for client in federation.benign:
        b, a = result.refined[client]["coefficients"]
        truth = federation.truth[client]
        errors.append(float((b @ a - truth).norm() / truth.norm()))
    row: Row = {"aggregator": name, "benign_error": statistics.fmean(errors)}
    if name == "clair" or result.scores is not None:
        metrics = detection_metrics(result.contaminated, result.scores, federation.contaminated)
        row.update({"f1": metrics["f1"], "fpr": metrics["fpr"], "auroc": metrics["auroc"]})
        row["set_exact"] = result.contaminated == federation.contaminated
    if result.subspaces:
        row["subspace_error"] = subspace_error(
            result.subspaces["coefficients"], federation.subspace
        )
    return row


def subspace_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """``‖P_est − P_true‖₂``: 0 for the same subspace, 1 when a direction is missed or extra."""
    return float(torch.linalg.matrix_norm(estimate @ estimate.T - truth @ truth.T, ord=2))


def exact_recovery(seeds: Sequence[int]) -> list[Row]:
    """Noiseless estimates: the subspace and the contaminated set are recovered exactly.

    Shuffled targets keep a contaminated estimate inside the shared column space
    (``Θ̂ = Θ Mᵀ``): only the in-subspace direction check can see them, so they are reported
    apart from the paper's (off-subspace) identifiability claim.
    """
    return [
        {
            "contamination": contamination,
            "seed": seed,
            **benign_error(
                make_federation(noise=0.0, contamination=contamination, seed=seed), "clair"
            ),
        }
        for contamination in CONTAMINATIONS
        for seed in seeds
    ]


def stable_recovery(seeds: Sequence[int], noise_levels: Sequence[float]) -> list[Row]:
    """Subspace error grows smoothly with the estimation noise (no breakdown)."""
    return [
        {
            "noise": noise,
            "seed": seed,
            **benign_error(make_federation(noise=noise, seed=seed), "clair"),
        }
        for noise in noise_levels
        for seed in seeds
    ]


def consistency(seeds: Sequence[int], sample_sizes: Sequence[int]) -> list[Row]:
    """The collaborative set is recovered once clients have enough samples."""
    return [
        {
            "samples": samples,
            "seed": seed,
            **benign_error(make_federation(samples=samples, noise=3.0, seed=seed), "clair"),
        }
        for samples in sample_sizes
        for seed in seeds
    ]


def refinement_vs_samples(
    seeds: Sequence[int], sample_sizes: Sequence[int], aggregators: Sequence[str]
) -> list[Row]:
    """Benign-client estimation error of every aggregator as samples per client grow."""
    return [
        {"samples": samples, "seed": seed, **benign_error(federation, name)}
        for samples in sample_sizes
        for seed in seeds
        for federation in [make_federation(samples=samples, seed=seed)]
        for name in aggregators
    ]


def refinement_vs_contamination(
    seeds: Sequence[int], fractions: Sequence[float], aggregators: Sequence[str]
) -> list[Row]:
    """Benign-client estimation error as the contaminated fraction grows."""
    return [
        {"contaminated_fraction": fraction, "seed": seed, **benign_error(federation, name)}
        for fraction in fractions
        for seed in seeds
        for federation in [make_federation(contaminated_fraction=fraction, seed=seed)]
        for name in aggregators
    ]


def heterogeneity_cost(seeds: Sequence[int], levels: Sequence[float]) -> list[Row]:
    """Refinement beats local only while benign off-subspace heterogeneity stays small."""
    rows = []
    for level in levels:
        for seed in seeds:
            federation = make_federation(off_subspace_heterogeneity=level, seed=seed)
            for name in ("local", "clair"):
                rows.append(
                    {
                        "off_subspace_heterogeneity": level,
                        "seed": seed,
                        **benign_error(federation, name),
                    }
                )
    return rows


def comparison_aggregators() -> list[str]:
    """Every registered aggregator that runs on this recipe's default federation."""
    preferred = [
        "local",
        "fedavg",
        "clair",
        "oracle",
        "median",
        "trimmed_mean",
        "krum",
        "multikrum",
        "geomedian",
        "fedit",
    ]
    return [name for name in preferred if name in AGGREGATORS]
