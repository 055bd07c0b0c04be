"""Small random-weight checkpoints of supported architectures, made on the fly.

vLLM's ``load_format="dummy"`` would give random weights that the transformers
reference cannot see, so the tests write real (tiny) checkpoints instead: both vLLM
and the reference load the same safetensors. Weights are drawn with a fixed seed
and a large init std so that next-token distributions are peaked (greedy choices far
from ties). Token-id prompts only (``skip_tokenizer_init=True``); no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512


def make_checkpoint(path: Path, arch: str, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    seed: int = 0) -> Path:
    """Write a random-weight ``arch`` in {"llama", "qwen2", "qwen3"} checkpoint to ``path``.

    ``hidden_size = num_heads * head_dim``: vLLM's Qwen2 derives the head size from
    the hidden size, so any other choice would make vLLM and transformers disagree.
    """
    hidden = num_heads * head_dim
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.15,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    if arch in ("qwen2", "qwen3"):
        config.use_sliding_window = False
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    model.config.architectures = [model_cls.__name__]
    model.save_pretrained(path)
    return path
