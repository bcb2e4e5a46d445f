"""Client updates as LoRA factors, and the validation run before any linear algebra.

A client's update maps a module name to its LoRA factors ``(B, A)`` with ``ΔW = B @ A``
(the LoRA scaling ``alpha / r`` already folded into ``B``). Ranks may differ across clients;
``d_out`` and ``d_in`` of a module may not.

Magnitudes are data, not crashes: every client's norm ``‖ΔW‖_F`` is measured scale-free (from
the factors' small Grams, in float32 where their entries cannot overflow there, else in float64
on factors normalised first, so a float32 ``‖B‖ ≈ 1e19`` does not overflow), and a
client more than ``ABSURD_NORM_RATIO`` times the median non-zero norm is left out with that
reason (no aggregator can use it: its square alone overflows float32 for a 1e20 scaling, and
it would swamp any average). A client with ``ΔW = 0`` (LoRA's ``B = 0`` at initialisation) is
kept: it is a valid update that did not move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LoraFactors = tuple[Tensor, Tensor]
ClientUpdate = dict[str, LoraFactors]
NonFinitePolicy = Literal["raise", "exclude"]

# Far beyond any benign spread (CLAIR's norm check already flags 3x off the median), far below
# the 1e19 at which float32 squares overflow when the median norm is about one.
ABSURD_NORM_RATIO = 1e6


class UpdateValidationError(ValueError):
    """An update that cannot be aggregated: bad structure, mismatched shapes, non-finite values."""


@dataclass(frozen=True)
class ValidatedUpdates:
    """Updates that passed validation, in the caller's client order.

    ``included`` lists the clients that take part in aggregation; ``excluded`` maps every other
    client to the reason it was left out. ``weights`` sums to one over ``included`` and is zero
    elsewhere. Factors of included clients are cast to ``dtype`` on ``device``. ``norms`` holds
    every client's ``‖ΔW‖_F`` over all modules (float64; ``nan`` for non-finite updates).
    ``row_grams[(k, name)]`` is ``A Aᵀ`` of an included client's cast ``A`` where its norm took
    exactly that product (float32 factors in range): the compression's Cholesky-QR reuses it.
    """

    updates: list[ClientUpdate]
    module_names: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    weights: Tensor
    included: list[int]
    excluded: dict[int, str]
    dtype: torch.dtype
    device: torch.device
    norms: Tensor
    row_grams: dict[tuple[int, str], Tensor]

    @property
    def num_clients(self) -> int:
        return len(self.updates)

    @property
    def unmoved(self) -> bool:
        """No included client moved (every ``ΔW = 0``, e.g. all adapters still at their init)."""
        return bool((self.norms[self.included] == 0).all())

    def ranks(self, module: str) -> list[int]:
        """LoRA rank of each included client for one module."""
        return [self.updates[k][module][0].shape[1] for k in self.included]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision adapters are aggregated in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_updates(
    updates: Sequence[Mapping[str, Sequence[Tensor]]],
    weights: Sequence[float] | Tensor | None = None,
    *,
    nonfinite: NonFinitePolicy = "raise",
    min_clients: int = 2,
) -> ValidatedUpdates:
    """Check structure, shapes, weights and finiteness of every client's update.

    Structural problems always raise ``UpdateValidationError`` naming the client and module.
    Non-finite factors raise too, unless ``nonfinite="exclude"``: then the client is left out
    and reported in ``excluded``. A client whose norm is absurd (more than
    ``ABSURD_NORM_RATIO`` times the median) is always left out and reported.
    """
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    if isinstance(updates, Mapping) or not isinstance(updates, Sequence):
        raise UpdateValidationError(
            "updates must be a list with one dict[module name, (B, A)] per client, "
            f"got {type(updates).__name__}"
        )
    if len(updates) == 0:
        raise UpdateValidationError("updates is empty: no client to aggregate")

    module_names = _module_names(updates)
    shapes: dict[str, tuple[int, int]] = {}
    checked: list[ClientUpdate] = []
    for client, update in enumerate(updates):
        checked.append(_check_client(client, update, module_names, shapes))

    client_weights = _normalised_weights(weights, len(updates))
    excluded: dict[int, str] = {}
    measured_grams: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in checked]
    norm_values = [math.nan] * len(checked)
    for client, (update, weight) in enumerate(zip(checked, client_weights.tolist(), strict=True)):
        if weight == 0:
            excluded[client] = "weight is zero"
            continue
        problem, magnitudes = _nonfinite_problem_and_magnitudes(update)
        if problem is None:
            # Right after the finiteness pass, while the client's factors are still in cache.
            norm_values[client] = update_norm(update, measured_grams[client], magnitudes)
            continue
        if nonfinite == "raise":
            raise UpdateValidationError(f"client {client}: {problem}")
        excluded[client] = problem
    norms = torch.tensor(norm_values, dtype=torch.float64)
    excluded.update(_absurd_norms(norms, excluded))
    excluded = dict(sorted(excluded.items()))

    included = [k for k in range(len(checked)) if k not in excluded]
    if len(included) < min_clients:
        raise UpdateValidationError(
            f"only {len(included)} of {len(checked)} clients can be aggregated "
            f"(at least {min_clients} needed); excluded: {excluded}"
        )

    first_b = checked[included[0]][module_names[0]][0]
    dtype = compute_dtype(first_b.dtype)
    device = first_b.device
    cast: list[ClientUpdate] = []
    row_grams: dict[tuple[int, str], Tensor] = {}
    for client, update in enumerate(checked):
        if client in excluded:
            cast.append(update)
            continue
        cast.append(
            {
                name: (converted(b, dtype, device), converted(a, dtype, device))
                for name, (b, a) in update.items()
            }
        )
        for name, (factor, gram) in measured_grams[client].items():
            if _same_tensor(cast[client][name][1], factor):  # what the compression will use
                row_grams[(client, name)] = gram

    weight_vector = client_weights.clone()
    for client in excluded:
        weight_vector[client] = 0.0
    weight_vector = weight_vector / weight_vector.sum()
    return ValidatedUpdates(
        updates=cast,
        module_names=module_names,
        shapes=shapes,
        weights=weight_vector,
        included=included,
        excluded=excluded,
        dtype=dtype,
        device=device,
        norms=norms,
        row_grams=row_grams,
    )


def update_norm(
    update: Mapping[str, Sequence[Tensor]],
    row_grams: dict[str, tuple[Tensor, Tensor]] | None = None,
    magnitudes: Mapping[str, tuple[float, float]] | None = None,
) -> float:
    """``‖ΔW‖_F`` over all modules without forming ``B A`` and without overflow.

    From the ``r x r`` Grams: ``‖B A‖² = tr(BᵀB · AAᵀ)``, summed in float64. Factors of at most
    float32 range whose largest entry lies within ``_DIRECT_RANGE`` take float32 Grams (they
    cannot overflow or underflow there; accurate to float32's rounding, which is enough: the
    norms are compared only with zero and with ``ABSURD_NORM_RATIO`` times the median, and the
    float64 copies of every factor cost most of the validation); all others are divided by
    their largest entry first and take float64 Grams. ``row_grams``, when given, receives
    ``(A, A Aᵀ)`` per module where the float32 ``A Aᵀ`` of ``A`` itself was taken;
    ``magnitudes`` holds each module's largest ``|B|`` and ``|A|`` where the caller has them.
    """
    log_squares = []
    for name, (b, a) in update.items():
        b, a = _detached(b), _detached(a)
        if magnitudes is None:
            b_scale, a_scale = _largest_magnitude(b), _largest_magnitude(a)
        else:
            b_scale, a_scale = magnitudes[name]
        if b_scale == 0 or a_scale == 0:
            continue
        low, high = _DIRECT_RANGE
        if (
            b.dtype in _FLOAT32_RANGE
            and a.dtype in _FLOAT32_RANGE
            and low < min(b_scale, a_scale) <= max(b_scale, a_scale) < high
        ):
            b_narrow, a_narrow = converted(b, torch.float32), converted(a, torch.float32)
            a_gram = a_narrow @ a_narrow.T
            if row_grams is not None and a_narrow is a:
                row_grams[name] = (a, a_gram)
            # float64 times float32 promotes the float32 operand exactly, as .double() would.
            products = (b_narrow.T @ b_narrow).double() * a_gram
            trace = float(products.sum())
            if trace > 0:
                log_squares.append(math.log(trace))
            continue
        b_unit = b.to(torch.float64) / b_scale
        a_unit = a.to(torch.float64) / a_scale
        trace = float(((b_unit.T @ b_unit) * (a_unit @ a_unit.T)).sum())
        if trace > 0:
            log_squares.append(2 * math.log(b_scale) + 2 * math.log(a_scale) + math.log(trace))
    if not log_squares:
        return 0.0
    largest = max(log_squares)
    return math.exp(0.5 * (largest + math.log(sum(math.exp(x - largest) for x in log_squares))))


def _detached(factor: Tensor) -> Tensor:
    """``factor.detach()`` where it needs one (a dispatched no-op costs about 2 µs a factor)."""
    return factor.detach() if factor.requires_grad else factor


def converted(tensor: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """``tensor.to(device, dtype)``, without the dispatched no-op (about 2 µs) where it is
    already there; the validation, the norms and the decomposition's sweeps call it often."""
    device = tensor.device if device is None else device
    if tensor.dtype == dtype and tensor.device == device:
        return tensor
    return tensor.to(device, dtype)


