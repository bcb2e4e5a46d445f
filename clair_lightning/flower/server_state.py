"""The Flower server's state after every round, so that a stopped ServerApp resumes.

``checkpoints/server_state.pt`` in the run folder holds what the next round needs: every
client's adapter as the server last sent or refined it, the round records, the clients' train
sizes and ground truth (simulation), the write-back generator and the sessions so far. It is
written atomically after each finished round; a round cut short is trained again on resume.
The clients' AdamW moments live in each SuperNode's per-run state and start afresh in the
resumed run (the learning-rate schedule does not: it follows the round number).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core import ClientUpdate

STATE = Path("checkpoints") / "server_state.pt"


@dataclass
class ServerState:
    config_yaml: str
    overrides: tuple[str, ...]
    completed_rounds: int
    adapters: dict[int, ClientUpdate]
    records: list[dict]
    truth: dict[int, bool]
    train_sizes: dict[int, float]
    generator: torch.Tensor
    sessions: list[dict]
    elapsed_seconds: float


def save_state(run_dir: Path, state: ServerState) -> None:
    """``torch.save`` into a temporary file, fsync, ``os.replace`` it, fsync the folder."""
    path = Path(run_dir) / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(asdict(state), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk, as for the Lightning checkpoint
    finally:
        os.close(directory)


def load_state(run_dir: Path, config_yaml: str, overrides: tuple[str, ...]) -> ServerState:
    """The saved state of the run in ``run_dir``; ``ValueError`` (one line) when there is none,
    it cannot be read, or the run was started with another config."""
    path = Path(run_dir) / STATE
    if not path.exists():
        raise ValueError(f"nothing to resume: {path} does not exist (no round of it finished)")
    try:
        saved = torch.load(path, weights_only=False)
        state = ServerState(**saved)
    except Exception as error:  # a damaged file, whatever torch says about it
        raise ValueError(f"cannot resume from {path}: {type(error).__name__}: {error}") from None
    if (state.config_yaml, tuple(state.overrides)) != (config_yaml, tuple(overrides)):
        raise ValueError(
            f"the run in {run_dir} was started with another config or overrides; resume it "
            "with the same ones, or start a new run (--run.name)"
        )
    return state
