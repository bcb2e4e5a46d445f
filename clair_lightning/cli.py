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
stops the command with one line on stderr and exit code 2, before any run folder exists.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence

from .experiment import ClairCLI, check_config_files, run

__all__ = ["ClairCLI", "main", "run"]

# Errors of the user's settings, data or files; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, argparse.ArgumentError)


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


def one_line(error: BaseException) -> str:
    """The root cause of a (possibly wrapped) error, on one line, with the option it concerns.

    jsonargparse wraps an error raised while instantiating a class in several layers
    ("Does not validate against any of the Union subtypes ..."); the innermost error is ours.
    """
    cause = error
    while True:
        inner = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if inner is None or not isinstance(inner, Exception):
            break
        cause = inner
    text = " ".join(str(cause).split()) or type(cause).__name__
    key = re.match(r'Parser key "([^"]+)"', str(error))
    if key and key.group(1) not in text:
        text = f"{key.group(1)}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
