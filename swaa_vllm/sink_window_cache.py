"""Sink-aware KV memory: layers that slide while decoding keep only their sinks and window.

A layer of a SWAA plan whose *generated* tokens also slide (``force_fa_decode``
false, or a list that leaves the layer out) never reads a key outside the first k
positions and the last W positions again, once its queries have moved past it
(``shared/SWAA.md``: query ``i`` sees ``j <= i`` with ``j < k`` or ``j > i - W``).
This module gives such layers a KV cache spec and manager that free those blocks,
registered through vLLM's KV cache spec registry (``vllm/v1/kv_cache_spec_registry.py``):

* :class:`SinkWindowSpec`, a ``SlidingWindowSpec`` that also carries the number of
  sink tokens. Being a sliding-window spec, it gets vLLM's own handling of
  sliding-window groups: the hybrid KV cache manager puts it in its own KV cache
  group next to the full-attention layers, and its per-request footprint
  (:meth:`SinkWindowSpec.max_admission_blocks_per_request`) is what vLLM's start-up
  KV capacity, its "Maximum concurrency" figure and the scheduler's admission use.
* :class:`SinkWindowManager`, the ``SingleTypeKVCacheManager`` of those groups,
  after vLLM's ``SlidingWindowManager`` (which frees a head prefix) and
  ``RSWAManager`` (which frees a middle gap), both in
  ``vllm/v1/core/single_type_kv_cache_manager.py``. It frees the *gap*
  :func:`gap_blocks` between the sink blocks and the window, keeps the sink blocks
  for the life of the request, and takes prefix-cache hits only where the sink
  blocks and the window before the hit point are all cached.

Only layers that slide while decoding get the spec (:func:`sink_window_kv_specs`,
called by the SWAA worker's ``get_kv_cache_spec``); full layers and FA-decode layers
keep vLLM's ``FullAttentionSpec``, so with the paper's recipe (FA decode on) nothing
changes.

**Bound.** Frees happen on vLLM's processed-token basis before each allocation
(``KVCacheManager.allocate_slots``), so with ``c`` tokens in flight (one step's
token budget, ``VllmConfig.max_in_flight_tokens``) a request holds at most
``ceil(k / B) + ceil((W - 1 + c) / B) + 1`` blocks of a sink-window group (B the
block size), and never more than ``ceil(max_model_len / B)``.

**Worker block tables.** vLLM sends the workers only newly allocated block ids, so
a worker's block-table row keeps the old ids of freed blocks, which may by then
belong to another request (the same as for vLLM's own sliding-window layers). The
attention paths therefore never load a key outside the sinks and the window of a
sliding row: the CPU path gathers exactly those positions, the Triton kernel masks
its key loads to them, the flash-attn path points the block-table entries before
the window at vLLM's null block (``tests/test_sink_window_kv.py`` poisons freed
blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from swaa_kernels.cpu import LayerMaskSpec
from swaa_vllm.config import SwaaPlan

logger = init_logger("vllm.swaa")  # under "vllm" so that vLLM's log config shows it

__all__ = [
    "SinkWindowManager",
    "SinkWindowSpec",
    "gap_blocks",
    "max_sink_window_blocks",
    "register_sink_window_spec",
    "sink_window_kv_specs",
]


def gap_blocks(num_computed_tokens: int, window: int, sink_tokens: int, block_size: int,
               extra_retained_tokens: int = 0) -> tuple[int, int]:
    """Blocks ``[first, end)`` that no query at position ``>= num_computed_tokens`` can see.

    A query at position ``i >= n`` of a sink-window layer sees keys ``j < k`` and
    ``j > i - W``, so keys ``[k, n - W + 1)`` are dead for good; a block is dead when
    all its ``block_size`` positions are. ``first == end`` when nothing is dead.

    Args:
        num_computed_tokens: n, tokens whose KV is computed and committed.
        window: W >= 1 (keys a query sees counting itself).
        sink_tokens: k >= 0.
        block_size: B, tokens per block.
        extra_retained_tokens: tokens kept below the window (vLLM's multi-token
            speculative prefill margin, ``SlidingWindowSpec.extra_retained_tokens``).
    """
    first = cdiv(sink_tokens, block_size)
    end = max(0, num_computed_tokens - window + 1 - extra_retained_tokens) // block_size
    return first, max(first, end)


def max_sink_window_blocks(window: int, sink_tokens: int, block_size: int, max_in_flight_tokens: int,
                           max_model_len: int, extra_retained_tokens: int = 0) -> int:
    """Most blocks one request holds in a sink-window group (the module docstring's bound).

    ``ceil(k / B)`` sink blocks plus vLLM's sliding-window bound for the window and the
    in-flight tokens (``SlidingWindowSpec.max_admission_blocks_per_request``: the
    window's last ``W - 1`` keys plus ``c`` in flight, plus one block for a window
    that does not start on a block boundary), capped at ``ceil(max_model_len / B)``.
    """
    window_tokens = min(window - 1 + extra_retained_tokens + max_in_flight_tokens, max_model_len)
    bound = cdiv(sink_tokens, block_size) + cdiv(window_tokens, block_size) + 1
    return min(bound, cdiv(max_model_len, block_size))


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """KV cache spec of a layer whose every query sees the first ``sink_tokens`` and the last W keys.

    Attributes:
        sliding_window: W (inherited from ``SlidingWindowSpec``).
        sink_tokens: k, the sink tokens kept for the life of the request.
    """

    sink_tokens: int

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """Per-request block cap: :func:`max_sink_window_blocks` (start-up sizing and admission)."""
        return max_sink_window_blocks(self.sliding_window, self.sink_tokens, self.block_size, max_in_flight_tokens,
                                      max_model_len, self.extra_retained_tokens)

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, SinkWindowSpec)
            and spec.sliding_window == self.sliding_window
            and spec.sink_tokens == self.sink_tokens
            for spec in kv_cache_specs.values()
        )


class SinkWindowManager(SingleTypeKVCacheManager):
    """Block manager of a :class:`SinkWindowSpec` group: frees the gap, keeps the sinks.

    The request's block list keeps its positions: freed blocks become vLLM's null
    block, as in ``SlidingWindowManager``, so block ``b`` always holds positions
    ``[b * B, (b + 1) * B)``.
    """

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sliding_window = kv_cache_spec.sliding_window
        self.sink_tokens = kv_cache_spec.sink_tokens
        self.extra_retained_tokens = kv_cache_spec.extra_retained_tokens

    def _gap(self, num_computed_tokens: int) -> tuple[int, int]:
        return gap_blocks(num_computed_tokens, self.sliding_window, self.sink_tokens, self.block_size,
                          self.extra_retained_tokens)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Free the gap blocks of ``processed_computed_tokens`` (replaced by the null block)."""
        del num_prompt_tokens  # the gap depends on positions only, not on the prompt length
        first, end = self._gap(processed_computed_tokens)
        self._remove_blocks_in_range(request_id, first, end)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        """As vLLM's, with the dead blocks in the middle of a new request's table rather than at its head."""
        if request_id in self.num_cached_block:  # running request: blocks are appended at the end
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
                num_tokens_main_model, apply_admission_cap, prefill_end,
            )
        num_required = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self.max_admission_blocks_per_request is not None:
            num_required = min(num_required, self.max_admission_blocks_per_request)
        num_req_blocks = len(self.req_to_blocks.get(request_id, ()))
        first, end = self._gap(total_computed_tokens)
        table_len = len(new_computed_blocks) + num_req_blocks
        if end > first:
            table_len = max(table_len, end)  # add_local_computed_blocks pads the gap with null blocks
        kept = [b for i, b in enumerate(new_computed_blocks, start=num_req_blocks) if not first <= i < end]
        # A kept hit block with no other user is taken out of the free queue.
        return max(num_required - table_len, 0) + self._get_num_evictable_blocks(kept)

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int, num_external_computed_tokens: int) -> None:
        """Adopt a prefix-cache hit: touch the sink and window blocks, null the gap."""
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        first, end = self._gap(num_local_computed_tokens + num_external_computed_tokens)
        table = [self._null_block if first <= i < end else b for i, b in enumerate(new_computed_blocks)]
        if self.enable_caching:
            self.block_pool.touch([b for b in table if not b.is_null])
        else:
            assert not any(new_computed_blocks), "Computed blocks should be empty when prefix caching is disabled"
        if end > first and end > len(table):
            table.extend([self._null_block] * (end - len(table)))
        req_blocks.extend(table)
        self.num_cached_block[request_id] = len(req_blocks)

    def allocate_external_computed_blocks(self, request_id: str, num_local_computed_tokens: int,
                                          num_external_computed_tokens: int, record_for_zeroing: bool = True) -> None:
        if num_external_computed_tokens > 0:
            # The swaa backend refuses KV connectors (SwaaAttentionBackend.supports_kv_connector).
            raise NotImplementedError("KV connectors are not supported with the swaa backend's sink-window layers")

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The longest hit ``L <= max_length`` whose sink blocks and window blocks are all cached.

        Queries from position L on need the blocks of ``[0, min(k, L))`` and of
        ``[L - W + 1, L)``; the blocks between are returned as null blocks. One pass
        from the right, each block hash looked up at most once: a miss at block ``j``
        rules out every hit whose needed range contains ``j``, so the next candidate
        ends at or before ``j``. A miss inside the sink blocks caps the hit at the
        cached prefix before it.
        """
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        if dcp_world_size != 1 or pcp_world_size != 1:
            raise NotImplementedError("decode/prefill context parallelism is not supported for sink-window layers")
        if drop_eagle_block:
            # EAGLE/MTP drafters are refused at start-up with the swaa backend (vllm_shims._check_model_supported).
            raise NotImplementedError("EAGLE-style speculative decoding is not supported with sink-window layers")
        block_size = kv_cache_spec.block_size
        block_hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, block_size,
                                            alignment_tokens=alignment_tokens)
        if alignment_tokens % block_size:
            raise NotImplementedError(f"cache-hit alignment {alignment_tokens} is not a multiple of the block size")
        align = alignment_tokens // block_size
        num_groups = len(kv_cache_group_ids)
        lookups: dict[int, list[KVCacheBlock] | None] = {}

        def cached(i: int) -> list[KVCacheBlock] | None:
            if i not in lookups:
                lookups[i] = block_pool.get_cached_block(block_hashes[i], kv_cache_group_ids)
            return lookups[i]

        num_sink_blocks = cdiv(kv_cache_spec.sink_tokens, block_size)
        max_blocks = min(max_length // block_size, len(block_hashes))
        sinks_cached = 0
        while sinks_cached < min(num_sink_blocks, max_blocks) and cached(sinks_cached):
            sinks_cached += 1
        if sinks_cached < min(num_sink_blocks, max_blocks):
            m = sinks_cached // align * align  # only the cached prefix before the missing sink block
            window_start = m
        else:
            m = max_blocks // align * align
            while True:
                if m <= num_sink_blocks:  # a prefix of the (cached) sink blocks
                    window_start = m
                    break
                window_start = max(max(0, m * block_size - kv_cache_spec.sliding_window + 1) // block_size,
                                   num_sink_blocks)
                miss = next((j for j in range(m - 1, window_start - 1, -1) if not cached(j)), None)
                if miss is None:
                    break
                m = miss // align * align
        null = block_pool.null_block
        hit: tuple[list[KVCacheBlock], ...] = tuple([] for _ in range(num_groups))
        for i in range(m):
            blocks = cached(i) if i < num_sink_blocks or i >= window_start else None
            for g in range(num_groups):
                hit[g].append(blocks[g] if blocks else null)
        return hit, m * block_size

    @classmethod
    def reachable_block_mask(cls, start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                             retention_interval=None, reachable_boundaries=(), dcp_world_size=1,
                             final_segment_end_block=None) -> list[bool] | None:
        """Cache every full block (vLLM's dense default): sink blocks serve every later hit."""
        return None


def register_sink_window_spec() -> None:
    """Register :class:`SinkWindowSpec` -> :class:`SinkWindowManager` in vLLM's KV cache spec registry.

    vLLM's registry fills itself with the built-in specs lazily and only while it is
    empty (``KVCacheSpecRegistry._ensure_registered``), so a plugin that registers
    first would leave the built-ins out: they are registered first here, through that
    same lazy step (pinned by ``tests/test_sink_window_kv.py``). Idempotent.
    :class:`SinkWindowSpec` is its own uniform type, so sink-window layers form their
    own KV cache groups.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def sink_window_kv_specs(kv_cache_spec: dict[str, KVCacheSpec], plan: SwaaPlan,
                         hybrid_manager_disabled: bool) -> tuple[dict[str, KVCacheSpec], list[int], str | None]:
    """Give the layers that slide while decoding a :class:`SinkWindowSpec`.

    Args:
        kv_cache_spec: vLLM's per-layer specs (layer name -> spec) of one worker.
        plan: the model's SWAA plan (global layer indices).
        hybrid_manager_disabled: ``scheduler_config.disable_hybrid_kv_cache_manager``.

    Returns:
        ``(specs, layers, reason)``: the specs to hand to vLLM, the global indices of
        the layers now freeing memory, and why layers that slide while decoding keep
        every block (None if none do).
    """
    from vllm.model_executor.models.utils import extract_layer_index

    candidates: dict[str, tuple[int, LayerMaskSpec]] = {}
    for name in kv_cache_spec:
        index = extract_layer_index(name)
        mask = plan.for_layer(index)
        if not (mask.is_full or mask.fa_decode):
            candidates[name] = (index, mask)
    if not candidates:
        return kv_cache_spec, [], None
    if not all(
        type(spec) is FullAttentionSpec and spec.sliding_window is None
        and spec.attention_chunk_size is None and not spec.non_causal
        for spec in (kv_cache_spec[name] for name in candidates)
    ):
        return kv_cache_spec, [], "their vLLM KV cache spec is not plain full attention"
    if hybrid_manager_disabled and len(candidates) != len(kv_cache_spec):
        return kv_cache_spec, [], (
            "vLLM's hybrid KV cache manager is disabled (--disable-hybrid-kv-cache-manager, or a KV connector); "
            "leave it enabled to free their memory"
        )
    specs = dict(kv_cache_spec)
    for name, (_, mask) in candidates.items():
        # FullAttentionSpec's own fields beyond AttentionSpec (checked unset above) have no SinkWindowSpec twin.
        specs[name] = replace_as(kv_cache_spec[name], SinkWindowSpec, drop=("attention_chunk_size", "non_causal"),
                                 sliding_window=mask.window, sink_tokens=mask.keep_first)
    return specs, sorted({index for index, _ in candidates.values()}), None
