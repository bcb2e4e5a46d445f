"""Training several clients through the shared base in one pass, measured against one at a time.

    python benchmarks/batched_clients.py                       # K = 16, all three models
    python benchmarks/batched_clients.py --models text-copy    # one of them

The federation steps one client at a time: ``activate(k)``, forward, backward, clip, AdamW.
The grouped pass (``clair_lightning.federation.grouped``) concatenates the K clients' batches,
runs the frozen base once over all of them, and adds each client's LoRA term on its own slice
with two ``bmm`` per LoRA layer (``x_k A_kᵀ B_kᵀ · scaling`` for ``x`` viewed as
``(K, n, d_in)``); the factors are stacked from the clients' own peft parameters, so the
gradients land on those parameters, and each client's clipping and AdamW step stay as they are.
The loss is the sum of the clients' mean losses, so each client's gradient is that of its own
loss; the script asserts it equals the one-at-a-time gradient (and the losses are equal) before
timing. Batches of different lengths are right-padded to the longest (attention mask 0, label
-100). Models:

* ``text-copy``: the recipe's copy-pretrained base and batches (``configs/text_copy.yaml``:
  hidden 64, 2 layers, LoRA r = 8 on q, k, v, o, 16 examples per step);
* ``llama-256``: a hidden-256 4-layer Llama (fresh weights), r = 8 on q and v, 16 x 16 tokens;
* ``smollm2``: SmolLM2-135M-Instruct from ``clair prepare smollm2`` (``configs/chat_qa.yaml``:
  r = 4 on q and v, 2 sequences of at most 32 tokens; clients' batches of 24 to 32 tokens,
  rows right-padded within), skipped when not prepared.

CPU seconds of the process (run with ``OMP_NUM_THREADS=1``), median over repeats, for the
forward + backward and for the whole training step (with the K clips and AdamW steps).
``text-copy-fit`` trains the recipe's federation (``configs/text_copy.yaml`` at K clients) with
Lightning, one client at a time and with ``client_group_size`` K/2 and K, and compares the CPU
seconds of a round's local steps and the adapters it ends with.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from clair_lightning.federation import ConfigBase, FederatedLoRAModule, PretrainedBase
from clair_lightning.federation.adapters import lora_layers, read_update
from clair_lightning.federation.grouped import grouped_completion_steps, grouped_lora
from clair_lightning.federation.module import adapter_name
from clair_lightning.federation.task import completion_step
from clair_lightning.prepare import SMOLLM2 as SMOLLM2_RELEASE
from clair_lightning.prepare import models_root
from clair_lightning.recipes.text_copy import PretrainedCopyBase, TextCopyDataModule

LLAMA_256 = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}
TEXT_COPY = Path(__file__).resolve().parent.parent / "configs" / "text_copy.yaml"
SMOLLM2 = models_root() / SMOLLM2_RELEASE["folder"]  # where `clair prepare smollm2` puts it


def text_copy_setup(clients: int):
    """The recipe's base, LoRA settings and round-1 first batches (configs/text_copy.yaml)."""
    recipe = yaml.safe_load(TEXT_COPY.read_text())
    model = recipe["model"]
    module = FederatedLoRAModule(
        PretrainedCopyBase(**model["base_model"]["init_args"]),
        num_clients=clients,
        lora_rank=model["lora_rank"],
        lora_alpha=model["lora_alpha"],
        target_modules=model["target_modules"],
    )
    data = TextCopyDataModule(**{**recipe["data"]["init_args"], "num_clients": clients})
    batches = []
    for client in range(clients):
        batch = next(iter(data.client_round_dataloader(client, 0)))
        batches.append({key: value for key, value in batch.items() if key != "client"})
    return module, batches


