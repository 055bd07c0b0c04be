"""SWAA attention over vLLM's paged KV cache as one Triton kernel (the GPU path).

Same arguments and cache layout as :func:`swaa_kernels.cpu.paged_swaa_attention`:
``key_cache``/``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_size]``
views (any strides), the token at absolute position ``p`` of request ``r`` lives in
block ``block_table[r, p // block_size]`` at offset ``p % block_size``, and the
queries of request ``r`` are the last ``query_start_loc[r+1] - query_start_loc[r]``
of its ``seq_lens[r]`` tokens. A row is a prompt token iff its position is below
``prompt_lens[r]`` (``shared/SWAA.md``).

Structure (after vLLM's ``triton_unified_attention``, itself FlashAttention-2's
online softmax, Dao 2023, arXiv 2307.08691, Algorithm 1):

* grid ``(num_tokens // BLOCK_Q + num_reqs, num_kv_heads)``; program ``(b, h)``
  finds its request by binary search over ``query_start_loc`` and takes ``BLOCK_Q``
  consecutive query tokens times the ``GROUP`` query heads that share KV head ``h``
  (``BLOCK_M = BLOCK_Q * GROUP`` rows, grouped-query heads folded into rows). The
  grid depends only on tensor shapes, so a launch is CUDA-graph capturable.
* the key axis is cut into tiles of ``TILE_N`` positions. A program whose rows are
  all prompt rows of a sliding layer visits the **sink tiles**
  ``[0, ceil(min(k, q_hi + 1) / TILE_N))`` and then the **window tiles**
  ``[max(floor((q_lo - W + 1) / TILE_N), n_sink_tiles), ceil((q_hi + 1) / TILE_N))``,
  where ``q_lo``/``q_hi`` are its first and last row positions: window tiles
  already covered by the sink range are skipped, so every tile is visited at most
  once and no key is counted twice. Keys in ``[k, q_lo - W + 1)``, which no row of
  the program sees, are not even loaded (their blocks may be freed, see
  ``swaa_vllm/sink_window_cache.py``). A program with a full-attention row (a
  full-attention layer, or a generated row with FA decode) visits every tile up
  to ``q_hi``. Inside a tile the exact per-row rule
  ``j <= i and (row_full or j < k or j > i - W)`` is applied, so rows of different
  roles may share a program (chunks straddling the prompt end).
* one online softmax (running max ``M``, sum ``L``, accumulator) runs over the
  sink and window tiles together, in base 2 (``exp2``, scale folded with log2 e).

Debugging hook: ``tile_visits`` (int32 ``[num_tokens, num_heads, max_tiles]``) makes
every program add 1 at ``[token, head, tile]`` for each tile it visits
(``tl.atomic_add``); without it the ``COUNT_TILES`` branch is compiled away. Tests
run the kernel with ``TRITON_INTERPRET=1`` on CPU and assert the visited tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swaa_kernels.cpu import LayerMaskSpec

__all__ = ["kernel_config", "triton_paged_swaa_attention"]


@triton.jit
def _find_request(query_start_loc_ptr, q_block_global, num_reqs, BLOCK_Q: tl.constexpr):
    """Request ``r`` whose q-block range holds ``q_block_global`` (binary search).

    Request ``r`` owns global q-blocks from ``query_start_loc[r] // BLOCK_Q + r``
    (one spare block per request absorbs the rounding), as in vLLM's ``find_seq_idx``.
    """
    left: tl.int32 = 0
    right = num_reqs
    while left < right:
        mid = (left + right) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_global:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _tile_step(
    tile, m_i, l_i, acc, q, pos, row_full, row_valid, token, head,
    k_ptr, v_ptr, block_row_ptr, kv_head, seq_len, keep_first, window, key_lo, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    visits_ptr, stride_vis_t, stride_vis_h,
    offs_d, d_valid,
    TILE_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """One key tile of the online softmax; returns the updated ``(m_i, l_i, acc)``.

    Keys ``[keep_first, key_lo)`` are seen by no row of the program and are not loaded:
    their blocks may have been freed (``swaa_vllm/sink_window_cache.py``).
    """
    if COUNT_TILES:
        tl.atomic_add(visits_ptr + token * stride_vis_t + head * stride_vis_h + tile, 1, mask=row_valid)
    j = tile * TILE_N + tl.arange(0, TILE_N)
    key_valid = (j < seq_len) & ((j < keep_first) | (j >= key_lo))
    block = tl.load(block_row_ptr + j // KV_BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
    offset = j % KV_BLOCK_SIZE
    k = tl.load(
        k_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
        mask=d_valid[:, None] & key_valid[None, :],
        other=0.0,
    )  # [HEAD_PAD, TILE_N]
    v = tl.load(
        v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
        mask=key_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # [TILE_N, HEAD_PAD]
    jj = j[None, :]
    ii = pos[:, None]
    visible = (
        row_valid[:, None]
        & key_valid[None, :]
        & (jj <= ii)
        & (row_full[:, None] | (jj < keep_first) | (jj > ii - window))
    )
    s = tl.dot(q, k.to(q.dtype)) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _swaa_paged_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, block_table_ptr, query_start_loc_ptr, seq_lens_ptr, prompt_lens_ptr,
    visits_ptr,
    qk_scale, num_reqs, num_heads, keep_first, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_vis_t, stride_vis_h,
    IS_FULL: tl.constexpr, FA_DECODE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    COUNT_TILES: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, q_block_global, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_block_local = q_block_global - (q_start // BLOCK_Q + req)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len

    # Rows at positions >= full_from attend every earlier key.
    if IS_FULL:
        full_from = 0
    elif FA_DECODE:
        full_from = tl.load(prompt_lens_ptr + req)
    else:
        full_from = seq_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_SIZE
    q_local = q_block_local * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    token = (q_start + q_local).to(tl.int64)
    pos = context + q_local
    row_full = pos >= full_from
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    q_lo = context + q_block_local * BLOCK_Q
    q_hi = context + tl.minimum(q_block_local * BLOCK_Q + BLOCK_Q, q_len) - 1
    end_tile = (q_hi + TILE_N) // TILE_N
    sink_end_tile = (tl.minimum(keep_first, q_hi + 1) + TILE_N - 1) // TILE_N
    # A program with a full-attention row reads from key 0; otherwise from its first row's window.
    key_lo = tl.where(q_hi >= full_from, 0, tl.maximum(q_lo - window + 1, 0))  # first window key of any row
    window_tile = tl.maximum(key_lo // TILE_N, sink_end_tile)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    for tile in range(sink_end_tile):
        m_i, l_i, acc = _tile_step(
            tile, m_i, l_i, acc, q, pos, row_full, row_valid, token, head,
            k_ptr, v_ptr, block_row_ptr, kv_head, seq_len, keep_first, window, key_lo, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            visits_ptr, stride_vis_t, stride_vis_h, offs_d, d_valid,
            TILE_N, KV_BLOCK_SIZE, COUNT_TILES,
        )
    for tile in range(window_tile, end_tile):
        m_i, l_i, acc = _tile_step(
            tile, m_i, l_i, acc, q, pos, row_full, row_valid, token, head,
            k_ptr, v_ptr, block_row_ptr, kv_head, seq_len, keep_first, window, key_lo, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            visits_ptr, stride_vis_t, stride_vis_h, offs_d, d_valid,
            TILE_N, KV_BLOCK_SIZE, COUNT_TILES,
        )
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def kernel_config(group: int, head_size: int, max_query_len: int | None) -> dict[str, int]:
    """Launch configuration: ``BLOCK_M`` rows (``BLOCK_Q`` tokens x ``group`` heads), ``TILE_N`` keys.

    Decode-sized steps (``max_query_len * group <= 16``) use 16-row programs so
    that a single-token decode wastes few rows; prefill uses 64 rows (128 for head
    sizes up to 128 when at most 8 heads share a KV head). Not autotuned.
    """
    if max_query_len is not None and max_query_len * group <= 16:
        block_m = 16
    elif head_size <= 128 and group <= 8:
        block_m = 128
    else:
        block_m = 64
    block_m = max(block_m, triton.next_power_of_2(group))
    tile_n = 32 if head_size > 128 else 64
    num_warps = 4 if block_m <= 64 else 8
    return {"BLOCK_M": block_m, "BLOCK_Q": block_m // group, "TILE_N": tile_n, "num_warps": num_warps}


def triton_paged_swaa_attention(
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
    max_query_len: int | None = None,
    tile_visits: torch.Tensor | None = None,
    block_m: int | None = None,
    tile_n: int | None = None,
) -> torch.Tensor:
    """SWAA attention of a batch of requests over a paged KV cache, in one Triton launch.

    Same contract as :func:`swaa_kernels.cpu.paged_swaa_attention` (the queries'
    own keys must already be in the cache). Reads no tensor on the host, so it can
    be captured in a CUDA graph.

    Args:
        query: ``[num_tokens, num_heads, head_size]``, float16/bfloat16/float32; the
            last dimension contiguous.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_size]``
            views (any strides, last dimension contiguous), same device as ``query``.
        block_table: int32/int64 ``[num_reqs, max_blocks_per_req]``, rows contiguous.
        query_start_loc: int32 ``[num_reqs + 1]`` cumulative query lengths (on the
            kernel's device).
        seq_lens: int32 ``[num_reqs]`` tokens of each request including this step's.
        prompt_lens: int32/int64 ``[num_reqs]`` prompt length P of each request.
        spec: the layer's mask (:class:`~swaa_kernels.cpu.LayerMaskSpec`).
        scale: softmax scale.
        out: optional ``[>= num_tokens, num_heads, head_size]`` output buffer.
        max_query_len: longest query of the batch if known (host int); only picks
            the launch configuration.
        tile_visits: debugging hook, int32 ``[num_tokens, num_heads, max_tiles]``
            zeros; each program adds 1 per visited key tile (``TILE_N`` keys) to the
            rows it owns. ``None`` compiles the counting away.
        block_m, tile_n: override the launch configuration (tests).

    Returns:
        ``[num_tokens, num_heads, head_size]`` in ``query.dtype`` (``out`` if given).

    Raises:
        ValueError: if ``num_heads`` is not a multiple of ``num_kv_heads``, the dtypes
            of query and cache differ, or ``spec.window < 1``.
    """
    num_tokens, num_heads, head_size = query.shape
    _, kv_block_size, num_kv_heads, cache_head_size = key_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if cache_head_size != head_size or value_cache.shape != key_cache.shape:
        raise ValueError(f"cache shape {tuple(key_cache.shape)} does not match query head size {head_size}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"query dtype {query.dtype} != cache dtype {key_cache.dtype}/{value_cache.dtype}")
    if spec.window is not None and spec.window < 1:
        raise ValueError(f"window must be >= 1, got {spec.window}")
    if out is None:
        out = torch.empty_like(query)
    num_reqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_reqs == 0:
        return out[:num_tokens]
    group = num_heads // num_kv_heads
    cfg = kernel_config(group, head_size, max_query_len)
    if block_m is not None:
        cfg["BLOCK_M"], cfg["BLOCK_Q"] = block_m, block_m // group
        if cfg["BLOCK_Q"] < 1:
            raise ValueError(f"block_m={block_m} is smaller than the group of {group} query heads")
    if tile_n is not None:
        cfg["TILE_N"] = tile_n
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, got strides {tuple(t.stride())}")
    count = tile_visits is not None
    visits = tile_visits if count else out  # any pointer; never dereferenced without COUNT_TILES
    is_full = spec.window is None
    grid = (num_tokens // cfg["BLOCK_Q"] + num_reqs, num_kv_heads)
    _swaa_paged_kernel[grid](
        query, key_cache, value_cache, out, block_table, query_start_loc, seq_lens, prompt_lens,
        visits,
        float(scale) * 1.4426950408889634,  # log2(e): the kernel works in base 2
        num_reqs, num_heads,
        0 if is_full else spec.keep_first,
        0 if is_full else spec.window,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        tile_visits.stride(0) if count else 0,
        tile_visits.stride(1) if count else 0,
        IS_FULL=is_full,
        FA_DECODE=bool(spec.fa_decode),
        GROUP=group,
        BLOCK_Q=cfg["BLOCK_Q"],
        BLOCK_M=cfg["BLOCK_M"],
        TILE_N=cfg["TILE_N"],
        HEAD_SIZE=head_size,
        HEAD_PAD=triton.next_power_of_2(head_size),
        KV_BLOCK_SIZE=kv_block_size,
        COUNT_TILES=count,
        num_warps=cfg["num_warps"],
    )
    return out[:num_tokens]
