"""clair-lightning: federated LoRA fine-tuning that tells you which clients were contaminated."""

from .core import (
    AGGREGATORS,
    AggregationResult,
    UpdateValidationError,
    aggregate,
    clair_aggregate,
    refactorize,
)

__version__ = "0.1.0"

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "UpdateValidationError",
    "__version__",
    "aggregate",
    "clair_aggregate",
    "refactorize",
]
