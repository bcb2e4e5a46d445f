"""Training several clients through the shared base in one pass, measured against one at a time.

    python benchmarks/batched_clients.py            # K = 16, hidden-256 4-layer Llama, r = 8

The federation steps one client at a time. peft can route each example of one batch through
its own adapter (``adapter_names=``), but refuses that in training mode; in eval mode (LoRA
dropout off, which the recipes use anyway) gradients flow to every adapter of the batch. This
measures one forward/backward of K clients' batches (16 sequences of 16 tokens each) both
ways, checks that each client's gradient is the same (the mixed batch's mean loss is scaled by
K), and reports CPU seconds (run with ``OMP_NUM_THREADS=1``) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clair_lightning.federation import ConfigBase, FederatedLoRAModule
from clair_lightning.federation.module import adapter_name

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def lora_gradients(model, client):
    name = adapter_name(client)
    return [p.grad.clone() for n, p in model.named_parameters() if f".{name}." in n]


def one_at_a_time(model, batches):
    model.eval()
    for client, batch in enumerate(batches):
        model.set_adapter(adapter_name(client))
        model(input_ids=batch, labels=batch).loss.backward()


def mixed(model, batches):
    model.eval()
    names = [adapter_name(k) for k, batch in enumerate(batches) for _ in range(len(batch))]
    inputs = torch.cat(batches)
    loss = model(input_ids=inputs, labels=inputs, adapter_names=names).loss
    (loss * len(batches)).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = FederatedLoRAModule(
        ConfigBase(LLAMA),
        num_clients=args.clients,
        lora_rank=8,
        target_modules=["q_proj", "v_proj"],
    )
    model = module.model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)  # nonzero B, so A gets gradients too
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (16, 16), generator=generator) for _ in range(args.clients)]

    def run(step):
        for parameter in model.parameters():
            parameter.grad = None
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        start = time.process_time()
        step(model, batches)
        return time.process_time() - start

    separate, together = [], []
    for _ in range(args.repeats):
        separate.append(run(one_at_a_time))
        reference = [lora_gradients(model, k) for k in range(args.clients)]
        together.append(run(mixed))
        for k in range(args.clients):
            for ours, theirs in zip(lora_gradients(model, k), reference[k], strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    one, both = statistics.median(separate), statistics.median(together)
    print(
        f"K = {args.clients} clients x 16 sequences x 16 tokens, hidden-256 4-layer Llama, LoRA "
        f"r = 8 on q and v, {torch.get_num_threads()} threads, {args.repeats} repeats (CPU s)"
    )
    print(f"  one client at a time: {one:.3f} s;  one mixed-adapter pass: {both:.3f} s")
    print(f"  throughput ratio {one / both:.2f} (goal >= 1.5); gradients equal per client")


if __name__ == "__main__":
    main()
