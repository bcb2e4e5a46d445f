"""Refinement of each benign client in exact factored form (CLAIR step 4).

``Θ̃_k = P_U Θ_k + (I − P_U) Σ_{j∈S} w_j Θ_j``: a client keeps its own variation inside the
shared subspace ``U`` and receives the collaborative set's average outside it, where averaging
over ``|S|`` clients shrinks the estimation noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .compression import symmetric_gram
from .factors import Refactorized, Split
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


def refined_at_rank(
    validated: ValidatedUpdates,
    name: str,
    subspace: Tensor,
    collaborative_set: list[int],
    rank: int,
    split: Split = "balanced",
    stacked_a_gram: Tensor | None = None,
) -> list[Refactorized]:
    """Best rank-``rank`` factors of every collaborative client's refined update, one module.

    Equals ``refactorize(*refine(update_k, pieces)[name], rank, split=split)`` for each ``k`` in
    ``collaborative_set`` (in that order) within float tolerance, but the work shared by all
    clients is done once. The refined product ``X_k = U Uᵀ B_k A_k + N`` has ``N = (I − UUᵀ)
    Σ w_j B_j A_j``, whose columns are orthogonal to ``U``, so ``X_kᵀX_k = Z_kᵀZ_k + NᵀN``: in an
    orthonormal basis of the rows of the stacked ``A`` (which contain every ``A_k``) that is one
    shared matrix ``H`` plus a rank-``r_s`` term per client. One eigendecomposition of ``H`` per
    module makes each client's top-``rank`` eigenproblem diagonal plus low rank, solved by a
    batched subspace iteration in float64 (to a residual of 1e-8 of the largest eigenvalue for
    float32 factors, 1e-10 for float64); the factors follow from
    three GEMMs over all clients at once. Peak memory is a few ``d x Σr`` blocks per module.
    ``stacked_a_gram``, the Gram of the clients' stacked ``A`` when the caller has it
    (``RowBasisGram``), saves forming it.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if split not in ("balanced", "orthonormal_a"):
        raise ValueError(f"split must be 'balanced' or 'orthonormal_a', got {split!r}")
    dtype = validated.dtype
    factors = [validated.updates[k][name] for k in collaborative_set]
    widths = [b.shape[1] for b, _ in factors]
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(widths))]
    weights = validated.weights[collaborative_set]
    weights = (weights / weights.sum()).to(dtype)
    column_weights = torch.repeat_interleave(weights, torch.tensor(widths, device=weights.device))

    stacked_b = torch.cat([b for b, _ in factors], dim=1)
    inside = subspace.T @ stacked_b  # r_s x Σr: each client's Uᵀ B_k side by side
    off_b = (stacked_b - subspace @ inside) * column_weights
    rows = _RowBasis(torch.cat([a for _, a in factors], dim=0), stacked_a_gram)
    # H = NᵀN in row coordinates, from the Σr x Σr Gram of the off-subspace factors.
    shared = rows.coordinates.T @ symmetric_gram(off_b.T) @ rows.coordinates
    shared_eigenvalues, shared_vectors = torch.linalg.eigh(shared)
    shared_eigenvalues = shared_eigenvalues.flip(0).clamp_min(0)
    shared_vectors = shared_vectors.flip(1)
    coordinates_in_eigenbasis = rows.coordinates @ shared_vectors
    per_client = torch.stack(
        [inside[:, block] @ coordinates_in_eigenbasis[block] for block in blocks]
    )  # Z_k in the eigenbasis of H: K x r_s x n

    count = min(rank, shared_eigenvalues.numel())
    width = count + per_client.shape[1] + _OVERSAMPLING
    group = max(1, _ITERATION_ENTRIES // (shared_eigenvalues.numel() * width))
    pairs = [
        _top_eigenpairs(
            shared_eigenvalues.to(torch.float64),
            chunk.to(torch.float64),
            count,
            _RESIDUAL_TOLERANCE[dtype],
        )
        for chunk in per_client.split(group)
    ]
    eigenvalues = torch.cat([values for values, _ in pairs])
    eigenvectors = torch.cat([vectors for _, vectors in pairs])
    total = shared_eigenvalues.to(torch.float64).sum() + per_client.to(torch.float64).square().sum(
        dim=(1, 2)
    )
    dropped = (total - eigenvalues.sum(dim=1)).clamp_min(0)
    relative_errors = torch.where(total > 0, (dropped / total.clamp_min(1e-300)).sqrt(), 0.0)

    num_clients, n = per_client.shape[0], shared_eigenvalues.numel()
    directions = shared_vectors @ eigenvectors.to(dtype).permute(1, 0, 2).reshape(n, -1)
    off_part = off_b @ (rows.coordinates @ directions)  # d_out x K·count
    new_a = rows.to_rows(directions).reshape(num_clients, count, -1)
    singular = eigenvalues.clamp_min(0).sqrt().to(dtype)
    results = []
    for position, block in enumerate(blocks):
        columns = slice(position * count, (position + 1) * count)
        direction = directions[:, columns]
        b = off_part[:, columns] + subspace @ (
            inside[:, block] @ (rows.coordinates[block] @ direction)
        )
        a = new_a[position]
        if split == "balanced":
            root = singular[position].sqrt()
            inverse_root = torch.where(root > 0, 1.0 / root.clamp_min(1e-30), 0.0)
            b, a = b * inverse_root, root[:, None] * a
        if count < rank:
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - count)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - count, a.shape[1])], dim=0)
        results.append(Refactorized(b, a, float(relative_errors[position])))
    return results


