"""SWAA masks at training time: a transformers attention function that applies the inference plan.

SWA-aware fine-tuning (SWAA.md, method 5) must train under exactly the masks the model is served with.
Two things guarantee it here:

* the per-layer plan is :func:`swaa_vllm.config.build_plan`, the object the vLLM backend resolves
  ``swaa_config`` to at start-up (same validation, same layer indexing);
* the mask of each layer is :func:`swaa_kernels.reference.swaa_mask`, the contract's definition that
  every inference path is tested against, with the roles of SWAA.md: positions ``< prompt_len`` are
  prompt tokens (sinks + window in sliding layers), positions ``>= prompt_len`` are generated tokens
  (full attention in FA-decode layers). A training sequence is ``prompt + answer`` in one pass, which
  is the scheduler situation "prompt and generated tokens in one chunk" (a recompute) at inference.

The attention itself runs in query tiles of :data:`TILE` rows: each tile attends, with
``torch.nn.functional.scaled_dot_product_attention`` and the tile's slice of the boolean mask, only to
the key columns that some row of the tile can see (for the prompt rows of a sliding layer: the k sinks
and a window span of ``W - 1 + TILE`` keys). Training cost therefore follows the mask, O(n (W + k + TILE))
per sliding layer instead of O(n^2), with plain autograd (FlexAttention has no CPU backward in torch
2.13). This mirrors the inference CPU path's sink-window tiles (``kernels/cpu.py``), but is written on
the dense mask so that it stays a direct reading of the contract.

Usage (transformers >= 4.48 ``AttentionInterface``)::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_NAME)  # after register()
    out = model(input_ids=ids, swaa_plan=plan, swaa_prompt_len=P)   # ids: [1, n]
"""

from __future__ import annotations

import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.reference import swaa_mask
from swaa_vllm.config import SwaaPlan

__all__ = ["ATTN_NAME", "TILE", "layer_mask", "register", "swaa_training_attention", "tiled_masked_attention"]

ATTN_NAME = "swaa_training"
TILE = 128


def layer_mask(spec: LayerMaskSpec, seq_len: int, prompt_len: int) -> torch.Tensor:
    """The boolean mask of one layer for a single sequence of ``seq_len`` tokens starting at position 0.

    Args:
        spec: the layer's entry of the plan (``SwaaPlan.for_layer``).
        seq_len: tokens in the sequence (prompt + answer).
        prompt_len: P; positions ``>= P`` are generated (answer) tokens.

    Returns:
        bool ``[seq_len, seq_len]``, True where query row i attends key column j.
    """
    positions = torch.arange(seq_len)
    return swaa_mask(positions, positions, prompt_len, spec.window, spec.keep_first, spec.fa_decode)


def tiled_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           scale: float, dropout_p: float = 0.0, tile: int = TILE) -> torch.Tensor:
    """Masked attention computed per query tile over the key columns the tile can see.

    Args:
        query: ``[1, num_heads, n, head_size]`` (float32 or bfloat16).
        key, value: ``[1, num_kv_heads, n, head_size]``; ``num_heads % num_kv_heads == 0`` (GQA).
        mask: bool ``[n, n]``; every row must see at least one key (true of SWAA masks: j == i).
        scale: softmax scale.
        dropout_p: attention dropout (training only).
        tile: query rows per tile.

    Returns:
        ``[1, n, num_heads, head_size]`` (the layout transformers' attention functions return).

    Raises:
        ValueError: batch size other than 1 or a mask of the wrong shape.
    """
    if query.shape[0] != 1:
        raise ValueError(f"SWAA training attention takes one sequence per forward, got batch {query.shape[0]}")
    n = query.shape[2]
    if mask.shape != (n, key.shape[2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {n} queries x {key.shape[2]} keys")
    outs = []
    for start in range(0, n, tile):
        rows = mask[start:start + tile]
        columns = rows.any(dim=0).nonzero().squeeze(1)
        k = key.index_select(2, columns)
        v = value.index_select(2, columns)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:start + tile], k, v, attn_mask=rows[:, columns], dropout_p=dropout_p, scale=scale,
            enable_gqa=True))
    return torch.cat(outs, dim=2).transpose(1, 2)


def swaa_training_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                            swaa_plan: SwaaPlan | None = None, swaa_prompt_len: int | None = None, **kwargs):
    """transformers attention function (``AttentionInterface``) applying the layer's SWAA mask.

    Called by each decoder layer with ``query [1, H, n, D]``, ``key/value [1, Hkv, n, D]`` (no KV cache:
    one forward over the whole sequence). ``swaa_plan`` and ``swaa_prompt_len`` arrive as keyword
    arguments of the model's forward; transformers' own ``attention_mask`` (padding/causal) is not used
    because sequences are unpadded and the SWAA mask is already causal.

    Raises:
        ValueError: missing ``swaa_plan``/``swaa_prompt_len``, or a KV cache (queries shorter than keys).
    """
    if swaa_plan is None or swaa_prompt_len is None:
        raise ValueError(f"attn_implementation={ATTN_NAME!r} needs swaa_plan= and swaa_prompt_len= in the forward call")
    if query.shape[2] != key.shape[2]:
        raise ValueError("SWAA training attention runs one pass over the whole sequence; use_cache must be False")
    spec = swaa_plan.for_layer(module.layer_idx)
    mask = layer_mask(spec, query.shape[2], swaa_prompt_len).to(query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = tiled_masked_attention(query, key, value, mask, scale, dropout if module.training else 0.0)
    return out, None


def register() -> str:
    """Register :func:`swaa_training_attention` with transformers under :data:`ATTN_NAME`; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, swaa_training_attention)
    return ATTN_NAME
