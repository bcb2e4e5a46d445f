"""Training several clients through the shared base in one pass, measured against one at a time.

    python benchmarks/batched_clients.py                       # K = 16, every model
    python benchmarks/batched_clients.py --models text-copy    # one of them
    python benchmarks/batched_clients.py --breakdown --models smollm2  # where a step goes

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
  rows right-padded within), skipped when not prepared; ``smollm2-full``: the same with every
  row 32 real tokens (no padding anywhere: both paths do the same token-work).

Where batches are padded, a third path, ``packed`` (``grouped_completion_steps(..., packed)``),
packs the group's sequences without their padding into rows of one to two times the longest
length (``packed_rows``; position ids restart per sequence, so attention stays within each one).
On every path the LM head runs at the target positions only (``logits_to_keep``). Printed per
path: the tokens the base computes, CPU seconds of the process (median over repeats) for the
forward + backward and for the whole training step (with the K clips and AdamW steps) and its
wall-clock, the share of the matrix products in one profiled step with the GFLOP/s the base's
linear layers reach (4 FLOPs per weight and token: forward and input gradient; the head's at
the targets), and the peak resident memory of one step above the loaded model, each path in a
process of its own.
``text-copy-fit`` trains the recipe's federation (``configs/text_copy.yaml`` at K clients) with
Lightning, one client at a time and with ``client_group_size`` K/2 and K, and compares the CPU
seconds of a round's local steps and the adapters it ends with.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from clair_lightning.federation import ConfigBase, FederatedLoRAModule, PretrainedBase
from clair_lightning.federation.adapters import lora_layers, read_update
from clair_lightning.federation.grouped import (
    grouped_completion_steps,
    grouped_lora,
    packed_rows,
)
from clair_lightning.federation.module import adapter_name
from clair_lightning.federation.task import completion_step, predicts_target
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


def smollm2_setup(clients: int, padded: bool = True):
    module = FederatedLoRAModule(
        PretrainedBase(str(SMOLLM2)),
        num_clients=clients,
        lora_rank=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
    )
    generator = torch.Generator().manual_seed(1)
    vocabulary = module.model.config.vocab_size
    return module, random_batches(clients, 2, 32, vocabulary, generator, padded=padded)


SETUPS = {
    "text-copy": text_copy_setup,
    "llama-256": llama_256_setup,
    "smollm2": smollm2_setup,
    "smollm2-full": functools.partial(smollm2_setup, padded=False),
}
REPEATS = {"text-copy": 21, "llama-256": 7, "smollm2": 3, "smollm2-full": 3}


def one_at_a_time(module, batches):
    losses = []
    for client, batch in enumerate(batches):
        module.activate(client)
        loss = completion_step(module.model, batch).loss
        loss.backward()
        losses.append(loss.detach())
    return losses


def grouped(module, batches, packing=False):
    adapters = [adapter_name(k) for k in range(len(batches))]
    with grouped_lora(module.model, adapters) as packed:
        steps = grouped_completion_steps(module.model, batches, packed if packing else None)
        torch.stack([step.loss for step in steps]).sum().backward()
    return [step.loss.detach() for step in steps]


def packed(module, batches):
    return grouped(module, batches, packing=True)


PATHS = {"one at a time": one_at_a_time, "grouped": grouped, "packed": packed}


def prepared(name: str, clients: int):
    """The model with nonzero ``B`` (so ``A`` gets gradients too), batches and AdamW per client;
    the same in every process (seeded)."""
    torch.manual_seed(0)
    module, batches = SETUPS[name](clients)
    with torch.no_grad():
        for parameter_name, parameter in module.model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.02)
    parameters = [module.client_parameters(k) for k in range(clients)]
    optimizers = [torch.optim.AdamW(p, lr=1e-3) for p in parameters]
    module.model.train()

    def step(path):
        """One local step of every client: CPU s of forward+backward and of the whole step, and
        the whole step's wall-clock seconds."""
        for optimizer in optimizers:
            optimizer.zero_grad()
        start, wall = time.process_time(), time.perf_counter()
        path(module, batches)
        backward = time.process_time()
        for client_parameters, optimizer in zip(parameters, optimizers, strict=True):
            torch.nn.utils.clip_grad_norm_(client_parameters, 1.0)
            optimizer.step()
        return backward - start, time.process_time() - start, time.perf_counter() - wall

    return module, batches, parameters, step


def tokens_through_base(path: str, batches) -> int:
    """Token positions the base computes per step on each path (padding included)."""
    if path == "one at a time":
        return sum(batch["input_ids"].numel() for batch in batches)
    length = max(batch["input_ids"].shape[1] for batch in batches)
    if path == "grouped":
        return sum(len(batch["input_ids"]) for batch in batches) * length
    lengths = [int(n) for batch in batches for n in batch["attention_mask"].sum(1)]
    layout, row_length = packed_rows(lengths, length)
    return len(layout) * row_length


