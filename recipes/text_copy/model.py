"""A tiny decoder-only Transformer pre-trained to copy, cached on disk by its config.

The base is a Llama-style model built from a config (nothing is downloaded), trained with full
fine-tuning to copy ``x SEP → x`` on random sequences. The result is saved with
``save_pretrained`` under ``<cache>/text_copy/<hash of the config>/``, so every run with the same
config loads the same weights in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ...federation.base import BaseModelSource
from ...federation.task import completion_step
from .vocabulary import BOS, PAD, SEP, content_token, vocabulary_size

FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$CLAIR_CACHE_DIR`` or ``~/.cache/clair_lightning``."""
    return Path(os.environ.get("CLAIR_CACHE_DIR", Path.home() / ".cache" / "clair_lightning"))


class PretrainedCopyBase(BaseModelSource):
    """The copy-pretrained base model of the text-copying recipe."""

    def __init__(
        self,
        content_tokens: int = 24,
        sequence_length: int = 8,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        pretrain_steps: int = 1500,
        pretrain_batch_size: int = 64,
        pretrain_learning_rate: float = 3e-3,
        cache_dir: str | None = None,
    ):
        if pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be non-negative, got {pretrain_steps}")
        self.settings = {
            "content_tokens": content_tokens,
            "sequence_length": sequence_length,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "pretrain_steps": pretrain_steps,
            "pretrain_batch_size": pretrain_batch_size,
            "pretrain_learning_rate": pretrain_learning_rate,
            "format": FORMAT_VERSION,
        }
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    @property
    def key(self) -> str:
        text = json.dumps(self.settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return (self.cache_dir or cache_root()) / "text_copy" / self.key

    def build(self) -> PreTrainedModel:
        if not (self.path / "config.json").is_file():
            steps = self.settings["pretrain_steps"]
            print(
                f"pre-training the copy base once ({steps} steps; cached in {self.path})...",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            self._pretrain_and_cache()
            print(f"pre-trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True)

    def config(self) -> LlamaConfig:
        s = self.settings
        return LlamaConfig(
            vocab_size=vocabulary_size(s["content_tokens"]),
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_heads"],
            max_position_embeddings=2 * s["sequence_length"] + 8,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=SEP,
            tie_word_embeddings=True,
        )

    def _pretrain_and_cache(self) -> None:
        s = self.settings
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(self.config())
        optimizer = torch.optim.AdamW(model.parameters(), lr=s["pretrain_learning_rate"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=s["pretrain_learning_rate"],
            total_steps=max(1, s["pretrain_steps"]),
            pct_start=0.1,
        )
        model.train()
        for _ in range(s["pretrain_steps"]):
            batch = copy_batch(
                s["pretrain_batch_size"], s["content_tokens"], s["sequence_length"], generator
            )
            loss = completion_step(model, batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.key}-"))
        model.save_pretrained(staging)
        (staging / "pretraining.json").write_text(json.dumps(s, indent=1))
        try:
            os.replace(staging, self.path)
        except OSError:  # another process cached the same config first
            shutil.rmtree(staging, ignore_errors=True)


def copy_batch(
    size: int, content_tokens: int, length: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random sequences and their copies, ``BOS x SEP x`` with loss on the copy only."""
    x = torch.randint(content_tokens, (size, length), generator=generator)
    return completion_tensors(content_token(x), content_token(x))


def completion_tensors(prompt: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """``BOS prompt SEP target`` with labels only on the target positions."""
    size = prompt.shape[0]
    prefix = torch.cat([torch.full((size, 1), BOS), prompt, torch.full((size, 1), SEP)], dim=1)
    input_ids = torch.cat([prefix, target], dim=1)
    labels = input_ids.clone()
    labels[:, : prefix.shape[1]] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
