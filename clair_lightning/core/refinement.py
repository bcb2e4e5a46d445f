"""Refinement of each benign client in exact factored form (CLAIR step 4).

``Θ̃_k = P_U Θ_k + (I − P_U) Σ_{j∈S} w_j Θ_j``: a client keeps its own variation inside the
shared subspace ``U`` and receives the collaborative set's average outside it, where averaging
over ``|S|`` clients shrinks the estimation noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .updates import ClientUpdate, LoraFactors, ValidatedUpdates


@dataclass(frozen=True)
class ModuleRefinement:
    """Pieces of one module's refinement that every client shares.

    ``off_subspace`` factors ``(I − UUᵀ) Σ_S w_j B_j A_j``; ``consensus`` factors the plain
    weighted average ``Σ_S w_j B_j A_j`` over the collaborative set.
    """

    subspace: Tensor
    off_subspace: LoraFactors
    consensus: LoraFactors


def module_refinement(
    validated: ValidatedUpdates, name: str, subspace: Tensor, collaborative_set: list[int]
) -> ModuleRefinement:
    """Shared pieces for one module, computed once per aggregation."""
    weights = validated.weights[collaborative_set]
    weights = (weights / weights.sum()).to(validated.dtype)
    factors = [validated.updates[k][name] for k in collaborative_set]
    weighted_b = torch.cat([w * b for w, (b, _) in zip(weights, factors, strict=True)], dim=1)
    stacked_a = torch.cat([a for _, a in factors], dim=0)
    off_b = weighted_b - subspace @ (subspace.T @ weighted_b)
    return ModuleRefinement(subspace, (off_b, stacked_a), (weighted_b, stacked_a))


def refine(update: ClientUpdate, pieces: dict[str, ModuleRefinement]) -> ClientUpdate:
    """Client's own in-subspace part plus the shared off-subspace average, per module."""
    refined: ClientUpdate = {}
    for name, (b, a) in update.items():
        piece = pieces[name]
        in_subspace_b = piece.subspace @ (piece.subspace.T @ b)
        off_b, off_a = piece.off_subspace
        refined[name] = (torch.cat([in_subspace_b, off_b], dim=1), torch.cat([a, off_a], dim=0))
    return refined


def consensus(pieces: dict[str, ModuleRefinement]) -> ClientUpdate:
    """The collaborative set's weighted average of products (what flagged clients may receive)."""
    return {name: piece.consensus for name, piece in pieces.items()}
