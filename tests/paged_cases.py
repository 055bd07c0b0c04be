"""Random paged batches and their dense SWAA reference, for the GPU-path kernel tests.

A batch is a list of requests ``(seq_len, q_len, prompt_len)``: the request's
queries are its last ``q_len`` positions, the cache holds all ``seq_len`` keys in
randomly chosen blocks of a shared pool (block table rows are random
permutations, unused cache slots hold NaN so a stray read shows), and the
expected output of each request is

    reference_attention(q, k_all, v_all, swaa_mask(q_pos, arange(seq_len), P, W, k, fa_decode), scale)

from :mod:`swaa_kernels.reference` on the dense, unpaged keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.reference import reference_attention, swaa_mask


@dataclass(repr=False)
class PagedBatch:
    """Inputs of ``paged_swaa_attention``-style kernels plus the dense K/V per request."""

    reqs: list[tuple[int, int, int]]  # (seq_len, q_len, prompt_len)
    query: torch.Tensor  # [num_tokens, H, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D] view (values interleaved, as in the backend)
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    prompt_lens: torch.Tensor  # int32 [num_reqs]
    dense_keys: list[torch.Tensor]  # per request [seq_len, Hkv, D]
    dense_values: list[torch.Tensor]

    def kernel_args(self) -> tuple:
        return (self.query, self.key_cache, self.value_cache, self.block_table,
                self.query_start_loc, self.seq_lens, self.prompt_lens)


def make_batch(
    reqs: list[tuple[int, int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    null_block: bool = False,
) -> PagedBatch:
    """Random queries and a paged cache for ``reqs`` (see the module docstring).

    ``null_block``: block 0 is vLLM's null block (zeros, in no request's table), as in
    a real cache, for tests that point block-table entries at it.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s, _, _ in reqs]
    max_blocks = max(max(blocks_per_req), 1)
    num_blocks = sum(blocks_per_req) + 3  # a few never-used blocks
    kv = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_size), float("nan"), dtype=dtype)
    key_cache, value_cache = kv[..., :head_size], kv[..., head_size:]
    perm = torch.randperm(num_blocks, generator=gen)
    if null_block:
        kv[0] = 0.0
        perm = perm[perm != 0]
    block_table = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    dense_keys, dense_values = [], []
    used = 0
    for r, (seq_len, q_len, _) in enumerate(reqs):
        if q_len > seq_len:
            raise ValueError(f"request {r}: q_len {q_len} > seq_len {seq_len}")
        nb = blocks_per_req[r]
        block_table[r, :nb] = perm[used : used + nb].int()
        used += nb
        k = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        for p in range(seq_len):
            b = int(block_table[r, p // block_size])
            key_cache[b, p % block_size] = k[p]
            value_cache[b, p % block_size] = v[p]
        dense_keys.append(k)
        dense_values.append(v)
    q_lens = [q for _, q, _ in reqs]
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_size, generator=gen).to(dtype)
    return PagedBatch(
        reqs=list(reqs),
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor([s for s, _, _ in reqs], dtype=torch.int32),
        prompt_lens=torch.tensor([p for _, _, p in reqs], dtype=torch.int32),
        dense_keys=dense_keys,
        dense_values=dense_values,
    )


def reference_output(batch: PagedBatch, spec: LayerMaskSpec, scale: float) -> torch.Tensor:
    """float64 ``[num_tokens, H, D]``: the dense reference of every request of ``batch``."""
    out = torch.zeros(batch.query.shape, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for r, (seq_len, q_len, prompt_len) in enumerate(batch.reqs):
        if q_len == 0:
            continue
        q_pos = torch.arange(seq_len - q_len, seq_len)
        mask = swaa_mask(q_pos, torch.arange(seq_len), prompt_len, spec.window, spec.keep_first, spec.fa_decode)
        out[starts[r] : starts[r + 1]] = reference_attention(
            batch.query[starts[r] : starts[r + 1]], batch.dense_keys[r], batch.dense_values[r], mask, scale
        )
    return out


def poison_freed_blocks(batch: PagedBatch, spec: LayerMaskSpec) -> int:
    """NaN into the blocks vLLM's sink-window manager would have freed; returns how many.

    For a layer that slides while decoding, the blocks of request ``r`` that no query
    at a position ``>= seq_len - q_len`` can see (``swaa_vllm.sink_window_cache.gap_blocks``,
    restated here: fully inside ``[k, first_query - W + 1)``) are freed by the KV manager
    while the worker's block table still names them. An attention that loads one, even
    under a zero weight, turns NaN.
    """
    if spec.window is None or spec.fa_decode:
        return 0
    block_size = batch.key_cache.shape[1]
    poisoned = 0
    for r, (seq_len, q_len, _) in enumerate(batch.reqs):
        first_query = seq_len - q_len
        for b in range(-(-spec.keep_first // block_size), max(0, first_query - spec.window + 1) // block_size):
            block = int(batch.block_table[r, b])
            batch.key_cache[block] = float("nan")
            batch.value_cache[block] = float("nan")
            poisoned += 1
    return poisoned


# Layers that slide while decoding (their KV is freed outside sinks and window), for the freed-block tests.
SLIDING_DECODE_SPECS = {
    "W1_k0": LayerMaskSpec(1, 0, False),
    "W5_k3": LayerMaskSpec(5, 3, False),
    "W4_k10_k_ge_W": LayerMaskSpec(4, 10, False),
    "W16_k2": LayerMaskSpec(16, 2, False),
}
# Requests whose first query is far past sinks + window, so blocks between are freed.
LONG_BATCH = [(90, 1, 40), (100, 30, 100), (77, 12, 50), (64, 1, 64)]


# Edge-case batch shared by the GPU-path tests: (seq_len, q_len, prompt_len) per request
# (see make_batch): whole prompts, chunks straddling the prompt end, decode rows, a chunk
# of a prompt longer than the sequence so far.
EDGE_BATCH = [(40, 40, 30), (50, 3, 20), (17, 17, 17), (33, 1, 10), (9, 0, 9), (60, 25, 50), (45, 20, 45), (30, 10, 80)]

# W and k edge cases: W=1, k=0, k >= W, k beyond the sequence, W beyond the sequence, FA decode on/off.
EDGE_SPECS = {
    "W1_k0": LayerMaskSpec(1, 0, False),
    "W1_k0_fa": LayerMaskSpec(1, 0, True),
    "W1_k5_fa": LayerMaskSpec(1, 5, True),
    "W5_k3_fa": LayerMaskSpec(5, 3, True),
    "W4_k10_k_ge_W": LayerMaskSpec(4, 10, False),
    "W7_k100_k_beyond_seq_fa": LayerMaskSpec(7, 100, True),
    "W16_k0_fa": LayerMaskSpec(16, 0, True),
    "W200_k5_W_beyond_seq": LayerMaskSpec(200, 5, False),
    "full": LayerMaskSpec(None),
}
