"""Low-rank plus block-sparse decomposition of compressed client stackings (CLAIR step 2).

Solves, jointly over modules ``m`` and with one group per client spanning all its modules,

    min Σ_m ‖L_m‖_* + λ Σ_k (Σ_m ‖C_{m,k}‖_F²)^½   subject to  L_m + C_m = M_m       ("exact")
    min Σ_m ‖L_m‖_* + λ Σ_k (Σ_m ‖C_{m,k}‖_F²)^½ + (1/2ν) Σ_m ‖M_m − L_m − C_m‖_F²  ("stable")

on the small square cores of the compressed stackings. The exact problem is solved by an
inexact augmented Lagrangian method (Lin, Chen & Ma 2010) with block soft-thresholding, the
stable one by accelerated proximal gradient (FISTA). Pooling the group across modules lets a
client's evidence from every layer count towards one decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .compression import StackingCore, symmetric_gram
from .updates import converted

Formulation = Literal["exact", "stable"]

# Cores up to this size use a certified warm-started subspace iteration (full SVD when its
# certificate fails); larger ones a warm-started randomized SVD.
_FULL_SVD_MAX_SIZE = 256
_OVERSAMPLING = 10
# Below this size a full SVD is as cheap as the certificate.
_CERTIFIED_MIN_SIZE = 64
_CERTIFIED_EXTRA = 8
_CERTIFIED_SWEEPS = 6
# Ritz residual (in units of ε‖M‖_F) at which the certified iteration stops. In the ALM the
# first float64 sweep after the float32 power step leaves 2–10 ε‖M‖_F (about 2 from the
# basis's float32 rounding alone): at 4, a third of the thresholdings took a second sweep for
# it (d = 4096, K = 16); at 16 the result stays within 16ε‖M‖_F of the exact D_τ(M), and the
# rank stays exact (the certificate does not depend on the residual).
_RITZ_TOLERANCE = 16.0
# Row blocks the certificate tries first, most first (1: the whole deflated core).
_TAIL_BLOCKS = (4, 2, 1)


@dataclass(frozen=True)
class Decomposition:
    """Solution of the decomposition on the cores.

    ``sparse_fraction[k]`` is ``‖C_k‖_F / ‖M_k‖_F`` pooled over modules: the share of client
    ``k``'s update that the low-rank part cannot explain.
    """

    low_rank: list[Tensor]
    sparse: list[Tensor]
    sparse_fraction: Tensor
    low_rank_ranks: list[int]
    lam: float
    iterations: int
    converged: bool


def block_outlier_pursuit(
    cores: list[StackingCore],
    owners: list[Tensor],
    num_clients: int,
    *,
    lam_factor: float = 1.0,
    formulation: Formulation = "exact",
    noise_level: float = 0.05,
    tolerance: float = 1e-4,
    max_iterations: int = 500,
    penalty_growth: float = 1.5,
    svd: Literal["auto", "full"] = "auto",
    generator: torch.Generator | None = None,
) -> Decomposition:
    """Split each core ``M_m`` into a low-rank ``L_m`` and a client-block-sparse ``C_m``.

    ``owners[m][j]`` is the client (0..num_clients-1) owning column ``j`` of ``cores[m]``.
    λ is scale-free: ``lam_factor · Σ_m ‖M_m‖_* / Σ_k ‖M_k‖_F``, the value at which putting all
    data in ``L`` or all in ``C`` costs the same. ``noise_level`` (stable formulation only) is
    the expected relative Frobenius size of the noise, which sets ν. ``svd="full"`` forces a
    full SVD in every thresholding step (the textbook solver, for comparisons).
    """
    if not cores:
        raise ValueError("block_outlier_pursuit needs at least one module")
    spectral = max(core.spectral_norm for core in cores)
    nuclear = sum(core.nuclear_norm for core in cores)
    matrices = [core.matrix for core in cores]
    if lam_factor <= 0:
        raise ValueError(f"lam_factor must be positive, got {lam_factor}")
    if formulation not in ("exact", "stable"):
        raise ValueError(f"formulation must be 'exact' or 'stable', got {formulation!r}")
    block_norms = _pooled_block_norms(matrices, owners, num_clients)
    lam = lam_factor * nuclear / float(block_norms.sum())
    if svd not in ("auto", "full"):
        raise ValueError(f"svd must be 'auto' or 'full', got {svd!r}")
    solver = _SvtState(len(cores), generator, full=svd == "full")
    for m, core in enumerate(cores):
        solver.start_from(m, core.right_singular)
    if formulation == "exact":
        low_rank, sparse, iterations, converged = _inexact_alm(
            matrices,
            owners,
            num_clients,
            lam,
            spectral,
            tolerance,
            max_iterations,
            penalty_growth,
            solver,
        )
    else:
        if noise_level <= 0:
            raise ValueError(f"noise_level must be positive, got {noise_level}")
        low_rank, sparse, iterations, converged = _fista(
            matrices, owners, num_clients, lam, noise_level, tolerance, max_iterations, solver
        )
    sparse_norms = _pooled_block_norms(sparse, owners, num_clients)
    fraction = torch.where(block_norms > 0, sparse_norms / block_norms.clamp_min(1e-30), 0.0)
    return Decomposition(
        low_rank=low_rank,
        sparse=sparse,
        sparse_fraction=fraction,
        low_rank_ranks=list(solver.ranks),
        lam=lam,
        iterations=iterations,
        converged=converged,
    )


def _inexact_alm(
    cores: list[Tensor],
    owners: list[Tensor],
    num_clients: int,
    lam: float,
    spectral: float,
    tolerance: float,
    max_iterations: int,
    penalty_growth: float,
    solver: _SvtState,
) -> tuple[list[Tensor], list[Tensor], int, bool]:
    dual_scale = max(spectral, float(_pooled_block_norms(cores, owners, num_clients).max()) / lam)
    duals = [core / dual_scale for core in cores]
    penalty = 1.25 / spectral
    max_penalty = penalty * 1e7
    data_norm = _total_norm(cores)
    # The state is updated in place, one module at a time: only the cores, the duals and one
    # matrix per module that holds C (between iterations) or the target Z = M − L + Y/μ
    # (within one) are alive, plus one module's temporaries; L is not kept.
    sparse = [torch.zeros_like(core) for core in cores]
    # Two module-sized work matrices per core shape, reused for every temporary of the loop.
    work: dict[torch.Size, tuple[Tensor, Tensor]] = {}
    for core in cores:
        if core.shape not in work:
            work[core.shape] = (torch.empty_like(core), torch.empty_like(core))
    # Until a client's pooled block first exceeds λ/μ, C = 0 and every iterate is a spectral
    # function of the core M = U diag(s) Vᵀ: Y = U diag(s ⊙ w) Vᵀ, from w = 1/J, and the target
    # M + Y/μ has M's singular vectors (``threshold_spectral``); None once C moves.
    multipliers = [solver.spectral_start(m, core, 1.0 / dual_scale) for m, core in enumerate(cores)]
    for iteration in range(1, max_iterations + 1):
        for m, (core, y) in enumerate(zip(cores, duals, strict=True)):
            shifted, low_rank_target = work[core.shape]
            torch.add(core, y, alpha=1.0 / penalty, out=shifted)
            dual = multipliers[m]
            if dual is not None:
                low_rank, kept = solver.threshold_spectral(
                    m, core, 1.0 + dual / penalty, 1.0 / penalty, out=low_rank_target
                )
                multipliers[m] = dual + penalty * (1.0 - kept)  # Y + μ(M − L) while C = 0
            else:
                torch.sub(shifted, sparse[m], out=low_rank_target)
                low_rank = solver.threshold(m, low_rank_target, 1.0 / penalty, out=low_rank_target)
            torch.sub(shifted, low_rank, out=sparse[m])
        factors = _shrink_factors(sparse, owners, num_clients, lam / penalty, work)
        if any(dual is not None for dual in multipliers) and bool((factors > 0).any()):
            multipliers = [None] * len(cores)
        # With C = s ⊙ Z, the new dual is μ(Z − C) and M − L − C = Z − C − Y/μ; (1 − s) per
        # column, for both passes below.
        keeps = [
            (1.0 - factors.to(target.dtype))[owner]
            for target, owner in zip(sparse, owners, strict=True)
        ]
        squared_residual = 0.0
        for target, keep, y in zip(sparse, keeps, duals, strict=True):
            gap = torch.mul(target, keep, out=work[target.shape][0])
            gap.sub_(y, alpha=1.0 / penalty)
            squared_residual += float(torch.linalg.vector_norm(gap)) ** 2
        converged = float(squared_residual**0.5) <= tolerance * data_norm
        last = converged or iteration == max_iterations
        for core, target, keep, y in zip(cores, sparse, keeps, duals, strict=True):
            rest = torch.mul(target, keep, out=work[target.shape][0])
            if last:  # L = M + Y/μ − Z, in the dual's place
                torch.add(core, y, alpha=1.0 / penalty, out=y).sub_(target)
            else:
                torch.mul(rest, penalty, out=y)
            target.sub_(rest)
        if last:
            return duals, sparse, iteration, converged
        penalty = min(penalty * penalty_growth, max_penalty)
    return [torch.zeros_like(core) for core in cores], sparse, max_iterations, False


def _fista(
    cores: list[Tensor],
    owners: list[Tensor],
    num_clients: int,
    lam: float,
    noise_level: float,
    tolerance: float,
    max_iterations: int,
    solver: _SvtState,
) -> tuple[list[Tensor], list[Tensor], int, bool]:
    nu = noise_level * _noise_spectral_ratio(cores) * _total_norm(cores)
    step = nu / 2.0
    low_rank = [torch.zeros_like(core) for core in cores]
    sparse = [torch.zeros_like(core) for core in cores]
    low_momentum, sparse_momentum = low_rank, sparse
    momentum = 1.0
    for iteration in range(1, max_iterations + 1):
        half_residuals = [
            (core - low - c) / 2.0
            for core, low, c in zip(cores, low_momentum, sparse_momentum, strict=True)
        ]
        new_low = [
            solver.threshold(m, low + r, step)
            for m, (low, r) in enumerate(zip(low_momentum, half_residuals, strict=True))
        ]
        new_sparse = _block_shrink(
            [c + r for c, r in zip(sparse_momentum, half_residuals, strict=True)],
            owners,
            num_clients,
            lam * step,
        )
        change = _total_norm(
            [a - b for a, b in zip(new_low + new_sparse, low_rank + sparse, strict=True)]
        )
        scale = max(_total_norm(new_low + new_sparse), 1e-30)
        next_momentum = (1.0 + (1.0 + 4.0 * momentum**2) ** 0.5) / 2.0
        weight = (momentum - 1.0) / next_momentum
        low_momentum = [n + weight * (n - o) for n, o in zip(new_low, low_rank, strict=True)]
        sparse_momentum = [n + weight * (n - o) for n, o in zip(new_sparse, sparse, strict=True)]
        low_rank, sparse, momentum = new_low, new_sparse, next_momentum
        if change <= tolerance * scale:
            return low_rank, sparse, iteration, True
    return low_rank, sparse, max_iterations, False


class _SvtState:
    """Singular-value thresholding per module, warm-started across iterations.

    Cores up to ``_FULL_SVD_MAX_SIZE`` get the exact thresholding: for float32 cores a certified
    subspace iteration started from the previous iteration's right singular vectors
    (``_certified_svd``), a full SVD where its certificate fails and for other dtypes; targets
    with the core's own singular vectors take them (``threshold_spectral``).
    Larger ones get a randomized SVD whose sketch starts from the previous right singular
    vectors and whose width follows the predicted rank
    (PROPACK-style), widening until the smallest computed value falls below the threshold.
    """

    def __init__(self, num_modules: int, generator: torch.Generator | None, full: bool = False):
        self.ranks = [0] * num_modules
        self._full = full
        self._bases: list[Tensor | None] = [None] * num_modules
        self._starts: list[tuple[Tensor, Tensor] | None] = [None] * num_modules
        # One float64 copy of each core per module, reused: a fresh one is page-faulted anew.
        self._wide: dict[int, Tensor] = {}
        self._generator = generator

    def start_from(self, module: int, right_singular: tuple[Tensor, Tensor] | None) -> None:
        """Right singular vectors and values of the core, for the first thresholdings: both
        solvers' first target is a multiple of the core, so they span its leading subspace, and
        the ALM's targets have exactly the core's singular vectors until C moves."""
        self._starts[module] = right_singular

    def spectral_start(self, module: int, core: Tensor, value: float) -> Tensor | None:
        """``value`` for each of the core's right singular vectors (``start_from``, float64),
        where ``threshold_spectral`` serves the core: float32 cores the certified iteration
        serves, unless every thresholding is a full SVD; else ``None``."""
        start = self._starts[module]
        rows, cols = core.shape
        if (
            start is None
            or self._full
            or core.dtype != torch.float32
            or rows != cols
            or cols < _CERTIFIED_MIN_SIZE
        ):
            return None
        return torch.full_like(start[1], value, dtype=torch.float64)

    def threshold_spectral(
        self, module: int, core: Tensor, multipliers: Tensor, tau: float, out: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``D_τ`` of ``M V diag(f) Vᵀ`` for the core ``M = U diag(s) Vᵀ`` and ``f = multipliers``
        (one per right singular vector of ``start_from``), written into ``out``, and
        ``(f − τ/s)₊``, the kept share of each singular value.

        The target's SVD is the core's own with values ``s ⊙ f``, so ``D_τ`` is
        ``M V_k diag((s_k f_k − τ)/s_k) V_kᵀ`` over the ``k`` values above τ, without a
        subspace iteration or certificate (1.6–1.9 CPU ms a thresholding at d = 4096,
        K = 16). It is as accurate as the Gram the vectors and values came from, which the
        core was formed from. The vectors ordered by ``s ⊙ f`` start the next thresholding.
        """
        vectors, singular = self._starts[module]
        values = singular.to(torch.float64)
        target = values * multipliers
        kept = (multipliers - tau / values.clamp_min(1e-300)).clamp_min(0.0)
        order = torch.argsort(target, descending=True)
        count = self.ranks[module] = int((target > tau).sum())
        self._bases[module] = vectors[:, order[: count + _CERTIFIED_EXTRA + 1]]
        if count == 0:
            return out.zero_(), kept
        chosen = order[:count]
        right = vectors[:, chosen]
        shrink = ((target[chosen] - tau) / values[chosen]).to(core.dtype)
        return torch.matmul((core @ right) * shrink, right.T, out=out), kept

    def threshold(
        self, module: int, matrix: Tensor, tau: float, out: Tensor | None = None
    ) -> Tensor:
        """``D_τ(matrix)``, written into ``out`` when given (it may be ``matrix`` itself)."""
        small = min(matrix.shape) <= _FULL_SVD_MAX_SIZE
        certified = self._certified_svd(module, matrix, tau) if small and not self._full else None
        if certified is not None:  # exactly the triplets above τ
            left, top, right_t = certified
            self.ranks[module] = top.shape[0]
        else:
            if self._full or small:
                u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            else:
                u, s, vh = self._partial_svd(module, matrix, tau)
            kept = self.ranks[module] = int((s > tau).sum())
            if small and not self._full:  # the warm start of the next one
                self._bases[module] = vh[: kept + _CERTIFIED_EXTRA + 1].T
            left, top, right_t = u[:, :kept], s[:kept], vh[:kept]
        if top.shape[0] == 0:
            return torch.zeros_like(matrix) if out is None else out.zero_()
        return torch.matmul(left * (top - tau), right_t, out=out)

    def _certified_svd(
        self, module: int, matrix: Tensor, tau: float
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Every singular triplet of ``matrix`` above ``τ``, proven complete, or ``None``.

        Subspace iteration in float64 on the previous iteration's right singular vectors (after
        one power step in float32), with Rayleigh–Ritz, until the Ritz residual
        ``R = MᵀU_k − V_k S_k`` of the ``k`` Ritz values above ``τ`` is below
        ``_RITZ_TOLERANCE · ε‖M‖_F`` of the working precision. Then ``M`` is, in the bases
        ``[U_k U_⊥]``, ``[V_k V_⊥]``, block triangular ``[[S_k, R'], [0, M₂₂]]`` with
        ``‖R'‖_F ≤ ‖R‖_F``. The certificate ``_tail_below`` proves ``σ_{k+1}(M) < τ`` while
        ``σ_i(M) ≥ s_i > τ`` for ``i ≤ k`` (interlacing): the kept rank is exactly the full
        SVD's. As ``D_τ`` is non-expansive and ``D_τ`` of the block-diagonal part is
        ``U_k(S_k − τ)V_kᵀ``, the result is within ``‖R‖_F`` of the exact ``D_τ(M)``.
        """
        previous = self._bases[module]
        start = self._starts[module]
        warm = previous is not None
        if previous is None and start is not None:
            # As wide as the core's singular values above τ, scaled to the target's norm, ask
            # (the certificate decides, whatever the guess).
            vectors, singular = start
            scale = float(torch.linalg.vector_norm(matrix) / torch.linalg.vector_norm(singular))
            self.ranks[module] = int((singular * scale > tau).sum())
            previous = vectors[:, : self.ranks[module] + _CERTIFIED_EXTRA + 1]
        self._starts[module] = None
        rows, cols = matrix.shape
        if previous is None or rows > cols or cols < _CERTIFIED_MIN_SIZE:
            return None
        if matrix.dtype != torch.float32:  # float64 arithmetic cannot reach a float64 tolerance
            return None
        width = self.ranks[module] + _CERTIFIED_EXTRA + 1
        if 2 * width > cols:
            return None
        wide = self._wide.get(module)
        if wide is None or wide.shape != matrix.shape:
            wide = self._wide[module] = torch.empty_like(matrix, dtype=torch.float64)
        wide.copy_(matrix)
        frobenius = float(torch.linalg.vector_norm(matrix))
        tolerance = _RITZ_TOLERANCE * torch.finfo(matrix.dtype).eps * frobenius
        basis = previous[:, :width]
        if basis.shape[1] < width:
            # Own seed: the shared generator's stream (the subspace sketches) stays as it was.
            seeded = torch.Generator(device=wide.device).manual_seed(width)
            extra = torch.randn(
                cols,
                width - basis.shape[1],
                dtype=basis.dtype,
                device=wide.device,
                generator=seeded,
            )
            basis = torch.cat([basis, extra], dim=1)
            warm = True
        if warm:
            # One power step in float32 first: its rounding is far below the previous basis's
            # distance to this target's subspace (it saves a third of the float64 sweeps).
            # (thinᵀMᵀM)ᵀ: 87 against 134 µs for MᵀMthin at 256 x 25, column-major for the QR.
            thin = converted(basis, matrix.dtype)
            basis = torch.linalg.qr(((thin.T @ matrix.T) @ matrix).T)[0]
        basis = basis.to(torch.float64)
        for _ in range(_CERTIFIED_SWEEPS):
            image = wide @ basis
            # Rayleigh–Ritz through the small Gram: float64 resolves singular values down to
            # 1e-7 of the largest, far below any threshold the ALM reaches.
            values, rotation = torch.linalg.eigh(image.T @ image)
            singular, rotation = values.flip(0).clamp_min(0).sqrt(), rotation.flip(1)
            listed = singular.tolist()  # one host copy for the count and the estimate
            kept = sum(value > tau for value in listed)
            if kept == width:
                return None
            right = basis @ rotation
            back = (image.T @ wide).T  # Mᵀ M basis
            top, kept_rotation, kept_right = singular[:kept], rotation[:, :kept], right[:, :kept]
            residual = (back @ kept_rotation) / top - kept_right * top
            if float(torch.linalg.vector_norm(residual)) <= tolerance:
                kept_image = image @ kept_rotation  # M V_k = U_k S_k
                # In the core's float32 unless its rounding of the deflation is too large.
                estimate = listed[kept]  # ≤ σ_{k+1}: sets the certificate's blocks
                narrow = right.to(matrix.dtype)
                kept_narrow = narrow[:, :kept]
                args = (kept_image.to(matrix.dtype), kept_narrow, tau, estimate, frobenius)
                below = _tail_below(matrix, *args)
                if below is None:
                    below = _tail_below(wide, *args)
                if not below:
                    return None
                self._bases[module] = narrow
                left = (kept_image / top).to(matrix.dtype)
                return left, top.to(matrix.dtype), kept_narrow.T
            # Shifted: (MᵀM − cI) with c = s_{k+1}², at most s_k²/4. Most of the tail of MᵀM
            # lies just below σ_{k+1}² and is damped to about zero (call 0 of the benchmark's
            # ALM: 4 -> 3 sweeps, call 1: 3 -> 2); the fixed point is the same subspace.
            shift = min(listed[kept] ** 2, listed[kept - 1] ** 2 / 4)
            basis = torch.linalg.qr(torch.sub(back, basis, alpha=shift))[0]
        return None

    def _partial_svd(
        self, module: int, matrix: Tensor, tau: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        width = min(self.ranks[module] + 1 + _OVERSAMPLING, min(matrix.shape))
        while True:
            u, s, vh = self._randomized_svd(module, matrix, width)
            if s[-1] <= tau or width == min(matrix.shape):
                self._bases[module] = vh.T
                return u, s, vh
            width = min(2 * width, min(matrix.shape))

    def _randomized_svd(
        self, module: int, matrix: Tensor, width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        sketch = torch.randn(
            matrix.shape[1],
            width,
            dtype=matrix.dtype,
            device=matrix.device,
            generator=self._generator,
        )
        previous = self._bases[module]
        if previous is None:
            range_basis, _ = torch.linalg.qr(_times_thin(matrix, sketch))
            range_basis, _ = torch.linalg.qr(_times_thin(matrix, (range_basis.T @ matrix).T))
        else:
            # The previous iterate's right singular vectors already span most of the range.
            reuse = min(previous.shape[1], width)
            sketch[:, :reuse] = previous[:, :reuse]
            range_basis, _ = torch.linalg.qr(_times_thin(matrix, sketch))
        projected = range_basis.T @ matrix
        # SVD of the thin projection through its small Gram matrix (width x width).
        eigenvalues, eigenvectors = torch.linalg.eigh(projected @ projected.T)
        order = eigenvalues.argsort(descending=True)
        singular = eigenvalues[order].clamp_min(0).sqrt()
        u_small = eigenvectors[:, order]
        vh = (u_small.T @ projected) / singular.clamp_min(singular[0] * 1e-12)[:, None]
        return range_basis @ u_small, singular, vh


def _times_thin(matrix: Tensor, thin: Tensor) -> Tensor:
    """``matrix @ thin`` for a thin ``thin``, formed as ``(thinᵀ matrixᵀ)ᵀ``: on the CPU that
    layout is faster (0.85 against 1.35 ms at 1024 x 27, one thread) and the result is
    column-major, as the QR that follows takes it."""
    return (thin.T @ matrix.T).T


def _tail_below(
    matrix: Tensor,
    image: Tensor,
    right: Tensor,
    tau: float,
    estimate: float = 0.0,
    frobenius: float | None = None,
) -> bool | None:
    """Whether ``σ_{k+1}(M) < τ`` is proven, for ``image ≈ M V_k`` and ``right ≈ V_k``;
    ``None`` where the rounding in ``M``'s dtype is too large against τ to tell.

    Any rank-``k`` ``X`` gives ``σ_{k+1}(M) ≤ ‖M − X‖₂`` (Eckart–Young), here ``X = image
    rightᵀ`` of the factors rounded to ``M``'s dtype, so neither needs to be exact or
    orthonormal. ``F = M − X`` is formed in ``M``'s dtype (``e`` bounds its rounding) and
    ``‖F‖₂² ≤ Σ_b ‖F_b‖₂²`` over ``b`` row blocks ``F_b``, each proven below ``(τ − e)²/b`` by a
    Cholesky factorisation of its small Gram shifted, then, if that fails, the whole of ``F``
    at ``(τ − e)²``. Blocks are cheaper (four 64 x 64 Grams instead of one 256 x 256) and pass
    where ``σ_{k+1} < τ/√b``; ``estimate`` (the next Ritz value, ``≈ σ_{k+1}``) picks ``b``:
    the ALM's later thresholds leave ``σ_{k+1}`` near τ/2, its early ones near τ.
    ``frobenius`` is ``‖M‖_F`` where the caller has it (in float64), else it is computed.
    """
    dtype = matrix.dtype
    eps = torch.finfo(dtype).eps
    left, right = converted(image, dtype), converted(right, dtype)
    deflated = torch.addmm(matrix, left, right.T, alpha=-1.0)
    # ‖fl(F) − F‖_F ≤ γ_{k+1}(‖M‖_F + ‖image‖_F ‖right‖_F), twice over.
    if frobenius is None:
        frobenius = float(torch.linalg.vector_norm(matrix))
    sizes = [float(torch.linalg.vector_norm(x)) for x in (left, right)]
    bound = tau - 2.0 * (image.shape[1] + 2) * eps * (frobenius + sizes[0] * sizes[1])
    if bound <= 0.5 * tau:
        return None
    rows = deflated.shape[0]
    first = next((b for b in _TAIL_BLOCKS if b * estimate**2 < tau**2 and rows % b == 0), 1)
    for blocks in sorted({first, 1}, reverse=True):
        parts = deflated.view(blocks, rows // blocks, -1)
        if _blocks_below(parts, bound**2 / blocks, eps):
            return True
    return False


def _blocks_below(blocks: Tensor, squared_bound: float, eps: float) -> bool:
    """Whether every ``‖F_b‖₂² < squared_bound`` for the blocks ``F_b`` (``w x cols``).

    A Cholesky factorisation of ``(t − δ)I − F_bF_bᵀ`` that runs to completion gives
    ``R̃ᵀR̃ = A + ΔA`` with ``‖ΔA‖₂ ≤ γ_{w+1} tr(A)/(1 − γ_{w+1})`` (Higham, Thm 10.3), and the
    Gram's rounding is at most ``γ_cols ‖F_b‖_F²``: ``δ`` covers both twice over. Where
    ``‖F_b‖₂² < t`` is possible at all, ``δ`` is a few percent of ``t`` in float32.
    """
    count, width, cols = blocks.shape
    if count == 1:
        grams = symmetric_gram(blocks[0]).unsqueeze(0)
    else:
        grams = torch.bmm(blocks, blocks.transpose(1, 2))
    # ‖F_b‖_F² from the Grams' traces (rounded by γ_cols, inside the twice-over margin); the
    # smallest shift serves every block (a smaller shift only proves a smaller bound).
    diagonal = grams.diagonal(dim1=1, dim2=2)  # a view: it follows the in-place negation
    square = max(diagonal.sum(-1).tolist())
    shift = squared_bound - 2.0 * eps * ((cols + 2) * square + (width + 2) * width * squared_bound)
    if shift <= 0.5 * squared_bound:
        return False
    grams.neg_()
    diagonal.add_(shift)
    return not bool(torch.linalg.cholesky_ex(grams)[1].any())


def _shrink_factors(
    targets: list[Tensor],
    owners: list[Tensor],
    num_clients: int,
    tau: float,
    work: dict[torch.Size, tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Group soft-thresholding factors ``max(0, 1 − τ/‖X_k‖)`` per client (pooled norms)."""
    norms = _pooled_block_norms(targets, owners, num_clients, work)
    # Equal to torch.where(norms > tau, 1 − τ/‖X_k‖, 0) bit for bit, one operation fewer.
    return (1.0 - tau / norms.clamp_min(1e-30)).clamp_min(0.0)


def _block_shrink(
    targets: list[Tensor], owners: list[Tensor], num_clients: int, tau: float
) -> list[Tensor]:
    """Group soft-thresholding, in place: scale each client's pooled block by its factor."""
    factors = _shrink_factors(targets, owners, num_clients, tau)
    for target, owner in zip(targets, owners, strict=True):
        target.mul_(factors.to(target.dtype)[owner])
    return targets


def _pooled_block_norms(
    matrices: list[Tensor],
    owners: list[Tensor],
    num_clients: int,
    work: dict[torch.Size, tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """‖X_k‖_F per client, pooled over modules (float64); squares go into ``work`` if given."""
    squared = torch.zeros(num_clients, dtype=torch.float64, device=matrices[0].device)
    for matrix, owner in zip(matrices, owners, strict=True):
        out = None if work is None else work[matrix.shape][0]
        squares = torch.mul(matrix, matrix, out=out)
        squared.index_add_(0, owner, squares.sum(0).to(torch.float64))
    return squared.sqrt()


def _total_norm(matrices: list[Tensor]) -> float:
    return float(sum(float(torch.linalg.vector_norm(m)) ** 2 for m in matrices) ** 0.5)


def _noise_spectral_ratio(cores: list[Tensor]) -> float:
    """Typical ‖E‖₂ / ‖E‖_F for i.i.d. noise on matrices of the cores' shapes: (√m + √n)/√(mn)."""
    rows = max(core.shape[0] for core in cores)
    cols = max(core.shape[1] for core in cores)
    return (rows**0.5 + cols**0.5) / (rows * cols) ** 0.5
