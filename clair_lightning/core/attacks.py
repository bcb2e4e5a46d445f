"""Update-level contamination for simulations: contaminated clients' updates replaced by attacks.

Attacks are crafted on the product ``B_k A_k`` (what the server aggregates) by an omniscient
attacker who sees the benign clients' updates of the same round. A crafted product of higher
rank is re-factorised to the attacker's own LoRA rank with ``refactorize`` (best rank-r
approximation), so every malicious message keeps its original shapes, rank and dtype.

Where an attack lives relative to the benign column subspace decides which detector can see it:
``gaussian``, ``partial_off_subspace`` and ``rank1_off_subspace`` leave it; ``sign_flip``,
``scaling``, ``inner_product_manipulation`` and ``adaptive_in_subspace`` stay inside it;
``a_little_is_enough``, ``min_max_*`` and ``min_sum_*`` are mostly inside with a small
coordinate-wise excursion. ALIE, Min-Max, Min-Sum and IPM attackers collude as published: every
attacker sends the same message. ``mimic`` copies one benign client.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .compression import compress_module
from .dense import product_row_blocks
from .factors import refactorize, stack_products
from .subspace import leading_left_singular
from .updates import ClientUpdate, LoraFactors, ValidatedUpdates, validate_updates

Attack = Callable[..., dict[int, ClientUpdate]]


@dataclass(frozen=True)
class AttackRound:
    """One round as an omniscient attacker sees it: every update, who is benign, who attacks.

    Factors are the validated copies (float32 or float64 on the updates' device). All random
    draws come from ``generator`` (CPU), so a seeded generator makes an attack deterministic.
    """

    validated: ValidatedUpdates
    benign: list[int]
    attackers: list[int]
    generator: torch.Generator
    device_generator: torch.Generator

    def factors(self, client: int, name: str) -> LoraFactors:
        return self.validated.updates[client][name]

    def rank(self, client: int, name: str) -> int:
        return self.validated.updates[client][name][0].shape[1]

    def normal(self, rows: int, cols: int) -> Tensor:
        """Standard normal matrix drawn on the CPU generator, moved to the updates' device."""
        draw = torch.randn(rows, cols, generator=self.generator, dtype=self.validated.dtype)
        return draw.to(self.validated.device)

    def require_benign(self, attack: str, minimum: int = 1) -> None:
        if len(self.benign) < minimum:
            raise ValueError(
                f"attack {attack!r} is crafted from the benign updates and needs at least "
                f"{minimum} benign client(s); got {len(self.benign)}"
            )

    def median_benign_norm(self, name: str) -> float:
        """Median Frobenius norm of the benign products of one module."""
        norms = torch.stack([_product_norm(*self.factors(k, name)) for k in self.benign])
        return float(norms.quantile(0.5))

    def benign_mean(self, name: str) -> LoraFactors:
        """Unweighted mean of the benign products, exact in stacked factored form."""
        share = 1.0 / len(self.benign)
        return stack_products([(share, *self.factors(k, name)) for k in self.benign])

    def benign_subspace(self, name: str, rank: int | None) -> Tensor:
        """Orthonormal top-``rank`` left singular vectors of the compressed benign stacking.

        ``rank`` defaults to the largest LoRA rank of any client for the module.
        """
        if rank is None:
            rank = max(self.rank(k, name) for k in range(self.validated.num_clients))
        d_out = self.validated.shapes[name][0]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < d_out:
            raise ValueError(
                f"subspace_rank must be an int in [1, d_out) = [1, {d_out}) so an orthogonal "
                f"complement exists; got {rank!r}"
            )
        stacking = compress_module(self.validated, name, self.benign).stacked
        return leading_left_singular(stacking, rank, self.device_generator)[0]


def contaminate(
    updates: Sequence[ClientUpdate],
    contaminated: Sequence[bool],
    attack: str,
    *,
    generator: torch.Generator | None = None,
    **params: object,
) -> list[ClientUpdate]:
    """A new list of updates in which every contaminated client's update is the attack's output.

    Benign clients keep their own tensors. ``params`` are the attack's keyword options (see
    ``ATTACKS[attack].__doc__``). ``generator`` (CPU) makes random attacks deterministic; without
    one a generator seeded with 0 is used, so results are reproducible either way.
    """
    try:
        craft = ATTACKS[attack]
    except KeyError:
        known = ", ".join(sorted(ATTACKS))
        raise ValueError(f"unknown attack {attack!r}; known attacks: {known}") from None
    accepted = [
        p.name
        for p in inspect.signature(craft).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"attack {attack!r} does not take {unknown}; it takes {accepted or 'no options'}"
        )
    if len(contaminated) != len(updates):
        raise ValueError(
            f"contaminated has {len(contaminated)} entries for {len(updates)} client updates"
        )
    result = [dict(update) for update in updates]
    attackers = [k for k, flag in enumerate(contaminated) if bool(flag)]
    if not attackers:
        return result

    validated = validate_updates(updates, min_clients=1)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device_generator = generator
    if validated.device.type != "cpu":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_generator = torch.Generator(device=validated.device).manual_seed(seed)
    benign = [k for k, flag in enumerate(contaminated) if not bool(flag)]
    attack_round = AttackRound(validated, benign, attackers, generator, device_generator)
    for client, crafted in craft(attack_round, **params).items():
        result[client] = {
            name: _protocol_valid(b, a, updates[client][name]) for name, (b, a) in crafted.items()
        }
    return result


def a_little_is_enough_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al.'s largest undetected shift: ``Φ⁻¹((n − s)/n)``, ``s = ⌊n/2 + 1⌋ − f``.

    ``s`` is how many benign clients must look farther from the mean than the attackers for a
    majority-based rule to prefer them. Undefined once attackers are a majority.
    """
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    if supporters <= 0:
        raise ValueError(
            f"a_little_is_enough: the z formula needs fewer attackers than ⌊n/2⌋ + 1; got "
            f"{num_attackers} of {num_clients} clients. Pass z explicitly."
        )
    quantile = torch.tensor((num_clients - supporters) / num_clients, dtype=torch.float64)
    return float(torch.distributions.Normal(0.0, 1.0).icdf(quantile))


def _product_norm(b: Tensor, a: Tensor) -> Tensor:
    """``‖B A‖_F`` from the factors' small Gram matrices."""
    return _product_inner(b, a, b, a).clamp_min(0).sqrt()


def _product_inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """``⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)`` without forming either product."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def _protocol_valid(b: Tensor, a: Tensor, original: LoraFactors) -> LoraFactors:
    """Crafted factors at the original rank (best rank-r approximation), dtype and device."""
    rank = original[0].shape[1]
    if b.shape[1] != rank:
        truncated = refactorize(b, a, rank)
        b, a = truncated.b, truncated.a
    return (
        b.to(original[0].device, original[0].dtype),
        a.to(original[1].device, original[1].dtype),
    )


def _shared_message(
    attack_round: AttackRound, name: str, b: Tensor, a: Tensor
) -> dict[int, LoraFactors]:
    """One crafted product sent by every attacker, truncated once per distinct attacker rank."""
    by_rank: dict[int, LoraFactors] = {}
    for k in attack_round.attackers:
        rank = attack_round.rank(k, name)
        if rank not in by_rank:
            truncated = refactorize(b, a, rank)
            by_rank[rank] = (truncated.b, truncated.a)
    return {k: by_rank[attack_round.rank(k, name)] for k in attack_round.attackers}


def _check_energy(energy: float) -> None:
    if not 0 <= energy < 1:
        raise ValueError(
            f"energy is the perturbation's share of the result's squared norm and must be in "
            f"[0, 1); got {energy}"
        )


def _perturbation_scale(b: Tensor, a: Tensor, direction: Tensor, energy: float) -> float:
    """``s`` with ``‖s·D A‖² = energy · ‖B A + s·D A‖²`` (D = ``direction``, s ≥ 0).

    With unit ``P = D A / ‖D A‖``, ``c = ⟨B A, P⟩`` and ``t = ‖B A‖²`` this is the positive root
    of ``(1 − ρ) x² − 2ρc x − ρt = 0`` for ``x = s‖D A‖``.
    """
    length = float(_product_norm(direction, a))
    if length == 0.0:
        return 0.0
    cross = float(_product_inner(b, a, direction, a)) / length
    own = float(_product_norm(b, a)) ** 2
    root = energy * cross + math.sqrt((energy * cross) ** 2 + (1 - energy) * energy * own)
    return root / (1 - energy) / length


def _gaussian(attack_round: AttackRound) -> dict[int, ClientUpdate]:
    """Random Gaussian factors whose product has the module's median benign norm.

    A random column and row space at a benign norm: invisible to norm checks, far from the
    benign subspace.
    """
    attack_round.require_benign("gaussian")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name, (d_out, d_in) in attack_round.validated.shapes.items():
        target = attack_round.median_benign_norm(name)
        for k in attack_round.attackers:
            rank = attack_round.rank(k, name)
            b, a = attack_round.normal(d_out, rank), attack_round.normal(rank, d_in)
            crafted[k][name] = (b * (target / _product_norm(b, a)), a)
    return crafted


def _partial_off_subspace(
    attack_round: AttackRound, *, energy: float = 0.5, subspace_rank: int | None = None
) -> dict[int, ClientUpdate]:
    """Own update plus a random perturbation orthogonal to the benign column subspace.

    The perturbation ``(I − UUᵀ) G A_k`` (G Gaussian, U from ``benign_subspace``) changes only
    ``B``, so the message keeps its rank exactly; it carries ``energy`` of the result's
    squared norm (0.5 by default; the literature sweeps 0.1, 0.25, 0.5).
    """
    _check_energy(energy)
    attack_round.require_benign("partial_off_subspace")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name, (d_out, _) in attack_round.validated.shapes.items():
        basis = attack_round.benign_subspace(name, subspace_rank)
        for k in attack_round.attackers:
            b, a = attack_round.factors(k, name)
            direction = attack_round.normal(d_out, b.shape[1])
            direction = direction - basis @ (basis.T @ direction)
            scale = _perturbation_scale(b, a, direction, energy)
            crafted[k][name] = (b + scale * direction, a)
    return crafted


def _rank1_off_subspace(
    attack_round: AttackRound, *, energy: float = 0.5, subspace_rank: int | None = None
) -> dict[int, ClientUpdate]:
    """Own update plus a coordinated rank-1 perturbation ``u v_kᵀ`` outside the benign subspace.

    All attackers share the column ``u`` (orthogonal to the benign subspace) and one random row
    direction ``v``; each uses ``v``'s projection onto its own row space, ``v_k``, so its
    message keeps its rank exactly. Across attackers the perturbations span the single column
    ``u``: low-rank structured contamination that a convex low-rank part can absorb.
    """
    _check_energy(energy)
    attack_round.require_benign("rank1_off_subspace")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name, (d_out, d_in) in attack_round.validated.shapes.items():
        basis = attack_round.benign_subspace(name, subspace_rank)
        column = attack_round.normal(d_out, 1)
        column = column - basis @ (basis.T @ column)
        row = attack_round.normal(d_in, 1)
        for k in attack_round.attackers:
            b, a = attack_round.factors(k, name)
            # aᵀ @ coefficients is v's projection onto a's row space, so direction @ a = u v_kᵀ.
            coefficients = torch.linalg.pinv(a.T) @ row
            direction = column @ coefficients.T
            scale = _perturbation_scale(b, a, direction, energy)
            crafted[k][name] = (b + scale * direction, a)
    return crafted


def _sign_flip(attack_round: AttackRound) -> dict[int, ClientUpdate]:
    """``−B_k A_k``: flips ``B`` only (flipping both factors would leave the product unchanged)."""
    return {
        k: {name: (-b, a) for name, (b, a) in attack_round.validated.updates[k].items()}
        for k in attack_round.attackers
    }


def _scaling(attack_round: AttackRound, *, factor: float = 10.0) -> dict[int, ClientUpdate]:
    """``factor · B_k A_k`` (boosting; the literature uses 10 or 100): only a norm test sees it."""
    if not math.isfinite(factor):
        raise ValueError(f"scaling: factor must be finite, got {factor}")
    return {
        k: {name: (factor * b, a) for name, (b, a) in attack_round.validated.updates[k].items()}
        for k in attack_round.attackers
    }


def _inner_product_manipulation(
    attack_round: AttackRound, *, epsilon: float = 0.5
) -> dict[int, ClientUpdate]:
    """Inner-product manipulation (Xie, Koyejo, Gupta 2020): ``−ε · mean(benign)``.

    Literature values: ε = 0.1 (small, slips past distance filters), 0.5 (default here, the
    paper's main setting), 2 (byzfl's default), 100 (large). FedAvg's output flips sign once
    ε > (benign count) / (attacker count).
    """
    if not math.isfinite(epsilon):
        raise ValueError(f"inner_product_manipulation: epsilon must be finite, got {epsilon}")
    attack_round.require_benign("inner_product_manipulation")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name in attack_round.validated.module_names:
        mean_b, mean_a = attack_round.benign_mean(name)
        for k, factors in _shared_message(attack_round, name, -epsilon * mean_b, mean_a).items():
            crafted[k][name] = factors
    return crafted


def _inner_product_manipulation_large(
    attack_round: AttackRound, *, epsilon: float = 10.0
) -> dict[int, ClientUpdate]:
    """IPM with a large ε (Xie et al.'s ε ≫ 1 setting; 10 here): ``−ε · mean(benign)``.

    Large enough that FedAvg's output points against the benign mean for any attacker share
    above 1/11; a norm test sees it, a distance filter easily.
    """
    return _inner_product_manipulation(attack_round, epsilon=epsilon)


Perturbation = Literal["std", "unit_vector"]


def _min_max_std(attack_round: AttackRound, *, gamma_init: float = 10.0) -> dict[int, ClientUpdate]:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021) with the ``−std`` perturbation.

    ``mean − γ·std`` with the largest γ whose distance to every benign update stays within the
    largest benign pairwise distance; see ``_optimised_shift``.
    """
    return _optimised_shift(attack_round, "min_max", "std", gamma_init)


def _min_max_unit_vector(
    attack_round: AttackRound, *, gamma_init: float = 10.0
) -> dict[int, ClientUpdate]:
    """Min-Max with the inverse unit-vector perturbation ``−mean / ‖mean‖``."""
    return _optimised_shift(attack_round, "min_max", "unit_vector", gamma_init)


def _min_sum_std(attack_round: AttackRound, *, gamma_init: float = 10.0) -> dict[int, ClientUpdate]:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021) with the ``−std`` perturbation.

    ``mean − γ·std`` with the largest γ whose summed squared distance to the benign updates
    stays within the largest such sum of any benign update.
    """
    return _optimised_shift(attack_round, "min_sum", "std", gamma_init)


def _min_sum_unit_vector(
    attack_round: AttackRound, *, gamma_init: float = 10.0
) -> dict[int, ClientUpdate]:
    """Min-Sum with the inverse unit-vector perturbation ``−mean / ‖mean‖``."""
    return _optimised_shift(attack_round, "min_sum", "unit_vector", gamma_init)


def _optimised_shift(
    attack_round: AttackRound,
    objective: Literal["min_max", "min_sum"],
    perturbation: Perturbation,
    gamma_init: float,
    tolerance: float = 1e-5,
) -> dict[int, ClientUpdate]:
    """Shejwalkar & Houmansadr's AGR-agnostic attacks: ``mean − γ·p`` for the largest safe γ.

    The update is the whole model (every module flattened together) and ``p`` is the benign
    coordinate-wise ``std`` or ``mean / ‖mean‖`` (the paper's third, ``sign``, behaves like
    ``std``). γ is found by the paper's
    search: start at ``gamma_init``, move by halving steps up after a success and down after a
    failure until the step is below ``tolerance``. Every attacker sends the same message,
    truncated to its rank. Dense products are formed (simulation only).
    """
    if not (math.isfinite(gamma_init) and gamma_init > 0):
        raise ValueError(f"{objective}: gamma_init must be positive and finite, got {gamma_init}")
    attack_round.require_benign(objective, minimum=2)
    names = attack_round.validated.module_names
    benign = torch.cat(
        [
            torch.stack(
                [b @ a for b, a in (attack_round.factors(k, n) for k in attack_round.benign)]
            )
            .flatten(1)
            .to(torch.float64)
            for n in names
        ],
        dim=1,
    )
    mean = benign.mean(0)
    if perturbation == "std":
        direction = benign.std(0)
    else:
        direction = mean / mean.norm().clamp_min(1e-300)
    pairwise = torch.cdist(benign, benign).square()
    if objective == "min_max":
        bound = float(pairwise.max())
    else:
        bound = float(pairwise.sum(1).max())

    def safe(gamma: float) -> bool:
        distances = (benign - (mean - gamma * direction)).square().sum(1)
        return float(distances.max() if objective == "min_max" else distances.sum()) <= bound

    gamma, step, succeeded = gamma_init, gamma_init, 0.0
    while abs(succeeded - gamma) > tolerance:
        if safe(gamma):
            succeeded = gamma
            gamma = gamma + step / 2
        else:
            gamma = gamma - step / 2
        step = step / 2
    shifted = (mean - succeeded * direction).to(attack_round.validated.dtype)
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    offset = 0
    for name in names:
        d_out, d_in = attack_round.validated.shapes[name]
        dense = shifted[offset : offset + d_out * d_in].reshape(d_out, d_in)
        offset += d_out * d_in
        identity = torch.eye(d_in, dtype=dense.dtype, device=dense.device)
        for k, factors in _shared_message(attack_round, name, dense, identity).items():
            crafted[k][name] = factors
    return crafted


def _mimic(attack_round: AttackRound, *, victim: int | None = None) -> dict[int, ClientUpdate]:
    """Mimic (Karimireddy, He, Jaggi, ICLR 2022): every attacker sends one benign client's update.

    ``victim`` defaults to the first benign client. The copies are genuine benign updates: they
    over-weight one client in any average but carry nothing a detector could call malicious.
    """
    attack_round.require_benign("mimic")
    victim = attack_round.benign[0] if victim is None else victim
    if victim not in attack_round.benign:
        raise ValueError(f"mimic: victim must be a benign client, got {victim!r}")
    copied = attack_round.validated.updates[victim]
    return {k: dict(copied) for k in attack_round.attackers}


def _a_little_is_enough(
    attack_round: AttackRound, *, z: float | None = None
) -> dict[int, ClientUpdate]:
    """ "A little is enough" (Baruch et al. 2019): coordinate-wise ``mean − z · std`` of benign.

    ``std`` is the unbiased per-coordinate standard deviation of the benign dense products
    (formed a block of rows at a time). ``z`` defaults to ``a_little_is_enough_z(K, f)`` with K
    all clients and f the attackers (e.g. 0.197 for K = 64, f = 6; byzfl's fixed default is
    1.5). The dense result is truncated to each attacker's rank.
    """
    attack_round.require_benign("a_little_is_enough", minimum=2)
    if z is None:
        z = a_little_is_enough_z(attack_round.validated.num_clients, len(attack_round.attackers))
    if not math.isfinite(z):
        raise ValueError(f"a_little_is_enough: z must be finite, got {z}")
    validated = attack_round.validated
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name, (d_out, d_in) in validated.shapes.items():
        shifted = torch.empty(d_out, d_in, dtype=validated.dtype, device=validated.device)
        factors = [attack_round.factors(k, name) for k in attack_round.benign]
        for rows, products in product_row_blocks(factors):
            spread, centre = torch.std_mean(products, dim=0)
            shifted[rows] = centre - z * spread
        identity = torch.eye(d_in, dtype=validated.dtype, device=validated.device)
        for k, factors in _shared_message(attack_round, name, shifted, identity).items():
            crafted[k][name] = factors
    return crafted


def _adaptive_in_subspace(
    attack_round: AttackRound,
    *,
    target: Literal["negative_mean", "negative_own"] = "negative_mean",
    subspace_rank: int | None = None,
) -> dict[int, ClientUpdate]:
    """A malicious target projected onto the benign column subspace: ``U Uᵀ Θ``.

    The worst case for column-space detection: the result lies inside the subspace a detector
    recovers, so only within-subspace checks (direction, norm) can see it. ``target`` is
    ``"negative_mean"`` (−mean of the benign products, default) or ``"negative_own"`` (the
    attacker's own update flipped). After projection and truncation to the attacker's rank the
    product is rescaled to the median benign norm, so a norm test sees nothing either.
    """
    if target not in ("negative_mean", "negative_own"):
        raise ValueError(
            f"adaptive_in_subspace: target must be 'negative_mean' or 'negative_own', "
            f"got {target!r}"
        )
    attack_round.require_benign("adaptive_in_subspace")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for name in attack_round.validated.module_names:
        basis = attack_round.benign_subspace(name, subspace_rank)
        benign_norm = attack_round.median_benign_norm(name)
        mean = attack_round.benign_mean(name)
        for k in attack_round.attackers:
            b, a = mean if target == "negative_mean" else attack_round.factors(k, name)
            projected = refactorize(-(basis @ (basis.T @ b)), a, attack_round.rank(k, name))
            norm = float(_product_norm(projected.b, projected.a))
            scale = benign_norm / norm if norm > 0 else 0.0
            crafted[k][name] = (scale * projected.b, projected.a)
    return crafted


def _nonfinite(
    attack_round: AttackRound, *, value: float = math.nan, num_entries: int = 1
) -> dict[int, ClientUpdate]:
    """Sets ``num_entries`` random entries of every module's ``B`` to ``value`` (NaN or ±inf).

    For testing that non-finite updates are rejected before any decomposition.
    """
    if math.isfinite(value):
        raise ValueError(f"nonfinite: value must be NaN or ±inf, got {value}")
    if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 1:
        raise ValueError(f"nonfinite: num_entries must be a positive int, got {num_entries!r}")
    crafted: dict[int, ClientUpdate] = {k: {} for k in attack_round.attackers}
    for k in attack_round.attackers:
        for name, (b, a) in attack_round.validated.updates[k].items():
            poisoned = b.clone(memory_format=torch.contiguous_format)
            positions = torch.randperm(b.numel(), generator=attack_round.generator)[:num_entries]
            poisoned.view(-1)[positions.to(b.device)] = value
            crafted[k][name] = (poisoned, a)
    return crafted


ATTACKS: dict[str, Attack] = {
    "gaussian": _gaussian,
    "partial_off_subspace": _partial_off_subspace,
    "rank1_off_subspace": _rank1_off_subspace,
    "sign_flip": _sign_flip,
    "scaling": _scaling,
    "inner_product_manipulation": _inner_product_manipulation,
    "inner_product_manipulation_large": _inner_product_manipulation_large,
    "a_little_is_enough": _a_little_is_enough,
    "min_max_std": _min_max_std,
    "min_max_unit_vector": _min_max_unit_vector,
    "min_sum_std": _min_sum_std,
    "min_sum_unit_vector": _min_sum_unit_vector,
    "mimic": _mimic,
    "adaptive_in_subspace": _adaptive_in_subspace,
    "nonfinite": _nonfinite,
}
