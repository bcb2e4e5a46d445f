"""The ``clair`` command: ``fit``, ``validate``, ``test`` (LightningCLI) and ``compare``.

    clair fit --config configs/text_copy.yaml
    clair fit --config configs/text_copy.yaml --ckpt_path last      # resume
    clair test --config configs/text_copy.yaml                      # test the trained run
    clair fit --config configs/text_copy.yaml --print_config
    clair compare --config configs/text_copy.yaml --aggregators clair,fedavg ...
    clair prepare smollm2                                            # fetch a real LLM once
    clair flower simulate --config configs/text_copy.yaml --num-supernodes 10

A run writes to ``<run.output_dir>/<run.name>/``: the resolved ``config.yaml``, ``summary.json``,
``adapters/client_<k>/`` (peft format), ``checkpoints/last.ckpt`` (after every round), offline
W&B files and CSV logs. W&B runs offline unless ``WANDB_MODE`` says otherwise. A bad setting
stops the command with one line on stderr and exit code 2, before any run folder exists (or,
when only the first batches reveal it, removing the new run's folder again).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from .errors import USER_ERRORS, one_line
from .experiment import ClairCLI, check_config_files, run

__all__ = ["ClairCLI", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_library_chatter()
    if arguments[:1] == ["compare"]:
        from .compare.__main__ import main as compare

        return compare(arguments[1:])
    if arguments[:1] == ["prepare"]:  # clair prepare smollm2: fetch and convert a model once
        from .prepare import main as prepare

        return prepare(arguments[1:])
    if arguments[:1] == ["flower"]:
        from .flower.__main__ import main as flower

        return flower(arguments[1:])
    try:
        check_config_files(arguments)
        ClairCLI(args=arguments)
    except USER_ERRORS as error:
        print(f"clair: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


def quiet_library_chatter() -> None:
    """Keep stderr to what the user must read: the seed is in config.yaml, and peft's use of a
    deprecated transformers property is no concern of the run (a refused setting is then
    exactly one line on stderr)."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


if __name__ == "__main__":
    sys.exit(main())
