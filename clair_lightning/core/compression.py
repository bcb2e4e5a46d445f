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

    Block ``blocks[i]`` of the stacking is ``T = B Rᵀ`` of ``clients[i]`` (``R`` from
    ``Aᵀ = Q R``, so a block is ``min(r, d_in)`` wide), so ``B A = T Qᵀ`` and
    ``norms[i] = ‖T‖_F = ‖B A‖_F``; ``block_owner[j]`` is the position in ``clients`` of the
    client owning column ``j``. Only the factors are kept (``b_factors`` are the clients' own
    ``B``, not copies): ``stacked`` forms the ``d_out x Σr`` stacking on each access, and
    ``stacked_times`` applies it without forming it, so a round over many modules never holds
    every module's stacking at once.
    """

    name: str
    clients: list[int]
    blocks: list[slice]
    norms: Tensor
    block_owner: Tensor
    b_factors: list[Tensor]
    row_factors: list[Tensor]

    @property
    def d_out(self) -> int:
        return self.b_factors[0].shape[0]

    @property
    def stacked(self) -> Tensor:
        """``[T_1 … T_K]`` (``d_out x Σr``), formed on each access."""
        return _transposed_stacking(self.b_factors, self.row_factors, self.blocks).T

    def stacked_times(self, other: Tensor) -> Tensor:
        """``stacked @ other`` from the factors, ``Σ_k B_k (R_kᵀ other[block_k])``."""
        product = None
        for b, r, block in zip(self.b_factors, self.row_factors, self.blocks, strict=True):
            small = r.T @ other[block]
            product = b @ small if product is None else product.addmm_(b, small)
        return product


def compress_module(validated: ValidatedUpdates, name: str, clients: list[int]) -> CompressedModule:
    """Compress one module's updates for ``clients`` without forming a ``d_out x d_in`` product.

    ``R_k`` comes from a Cholesky factorisation of the small Gram ``A_k A_kᵀ`` (Cholesky-QR),
    falling back to a QR of ``A_kᵀ`` when ``A_k`` is rank-deficient or badly conditioned.
    """
    return _compress(validated, name, clients)[0]


def compress_with_gram(
    validated: ValidatedUpdates, name: str, clients: list[int]
) -> tuple[CompressedModule, Tensor | None, Tensor]:
    """``compress_module`` and its ``stacking_gram``, forming the stacking once for both.

    Also returns that stacking, spent (scaled in place for the Gram): its memory can be written
    over (``row_basis_gram``'s ``out``) instead of page-faulting a fresh allocation.
    """
    module, stacked_t = _compress(validated, name, clients)
    return module, stacking_gram(module, stacked_t), stacked_t


def _compress(
    validated: ValidatedUpdates, name: str, clients: list[int]
) -> tuple[CompressedModule, Tensor]:
    """The compressed module and the transposed stacking its norms were measured on."""
    factors = [validated.updates[k][name] for k in clients]
    row_factors = _row_space_factors(
        [a for _, a in factors], [validated.row_grams.get((k, name)) for k in clients]
    )
    # A client's block is min(rank, d_in) wide: R has that many rows.
    widths = [r.shape[0] for r in row_factors]
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    blocks = [slice(offsets[i], offsets[i + 1]) for i in range(len(widths))]
    b_factors = [b for b, _ in factors]
    stacked_t = _transposed_stacking(b_factors, row_factors, blocks)
    owner = torch.repeat_interleave(
        torch.arange(len(widths), device=stacked_t.device),
        torch.tensor(widths, device=stacked_t.device),
    )
    squared = torch.zeros(len(widths), dtype=torch.float64, device=stacked_t.device)
    squared.index_add_(0, owner, _row_norms(stacked_t).to(torch.float64).square())
    norms = squared.sqrt().to(stacked_t.dtype)
    module = CompressedModule(name, list(clients), blocks, norms, owner, b_factors, row_factors)
    return module, stacked_t


def _row_norms(rows: Tensor) -> Tensor:
    """Euclidean norm of every row, without overflow or underflow.

    In the rows' own dtype where every norm is zero or within ``_DIRECT_NORMS`` (its squares
    can neither overflow nor lose a measurable share to underflow there: a float32 client of
    norm 1e19 would overflow), else in float64. Float64 in blocks of rows: one float64 copy
    of the whole stacking (32 MiB at the 7B shape) is allocated by mmap and page-faulted on
    every call, 8x slower than cache-sized blocks; at K = 16 even one 8 MiB copy cost 4 ms
    of the call, a float32 pass 0.1 ms.
    """
    direct = torch.linalg.vector_norm(rows, dim=1)
    low, high = _DIRECT_NORMS
    if bool(((direct == 0) | ((direct > low) & (direct < high))).all()):
        return direct
    return torch.cat(
        [
            torch.linalg.vector_norm(block, dim=1, dtype=torch.float64)
            for block in rows.split(_NORM_BLOCK_ROWS)
        ]
    )


_NORM_BLOCK_ROWS = 256
_DIRECT_NORMS = (1e-10, 1e10)


def _transposed_stacking(
    b_factors: list[Tensor], row_factors: list[Tensor], blocks: list[slice]
) -> Tensor:
    """``[T_1 … T_K]ᵀ`` (``Σr x d_out``): its rows are contiguous, each client writes in place."""
    first = b_factors[0]
    stacked_t = torch.empty(blocks[-1].stop, first.shape[0], dtype=first.dtype, device=first.device)
    for b, r, block in zip(b_factors, row_factors, blocks, strict=True):
        torch.matmul(r, b.T, out=stacked_t[block])
    return stacked_t


@dataclass(frozen=True)
class RowBasisGram:
    """Gram of one module's client row bases ``Q_kᵀ`` (stacked in ``clients`` order, ``blocks``).

    With ``A_k = R_kᵀ Q_kᵀ`` (``row_basis_gram``), ``A_i A_jᵀ = R_iᵀ (Q_iᵀ Q_j) R_j``: the
    collusion check forms this Gram anyway, and keeping it gives the write-back the Gram of any
    clients' stacked ``A`` from ``r x r`` products instead of a ``Σr x Σr x d_in`` one.
    """

    gram: Tensor
    clients: list[int]
    blocks: list[slice]
    row_factors: list[Tensor]

    def stacked_a_gram(self, clients: list[int]) -> Tensor:
        """Gram of ``torch.cat([A_k for k in clients])`` (``Σr x Σr``)."""
        position = {client: i for i, client in enumerate(self.clients)}
        chosen = [position[client] for client in clients]
        device = self.gram.device
        rows = torch.cat(
            [torch.arange(self.blocks[i].start, self.blocks[i].stop, device=device) for i in chosen]
        )
        selected = self.gram.index_select(0, rows).index_select(1, rows)
        widths = [self.blocks[i].stop - self.blocks[i].start for i in chosen]
        column_blocks = selected.split(widths, dim=1)
        right = torch.cat(
            [part @ self.row_factors[i] for part, i in zip(column_blocks, chosen, strict=True)],
            dim=1,
        )
        row_blocks = right.split(widths, dim=0)
        return torch.cat(
            [self.row_factors[i].T @ part for part, i in zip(row_blocks, chosen, strict=True)]
        )


def row_basis_gram(
    validated: ValidatedUpdates, module: CompressedModule, out: Tensor | None = None
) -> RowBasisGram:
    """The module's ``RowBasisGram``: one triangle of the Gram of the stacked ``Q_kᵀ``.

    A well-conditioned square ``R_k`` gives ``Q_kᵀ = R_k⁻ᵀ A_k`` (the small inverses in one
    batched solve and one GEMM per client: 8x faster here than a triangular solve with
    ``d_in`` right-hand sides, 4.0 against 5.2 ms for one inverse per client at K = 64,
    d_in = 4096); otherwise the QR of ``A_kᵀ`` that produced ``R_k`` gives ``Q_k``. Each
    ``Q_kᵀ`` is written in place into one stacking (a ``torch.cat`` of separately allocated
    bases page-faults twice: 13.5 ms against 8.5 ms at Σr = 1024, d_in = 4096), in ``out``'s
    memory when it is large enough (a fresh 16 MiB stacking page-faults once more: 4096 minor
    faults on every call here).
    """
    a_factors = [validated.updates[k][module.name][1] for k in module.clients]
    first = a_factors[0]
    shape = (module.blocks[-1].stop, first.shape[1])
    if (
        out is not None
        and out.numel() >= shape[0] * shape[1]
        and (out.dtype, out.device) == (first.dtype, first.device)
        and out.is_contiguous()
    ):
        bases = out.view(-1)[: shape[0] * shape[1]].view(shape)
    else:
        bases = torch.empty(shape, dtype=first.dtype, device=first.device)
    inverses = _well_conditioned_inverses(module.row_factors)
    for a, inverse, block in zip(a_factors, inverses, module.blocks, strict=True):
        if inverse is None:
            bases[block] = torch.linalg.qr(a.T)[0].T
        else:
            torch.matmul(inverse.T, a, out=bases[block])
    return RowBasisGram(
        symmetric_gram(bases), list(module.clients), module.blocks, module.row_factors
    )


def _well_conditioned_inverses(factors: list[Tensor]) -> list[Tensor | None]:
    """``R⁻¹`` of every square triangular factor whose diagonal is above the numerical floor
    (one batched solve per width), ``None`` for the others."""
    inverses: list[Tensor | None] = [None] * len(factors)
    by_width: dict[int, list[int]] = {}
    for i, factor in enumerate(factors):
        if factor.shape[0] == factor.shape[1]:
            by_width.setdefault(factor.shape[0], []).append(i)
    for width, members in by_width.items():
        stacked = torch.stack([factors[i] for i in members])
        diagonal = stacked.diagonal(dim1=1, dim2=2).abs()
        floor = numerical_floor(stacked.dtype)
        conditioned = diagonal.min(dim=1).values > diagonal.max(dim=1).values * floor
        identity = torch.eye(width, dtype=stacked.dtype, device=stacked.device)
        solved = torch.linalg.solve_triangular(stacked, identity.expand_as(stacked), upper=True)
        for i, keep, inverse in zip(members, conditioned.tolist(), solved, strict=True):
            if keep:
                inverses[i] = inverse
    return inverses


def _row_space_factors(a_factors: list[Tensor], grams: list[Tensor | None]) -> list[Tensor]:
    """Per client, ``R`` with ``RᵀR = A Aᵀ`` from a thin QR ``Aᵀ = Q R`` (``min(r, d_in) x r``);
    ``grams[i]`` is ``A Aᵀ`` where the validation already took it.

    Cholesky-QR: the Cholesky factor of ``A Aᵀ``, for all clients of one rank in one batched
    call and one check (bit-identical to one call per client, about 9 small operations fewer
    per client); a QR of ``Aᵀ`` where ``A`` is tall, rank-deficient or badly conditioned.
    """
    factors: list[Tensor | None] = [None] * len(a_factors)
    by_rank: dict[int, list[int]] = {}
    for i, a in enumerate(a_factors):
        if a.shape[0] <= a.shape[1]:
            by_rank.setdefault(a.shape[0], []).append(i)
    for members in by_rank.values():
        stacked = torch.stack(
            [a_factors[i] @ a_factors[i].T if grams[i] is None else grams[i] for i in members]
        )
        cholesky, info = torch.linalg.cholesky_ex(stacked, upper=True)
        diagonal = cholesky.diagonal(dim1=1, dim2=2).abs()
        floor = numerical_floor(stacked.dtype)
        usable = (info == 0) & (diagonal.amin(dim=1) > diagonal.amax(dim=1) * floor)
        for i, factor, keep in zip(members, cholesky, usable.tolist(), strict=True):
            if keep:
                factors[i] = factor
    return [
        torch.linalg.qr(a.T, mode="r")[1] if factor is None else factor
        for a, factor in zip(a_factors, factors, strict=True)
    ]


@dataclass(frozen=True)
class StackingCore:
    """A small square stand-in for a stacking whose client blocks are scaled to unit norm.

    ``matrix`` (``R``, at most ``Σr x Σr``) satisfies ``RᵀR = M̂ᵀM̂`` for the normalised stacking
    ``M̂``, so the decomposition on ``R`` is isometric to the one on ``M̂``: singular values,
    client-block norms and residuals against a subspace are the same. ``to_ambient`` maps
    vectors of the core's row space back to ``d_out``. ``right_singular``, for Cholesky cores
    up to ``_START_BASIS_MAX_SIZE`` columns, holds ``R``'s right singular vectors (columns)
    and values, largest first, from the Gram's eigendecomposition: the decomposition's first
    thresholding starts from them; ``gram`` is that Gram ``M̂ᵀM̂`` (``RᵀR`` up to the Cholesky
    factorisation's rounding), whose blocks give the subspace step's spectra.
    """

    matrix: Tensor
    nuclear_norm: float
    spectral_norm: float
    _normalised: Tensor | _LazyScaled
    _cholesky: bool
    _eigenvectors: Tensor | None = None
    _roots: Tensor | None = None
    right_singular: tuple[Tensor, Tensor] | None = None
    gram: Tensor | None = None

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


def stacking_gram(module: CompressedModule, stacked_t: Tensor | None = None) -> Tensor | None:
    """Gram ``M̂ᵀM̂`` of the stacking with unit-norm client blocks (``Σr x Σr``, one triangle).

    ``None`` for a stacking with at most half as many rows as columns, which is its own core.
    The blocks are normalised before the Gram is formed, so it does not depend on the
    clients' scale (a float32 block of norm 1e19 would overflow in a raw Gram). ``stacked_t``,
    the transposed stacking when the caller formed it, is scaled in place.
    """
    if module.d_out <= module.block_owner.numel() // 2:
        return None
    if stacked_t is None:
        stacked_t = _transposed_stacking(module.b_factors, module.row_factors, module.blocks)
    return symmetric_gram(stacked_t.mul_(_inverse_norms(module)[:, None]))


def stacking_core(module: CompressedModule, gram: Tensor | None = None) -> StackingCore:
    """Core of the module's stacking with unit-norm client blocks (Cholesky and eigvalsh of the
    Gram, ``gram`` when the caller already formed it with ``stacking_gram``).

    A stacking with at most half as many rows as columns is used directly instead. A
    rank-deficient or badly conditioned Gram (noiseless updates) falls back to an
    eigendecomposition that drops the numerical null space; the core then has fewer rows than
    columns, none when no client moved this module.
    """
    inverse_norms = _inverse_norms(module)
    if gram is None:
        gram = stacking_gram(module)
    if gram is None:
        # Short and wide (e.g. dense estimates with A = I): the stacking is its own core.
        return StackingCore.from_matrix((module.stacked * inverse_norms).contiguous())
    normalised = _LazyScaled(module, inverse_norms)
    floor = numerical_floor(gram.dtype)
    if module.d_out >= gram.shape[0]:  # else the Gram is singular, whatever a rounded Cholesky says
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if int(info) == 0:
            diagonal = factor.diagonal().abs()
            if diagonal.min() > diagonal.max() * floor:
                right_singular, kept_gram = None, None
                if gram.shape[0] <= _START_BASIS_MAX_SIZE:
                    kept_gram = gram
                    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
                    roots = eigenvalues.clamp_min(0).sqrt()
                    right_singular = (eigenvectors.flip(1), roots.flip(0))
                else:
                    roots = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
                return StackingCore(
                    factor.contiguous(),
                    float(roots.sum()),
                    float(roots.max()),
                    normalised,
                    _cholesky=True,
                    right_singular=right_singular,
                    gram=kept_gram,
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


def _inverse_norms(module: CompressedModule) -> Tensor:
    """Per column, one over its client block's norm (blocks of unmoved clients stay zero)."""
    return 1.0 / module.norms.clamp_min(1e-30)[module.block_owner].to(module.norms.dtype)


