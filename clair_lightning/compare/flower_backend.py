"""Run comparison cells on Flower's simulation runtime instead of in one process.

Each cell is ``clair flower simulate`` with the cell's overrides; the run folder's
``summary.json`` has the Lightning path's shape, so records, the report and its plots are the
same as with the in-process backend.
"""

from __future__ import annotations

from pathlib import Path

from .lightning_backend import LightningBackend


class FlowerBackend(LightningBackend):
    """A LightningCLI recipe config, each cell one Flower simulation (one SuperNode per client)."""

    def execute(self, overrides: list[str]) -> Path:
        from ..flower.simulation import simulate

        return simulate(self.config, overrides=overrides)
