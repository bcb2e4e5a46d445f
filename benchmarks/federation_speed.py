"""One round of the Lightning federation: aggregation + write-back against training, and memory.

    python benchmarks/federation_speed.py           # K = 64, K = 2 and K = 1, hidden-256 Llama
    python benchmarks/federation_speed.py --quick   # K = 8, K = 2 and K = 1

The benchmark model of the speed issue: a randomly initialised Llama (hidden 256, 4 layers,
4 heads), LoRA r = 8 on q and v (8 modules), the text-copy data (10 local steps of 16
examples per client and round), CLAIR with 30% reversed-target clients. Each K runs one round
in a fresh process; training time runs from the epoch's start to the end of its last batch,
aggregation and write-back are the callback's round-boundary work (reading the uploads,
aggregating, writing back), both in CPU seconds of the process (run with ``OMP_NUM_THREADS=1``;
the callback's own wall-clock timings are in the comment line); peak memory is ``ru_maxrss``.
K = 1 is not a federation (the module refuses it): it is one ``ClientLoRAModule`` (same base,
LoRA settings, learning rate and clipping) trained on the very batches client 0 trains in the
federation's first round and validated on client 0's validation data, the run a user makes to
fine-tune one adapter alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch

from clair_lightning.callbacks.aggregation import FederatedAggregation
from clair_lightning.federation import ClientLoRAModule, ConfigBase, FederatedLoRAModule
from clair_lightning.recipes.text_copy import TextCopyDataModule
from clair_lightning.recipes.text_copy.vocabulary import vocabulary_size

LLAMA = {
    "model_type": "llama",
    "vocab_size": vocabulary_size(24),
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainingTimer(pl.Callback):
    """CPU and wall-clock seconds from the epoch's start to the end of its last training batch
    (before aggregation), and the peak memory then."""

    def __init__(self) -> None:
        self.cpu_seconds = self.seconds = 0.0
        self.peak_before_aggregation_mib = 0.0
        self._start = self._cpu_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.seconds += time.perf_counter() - self._start
            self.cpu_seconds += time.process_time() - self._cpu_start
            self.peak_before_aggregation_mib = peak_rss_mib()


class TimedAggregation(FederatedAggregation):
    """The aggregation callback, with the CPU seconds of its round-boundary work (reading the
    uploads, aggregation, write-back)."""

    cpu_seconds = 0.0

    def _aggregate(self, trainer, pl_module, round_number):
        start = time.process_time()
        pending = super()._aggregate(trainer, pl_module, round_number)
        self.cpu_seconds += time.process_time() - start
        return pending


LORA = {"lora_rank": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATE = 0.003
TRAINER = {
    "max_epochs": 1,
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def text_copy_data(num_clients: int) -> TextCopyDataModule:
    return TextCopyDataModule(
        num_clients=num_clients,
        contaminated_fraction=0.3,
        contamination="reversed_targets",
        local_steps=10,
        batch_size=16,
        shared_pairs=3,
        private_rewrites=2,
        train_examples=32,
        val_examples=32,
        test_examples=32,
    )


def one_adapter_child() -> dict:
    """K = 1: one adapter trained alone on client 0's batches of the federation's round 1."""
    pl.seed_everything(0, verbose=False)
    module = ClientLoRAModule(ConfigBase(LLAMA), **LORA, learning_rate=LEARNING_RATE)
    data = text_copy_data(2)
    timer = TrainingTimer()
    with tempfile.TemporaryDirectory() as directory:
        trainer = pl.Trainer(
            **TRAINER, gradient_clip_val=1.0, default_root_dir=directory, callbacks=[timer]
        )
        trainer.fit(
            module,
            train_dataloaders=data.client_round_dataloader(0, 0),
            val_dataloaders=data.client_dataloader(0, "val", batch_size=data.eval_batch_size),
        )
    return {
        "K": 1,
        "threads": torch.get_num_threads(),
        "training": timer.seconds,
        "training_cpu": timer.cpu_seconds,
        "peak_before_aggregation_mib": timer.peak_before_aggregation_mib,
        "peak_rss_mib": peak_rss_mib(),
    }


def child(num_clients: int) -> dict:
    if num_clients == 1:
        return one_adapter_child()
    pl.seed_everything(0, verbose=False)
    module = FederatedLoRAModule(
        ConfigBase(LLAMA), num_clients=num_clients, **LORA, learning_rate=LEARNING_RATE
    )
    data = text_copy_data(num_clients)
    timer, aggregation = TrainingTimer(), TimedAggregation("clair")
    with tempfile.TemporaryDirectory() as directory:
        trainer = pl.Trainer(**TRAINER, default_root_dir=directory, callbacks=[timer, aggregation])
        trainer.fit(module, datamodule=data)
    record = aggregation.records[0]
    return {
        "K": num_clients,
        "threads": torch.get_num_threads(),
        "training": timer.seconds,
        "training_cpu": timer.cpu_seconds,
        "round_boundary_cpu": aggregation.cpu_seconds,
        "aggregation": record["aggregation_seconds"],
        "write_back": record["write_back_seconds"],
        "flagged": sum(client["flag"] for client in record["clients"]),
        "contaminated": sum(client["contaminated"] for client in record["clients"]),
        "peak_before_aggregation_mib": timer.peak_before_aggregation_mib,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 8 instead of 64")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        libraries = peak_rss_mib()  # torch, Lightning, transformers, peft imported, nothing built
        print(json.dumps({**child(args.child), "libraries_mib": libraries}))
        return
    runs = []
    for num_clients in (8 if args.quick else 64, 2, 1):
        command = [sys.executable, __file__, "--child", str(num_clients)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    print(
        "| K | training (CPU s) | aggregation + write-back (CPU s) | (aggregation + write-back) "
        "/ training | peak RSS (MiB): before aggregation, whole round | flagged |\n"
        "|---|---|---|---|---|---|"
    )
    wall = []
    for m in runs:
        wall.append(f"K = {m['K']} training {m['training']:.1f} s")
        if m["K"] == 1:
            print(
                f"| 1 (one adapter alone) | {m['training_cpu']:.1f} | – | – | "
                f"{m['peak_before_aggregation_mib']:.0f}, {m['peak_rss_mib']:.0f} | – |"
            )
            continue
        wall[-1] += f", aggregation {m['aggregation']:.2f} s, write-back {m['write_back']:.2f} s"
        share = m["round_boundary_cpu"] / m["training_cpu"]
        print(
            f"| {m['K']} | {m['training_cpu']:.1f} | {m['round_boundary_cpu']:.2f} | "
            f"**{share:.3f}** | {m['peak_before_aggregation_mib']:.0f}, {m['peak_rss_mib']:.0f} | "
            f"{m['flagged']} of {m['K']} ({m['contaminated']} contaminated) |"
        )
    print(f"<!-- wall-clock: {'; '.join(wall)} -->")
    largest, pair, alone = runs
    print(
        f"\npeak memory K = {largest['K']} / K = 1: "
        f"**{largest['peak_rss_mib'] / alone['peak_rss_mib']:.2f}** (goal <= 1.5), "
        f"K = {largest['K']} / K = 2: {largest['peak_rss_mib'] / pair['peak_rss_mib']:.2f} "
        f"({largest['threads']} threads)"
    )
    print(
        "above the libraries' memory (RSS after the imports, "
        f"{alone['libraries_mib']:.0f} MiB at K = 1): K = {largest['K']} "
        f"{largest['peak_rss_mib'] - largest['libraries_mib']:.0f} MiB, "
        f"K = 1 {alone['peak_rss_mib'] - alone['libraries_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