def _same_tensor(first: Tensor, second: Tensor) -> bool:
    """Whether two tensors are views of the same memory with the same layout and dtype."""
    return (
        first.data_ptr() == second.data_ptr()
        and first.shape == second.shape
        and first.stride() == second.stride()
        and (first.dtype, first.device) == (second.dtype, second.device)
    )


def _largest_magnitude(factor: Tensor) -> float:
    """``max |x|`` (``aminmax``: one pass without a copy, 20x faster than the inf-norm here)."""
    smallest, largest = torch.aminmax(factor)
    return max(-float(smallest), float(largest))


# Largest entries for which float32 Grams of any size below 2^31 rows neither overflow
# (n · 1e24 < 3.4e38) nor lose more than 1e-5 to underflow.
_DIRECT_RANGE = (1e-12, 1e12)
_FLOAT32_RANGE = (torch.float32, torch.float16, torch.bfloat16)


def _absurd_norms(norms: Tensor, excluded: dict[int, str]) -> dict[int, str]:
    """Clients whose norm is more than ``ABSURD_NORM_RATIO`` times the median non-zero norm."""
    values = norms.tolist()  # one host copy, not one per client
    moved = [k for k, value in enumerate(values) if k not in excluded and value > 0]
    if len(moved) < 2:
        return {}
    median = float(norms[moved].median())
    return {
        k: (
            f"update norm {values[k]:.3g} is {values[k] / median:.2g} times the "
            f"median client's {median:.3g} (more than {ABSURD_NORM_RATIO:g}): not plausible"
        )
        for k in moved
        if values[k] > ABSURD_NORM_RATIO * median
    }