def symmetric_gram(rows: Tensor) -> Tensor:
    """``rows @ rowsᵀ``, computing only one triangle (the Gram is symmetric).

    On the CPU numpy's ``x @ x.T`` calls BLAS ``syrk`` (half the flops; 0.55 of torch's GEMM at
    816 x 4096, measured); elsewhere three half-size products (¾ of the flops).
    """
    if rows.device.type == "cpu" and rows.dtype in _SYRK_DTYPES and not rows.requires_grad:
        array = rows.numpy()
        return torch.from_numpy(array @ array.T)
    half = rows.shape[0] // 2
    if half < 128:
        return rows @ rows.T
    top, bottom = rows[:half], rows[half:]
    corner = top @ bottom.T
    return torch.cat(
        [torch.cat([top @ top.T, corner], dim=1), torch.cat([corner.T, bottom @ bottom.T], dim=1)]
    )


_SYRK_DTYPES = (torch.float32, torch.float64)
# Cores thresholded by the decomposition's certified warm-started iteration (its
# _FULL_SVD_MAX_SIZE); eigenvectors cost 1.5 ms more than eigenvalues alone at 256 x 256.
_START_BASIS_MAX_SIZE = 256


class _LazyScaled:
    """``stacked @ diag(scale)`` applied from the module's factors: nothing stacked is stored."""

    def __init__(self, module: CompressedModule, scale: Tensor):
        self._module = module
        self._scale = scale

    def __matmul__(self, other: Tensor) -> Tensor:
        return self._module.stacked_times(self._scale[:, None] * other)


def numerical_floor(dtype: torch.dtype) -> float:
    """Relative singular value below which a direction of a stacking counts as zero.

    Gram-based cores square the condition number, so float32 keeps directions down to 3e-3 of
    the largest singular value and float64 down to 1e-6.
    """
    return 1e-6 if dtype == torch.float64 else 3e-3
