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

    ``stacked[:, blocks[i]]`` is ``T = B Rᵀ`` of ``clients[i]`` (``R`` from ``Aᵀ = Q R``, so a
    block is ``min(r, d_in)`` wide), so
    ``B A = T Qᵀ`` and ``norms[i] = ‖T‖_F = ‖B A‖_F``; ``block_owner[j]`` is the position in
    ``clients`` of the client owning column ``j``.
    """

    name: str
    clients: list[int]
    stacked: Tensor
    blocks: list[slice]
    norms: Tensor
    block_owner: Tensor


def compress_module(validated: ValidatedUpdates, name: str, clients: list[int]) -> CompressedModule:
    """Compress one module's updates for ``clients`` without forming a ``d_out x d_in`` product.

    ``R_k`` comes from a Cholesky factorisation of the small Gram ``A_k A_kᵀ`` (Cholesky-QR),
    falling back to a QR of ``A_kᵀ`` when ``A_k`` is rank-deficient or badly conditioned.
    """
    factors = [validated.updates[k][name] for k in clients]
    row_factors = [_row_space_factor(a) for _, a in factors]
    # A client's block is min(rank, d_in) wide: R has that many rows.
    widths = [r.shape[0] for r in row_factors]
    d_out = factors[0][0].shape[0]
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(widths))]
    # Rows of the transposed stacking are contiguous, so each client writes its block in place.
    stacked_t = torch.empty(offsets[-1], d_out, dtype=validated.dtype, device=validated.device)
    for (b, _), r, block in zip(factors, row_factors, blocks, strict=True):
        torch.matmul(r, b.T, out=stacked_t[block])
    stacked = stacked_t.T
    owner = torch.repeat_interleave(
        torch.arange(len(widths), device=stacked.device),
        torch.tensor(widths, device=stacked.device),
    )
    # Squares in float64: a float32 block of norm 1e19 (a scaled client) would overflow.
    squared = torch.zeros(len(widths), dtype=torch.float64, device=stacked.device)
    row_norms = torch.linalg.vector_norm(stacked_t, dim=1, dtype=torch.float64)
    squared.index_add_(0, owner, row_norms.square())
    norms = squared.sqrt().to(stacked.dtype)
    return CompressedModule(name, list(clients), stacked, blocks, norms, owner)


def _row_space_factor(a: Tensor) -> Tensor:
    """``R`` with ``RᵀR = A Aᵀ`` from a thin QR ``Aᵀ = Q R`` (``min(r, d_in) x r``)."""
    if a.shape[0] > a.shape[1]:
        return torch.linalg.qr(a.T, mode="r")[1]
    factor, info = torch.linalg.cholesky_ex(a @ a.T, upper=True)
    if int(info) == 0:
        diagonal = factor.diagonal().abs()
        if diagonal.min() > diagonal.max() * numerical_floor(a.dtype):
            return factor
    return torch.linalg.qr(a.T, mode="r")[1]


@dataclass(frozen=True)
class StackingCore:
    """A small square stand-in for a stacking whose client blocks are scaled to unit norm.

    ``matrix`` (``R``, at most ``Σr x Σr``) satisfies ``RᵀR = M̂ᵀM̂`` for the normalised stacking
    ``M̂``, so the decomposition on ``R`` is isometric to the one on ``M̂``: singular values,
    client-block norms and residuals against a subspace are the same. ``to_ambient`` maps
    vectors of the core's row space back to ``d_out``.
    """

    matrix: Tensor
    nuclear_norm: float
    spectral_norm: float
    _normalised: Tensor | _LazyScaled
    _cholesky: bool
    _eigenvectors: Tensor | None = None
    _roots: Tensor | None = None

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> StackingCore:
        """Use a matrix as its own core (e.g. an uncompressed dense stacking), norms by SVD."""
        singular = torch.linalg.svdvals(matrix)
        identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return cls(
            matrix,
            float(singular.sum()),
            float(singular.max()),
            identity,
            _cholesky=False,
            _eigenvectors=identity,
            _roots=torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device),
        )

    def to_ambient(self, vectors: Tensor) -> Tensor:
        """``Q @ vectors`` for the orthonormal ``Q`` with ``M̂ = Q R`` (``d_out x k``)."""
        if self._cholesky:
            coefficients = torch.linalg.solve_triangular(self.matrix, vectors, upper=True)
        else:
            coefficients = self._eigenvectors @ (vectors / self._roots[:, None])
        return self._normalised @ coefficients


def stacking_core(module: CompressedModule) -> StackingCore:
    """Core of the module's stacking with unit-norm client blocks (one GEMM, Cholesky, eigvalsh).

    A stacking with at most half as many rows as columns is used directly instead.

    The blocks are normalised before the Gram is formed, so the core does not depend on the
    clients' scale (a float32 block of norm 1e19 would overflow in a raw Gram). A rank-deficient
    or badly conditioned Gram (noiseless updates) falls back to an eigendecomposition that drops
    the numerical null space; the core then has fewer rows than columns, none when no client
    moved this module.
    """
    stacked = module.stacked
    inverse_norms = 1.0 / module.norms.clamp_min(1e-30)[module.block_owner].to(stacked.dtype)
    if stacked.shape[0] <= stacked.shape[1] // 2:
        # Short and wide (e.g. dense estimates with A = I): the stacking is its own core.
        return StackingCore.from_matrix((stacked * inverse_norms).contiguous())
    gram = _symmetric_gram(module.stacked.T * inverse_norms[:, None])
    normalised = _LazyScaled(stacked, inverse_norms)
    floor = numerical_floor(stacked.dtype)
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) == 0:
        diagonal = factor.diagonal().abs()
        if diagonal.min() > diagonal.max() * floor:
            roots = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
            return StackingCore(
                factor.contiguous(),
                float(roots.sum()),
                float(roots.max()),
                normalised,
                _cholesky=True,
            )
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > eigenvalues.max().clamp_min(0) * floor**2
    roots = eigenvalues[keep].sqrt()
    vectors = eigenvectors[:, keep]
    return StackingCore(
        (roots[:, None] * vectors.T).contiguous(),
        float(roots.sum()),
        float(roots.max()) if len(roots) else 0.0,
        normalised,
        _cholesky=False,
        _eigenvectors=vectors,
        _roots=roots,
    )


def _symmetric_gram(rows: Tensor) -> Tensor:
    """``rows @ rowsᵀ`` from three half-size products (the Gram is symmetric: ¾ of the flops)."""
    half = rows.shape[0] // 2
    if half < 128:
        return rows @ rows.T
    top, bottom = rows[:half], rows[half:]
    corner = top @ bottom.T
    return torch.cat(
        [torch.cat([top @ top.T, corner], dim=1), torch.cat([corner.T, bottom @ bottom.T], dim=1)]
    )


class _LazyScaled:
    """``stacked @ diag(scale)`` applied on demand, so the scaled copy is never stored."""

    def __init__(self, stacked: Tensor, scale: Tensor):
        self._stacked = stacked
        self._scale = scale

    def __matmul__(self, other: Tensor) -> Tensor:
        return self._stacked @ (self._scale[:, None] * other)


def numerical_floor(dtype: torch.dtype) -> float:
    """Relative singular value below which a direction of a stacking counts as zero.

    Gram-based cores square the condition number, so float32 keeps directions down to 3e-3 of
    the largest singular value and float64 down to 1e-6.
    """
    return 1e-6 if dtype == torch.float64 else 3e-3