def _module_names(updates: Sequence[Mapping[str, Sequence[Tensor]]]) -> tuple[str, ...]:
    first = updates[0]
    if not isinstance(first, Mapping) or len(first) == 0:
        raise UpdateValidationError(
            "client 0: an update must be a non-empty dict[module name, (B, A)]"
        )
    names = tuple(sorted(first))
    for client, update in enumerate(updates):
        if not isinstance(update, Mapping):
            raise UpdateValidationError(
                f"client {client}: an update must be a dict[module name, (B, A)], "
                f"got {type(update).__name__}"
            )
        missing = sorted(set(names) - set(update))
        extra = sorted(set(update) - set(names))
        if missing or extra:
            raise UpdateValidationError(
                f"client {client}: modules differ from client 0 "
                f"(missing {missing}, unexpected {extra})"
            )
    return names


def _check_client(
    client: int,
    update: Mapping[str, Sequence[Tensor]],
    module_names: tuple[str, ...],
    shapes: dict[str, tuple[int, int]],
) -> ClientUpdate:
    checked: ClientUpdate = {}
    for name in module_names:
        where = f"client {client}, module {name!r}"
        factors = update[name]
        if not isinstance(factors, Sequence) or len(factors) != 2:
            raise UpdateValidationError(f"{where}: expected a pair (B, A) of tensors")
        b, a = factors
        if not isinstance(b, Tensor) or not isinstance(a, Tensor):
            raise UpdateValidationError(f"{where}: B and A must be torch tensors")
        if b.ndim != 2 or a.ndim != 2:
            raise UpdateValidationError(
                f"{where}: B and A must be matrices, "
                f"got shapes {tuple(b.shape)} and {tuple(a.shape)}"
            )
        if not (b.is_floating_point() and a.is_floating_point()):
            raise UpdateValidationError(
                f"{where}: factors must be floating point, got {b.dtype} and {a.dtype}"
            )
        if b.shape[1] != a.shape[0] or b.shape[1] == 0:
            raise UpdateValidationError(
                f"{where}: B is {tuple(b.shape)} and A is {tuple(a.shape)}; "
                "B's columns must equal A's rows (the LoRA rank, at least 1)"
            )
        shape = (b.shape[0], a.shape[1])
        if 0 in shape:
            raise UpdateValidationError(
                f"{where}: update is {shape[0]}x{shape[1]} (d_out x d_in); both must be at least 1"
            )
        expected = shapes.setdefault(name, shape)
        if shape != expected:
            raise UpdateValidationError(
                f"{where}: update is {shape[0]}x{shape[1]} (d_out x d_in) but client 0's is "
                f"{expected[0]}x{expected[1]}"
            )
        checked[name] = (b, a)
    return checked


