"""JSON output shared by run summaries, comparison cells and reports.

Non-finite floats are not JSON: NaN becomes ``null`` and ±inf the strings ``"inf"``/``"-inf"``
(an excluded client's score is ``inf``). Files are written to a temporary name and renamed, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with tensors as lists, tuples as lists, keys as strings, non-finite floats kept
    readable."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if hasattr(value, "tolist"):  # tensors and numpy arrays
        return json_safe(value.tolist())
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    os.replace(temporary, path)
