"""Lightning callbacks (installed as ``clair_lightning.callbacks``)."""

from .aggregation import FederatedAggregation
from .detection_metrics import log_round

__all__ = ["FederatedAggregation", "log_round"]