def random_batches(clients, rows, length, vocabulary, generator, padded):
    """Random token batches, the first quarter of each row prompt (label -100); with ``padded``
    each client's batch has its own length (3/4 to all of ``length``) and each row a random
    real length within it, right-padded (attention mask 0, label -100)."""
    batches = []
    for _ in range(clients):
        own = int(torch.randint(length * 3 // 4, length + 1, (), generator=generator))
        own = own if padded else length
        input_ids = torch.randint(0, vocabulary, (rows, own), generator=generator)
        lengths = (
            torch.randint(own // 2, own + 1, (rows,), generator=generator)
            if padded
            else torch.full((rows,), own)
        )
        attention_mask = (torch.arange(own) < lengths[:, None]).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : own // 4] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def llama_256_setup(clients: int):
    torch.manual_seed(0)
    module = FederatedLoRAModule(
        ConfigBase(LLAMA_256), num_clients=clients, lora_rank=8, target_modules=["q_proj", "v_proj"]
    )
    generator = torch.Generator().manual_seed(1)
    return module, random_batches(clients, 16, 16, 64, generator, padded=False)


def smollm2_setup(clients: int):
    module = FederatedLoRAModule(
        PretrainedBase(str(SMOLLM2)),
        num_clients=clients,
        lora_rank=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    generator = torch.Generator().manual_seed(1)
    vocabulary = module.model.config.vocab_size
    return module, random_batches(clients, 2, 32, vocabulary, generator, padded=True)


SETUPS = {"text-copy": text_copy_setup, "llama-256": llama_256_setup, "smollm2": smollm2_setup}
REPEATS = {"text-copy": 21, "llama-256": 7, "smollm2": 3}  # about 10, 15 and 60 s of CPU


def one_at_a_time(module, batches):
    losses = []
    for client, batch in enumerate(batches):
        module.activate(client)
        loss = completion_step(module.model, batch).loss
        loss.backward()
        losses.append(loss.detach())
    return losses


def grouped(module, batches):
    adapters = [adapter_name(k) for k in range(len(batches))]
    with grouped_lora(module.model, adapters):
        steps = grouped_completion_steps(module.model, batches)
        torch.stack([step.loss for step in steps]).sum().backward()
    return [step.loss.detach() for step in steps]


def measure(name: str, clients: int, repeats: int) -> None:
    module, batches = SETUPS[name](clients)
    model = module.model
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.02)  # nonzero B, so A gets gradients too
    parameters = [module.client_parameters(k) for k in range(clients)]
    optimizers = [torch.optim.AdamW(p, lr=1e-3) for p in parameters]

    def step(path):
        for optimizer in optimizers:
            optimizer.zero_grad()
        start = time.process_time()
        losses = path(module, batches)
        backward = time.process_time()
        for client_parameters, optimizer in zip(parameters, optimizers, strict=True):
            torch.nn.utils.clip_grad_norm_(client_parameters, 1.0)
            optimizer.step()
        return losses, backward - start, time.process_time() - start

    def gradients():
        return [[p.grad.clone() for p in client] for client in parameters]

    model.train()
    torch.manual_seed(0)
    reference_losses = one_at_a_time(module, batches)
    reference = gradients()
    for optimizer in optimizers:
        optimizer.zero_grad()
    losses = grouped(module, batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(reference_losses))
    for ours, theirs in zip(gradients(), reference, strict=True):
        for g, h in zip(ours, theirs, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)

    separate, together = [], []
    for _ in range(repeats):
        separate.append(step(one_at_a_time)[1:])
        together.append(step(grouped)[1:])
    one_fb, one_step = (statistics.median(t[i] for t in separate) for i in (0, 1))
    both_fb, both_step = (statistics.median(t[i] for t in together) for i in (0, 1))
    lengths = sorted({batch["input_ids"].shape[1] for batch in batches})
    span = f"{lengths[0]}-{lengths[-1]}" if len(lengths) > 1 else f"{lengths[0]}"
    shape = f"{len(batches[0]['input_ids'])}x{span}"
    print(
        f"{name}: K = {clients} clients x {shape} tokens, {len(lora_layers(model))} LoRA layers, "
        f"{torch.get_num_threads()} threads, {repeats} repeats (CPU s, median)"
    )
    print(
        f"  forward+backward: one at a time {one_fb:.3f} s, grouped {both_fb:.3f} s, "
        f"ratio {one_fb / both_fb:.2f}"
    )
    print(
        f"  training step:    one at a time {one_step:.3f} s, grouped {both_step:.3f} s, "
        f"ratio {one_step / both_step:.2f} (goal >= 1.5); losses and gradients equal per client"
    )
    paired = sorted(one[1] / both[1] for one, both in zip(separate, together, strict=True))
    print(
        f"  training step ratio of each repeat (the two paths side by side): {paired[0]:.2f} "
        f"to {paired[-1]:.2f}"
    )


class RoundTimer(pl.Callback):
    """CPU seconds of each round's local steps (epoch start to the end of its last batch)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.seconds.append(time.process_time() - self._start)


def federation_rounds(clients: int, group_size: int, rounds: int):
    """The text-copy recipe's federation trained ``rounds`` rounds by Lightning (no
    aggregation): the median CPU seconds of a round's local steps, and the final adapters."""
    recipe = yaml.safe_load(TEXT_COPY.read_text())
    settings = dict(recipe["model"])
    base = PretrainedCopyBase(**settings.pop("base_model")["init_args"])
    pl.seed_everything(0, verbose=False)
    module = FederatedLoRAModule(
        base, num_clients=clients, client_group_size=group_size, **settings
    )
    data = TextCopyDataModule(**{**recipe["data"]["init_args"], "num_clients": clients})
    timer = RoundTimer()
    trainer = pl.Trainer(
        max_epochs=rounds,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    adapters = [read_update(module.model, adapter_name(k)) for k in range(clients)]
    return statistics.median(timer.seconds), adapters


def measure_federation(clients: int, rounds: int, group_sizes: list[int]) -> None:
    one, reference = federation_rounds(clients, 1, rounds)
    print(
        f"text-copy-fit: the recipe's federation in Lightning, K = {clients}, {rounds} rounds of "
        f"10 local steps (no aggregation), {torch.get_num_threads()} threads (CPU s per round, "
        f"median)\n  one at a time {one:.3f} s"
    )
    for group_size in group_sizes:
        both, adapters = federation_rounds(clients, group_size, rounds)
        for ours, theirs in zip(adapters, reference, strict=True):
            for name, (b, a) in theirs.items():
                product = ours[name][0] @ ours[name][1]
                torch.testing.assert_close(product, b @ a, rtol=1e-3, atol=1e-5)
        print(
            f"  client_group_size = {group_size}: {both:.3f} s, ratio {one / both:.2f} "
            f"(goal >= 1.5); adapters equal after {rounds} rounds"
        )


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="timed steps per path (default per model)")
    choices = [*SETUPS, "text-copy-fit"]
    parser.add_argument("--models", nargs="+", choices=choices, default=choices)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of text-copy-fit")
    parser.add_argument("--group-sizes", type=int, nargs="+", help="text-copy-fit (default K/2, K)")
    args = parser.parse_args()
    for name in args.models:
        if name == "text-copy-fit":
            sizes = args.group_sizes or [args.clients // 2, args.clients]
            measure_federation(args.clients, args.rounds, sizes)
            continue
        if name == "smollm2" and not (SMOLLM2 / "config.json").is_file():
            print(f"smollm2: skipped ({SMOLLM2} missing; run `clair prepare smollm2`)")
            continue
        measure(name, args.clients, args.repeats or REPEATS[name])


if __name__ == "__main__":
    main()
