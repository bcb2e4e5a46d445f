"""Exact arithmetic on LoRA products kept in factored form, and re-factorisation to a LoRA rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .updates import LoraFactors

Split = Literal["balanced", "orthonormal_a"]


def stack_products(terms: Sequence[tuple[float | Tensor, Tensor, Tensor]]) -> LoraFactors:
    """Factors of ``Σ c_i B_i A_i`` without forming a dense product: ``[c_1 B_1 …] @ [A_1; …]``."""
    if not terms:
        raise ValueError("stack_products needs at least one term")
    b = torch.cat([coef * b_i for coef, b_i, _ in terms], dim=1)
    a = torch.cat([a_i for _, _, a_i in terms], dim=0)
    return b, a


@dataclass(frozen=True)
class Refactorized:
    """A rank-``rank`` factorisation ``B @ A`` and its relative Frobenius truncation error."""

    b: Tensor
    a: Tensor
    relative_error: float


def refactorize(
    b: Tensor,
    a: Tensor,
    rank: int,
    *,
    split: Split = "balanced",
) -> Refactorized:
    """Best rank-``rank`` approximation of ``B @ A`` computed in the compact space.

    Thin QRs of ``B`` and ``Aᵀ`` reduce the problem to an SVD of a small core, so no
    ``d_out x d_in`` matrix is formed. ``split="balanced"`` puts the square root of the singular
    values on both factors; ``"orthonormal_a"`` gives ``A`` orthonormal rows. When the product
    has lower rank than ``rank`` the extra columns of ``B`` and rows of ``A`` are zero.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if split not in ("balanced", "orthonormal_a"):
        raise ValueError(f"split must be 'balanced' or 'orthonormal_a', got {split!r}")
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    core = r_b @ r_a.T
    u_core, singular, vh_core = torch.linalg.svd(core, full_matrices=False)
    kept = min(rank, singular.numel())
    total = singular.square().sum()
    dropped = singular[kept:].square().sum()
    relative_error = float((dropped / total).sqrt()) if total > 0 else 0.0

    if split == "balanced":
        root = singular[:kept].sqrt()
        new_b = (q_b @ u_core[:, :kept]) * root
        new_a = root[:, None] * (vh_core[:kept] @ q_a.T)
    else:
        new_b = (q_b @ u_core[:, :kept]) * singular[:kept]
        new_a = vh_core[:kept] @ q_a.T
    if kept < rank:
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - kept)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(rank - kept, new_a.shape[1])], dim=0)
    return Refactorized(new_b, new_a, relative_error)
