"""Inner products of LoRA products across clients, computed from factors.

``⟨B_i A_i, B_j A_j⟩_F = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)``, so every distance- or cosine-based rule
(Krum, geometric median, …) runs exactly from a K x K Gram matrix without dense updates.
"""

from __future__ import annotations

import numpy
import torch
from torch import Tensor

from .compression import CompressedModule, RowBasisGram, row_basis_gram
from .updates import ValidatedUpdates


def product_gram(
    validated: ValidatedUpdates,
    clients: list[int] | None = None,
    module_scales: dict[str, float] | None = None,
) -> Tensor:
    """K' x K' Gram matrix of the clients' products, summed over modules (float64).

    ``module_scales`` divides each module's products by a scale first, so modules of different
    magnitudes weigh alike.
    """
    clients = validated.included if clients is None else clients
    gram = torch.zeros(len(clients), len(clients), dtype=torch.float64, device=validated.device)
    for name in validated.module_names:
        scale = 1.0 if module_scales is None else module_scales[name] ** 2
        gram += _factors_product_gram([validated.updates[k][name] for k in clients]) / scale
    return gram


def compressed_product_gram(
    validated: ValidatedUpdates,
    module: CompressedModule,
    stacking_gram: Tensor | None,
    basis_gram: RowBasisGram | None = None,
) -> Tensor:
    """One module's K' x K' Gram of products (float64), from the compression's own Gram.

    With ``B_k A_k = T_k Q_kᵀ`` (``compress_module``), ``⟨B_iA_i, B_jA_j⟩ = Σ (T_iᵀT_j) ⊙
    (Q_iᵀQ_j)``: the ``T`` Gram is the one the core was formed from (``stacking_gram``, blocks
    at unit norm), so only the ``Q`` Gram is new work (``basis_gram``, formed here when not
    given), one triangle instead of the two GEMMs of the ``B`` and ``A`` Grams.
    ``stacking_gram=None`` (a short, wide stacking without a Gram) takes the factors' Grams.
    """
    if stacking_gram is None:
        return _factors_product_gram([validated.updates[k][module.name] for k in module.clients])
    if basis_gram is None:
        basis_gram = row_basis_gram(validated, module)
    return blockwise_product_gram(module, stacking_gram, basis_gram)


def blockwise_product_gram(
    module: CompressedModule, column_gram: Tensor, basis_gram: RowBasisGram
) -> Tensor:
    """``‖Θ_i‖ ‖Θ_j‖ Σ (X_iᵀX_j) ⊙ (Q_iᵀQ_j)`` over client blocks (``K' x K'``, float64).

    ``column_gram`` is ``XᵀX`` for unit-norm column blocks ``X_k`` of the clients' compressed
    updates, or of any linear map of them (e.g. their coefficients in a subspace).
    """
    owner = module.block_owner
    unit = _blockwise_sums(column_gram * basis_gram.gram, owner, len(module.clients))
    norms = module.norms.to(torch.float64)
    return unit * norms[:, None] * norms[None, :]


def _factors_product_gram(factors: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ)`` for one module's factors (float64)."""
    b_all = torch.cat([b for b, _ in factors], dim=1)
    a_all = torch.cat([a for _, a in factors], dim=0)
    ranks = torch.tensor([b.shape[1] for b, _ in factors], device=b_all.device)
    owner = torch.repeat_interleave(torch.arange(len(factors), device=b_all.device), ranks)
    return _blockwise_sums((b_all.T @ b_all) * (a_all @ a_all.T), owner, len(factors))


def _blockwise_sums(elementwise: Tensor, owner: Tensor, count: int) -> Tensor:
    """Sums of the client blocks of a ``Σr x Σr`` matrix: a ``K x K`` matrix (float64)."""
    rows = elementwise.new_zeros(count, owner.numel()).index_add_(0, owner, elementwise)
    return rows.new_zeros(count, count).index_add_(1, owner, rows).to(torch.float64)


def squared_distances(gram: Tensor) -> Tensor:
    """Pairwise squared Frobenius distances from a Gram matrix (clamped at zero)."""
    diagonal = gram.diagonal()
    return (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp_min(0)


def geometric_median_coefficients(
    gram: Tensor,
    weights: Tensor,
    iterations: int = 100,
    smoothing: float = 1e-6,
    tolerance: float = 1e-8,
) -> Tensor:
    """Coefficients ``c`` with ``Σ c_i x_i`` the weighted geometric median of vectors ``x_i``.

    Smoothed Weiszfeld iterations run on the Gram matrix ``G_ij = ⟨x_i, x_j⟩`` alone, using
    ``‖Σ c_i x_i − x_j‖² = cᵀGc − 2(Gc)_j + G_jj``; ``smoothing`` is relative to the largest norm.
    Stops when the coefficients (which sum to one) move by at most ``tolerance`` in ℓ1.
    The iterations run in numpy on the host: on ``K``-long vectors torch's per-call cost is
    the whole cost (100 against 320 µs for 13 clients and 20 iterations, the same values).
    """
    matrix = gram.detach().to("cpu", torch.float64).numpy()
    weight = weights.detach().to("cpu", torch.float64).numpy()
    diagonal = numpy.diagonal(matrix)
    coefficients = weight / weight.sum()
    floor = smoothing * max(float(diagonal.max()), 1e-300) ** 0.5
    for _ in range(iterations):
        projected = matrix @ coefficients
        squared = coefficients @ projected - 2 * projected + diagonal
        inverse = weight / numpy.maximum(numpy.sqrt(numpy.maximum(squared, 0.0)), floor)
        updated = inverse / inverse.sum()
        moved = float(numpy.abs(updated - coefficients).sum())
        coefficients = updated
        if moved <= tolerance:
            break
    return torch.from_numpy(coefficients).to(gram.device)
