"""Independent end-to-end reference: the checkpoint run by Hugging Face transformers.

Shares no code with the backend (``swaa_vllm`` and ``swaa_kernels.cpu``): the
model's own transformers implementation (float32) runs with an attention function
registered through transformers' ``AttentionInterface`` that applies the per-layer
SWAA mask of ``shared/SWAA.md`` through the dense oracle ``swaa_kernels.reference``
(float64 softmax). The per-layer rules are derived here from the raw
``swaa_config`` dict, again without the backend's config code.

Two ways to use it:

* :func:`greedy`: step-by-step greedy decoding with a KV cache;
* :func:`teacher_forced`: one forward over prompt + given continuation, returning
  per step the reference argmax and the log-probability of the given token. With
  vLLM's greedy tokens as the continuation, "vLLM is greedy under the reference"
  is ``argmax == tokens`` and logprobs must agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from swaa_kernels.reference import reference_attention, swaa_mask

ATTN_NAME = "swaa_dense_reference"


class LayerRule(NamedTuple):
    window: int | None
    keep_first: int
    fa_decode: bool


def layer_rules(swaa_config: dict | None, num_layers: int) -> list[LayerRule]:
    """Per-layer (W, k, FA decode) straight from the field table of SWAA.md."""
    cfg = swaa_config or {}
    window = cfg.get("sliding_window_size")
    keep_first = cfg.get("keep_first", 0)
    fa = cfg.get("force_fa_decode", False)
    full_layers = set(cfg.get("non_sliding_layers", []))
    rules = []
    for layer in range(num_layers):
        if window is None or layer in full_layers:
            rules.append(LayerRule(None, 0, False))
        else:
            rules.append(LayerRule(window, keep_first, fa if isinstance(fa, bool) else layer in fa))
    return rules


class _State:
    prompt_len = 0
    rules: list[LayerRule] = []


def _swaa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query [1, H, Q, D], key/value [1, Hkv, K, D]; batch 1, no padding, so the
    # queries are the last Q of the K positions.
    q_len, k_len = query.shape[2], key.shape[2]
    rule = _State.rules[module.layer_idx]
    mask = swaa_mask(
        torch.arange(k_len - q_len, k_len), torch.arange(k_len), _State.prompt_len,
        rule.window, rule.keep_first, rule.fa_decode,
    )
    out = reference_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), mask, scaling)
    return out.to(query.dtype)[None], None


def load_model(model_dir: Path, weights_dtype: torch.dtype = torch.float32):
    """The checkpoint, computing in float32, with the SWAA reference attention registered.

    ``weights_dtype=torch.bfloat16`` rounds the weights to bfloat16 first (still
    computing in float32): the reference for a bfloat16 engine, which sees rounded
    weights, so that only activation rounding separates the two.
    """
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ATTN_NAME, _swaa_attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTN_NAME)
    if weights_dtype != torch.float32:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(weights_dtype).to(torch.float32))
    return model.eval()


@torch.no_grad()
def greedy(
    model, swaa_config: dict | None, prompt_token_ids: list[int], max_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities under the per-layer SWAA masks."""
    from transformers import DynamicCache

    _State.rules = layer_rules(swaa_config, model.config.num_hidden_layers)
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


@torch.no_grad()
def teacher_forced(model, swaa_config: dict | None, prompt_token_ids: list[int], continuation: list[int]):
    """Reference over ``prompt + continuation`` in one pass (the continuation's tokens are generated tokens).

    Returns ``(argmax, logprob_of_given, margin)``, one entry per continuation token: the
    reference's greedy choice at that step, the reference log-probability of the given
    token, and the gap between the best and second-best log-probability (how far the step
    is from a tie).
    """
    _State.rules = layer_rules(swaa_config, model.config.num_hidden_layers)
    _State.prompt_len = len(prompt_token_ids)
    ids = torch.tensor([list(prompt_token_ids) + list(continuation[:-1])])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_token_ids) - 1 :].float()
    lp = torch.log_softmax(logits, dim=-1)
    top2 = lp.topk(2, dim=-1).values
    argmax = lp.argmax(dim=-1).tolist()
    given = [float(lp[t, tok]) for t, tok in enumerate(continuation)]
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    return argmax, given, margin
