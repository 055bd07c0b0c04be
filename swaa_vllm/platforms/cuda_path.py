"""The CUDA side of the ``SWAA`` backend: per-step metadata and the per-layer forward on GPU.

:mod:`swaa_vllm.backend` dispatches here when its builder's device or the query
is CUDA; the CPU path is untouched.

Kernel selection (per step, decided in :func:`build_cuda_metadata`, and per layer
call in :func:`forward_cuda`):

* the flash-attn path (:mod:`swaa_kernels.flash_attn_path`: vLLM's
  ``vllm_flash_attn`` for the window/full parts, sinks merged by LSE) when the
  step's longest query has more than one token (prefill, chunked prefill, mixed
  steps), the model dtype is float16/bfloat16, the head size is a multiple of 8 up
  to 256, ``vllm.vllm_flash_attn`` imports, and no CUDA graph is being captured;
* the Triton kernel (:mod:`swaa_kernels.triton_swaa`) otherwise: decode steps,
  every CUDA-graph capture/replay (it reads no host metadata), float32, no
  flash-attn.
* ``SWAA_GPU_KERNEL=triton`` or ``=flash_attn`` forces one (for benchmarks and
  debugging; ``flash_attn`` still falls back to Triton while capturing a graph).

CUDA graphs: the builder reports ``AttentionCGSupport.UNIFORM_BATCH`` (uniform
decode batches, including speculative-decoding verification). The Triton kernel's
grid depends only on tensor shapes and it reads ``query_start_loc``, ``seq_lens``,
the block table (vLLM's persistent buffers) and ``prompt_lens`` (a persistent
buffer of the builder, refreshed in place each step) on the device, so a captured
graph replays with the new step's values. The cache write redirects padding
slots (-1) to slot 0, which lives in vLLM's reserved null block (block 0, never
handed to a request), instead of filtering them on the host.

The flash-attn path plans its row split on the host: it reads ``seq_lens`` to the
host once per prefill step (one small device-to-host copy in ``build``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.flash_attn_path import flash_attn_swaa_attention
from swaa_kernels.triton_swaa import triton_paged_swaa_attention

__all__ = ["SwaaCudaMetadata", "build_cuda_metadata", "cuda_kv_views", "forward_cuda", "write_kv_cache_cuda"]

_FLASH_ATTN_AVAILABLE: bool | None = None


def flash_attn_available() -> bool:
    """Whether vLLM's bundled flash-attn (``vllm.vllm_flash_attn``) imports here."""
    global _FLASH_ATTN_AVAILABLE
    if _FLASH_ATTN_AVAILABLE is None:
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401

            _FLASH_ATTN_AVAILABLE = True
        except (ImportError, OSError):
            _FLASH_ATTN_AVAILABLE = False
    return _FLASH_ATTN_AVAILABLE


@dataclass
class SwaaCudaMetadata:
    """Per-step metadata of the CUDA path (device tensors unless noted).

    Attributes:
        num_actual_tokens: tokens of the step (may include CUDA-graph padding).
        max_query_len: host int, longest query of the step.
        query_start_loc: int32 ``[num_reqs + 1]``.
        seq_lens: int32 ``[num_reqs]``.
        prompt_lens: int32 ``[num_reqs]``, a view of the builder's persistent buffer.
        block_table: int32 ``[num_reqs, max_blocks_per_req]``.
        use_flash_attn: run the flash-attn path (then the host fields are set).
        query_start_loc_cpu, seq_lens_cpu, prompt_lens_cpu: host copies, or None.
    """

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    prompt_lens: torch.Tensor
    block_table: torch.Tensor
    use_flash_attn: bool = False
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    prompt_lens_cpu: torch.Tensor | None = None


def _kernel_choice() -> str:
    choice = os.environ.get("SWAA_GPU_KERNEL", "auto").lower()
    if choice not in ("auto", "triton", "flash_attn"):
        raise ValueError(f"SWAA_GPU_KERNEL must be auto, triton or flash_attn, got {choice!r}")
    return choice


