"""Independent end-to-end reference: the checkpoint run by Hugging Face transformers.

The model's own transformers implementation (float32, no vLLM code) runs with an
attention function registered through transformers' ``AttentionInterface`` that
applies the per-layer SWAA mask of ``shared/SWAA.md`` via the dense oracle in
``swaa_kernels.reference`` (positions are absolute; generated tokens of FA-decode
layers see everything). Greedy decoding is done step by step with a KV cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.reference import reference_attention, swaa_mask

ATTN_NAME = "swaa_dense_reference"


class _State:
    prompt_len = 0
    layers: tuple[LayerMaskSpec, ...] = ()


def _swaa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query [1, H, Q, D], key/value [1, Hkv, K, D]; batch 1, no padding, so the
    # queries are the last Q of the K positions.
    q_len, k_len = query.shape[2], key.shape[2]
    spec = _State.layers[module.layer_idx]
    mask = swaa_mask(
        torch.arange(k_len - q_len, k_len), torch.arange(k_len), _State.prompt_len,
        spec.window, spec.keep_first, spec.fa_decode,
    )
    out = reference_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), mask, scaling)
    return out.to(query.dtype)[None], None


def load_model(model_dir: Path):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ATTN_NAME, _swaa_attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN_NAME)
    return model.eval()


@torch.no_grad()
def greedy(model, layers, prompt_token_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities under the per-layer SWAA masks."""
    from transformers import DynamicCache

    _State.layers = tuple(layers)
    _State.prompt_len = len(prompt_token_ids)
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_token_ids])
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids = torch.tensor([[tok]])
    return tokens, logprobs
