"""Clients stepped in groups through one base pass: same batches, gradients, flags and metrics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clair_lightning.cli import main, run
from clair_lightning.federation import ConfigBase, FederatedLoRAModule, adapter_name, task
from clair_lightning.federation import data as federation_data
from clair_lightning.federation import module as federation_module
from clair_lightning.federation.data import RoundBatchSampler
from clair_lightning.federation.grouped import (
    check_packing,
    grouped_completion_steps,
    grouped_lora,
)
from clair_lightning.federation.task import completion_step, keeps_target_logits

from .test_federation import TINY_LLAMA

SMOKE = "configs/text_copy_smoke.yaml"


def _batch(length: int, real_lengths: list[int], generator) -> dict:
    input_ids = torch.randint(0, 32, (len(real_lengths), length), generator=generator)
    attention_mask = (torch.arange(length) < torch.tensor(real_lengths)[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize(
    ("checkpointing", "packing"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_grouped_pass_gives_each_client_the_loss_and_gradient_of_its_own_pass(
    checkpointing, packing
):
    torch.manual_seed(0)
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=4, lora_rank=4)
    if checkpointing:  # the forward is re-run inside backward: the grouped terms must be too
        module.model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        assert module.model.base_model.model.is_gradient_checkpointing
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # clients differ, and A gets gradients too
    generator = torch.Generator().manual_seed(1)
    clients = [2, 0, 3]  # out of order, client 1 left out
    batches = [  # different lengths: the grouped pass pads to 12 with masks
        _batch(12, [12, 7, 12], generator),
        _batch(9, [9, 9, 4], generator),
        _batch(12, [5, 12, 10], generator),
    ]
    expected_losses, expected_gradients = [], []
    for client, batch in zip(clients, batches, strict=True):
        module.activate(client)
        module.model.zero_grad()
        loss = completion_step(module.model, batch).loss
        loss.backward()
        expected_losses.append(loss.detach())
        expected_gradients.append([p.grad.clone() for p in module.client_parameters(client)])

    module.model.zero_grad(set_to_none=True)
    with grouped_lora(module.model, [adapter_name(k) for k in clients]) as packed:
        steps = grouped_completion_steps(module.model, batches, packed if packing else None)
        torch.stack([step.loss for step in steps]).sum().backward()
    if packing:  # 9 sequences, 80 tokens: 4 rows of 21 (rows of the longest, 12, take 96)
        assert packed.order is not None and sorted(packed.order.tolist()) == list(range(4 * 21))
        assert packed.counts == [35, 22, 27]  # the first client's 31 tokens and 4 of padding

    torch.testing.assert_close(torch.stack([s.loss for s in steps]), torch.stack(expected_losses))
    for client, expected in zip(clients, expected_gradients, strict=True):
        for ours, theirs in zip(module.client_parameters(client), expected, strict=True):
            torch.testing.assert_close(ours.grad, theirs, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in module.client_parameters(1))
    assert not torch.allclose(expected_gradients[0][0], expected_gradients[1][0])
    # peft is left as before: one active adapter, a plain pass equals that adapter's own
    module.activate(0)
    with torch.no_grad():
        assert float(completion_step(module.model, batches[1]).loss) == pytest.approx(
            float(expected_losses[1]), rel=1e-6
        )


def test_groups_hold_each_clients_own_batches_step_by_step():
    sizes, clients = [10, 7, 12, 9, 8], [0, 1, 3, 4]

    def batches(group_size):
        sampler = RoundBatchSampler(sizes, 3, 4, 0, lambda: 1, clients, group_size=group_size)
        return len(sampler), list(sampler)

    count, single = batches(1)
    assert count == len(single) == 12
    count, grouped = batches(3)
    assert count == len(grouped) == 6  # clients (0, 1, 3) then (4,), 3 local steps each
    assert [sorted({k for k, _ in batch}) for batch in grouped] == [[0, 1, 3]] * 3 + [[4]] * 3
    for client in clients:
        own = [[key for key in batch if key[0] == client] for batch in grouped]
        assert [b for b in own if b] == [b for b in single if b[0][0] == client]


def _summary(tmp_path, overrides=()):
    folder = run(SMOKE, ["--run.output_dir", str(tmp_path), *overrides])
    return folder, json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("packing", [False, True])
def test_federation_in_groups_gives_the_flags_metrics_and_adapters_of_one_at_a_time(
    tmp_path, monkeypatch, packing
):
    groups, checks = [], []

    def counted(model, batches, packed):
        groups.append(([int(b["client"]) for b in batches], packed is not None))
        return grouped_completion_steps(model, batches, packed)

    def counted_check(model, batches):
        checks.append(check_packing(model, batches))
        return checks[-1]

    single_folder, single = _summary(tmp_path / "single")
    monkeypatch.setattr(federation_module, "grouped_completion_steps", counted)
    monkeypatch.setattr(federation_module, "check_packing", counted_check)
    options = ["--model.client_group_size", "3", "--model.pack_client_groups", str(packing)]
    grouped_folder, grouped = _summary(tmp_path / "grouped", options)

    # 4 clients in groups (0, 1, 2) and (3,): 2 rounds x 3 local steps of the group of three
    assert groups == [([0, 1, 2], packing)] * 6
    assert checks == ([True] if packing else [])  # once, before the first packed step, passed
    assert len(single["rounds"]) == len(grouped["rounds"]) == 2
    for ours, theirs in zip(grouped["rounds"], single["rounds"], strict=True):
        assert ours["detection"] == pytest.approx(theirs["detection"], abs=1e-6)
        for client_ours, client_theirs in zip(ours["clients"], theirs["clients"], strict=True):
            assert client_ours["flag"] == client_theirs["flag"]
            assert client_ours["score"] == pytest.approx(client_theirs["score"], rel=1e-4, abs=1e-6)
            for name, value in client_theirs["metrics"].items():
                assert client_ours["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6)
    for client in range(4):  # the peft-format adapters each run saved
        ours, theirs = (
            load_file(folder / "adapters" / f"client_{client}" / "adapter_model.safetensors")
            for folder in (grouped_folder, single_folder)
        )
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-3, atol=1e-5)


def test_packing_keeps_the_statistics_of_rows_with_no_or_one_real_token():
    torch.manual_seed(0)
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=2, lora_rank=4)
    generator = torch.Generator().manual_seed(1)
    batches = [_batch(12, [12, 0, 1], generator), _batch(9, [9, 9, 4], generator)]
    expected = []
    for client, batch in enumerate(batches):
        module.activate(client)
        expected.append(completion_step(module.model, batch))
    with grouped_lora(module.model, [adapter_name(0), adapter_name(1)]) as packed:
        steps = grouped_completion_steps(module.model, batches, packed)
    for ours, theirs in zip(steps, expected, strict=True):
        assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-6)
        for name in ("target_tokens", "correct_tokens", "exact_sequences", "sequences"):
            assert int(getattr(ours, name)) == int(getattr(theirs, name))
    assert int(steps[0].exact_sequences) == 2  # the empty and the one-token row: no targets


@pytest.mark.parametrize("path", ["alone", "grouped", "packed"])
def test_the_lm_head_runs_only_where_a_target_is_predicted(path):
    torch.manual_seed(0)
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=2, lora_rank=4)
    generator = torch.Generator().manual_seed(2)
    batches = [_batch(10, [10, 6], generator), _batch(10, [3, 8], generator)]
    batches[1]["labels"][0] = -100  # a row with no target
    with torch.no_grad():  # the reference: logits at every position, the loss of the targets
        expected = []
        for client, batch in enumerate(batches):
            module.activate(client)
            logits = module.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            expected.append(
                (
                    torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[mask]),
                    int((logits[:, :-1].argmax(-1) == labels)[mask].sum()),
                )
            )
    head_rows = []
    head = module.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: head_rows.append(out.shape[:-1]))
    try:
        steps = _steps_on(path, module, batches)
    finally:
        handle.remove()
    targets = [8 + 4, 0 + 6]  # real tokens after the 2-token prompt, minus the first
    assert head_rows == ([(n,) for n in targets] if path == "alone" else [(sum(targets),)])
    for step, (loss, correct), n in zip(steps, expected, targets, strict=True):
        assert int(step.target_tokens) == n and int(step.correct_tokens) == correct
        assert step.loss.item() == pytest.approx(loss.item(), rel=1e-6)


def _steps_on(path, module, batches):
    if path == "alone":
        steps = []
        for client, batch in enumerate(batches):
            module.activate(client)
            steps.append(completion_step(module.model, batch))
        return steps
    with grouped_lora(module.model, [adapter_name(0), adapter_name(1)]) as packed:
        return grouped_completion_steps(module.model, batches, packed if path == "packed" else None)


@pytest.mark.parametrize("path", ["alone", "grouped", "packed"])
def test_a_model_refusing_a_boolean_logits_to_keep_gets_the_same_statistics(path):
    torch.manual_seed(0)
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=2, lora_rank=4)
    assert keeps_target_logits(module.model)  # probed when the module was built
    generator = torch.Generator().manual_seed(3)
    batches = [_batch(10, [10, 6], generator), _batch(10, [3, 8], generator)]
    with torch.no_grad():
        expected = _steps_on(path, module, batches)

    llama = module.model.get_base_model()
    forward = llama.forward  # as transformers before boolean masks: indexing with one fails

    def without_masks(*args, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor):
            raise IndexError("too many indices for tensor of dimension 3")
        return forward(*args, **kwargs)

    llama.forward = without_masks
    module.train()
    task._KEEPS_TARGET_LOGITS.pop(module.model)  # probe the patched model afresh
    assert not keeps_target_logits(module.model)
    assert all(part.training for part in module.model.modules())  # the probe restored modes
    with torch.no_grad():
        steps = _steps_on(path, module, batches)
    for ours, theirs in zip(steps, expected, strict=True):
        assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-6)
        for name in ("target_tokens", "correct_tokens", "exact_sequences", "sequences"):
            assert int(getattr(ours, name)) == int(getattr(theirs, name))


def test_packing_refuses_a_model_that_attends_across_packed_sequences():
    torch.manual_seed(0)
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=2, lora_rank=4)
    module.train()
    generator = torch.Generator().manual_seed(1)
    batches = [_batch(12, [12, 0, 1], generator), _batch(9, [9, 9, 4], generator)]
    assert check_packing(module.model, batches)  # the tiny Llama honours restarted positions
    assert all(part.training for part in module.model.modules())  # its modes are restored
    assert not check_packing(module.model, [_batch(6, [6, 1], generator)])  # one usable row

    llama = module.model.get_base_model()
    forward = llama.forward  # a model that drops position ids: one causal mask over the row
    llama.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    with pytest.raises(ValueError) as refused:
        check_packing(module.model, batches)
    assert str(refused.value) == (
        "pack_client_groups: LlamaForCausalLM attends across packed sequences (it ignores "
        "restarted position ids); set model.pack_client_groups false"
    )


def test_packing_left_padded_batches_stops_the_cli_in_one_line(tmp_path, monkeypatch, capsys):
    collate_clients = federation_data.collate_clients

    def left_padded(items):  # one padding column in front of every row
        batches = collate_clients(items)
        for batch in batches:
            for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
                batch[key] = torch.nn.functional.pad(batch[key], (1, 0), value=value)
        return batches

    monkeypatch.setattr(federation_data, "collate_clients", left_padded)
    options = ["--model.client_group_size", "3", "--model.pack_client_groups", "true"]
    code = main(["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path), *options])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "clair: error: pack_client_groups: the batches are not right-padded (attention mask 1s "
        "then 0s in every row); pad on the right or set model.pack_client_groups false"
    ]
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == []  # no half run
