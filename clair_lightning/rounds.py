"""One aggregation round as every engine runs and records it (Lightning callback, Flower server).

Both engines check the aggregator settings the same way, call the same ``aggregate(name, ...)``,
and record a round in the same shape, so ``summary.json`` reads the same whichever engine wrote
it. Nothing here imports Lightning or Flower.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from .core import ClientUpdate, get_aggregator
from .core.aggregators import NEEDS_TRUTH, aggregate
from .jsonio import json_safe
from .metrics import METRIC_NAMES, detection_metrics

SUMMARY = "summary.json"
TASK_METRICS = ["exact_match", "token_accuracy", "loss", "perplexity"]
TABLE_COLUMNS = [
    "client",
    "score",
    "flag",
    "contaminated",
    "exact_match",
    "token_accuracy",
    "loss",
    "truncation_error",
]


def check_aggregation(
    name: str, period: int, options: dict[str, Any] | None, nonfinite: str
) -> dict[str, Any]:
    """The aggregator's options, checked against its signature; raises ``ValueError`` at once."""
    function = get_aggregator(name)
    if period < 1:
        raise ValueError(f"aggregation period must be at least 1, got {period}")
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    options = dict(options or {})
    if "contaminated" in options:
        raise ValueError("'contaminated' is supplied by the data module, not by the config")
    accepted = inspect.signature(function).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        names = [p for p in accepted if p not in ("updates", "weights", "contaminated")]
        raise ValueError(
            f"aggregator {name!r} has no option(s) {unknown}; its options: {', '.join(names)}"
        )
    if "nonfinite" in accepted:
        options.setdefault("nonfinite", nonfinite)
    return options


def aggregate_round(
    name: str,
    options: dict[str, Any],
    uploads: Sequence[ClientUpdate],
    weights: Sequence[float],
    truth: Sequence[bool] | None,
):
    """Run the aggregator on one round's uploads; returns the result and the round's fields.

    ``truth`` is the contamination mask (simulation only); aggregators that need it refuse to
    run without it.
    """
    options = dict(options)
    if name in NEEDS_TRUTH:
        if truth is None:
            raise ValueError(f"aggregator {name!r} needs the ground truth (simulation only)")
        options["contaminated"] = list(truth)
    started = time.perf_counter()
    result = aggregate(name, list(uploads), list(weights), **options)
    fields = {
        "aggregated": True,
        "flags": list(result.contaminated),
        "scores": None if result.scores is None else [float(s) for s in result.scores],
        "excluded": {int(k): v for k, v in result.excluded.items()},
        "score_components": {k: [float(x) for x in v] for k, v in result.score_components.items()},
        "diagnostics": json_safe(result.diagnostics),
        "aggregation_seconds": time.perf_counter() - started,
    }
    return result, fields


def by_client(fields: dict, answered: list[int], num_clients: int) -> dict:
    """The aggregator's per-participant fields re-indexed by client (``None`` for absent).

    ``answered`` lists the round's participants (sampled, or the clients that replied).
    """

    def spread(values):
        if len(values) != len(answered):
            return values
        full = [None] * num_clients
        for index, client in enumerate(answered):
            full[client] = values[index]
        return full

    flags = spread(fields["flags"])
    return {
        **fields,
        "flags": [bool(flag) for flag in flags],
        "scores": None if fields["scores"] is None else spread(fields["scores"]),
        "excluded": {answered[k]: reason for k, reason in fields["excluded"].items()},
        "score_components": {
            name: spread(values) for name, values in fields["score_components"].items()
        },
    }


