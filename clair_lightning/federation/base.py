"""The frozen base model every client shares: a transformers config, a local folder or a hub name.

A config builds fresh weights (``AutoModelForCausalLM.from_config``); ``CheckpointBase`` needs a
local ``save_pretrained`` folder; ``PretrainedBase`` takes a local folder or a hub name (hub names
are fetched only by the user's own ``transformers`` set-up, never by this project's tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


class PretrainedBase(BaseModelSource):
    """Any causal LM by local folder or hub name, through ``AutoModelForCausalLM``.

    Args:
        name_or_path: a ``save_pretrained`` folder (checked when the config is read) or a hub
            name such as ``HuggingFaceTB/SmolLM2-135M`` (needs network or a filled HF cache).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the frozen base weights (the LoRA
            factors stay float32, as peft keeps them).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        revision: a hub revision (branch, tag or commit); ignored for local folders.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        revision: str | None = None,
    ):
        if dtype not in DTYPES:
            raise BaseModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        path = Path(name_or_path).expanduser()
        self.local = path.exists() or str(name_or_path).startswith((".", "/", "~"))
        if self.local and not (path / "config.json").is_file():
            raise BaseModelError(
                f"base model folder {str(path)!r} is not a readable save_pretrained folder "
                "(no config.json)"
            )
        self.name_or_path = str(path) if self.local else name_or_path
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.revision = revision

    def _options(self) -> dict[str, Any]:
        if self.local:
            return {"local_files_only": True}
        return {"revision": self.revision} if self.revision else {}

    def build(self) -> PreTrainedModel:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.name_or_path, dtype=DTYPES[self.dtype], **self._options()
            )
        except (OSError, ValueError) as error:
            raise BaseModelError(
                f"cannot load the base model {self.name_or_path!r}: {_first_line(error)}"
            ) from None
        if self.gradient_checkpointing:
            # transformers 5.24 renamed gradient_checkpointing_enable (kept as a deprecated alias)
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
            model.config.use_cache = False
        return model

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.name_or_path, **self._options())


def load_tokenizer(name_or_path: str, **options: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token (the EOS token when the tokenizer has none)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        name_or_path, options = str(path), {**options, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as error:
        raise BaseModelError(
            f"cannot load a tokenizer from {name_or_path!r}: {_first_line(error)}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
