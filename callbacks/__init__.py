"""Lightning callbacks (installed as ``clair_lightning.callbacks``)."""

from .aggregation import FederatedAggregation
from .checkpoint import RoundCheckpoint
from .detection_metrics import log_round

__all__ = ["FederatedAggregation", "RoundCheckpoint", "log_round"]
