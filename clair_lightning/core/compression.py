"""Exact compression of stacked client updates (CLAIR step 1).

With a thin QR ``A_kᵀ = Q_k R_k`` and ``T_k = B_k R_kᵀ``, the stacking ``[B_1A_1, …, B_KA_K]``
equals ``[T_1 … T_K] · blkdiag(Q_1ᵀ … Q_Kᵀ)``. The right factor has orthonormal rows, so the
nuclear norm and every client block's Frobenius norm are unchanged and the decomposition can be
solved on ``[T_1 … T_K]`` (``d_out x Σr``), or on a ``Σr x Σr`` square root of its Gram matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .updates import ValidatedUpdates


@dataclass(frozen=True)
class CompressedModule:
    """One module's stacked updates in compressed form, for the clients in ``clients`` order.

    ``stacked[:, blocks[i]]`` is ``T`` of ``clients[i]``; ``row_bases[i]`` is its ``Q``
    (``d_in x r``) so that ``B A = T Qᵀ``; ``norms[i] = ‖T‖_F = ‖B A‖_F``.
    """

    name: str
    clients: list[int]
    stacked: Tensor
    row_bases: list[Tensor]
    blocks: list[slice]
    norms: Tensor

    @property
    def block_owner(self) -> Tensor:
        """Index (into ``clients``) of the client owning each column of ``stacked``."""
        sizes = torch.tensor([s.stop - s.start for s in self.blocks], device=self.stacked.device)
        return torch.repeat_interleave(torch.arange(len(self.blocks), device=sizes.device), sizes)


def compress_module(validated: ValidatedUpdates, name: str, clients: list[int]) -> CompressedModule:
    """Compress one module's updates for ``clients`` without forming any ``d_out x d_in`` product."""
    factors = [validated.updates[k][name] for k in clients]
    ranks = [b.shape[1] for b, _ in factors]
    if len(set(ranks)) == 1:
        b_batch = torch.stack([b for b, _ in factors])
        a_batch = torch.stack([a for _, a in factors])
        q_batch, r_batch = torch.linalg.qr(a_batch.transpose(1, 2))
        t_batch = b_batch @ r_batch.transpose(1, 2)
        stacked = t_batch.transpose(0, 1).reshape(t_batch.shape[1], -1)
        row_bases = list(q_batch.unbind(0))
    else:
        blocks_t, row_bases = [], []
        for b, a in factors:
            q, r = torch.linalg.qr(a.T)
            blocks_t.append(b @ r.T)
            row_bases.append(q)
        stacked = torch.cat(blocks_t, dim=1)
    offsets = [0]
    for rank in ranks:
        offsets.append(offsets[-1] + rank)
    blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(ranks))]
    norms = torch.stack([stacked[:, block].norm() for block in blocks])
    return CompressedModule(name, list(clients), stacked, row_bases, blocks, norms)


def gram_square_root(stacked: Tensor) -> Tensor:
    """A core ``R`` (at most ``Σr x Σr``) with ``RᵀR = MᵀM``: the decomposition's isometric stand-in.

    Cholesky of the Gram matrix is the fast path. A rank-deficient or badly conditioned Gram
    (noiseless updates) falls back to an eigendecomposition that drops the numerical null space,
    so the core may then have fewer rows than columns.
    """
    gram = stacked.T @ stacked
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) == 0:
        diagonal = factor.diagonal().abs()
        if diagonal.min() > diagonal.max() * _condition_floor(stacked.dtype):
            return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > eigenvalues.max().clamp_min(0) * _condition_floor(stacked.dtype) ** 2
    return eigenvalues[keep].sqrt()[:, None] * eigenvectors[:, keep].T


def _condition_floor(dtype: torch.dtype) -> float:
    """Relative size below which a direction of the stacking counts as numerically zero."""
    return 1e-6 if dtype == torch.float64 else 3e-3