class _RowBasis:
    """An orthonormal basis ``Q`` of the row space of a stacking ``S`` (``Σr x d_in``), implicit.

    ``coordinates`` is ``S Q`` (so ``S = coordinates @ Qᵀ``); ``to_rows(c)`` is ``(Q c)ᵀ``.
    With at least ``d_in`` rows the basis is the identity. Otherwise ``Q = Sᵀ L⁻ᵀ`` from the
    Cholesky factor of ``S Sᵀ = L Lᵀ``; its orthonormality error is ``ε · cond(S Sᵀ)``, so the
    working precision is used only when the factor's diagonal spans less than 10x (clients'
    ``A`` nearly independent), float64 otherwise (clients that started from one adapter have
    nearly equal ``A``). A Gram singular even in float64 takes an eigendecomposition that drops
    the numerical null space. ``gram`` is ``S Sᵀ`` when the caller has it (working precision).
    """

    def __init__(self, stacked_a: Tensor, gram: Tensor | None = None):
        self._stacked = stacked_a
        self._lower: Tensor | None = None
        self._row_map: Tensor | None = None
        if stacked_a.shape[0] >= stacked_a.shape[1]:
            self.coordinates = stacked_a
            return
        gram = symmetric_gram(stacked_a) if gram is None else gram
        lower, info = torch.linalg.cholesky_ex(gram)
        if _well_conditioned(lower, info, 0.1):
            self.coordinates = self._lower = lower
            return
        self._stacked = stacked_a.to(torch.float64)
        gram = symmetric_gram(self._stacked)
        lower, info = torch.linalg.cholesky_ex(gram)
        if _well_conditioned(lower, info, 1e-6):
            self._lower = lower
            self.coordinates = lower.to(stacked_a.dtype)
            return
        gamma, w = torch.linalg.eigh(gram)
        keep = gamma > gamma.max().clamp_min(1e-300) * 1e-14
        root = gamma[keep].sqrt()
        self.coordinates = (w[:, keep] * root).to(stacked_a.dtype)
        self._row_map = w[:, keep] / root

    def to_rows(self, vectors: Tensor) -> Tensor:
        if self._lower is not None:
            coefficients = torch.linalg.solve_triangular(
                self._lower.T, vectors.to(self._lower.dtype), upper=True
            )
        elif self._row_map is not None:
            coefficients = self._row_map @ vectors.to(self._row_map.dtype)
        else:
            return vectors.T.contiguous()
        return (coefficients.T @ self._stacked).to(vectors.dtype)


def _well_conditioned(lower: Tensor, info: Tensor, ratio: float) -> bool:
    """Cholesky succeeded and the factor's diagonal spans less than ``1 / ratio``."""
    diagonal = lower.diagonal()
    return int(info) == 0 and bool(diagonal.min() > ratio * diagonal.max())


_OVERSAMPLING = 8
# Clients go through the subspace iteration in groups whose float64 blocks hold about this
# many entries (64 MiB), so memory does not grow with K.
_ITERATION_ENTRIES = 2**23
# Ritz residual, relative to the largest eigenvalue, at which a client's iteration stops: the
# eigenproblem is only as accurate as the factors it was formed from.
_RESIDUAL_TOLERANCE = {torch.float32: 1e-8, torch.float64: 1e-10}
_MAX_ITERATIONS = 60