def linear_weights(model) -> tuple[int, int]:
    """Weights of the base's linear layers (the LoRA factors excluded) below the LM head, and of
    the head: the layers run at every token position, the head at the targets only."""
    head = model.get_output_embeddings()
    layers = sum(
        layer.weight.numel()
        for name, layer in model.named_modules()
        if isinstance(layer, torch.nn.Linear) and "lora_" not in name and layer is not head
    )
    return layers, head.weight.numel()


def matrix_product_share(step, path) -> float:
    """The share of the matrix products (mm, bmm, addmm) in the op time of one profiled step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(path)
    events = profile.key_averages()
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS)
    return products / sum(e.self_cpu_time_total for e in events)


MATRIX_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm"}


def step_memory(name: str, clients: int, path: str) -> float:
    """MiB of peak resident memory above the prepared model during one training step of
    ``path``, in a process of its own (the heap keeps what a previous path freed)."""
    module, _, _, step = prepared(name, clients)
    with torch.no_grad():  # page in the weights (the safetensors are mapped, not yet read)
        sum(float(parameter.sum()) for parameter in module.model.parameters())
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    step(PATHS[path])
    return (_status("VmHWM") - rss) / 1024


def _status(field: str) -> int:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1])  # kB


def measure(name: str, clients: int, repeats: int) -> None:
    module, batches, parameters, step = prepared(name, clients)
    padding = any(bool((batch["attention_mask"] == 0).any()) for batch in batches)
    paths = list(PATHS) if padding else ["one at a time", "grouped"]

    def gradients():
        return [[p.grad.clone() for p in client] for client in parameters]

    torch.manual_seed(0)
    module.model.zero_grad()
    reference_losses = torch.stack(one_at_a_time(module, batches))
    reference = gradients()
    for path in paths[1:]:
        module.model.zero_grad()
        torch.testing.assert_close(torch.stack(PATHS[path](module, batches)), reference_losses)
        for ours, theirs in zip(gradients(), reference, strict=True):
            for g, h in zip(ours, theirs, strict=True):
                # float32 rounding is relative to a tensor's scale, not to each entry's
                torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4 * float(h.abs().max()))

    times = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            times[path].append(step(PATHS[path]))
    lengths = sorted({batch["input_ids"].shape[1] for batch in batches})
    span = f"{lengths[0]}-{lengths[-1]}" if len(lengths) > 1 else f"{lengths[0]}"
    shape = f"{len(batches[0]['input_ids'])}x{span}"
    print(
        f"{name}: K = {clients} clients x {shape} tokens, {len(lora_layers(module.model))} LoRA "
        f"layers, {torch.get_num_threads()} threads, {repeats} repeats (CPU s, median)"
    )
    tokens = {path: tokens_through_base(path, batches) for path in paths}
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    targets = sum(int(predicts_target(batch["labels"]).sum()) for batch in batches)
    print(
        "  tokens through the base: "
        + ", ".join(f"{path} {count}" for path, count in tokens.items())
        + f" (real {real}, targets {targets})"
    )
    rows = ((0, "forward+backward"), (1, "training step   "), (2, "step wall-clock "))
    for index, label in rows:
        one = statistics.median(t[index] for t in times["one at a time"])
        parts = [f"one at a time {one:.3f} s"]
        for path in paths[1:]:
            ours = statistics.median(t[index] for t in times[path])
            parts.append(f"{path} {ours:.3f} s, ratio {one / ours:.2f}")
        goal = " (goal >= 1.5)" if index == 1 else ""
        print(f"  {label}: " + "; ".join(parts) + goal)
    for path in paths[1:]:
        paired = sorted(
            one[1] / ours[1] for one, ours in zip(times["one at a time"], times[path], strict=True)
        )
        print(f"  {path}: training step ratio of each repeat {paired[0]:.2f} to {paired[-1]:.2f}")
    print("  losses and gradients equal per client on every path")
    layers, head = linear_weights(module.model)
    for path in paths:  # the profiler's op times are wall-clock: only their shares are used
        share = matrix_product_share(step, PATHS[path])
        products = share * statistics.median(t[0] for t in times[path])
        flops = 4 * (tokens[path] * layers + targets * head)  # forward and input gradient
        print(
            f"  {path}: matrix products {share:.0%} of the ops' time (one profiled step), "
            f"{products:.2f} CPU s of the forward+backward, base linears at "
            f"{flops / products / 1e9:.0f} GFLOP/s"
        )
    memory = [
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-of",
                path,
                "--models",
                name,
                "--clients",
                str(clients),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        for path in paths
    ]
    print(
        "  peak memory of one step above the loaded model (own process each): "
        + ", ".join(f"{path} {float(mib):.0f} MiB" for path, mib in zip(paths, memory, strict=True))
    )


def breakdown(name: str, clients: int, repeats: int = 3) -> None:
    """Where one training step's CPU time goes on each path: each op's share of one profiled
    step (ranges mark the clipping and the optimizer) times the step's unprofiled CPU seconds
    (median of ``repeats``); "not in any op" is the profiled step's wall-clock outside every op
    (Python, autograd's engine, the profiler)."""
    module, batches, parameters, _ = prepared(name, clients)
    optimizers = [torch.optim.AdamW(p, lr=1e-3) for p in parameters]
    head = module.model.get_output_embeddings().weight.shape[0]
    rank = module.hparams.lora_rank
    padding = any(bool((batch["attention_mask"] == 0).any()) for batch in batches)
    paths = list(PATHS) if padding else ["one at a time", "grouped"]
    categories = (  # (row, test on an op's name and its first two inputs' dimensions)
        ("LM-head products", lambda op, dims: op in MATRIX_PRODUCTS and head in dims),
        ("LoRA products", lambda op, dims: op in MATRIX_PRODUCTS and rank in dims),
        ("base products (q, k, v, o, MLP)", lambda op, dims: op in MATRIX_PRODUCTS),
        ("attention (sdpa forward and backward)", lambda op, dims: "scaled_dot_product" in op),
        (
            "loss: log-softmax, NLL, argmax",
            lambda op, dims: any(s in op for s in ("log_softmax", "nll_loss", "argmax")),
        ),
        (
            "gathers, cat, stack (packing, LoRA stacks, RoPE)",
            lambda op, dims: op in ("aten::index", "aten::index_copy", "aten::stack", "aten::cat"),
        ),
        ("elementwise, norms, activations, copies", lambda op, dims: True),
    )

    def step(path):
        start = time.process_time()
        with torch.profiler.record_function("range: optimizer"):
            for optimizer in optimizers:
                optimizer.zero_grad()
        PATHS[path](module, batches)
        with torch.profiler.record_function("range: clipping"):
            for client_parameters in parameters:
                torch.nn.utils.clip_grad_norm_(client_parameters, 1.0)
        with torch.profiler.record_function("range: optimizer"):
            for optimizer in optimizers:
                optimizer.step()
        return time.process_time() - start

    seconds = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            seconds[path].append(step(path))
    table: dict[str, dict[str, float]] = {}
    for path in paths:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        ) as profile:
            wall = time.perf_counter()
            step(path)
            wall = time.perf_counter() - wall
        microseconds: dict[str, float] = {}
        for event in profile.events():
            if event.name.startswith("range: "):
                continue
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("range: "):
                parent = parent.cpu_parent
            if parent is not None:
                row = "AdamW steps and zero_grad" if "optimizer" in parent.name else "clipping"
            else:
                dims = [d for shape in (event.input_shapes or [])[:2] for d in (shape or [])]
                row = next(r for r, test in categories if test(event.name, dims))
            microseconds[row] = microseconds.get(row, 0.0) + event.self_cpu_time_total
        outside = max(wall * 1e6 - sum(microseconds.values()), 0.0)
        microseconds["not in any op (Python, autograd, profiler)"] = outside
        total = sum(microseconds.values())
        step_ms = statistics.median(seconds[path]) * 1e3
        for row, value in microseconds.items():
            table.setdefault(row, {})[path] = value / total * step_ms
        table.setdefault("= training step (CPU ms, unprofiled)", {})[path] = step_ms
    print(
        f"{name}: where a training step of K = {clients} goes, CPU ms (a profiled step's op "
        f"shares x the median of {repeats} unprofiled steps), {torch.get_num_threads()} threads"
    )
    print("| where | " + " | ".join(paths) + " |\n|---|" + "---|" * len(paths))
    rows = sorted((r for r in table if not r.startswith("=")), key=lambda r: -table[r][paths[0]])
    for row in [*rows, "= training step (CPU ms, unprofiled)"]:
        print(f"| {row} | " + " | ".join(f"{table[row].get(p, 0.0):.0f}" for p in paths) + " |")


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
    parser.add_argument(
        "--breakdown", action="store_true", help="where a step's time goes, per path, instead"
    )
    parser.add_argument("--memory-of", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:  # the child process of measure's memory figure
        print(step_memory(args.models[0], args.clients, args.memory_of))
        return
    for name in args.models:
        if name == "text-copy-fit":
            sizes = args.group_sizes or [args.clients // 2, args.clients]
            measure_federation(args.clients, args.rounds, sizes)
            continue
        if name.startswith("smollm2") and not (SMOLLM2 / "config.json").is_file():
            print(f"smollm2: skipped ({SMOLLM2} missing; run `clair prepare smollm2`)")
            continue
        if args.breakdown:
            breakdown(name, args.clients)
            continue
        measure(name, args.clients, args.repeats or REPEATS[name])


if __name__ == "__main__":
    main()
