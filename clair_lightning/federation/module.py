"""K clients' LoRA adapters over one frozen base, trained round by round in one process.

Each client has its own adapter, AdamW state, gradient clipping and learning-rate schedule. One
Trainer epoch is one round: every client takes its local steps from its current adapter. The
aggregation callback then reads and rewrites the adapters at the round boundary. With
``client_group_size`` > 1, that many clients take each local step together in one forward and
backward pass through the base (``grouped.py``); each still steps its own optimizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .adapters import copy_adapter, lora_layers
from .base import BaseModelSource
from .grouped import check_packing, grouped_completion_steps, grouped_lora
from .task import ClientMetrics, completion_step, keeps_target_logits

LrSchedule = Literal["constant", "cosine"]
ALL_LINEAR = "all-linear"


class LoraTargetError(ValueError):
    """A LoRA target module does not exist in the base model."""


def adapter_name(client: int) -> str:
    return f"client_{client}"


class FederatedLoRAModule(pl.LightningModule):
    """A federation of ``num_clients`` LoRA adapters on one shared, frozen base model.

    ``client_group_size``: clients stepped together through one forward/backward of the base
    (the data module serves their batches side by side). 1, the default, steps them one at a
    time. ``pack_client_groups`` packs a group's sequences into rows without their padding
    (position ids restart per sequence; the base's attention must honour that, as transformers'
    Llama-family models do). Before the first packed step two short real sequences run packed
    and apart (``check_packing``): a model whose logits differ, or batches that are not
    right-padded, stop the fit with one line naming the option. Measured in
    benchmarks/README.md, "Batched clients".
    """

    def __init__(
        self,
        base_model: BaseModelSource,
        num_clients: int = 10,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        lr_schedule: LrSchedule = "constant",
        warmup_steps: int = 0,
        client_group_size: int = 1,
        pack_client_groups: bool = False,
    ):
        super().__init__()
        if num_clients < 2:
            raise ValueError(
                f"a federation needs at least two clients, got num_clients={num_clients}"
            )
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {lora_rank}")
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if client_group_size < 1:
            raise ValueError(f"client_group_size must be at least 1, got {client_group_size}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["base_model"])
        self.base_reference = base_reference(base_model)
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen base is rebuilt, not stored in checkpoints
        self.model, config = build_lora_model(
            base_model, lora_rank, lora_alpha, lora_dropout, target_modules, adapter_name(0)
        )
        for client in range(1, num_clients):
            self.model.add_adapter(adapter_name(client), config)
            copy_adapter(self.model, adapter_name(0), adapter_name(client))
        keeps_target_logits(self.model)  # probed here, before any grouped step wraps the model
        self.num_clients = num_clients
        self.client_group_size = client_group_size
        self._packing_checked = False  # check_packing runs before the first packed step
        self.client_metrics: list[dict[str, float]] = []
        self.test_client_metrics: list[dict[str, float]] = []
        self._metrics = ClientMetrics(num_clients)
        self._probe_metrics = ClientMetrics(num_clients)

    # --- parameters -------------------------------------------------------------------------

    def client_parameters(self, client: int) -> list[torch.nn.Parameter]:
        name = adapter_name(client)
        return [
            layer_part[name].weight
            for layer in lora_layers(self.model).values()
            for layer_part in (layer.lora_A, layer.lora_B)
        ]

    def activate(self, client: int) -> None:
        """Route the forward pass (and gradients) through one client's adapter."""
        self.model.set_adapter(adapter_name(client))

    def base_fingerprint(self) -> str:
        """A hash of the frozen base weights, to refuse resuming onto a different base."""
        digest = hashlib.sha256()
        for name, parameter in sorted(self.model.named_parameters()):
            if "lora_" not in name:
                digest.update(name.encode())
                digest.update(repr(float(parameter.detach().double().sum())).encode())
        return digest.hexdigest()[:16]

    # --- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        rounds = self.trainer.max_epochs if self.trainer and self.trainer.max_epochs else 1
        local_steps = getattr(self.trainer.datamodule, "local_steps", 1) if self.trainer else 1
        factor = functools.partial(
            lr_factor,
            schedule=self.hparams.lr_schedule,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=max(1, rounds * local_steps),
        )
        for client in range(self.num_clients):
            optimizer = torch.optim.AdamW(
                self.client_parameters(client),
                lr=self.hparams.learning_rate,
                weight_decay=self.hparams.weight_decay,
            )
            optimizers.append(optimizer)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, factor))
        return optimizers, schedulers

    def on_train_epoch_start(self) -> None:
        # Dropout and any other randomness depend only on (seed, round): resumes replay exactly.
        seed = getattr(self.trainer.datamodule, "seed", 0)
        torch.manual_seed(seed * 7_919 + self.current_epoch)

    def training_step(
        self, batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], batch_idx: int
    ) -> torch.Tensor:
        """One local step of one client, or of a group of clients (a list of their batches)."""
        batches = batch if isinstance(batch, list) else [batch]
        clients = [int(b["client"]) for b in batches]
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()  # one per client
        if len(batches) == 1:
            self.activate(clients[0])
            losses = [completion_step(self.model, batches[0]).loss]
            self.manual_backward(losses[0])
        else:
            if self.hparams.pack_client_groups and not self._packing_checked:
                self._packing_checked = check_packing(self.model, batches)
            with grouped_lora(self.model, [adapter_name(k) for k in clients]) as packed:
                packing = packed if self.hparams.pack_client_groups else None
                steps = grouped_completion_steps(self.model, batches, packing)
                losses = [step.loss for step in steps]
                self.manual_backward(torch.stack(losses).sum())
        for client in clients:
            if self.hparams.max_grad_norm:
                self.clip_gradients(
                    optimizers[client],
                    gradient_clip_val=self.hparams.max_grad_norm,
                    gradient_clip_algorithm="norm",
                )
            optimizers[client].step()
            # Free the gradients now rather than at the client's next step: kept, every client's
            # gradients (allocated among the activations) fragment the heap, and the peak memory
            # grew 4 MiB per client at K = 64 (benchmarks/federation_speed.py).
            optimizers[client].zero_grad()
            schedulers[client].step()
        return torch.stack(losses).detach().mean()

    # --- evaluation -------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._metrics = ClientMetrics(self.num_clients)
        self._probe_metrics = ClientMetrics(self.num_clients)

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The data module's second loader, when there is one, holds attack probes.
        self._evaluate(batch, self._probe_metrics if dataloader_idx == 1 else self._metrics)

    def on_validation_epoch_end(self) -> None:
        self.client_metrics = self._metrics.compute()
        for metrics, probe, probed in zip(
            self.client_metrics,
            self._probe_metrics.compute(),
            self._probe_metrics.seen(),
            strict=True,
        ):
            if probed:
                metrics["attack_success"] = probe["exact_match"]

    def on_test_epoch_start(self) -> None:
        self._metrics = ClientMetrics(self.num_clients)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        self.test_client_metrics = self._metrics.compute()

    @torch.no_grad()
    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: ClientMetrics | None = None):
        client = int(batch["client"])
        self.activate(client)
        (metrics or self._metrics).update(client, completion_step(self.model, batch))

    # --- checkpoints and adapters -----------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if "lora_" not in k]:
            del state[key]
        checkpoint["base_fingerprint"] = self.base_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("base_fingerprint")
        if saved is not None and saved != self.base_fingerprint():
            raise ValueError(
                "the checkpoint was trained on a different base model (fingerprint "
                f"{saved} vs {self.base_fingerprint()}); resume with the same base config"
            )

    def save_adapters(self, directory: Path) -> list[Path]:
        """Each client's adapter in peft format: ``directory/client_<k>/``.

        ``base_model_name_or_path`` in each ``adapter_config.json`` is ``base_reference`` (a hub
        name, or the base source's class and settings), not this machine's cache path.
        """
        directory.mkdir(parents=True, exist_ok=True)
        names = [adapter_name(k) for k in range(self.num_clients)]
        self.model.save_pretrained(str(directory), selected_adapters=names)
        for name in names:
            config_file = directory / name / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = self.base_reference
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        return [directory / name for name in names]


