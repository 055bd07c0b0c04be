"""Dense plain-torch reference of SWAA attention: the contract of ``shared/SWAA.md``.

Everything here is written for a reviewer to check against SWAA.md line by line,
not for speed: it builds the full boolean mask and runs a float64 softmax.
Every other attention path in this project is tested against it.

Semantics (SWAA.md, "Exact semantics"), for a request whose prompt has
``prompt_len`` tokens, a query at absolute position ``i`` and a key at ``j``:

* full-attention layer:            visible iff ``j <= i``
* sliding layer, prompt token:     visible iff ``j <= i and (j < keep_first or j > i - window)``
* sliding layer, generated token:  full attention (``j <= i``) if FA decode applies
                                   to the layer, else the prompt-token rule.

A token is a prompt token iff ``i < prompt_len``; nothing else decides its role.
"""

from __future__ import annotations

import torch

__all__ = ["swaa_mask", "reference_attention"]


def swaa_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    prompt_len: int,
    window: int | None,
    keep_first: int,
    fa_decode: bool,
) -> torch.Tensor:
    """Boolean visibility mask of one request in one layer.

    Args:
        query_positions: int tensor ``[num_queries]``, absolute 0-based positions.
        key_positions: int tensor ``[num_keys]``, absolute 0-based positions.
        prompt_len: P, the request's prompt length in tokens.
        window: W >= 1 (keys counted including the query itself), or None for a
            full-attention layer.
        keep_first: k >= 0, number of sink tokens every query also sees.
        fa_decode: whether generated tokens (i >= P) of this layer use full attention.

    Returns:
        bool tensor ``[num_queries, num_keys]``; True where the query attends the key.
    """
    i = query_positions.long()[:, None]
    j = key_positions.long()[None, :]
    causal = j <= i
    if window is None:
        return causal
    in_sinks = j < keep_first
    in_window = j > i - window
    sliding = causal & (in_sinks | in_window)
    is_generated = i >= prompt_len
    if fa_decode:
        return torch.where(is_generated, causal, sliding)
    return sliding


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Masked softmax attention in float64 with grouped-query heads.

    Args:
        query: ``[num_queries, num_heads, head_size]``, any float dtype.
        key: ``[num_keys, num_kv_heads, head_size]``; ``num_heads % num_kv_heads == 0``,
            query head h reads KV head ``h // (num_heads // num_kv_heads)``.
        value: ``[num_keys, num_kv_heads, head_size]``.
        mask: bool ``[num_queries, num_keys]`` from :func:`swaa_mask`.
        scale: softmax scale, usually ``head_size ** -0.5``.

    Returns:
        float64 tensor ``[num_queries, num_heads, head_size]``. A query row with no
        visible key (impossible under SWAA, where ``j == i`` is always visible)
        raises ``ValueError``.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a query row has no visible key")
    group = num_heads // num_kv_heads
    q = query.double().transpose(0, 1)  # [H, Q, D]
    k = key.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, K, D]
    v = value.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q @ k.transpose(1, 2)) * scale  # [H, Q, K]
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(0, 1)  # [Q, H, D]
