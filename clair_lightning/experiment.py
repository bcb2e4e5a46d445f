"""One federated run from the Lightning CLI: run folder, lock, round checkpoints, resume.

``ClairCLI`` is what ``clair fit|validate|test`` runs; ``run()`` runs it from Python (the
comparison runner uses it). Every setting is checked before the run folder is created, and a
run folder is used by one process at a time.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from .callbacks import FederatedAggregation, RoundCheckpoint
from .errors import USER_ERRORS
from .federation import FederatedDataModule, FederatedLoRAModule

CHECKPOINT = Path("checkpoints") / RoundCheckpoint.FILENAME
DESCRIPTION = (
    "Federated LoRA fine-tuning with CLAIR contamination detection. Subcommands: fit, validate, "
    "test (each `clair <subcommand> --help`); also `clair compare --help` (aggregators over a "
    "grid of contaminations and seeds), `clair flower --help` (the same run on Flower) and "
    "`clair prepare --help` (fetch a real model once)."
)


@dataclass(frozen=True)
class RunFolder:
    """Where a run writes, named from the config unless ``run.name`` is set."""

    path: Path
    name: str
    group: str

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def lock(self) -> Path:
        """A lock file beside the folder, so replacing the folder never removes a held lock."""
        return self.path.parent / f".{self.name}.lock"


@dataclass(frozen=True)
class Resume:
    """A readable checkpoint to continue from and how many rounds it holds."""

    path: Path
    rounds: int


class ClairCLI(LightningCLI):
    """LightningCLI with the aggregation as its own section and a locked run folder per run."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        self.resume: Resume | None = None
        self._lock: FileLock | None = None
        refused = False
        try:
            with warnings.catch_warnings():
                # Explicit arguments are intended (from `run()` or `main(argv)`); argv is unrelated.
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                self._init(args, run)
        except USER_ERRORS:
            refused = True
            raise
        finally:
            if hasattr(self, "trainer"):
                self._finish_wandb()  # also after a failed run: no W&B run is left open
                if refused:
                    self._discard_unstarted_run()
            if self._lock is not None:
                self._lock.release()

    def _init(self, args: Sequence[str] | None, run: bool) -> None:
        strict = {"exit_on_error": False}
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
                "enable_checkpointing": True,
            },
            # Each client has its own AdamW and schedule (FederatedLoRAModule's arguments);
            # Lightning's single --optimizer/--lr_scheduler cannot be honoured, so not offered.
            auto_configure_optimizers=False,
            parser_kwargs={
                "description": DESCRIPTION,
                **strict,
                **{name: dict(strict) for name in self.subcommands()},
            },
            args=list(args) if args is not None else None,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; a federation of adapters has no single ``predict``."""
        subcommands = dict(LightningCLI.subcommands())
        subcommands.pop("predict")
        return subcommands

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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then resolve ``--ckpt_path`` to this run's checkpoint and check it is readable.

        The resolved path is passed to the Trainer by ``fit``/``validate``/``test`` below; the
        config keeps no path, so Lightning does not re-read hyperparameters from the file.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        folder = run_folder(config)
        requested = config.get("ckpt_path")
        if requested is None and subcommand != "fit":
            requested = "last"  # evaluating a run means evaluating what it trained
        if requested is not None:
            self.resume = read_resume(folder, requested)
        config.ckpt_path = None

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config[self.subcommand]
        aggregation: FederatedAggregation = self._get(self.config_init, "aggregation")
        aggregation.check_options(self.datamodule.num_clients)
        rounds = config.trainer.max_epochs
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"trainer.max_epochs (the rounds) must be at least 1, got {rounds}")
        folder = run_folder(config)
        self._lock = lock_run_folder(folder)
        if self.subcommand == "fit" and self.resume is None:
            if (folder.path / "summary.json").exists() or (folder.path / "checkpoints").exists():
                if not config.run.overwrite:
                    raise ValueError(
                        f"run folder {folder.path} already holds a run; resume it with "
                        "--ckpt_path last, choose another --run.name, or pass --run.overwrite true"
                    )
                shutil.rmtree(folder.path)
        loggers = [
            WandbLogger(
                save_dir=str(folder.path),
                project=config.run.wandb_project,
                name=folder.name,
                group=folder.group,
                log_model=False,
            ),
            CSVLogger(str(folder.path), name="csv"),
        ]
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = [
            *(configured if isinstance(configured, list) else [configured]),
            RoundCheckpoint(folder.path / CHECKPOINT.parent),
        ]
        return super().instantiate_trainer(
            default_root_dir=str(folder.path), logger=loggers, callbacks=callbacks, **kwargs
        )

    # --- subcommands ------------------------------------------------------------------------

    def fit(self, model, datamodule=None, **kwargs: Any) -> None:
        resume = self.resume
        if resume is not None:
            rounds = self.trainer.max_epochs
            if resume.rounds >= rounds:
                print(
                    f"{self.trainer.default_root_dir} already finished {resume.rounds} of "
                    f"{rounds} rounds; nothing to train (`clair test` evaluates it)"
                )
                return
            print(f"resuming after round {resume.rounds} of {rounds} from {resume.path}")
        kwargs.pop("ckpt_path", None)
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=_path(resume), **kwargs)

    def validate(self, model, datamodule=None, **kwargs: Any) -> None:
        kwargs.pop("ckpt_path", None)
        self.trainer.validate(model, datamodule=datamodule, ckpt_path=_path(self.resume), **kwargs)

    def test(self, model, datamodule=None, **kwargs: Any) -> None:
        kwargs.pop("ckpt_path", None)
        self.trainer.test(model, datamodule=datamodule, ckpt_path=_path(self.resume), **kwargs)

    def after_fit(self) -> None:
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()

    def _discard_unstarted_run(self) -> None:
        """A new run refused before its first round (a setting only the first batches reveal,
        such as ``pack_client_groups`` on left-padded data) leaves no half-written folder; a run
        with a round checkpoint stays, to be resumed."""
        folder = Path(self.trainer.default_root_dir)
        if self.subcommand == "fit" and self.resume is None and not (folder / CHECKPOINT).exists():
            shutil.rmtree(folder, ignore_errors=True)

    def _finish_wandb(self) -> None:
        """Close the W&B run so its files are complete before the next run or process exit."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def _path(resume: Resume | None) -> str | None:
    return None if resume is None else str(resume.path)


