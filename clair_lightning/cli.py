"""The ``clair`` command: LightningCLI for federated runs, plus ``clair compare``.

    clair fit --config configs/text_copy.yaml
    clair fit --config configs/text_copy.yaml --ckpt_path last      # resume
    clair test --config configs/text_copy.yaml --ckpt_path last
    clair fit --config configs/text_copy.yaml --print_config
    clair compare --config configs/text_copy.yaml --aggregators clair,fedavg ...
    clair prepare smollm2                                            # fetch a real LLM once
    clair flower simulate --config configs/text_copy.yaml --num-supernodes 10

A run writes to ``<run.output_dir>/<run.name>/``: the resolved ``config.yaml``, ``summary.json``,
``adapters/client_<k>/`` (peft format), ``checkpoints/last.ckpt``, offline W&B files and CSV
logs. W&B runs offline unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from .callbacks import FederatedAggregation
from .federation import FederatedDataModule, FederatedLoRAModule


class ClairCLI(LightningCLI):
    """LightningCLI with the aggregation as its own section and a run folder per run."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        with warnings.catch_warnings():
            # Explicit arguments are intended (from `run()` or `main(argv)`); argv is unrelated.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            self._init(args, run)

    def _init(self, args: Sequence[str] | None, run: bool) -> None:
        super().__init__(
            FederatedLoRAModule,
            FederatedDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            trainer_defaults={
                "max_epochs": 10,
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "enable_model_summary": False,
            },
            args=list(args) if args is not None else None,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FederatedAggregation, "aggregation")
        parser.add_argument(
            "--run.output_dir",
            type=str,
            default="runs",
            help="folder that holds one sub-folder per run",
        )
        parser.add_argument(
            "--run.name",
            type=str | None,
            default=None,
            help="run folder name (default: <config>-<aggregator>-<contamination>-seed<seed>)",
        )
        parser.add_argument("--run.wandb_project", type=str, default="clair-lightning")
        parser.add_argument(
            "--run.wandb_group",
            type=str | None,
            default=None,
            help="W&B group (default: the run name without its seed)",
        )
        parser.add_argument(
            "--run.overwrite",
            type=bool,
            default=False,
            help="replace an existing finished run folder of the same name",
        )
        parser.link_arguments("data.init_args.num_clients", "model.num_clients")
        parser.link_arguments("seed_everything", "data.init_args.seed")
        parser.link_arguments("seed_everything", "aggregation.seed")

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config[self.subcommand]
        run_dir, name, group = self._run_folder(config)
        loggers = [
            WandbLogger(
                save_dir=str(run_dir),
                project=config.run.wandb_project,
                name=name,
                group=group,
                log_model=False,
            ),
            CSVLogger(str(run_dir), name="csv"),
        ]
        checkpoint = ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0, every_n_epochs=1
        )
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = [*(configured if isinstance(configured, list) else [configured]), checkpoint]
        return super().instantiate_trainer(
            default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, **kwargs
        )

    def after_fit(self) -> None:
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def _finish_wandb(self) -> None:
        """Close the W&B run so its files are complete before the next run or process exit."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()

    def _run_folder(self, config) -> tuple[Path, str, str]:
        data = config.data.init_args
        sources = config.get("config") or []
        stem = Path(str(sources[0])).stem if sources else "run"
        base = f"{stem}-{config.aggregation.name}-{data.contamination}"
        name = config.run.name or f"{base}-seed{config.seed_everything}"
        run_dir = Path(config.run.output_dir) / name
        if self.subcommand == "fit" and config.get("ckpt_path") is None:
            if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
                if not config.run.overwrite:
                    raise ValueError(
                        f"run folder {run_dir} already holds a run; resume it with --ckpt_path "
                        "last, choose another --run.name, or pass --run.overwrite true"
                    )
                shutil.rmtree(run_dir)
        return run_dir, name, config.run.wandb_group or base


def run(config: str | Path, overrides: Sequence[str] = (), subcommand: str = "fit") -> Path:
    """Run one federated experiment from Python; returns its run folder."""
    os.environ.setdefault("WANDB_MODE", "offline")
    cli = ClairCLI(args=[subcommand, "--config", str(config), *overrides])
    return Path(cli.trainer.default_root_dir)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
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
        ClairCLI(args=None if argv is None else arguments)
    except ValueError as error:
        print(f"clair: error: {_reason(error)}", file=sys.stderr)
        return 2
    return 0


def _reason(error: ValueError) -> str:
    """A class's own error, not jsonargparse's multi-line wrapper around it."""
    innermost, cause = error, _cause(error)
    while cause is not None:
        if isinstance(cause, ValueError):
            innermost = cause
        cause = _cause(cause)
    return str(innermost) if innermost is error else str(innermost).splitlines()[0]


def _cause(error: BaseException) -> BaseException | None:
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


if __name__ == "__main__":
    sys.exit(main())
