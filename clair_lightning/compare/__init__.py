"""Side-by-side comparison of aggregators over contamination scenarios and seeds.

``clair compare`` runs every cell of an aggregator x contamination x seed grid through one
recipe backend, stores every round of every cell in ``results.json`` and writes a report with
tables and plots. Finished cells are not rerun.
"""

from .grid import Cell, expand_grid
from .runner import run_comparison

__all__ = ["Cell", "expand_grid", "run_comparison"]