def build_cuda_metadata(builder, cm, prompt_lens_cpu: torch.Tensor) -> SwaaCudaMetadata:
    """:class:`SwaaCudaMetadata` from vLLM's ``CommonAttentionMetadata`` ``cm`` (see module docstring).

    Args:
        builder: the :class:`~swaa_vllm.backend.SwaaMetadataBuilder`; the persistent
            device buffer for prompt lengths is kept on it.
        cm: the step's ``CommonAttentionMetadata`` (``num_reqs`` may include request
            padding of a full CUDA graph).
        prompt_lens_cpu: int32 host ``[cm.num_reqs]`` from
            :meth:`~swaa_vllm.prompt_lengths.RunnerPromptLengths.for_batch`, 0 on
            padding rows; copied into the buffer in place, so a captured graph
            replays with this step's values and never a stale length.
    """
    num_reqs = cm.num_reqs
    buffer = getattr(builder, "_swaa_prompt_lens_device", None)
    if buffer is None or buffer.shape[0] < num_reqs:
        size = max(num_reqs, builder.vllm_config.scheduler_config.max_num_seqs)
        buffer = torch.zeros(size, dtype=torch.int32, device=builder.device)
        builder._swaa_prompt_lens_device = buffer
    buffer[:num_reqs].copy_(prompt_lens_cpu, non_blocking=True)
    model_config = builder.vllm_config.model_config
    choice = _kernel_choice()
    flash_ok = (
        flash_attn_available()
        and model_config.dtype in (torch.float16, torch.bfloat16)
        and builder.kv_cache_spec.head_size % 8 == 0
        and builder.kv_cache_spec.head_size <= 256
    )
    use_flash = flash_ok and (choice == "flash_attn" or (choice == "auto" and cm.max_query_len > 1))
    if torch.cuda.is_current_stream_capturing():
        use_flash = False
    md = SwaaCudaMetadata(
        num_actual_tokens=cm.num_actual_tokens,
        max_query_len=cm.max_query_len,
        query_start_loc=cm.query_start_loc[: num_reqs + 1],
        seq_lens=cm.seq_lens[:num_reqs],
        prompt_lens=buffer[:num_reqs],
        block_table=cm.block_table_tensor[:num_reqs],
        use_flash_attn=use_flash,
    )
    if use_flash:
        md.query_start_loc_cpu = cm.query_start_loc_cpu[: num_reqs + 1]
        md.seq_lens_cpu = cm.seq_lens[:num_reqs].cpu()
        md.prompt_lens_cpu = prompt_lens_cpu
    return md


def cuda_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, block_size, num_kv_heads, head_size]`` of one layer's cache.

    ``kv_cache`` is vLLM's logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
    (key in the first ``head_size`` channels) in whatever physical layout the backend
    requested; the views keep its strides (the GPU kernels take any strides with a
    contiguous last dimension).

    Raises:
        RuntimeError: if the channel dimension is not contiguous.
    """
    if kv_cache.stride(-1) != 1:
        raise RuntimeError(f"SWAA needs a contiguous channel dimension, got strides {tuple(kv_cache.stride())}")
    token_major = kv_cache.permute(0, 2, 1, 3)
    head_size = token_major.shape[-1] // 2
    return token_major[..., :head_size], token_major[..., head_size:]


def write_kv_cache_cuda(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, Hkv, D]`` into the paged cache without a host sync.

    Padding slots (negative) are redirected to slot 0, in vLLM's null block, which
    no request reads (CUDA-graph safe: no data-dependent shapes).
    """
    num_tokens = key.shape[0]
    slots = slot_mapping[:num_tokens].long().clamp_min(0)
    blocks = torch.div(slots, key_cache.shape[1], rounding_mode="floor")
    offsets = slots - blocks * key_cache.shape[1]
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, offsets] = value.to(value_cache.dtype)


def forward_cuda(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    md: SwaaCudaMetadata,
    spec: LayerMaskSpec,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """One layer's SWAA attention on CUDA into ``out`` ``[num_tokens, H, D]`` (views of vLLM's buffers)."""
    if md.use_flash_attn and not torch.cuda.is_current_stream_capturing():
        return flash_attn_swaa_attention(
            query, key_cache, value_cache, md.block_table, md.query_start_loc_cpu, md.seq_lens_cpu,
            md.prompt_lens_cpu, spec, scale, out=out,
        )
    return triton_paged_swaa_attention(
        query, key_cache, value_cache, md.block_table, md.query_start_loc, md.seq_lens, md.prompt_lens,
        spec, scale, out=out, max_query_len=md.max_query_len,
    )
