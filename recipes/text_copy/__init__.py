"""The paper's experiment: LoRA clients fine-tuning a copy-pretrained Transformer."""

from .data import TextCopyDataModule
from .model import PretrainedCopyBase

__all__ = ["PretrainedCopyBase", "TextCopyDataModule"]