def round_record(
    pending: dict,
    truth: Sequence[bool | None] | None,
    client_metrics: list[dict],
    missing: dict[int, str] | None = None,
) -> dict:
    """A finished round: per-client truth, flag, score, task metrics; detection; benign means.

    ``truth`` is ``None`` where no ground truth exists (a real deployment): detection metrics
    and benign means are then empty. ``missing`` names clients left out of the round and why;
    detection and benign means cover the clients that took part.
    """
    missing = missing or {}
    num_clients = len(client_metrics) if truth is None else len(truth)
    aggregated = pending["aggregated"]
    flags = pending["flags"] if aggregated else [False] * num_clients
    scores = pending["scores"] if aggregated else None
    clients = []
    for k in range(num_clients):
        clients.append(
            {
                "client": k,
                "contaminated": None if truth is None or truth[k] is None else bool(truth[k]),
                "flag": bool(flags[k]),
                "score": None if scores is None else scores[k],
                "excluded": pending.get("excluded", {}).get(k),
                "metrics": client_metrics[k] if k < len(client_metrics) else {},
                "truncation_error": pending.get("truncation_error", {}).get(k),
                **({"missing": missing[k]} if k in missing else {}),
            }
        )
    record = {
        key: value
        for key, value in pending.items()
        if key not in ("flags", "scores", "excluded", "truncation_error")
    }
    record["clients"] = clients
    if missing:
        record["missing"] = {int(k): reason for k, reason in sorted(missing.items())}
    present = [k for k in range(num_clients) if k not in missing]
    if truth is None or not aggregated:
        record["detection"] = {}
    else:
        record["detection"] = detection_metrics(
            [flags[k] for k in present],
            None if scores is None else [scores[k] for k in present],
            [truth[k] for k in present],
        )
    record["benign_mean"] = (
        {}
        if truth is None
        else benign_mean([client_metrics[k] for k in present], [truth[k] for k in present])
    )
    return record


def benign_mean(client_metrics: list[dict], truth: Sequence[bool]) -> dict[str, float | None]:
    """Mean of every task metric over the benign clients (non-finite values left out)."""
    benign = [m for m, bad in zip(client_metrics, truth, strict=False) if not bad and m]
    names = benign[0].keys() if benign else ()
    return {
        name: statistics.fmean(values)
        if (values := [m[name] for m in benign if math.isfinite(m[name])])
        else None
        for name in names
    }


def with_benign_mean(client_metrics: list[dict], truth: Sequence[bool]) -> dict:
    return {"clients": client_metrics, "benign_mean": benign_mean(client_metrics, truth)}


def round_scalars(record: dict) -> dict[str, float]:
    """The round's scalars for loggers: ``detection/*``, ``benign/*``, aggregation seconds."""
    scalars: dict[str, float] = {"round": float(record["round"])}
    for name in METRIC_NAMES:
        value = record["detection"].get(name)
        if value is not None:
            scalars[f"detection/{name}"] = float(value)
    for name, value in record["benign_mean"].items():
        if value is not None and math.isfinite(value):
            scalars[f"benign/{name}"] = float(value)
    if record.get("aggregation_seconds") is not None:
        scalars["aggregation/seconds"] = float(record["aggregation_seconds"])
    return scalars


def client_rows(record: dict) -> list[list]:
    """One row per client for the W&B ``clients`` table (columns ``TABLE_COLUMNS``)."""
    rows = []
    for client in record["clients"]:
        metrics, score = client["metrics"], client["score"]
        rows.append(
            [
                client["client"],
                None if score is None or not math.isfinite(score) else score,
                client["flag"],
                client["contaminated"],
                metrics.get("exact_match"),
                metrics.get("token_accuracy"),
                metrics.get("loss"),
                client.get("truncation_error"),
            ]
        )
    return rows


def run_summary(
    aggregator: dict,
    data: dict,
    runtime_seconds: float,
    rounds: list[dict],
    test: dict | None = None,
    task_metric: str = "exact_match",
    sessions: list[dict] | None = None,
    **extra: Any,
) -> dict:
    """The ``summary.json`` payload, the same keys for every engine (``extra`` adds sections).

    ``sessions`` lists the processes that trained (``after_round``, ``pid``), one per resume.
    """
    return {
        "aggregator": aggregator,
        "data": data,
        "task": {"metric": task_metric, "higher_is_better": True, "metrics": TASK_METRICS},
        "runtime_seconds": runtime_seconds,
        "sessions": sessions or [],
        "rounds": rounds,
        "test": test,
        **extra,
    }