def run_folder(config) -> RunFolder:
    """The run folder a parsed config names (nothing is created)."""
    data = config.data.init_args
    sources = config.get("config") or []
    stem = Path(str(sources[0])).stem if sources else "run"
    base = f"{stem}-{config.aggregation.name}-{data.contamination}"
    name = config.run.name or f"{base}-seed{config.seed_everything}"
    return RunFolder(Path(config.run.output_dir) / name, name, config.run.wandb_group or base)


def read_resume(folder: RunFolder, ckpt_path: str) -> Resume:
    """``last`` (this run's checkpoint) or a path, checked readable before anything starts."""
    path = folder.checkpoint if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise ValueError(
            f"no checkpoint at {path}: the run has not finished a round yet (`clair fit` writes "
            "it after every round)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        rounds = int(checkpoint["epoch"]) + 1
    except Exception as error:  # any unreadable file, whatever torch's reason
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(error).__name__}: {reason}); delete it to "
            "start over, or pass --ckpt_path with another checkpoint"
        ) from None
    return Resume(path, rounds)


def lock_run_folder(folder: RunFolder) -> FileLock:
    """Hold the run folder for this process; a second run of the same name is refused."""
    folder.lock.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.lock, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"run folder {folder.path} is in use by another clair process (lock {folder.lock}); "
            "wait for it to finish or choose another --run.name"
        ) from None
    return lock


def check_config_files(arguments: Sequence[str]) -> None:
    """Each ``--config`` file exists and is a YAML mapping: one line naming the file if not."""
    for flag, value in zip(arguments, arguments[1:], strict=False):
        if flag not in ("--config", "-c"):
            continue
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            settings = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"config file {path} is not valid YAML{line}: {problem}") from None
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(
                f"config file {path} must hold a mapping of settings, got {type(settings).__name__}"
            )


def run(config: str | Path, overrides: Sequence[str] = (), subcommand: str = "fit") -> Path:
    """Run one federated experiment from Python; returns its run folder."""
    os.environ.setdefault("WANDB_MODE", "offline")
    arguments = [subcommand, "--config", str(config), *overrides]
    check_config_files(arguments)
    cli = ClairCLI(args=arguments)
    return Path(cli.trainer.default_root_dir)
