"""``clair flower app``: the Flower App folder that ``flwr run`` ships to a SuperLink.

The folder holds only a ``pyproject.toml``: its components point at this installed package
(``clair_lightning.flower.server_app:app`` and ``...client_app:app``), and its run config
carries the experiment's YAML text and the engine's settings, so every SuperNode trains exactly
the server's configuration. Override any key at run time with ``flwr run DIR CONN -c 'k=v'``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from .experiment import RunSettings


def write_app(directory: str | Path, settings: RunSettings) -> Path:
    """Write the app's ``pyproject.toml`` into ``directory``; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A Flower App for clair-lightning, written by `clair flower app`.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "clair-{settings.config_name.replace("_", "-")}"',
        'version = "1.0.0"',
        'description = "Federated LoRA fine-tuning with CLAIR contamination detection"',
        'license = "Apache-2.0"',
        f'dependencies = ["clair-lightning[flower]=={__version__}"]',
        "",
        "[tool.flwr.app]",
        'publisher = "clair-lightning"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "clair_lightning.flower.server_app:app"',
        'clientapp = "clair_lightning.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in settings.as_run_config().items():
        lines.append(f"{key} = {_toml(value)}")
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