def base_reference(source: BaseModelSource) -> str:
    """A reference to the base that means the same on another machine.

    A hub name stays as given; any other source is named by its class and its JSON settings,
    with paths reduced to their last part (an absolute path of this machine is useless
    elsewhere).
    """
    if getattr(source, "local", True) is False and isinstance(source.name_or_path, str):
        return source.name_or_path
    settings = {}
    for key, value in sorted(vars(source).items()):
        if key.startswith("_"):
            continue
        if isinstance(value, Path) or (isinstance(value, str) and Path(value).is_absolute()):
            value = Path(value).name
        try:
            json.dumps(value)
        except TypeError:
            continue
        settings[key] = value
    cls = type(source)
    return f"{cls.__module__}.{cls.__qualname__}({json.dumps(settings, sort_keys=True)})"


def lr_factor(step: int, schedule: LrSchedule, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier after ``step`` local steps: linear warm-up, then constant or
    cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_lora_model(
    base_model: BaseModelSource,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str] | str | None,
    adapter: str,
) -> tuple[PeftModel, LoraConfig]:
    """The frozen base with one LoRA adapter named ``adapter``, and the adapter's config.

    ``target_modules`` are leaf names of linear layers (``["q_proj", "v_proj"]`` by default) or
    peft's ``"all-linear"`` (every linear layer but the output head).
    """
    target_modules = target_modules or ["q_proj", "v_proj"]
    base = base_model.build().train()  # from_pretrained returns eval mode
    check_target_modules(base, target_modules)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        bias="none",
    )
    return get_peft_model(base, config, adapter_name=adapter), config


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """Every LoRA target must name at least one module; the error lists what exists."""
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            raise LoraTargetError(
                f"target_modules must be a list of module names or {ALL_LINEAR!r}, "
                f"got {target_modules!r}"
            )
        return
    leaf_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    missing = [t for t in target_modules if t not in leaf_names]
    if missing:
        raise LoraTargetError(
            f"LoRA target module(s) {missing} are not in the base model; linear modules it has: "
            f"{', '.join(sorted(leaf_names))}"
        )
