"""Synthetic federated regressions and their local least-squares estimators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Contamination = Literal["random_targets", "shuffled_targets", "foreign_subspace"]
CONTAMINATIONS: tuple[str, ...] = ("random_targets", "shuffled_targets", "foreign_subspace")


@dataclass(frozen=True)
class RegressionFederation:
    """Local estimates ``Θ̂_k`` (``d_out x d_in``), the truth ``Θ_k`` and who is contaminated.

    For a contaminated client ``truth`` holds the benign model it should have followed, so
    ``estimation error`` is always measured against what a benign client would want.
    """

    estimates: list[Tensor]
    truth: list[Tensor]
    contaminated: list[bool]
    subspace: Tensor
    sample_counts: list[int]

    @property
    def updates(self) -> list[dict[str, tuple[Tensor, Tensor]]]:
        """Estimates as CLAIR updates: a dense matrix is ``B = Θ̂``, ``A = I``."""
        identity = torch.eye(self.estimates[0].shape[1], dtype=self.estimates[0].dtype)
        return [{"coefficients": (estimate, identity)} for estimate in self.estimates]

    @property
    def benign(self) -> list[int]:
        return [k for k, flag in enumerate(self.contaminated) if not flag]


def make_federation(
    *,
    num_clients: int = 20,
    d_out: int = 30,
    d_in: int = 20,
    subspace_rank: int = 3,
    samples: int = 50,
    noise: float = 1.0,
    heterogeneity: float = 1.0,
    off_subspace_heterogeneity: float = 0.0,
    contaminated_fraction: float = 0.3,
    contamination: Contamination = "random_targets",
    seed: int = 0,
) -> RegressionFederation:
    """K regressions ``y = Θ_k x + σ ε`` with ``Θ_k = U (W̄ + h G_k) + H_k`` and LS fits.

    ``heterogeneity`` (h) scales the client-specific coefficients inside the shared subspace
    ``U``; ``off_subspace_heterogeneity`` scales benign variation ``H_k`` outside it (relative
    to ``‖U W_k‖``), the cost that can make refinement lose to local fitting. Contaminated
    clients fit random targets, targets shuffled across samples, or a foreign subspace.
    """
    if contamination not in CONTAMINATIONS:
        raise ValueError(f"contamination must be one of {CONTAMINATIONS}, got {contamination!r}")
    if not 0 <= contaminated_fraction < 0.5:
        raise ValueError(f"contaminated_fraction must be in [0, 0.5), got {contaminated_fraction}")
    if samples < d_in:
        raise ValueError(f"least squares needs samples >= d_in ({d_in}), got {samples}")
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    subspace = torch.linalg.qr(torch.randn(d_out, subspace_rank, generator=generator, dtype=dtype))[
        0
    ]
    common = torch.randn(subspace_rank, d_in, generator=generator, dtype=dtype)
    num_contaminated = round(contaminated_fraction * num_clients)
    order = torch.randperm(num_clients, generator=generator).tolist()
    contaminated = [False] * num_clients
    for client in order[:num_contaminated]:
        contaminated[client] = True

    estimates, truth = [], []
    for client in range(num_clients):
        coefficients = common + heterogeneity * torch.randn(
            subspace_rank, d_in, generator=generator, dtype=dtype
        )
        theta = subspace @ coefficients
        off = torch.randn(d_out, d_in, generator=generator, dtype=dtype)
        off = off - subspace @ (subspace.T @ off)
        theta = theta + off_subspace_heterogeneity * off * (theta.norm() / off.norm())
        inputs = torch.randn(samples, d_in, generator=generator, dtype=dtype)
        targets = inputs @ theta.T + noise * torch.randn(
            samples, d_out, generator=generator, dtype=dtype
        )
        if contaminated[client]:
            targets = _contaminate(contamination, inputs, targets, theta, generator)
        estimates.append(torch.linalg.lstsq(inputs, targets).solution.T)
        truth.append(theta)
    return RegressionFederation(estimates, truth, contaminated, subspace, [samples] * num_clients)


def _contaminate(
    contamination: str, inputs: Tensor, targets: Tensor, theta: Tensor, generator: torch.Generator
) -> Tensor:
    if contamination == "random_targets":
        return targets.std() * torch.randn(targets.shape, generator=generator, dtype=targets.dtype)
    if contamination == "shuffled_targets":
        return targets[torch.randperm(targets.shape[0], generator=generator)]
    foreign = torch.linalg.qr(
        torch.randn(theta.shape[0], 3, generator=generator, dtype=theta.dtype)
    )[0]
    coefficients = torch.randn(3, theta.shape[1], generator=generator, dtype=theta.dtype)
    foreign_theta = foreign @ coefficients * (theta.norm() / coefficients.norm())
    noise = targets - inputs @ theta.T
    return inputs @ foreign_theta.T + noise
