"""The Lightning layer on small real models: runs, outputs, W&B, resume, adapters, bad configs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from clair_lightning.cli import main, run
from clair_lightning.federation import CheckpointBase, ConfigBase, FederatedLoRAModule
from clair_lightning.federation.adapters import lora_layers, read_update, write_update
from clair_lightning.federation.task import ClientMetrics, completion_step
from clair_lightning.recipes.text_copy import PretrainedCopyBase, TextCopyDataModule

from .helpers import wandb_history

SMOKE = "configs/text_copy_smoke.yaml"
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32,
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    return run(SMOKE, ["--run.output_dir", str(output)])


def _smoke_settings():
    return yaml.safe_load(open(SMOKE))


def test_smoke_run_writes_a_complete_run_folder(smoke_run):
    assert smoke_run.name == "text_copy_smoke-clair-reversed_targets-seed0"
    for path in ("config.yaml", "summary.json", "checkpoints/last.ckpt"):
        assert (smoke_run / path).is_file(), path
    for client in range(4):
        assert (smoke_run / "adapters" / f"client_{client}" / "adapter_config.json").is_file()
    assert list((smoke_run / "csv").glob("version_*/metrics.csv"))
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["aggregator"]["name"] == "clair"
    assert summary["data"]["contamination"] == "reversed_targets"
    assert sum(summary["data"]["contaminated"]) == 1
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert len(record["clients"]) == 4
        assert {"precision", "recall", "f1", "auroc", "fpr"} <= set(record["detection"])
        assert set(record["benign_mean"]) == {"loss", "perplexity", "token_accuracy", "exact_match"}
        for client in record["clients"]:
            assert client["contaminated"] == summary["data"]["contaminated"][client["client"]]
            assert 0 <= client["metrics"]["exact_match"] <= 1
    resolved = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert resolved["aggregation"]["name"] == "clair"
    assert resolved["data"]["init_args"]["num_clients"] == 4


def test_offline_wandb_run_holds_detection_metrics_and_client_table(smoke_run):
    run_files = list((smoke_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = wandb_history(run_files[0])
    scalars = [row for row in rows if "detection/fpr" in row]
    assert [row["trainer/global_step"] for row in scalars] == [1, 2]
    for row in scalars:
        assert {"detection/f1", "detection/auroc", "benign/exact_match"} <= set(row)
    tables = [row for row in rows if row.get("clients/_type") == "table-file"]
    assert [row["trainer/global_step"] for row in tables] == [1, 2]
    table_file = run_files[0].parent / "files" / tables[-1]["clients/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["client", "score", "flag", "contaminated"]
    assert [row[0] for row in table["data"]] == [0, 1, 2, 3]
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert [row[3] for row in table["data"]] == summary["data"]["contaminated"]


def test_saved_adapter_reproduces_the_clients_evaluation_loss(smoke_run):
    settings = _smoke_settings()
    base = PretrainedCopyBase(**settings["model"]["base_model"]["init_args"]).build()
    client = 2
    model = PeftModel.from_pretrained(base, str(smoke_run / "adapters" / f"client_{client}"))
    model.eval()
    data = TextCopyDataModule(**settings["data"]["init_args"], seed=0)
    data.setup()
    metrics = ClientMetrics(data.num_clients)
    with torch.no_grad():
        for batch in data.val_dataloader():
            if int(batch["client"]) == client:
                metrics.update(client, completion_step(model, batch))
    summary = json.loads((smoke_run / "summary.json").read_text())
    expected = summary["rounds"][-1]["clients"][client]["metrics"]
    assert metrics.compute()[client]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics.compute()[client]["exact_match"] == pytest.approx(expected["exact_match"])


def test_clients_share_one_base_and_32_clients_fit_beside_it():
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=32, lora_rank=4)
    base = [p for n, p in module.model.named_parameters() if "lora_" not in n]
    adapters = [p for n, p in module.model.named_parameters() if "lora_" in n]
    assert len({p.data_ptr() for p in base}) == len(base)  # one copy of each base tensor
    per_client = sum(p.numel() for p in module.client_parameters(0))
    assert sum(p.numel() for p in adapters) == 32 * per_client
    assert all(not p.requires_grad for p in base)
    layer = next(iter(lora_layers(module.model).values()))
    pointer = layer.base_layer.weight.data_ptr()
    inputs = torch.randint(3, 32, (2, 10))
    for client in (0, 17, 31):
        module.activate(client)
        assert module.model(input_ids=inputs).logits.shape == (2, 10, 32)
        assert layer.base_layer.weight.data_ptr() == pointer
    base_size = sum(p.numel() for p in base)
    assert per_client < 0.1 * base_size  # each client adds a small adapter, never a base copy


def test_each_client_step_trains_its_adapter_and_releases_its_gradients():
    """Gradients live only within a step: kept, 64 clients' gradients fragment the heap."""
    import lightning.pytorch as pl

    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=3, lora_rank=2)
    data = TextCopyDataModule(num_clients=3, local_steps=2, batch_size=4, train_examples=8)
    start = [read_update(module.model, f"client_{k}") for k in range(3)]
    holding = []

    class GradientProbe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            lora = [p for n, p in pl_module.model.named_parameters() if "lora_" in n]
            holding.append(sum(p.grad is not None for p in lora))

    pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[GradientProbe()],
    ).fit(module, datamodule=data)
    assert holding == [0] * 6  # 3 clients x 2 local steps, none left holding a gradient
    for k in range(3):
        for name, (b, _) in read_update(module.model, f"client_{k}").items():
            assert not torch.equal(b, start[k][name][0])  # B starts at zero and was trained


