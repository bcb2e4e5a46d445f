"""Shared test settings: few threads, W&B offline, one pre-trained base cache per session."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def base_model_cache(tmp_path_factory):
    """Recipes cache pre-trained bases here, never in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLAIR_CACHE_DIR", str(tmp_path_factory.mktemp("clair-cache")))
        patch.setenv("WANDB_MODE", "offline")
        yield
