"""Lightning layer: a federation of LoRA clients over one frozen base, and its data module."""

from .base import (
    BaseModelError,
    BaseModelSource,
    CheckpointBase,
    ConfigBase,
    PretrainedBase,
    build_base_model,
    load_tokenizer,
)
from .client import ClientLoRAModule
from .data import ClientExamples, FederatedDataModule
from .module import FederatedLoRAModule, LoraTargetError, adapter_name

__all__ = [
    "BaseModelError",
    "BaseModelSource",
    "CheckpointBase",
    "ClientLoRAModule",
    "ClientExamples",
    "ConfigBase",
    "FederatedDataModule",
    "FederatedLoRAModule",
    "LoraTargetError",
    "PretrainedBase",
    "adapter_name",
    "build_base_model",
    "load_tokenizer",
]