def test_clients_start_from_the_same_adapter():
    module = FederatedLoRAModule(ConfigBase(TINY_LLAMA), num_clients=3, lora_rank=2)
    first = read_update(module.model, "client_0")
    for client in (1, 2):
        other = read_update(module.model, f"client_{client}")
        for name, (b, a) in first.items():
            assert torch.equal(a, other[name][1]) and torch.equal(b, other[name][0])


def test_read_update_folds_the_scaling_and_write_back_keeps_the_product():
    module = FederatedLoRAModule(
        ConfigBase(TINY_LLAMA), num_clients=2, lora_rank=3, lora_alpha=12.0
    )
    generator = torch.Generator().manual_seed(0)
    for layer in lora_layers(module.model).values():
        with torch.no_grad():
            layer.lora_B["client_1"].weight.normal_(generator=generator)
    update = read_update(module.model, "client_1")
    for name, layer in lora_layers(module.model).items():
        b, a = update[name]
        torch.testing.assert_close(b @ a, layer.get_delta_weight("client_1"))

    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if "client_1" in n}
    assert max(write_update(module.model, "client_1", update, generator).values()) == 0.0
    for name, parameter in module.model.named_parameters():
        if "client_1" in name:
            assert torch.equal(parameter, before[name]), "an unchanged update must not move"

    doubled = {name: (2 * b, a) for name, (b, a) in update.items()}  # already at rank 3
    write_update(module.model, "client_1", doubled, generator)
    for name, layer in lora_layers(module.model).items():
        written_b = layer.lora_B["client_1"].weight * layer.scaling["client_1"]
        torch.testing.assert_close(written_b, doubled[name][0])  # as given: one basis
        torch.testing.assert_close(layer.lora_A["client_1"].weight, doubled[name][1])

    wider = {name: (torch.cat([b, b], 1), torch.cat([a, a], 0)) for name, (b, a) in update.items()}
    errors = write_update(module.model, "client_1", wider, generator)  # rank 6 -> re-factorised
    assert max(errors.values()) < 1e-5  # the product (= 2 B A) has rank 3: nothing truncated
    for name, layer in lora_layers(module.model).items():
        torch.testing.assert_close(
            layer.get_delta_weight("client_1"),
            2 * (update[name][0] @ update[name][1]),
            atol=1e-5,
            rtol=1e-4,
        )


