"""Real causal LMs on your own text files: a tiny Llama with a locally trained BPE tokenizer.

The model is saved with ``save_pretrained`` and loaded by path through ``PretrainedBase``; the
data are small jsonl files in the three shapes (plain text, instruction records, chat).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from peft import PeftModel

from clair_lightning.cli import main, run
from clair_lightning.federation import PretrainedBase
from clair_lightning.federation.task import ClientMetrics, completion_step
from clair_lightning.federation.text import TextDataModule

from .text_fixtures import TOPICS, save_tiny_llama, write_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama(root / "model"), write_data(root / "data"), root


def topic_clients(tiny, shape="text", **options) -> TextDataModule:
    """The three topics of the tiny data as clients, set up (examples built)."""
    model_dir, files, _ = tiny
    settings = {"num_clients": 3, "client_column": "topic", "contamination": "none"}
    settings.update({"sequence_length": 64, **options})
    data = TextDataModule(str(files[shape]), str(model_dir), shape=shape, **settings)
    data.setup()
    return data


def write_config(path, model, data_file, shape, **data):
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False},
        "model": {
            "base_model": {
                "class_path": "clair_lightning.federation.PretrainedBase",
                "init_args": {"name_or_path": str(model)},
            },
            "lora_rank": 2,
            "lora_alpha": 4,
            "target_modules": "all-linear",
            "learning_rate": 0.01,
        },
        "data": {
            "class_path": "clair_lightning.federation.text.TextDataModule",
            "init_args": {
                "data_files": str(data_file),
                "tokenizer": str(model),
                "shape": shape,
                "num_clients": 3,
                "client_column": "topic",
                "contaminated_fraction": 0.34,
                "contamination": "response_swap",
                "local_steps": 2,
                "batch_size": 2,
                "sequence_length": 64,
                **data,
            },
        },
        "aggregation": {"name": "clair"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def evaluation_loss(model, datamodule, client):
    metrics = ClientMetrics(1)
    with torch.no_grad():
        for batch in datamodule.client_dataloader(client, "val"):
            metrics.update(0, completion_step(model, batch))
    return metrics.compute()[0]["loss"]


@pytest.mark.parametrize("shape", ["text", "instruction", "chat"])
def test_federated_lora_on_a_saved_llama_in_each_data_shape(tiny, tmp_path, shape):
    model_dir, files, _ = tiny
    config = write_config(tmp_path / f"{shape}.yaml", model_dir, files[shape], shape)
    run_dir = run(config, ["--run.output_dir", str(tmp_path / "runs")])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["task"]["metric"] == "token_accuracy"
    assert sum(summary["data"]["contaminated"]) == 1
    last = summary["rounds"][-1]["clients"]
    datamodule = topic_clients(
        tiny, shape, contaminated_fraction=0.34, contamination="response_swap"
    )
    assert datamodule.client_names == sorted(TOPICS)  # equal counts: ties broken by name
    base_source = PretrainedBase(str(model_dir))
    for client in range(3):
        adapter = run_dir / "adapters" / f"client_{client}"
        peft_model = PeftModel.from_pretrained(base_source.build(), str(adapter)).eval()
        loss = evaluation_loss(peft_model, datamodule, client)
        assert loss == pytest.approx(last[client]["metrics"]["loss"], rel=1e-5)
        assert last[client]["metrics"]["perplexity"] == pytest.approx(
            torch.tensor(loss).exp().item(), rel=1e-5
        )
    # every linear layer of the tiny Llama got a LoRA factor pair ('all-linear')
    adapter_config = json.loads(
        (run_dir / "adapters" / "client_0" / "adapter_config.json").read_text()
    )
    leaves = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_chat_template_masks_the_prompt_and_trains_the_reply(tiny):
    data = topic_clients(tiny, "chat")
    tokenizer = data.tokenizer
    example = data._clients[0].train[0]
    ids, labels, mask = example["input_ids"], example["labels"], example["attention_mask"]
    assistant = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    text_ids = ids[mask == 1].tolist()
    start = next(
        i + len(assistant)
        for i in range(len(text_ids))
        if text_ids[i : i + len(assistant)] == assistant
    )
    length = int(mask.sum())
    assert (labels[:start] == -100).all()  # system/user turns and the assistant header
    assert (labels[start:length] == ids[start:length]).all()  # the reply and its end marker
    assert (labels[length:] == -100).all()  # padding
    reply = tokenizer.decode(ids[start:length])
    assert reply.endswith("<|im_end|>\n") and "<|im_start|>" not in reply


def test_flower_partitioners_split_rows_into_clients(tiny):
    model_dir, files, _ = tiny
    common = {
        "tokenizer": str(model_dir),
        "shape": "text",
        "num_clients": 3,
        "contamination": "none",
        "sequence_length": 64,
    }
    iid = TextDataModule(str(files["text"]), partitioner="iid", **common)
    sizes = [sum(len(s) for s in split.values()) for split in iid._splits]
    assert sizes == [6, 6, 6]
    shard = TextDataModule(
        str(files["text"]), partitioner="shard", partition_by="topic", shards_per_client=1, **common
    )
    topics = [{r.fields["topic"] for s in split.values() for r in s} for split in shard._splits]
    assert all(len(t) == 1 for t in topics)  # one label-sorted shard per client
    dirichlet = TextDataModule(
        str(files["text"]),
        partitioner="dirichlet",
        partition_by="topic",
        dirichlet_alpha=100.0,
        **common,
    )
    assert sum(sum(len(s) for s in split.values()) for split in dirichlet._splits) == 18


def test_backdoor_probes_report_attack_success(tiny, tmp_path):
    model_dir, files, _ = tiny
    config = write_config(
        tmp_path / "backdoor.yaml",
        model_dir,
        files["instruction"],
        "instruction",
        contamination="backdoor",
        poison_fraction=1.0,
    )
    run_dir = run(config, ["--run.output_dir", str(tmp_path / "runs")])
    summary = json.loads((run_dir / "summary.json").read_text())
    for client in summary["rounds"][-1]["clients"]:
        assert 0 <= client["metrics"]["attack_success"] <= 1
    assert "attack_success" in summary["rounds"][-1]["benign_mean"]

    # A Flower client evaluates the same probes: given each client's final adapter, it reports
    # the metrics, attack success included, that the Lightning run recorded in its last round.
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from clair_lightning.federation.client import ADAPTER
    from clair_lightning.flower.client_app import _Client
    from clair_lightning.flower.experiment import RunSettings

    flower_client = _Client(RunSettings.from_file(config, simulation=True))
    for client in summary["rounds"][-1]["clients"]:
        weights = load_peft_weights(str(run_dir / "adapters" / f"client_{client['client']}"))
        set_peft_model_state_dict(flower_client.module.model, weights, adapter_name=ADAPTER)
        metrics = flower_client.evaluate(client["client"])
        assert metrics == pytest.approx(client["metrics"], rel=1e-5, abs=1e-6)


def test_compare_reports_benign_attack_success_next_to_the_clean_metric(tiny, tmp_path):
    from clair_lightning.compare.__main__ import main as compare

    model_dir, files, _ = tiny
    config = write_config(tmp_path / "tiny_chat.yaml", model_dir, files["chat"], "chat")
    output = tmp_path / "compare"
    arguments = ["--config", str(config), "--aggregators", "clair,fedavg"]
    arguments += ["--contaminations", "none,backdoor", "--seeds", "0"]
    assert compare([*arguments, "--output", str(output), "--no-wandb"]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["task"]["metric"] == "token_accuracy"
    groups = {(g["aggregator"], g["contamination"]): g for g in results["groups"]}
    assert groups[("clair", "none")]["final_attack_success"] is None  # no probes without it
    for aggregator in ("clair", "fedavg"):
        cell = next(
            c
            for c in results["cells"]
            if (c["cell"]["aggregator"], c["cell"]["contamination"]) == (aggregator, "backdoor")
        )
        clients = cell["rounds"][-1]["clients"]
        benign = [c["metrics"]["attack_success"] for c in clients if not c["contaminated"]]
        expected = sum(benign) / len(benign)
        assert groups[(aggregator, "backdoor")]["final_attack_success"] == pytest.approx(expected)
    report = (output / "report.md").read_text()
    assert "attack success on triggered held-out prompts" in report


def test_contaminations_change_only_contaminated_clients_training_data(tiny):
    clean = topic_clients(tiny, "chat")
    for contamination in ("backdoor", "response_swap", "random_tokens", "foreign_text"):
        dirty = topic_clients(
            tiny,
            "chat",
            contamination=contamination,
            contaminated_fraction=0.34,
            poison_fraction=1.0,
            foreign_files=str(tiny[1]["text"]),
        )
        for client in range(3):
            same = all(
                torch.equal(a["labels"][: len(b["labels"])], b["labels"][: len(a["labels"])])
                for a, b in zip(
                    clean._clients[client].train, dirty._clients[client].train, strict=True
                )
            )
            assert same != dirty.contaminated[client], (contamination, client)
            val = zip(clean._clients[client].val, dirty._clients[client].val, strict=True)
            for a, b in val:
                n = min(len(a["labels"]), len(b["labels"]))
                assert torch.equal(a["labels"][:n], b["labels"][:n])


def test_plain_text_backdoor_survives_truncation(tiny):
    data = topic_clients(
        tiny,
        contamination="backdoor",
        contaminated_fraction=0.34,
        poison_fraction=1.0,
        sequence_length=24,
        trigger="zz",
        backdoor_target="ok",
    )
    target = data.tokenizer(" zz ok", add_special_tokens=False)["input_ids"]
    attacker = data.contaminated.index(True)
    for example in data._clients[attacker].train + data._clients[0].probe:
        ids = example["input_ids"][example["attention_mask"] == 1].tolist()
        assert any(ids[i : i + len(target)] == target for i in range(len(ids))), ids


def test_packing_fills_blocks_of_the_sequence_length(tiny):
    data = topic_clients(tiny, sequence_length=16, packing=True)
    for examples in data._clients:
        assert all(e["attention_mask"].sum() == 16 for e in examples.train)
        assert all(len(e["input_ids"]) == 16 for e in examples.val)  # eval stays per example


def bad_inputs(root, files):
    broken = root / "broken.jsonl"
    broken.write_text('{"topic": "a", "text": "fine"}\n{"topic": "a", "text": \n')
    empty_text = root / "empty_text.jsonl"
    empty_text.write_text('{"topic": "a", "text": "fine"}\n{"topic": "a", "text": ""}\n')
    no_reply = root / "no_reply.jsonl"
    no_reply.write_text(json.dumps({"topic": "a", "messages": [{"role": "user", "content": "hi"}]}))
    table = root / "table.xlsx"
    table.write_text("x")
    return [
        (
            {"data_files": str(root / "missing.jsonl")},
            r"data file '.*missing.jsonl' does not exist",
        ),
        ({"data_files": str(broken)}, r"broken.jsonl row 2 is not valid JSON"),
        ({"data_files": str(empty_text)}, r"empty_text.jsonl row 2: 'text' is empty or not text"),
        ({"shape": "instruction"}, r"text.jsonl: missing column 'instruction' for shape"),
        (
            {"shape": "chat", "data_files": str(no_reply)},
            r"no_reply.jsonl row 1: the last message must be a non-empty assistant reply",
        ),
        ({"client_column": "speaker"}, r"missing client column 'speaker'"),
        ({"clients": ["food", "music", "poetry"]}, r"client 'poetry' has no rows"),
        ({"num_clients": 4}, r"column 'topic' has 3 distinct values, fewer than num_clients=4"),
        ({"truncation": False, "sequence_length": 8}, r"text.jsonl row \d+ has \d+ tokens, more"),
        ({"contamination": "foreign_text"}, r"contamination 'foreign_text' needs foreign_files"),
        ({"data_files": str(table)}, r"table.xlsx': unknown format '.xlsx'"),
    ]


def test_each_bad_input_ends_in_one_line_before_training(tiny, tmp_path, capsys):
    model_dir, files, root = tiny
    for overrides, message in bad_inputs(root, files):
        output = tmp_path / "runs"
        config = write_config(tmp_path / "bad.yaml", model_dir, files["text"], "text")
        settings = yaml.safe_load(config.read_text())
        settings["data"]["init_args"].update(overrides)
        config.write_text(yaml.safe_dump(settings))
        code = main(["fit", "--config", str(config), "--run.output_dir", str(output)])
        error = capsys.readouterr().err.strip()
        assert code == 2, overrides
        assert re.search(message, error), (message, error)
        assert len(error.splitlines()) == 1, error
        assert not output.exists(), "a run folder was created for bad input"


def test_bf16_mixed_precision_and_bfloat16_base_train_on_cpu(tiny, tmp_path):
    model_dir, files, _ = tiny
    config = write_config(tmp_path / "bf16.yaml", model_dir, files["chat"], "chat")
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["precision"] = "bf16-mixed"
    settings["model"]["base_model"]["init_args"].update(
        {"dtype": "bfloat16", "gradient_checkpointing": True}
    )
    config.write_text(yaml.safe_dump(settings))
    run_dir = run(config, ["--run.output_dir", str(tmp_path / "runs")])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(
        torch.isfinite(torch.tensor(c["metrics"]["loss"])) for c in summary["rounds"][-1]["clients"]
    )
    base = PretrainedBase(str(model_dir), dtype="bfloat16", gradient_checkpointing=True).build()
    assert base.dtype == torch.bfloat16
    assert any(getattr(module, "gradient_checkpointing", False) for module in base.modules())
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["trainer"]["precision"] == "bf16-mixed"
