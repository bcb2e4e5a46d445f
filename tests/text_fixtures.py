"""A tiny Llama with a real BPE tokenizer (trained with `tokenizers`) and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOPICS = {
    "food": [
        ("what do you like to eat", "i like bread and soup"),
        ("is soup good", "soup is warm and good"),
        ("do you cook", "i cook rice every day"),
        ("what is for dinner", "dinner is fish and rice"),
        ("do you like fruit", "apples are my favourite fruit"),
        ("what do you drink", "i drink tea with milk"),
    ],
    "weather": [
        ("is it raining", "yes it is raining today"),
        ("will it be sunny", "tomorrow will be sunny"),
        ("is it cold", "it is cold and windy"),
        ("do you like snow", "snow is white and soft"),
        ("what is the forecast", "the forecast says clouds"),
        ("is it hot", "it is hot in summer"),
    ],
    "music": [
        ("do you sing", "i sing in the morning"),
        ("what music do you like", "i like slow piano music"),
        ("can you play guitar", "i play guitar badly"),
        ("who is your favourite band", "my favourite band is quiet"),
        ("do you dance", "i dance when music plays"),
        ("is music loud", "the music is too loud"),
    ],
}


def corpus() -> list[str]:
    lines = []
    for pairs in TOPICS.values():
        for question, answer in pairs:
            lines += [question, answer, f"{question} ? {answer} ."]
    return lines


def save_tiny_llama(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer Llama-architecture model and a byte-level BPE tokenizer, ``save_pretrained``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus() * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> dict[str, Path]:
    """The same conversations in the three shapes: text, instruction and chat (jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {shape: folder / f"{shape}.jsonl" for shape in ("text", "instruction", "chat")}
    with (
        files["text"].open("w") as text,
        files["instruction"].open("w") as instruction,
        files["chat"].open("w") as chat,
    ):
        for topic, pairs in TOPICS.items():
            for question, answer in pairs:
                text.write(json.dumps({"topic": topic, "text": f"{question} ? {answer} ."}) + "\n")
                instruction.write(
                    json.dumps(
                        {"topic": topic, "instruction": question, "input": "", "output": answer}
                    )
                    + "\n"
                )
                messages = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                chat.write(json.dumps({"topic": topic, "messages": messages}) + "\n")
    return files
