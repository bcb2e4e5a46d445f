"""The frozen base model every client shares: built from a transformers config or a local folder.

Nothing is downloaded: a config builds fresh weights (``AutoModelForCausalLM.from_config``), a
checkpoint path must be a local ``save_pretrained`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()


class BaseModelError(ValueError):
    """The base model cannot be built or loaded as configured."""


def build_base_model(
    config: dict[str, Any] | None = None, checkpoint: str | Path | None = None
) -> PreTrainedModel:
    """A causal LM from ``config`` (``{"model_type": "llama", ...}``) or a local ``checkpoint``."""
    if (config is None) == (checkpoint is None):
        raise BaseModelError("give exactly one of a base model config or a checkpoint path")
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"checkpoint path {str(path)!r} is not a readable save_pretrained folder "
                "(no config.json)"
            )
        try:
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise BaseModelError(
                f"cannot load the base model from {str(path)!r}: {error}"
            ) from None
    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise BaseModelError("the base model config needs a 'model_type' (e.g. 'llama')")
    try:
        model_config = AutoConfig.for_model(model_type, **settings)
        return AutoModelForCausalLM.from_config(model_config)
    except (KeyError, ValueError, TypeError) as error:
        raise BaseModelError(
            f"cannot build a {model_type!r} model from {settings}: {error}"
        ) from None


class BaseModelSource:
    """Where the shared base comes from; configs choose a subclass by ``class_path``."""

    def build(self) -> PreTrainedModel:
        raise NotImplementedError


class ConfigBase(BaseModelSource):
    """Fresh weights from a transformers config, e.g. ``{"model_type": "llama", ...}``."""

    def __init__(self, config: dict[str, Any]):
        if "model_type" not in config:
            raise BaseModelError("the base model config needs a 'model_type' (e.g. 'llama')")
        self.config = dict(config)

    def build(self) -> PreTrainedModel:
        return build_base_model(config=self.config)


class CheckpointBase(BaseModelSource):
    """A local ``save_pretrained`` folder; checked when the config is read, before training."""

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise BaseModelError(
                f"checkpoint path {str(self.path)!r} is not a readable save_pretrained folder "
                "(no config.json)"
            )

    def build(self) -> PreTrainedModel:
        return build_base_model(checkpoint=self.path)
