"""SWAA attention over a paged KV cache on CPU.

The path for every CPU forward of the ``swaa`` vLLM backend; it needs only torch.

**Row classes.** Within one layer and one scheduler step, each query row (a token at
absolute position ``i`` of a request with prompt length ``P``) falls in one of three
classes, fixed by ``shared/SWAA.md``'s rule (:func:`plan_rows`):

* *causal*: the row sees every key ``j <= i``. Rows of full-attention layers,
  generated rows of FA-decode layers, and prompt rows of a sliding layer whose
  window already reaches the sinks (``i - W + 1 <= k``, so sinks plus window is
  ``[0, i]``).
* *windowed*: the row sees ``(i - W, i]``. Sliding rows of a layer without sinks
  (``k == 0``).
* *sink-window*: the row sees ``[0, k)`` and ``(i - W, i]``, two disjoint ranges
  (``i >= W + k``). Sliding rows of a layer with sinks.

Causal and windowed rows go to a *paged attention primitive*
(:data:`PagedAttention`): by default :func:`torch_paged_attention` (plain torch,
this module), in the vLLM backend vLLM's own C++ CPU attention op
(``swaa_vllm.platforms.cpu_attention_op``), the kernel behind vLLM's ``CPU_ATTN`` backend, so
full-attention layers and full-attention decode run exactly as fast as there.
Sink-window rows, which no library kernel expresses, read only their keys (the sinks
and the window of the run's rows), so a sliding layer's prefill costs
O(n * (W + k)), not O(n^2 / 2). They are attended either by this project's C++
kernel (``sink_window_kernel="native"``, :mod:`swaa_kernels.sink_window_native`:
flash-attention with the two key ranges, AVX-512) or in torch, in query tiles of
``query_tile`` rows whose exact mask is applied by torch's fused
``scaled_dot_product_attention`` (``"torch"``).

**Cache layout** (vLLM's CPU attention layout, ISA ``vec``/``vec16``; checked against
vLLM's own writer by ``tests/test_cpu_kernel.py`` and at backend start-up): one
layer's cache is ``kv_cache`` ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
(contiguous). Per block and KV head, the first ``block_size * head_size`` elements
hold the keys *transposed* (``[head_size, block_size]``), the next ones the values
(``[block_size, head_size]``). The token at absolute position ``p`` of request ``r``
is at offset ``p % block_size`` of block ``block_table[r, p // block_size]``.

On CPUs with AMX, vLLM's op picks ISA ``amx`` for bfloat16 caches (block and head size
multiples of 32) and packs the same tensor differently (:func:`amx_key_value_blocks`,
:func:`write_kv_cache_amx`). The native sink-window kernel reads that layout too
(``cache_layout="amx"`` of :func:`paged_swaa_attention`); the torch paths here read ``vec``
only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from swaa_kernels.sink_window_native import native_sink_window_attention, supports

__all__ = [
    "CACHE_LAYOUTS",
    "FULL_ATTENTION",
    "LayerMaskSpec",
    "amx_key_value_blocks",
    "PagedAttention",
    "PagedBatch",
    "RowPlan",
    "key_blocks",
    "paged_swaa_attention",
    "plan_rows",
    "torch_paged_attention",
    "value_blocks",
    "write_kv_cache",
    "write_kv_cache_amx",
]

#: The cache layouts the CPU path reads: vLLM's CPU attention op with ISA ``vec``/``vec16``, and ``amx``.
CACHE_LAYOUTS = ("vec", "amx")


@dataclass(frozen=True)
class LayerMaskSpec:
    """The SWAA mask parameters of one layer (``shared/SWAA.md``).

    Attributes:
        window: W >= 1, keys a prompt token sees counting itself; None for a
            full-attention layer (then ``keep_first`` and ``fa_decode`` are moot).
        keep_first: k >= 0, sink tokens every query of a sliding layer also sees.
        fa_decode: generated tokens (position >= prompt length) use full attention.
    """

    window: int | None
    keep_first: int = 0
    fa_decode: bool = False

    @property
    def is_full(self) -> bool:
        """True for a layer with full causal attention everywhere."""
        return self.window is None


FULL_ATTENTION = LayerMaskSpec(window=None)


# ---------------------------------------------------------------------------
# Cache layout.
# ---------------------------------------------------------------------------


def key_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """Keys of a layer cache, ``[num_blocks, num_kv_heads, head_size, block_size]`` (a view).

    Args:
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, contiguous.
    """
    nb, hkv, bs, d2 = kv_cache.shape
    return kv_cache.view(nb, hkv, 2, d2 // 2, bs)[:, :, 0]


def value_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """Values of a layer cache, ``[num_blocks, num_kv_heads, block_size, head_size]`` (a view)."""
    nb, hkv, bs, d2 = kv_cache.shape
    return kv_cache.view(nb, hkv, 2, bs, d2 // 2)[:, :, 1]


def _valid_slots(
    key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The writers' common step: ``(key, value, blocks, offsets)`` of the tokens whose slot is not padding.

    ``slot_mapping`` entries past ``key.shape[0]`` are ignored, negative ones (padding) dropped with their rows.
    """
    slots = slot_mapping[: key.shape[0]].long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    return key, value, slots // block_size, slots % block_size


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys and values into the paged cache (plain torch).

    The same result as vLLM's ``cpu_attn_reshape_and_cache`` with ISA ``vec``/``vec16``
    (the backend calls that op; this one serves use without vLLM and the tests).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_size]``, any float dtype (cast to
            the cache dtype).
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, written in place.
        slot_mapping: int ``[>= num_tokens]``; slot ``block_id * block_size + offset`` of
            each token, negative for padding tokens (skipped); entries past
            ``num_tokens`` are ignored.
    """
    key, value, blocks, offsets = _valid_slots(key, value, slot_mapping, kv_cache.shape[2])
    kb, vb = key_blocks(kv_cache), value_blocks(kv_cache)
    # Advanced indices on dims 0 and 3 (keys) / 0 and 2 (values): rows are [tokens, Hkv, D].
    kb[blocks, :, :, offsets] = key.to(kv_cache.dtype)
    vb[blocks, :, offsets, :] = value.to(kv_cache.dtype)


def _amx_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The AMX layout's 6-D views: keys ``[nb, Hkv, bs/16, D/2, 16, 2]``, values ``[nb, Hkv, D/16, bs/2, 16, 2]``."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    if kv_cache.dtype != torch.bfloat16 or bs % 32 or d % 32:
        raise ValueError(
            f"vLLM's AMX cache layout exists for bfloat16 caches with block and head sizes that are multiples of 32, "
            f"got {kv_cache.dtype}, block_size={bs}, head_size={d}"
        )
    regions = kv_cache.view(nb, hkv, 2, bs * d)
    keys = regions[:, :, 0].view(nb, hkv, bs // 16, d // 2, 16, 2)
    return keys, regions[:, :, 1].view(nb, hkv, d // 16, bs // 2, 16, 2)


def amx_key_value_blocks(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a cache in vLLM's AMX layout, ``[num_blocks, num_kv_heads, block_size, head_size]`` each.

    Copies (the layout is not a strided view of that shape).

    vLLM's ``cpu_attn_reshape_and_cache`` with ISA ``amx`` (``csrc/cpu/cpu_attn_amx.hpp``) stores, per block
    and KV head, the keys as AMX B tiles of 16 keys with head dimensions in pairs (``[bs / 16][D / 2][16][2]``),
    then the values with 16 head dimensions per tile and keys in pairs (``[D / 16][bs / 2][16][2]``); checked
    bit for bit against vLLM's writer (``tests/test_sink_window_native.py``, and at backend start-up).

    Raises:
        ValueError: for a cache that is not bfloat16 or whose block or head size is not a multiple of 32.
    """
    keys, values = _amx_views(kv_cache)
    nb, hkv, bs, d2 = kv_cache.shape
    k = keys.permute(0, 1, 2, 4, 3, 5).reshape(nb, hkv, bs, d2 // 2)
    v = values.permute(0, 1, 3, 5, 2, 4).reshape(nb, hkv, bs, d2 // 2)
    return k, v


def write_kv_cache_amx(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """:func:`write_kv_cache` into vLLM's AMX layout (:func:`amx_key_value_blocks`); plain torch.

    Raises:
        ValueError: as :func:`amx_key_value_blocks`.
    """
    keys, values = _amx_views(kv_cache)
    key, value, blocks, offsets = _valid_slots(key, value, slot_mapping, kv_cache.shape[2])
    n, hkv, d = key.shape
    # Advanced indices on dims 0, 2, 4 (keys) / 0, 3, 5 (values) go first: [n, Hkv, D / 2, 2] / [n, Hkv, D / 16, 16].
    keys[blocks, :, offsets // 16, :, offsets % 16, :] = key.to(kv_cache.dtype).view(n, hkv, d // 2, 2)
    values[blocks, :, :, offsets // 2, :, offsets % 2] = value.to(kv_cache.dtype).view(n, hkv, d // 16, 16)


def _gather_keys(
    kv_cache: torch.Tensor, block_row: torch.Tensor, ranges: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and positions of the given position ranges of one request.

    Reads whole blocks, then keeps exactly the positions asked for, so slots that
    were never written (past the sequence end) never enter the attention.

    Args:
        kv_cache: a layer cache (see the module docstring).
        block_row: int ``[max_blocks]``, the request's block-table row.
        ranges: ascending, disjoint ``[lo, hi)`` position ranges.

    Returns:
        ``(keys [Hkv, L, D], values [Hkv, L, D], positions int64 [L])``.
    """
    bs = kv_cache.shape[2]
    kb, vb = key_blocks(kv_cache), value_blocks(kv_cache)
    hkv, d = kb.shape[1], kb.shape[2]
    keys, values, positions = [], [], []
    for lo, hi in ranges:
        b0, b1 = lo // bs, (hi - 1) // bs + 1
        ids = block_row[b0:b1].long()
        n = (b1 - b0) * bs
        k = kb.index_select(0, ids).permute(1, 0, 3, 2).reshape(hkv, n, d)
        v = vb.index_select(0, ids).permute(1, 0, 2, 3).reshape(hkv, n, d)
        keys.append(k[:, lo - b0 * bs : hi - b0 * bs])
        values.append(v[:, lo - b0 * bs : hi - b0 * bs])
        positions.append(torch.arange(lo, hi))
    if len(ranges) == 1:
        return keys[0], values[0], positions[0]
    return torch.cat(keys, 1), torch.cat(values, 1), torch.cat(positions)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            mask_grouped: bool = False) -> torch.Tensor:
    """Fused attention of one tile, grouped-query heads folded into the query axis.

    ``q`` ``[T, H, D]``, ``k``/``v`` ``[Hkv, L, D]``, ``mask`` bool ``[T, L]`` (True =
    attend) or None (all visible); with ``mask_grouped``, an additive float mask already stacked
    per grouped head, ``[group * T, L]``. Query head ``h`` reads KV head ``h // (H // Hkv)``;
    its rows are stacked per KV head as ``[1, Hkv, group * T, D]`` so every KV head is
    read once. The 4-D call matters: torch's CPU flash kernel serves it, while a 3-D
    call takes a path ~3.5x slower (measured, bundled shapes, 128-row tiles).
    Returns ``[T, H, D]`` in ``q.dtype``.
    """
    t, h, d = q.shape
    hkv = k.shape[0]
    group = h // hkv
    qg = q.view(t, hkv, group, d).permute(1, 2, 0, 3).reshape(1, hkv, group * t, d)
    if mask is not None and group > 1 and not mask_grouped:
        mask = mask.repeat(group, 1)
    o = F.scaled_dot_product_attention(qg, k.to(q.dtype)[None], v.to(q.dtype)[None], attn_mask=mask, scale=scale)
    return o.view(hkv, group, t, d).permute(2, 0, 1, 3).reshape(t, h, d)


def _band_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None, sinks: int
) -> torch.Tensor:
    """Bool ``[T, L]``: ``j <= i`` and (no window, or ``j < sinks``, or ``j > i - window``)."""
    i = query_positions[:, None]
    j = key_positions[None, :]
    mask = j <= i
    if window is not None:
        mask &= (j < sinks) | (j > i - window)
    return mask


# ---------------------------------------------------------------------------
# Row classes.
# ---------------------------------------------------------------------------


@dataclass
class PagedBatch:
    """Query rows handed to a paged attention primitive, as a batch of segments.

    A segment is a run of consecutive query rows of one request whose last row is the
    last key it may see; a request can give several segments (e.g. its early prompt
    rows and its generated rows). All tensors are CPU tensors.

    Attributes:
        rows: int64 ``[num_rows]`` indices of the rows into the step's queries, or
            None when the segments are exactly the step's requests (no gather).
        query_start_loc: int32 ``[num_segments + 1]`` cumulative segment lengths.
        seq_lens: int32 ``[num_segments]`` keys of each segment (its last row's position + 1).
        block_table: int32 ``[num_segments, max_blocks]`` each segment's request row.
        window: W for windowed rows (keys ``(i - W, i]``), None for causal rows.
        prepared: scratch space where a primitive caches per-step state (e.g. vLLM's
            scheduler metadata), keyed by the primitive.
    """

    rows: torch.Tensor | None
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    window: int | None
    prepared: dict = field(default_factory=dict)
    #: Query rows of all segments (``query_start_loc[-1]``), read once: every layer of a step asks.
    num_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_rows = int(self.query_start_loc[-1])


@dataclass
class RowPlan:
    """Where each query row of one step goes for one layer spec (see the module docstring).

    Attributes:
        causal: rows that see every earlier key, or None.
        windowed: rows that see ``(i - W, i]``, or None.
        sink_window: ``(request, first_row, end_row, first_position)`` runs of rows
            that see ``[0, k)`` and ``(i - W, i]``.
    """

    causal: PagedBatch | None
    windowed: PagedBatch | None
    sink_window: list[tuple[int, int, int, int]]


def _paged_batch(
    segments: list[tuple[int, int, int, int]],
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    window: int | None,
) -> PagedBatch | None:
    """Segments ``(request, first_row, end_row, seq_len)`` -> :class:`PagedBatch`."""
    if not segments:
        return None
    num_reqs = seq_lens.shape[0]
    starts = query_start_loc.tolist()
    identity = len(segments) == num_reqs and all(
        s == (r, starts[r], starts[r + 1], n) for r, (s, n) in enumerate(zip(segments, seq_lens.tolist(), strict=True))
    )
    if identity:
        return PagedBatch(None, query_start_loc.to(torch.int32), seq_lens.to(torch.int32), block_table, window)
    lengths = [end - first for _, first, end, _ in segments]
    qsl = torch.zeros(len(segments) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    rows = torch.cat([torch.arange(first, end) for _, first, end, _ in segments])
    requests = torch.tensor([r for r, *_ in segments])
    return PagedBatch(
        rows,
        qsl,
        torch.tensor([n for *_, n in segments], dtype=torch.int32),
        block_table.index_select(0, requests),
        window,
    )


def plan_rows(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    block_table: torch.Tensor,
    spec: LayerMaskSpec,
) -> RowPlan:
    """Split one step's query rows into the causal, windowed and sink-window classes.

    The queries of request ``r`` are rows ``query_start_loc[r]:query_start_loc[r+1]``
    at positions ``seq_lens[r] - q_len .. seq_lens[r] - 1``; a row is a prompt row iff
    its position is below ``prompt_lens[r]`` (``shared/SWAA.md``: roles come from
    positions, never from how the scheduler batched them). Costs O(num_reqs) Python
    work, independent of context length; computed once per step and spec.

    Args:
        query_start_loc: int ``[num_reqs + 1]`` (CPU).
        seq_lens: int ``[num_reqs]`` tokens of each request including this step's.
        prompt_lens: int ``[num_reqs]``.
        block_table: int32 ``[num_reqs, max_blocks]``.
        spec: the layer's mask.

    Raises:
        ValueError: if a request's query is longer than its sequence.
    """
    starts = query_start_loc.tolist()
    causal, windowed, sink_window = [], [], []
    for r, (kv_len, prompt_len) in enumerate(zip(seq_lens.tolist(), prompt_lens.tolist(), strict=True)):
        first_row, end_row = starts[r], starts[r + 1]
        q_len = end_row - first_row
        context = kv_len - q_len
        if context < 0:
            raise ValueError(f"request {r}: query length {q_len} exceeds sequence length {kv_len}")
        if q_len == 0:
            continue

        def row(position: int, first_row: int = first_row, context: int = context) -> int:
            return first_row + position - context

        if spec.is_full:
            causal.append((r, first_row, end_row, kv_len))
            continue
        generated_from = min(max(prompt_len, context), kv_len)  # first generated position among the rows
        sliding_end = generated_from if spec.fa_decode else kv_len  # sliding rows: [context, sliding_end)
        if spec.keep_first == 0:
            if sliding_end > context:
                windowed.append((r, first_row, row(sliding_end), sliding_end))
        else:
            # Rows below W + k see [0, i] (their window starts inside the sinks).
            split = min(max(spec.window + spec.keep_first, context), sliding_end)
            if split > context:
                causal.append((r, first_row, row(split), split))
            if sliding_end > split:
                sink_window.append((r, row(split), row(sliding_end), split))
        if sliding_end < kv_len:
            causal.append((r, row(sliding_end), end_row, kv_len))
    return RowPlan(
        causal=_paged_batch(causal, query_start_loc, seq_lens, block_table, None),
        windowed=_paged_batch(windowed, query_start_loc, seq_lens, block_table, spec.window),
        sink_window=sink_window,
    )


# ---------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------

#: A paged attention primitive: ``fn(query, kv_cache, batch, scale, out)`` writes, for
#: every segment of ``batch``, the attention of its rows ``query[qsl[s]:qsl[s+1]]``
#: (``[num_rows, H, D]``, the last rows of a ``seq_lens[s]``-key sequence) over keys
#: ``j <= i`` (and ``j > i - batch.window`` if set) into ``out`` (same shape).
PagedAttention = Callable[[torch.Tensor, torch.Tensor, PagedBatch, float, torch.Tensor], None]


def _attend_tile(
    query: torch.Tensor,
    out: torch.Tensor,
    t0: int,
    t1: int,
    p0: int,
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    ranges: list[tuple[int, int]],
    window: int | None,
    sinks: int,
    scale: float,
) -> None:
    """Rows ``t0:t1`` (positions from ``p0``) attend the keys of ``ranges`` under the band mask."""
    k, v, kpos = _gather_keys(kv_cache, block_row, ranges)
    mask = _band_mask(torch.arange(p0, p0 + t1 - t0), kpos, window, sinks)
    out[t0:t1] = _attend(query[t0:t1], k, v, None if t1 - t0 == 1 else mask, scale)


def torch_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    out: torch.Tensor,
    query_tile: int = 128,
) -> None:
    """Plain-torch :data:`PagedAttention` (causal or windowed), in query tiles.

    Each tile of a segment is given the keys ``[0, end)`` (causal) or
    ``[start - W + 1, end)`` (windowed) and attended with torch's fused attention.
    Used without vLLM and by the tests; the vLLM backend uses vLLM's C++ op instead.
    """
    starts = batch.query_start_loc.tolist()
    for s, kv_len in enumerate(batch.seq_lens.tolist()):
        first, end = starts[s], starts[s + 1]
        context = kv_len - (end - first)
        for t0 in range(first, end, query_tile):
            t1 = min(t0 + query_tile, end)
            p0, p1 = context + t0 - first, context + t1 - first  # positions of the tile's rows
            lo = 0 if batch.window is None else max(0, p0 - batch.window + 1)
            _attend_tile(query, out, t0, t1, p0, kv_cache, batch.block_table[s], [(lo, p1)], batch.window, 0, scale)


@functools.lru_cache(maxsize=64)
def _sink_window_tile_mask(rows: int, window: int, sinks: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[group * rows, sinks + window + rows - 1]`` of a sink-window tile (0 = attend, -inf not).

    The tile's rows sit at positions ``p0 .. p0 + rows - 1`` with ``p0 >= W + k``; its keys are the sinks
    ``[0, k)`` (every row sees them all) followed by the window keys at positions ``p0 - W + 1 + u``,
    ``u = 0 .. W + rows - 2``; row ``t`` sees window key ``u`` iff ``t <= u <= t + W - 1``
    (``j > i - W`` and ``j <= i``). The pattern does not depend on ``p0``, so it is built once per shape;
    rows are stacked ``group`` times, the order :func:`_attend` folds grouped-query heads in.
    """
    t = torch.arange(rows)[:, None]
    u = torch.arange(window + rows - 1)[None, :]
    visible = torch.cat([torch.ones(rows, sinks, dtype=torch.bool), (u >= t) & (u <= t + window - 1)], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return mask.repeat(group, 1)


def _sink_window_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    runs: list[tuple[int, int, int, int]],
    spec: LayerMaskSpec,
    scale: float,
    out: torch.Tensor,
    query_tile: int,
    native: bool,
    amx_layout: bool = False,
    amx_tiles: bool = True,
) -> None:
    """Sink-window rows (positions >= W + k): keys ``[0, k)`` + each row's window.

    With ``native``, each run (rows of one request from position ``p``) goes to the C++ kernel
    (:mod:`swaa_kernels.sink_window_native`), which reads its keys from the paged cache itself.
    Otherwise the run's keys ``[0, k)`` and ``[p - W + 1, p_end)`` are read from the paged cache once
    (one gather, :func:`_gather_keys`), and each tile of ``query_tile`` rows copies its
    window slice next to the sinks in a tile buffer and attends with the cached mask of
    :func:`_sink_window_tile_mask` (torch's fused CPU attention with an additive mask). Reading the
    cache per tile instead cost ~(W + tile) / tile gathers of every key; building the mask per tile
    cost as much again (measured: 2k-token float32 layer, AVX2).
    """
    k_sinks, window = spec.keep_first, spec.window
    h, d = query.shape[1], query.shape[2]
    for r, first, end, position in runs:
        if native:
            native_sink_window_attention(query[first:end], kv_cache, block_table[r], out[first:end], k_sinks, window,
                                         position, scale, amx_layout, amx_tiles)
            continue
        lo, hi = position - window + 1, position + end - first  # window keys of the whole run
        # position >= W + k, so lo > k: the two ranges are disjoint.
        keys, values, _ = _gather_keys(kv_cache, block_table[r], [(0, k_sinks), (lo, hi)])
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        hkv = keys.shape[0]
        group = h // hkv
        span = k_sinks + window + min(query_tile, end - first) - 1
        tile_k = torch.empty(hkv, span, d, dtype=query.dtype)
        tile_v = torch.empty_like(tile_k)
        tile_k[:, :k_sinks] = keys[:, :k_sinks]
        tile_v[:, :k_sinks] = values[:, :k_sinks]
        for t0 in range(first, end, query_tile):
            t1 = min(t0 + query_tile, end)
            rows = t1 - t0
            a = k_sinks + (t0 - first)  # the tile's first window key in the gathered keys
            n = window + rows - 1
            tile_k[:, k_sinks:k_sinks + n] = keys[:, a:a + n]
            tile_v[:, k_sinks:k_sinks + n] = values[:, a:a + n]
            mask = None if rows == 1 else _sink_window_tile_mask(rows, window, k_sinks, group, query.dtype)
            out[t0:t1] = _attend(query[t0:t1], tile_k[:, :k_sinks + n], tile_v[:, :k_sinks + n], mask, scale,
                                 mask_grouped=True)


def _run_batch(
    fn: PagedAttention, query: torch.Tensor, kv_cache: torch.Tensor, batch: PagedBatch, scale: float, out: torch.Tensor
) -> None:
    if batch.rows is None:  # the step's rows themselves (slicing only if the buffers are padded)
        n = batch.num_rows
        fn(query if query.shape[0] == n else query[:n], kv_cache, batch, scale, out if out.shape[0] == n else out[:n])
        return
    q = query.index_select(0, batch.rows)
    o = torch.empty_like(q)
    fn(q, kv_cache, batch, scale, o)
    out.index_copy_(0, batch.rows, o)


def paged_swaa_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    spec: LayerMaskSpec,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    plan: RowPlan | None = None,
    paged_attention: PagedAttention = torch_paged_attention,
    query_tile: int = 128,
    sink_window_kernel: str = "torch",
    cache_layout: str = "vec",
    amx_tiles: bool = True,
) -> torch.Tensor:
    """SWAA attention of a batch of requests whose keys are in a paged cache.

    The queries of request ``r`` are rows ``query_start_loc[r]:query_start_loc[r+1]``
    and sit at the last positions of its ``seq_lens[r]`` tokens (their keys are
    already in the cache: write them with :func:`write_kv_cache` first). A row is a
    prompt token iff its position is below ``prompt_lens[r]``.

    Args:
        query: ``[num_tokens, num_heads, head_size]``, float16/bfloat16/float32, same
            dtype as the cache.
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (module docstring).
        block_table: int32 ``[num_reqs, max_blocks_per_req]``.
        query_start_loc: int ``[num_reqs + 1]`` cumulative query lengths (CPU).
        seq_lens: int ``[num_reqs]`` tokens of each request including this step's.
        prompt_lens: int ``[num_reqs]`` prompt length P of each request.
        spec: the layer's mask parameters.
        scale: softmax scale.
        out: optional ``[>= num_tokens, num_heads, head_size]`` output buffer.
        plan: :func:`plan_rows` of these arguments, when the caller caches it per step.
        paged_attention: the primitive for causal and windowed rows.
        query_tile: query rows per sink-window attention call of the torch path.
        sink_window_kernel: ``"torch"`` (fused torch attention per query tile) or ``"native"``
            (:mod:`swaa_kernels.sink_window_native`, built on first use). A head layout the native
            kernel does not serve (:func:`~swaa_kernels.sink_window_native.supports`) takes the
            torch path.
        cache_layout: ``"vec"`` (the module docstring) or ``"amx"`` (:func:`amx_key_value_blocks`: the cache
            was written by vLLM's op with ISA ``amx``; ``paged_attention`` must read it too, and
            sink-window rows need the native kernel).
        amx_tiles: the native kernel may run bfloat16 on AMX tiles where the CPU has them (default); False
            takes its VDPBF16PS path, as on CPUs with AVX512_BF16 but no AMX (tests and benchmarks of that path).

    Returns:
        ``[num_tokens, num_heads, head_size]`` in ``query.dtype`` (``out`` if given).

    Raises:
        ValueError: if a request's query is longer than its sequence, ``sink_window_kernel``
            is not ``"torch"`` or ``"native"``, ``cache_layout`` is not ``"vec"`` or ``"amx"``, or an
            ``"amx"`` cache meets a torch reader (``torch_paged_attention``, or sink-window rows on the torch path).
    """
    if sink_window_kernel not in ("torch", "native"):
        raise ValueError(f"sink_window_kernel must be 'torch' or 'native', got {sink_window_kernel!r}")
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}, got {cache_layout!r}")
    amx = cache_layout == "amx"
    if amx and paged_attention is torch_paged_attention:
        raise ValueError("torch_paged_attention reads the vec cache layout only; pass vLLM's op for an amx cache")
    num_tokens = query.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if plan is None:
        plan = plan_rows(query_start_loc, seq_lens, prompt_lens, block_table, spec)
    native = sink_window_kernel == "native" and supports(query.shape[1], kv_cache.shape[1], query.shape[2])
    if amx and plan.sink_window and not native:
        raise ValueError(
            "sink-window rows of an amx cache need the native kernel (sink_window_kernel='native' and a head "
            "layout it supports); the torch path reads the vec layout only"
        )
    for batch in (plan.causal, plan.windowed):
        if batch is not None:
            _run_batch(paged_attention, query, kv_cache, batch, scale, out)
    if plan.sink_window:
        _sink_window_attention(query, kv_cache, block_table, plan.sink_window, spec, scale, out, query_tile, native,
                               amx, amx_tiles)
    return out if out.shape[0] == num_tokens else out[:num_tokens]
