"""Shakespeare on a real LLM: clients are speaking roles (the LEAF benchmark's natural split)."""

from .data import ShakespeareDataModule

__all__ = ["ShakespeareDataModule"]
