"""Backends run one cell of a comparison for one kind of recipe and return its record.

A record is plain JSON: the cell, the task metric's name and direction, the runtime, and per
round every client's truth, flag, score and task metrics. Detection metrics and benign means
are computed from these by the report, the same way for every backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..core import AGGREGATORS, aggregate
from ..core.aggregators import NEEDS_TRUTH
from .grid import NO_CONTAMINATION, Cell


class Backend(Protocol):
    """What the runner needs from a recipe."""

    recipe: str
    task_metric: str
    higher_is_better: bool

    def contaminations(self) -> tuple[str, ...]: ...

    def run(self, cell: Cell, workdir: Path) -> dict[str, Any]: ...


class LinearRegressionBackend:
    """The core-only regression recipe: one aggregation round on local least-squares fits."""

    recipe = "linear_regression"
    task_metric = "error"
    higher_is_better = False

    def __init__(self, settings: dict[str, Any] | None = None):
        from ..recipes.linear_regression.data import make_federation

        self.settings = dict(settings or {})
        self.settings.pop("recipe", None)
        self.settings.setdefault("contaminated_fraction", 0.3)
        make_federation(**{**self.settings, "seed": 0})  # fail early on bad settings

    def contaminations(self) -> tuple[str, ...]:
        from ..core.attacks import ATTACKS
        from ..recipes.linear_regression.data import CONTAMINATIONS

        return (NO_CONTAMINATION, *CONTAMINATIONS, *sorted(ATTACKS))

    def run(self, cell: Cell, workdir: Path) -> dict[str, Any]:
        import torch

        from ..core.attacks import ATTACKS, contaminate
        from ..recipes.linear_regression.data import CONTAMINATIONS, make_federation

        started = time.perf_counter()
        settings = dict(self.settings)
        if cell.contamination == NO_CONTAMINATION:
            settings["contaminated_fraction"] = 0.0
        elif cell.contamination in CONTAMINATIONS:
            settings["contamination"] = cell.contamination
        federation = make_federation(**settings, seed=cell.seed)
        updates, truth = federation.updates, list(federation.contaminated)
        if cell.contamination in ATTACKS:
            # Update-level: the chosen clients upload crafted estimates instead of their fits.
            truth = list(federation.contaminated)
            clean = make_federation(**{**settings, "contaminated_fraction": 0.0}, seed=cell.seed)
            generator = torch.Generator().manual_seed(cell.seed)
            updates = contaminate(clean.updates, truth, cell.contamination, generator=generator)
            federation = clean
        options = {"contaminated": truth} if cell.aggregator in NEEDS_TRUTH else {}
        result = aggregate(cell.aggregator, updates, federation.sample_counts, **options)
        clients = []
        for client, (is_contaminated, target) in enumerate(
            zip(truth, federation.truth, strict=True)
        ):
            b, a = result.refined[client]["coefficients"]
            error = float((b @ a - target).norm() / target.norm())
            clients.append(
                {
                    "client": client,
                    "contaminated": bool(is_contaminated),
                    "flag": bool(result.contaminated[client]),
                    "score": None if result.scores is None else float(result.scores[client]),
                    "metrics": {"error": error},
                }
            )
        return record(cell, self, [{"round": 1, "clients": clients}], time.perf_counter() - started)


def record(cell: Cell, backend: Backend, rounds: list[dict], seconds: float) -> dict[str, Any]:
    """The JSON record of one finished cell."""
    return {
        "cell": cell.as_dict(),
        "task": {"metric": backend.task_metric, "higher_is_better": backend.higher_is_better},
        "runtime_seconds": seconds,
        "rounds": rounds,
    }


ENGINES = ("lightning", "flower")


def backend_for(config: Path, engine: str = "lightning") -> Backend:
    """The backend a config file asks for: ``recipe: linear_regression`` or a LightningCLI one,
    whose cells run in process (``engine="lightning"``) or on Flower's simulation runtime."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known engines: {', '.join(ENGINES)}")
    try:
        settings = yaml.safe_load(Path(config).read_text()) or {}
    except OSError as error:
        raise ValueError(f"cannot read config {config}: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config {config} is not valid YAML: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config {config} must be a mapping, got {type(settings).__name__}")
    if settings.get("recipe") == LinearRegressionBackend.recipe:
        if engine != "lightning":
            raise ValueError(f"the {settings['recipe']} recipe has no clients to run on {engine}")
        return LinearRegressionBackend(settings)
    if "model" in settings or "data" in settings:
        if engine == "flower":
            from .flower_backend import FlowerBackend

            return FlowerBackend(Path(config))
        from .lightning_backend import LightningBackend

        return LightningBackend(Path(config))
    raise ValueError(
        f"config {config} names no known recipe: expected 'recipe: linear_regression' or a "
        "LightningCLI config with 'model' and 'data' sections"
    )


def check_aggregators(names: list[str]) -> None:
    unknown = [name for name in names if name not in AGGREGATORS]
    if unknown:
        raise ValueError(
            f"unknown aggregator(s) {unknown}; known aggregators: {', '.join(sorted(AGGREGATORS))}"
        )
