"""Framework-free CLAIR engine: pure torch, no Lightning, W&B or Flower imports."""

from .aggregators import AGGREGATORS, aggregate, get_aggregator
from .attacks import ATTACKS, contaminate
from .clair import clair_aggregate
from .factors import Refactorized, refactorize, stack_products
from .result import AggregationResult, RefinedUpdates
from .updates import ClientUpdate, LoraFactors, UpdateValidationError, validate_updates

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "AggregationResult",
    "ClientUpdate",
    "LoraFactors",
    "Refactorized",
    "RefinedUpdates",
    "UpdateValidationError",
    "aggregate",
    "clair_aggregate",
    "contaminate",
    "get_aggregator",
    "refactorize",
    "stack_products",
    "validate_updates",
]
