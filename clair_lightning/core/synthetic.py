"""Synthetic federations of LoRA updates that share a low-rank column subspace.

Benign client ``k``'s update for a module is ``U S_k A_k`` plus optional off-subspace noise:
``U`` (``d_out x r_s``) is shared, ``S_k = S̄ + heterogeneity · G_k`` varies around a common
centre and the row factors ``A_k`` around a common ``Ā``, as when clients start a round from the
same adapter. Used by the tests and benchmarks, and handy for checking a configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .updates import ClientUpdate


@dataclass(frozen=True)
class SyntheticFederation:
    """Benign client updates and the true shared subspace of each module."""

    updates: list[ClientUpdate]
    subspaces: dict[str, Tensor]


def synthetic_federation(
    num_clients: int,
    *,
    d_out: int = 64,
    d_in: int = 48,
    rank: int | list[int] = 4,
    subspace_rank: int = 3,
    heterogeneity: float = 0.5,
    noise: float = 0.0,
    num_modules: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> SyntheticFederation:
    """Benign updates only; contaminate them with ``clair_lightning.core.attacks``.

    ``rank`` may be one LoRA rank or one per client; ``noise`` is the off-subspace share of
    each update's norm (0 gives updates exactly inside the shared subspace).
    """
    ranks = [rank] * num_clients if isinstance(rank, int) else list(rank)
    if len(ranks) != num_clients:
        raise ValueError(f"rank has {len(ranks)} entries for {num_clients} clients")
    if not 1 <= subspace_rank < d_out:
        raise ValueError(f"subspace_rank must be in [1, d_out), got {subspace_rank}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    max_rank = max(ranks)
    updates: list[ClientUpdate] = [{} for _ in range(num_clients)]
    subspaces: dict[str, Tensor] = {}
    for module in range(num_modules):
        name = f"layers.{module}.proj"
        shared = torch.linalg.qr(_normal(d_out, subspace_rank, generator, dtype))[0]
        centre = _normal(subspace_rank, max_rank, generator, dtype)
        row_centre = _normal(max_rank, d_in, generator, dtype) / d_in**0.5
        for client, client_rank in enumerate(ranks):
            coefficients = centre[:, :client_rank] + heterogeneity * _normal(
                subspace_rank, client_rank, generator, dtype
            )
            b = shared @ coefficients
            # Drawn even without noise, so the same seed gives the same benign part.
            off = _normal(d_out, client_rank, generator, dtype)
            off = off - shared @ (shared.T @ off)
            b = b + noise * off * (b.norm() / off.norm())
            a = (
                row_centre[:client_rank]
                + 0.3 * _normal(client_rank, d_in, generator, dtype) / d_in**0.5
            )
            updates[client][name] = (b, a)
        subspaces[name] = shared
    return SyntheticFederation(updates, subspaces)


def _normal(rows: int, cols: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=dtype)
