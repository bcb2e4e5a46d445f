"""One console line per round and per evaluation: what the aggregator did and how it went.

round 2/6: flagged [3, 7] of 10 (truth [3, 5, 7]: F1 0.80, FPR 0.00) · benign
exact_match 0.531 · 4.1 s          (one line; wrapped here)
"""

from __future__ import annotations

import math

TASK_METRIC = "exact_match"


def round_line(record: dict, rounds: int | None) -> str:
    """A finished round record (see ``FederatedAggregation``) as one line."""
    clients = record["clients"]
    parts = [f"round {record['round']}/{rounds}" if rounds else f"round {record['round']}"]
    if record["aggregated"]:
        present = [c for c in clients if c.get("missing") is None]
        flagged = [c["client"] for c in present if c["flag"]]
        excluded = [c["client"] for c in present if c.get("excluded") is not None]
        truth = [c["client"] for c in present if c["contaminated"]]
        detection = _detection(record["detection"], truth)
        sampled = "" if len(present) == len(clients) else f" sampled of {len(clients)}"
        text = f"flagged {_clients(flagged)} of {len(present)}{sampled}{detection}"
        if excluded:
            text += f", of which excluded {_clients(excluded)} (see summary.json)"
        parts.append(text)
    else:
        parts.append("local steps only (no aggregation this round)")
    parts.append(_benign(record["benign_mean"]))
    if record.get("seconds") is not None:
        parts.append(f"{record['seconds']:.1f} s")
    return f"{parts[0]}: " + " · ".join(parts[1:])


def evaluation_line(split: str, benign_mean: dict, rounds: int, truth: list[bool]) -> str:
    """Benign means of an evaluation (``validate`` or ``test``) of the trained adapters."""
    metrics = ", ".join(
        f"{name} {value:.3f}" for name, value in benign_mean.items() if value is not None
    )
    benign = len(truth) - sum(truth)
    return f"{split} after round {rounds}: benign clients ({benign} of {len(truth)}) {metrics}"


def _detection(detection: dict, truth: list[int]) -> str:
    values = []
    for name in ("f1", "fpr"):
        value = detection.get(name)
        if value is not None and math.isfinite(value):
            values.append(f"{name.upper()} {value:.2f}")
    if not values:
        return ""
    return f" (truth {_clients(truth)}: {', '.join(values)})"


def _benign(benign_mean: dict) -> str:
    value = benign_mean.get(TASK_METRIC)
    return f"benign {TASK_METRIC} " + ("n/a" if value is None else f"{value:.3f}")


def _clients(clients: list[int]) -> str:
    return "none" if not clients else "[" + ", ".join(str(k) for k in clients) + "]"