def test_base_model_saved_with_save_pretrained_is_loaded_by_path(tmp_path):
    config = dict(TINY_LLAMA)
    config.pop("model_type")
    torch.manual_seed(3)
    saved = LlamaForCausalLM(LlamaConfig(**config))
    saved.save_pretrained(tmp_path / "base")
    loaded = CheckpointBase(str(tmp_path / "base")).build()
    for (name, want), (_, got) in zip(
        saved.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(want, got), name
    run_dir = run(
        SMOKE,
        [
            "--model.base_model.class_path",
            "clair_lightning.federation.CheckpointBase",
            "--model.base_model.init_args.path",
            str(tmp_path / "base"),
            "--trainer.max_epochs",
            "1",
            "--run.output_dir",
            str(tmp_path / "runs"),
        ],
    )
    assert len(json.loads((run_dir / "summary.json").read_text())["rounds"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--aggregation.name", "fedprox"], "unknown aggregator 'fedprox'; known aggregators"),
        (
            ["--aggregation.options", '{"lamda": 2}'],
            r"aggregator 'clair' has no option\(s\) \['lamda'\]",
        ),
        (["--data.init_args.num_clients", "1"], "at least two clients"),
        (
            ["--data.init_args.contaminated_fraction", "0.5"],
            r"contaminated_fraction must be in \[0, 0.5\)",
        ),
        (
            ["--data.init_args.contaminated_fraction", "-0.1"],
            r"contaminated_fraction must be in \[0, 0.5\)",
        ),
        (["--data.init_args.contamination", "poisoned"], "unknown contamination 'poisoned'"),
        (["--model.client_group_size", "0"], "client_group_size must be at least 1, got 0"),
        (
            ["--model.target_modules", "[q_proj, gate_keeper]"],
            r"LoRA target module\(s\) \['gate_keeper'\]",
        ),
        (
            [
                "--model.base_model.class_path",
                "clair_lightning.federation.CheckpointBase",
                "--model.base_model.init_args.path",
                "/nonexistent/base",
            ],
            "checkpoint path '/nonexistent/base' is not a readable save_pretrained folder",
        ),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, capsys, overrides, message):
    import re

    code = main(["fit", "--config", SMOKE, "--run.output_dir", str(tmp_path), *overrides])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not any(tmp_path.iterdir()), "a run folder was created for a bad config"


def test_existing_run_folder_is_not_overwritten_silently(smoke_run, capsys):
    code = main(["fit", "--config", SMOKE, "--run.output_dir", str(smoke_run.parent)])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err


def test_client_module_trains_alone_and_exchanges_updates_with_the_federation(smoke_run, tmp_path):
    import lightning.pytorch as pl

    from clair_lightning.federation import ClientLoRAModule

    settings = _smoke_settings()
    base = PretrainedCopyBase(**settings["model"]["base_model"]["init_args"])
    data = TextCopyDataModule(**settings["data"]["init_args"], seed=0)
    trainer_options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }

    client = ClientLoRAModule(base, lora_rank=4, lora_alpha=8, learning_rate=0.01)
    pl.Trainer(**trainer_options).validate(client, data.client_dataloader(1, "val"))
    before = client.metrics["loss"]
    pl.seed_everything(0)
    pl.Trainer(max_epochs=4, **trainer_options).fit(
        client, data.client_dataloader(1, "train", shuffle=True)
    )
    pl.Trainer(**trainer_options).validate(client, data.client_dataloader(1, "val"))
    assert client.metrics["loss"] < before

    saved = ClientLoRAModule(base, adapter_path=str(smoke_run / "adapters" / "client_2"))
    pl.Trainer(**trainer_options).validate(saved, data.client_dataloader(2, "val"))
    summary = json.loads((smoke_run / "summary.json").read_text())
    expected = summary["rounds"][-1]["clients"][2]["metrics"]
    assert saved.metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)

    client.save_adapter(tmp_path / "client_1")
    reloaded = ClientLoRAModule(base, adapter_path=str(tmp_path / "client_1"))
    for name, (b, a) in reloaded.update().items():
        torch.testing.assert_close(b @ a, client.update()[name][0] @ client.update()[name][1])

    update = client.update()
    assert set(update) == set(saved.update())
    saved.load_update(update)
    for name, (b, a) in saved.update().items():
        torch.testing.assert_close(b @ a, update[name][0] @ update[name][1], atol=1e-5, rtol=1e-4)


def test_test_subcommand_adds_test_metrics_and_keeps_the_history(smoke_run):
    code = main(
        [
            "test",
            "--config",
            SMOKE,
            "--run.output_dir",
            str(smoke_run.parent),
            "--ckpt_path",
            "last",
        ]
    )
    assert code == 0
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert len(summary["test"]["clients"]) == 4
    assert 0 <= summary["test"]["benign_mean"]["exact_match"] <= 1
