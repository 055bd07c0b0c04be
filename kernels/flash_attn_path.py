"""SWAA attention through flash-attn's paged varlen kernel plus a small sink attention, merged by LSE.

The alternative to :mod:`swaa_kernels.triton_swaa` on CUDA, with the same
arguments and cache layout (:func:`swaa_kernels.cpu.paged_swaa_attention`). For
each request the query rows split, by position against the prompt length P, into

* **sliding rows** (sliding layer and position < P, or every row of a sliding layer
  without FA decode): their window part is one flash-attn call over the paged
  cache with ``causal=True, window_size=(W - 1, 0)`` returning the log-sum-exp;
  their sink part is a plain-torch attention over the first k keys *not already in
  the window* (key ``j`` for row ``i`` iff ``j < k and j <= i - W``); the two are
  merged by LSE (:func:`lse_merge`), so a key in both sets counts once;
* **full rows** (full-attention layers, generated rows with FA decode): one
  flash-attn call with ``causal=True, window_size=(-1, -1)``.

The windowed call gets a copy of the block table whose entries before each chunk's
window point at vLLM's null block: flash-attn loads whole key tiles, and those blocks
may have been freed by the sink-window KV manager (``swaa_vllm/sink_window_cache.py``).

Within a request sliding rows precede full rows, so each set is a varlen
"sub-batch" of contiguous chunks: chunk ``r`` has ``n`` query rows and
``seqused_k`` = position of its last row + 1, and flash-attn's bottom-right
causal alignment puts its rows at the right absolute positions.

The windowed call is injectable (``window_fn``), so the splitting and merging are
tested on CPU with a stand-in (tests/test_flash_attn_merge.py); the default
:func:`vllm_flash_attn_window_fn` is vLLM's bundled ``vllm_flash_attn``
(``flash_attn_varlen_func`` with ``block_table``/``seqused_k``, FA2 or FA3).
Upstream ``flash-attn`` is not used: its paged KV cache needs block sizes
divisible by 256, vLLM uses 16.

Selection between the two GPU paths (see ``swaa_vllm/platforms/cuda_path.py``): this path
for steps whose longest query is above one token (prefill, chunked prefill,
mixed steps) when ``vllm_flash_attn`` is importable, the dtype is float16/bfloat16
and no CUDA graph is being captured (it reads metadata on the host);
the Triton kernel otherwise (decode steps, CUDA graphs, float32, no flash-attn).
``SWAA_GPU_KERNEL=triton|flash_attn`` forces one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from swaa_kernels.cpu import LayerMaskSpec

__all__ = ["WindowFn", "flash_attn_swaa_attention", "lse_merge", "sink_attention", "vllm_flash_attn_window_fn"]

# Rows of one plain-torch sink attention call (bounds its [heads, rows, k] score tensor).
SINK_ROW_CHUNK = 8192
# vLLM's null block (``BlockPool.null_block``, block 0: never written, so finite).
NULL_BLOCK_ID = 0


class WindowFn(Protocol):
    """A flash-attn-style paged varlen attention returning ``(out [N, H, D], lse [H, N])``.

    Arguments mirror ``flash_attn_varlen_func``: ``query`` ``[N, H, D]``; the paged
    ``key_cache``/``value_cache`` ``[num_blocks, block_size, Hkv, D]``; ``block_table``
    int32 ``[B, max_blocks]``; ``cu_seqlens_q`` int32 ``[B + 1]``; ``seqused_k`` int32
    ``[B]`` (keys of chunk b are positions ``[0, seqused_k[b])``, its queries the last
    rows, causal bottom-right); ``window_left`` = W - 1, or -1 for no window.
    ``lse`` is natural-log, float32; a row with no visible key has ``-inf``.
    """

    def __call__(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        seqused_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        scale: float,
        window_left: int,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def vllm_flash_attn_window_fn(
    query, key_cache, value_cache, block_table, cu_seqlens_q, seqused_k, max_seqlen_q, max_seqlen_k, scale, window_left
):
    """:class:`WindowFn` through vLLM's ``vllm.vllm_flash_attn.flash_attn_varlen_func`` (CUDA only).

    Uses vLLM's own FA version choice (``fa_utils.get_flash_attn_version``: FA3 on
    Hopper, FA2 otherwise). Raises ImportError where vLLM's flash-attn is missing.
    """
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_varlen_func,
        get_flash_attn_version,
    )

    kwargs = {}
    version = get_flash_attn_version(head_size=query.shape[-1])
    if version is not None:
        kwargs["fa_version"] = version
    out, lse = flash_attn_varlen_func(
        q=query,
        k=key_cache,
        v=value_cache,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_q=max_seqlen_q,
        seqused_k=seqused_k,
        max_seqlen_k=max_seqlen_k,
        softmax_scale=scale,
        causal=True,
        window_size=[window_left, 0] if window_left >= 0 else [-1, -1],
        block_table=block_table,
        return_softmax_lse=True,
        **kwargs,
    )
    return out, lse


def lse_merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets from their partial results.

    With ``m = max(lse_a, lse_b)``, ``w_a = exp(lse_a - m)``, ``w_b = exp(lse_b - m)``:
    ``out = (w_a * out_a + w_b * out_b) / (w_a + w_b)`` and ``lse = m + log(w_a + w_b)``
    (FlashAttention-2's split-KV combine; the same formula as vLLM's
    ``merge_attn_states``, arXiv 2501.01005 section 2.2). A side with ``lse = -inf``
    (no visible key) contributes nothing; if both are empty the row is 0 with ``-inf``.

    Args:
        out_a, out_b: ``[N, H, D]`` partial outputs (any float dtype).
        lse_a, lse_b: ``[N, H]`` natural-log sums of exp of the scaled scores.

    Returns:
        ``(out [N, H, D] in out_a.dtype, lse [N, H] float32)``.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    denom = torch.where(empty, torch.ones_like(total), total)
    out = (out_a.float() * (w_a / denom)[..., None] + out_b.float() * (w_b / denom)[..., None]).to(out_a.dtype)
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(denom))
    return out, lse


def sink_attention(
    query: torch.Tensor, sink_keys: torch.Tensor, sink_values: torch.Tensor, positions: torch.Tensor,
    window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of sliding rows over the sinks outside their window, with its LSE.

    Row at position ``i`` sees sink key ``j`` (``j < len(sink_keys)``) iff ``j <= i - window``.

    Args:
        query: ``[N, H, D]``.
        sink_keys, sink_values: ``[S, Hkv, D]``, the request's first S keys (S <= k).
        positions: int ``[N]`` absolute positions of the rows.
        window: W.
        scale: softmax scale.

    Returns:
        ``(out [N, H, D] in query.dtype, lse [N, H] float32)``; rows seeing no sink get
        out 0 and lse ``-inf``.
    """
    n, h, d = query.shape
    s, hkv = sink_keys.shape[0], sink_keys.shape[1]
    group = h // hkv
    k = sink_keys.float().transpose(0, 1)  # [Hkv, S, D]
    v = sink_values.float().transpose(0, 1)
    out = torch.empty(n, h, d, dtype=query.dtype, device=query.device)
    lse = torch.empty(n, h, dtype=torch.float32, device=query.device)
    j = torch.arange(s, device=query.device)
    for r0 in range(0, n, SINK_ROW_CHUNK):
        r1 = min(r0 + SINK_ROW_CHUNK, n)
        q = query[r0:r1].float().view(r1 - r0, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
        scores = torch.einsum("hgnd,hsd->hgns", q, k) * scale
        visible = j[None, :] <= positions[r0:r1, None] - window  # [n, S]
        scores = scores.masked_fill(~visible, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, n]
        probs = torch.exp(scores - torch.where(chunk_lse == float("-inf"), 0.0, chunk_lse)[..., None])
        o = torch.einsum("hgns,hsd->hgnd", probs, v)  # zero where nothing is visible
        out[r0:r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, h, d).to(query.dtype)
        lse[r0:r1] = chunk_lse.permute(2, 0, 1).reshape(r1 - r0, h)
    return out, lse


def _split_rows(query_start_loc: list[int], seq_lens: list[int], prompt_lens: list[int], spec: LayerMaskSpec):
    """Per request: (request, first row, sliding rows, full rows, context) from host metadata."""
    for r, seq_len in enumerate(seq_lens):
        q_begin, q_len = query_start_loc[r], query_start_loc[r + 1] - query_start_loc[r]
        if q_len == 0:
            continue
        context = seq_len - q_len
        if context < 0:
            raise ValueError(f"request {r}: query length {q_len} exceeds sequence length {seq_len}")
        if spec.is_full:
            n_sliding = 0
        elif spec.fa_decode:
            n_sliding = min(max(prompt_lens[r] - context, 0), q_len)
        else:
            n_sliding = q_len
        yield r, q_begin, n_sliding, q_len - n_sliding, context


def _gather_sub_batch(device, chunks):
    """Row indices and varlen tensors of chunks ``(request, first_row, n_rows, seqused_k)``."""
    rows = torch.cat([torch.arange(b, b + n) for _, b, n, _ in chunks])
    cu = torch.tensor([0] + [n for _, _, n, _ in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    used = torch.tensor([k for _, _, _, k in chunks], dtype=torch.int32)
    reqs = torch.tensor([r for r, _, _, _ in chunks])
    return (rows.to(device), reqs.to(device), cu.to(device), used.to(device),
            max(n for _, _, n, _ in chunks), max(k for _, _, _, k in chunks))


def flash_attn_swaa_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    spec: LayerMaskSpec,
    scale: float,
    out: torch.Tensor | None = None,
    window_fn: WindowFn | None = None,
) -> torch.Tensor:
    """SWAA attention of a batch over a paged cache: flash-attn window/full calls + LSE-merged sinks.

    Same contract as :func:`swaa_kernels.cpu.paged_swaa_attention`.

    Args:
        query: ``[num_tokens, num_heads, head_size]`` float16/bfloat16 on CUDA (any
            float dtype/device with a stand-in ``window_fn``).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``
            views, last dimension contiguous.
        block_table: int32 ``[num_reqs, max_blocks_per_req]`` on the query's device.
        query_start_loc, seq_lens, prompt_lens: int ``[num_reqs + 1]``, ``[num_reqs]``,
            ``[num_reqs]`` **host** tensors (the row split is planned on the host).
        spec: the layer's mask; scale: softmax scale.
        out: optional ``[>= num_tokens, num_heads, head_size]`` output buffer.
        window_fn: the paged varlen attention (:class:`WindowFn`); default
            :func:`vllm_flash_attn_window_fn`.

    Returns:
        ``[num_tokens, num_heads, head_size]`` in ``query.dtype`` (``out`` if given).

    Raises:
        ValueError: if a request's query is longer than its sequence.
    """
    window_fn = window_fn or vllm_flash_attn_window_fn
    num_tokens = query.shape[0]
    if out is None:
        out = torch.empty_like(query)
    device = query.device
    block_size = key_cache.shape[1]
    starts, lens, prompts = query_start_loc.tolist(), seq_lens.tolist(), prompt_lens.tolist()
    sliding, full = [], []
    for r, q_begin, n_sliding, n_full, context in _split_rows(starts, lens, prompts, spec):
        if n_sliding:
            sliding.append((r, q_begin, n_sliding, context + n_sliding))
        if n_full:
            full.append((r, q_begin + n_sliding, n_full, lens[r]))

    for chunks, window_left in ((full, -1), (sliding, (spec.window or 0) - 1)):
        if not chunks:
            continue
        rows, reqs, cu, used, max_q, max_k = _gather_sub_batch(device, chunks)
        whole = rows.shape[0] == num_tokens  # the common case: no row copy
        q = query[:num_tokens] if whole else query.index_select(0, rows)
        table = block_table.index_select(0, reqs)
        if window_left >= 0:
            _null_blocks_before_window(table, used, cu, spec.window, block_size)
        o, lse = window_fn(q, key_cache, value_cache, table, cu, used, max_q, max_k, scale, window_left)
        if window_left >= 0 and spec.keep_first > 0:
            o = _add_sinks(o, lse, q, chunks, key_cache, value_cache, block_table, block_size, spec, scale)
        if whole:
            out[:num_tokens] = o
        else:
            out.index_copy_(0, rows, o.to(out.dtype))
    return out[:num_tokens]


def _null_blocks_before_window(table: torch.Tensor, used: torch.Tensor, cu: torch.Tensor, window: int,
                               block_size: int) -> None:
    """Point each chunk's block-table entries before its first row's window at the null block (in place).

    flash-attn loads whole key tiles and masks inside them, so a tile may start before
    the window; those blocks may be freed (``swaa_vllm/sink_window_cache.py``) while
    the worker's table still names them. ``table`` int32 ``[chunks, max_blocks]``,
    ``used``/``cu`` the chunks' ``seqused_k`` and ``cu_seqlens_q``. The sinks are read
    from the original table.
    """
    first_row = used - (cu[1:] - cu[:-1])
    first_block = (first_row - window + 1).clamp(min=0) // block_size
    before = torch.arange(table.shape[1], device=table.device)[None, :] < first_block[:, None]
    table.masked_fill_(before, NULL_BLOCK_ID)


def _add_sinks(o, lse, q, chunks, key_cache, value_cache, block_table, block_size, spec, scale):
    """Merge each sliding chunk's sink part into its window output ``o`` (rows in chunk order).

    ``lse`` is flash-attn's ``[H, rows]``. A row at position ``i`` sees the sinks
    ``j < min(k, i - W + 1)`` outside its window; rows with ``i < W`` see none.
    """
    row = 0
    for r, _, n, seqused in chunks:
        base, row = row, row + n
        first_pos = seqused - n
        num_sinks = min(spec.keep_first, seqused - spec.window)  # for the chunk's last row
        skip = max(spec.window - first_pos, 0)
        if num_sinks <= 0 or skip >= n:
            continue
        lo, hi = base + skip, base + n
        sink_pos = torch.arange(num_sinks, device=q.device)
        blocks = block_table[r, sink_pos // block_size].long()
        offsets = sink_pos % block_size
        positions = torch.arange(first_pos + skip, seqused, device=q.device)
        s_out, s_lse = sink_attention(
            q[lo:hi], key_cache[blocks, offsets], value_cache[blocks, offsets], positions, spec.window, scale
        )
        merged, _ = lse_merge(o[lo:hi], lse[:, lo:hi].transpose(0, 1), s_out, s_lse)
        o[lo:hi] = merged
    return o