def _top_eigenpairs(
    diagonal: Tensor, low_rank: Tensor, count: int, tolerance: float
) -> tuple[Tensor, Tensor]:
    """Top ``count`` eigenpairs of ``diag(d) + Y_kᵀY_k`` for each ``Y_k`` in ``low_rank``.

    ``diagonal`` is sorted descending. Batched subspace iteration with Rayleigh–Ritz, started
    from the rows of ``Y_k`` and the leading coordinate axes (where the top eigenvectors lie
    when the update is small or large against ``diag(d)``); a client whose Ritz residuals do not
    fall below ``tolerance · θ₁`` within the iteration limit gets an exact dense
    eigendecomposition.
    Returns eigenvalues (K x count, descending) and eigenvectors (K x n x count).
    """
    num_clients, extra_rank, n = low_rank.shape
    width = min(n, count + extra_rank + _OVERSAMPLING)
    if n <= 2 * width:
        return _dense_top_eigenpairs(diagonal, low_rank, count)
    # The start basis [[I, 0], [0, Q]] (leading axes, then a QR of only the rows of Y_k below
    # them: the same span) is applied block by block: the axes need no products. Later bases
    # are dense. With G = diag(d) + YᵀY, the Rayleigh quotient is Vᵀ(d ⊙ V) + (YV)ᵀ(YV) and
    # G V is d ⊙ V + Yᵀ(YV), so G V is formed only for the clients that iterate again.
    num_axes = width - extra_rank
    lower = torch.linalg.qr(low_rank.mT[:, num_axes:])[0]
    projected = torch.cat([low_rank[..., :num_axes], low_rank[..., num_axes:] @ lower], dim=2)
    rayleigh = projected.mT @ projected
    rayleigh[:, :num_axes, :num_axes] += torch.diag(diagonal[:num_axes])
    rayleigh[:, num_axes:, num_axes:] += lower.mT @ (diagonal[num_axes:, None] * lower)
    basis: Tensor | None = None

    def times_basis(rotation: Tensor, clients: Tensor | slice) -> Tensor:
        if basis is None:
            below = lower[clients] @ rotation[:, num_axes:]
            return torch.cat([rotation[:, :num_axes], below], dim=1)
        return basis[clients] @ rotation

    pending = torch.arange(num_clients, device=low_rank.device)
    eigenvalues = low_rank.new_zeros(num_clients, count)
    eigenvectors = low_rank.new_zeros(num_clients, n, count)
    for _ in range(_MAX_ITERATIONS):
        y = low_rank[pending]
        ritz_values, rotation = torch.linalg.eigh(rayleigh)
        ritz_values, rotation = ritz_values.flip(-1), rotation.flip(-1)
        # Only the top Ritz vectors are tested and kept; the full rotation is applied only
        # for clients that iterate again.
        top = rotation[..., :count]
        top_basis = times_basis(top, slice(None))
        residual = (
            diagonal[:, None] * top_basis
            + y.mT @ (projected @ top)
            - top_basis * ritz_values[:, None, :count]
        )
        scale = ritz_values[:, :1].abs().clamp_min(1e-300)
        done = (torch.linalg.vector_norm(residual, dim=1) <= tolerance * scale).all(1)
        finished = pending[done]
        eigenvalues[finished] = ritz_values[done, :count]
        eigenvectors[finished] = top_basis[done]
        pending = pending[~done]
        if pending.numel() == 0:
            return eigenvalues, eigenvectors
        again = ~done
        rotated = times_basis(rotation[again], again)
        applied = diagonal[:, None] * rotated + y[again].mT @ (projected[again] @ rotation[again])
        basis = _orthonormal_columns(applied)
        projected = low_rank[pending] @ basis
        rayleigh = basis.mT @ (diagonal[:, None] * basis) + projected.mT @ projected
    dense_values, dense_vectors = _dense_top_eigenpairs(diagonal, low_rank[pending], count)
    eigenvalues[pending], eigenvectors[pending] = dense_values, dense_vectors
    return eigenvalues, eigenvectors


def _orthonormal_columns(vectors: Tensor) -> Tensor:
    """Orthonormalise nearly orthogonal columns (Ritz vectors times ``G``) by Cholesky-QR.

    Columns are scaled to unit norm first, so Cholesky-QR is exact to ``ε · cond²`` of nearly
    orthonormal columns; a batch whose Gram is not positive definite takes a Householder QR.
    """
    unit = vectors / torch.linalg.vector_norm(vectors, dim=-2, keepdim=True).clamp_min(1e-300)
    factor, info = torch.linalg.cholesky_ex(unit.mT @ unit, upper=True)
    if bool((info != 0).any()):
        return torch.linalg.qr(unit)[0]
    return torch.linalg.solve_triangular(factor, unit, upper=True, left=False)


def _dense_top_eigenpairs(diagonal: Tensor, low_rank: Tensor, count: int) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(torch.diag(diagonal) + low_rank.mT @ low_rank)
    return values.flip(-1)[:, :count], vectors.flip(-1)[..., :count]
