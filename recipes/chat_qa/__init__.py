"""Chat QA on a real instruction-tuned LLM: clients are chatterbot-corpus topics."""

from .data import ChatQADataModule

__all__ = ["ChatQADataModule"]