def _normalised_weights(weights: Sequence[float] | Tensor | None, num_clients: int) -> Tensor:
    if weights is None:
        return torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64)
    vector = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if vector.numel() != num_clients:
        raise UpdateValidationError(
            f"weights has {vector.numel()} entries but there are {num_clients} clients"
        )
    if not torch.isfinite(vector).all() or (vector < 0).any():
        raise UpdateValidationError(
            f"weights must be finite and non-negative, got {vector.tolist()}"
        )
    if vector.sum() <= 0:
        raise UpdateValidationError("weights sum to zero")
    return vector / vector.sum()


def _nonfinite_problem_and_magnitudes(
    update: ClientUpdate,
) -> tuple[str | None, dict[str, tuple[float, float]]]:
    """The update's first non-finite factor (or ``None``), and each module's largest ``|B|`` and
    ``|A|``: one ``aminmax`` pass per factor gives both, as its minimum or maximum is
    non-finite exactly when an entry is (the norm needs the magnitudes anyway)."""
    labelled = [
        (name, label, factor)
        for name, (b, a) in update.items()
        for label, factor in (("B", b), ("A", a))
    ]
    # One host copy of every factor's extremes, not two per factor (per factor where the
    # factors sit on several devices, as in a model split over GPUs).
    pairs = [x for _, _, factor in labelled for x in torch.aminmax(_detached(factor))]
    if len({x.device for x in pairs}) == 1:
        extremes = torch.stack(pairs).tolist()
    else:
        extremes = [float(x) for x in pairs]
    magnitudes: dict[str, tuple[float, float]] = {}
    scales = []
    for position, (name, label, factor) in enumerate(labelled):
        smallest, largest = extremes[2 * position : 2 * position + 2]
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            bad = int((~torch.isfinite(factor)).sum())
            return f"module {name!r}: {label} has {bad} non-finite value(s)", {}
        scales.append(max(-smallest, largest))
        if label == "A":
            magnitudes[name] = (scales[-2], scales[-1])
    return None, magnitudes
