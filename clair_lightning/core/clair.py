"""CLAIR in one call: compress, decompose, detect, re-estimate the subspace, refine.

``clair_aggregate(updates, weights=None, **options)`` is the entry point that the Lightning
callback, the Flower strategy and outside users call.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .compression import (
    CompressedModule,
    RowBasisGram,
    StackingCore,
    compress_with_gram,
    numerical_floor,
    row_basis_gram,
    stacking_core,
)
from .decomposition import Decomposition, Formulation, block_outlier_pursuit
from .detection import centre_distance, direction_scores, near_duplicate_groups, robust_z
from .factors import Split
from .gram import blockwise_product_gram, compressed_product_gram
from .refinement import ModuleRefinement, consensus, module_refinement, refine, refined_at_rank
from .result import AggregationResult, AtRank, RefinedUpdates, at_rank
from .subspace import (
    RankRule,
    choose_rank,
    leading_left_singular,
    leading_left_singular_from_gram,
)
from .updates import ClientUpdate, NonFinitePolicy, ValidatedUpdates, validate_updates

FlaggedPolicy = Literal["own", "consensus"]
Check = Literal["off_subspace", "direction", "norm", "collusion", "support"]
CHECKS: tuple[Check, ...] = ("off_subspace", "direction", "norm", "collusion", "support")
_MAX_DETECTION_ROUNDS = 5
_CLEAN_SHARE = 1e-3
_SUPPORT_FACTOR = 10.0
_SMALLEST_MINORITY = 3
_SMALL_GROUP_DIRECTIONS = 2
_SMALLEST_MASKING_GROUP = 2
_SMALLEST_REFERENCE = 5
_SUPPORT_ENERGY = 0.25
_LEFT_OUT_FOLDS = 8


@dataclass
class _MinorityGroup:
    """Members carrying minority directions of the shared subspace, and how many directions."""

    carriers: tuple[int, ...]
    directions: int


def clair_aggregate(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | Tensor | None = None,
    *,
    lam_factor: float = 1.0,
    formulation: Formulation = "exact",
    noise_level: float = 0.05,
    tolerance: float = 1e-4,
    max_iterations: int = 500,
    threshold: float = 4.5,
    checks: Sequence[Check] = CHECKS,
    off_subspace_floor: float = 0.02,
    direction_floor: float = 0.075,
    norm_floor: float = 0.25,
    collusion_floor: float = 0.5,
    typical_floor: float = 0.1,
    excursion_floor: float = 0.05,
    subspace_rank: RankRule = "gap",
    max_subspace_rank: int | None = None,
    flagged_policy: FlaggedPolicy = "own",
    nonfinite: NonFinitePolicy = "raise",
    seed: int = 0,
) -> AggregationResult:
    """Detect contaminated clients and refine every benign client's update.

    Args:
        updates: one ``dict[module, (B, A)]`` per client, ``ΔW = B @ A`` (scaling folded in B).
        weights: per-client weights such as sample counts (uniform when ``None``).
        lam_factor: λ as a multiple of the scale-free ``λ₀ = Σ_m ‖M_m‖_* / Σ_k ‖M_k‖_F``.
        formulation: ``"exact"`` (L + C = M, inexact ALM) or ``"stable"`` (noise-tolerant,
            ``noise_level`` is the expected relative Frobenius size of the noise).
        threshold: robust z-score above which a statistic flags a client. 4.5 rather than the
            textbook 3.5: with 10–20 clients the MAD is itself noisy and benign clients with a
            low signal-to-noise ratio form a right tail (measured: 3.5 flags 1–2% of benign
            low-SNR regression clients; 4.5 none, at the cost of sign-flip recall under strong
            heterogeneity, 0.72 → 0.53).
        checks: statistics that may flag: ``off_subspace`` (share of the update outside the
            shared low-rank part), ``direction`` (1 − cosine to the robust centre of the
            in-subspace coefficients, when the component along the centre is also too small
            or the one orthogonal to it too large: the cosine, a ratio, has heavy benign
            tails; centre and scales re-estimated without the clients beyond the threshold),
            ``norm`` (log of the update norm, two-sided),
            ``collusion`` (a group of near-identical clients, flagged only when
            measured against everyone else it also leaves their subspace, is too typical,
            or departs from their mean along one direction per module),
            ``support`` (clients carrying a direction of the shared subspace that fewer than
            half of the clients carry, flagged when they leave the subspace re-estimated
            without them by at least a quarter of their squared norm: a benign cluster sharing
            a task carries its direction weakly, three benign text-copy clients lost 6–13%).
        off_subspace_floor, direction_floor, norm_floor: smallest scale of each robust z-score,
            so near-identical benign clients are not flagged for tiny deviations: with the
            default threshold a direction flag needs a cosine at least 0.34 below the typical
            client's (and a component off by 0.34 of the centre's norm), a norm flag a norm
            at least 3x off the median.
        collusion_floor: smallest scale (log units) of the closeness z-score: a group needs
            nearest neighbours about 10x closer than the typical client's.
        typical_floor: smallest scale (log units) of the "too typical" z-score of a group's
            distance to the robust centre of the others.
        excursion_floor: smallest scale of the z-score of the share of a group's deviation
            from the others' mean that lies along its one leading direction per module: a
            group needs a share about 0.23 above the typical client's.
        subspace_rank: ``"gap"`` (largest ratio of consecutive singular values, default: it
            stays right under noise), ``"decomposition"`` (rank of the recovered low-rank part),
            ``"energy"`` or a fixed int; capped by ``max_subspace_rank`` (default
            ``min(d_out − 1, Σr_S // 2, 4 · largest client rank)``: a shared subspace is
            assumed to be at most a few client ranks wide).
        flagged_policy: what flagged clients receive: their ``"own"`` update or the
            collaborative set's ``"consensus"`` average. Excluded clients get the consensus.
        nonfinite: ``"raise"`` on non-finite factors, or ``"exclude"`` the client and report it.
        seed: seeds the randomized SVDs so the same input gives the same flags.

    Returns:
        ``AggregationResult`` with ``contaminated``, ``scores`` (the largest robust z-score over
        the enabled checks; ``inf`` for excluded clients), ``subspaces`` (module → orthonormal
        ``d_out x r_s`` basis from the collaborative set), ``refined`` (exact factors, built on
        access), ``score_components`` and ``diagnostics``.
    """
    _check_options(
        checks,
        flagged_policy,
        {
            "threshold": threshold,
            "lam_factor": lam_factor,
            "noise_level": noise_level,
            "tolerance": tolerance,
            "off_subspace_floor": off_subspace_floor,
            "direction_floor": direction_floor,
            "norm_floor": norm_floor,
            "collusion_floor": collusion_floor,
            "typical_floor": typical_floor,
            "excursion_floor": excursion_floor,
        },
    )
    if not tolerance < 1:
        raise ValueError(f"tolerance must be below 1, got {tolerance!r}")
    _check_int("max_iterations", max_iterations, minimum=1)
    if max_subspace_rank is not None:
        _check_int("max_subspace_rank", max_subspace_rank, minimum=1)
    _check_int("seed", seed)
    timer = _StepTimer()
    validated = validate_updates(updates, weights, nonfinite=nonfinite)
    if validated.unmoved:
        return _unmoved_result(validated)
    clients = validated.included
    generator = torch.Generator(device=validated.device).manual_seed(seed)
    timer.lap("validate")

    modules, cores, products, basis_grams = _compress_all(
        validated, clients, "collusion" in checks, timer
    )
    decomposition = block_outlier_pursuit(
        cores,
        [module.block_owner for module in modules],
        len(clients),
        lam_factor=lam_factor,
        formulation=formulation,
        noise_level=noise_level,
        tolerance=tolerance,
        max_iterations=max_iterations,
        generator=generator,
    )
    timer.lap("decompose")

    everyone = torch.ones(len(clients), dtype=torch.bool, device=validated.device)
    closeness_z, groups = torch.zeros(len(clients), dtype=torch.float64), []
    if products is not None:
        closeness_z, groups = near_duplicate_groups(products, threshold, collusion_floor)
    independent = _one_per_group(everyone, groups)
    timer.lap("collusion_groups")
    subspace_estimator = _SubspaceEstimator(
        validated,
        modules,
        cores,
        decomposition,
        independent,
        subspace_rank,
        max_subspace_rank,
        generator,
    )
    decomposition_z = robust_z(decomposition.sparse_fraction, independent, off_subspace_floor)
    duplicated = torch.zeros_like(everyone)
    for group in groups:
        duplicated |= group
    core_subspaces, residual, off_z, rounds = _settle_off_subspace_flags(
        subspace_estimator,
        decomposition_z > threshold,
        independent,
        duplicated,
        off_subspace_floor,
        threshold,
    )
    flags = (off_z > threshold) if "off_subspace" in checks else ~everyone
    reference = ~flags
    with_basis_grams = len(basis_grams) == len(modules)
    subspaces = None if with_basis_grams else subspace_estimator.to_ambient(core_subspaces)
    timer.lap("subspace")

    if with_basis_grams:
        coefficient_gram = _coefficient_gram_from_bases(
            modules, subspace_estimator.coefficients(core_subspaces), basis_grams
        )
    else:
        coefficient_gram = _coefficient_gram(validated, modules, subspaces)
    log_norm = _log_relative_norm(modules)
    client_weights = validated.weights[clients]
    direction, projection, direction_z = direction_scores(
        coefficient_gram, reference & independent, client_weights, direction_floor, threshold
    )
    norm_z = robust_z(log_norm, reference & independent, norm_floor)
    statistics = {"off_subspace": off_z, "direction": direction_z, "norm": norm_z.abs()}
    flags = flags | ("norm" in checks) & (norm_z.abs() > threshold)
    flags = flags | ("direction" in checks) & (direction_z > threshold)
    timer.lap("detect")

    closeness_z = closeness_z.to(off_z)
    group_z = torch.zeros_like(off_z)
    for group in groups:
        group_z[group] = _group_evidence(
            subspace_estimator,
            products,
            group,
            ~flags & independent,
            client_weights,
            (off_subspace_floor, typical_floor, excursion_floor),
            threshold,
            validated,
        )
    flags = flags | (group_z > threshold)
    support_z = torch.zeros_like(off_z)
    if "support" in checks:
        support_z = _minority_support(
            subspace_estimator,
            core_subspaces,
            residual,
            ~flags,
            groups,
            independent,
            off_subspace_floor,
            threshold,
        )
        flags = flags | (support_z > threshold)
    statistics.update(collusion=group_z, support=support_z)
    scores = torch.stack([statistics[check] for check in checks]).max(dim=0).values
    timer.lap("collusion_support")

    collaborative = ~flags
    if not bool(collaborative.any()):
        raise RuntimeError(
            "CLAIR flagged every client; no collaborative set is left. Raise `threshold` or "
            f"the score floors. Scores: {scores.tolist()}"
        )
    if not torch.equal(collaborative, reference):
        subspaces = subspace_estimator.to_ambient(subspace_estimator.estimate(collaborative))
    elif subspaces is None:
        subspaces = subspace_estimator.to_ambient(core_subspaces)
    collaborative_set = [k for k, keep in zip(clients, collaborative.tolist(), strict=True) if keep]
    pieces = _SharedRefinement(validated, subspaces, collaborative_set, basis_grams)
    timer.lap("subspace_update")

    contaminated, client_scores = _per_client(validated, flags, scores)
    components = {
        "decomposition_sparse_fraction": decomposition.sparse_fraction,
        "off_subspace_fraction": residual,
        "off_subspace_z": off_z,
        "direction_distance": direction,
        "direction_z": direction_z,
        "consensus_projection": projection,
        "log_relative_norm": log_norm,
        "norm_z": norm_z,
        "closeness_z": closeness_z,
        "collusion_z": group_z,
        "support_z": support_z,
    }
    return AggregationResult(
        refined=RefinedUpdates(
            validated.num_clients,
            _refined_builder(validated, contaminated, pieces, flagged_policy),
            _module_at_rank(validated, contaminated, pieces, flagged_policy),
            validated.module_names,
        ),
        contaminated=contaminated,
        scores=client_scores,
        subspaces=subspaces,
        excluded=validated.excluded,
        score_components={
            name: _per_client(validated, flags, values)[1] for name, values in components.items()
        },
        diagnostics={
            "lam": decomposition.lam,
            "iterations": decomposition.iterations,
            "detection_rounds": rounds,
            "converged": decomposition.converged,
            "low_rank_ranks": dict(
                zip(validated.module_names, decomposition.low_rank_ranks, strict=True)
            ),
            "subspace_ranks": {name: int(u.shape[1]) for name, u in subspaces.items()},
            "core_sizes": {
                name: tuple(core.matrix.shape)
                for name, core in zip(validated.module_names, cores, strict=True)
            },
            "collaborative_set": collaborative_set,
            "threshold": threshold,
            "formulation": formulation,
            "seconds": timer.laps,
            "cpu_seconds": timer.cpu_laps,
        },
    )


def _unmoved_result(validated: ValidatedUpdates) -> AggregationResult:
    """No included client moved: nothing to detect, nobody flagged, everyone keeps ``ΔW = 0``.

    Excluded clients are flagged as always and receive the consensus, which is zero too.
    """
    included = set(validated.included)
    zero = validated.updates[validated.included[0]]
    return AggregationResult(
        refined=RefinedUpdates(
            validated.num_clients,
            lambda k: validated.updates[k] if k in included else zero,
        ),
        contaminated=[k not in included for k in range(validated.num_clients)],
        scores=[0.0 if k in included else float("inf") for k in range(validated.num_clients)],
        subspaces={
            name: torch.zeros(d_out, 0, dtype=validated.dtype, device=validated.device)
            for name, (d_out, _) in validated.shapes.items()
        },
        excluded=validated.excluded,
        score_components={},
        diagnostics={"unmoved": True, "collaborative_set": sorted(included)},
    )


def _check_options(checks: Sequence[str], flagged_policy: str, positive: dict[str, object]) -> None:
    """Refuse option values that would silently break the statistics (a NaN threshold, a
    negative floor, a string) with one line naming the option; ``positive`` must be finite
    numbers above zero."""
    unknown = sorted(set(checks) - set(CHECKS))
    if isinstance(checks, str) or unknown or not checks:
        raise ValueError(f"checks must be a non-empty subset of {CHECKS}, got {checks!r}")
    if flagged_policy not in ("own", "consensus"):
        raise ValueError(f"flagged_policy must be 'own' or 'consensus', got {flagged_policy!r}")
    for name, value in positive.items():
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


class _SubspaceEstimator:
    """Shared subspaces of a chosen set of clients, computed on the small cores.

    The core ``R`` of each module is an isometric stand-in for the normalised stacking, so the
    top left singular vectors of the weighted member columns of ``R`` and every client's
    residual against them equal those of the ambient stacking; only the final basis is mapped
    back to ``d_out``.

    Every estimate counts each near-duplicate group once (``independent``), as the robust
    scales do: copies add no independent evidence of a direction. Counted three times, a
    text-copy client copied by two ``mimic`` attackers tilted the subspace towards itself, a
    benign client's own directions fell outside it and were averaged away each round, and that
    client was flagged from round 3 on.
    """

    def __init__(
        self,
        validated: ValidatedUpdates,
        modules: list[CompressedModule],
        cores: list[StackingCore],
        decomposition: Decomposition,
        independent: Tensor,
        rule: RankRule,
        max_rank: int | None,
        generator: torch.Generator,
    ):
        self._modules = modules
        self._cores = cores
        self._low_rank_ranks = decomposition.low_rank_ranks
        self._independent = independent
        self._rule = rule
        self._max_rank = max_rank
        self._generator = generator
        self._estimates: dict[tuple[bool, ...], list[Tensor]] = {}
        self._widened: dict[tuple[bool, ...], list[Tensor]] = {}
        self._leading: dict[tuple[bool, ...], list[Tensor]] = {}
        self._coefficients: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self._column_energy = [core.matrix.square().sum(0) for core in cores]
        client_weights = validated.weights[modules[0].clients].sqrt()
        # Column scales that turn the normalised core back into the weighted raw stacking.
        self._column_scales = [
            (client_weights * module.norms.to(torch.float64)).to(validated.dtype)[
                module.block_owner
            ]
            for module in modules
        ]

    def estimate(self, members: Tensor, warm: bool = False, widened: bool = False) -> list[Tensor]:
        """Per module, an orthonormal core-space basis of the members' weighted stacking.

        Kept per set of members: the collaborative set is often one a check already measured
        against (a flagged group's rest), and its randomized SVDs are not repeated. ``warm``
        starts them from the leading vectors of the smallest estimated superset of
        ``members`` (a group's rest within the reference set), when there is one: one power
        iteration instead of a random sketch and two. ``widened`` gives the same estimate with
        up to twice the chosen rank per module, from the same singular vectors: at most the
        cap under the ``gap`` and ``energy`` rules, one more than a fixed or low-rank rank.
        """
        members = members & self._independent
        key = tuple(members.tolist())
        if key not in self._estimates:
            start = self._nearest_superset(members) if warm else None
            self._estimates[key], self._widened[key], self._leading[key] = self._estimate(
                members, start
            )
        return (self._widened if widened else self._estimates)[key]

    def _nearest_superset(self, members: Tensor) -> list[Tensor] | None:
        supersets = [
            key
            for key in self._leading
            if bool((torch.tensor(key, device=members.device) | ~members).all())
        ]
        return self._leading[min(supersets, key=sum)] if supersets else None

    def _estimate(
        self, members: Tensor, starts: list[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        bases, widened, leading = [], [], []
        for position, (module, core, scale, low_rank_rank) in enumerate(
            zip(self._modules, self._cores, self._column_scales, self._low_rank_ranks, strict=True)
        ):
            # index_select, not a boolean mask: 0.4 against 5 ms at 1024 x 1024 (same values).
            columns = members[module.block_owner].nonzero().flatten()
            weighted = core.matrix.index_select(1, columns).mul_(scale[columns])
            d_out = module.d_out
            cap = self._max_rank
            if cap is None:
                largest_block = max(block.stop - block.start for block in module.blocks)
                cap = max(1, min(d_out - 1, weighted.shape[1] // 2, 4 * largest_block))
            wanted = (
                cap + 1
                if self._rule in ("gap", "energy")
                else min(cap, self._rule if isinstance(self._rule, int) else low_rank_rank) + 1
            )
            if core.gram is not None:  # the members' block of the core's Gram
                block = core.gram.index_select(0, columns).index_select(1, columns)
                basis, singular = leading_left_singular_from_gram(
                    weighted, block, scale[columns], wanted
                )
            else:
                start = None if starts is None else starts[position]
                basis, singular = leading_left_singular(weighted, wanted, self._generator, start)
            rank = choose_rank(
                singular, self._rule, cap, low_rank_rank, numerical_floor(weighted.dtype)
            )
            bases.append(basis[:, :rank])
            widened.append(basis[:, : max(rank, min(2 * rank, cap))])
            leading.append(basis)
        return bases, widened, leading

    def coefficients(self, core_bases: list[Tensor]) -> list[Tensor]:
        """Per module, the core's coefficients ``uᵀ R`` (``r_s x Σr``) in the core-space basis.

        Kept per list of bases (by identity; the list is kept too, so its id is not reused):
        the off-subspace, direction and support checks all measure against the reference
        estimate, and each took this product again (0.5 ms a module at Σr = 1024, r_s = 16).
        """
        key = id(core_bases)
        if key not in self._coefficients:
            along = [
                basis.T @ core.matrix for basis, core in zip(core_bases, self._cores, strict=True)
            ]
            self._coefficients[key] = (core_bases, along)
        return self._coefficients[key][1]

    def minority_carriers(self, core_bases: list[Tensor], members: Tensor) -> list[_MinorityGroup]:
        """Groups of members carrying directions of the shared subspace most members do not carry.

        Each member's own support is the span of its coefficients ``Uᵀ Θ̂_k`` along the
        directions whose energy is at least ``_SUPPORT_FACTOR`` times its energy per direction
        outside the subspace (its estimation noise, which reaches every direction alike). The
        eigenvalues of the members' mean support projector are the share of members carrying
        each direction: about 1 for a shared direction, the group's share for one a group
        added. The carriers of every direction below one half form a group; directions carried
        by the same members, in any module, are one group, with their count. Shares are over
        independent members: a group of copies carries a direction as one client.
        """
        found: dict[tuple[int, ...], _MinorityGroup] = {}
        index = (members & self._independent).nonzero().flatten()
        for module, core, basis, coefficients in zip(
            self._modules, self._cores, core_bases, self.coefficients(core_bases), strict=True
        ):
            free_directions = max(module.d_out - basis.shape[1], 1)
            relative_floor = numerical_floor(core.matrix.dtype) ** 2
            blocks = _padded_blocks(coefficients, module)[index]
            inside = blocks.square().sum(dim=(1, 2)).to(torch.float64)
            noise = (1.0 - inside).clamp_min(0.0) / free_directions
            floor = torch.maximum(_SUPPORT_FACTOR * noise, relative_floor * inside)
            stacked = _support_projectors(blocks, floor)
            share, directions = torch.linalg.eigh(stacked.mean(dim=0))
            for direction in directions[:, share < 0.5].T:
                carried = torch.einsum("i,kij,j->k", direction, stacked, direction) > 0.5
                carriers = tuple(index[carried].tolist())
                if carriers:
                    found.setdefault(carriers, _MinorityGroup(carriers, 0)).directions += 1
        return list(found.values())

    def residual_fraction(self, core_bases: list[Tensor]) -> Tensor:
        """``‖(I − UUᵀ) Θ̂_k‖_F / ‖Θ̂_k‖_F`` per client, unit-norm blocks pooled over modules."""
        device = self._cores[0].matrix.device
        outside = torch.zeros(len(self._modules[0].clients), dtype=torch.float64, device=device)
        present = torch.zeros_like(outside)
        for module, energy, along in zip(
            self._modules, self._column_energy, self.coefficients(core_bases), strict=True
        ):
            column_energy = energy - along.square().sum(0)
            outside.index_add_(0, module.block_owner, column_energy.clamp_min(0).to(torch.float64))
            present += (module.norms > 0).to(torch.float64)
        return (outside.clamp_min(0) / present.clamp_min(1)).sqrt()

    def to_ambient(self, core_bases: list[Tensor]) -> dict[str, Tensor]:
        """Map core-space bases to orthonormal ``d_out x r_s`` bases, per module name."""
        ambient = {}
        for module, core, basis in zip(self._modules, self._cores, core_bases, strict=True):
            # One re-orthonormalisation absorbs the rounding of the triangular solve.
            ambient[module.name] = torch.linalg.qr(core.to_ambient(basis))[0]
        return ambient


def _support_projectors(blocks: Tensor, floor: Tensor) -> Tensor:
    """Per block of a ``K x r_s x w`` batch, the projector (float64, ``r_s x r_s``) onto its
    left singular directions whose energy (squared singular value) is at least ``floor[k]``.

    From one batched eigendecomposition of the blocks' small Grams in float64, not an SVD of
    every block: 1.0 against 1.6 ms for 64 blocks of 16 x 16.
    """
    wide = blocks.to(torch.float64)
    energy, directions = torch.linalg.eigh(wide @ wide.transpose(1, 2))
    supported = directions * (energy >= floor.clamp_min(1e-300)[:, None])[:, None, :]
    return supported @ supported.transpose(1, 2)


def _padded_blocks(coefficients: Tensor, module: CompressedModule) -> Tensor:
    """Each client's columns of ``coefficients`` (``r_s x Σr``) as one ``K x r_s x r`` batch,
    narrower blocks padded with zero columns (they add only zero singular values)."""
    starts = torch.tensor([block.start for block in module.blocks], device=coefficients.device)
    offsets = torch.arange(coefficients.shape[1], device=coefficients.device)
    offsets = offsets - starts[module.block_owner]
    width = max(block.stop - block.start for block in module.blocks)
    padded = coefficients.new_zeros(len(module.blocks), coefficients.shape[0], width)
    padded[module.block_owner, :, offsets] = coefficients.T
    return padded


def _settle_off_subspace_flags(
    estimator: _SubspaceEstimator,
    flags: Tensor,
    independent: Tensor,
    duplicated: Tensor,
    floor: float,
    threshold: float,
) -> tuple[list[Tensor], Tensor, Tensor, int]:
    """Re-measure every client against the subspace of the clean-so-far set until flags settle.

    The decomposition can put a benign client that dominates one shared direction into ``C``
    (the incoherence limit of outlier pursuit). Such a client lies inside the subspace recovered
    from the others, so its residual is small and it is re-admitted; a client with a genuine
    off-subspace component keeps a large residual. Robust scales count each near-duplicate
    group once (``independent``). The first measurement also starts from the masked group (see
    ``_masked_group``): many attackers with similar residuals inflate the median and MAD they
    are measured against.

    A client flagged here but not by the decomposition (which kept it in the low-rank part) is
    confirmed with the subspace at twice its chosen rank, every client measured left out of it
    (``_widened_left_out_z``), and the smaller z-score counts. On flat spectra the gap rule's
    rank is fragile and a benign client's own directions, ranked just past the gap, fall
    outside the subspace (text copy, 8 benign clients: in one module the largest gap ratio is
    1.77 after rank 1 against 1.55 after rank 3, and one client scored z 6.3, 7.0 once left
    out; with 10 benign clients the rank was 6 and its z 2.2). Widened and left out it scores
    3.0, while the two ``min_max_std`` colluders of that round keep 14.0 (15.1 at the chosen
    rank). Clients the decomposition flagged are not re-tested: that is evidence of its own.
    A flag that cannot be confirmed, the rest holding fewer than ``_SMALLEST_REFERENCE``
    clients, is dropped (text copy at 40%, seed 1, round 6: two benign clients flagged against
    the four others).
    Members of near-duplicate groups (``duplicated``) are left out of the reference of that
    confirmation: a group's one crafted message is no independent estimate of the benign
    subspace (with the two ``adaptive_in_subspace`` colluders in it, the same client scored 5.0).
    """
    decomposed = flags
    rounds = 0
    while True:
        rounds += 1
        reference = ~flags
        bases = estimator.estimate(reference)
        residual = estimator.residual_fraction(bases)
        off_z = robust_z(residual, reference & independent, floor)
        settled = off_z > threshold
        if rounds == 1:
            settled = settled | _masked_group(residual, reference & independent, floor, threshold)
        suspects = settled & ~decomposed
        if bool(suspects.any()):
            rest = ~settled & independent & ~duplicated
            confirmed = _widened_left_out_z(estimator, rest, floor)
            off_z = torch.where(suspects, torch.minimum(off_z, confirmed), off_z)
            settled = settled & ~(suspects & (confirmed <= threshold))
        if torch.equal(settled, flags) or rounds == _MAX_DETECTION_ROUNDS:
            return bases, residual, off_z, rounds
        flags = settled


def _widened_left_out_z(estimator: _SubspaceEstimator, rest: Tensor, floor: float) -> Tensor:
    """Off-subspace z-scores with the subspace at twice its chosen rank and every client left
    out of it: the tested clients against the ``rest``'s, each rest client against the rest
    without it (``_left_out_residual``); zero (no confirmation) when the rest has fewer than
    ``_SMALLEST_REFERENCE`` clients: the median and MAD of two or three clients are no
    evidence (smoke config, 4 clients: once the attacker was out, a benign client scored
    z 12.6 against the other two).
    """
    if int(rest.sum()) < _SMALLEST_REFERENCE:
        return torch.zeros(rest.shape, dtype=torch.float64, device=rest.device)
    bases = estimator.estimate(rest, warm=True, widened=True)
    residual = estimator.residual_fraction(bases)
    residual[rest] = _left_out_residual(estimator, rest, widened=True)[rest]
    return robust_z(residual, rest, floor)


def _masked_group(residual: Tensor, reference: Tensor, floor: float, threshold: float) -> Tensor:
    """The reference clients above the largest gap of their residuals (a two-cluster split),
    when they are a minority of at least two and, measured against the clients below the gap
    (at least five), all beyond ``threshold``; else nobody.

    A large group of attackers with similar residuals masks itself: at 40% the median and MAD
    are the benign clients' upper tail (measured on the regression recipe's
    ``partial_off_subspace``: z-scores 3.8–4.2 against everyone, far above 4.5 against the
    benign clients). A benign tail has no such gap, so its clients stay unflagged; one client
    cannot mask itself, and measured without itself a benign one can cross the threshold
    (a text-copy client at z 4.69, under it when it counts in its own median and MAD); the
    median and MAD of fewer than five clients are too noisy to measure against (two benign
    text-copy clients under ``mimic`` at 40%, six independent clients: z 5–6 against four).
    """
    nobody = torch.zeros_like(reference)
    values = residual[reference].sort().values
    if len(values) < 3:
        return nobody
    split = int((values[1:] - values[:-1]).argmax())
    group = reference & (residual > values[split])
    size = int(group.sum())
    if size < _SMALLEST_MASKING_GROUP or len(values) - size < max(size, _SMALLEST_REFERENCE):
        return nobody
    z = robust_z(residual, reference & ~group, floor)
    return group if float(z[group].min()) > threshold else nobody


def _compress_all(
    validated: ValidatedUpdates, clients: list[int], with_products: bool, timer: _StepTimer
) -> tuple[list[CompressedModule], list[StackingCore], Tensor | None, dict[str, RowBasisGram]]:
    """Compressed modules and their cores, and the Gram of the exact products if wanted.

    One module at a time: its stacking and Gram live only until its core and its share of the
    product Gram are formed. Each module's products are scaled by its median client norm so
    every module weighs alike. The product Gram's row-basis Grams are kept (one ``Σr x Σr``
    matrix per module): the write-back forms its row bases from them. The row bases are
    written over the spent stacking: a fresh allocation page-faulted, and left the next
    call's stacking to page-fault too (compress +5 CPU ms at d = 4096, K = 64).
    """
    modules, cores = [], []
    basis_grams: dict[str, RowBasisGram] = {}
    products = None
    if with_products:
        products = torch.zeros(
            len(clients), len(clients), dtype=torch.float64, device=validated.device
        )
    for name in validated.module_names:
        module, gram, stacking = compress_with_gram(validated, name, clients)
        reusable = stacking if products is not None else None  # memory for the row bases
        del stacking
        timer.lap("compress")
        cores.append(stacking_core(module, gram))
        modules.append(module)
        timer.lap("core")
        if products is not None:
            if gram is not None:
                basis_grams[name] = row_basis_gram(validated, module, out=reusable)
            del reusable
            scale = float(_median_norm(module))
            products += (
                compressed_product_gram(validated, module, gram, basis_grams.get(name)) / scale**2
            )
            timer.lap("collusion_groups")
    return modules, cores, products, basis_grams


def _one_per_group(clients: Tensor, groups: list[Tensor]) -> Tensor:
    """``clients`` with every near-duplicate group reduced to its first member.

    Robust scales are measured over independent clients: a group of copies would otherwise
    shrink the MAD of every statistic and make ordinary benign clients look extreme.
    """
    independent = clients.clone()
    for group in groups:
        independent[group.nonzero().flatten()[1:]] = False
    return independent


def _minority_support(
    estimator: _SubspaceEstimator,
    core_bases: list[Tensor],
    residual: Tensor,
    reference: Tensor,
    groups: list[Tensor],
    independent: Tensor,
    floor: float,
    threshold: float,
) -> Tensor:
    """Off-subspace z-scores of the carriers of minority directions, against the rest's subspace.

    Each group of carriers (``minority_carriers``) is measured on its own against the subspace
    of the reference clients outside it: the union of all groups mixes colluders with benign
    clients that carry a direction of their own somewhere (in the early text-copy rounds that
    union was every client). Zero for everyone else, for a group that is not a minority, and
    when fewer than ``_SMALLEST_REFERENCE`` independent clients are left to measure against.
    A single carrier is never tested (it is measured by the other checks); a pair only when it
    carries two or more minority directions:
    one or two benign clients with overlapping tasks often share a direction of their own, in
    one module (measured: every benign pair of the text-copy runs), while colluders add their
    term to every module they attack. Zero too for a carrier that loses less than
    ``_SUPPORT_ENERGY`` of its squared norm to the rest's subspace: a benign cluster sharing a
    task carries its direction weakly (measured on the text-copying recipe: 0.06–0.13),
    colluders who add a term to move the aggregate put a real share of their energy there (0.5
    in ``rank1_off_subspace``). ``residual`` is every client's against ``core_bases`` (the
    off-subspace check's). A near-duplicate group counts as one carrier, and its copies share
    the verdict. The carriers are left out of the subspace they are measured against, so a
    z-score beyond ``threshold`` is confirmed against the rest measured left out too, as in
    ``_group_evidence``.
    """
    support_z = torch.zeros(len(reference), dtype=torch.float64, device=reference.device)
    before = residual.square()
    for group in estimator.minority_carriers(core_bases, reference):
        size = len(group.carriers)
        carriers = torch.zeros_like(reference)
        carriers[list(group.carriers)] = True
        for copies in groups:
            if bool((carriers & copies).any()):
                carriers |= copies & reference
        rest = reference & ~carriers
        independent_rest = int((rest & independent).sum())
        if size < 2 or size >= independent_rest or independent_rest < _SMALLEST_REFERENCE:
            continue
        if size < _SMALLEST_MINORITY and group.directions < _SMALL_GROUP_DIRECTIONS:
            continue
        rest_bases = estimator.estimate(rest, warm=True)
        rest_residual = estimator.residual_fraction(rest_bases)
        gained = rest_residual.square() - before
        z = robust_z(rest_residual, rest & independent, floor)
        carrying = carriers & (gained >= _SUPPORT_ENERGY)
        if bool(carrying.any()) and float(z[carrying].max()) > threshold:
            confirmed = _left_out_z(estimator, rest & independent, rest_residual, residual, floor)
            z = torch.minimum(z, confirmed)
        support_z[carrying] = torch.maximum(support_z[carrying], z[carrying])
    return support_z


def _group_evidence(
    estimator: _SubspaceEstimator,
    gram: Tensor,
    group: Tensor,
    reference: Tensor,
    weights: Tensor,
    floors: tuple[float, float, float],
    threshold: float,
    validated: ValidatedUpdates,
) -> Tensor:
    """How atypical a near-duplicate group is when measured against everyone outside it.

    Robust z-scores against the rest, the largest per member: the share of the update outside
    the rest's subspace, two-sided (a direction the group shares is absorbed into everyone's
    subspace and leaves it once the group is left out; an average of benign updates is far
    cleaner than any independent estimate, ``−log`` share, shares below 1e-3 count as 1e-3),
    and closeness to the rest's robust centre (``−log`` distance: an update far more typical
    than every independent client's). A copy of a benign client scores low on all three.
    Zero when the group is not a minority or the rest has fewer than ``_SMALLEST_REFERENCE``
    clients (too few for a median and MAD, as in ``_masked_group``). When none of the three
    is beyond ``threshold`` the group's departure from the mean of the rest along one direction
    is tested too (``_one_direction_share``; one member for the group, the rest up to
    ``_LEFT_OUT_FOLDS`` of its clients spread over it, as the left-out folds: the cost grows as
    the cube of their summed ranks).

    The group is left out of the subspace it is measured against, the rest is not, and a
    client left out of a subspace leaves it further: in a benign text-copy federation of 8
    clients any one of them left out scored up to z 11 against the others. So a share outside
    beyond ``threshold`` is confirmed against the rest measured left out too (``_left_out_z``),
    and the smaller z-score counts; the other two are conservative as they stand (the rest
    measured in sample looks cleaner and more typical).
    """
    rest = reference & ~group
    if int(rest.sum()) < _SMALLEST_REFERENCE or int(rest.sum()) <= int((group & reference).sum()):
        return torch.zeros(int(group.sum()), dtype=torch.float64, device=group.device)
    off_floor, typical_floor, excursion_floor = floors
    residual = estimator.residual_fraction(estimator.estimate(rest, warm=True))
    outside_z = robust_z(residual, rest, off_floor)
    if float(outside_z[group].max()) > threshold:
        inside = estimator.residual_fraction(estimator.estimate(reference))
        confirmed = _left_out_z(estimator, rest, residual, inside, off_floor)
        outside_z = torch.minimum(outside_z, confirmed)
    clean_z = robust_z(-residual.clamp_min(_CLEAN_SHARE).log(), rest, typical_floor)
    closeness = -centre_distance(gram, rest, weights).clamp_min(1e-12).log()
    typical_z = robust_z(closeness, rest, typical_floor)
    evidence = torch.stack([outside_z, clean_z, typical_z]).max(dim=0).values
    if float(evidence[group].max()) <= threshold:
        others = _spread_sample(rest, _LEFT_OUT_FOLDS)
        representative = torch.zeros_like(group)
        representative[int(group.nonzero()[0])] = True
        share = _one_direction_share(validated, others | representative, others, weights)
        excursion_z = robust_z(share, others, excursion_floor)[representative]
        evidence[group] = torch.maximum(evidence[group], excursion_z)
    return evidence[group]


def _one_direction_share(
    validated: ValidatedUpdates, measured: Tensor, others: Tensor, weights: Tensor
) -> Tensor:
    """Per ``measured`` client, the share of ``‖Θ_k − μ‖²`` along its leading singular
    direction, averaged over modules; ``μ`` is the weighted mean of the ``others`` (a subset
    of ``measured``; zero for the clients not measured).

    An independent client departs from the others' mean by its own estimation noise and task,
    spread over the directions of its update. The attacks that move the benign mean by one
    crafted perturbation (Baruch et al.'s ``μ − z·σ``, Shejwalkar and Houmansadr's
    ``μ + γ·∇ᵖ``) depart from it by that perturbation alone, and a coordinate-wise standard
    deviation of LoRA products is nearly separable (row scale times column scale), so nearly
    rank one: 92–100% of its energy along one direction in each of the 144 module-rounds of
    the text-copy recipe's "A little is enough" at 40% (3 seeds, 6 rounds, 8 modules). There
    the message departs by a share of 0.955–0.976, the six benign clients by 0.44–0.87 (means
    over modules; 0.44–0.61 in round 1, rising as their own tasks grow), and a copy of a
    benign client departs as its original does. The mean of the others without client ``k``
    gives ``Θ_k − μ`` times a positive number, so each of the others is measured left out of
    the mean, as the group is.

    Exact, from the factors: with ``D = B diag(ω) A`` (``B``, ``A`` the measured clients'
    factors side by side), its squared singular values are the eigenvalues of
    ``Sᵀ diag(ω) BᵀB diag(ω) S`` with ``S Sᵀ = AAᵀ`` (``Σr x Σr`` over ``measured``).
    """
    clients = validated.included
    index = measured.nonzero().flatten().tolist()
    share = torch.zeros(len(measured), dtype=torch.float64, device=measured.device)
    other_weights = (weights.to(torch.float64) * others.to(torch.float64))[index]
    mean_weights = other_weights / other_weights.sum()
    for name in validated.module_names:
        factors = [validated.updates[clients[k]][name] for k in index]
        b = torch.cat([b for b, _ in factors], dim=1).to(torch.float64)
        a = torch.cat([a for _, a in factors], dim=0).to(torch.float64)
        ranks = torch.tensor([f[0].shape[1] for f in factors], device=b.device)
        energy, vectors = torch.linalg.eigh(a @ a.T)
        root = vectors * energy.clamp_min(0).sqrt()
        b_gram = b.T @ b
        for position, k in enumerate(index):
            own = torch.zeros(len(index), dtype=torch.float64, device=b.device)
            own[position] = 1.0
            omega = torch.repeat_interleave(own - mean_weights, ranks)
            scaled = root * omega[:, None]
            singular = torch.linalg.eigvalsh(scaled.T @ b_gram @ scaled)
            share[k] += float(singular[-1] / singular.sum().clamp_min(1e-300))
    return share / len(validated.module_names)


def _spread_sample(members: Tensor, size: int) -> Tensor:
    """Up to ``size`` of the ``members``, evenly spread over them (all of them if fewer)."""
    index = members.nonzero().flatten()
    if len(index) <= size:
        return members.clone()
    sample = torch.zeros_like(members)
    sample[index[torch.arange(size, device=index.device) * len(index) // size]] = True
    return sample


def _left_out_z(
    estimator: _SubspaceEstimator, rest: Tensor, residual: Tensor, inside: Tensor, floor: float
) -> Tensor:
    """Robust z-scores of clients measured left out, against the rest measured left out too.

    ``residual`` is every client's share outside the rest's subspace (the tested clients left
    out), ``inside`` its share outside a subspace it is part of. Each rest client is left out
    in turn (``_left_out_residual``); a client stands out on its share left out, or on what
    leaving it out adds (the squared share, paired with its own share inside: less noisy
    between clients whose updates differ in how much noise they carry); the larger counts.
    """
    left_out = _left_out_residual(estimator, rest)
    left_out[~rest] = residual[~rest]
    share_z = robust_z(left_out, rest, floor)
    gain_z = robust_z(left_out.square() - inside.square(), rest, floor)
    return torch.maximum(share_z, gain_z)


def _left_out_residual(
    estimator: _SubspaceEstimator, rest: Tensor, widened: bool = False
) -> Tensor:
    """Each rest client's share outside the subspace of the rest without it.

    Leave-one-out up to ``_LEFT_OUT_FOLDS`` clients, beyond that in as many folds of alternate
    clients (each fold left out together, a slightly harder test for the rest: conservative).
    """
    members = rest.nonzero().flatten()
    folds = min(len(members), _LEFT_OUT_FOLDS)
    left_out = torch.zeros(len(rest), dtype=torch.float64, device=rest.device)
    for fold in range(folds):
        held_out = torch.zeros_like(rest)
        held_out[members[fold::folds]] = True
        bases = estimator.estimate(rest & ~held_out, warm=True, widened=widened)
        residual = estimator.residual_fraction(bases)
        left_out[held_out] = residual[held_out]
    return left_out


def _coefficient_gram(
    validated: ValidatedUpdates, modules: list[CompressedModule], subspaces: dict[str, Tensor]
) -> Tensor:
    """Gram matrix of the clients' in-subspace coefficients ``Uᵀ B_k A_k``, pooled over modules.

    Each module is scaled by its median client norm so every module weighs alike.
    """
    clients = modules[0].clients
    gram = torch.zeros(len(clients), len(clients), dtype=torch.float64, device=validated.device)
    for module in modules:
        subspace = subspaces[module.name]
        scale = _median_norm(module)
        coefficients = torch.stack(
            [
                ((subspace.T @ validated.updates[k][module.name][0]) / scale)
                @ validated.updates[k][module.name][1]
                for k in clients
            ]
        ).flatten(1)
        gram += (coefficients @ coefficients.T).to(torch.float64)
    return gram


def _coefficient_gram_from_bases(
    modules: list[CompressedModule],
    coefficients: list[Tensor],
    basis_grams: dict[str, RowBasisGram],
) -> Tensor:
    """``_coefficient_gram`` from the collusion check's row-basis Grams, on the small cores.

    ``Uᵀ B_k A_k = ‖Θ_k‖ (uᵀ R_k) Q_kᵀ`` for the core-space basis ``u`` and client ``k``'s
    core columns ``R_k`` (``coefficients``, ``uᵀ R`` per module), so the Gram is
    ``Σ ((uᵀR)ᵀ(uᵀR)) ⊙ (Q_iᵀQ_j)`` over client blocks (``blockwise_product_gram``): a
    ``Σr x Σr x r_s`` product instead of every client's dense ``r_s x d_in`` coefficients and
    their Gram (2 ms against 15 ms at d = 4096, K = 64).
    """
    gram = None
    for module, along in zip(modules, coefficients, strict=True):
        scale = float(_median_norm(module))
        part = blockwise_product_gram(module, along.T @ along, basis_grams[module.name])
        gram = part / scale**2 if gram is None else gram.add_(part / scale**2)
    return gram


def _median_norm(module: CompressedModule) -> Tensor:
    """The module's median client norm: every statistic pooled over modules is scaled by it, so
    every module weighs alike."""
    return module.norms.median().clamp_min(1e-30)


def _log_relative_norm(modules: list[CompressedModule]) -> Tensor:
    """``½ log mean_m (‖Θ_{k,m}‖ / median_j ‖Θ_{j,m}‖)²`` per client: the pooled relative norm."""
    relative_squares = torch.zeros(
        len(modules[0].clients), dtype=torch.float64, device=modules[0].norms.device
    )
    for module in modules:
        relative_squares += (module.norms / _median_norm(module)).to(torch.float64).square()
    return 0.5 * torch.log((relative_squares / len(modules)).clamp_min(1e-300))


def _per_client(
    validated: ValidatedUpdates, flags: Tensor, values: Tensor
) -> tuple[list[bool], list[float]]:
    """Spread included-client tensors back to all K clients; excluded ones are flagged, inf."""
    contaminated = [True] * validated.num_clients
    per_client = [float("inf")] * validated.num_clients
    # One host copy per tensor, not one per client (12 calls a round, 35 µs each at K = 16).
    for client, flag, value in zip(
        validated.included, flags.tolist(), values.tolist(), strict=True
    ):
        contaminated[client] = bool(flag)
        per_client[client] = float(value)
    return contaminated, per_client


class _SharedRefinement:
    """Refinement pieces every client shares, built on the first read of a refined update."""

    def __init__(
        self,
        validated: ValidatedUpdates,
        subspaces: dict[str, Tensor],
        collaborative_set: list[int],
        basis_grams: dict[str, RowBasisGram],
    ):
        self._validated = validated
        self.subspaces = subspaces
        self.collaborative_set = collaborative_set
        self.basis_grams = basis_grams
        self._pieces: dict[str, ModuleRefinement] | None = None

    @property
    def pieces(self) -> dict[str, ModuleRefinement]:
        if self._pieces is None:
            self._pieces = {
                name: module_refinement(
                    self._validated, name, self.subspaces[name], self.collaborative_set
                )
                for name in self._validated.module_names
            }
        return self._pieces


def _refined_builder(
    validated: ValidatedUpdates,
    contaminated: list[bool],
    shared: _SharedRefinement,
    flagged_policy: FlaggedPolicy,
):
    def build(client: int) -> ClientUpdate:
        if client in validated.excluded:
            return consensus(shared.pieces)
        if contaminated[client]:
            if flagged_policy == "consensus":
                return consensus(shared.pieces)
            return validated.updates[client]
        return refine(validated.updates[client], shared.pieces)

    return build


def _module_at_rank(
    validated: ValidatedUpdates,
    contaminated: list[bool],
    shared: _SharedRefinement,
    flagged_policy: FlaggedPolicy,
):
    """``RefinedUpdates.at_rank`` for CLAIR: what every client receives, with shared work once.

    Collaborative clients go through ``refined_at_rank``; the consensus is re-factorised once
    and shared; flagged clients keeping their own update get it as ``at_rank`` gives it.
    """

    def module_at_rank(name: str, rank: int, split: Split) -> list[AtRank]:
        collaborative = shared.collaborative_set
        basis_gram = shared.basis_grams.get(name)
        refined = refined_at_rank(
            validated,
            name,
            shared.subspaces[name],
            collaborative,
            rank,
            split,
            None if basis_gram is None else basis_gram.stacked_a_gram(collaborative),
        )
        received: list[AtRank | None] = [None] * validated.num_clients
        for client, factors in zip(collaborative, refined, strict=True):
            received[client] = factors
        consensus_at_rank = None
        for client in range(validated.num_clients):
            if received[client] is not None:
                continue
            keeps_own = contaminated[client] and flagged_policy == "own"
            if keeps_own and client not in validated.excluded:
                received[client] = at_rank(*validated.updates[client][name], rank, split)
                continue
            if consensus_at_rank is None:
                piece = module_refinement(validated, name, shared.subspaces[name], collaborative)
                consensus_at_rank = at_rank(*piece.consensus, rank, split)
            received[client] = consensus_at_rank
        return received

    return module_at_rank


class _StepTimer:
    """Seconds per CLAIR step (summed over its laps), reported in the diagnostics: wall-clock,
    and CPU seconds of the process (what a step costs on a machine shared with other jobs)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu_laps: dict[str, float] = {}
        self._last = time.perf_counter()
        self._last_cpu = time.process_time()

    def lap(self, step: str) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        self.laps[step] = self.laps.get(step, 0.0) + now - self._last
        self.cpu_laps[step] = self.cpu_laps.get(step, 0.0) + now_cpu - self._last_cpu
        self._last, self._last_cpu = now, now_cpu
