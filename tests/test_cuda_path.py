"""CPU-checkable pieces of the CUDA wiring (``swaa_vllm/platforms/cuda_path.py``): cache views and the graph-safe
write."""

from __future__ import annotations

import torch

from swaa_vllm.platforms.cuda_path import cuda_kv_views, write_kv_cache_cuda


def test_views_and_graph_safe_write():
    num_blocks, block_size, num_kv_heads, head_size = 4, 8, 2, 16
    # vLLM's logical [num_blocks, num_kv_heads, block_size, 2 * head_size], head-major memory.
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size)
    key_cache, value_cache = cuda_kv_views(kv_cache)
    assert key_cache.shape == (num_blocks, block_size, num_kv_heads, head_size)
    key, value = torch.randn(5, num_kv_heads, head_size), torch.randn(5, num_kv_heads, head_size)
    slots = torch.tensor([9, 30, -1, 17, -1])  # two padding tokens
    write_kv_cache_cuda(key, value, key_cache, value_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(kv_cache[slot // block_size, :, slot % block_size, :head_size], key[t])
            torch.testing.assert_close(kv_cache[slot // block_size, :, slot % block_size, head_size:], value[t])
    # Padding went to slot 0 (vLLM's null block) and nowhere else.
    written = kv_cache.abs().sum(dim=(1, 3)) > 0  # [num_blocks, block_size]
    assert written.nonzero().tolist() == [[0, 0], [1, 1], [2, 1], [3, 6]]
