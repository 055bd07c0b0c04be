"""The ``SWAA`` vLLM attention backend: sink-plus-window prefill, full-attention decode.

Structure mirrors vLLM's own CPU backend (``vllm/v1/attention/backends/cpu_attn.py``):
a backend class, a metadata builder that turns vLLM's ``CommonAttentionMetadata``
into :class:`SwaaMetadata` once per step, and an impl whose ``forward`` runs one
layer. The mask of each layer comes from the model's ``swaa_config``
(:mod:`swaa_vllm.config`); the role of every query token (prompt or generated)
comes from its position against its request's prompt length, which the builder
reads from the model runner's request table through
:class:`swaa_vllm.prompt_lengths.RunnerPromptLengths` (V1 and V2 runners alike).

KV cache layout: vLLM's own CPU attention layout. vLLM allocates each layer
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` in the order ``LBHNC``
(as for ``CPU_ATTN``); keys and values are written by vLLM's
``cpu_attn_reshape_and_cache`` op and read both by vLLM's C++ attention op (rows
whose keys are one contiguous range) and by :mod:`swaa_kernels.cpu` (sink-window
rows); see :mod:`swaa_vllm.platforms.cpu_attention_op`. Full and FA-decode layers keep a
full-attention KV spec, so vLLM never frees a block that FA decode will read; layers that slide
while decoding get the sink-window spec (:mod:`swaa_vllm.sink_window_cache`), whose freed blocks
the attention paths never load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from swaa_kernels.cpu import LayerMaskSpec, RowPlan, paged_swaa_attention, plan_rows
from swaa_kernels.sink_window_native import ENV_VAR, kernel_choice, requested_choice, supports
from swaa_vllm.config import SwaaPlan, plan_from_hf_config
from swaa_vllm.platforms.cpu_attention_op import (
    SUPPORTED_HEAD_SIZES,
    VllmCpuPagedAttention,
    check_cache_layout,
    layer_cache_isa,
)
from swaa_vllm.prompt_lengths import RunnerPromptLengths
from swaa_vllm.vllm_shims import BACKEND_NAME

logger = init_logger("vllm.swaa")  # under "vllm" so that vLLM's log config shows it


@functools.cache
def cpu_sink_window_kernel() -> str:
    """The CPU sink-window kernel of this process, ``"native"`` or ``"torch"``, logged once.

    :func:`swaa_kernels.sink_window_native.kernel_choice` (``SWAA_CPU_SINK_WINDOW_KERNEL``),
    resolved when the first attention layer of a model with sink-window layers is built on CPU
    (model construction at engine start-up: a bad value or a failed ``native`` build stops the
    engine there, and the one-time build, 10-15 s, happens before the first request).

    Raises:
        ValueError, NativeKernelError: from ``kernel_choice``.
    """
    choice = kernel_choice()
    detail = "C++ kernel, built for this CPU" if choice == "native" else "torch's fused attention per query tile"
    logger.info("swaa: CPU sink-window rows on the %s path (%s; %s=auto|native|torch)", choice, detail, ENV_VAR)
    return choice


@functools.cache
def _log_cache_isa(isa: str, dtype: torch.dtype) -> None:
    """Log each KV cache ISA of this process once (per layer kind: full layers may use amx, others vec)."""
    logger.info("swaa: %s KV caches in vLLM's CPU attention layout isa=%s", str(dtype).removeprefix("torch."), isa)


class SwaaAttentionBackend(AttentionBackend):
    """Attention backend registered as ``--attention-backend swaa``."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]  # type: ignore[assignment]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SwaaAttentionImpl]:
        return SwaaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SwaaMetadataBuilder]:
        return SwaaMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # CPU: vLLM's CPU attention op reads head-major block interiors (as CPU_ATTN).
        # CUDA: token-major pages, as vLLM's FLASH_ATTN (the Triton kernel takes any strides).
        return (KVCacheLayout.LBHNC,) if current_platform.is_cpu() else (KVCacheLayout.LBNHC,)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # vLLM's CPU attention op: ISA vec for multiples of 32, vec16 for multiples of 16.
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)  # those of vLLM's CPU attention op

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # KV connectors (offloading, disaggregated prefill) key and reuse blocks with
        # their own copy of vLLM's block hashing, which would hand decode-computed KV
        # to a later turn's prompt (see vllm_shims shim 4): refused, not bypassed.
        return False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        # The flash-attn path splits rows on the host from query_start_loc_cpu, which
        # V2's adaptive verification leaves behind the device split: vLLM then refuses
        # this backend at selection with that reason (vllm/v1/attention/backend.py).
        return False


@dataclass
class SwaaMetadata:
    """Per-step attention metadata shared by all SWAA layers (CPU tensors).

    Attributes:
        num_actual_tokens: tokens in the step, excluding padding.
        query_start_loc: int32 ``[num_reqs + 1]`` cumulative query lengths.
        seq_lens: int32 ``[num_reqs]`` tokens per request including this step's.
        prompt_lens: int ``[num_reqs]`` prompt length P of each request.
        block_table: int32 ``[num_reqs, max_blocks_per_req]``.
        row_plans: per layer spec, where each query row goes (filled on first use).

    (New keys/values reach the cache through ``do_kv_cache_update``, which vLLM calls
    with the step's slot mapping, so the metadata does not carry it.)
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    prompt_lens: torch.Tensor
    block_table: torch.Tensor
    row_plans: dict[LayerMaskSpec, RowPlan] = field(default_factory=dict)

    def plan_for(self, spec: LayerMaskSpec) -> RowPlan:
        """The step's :func:`~swaa_kernels.cpu.plan_rows` for one layer spec (computed once per step)."""
        plan = self.row_plans.get(spec)
        if plan is None:
            plan = plan_rows(self.query_start_loc, self.seq_lens, self.prompt_lens, self.block_table, spec)
            self.row_plans[spec] = plan
        return plan


class SwaaMetadataBuilder(AttentionMetadataBuilder[SwaaMetadata]):
    """Builds :class:`SwaaMetadata` from vLLM's ``CommonAttentionMetadata``.

    ``prompt_lengths`` (:class:`~swaa_vllm.prompt_lengths.RunnerPromptLengths`) is
    bound by the SWAA worker once the model runner has created its builders; vLLM
    does not pass per-request prompt lengths to builders by default.

    CUDA graphs: ``UNIFORM_BATCH`` under both model runners: full graphs of uniform
    decode batches (also speculative-decoding verification), whose Triton kernel reads
    only device tensors, the prompt lengths from a persistent buffer refreshed in
    place by every build, padding rows with P = 0 and no query tokens
    (:mod:`swaa_vllm.platforms.cuda_path`); mixed and prefill batches run eagerly. Ignored on CPU.
    Variable-length decode graphs (V2's adaptive verification) are not claimed.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.prompt_lengths: RunnerPromptLengths | None = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SwaaMetadata:
        cm = common_attn_metadata
        if common_prefix_len:
            # Cascade attention splits off a shared prefix and attends it without the
            # per-token mask; vLLM 0.32 never asks (it removed cascade attention).
            raise NotImplementedError("cascade attention cannot honour the SWAA mask; it is not supported")
        if self.prompt_lengths is None:
            raise RuntimeError(
                "the SWAA backend needs per-request prompt lengths from its worker; "
                "run with the swaa worker (set automatically for --attention-backend swaa; "
                "do not override --worker-cls)"
            )
        prompt_lens = self.prompt_lengths.for_batch(cm)
        if self.device.type == "cuda":
            from swaa_vllm.platforms.cuda_path import build_cuda_metadata

            return build_cuda_metadata(self, cm, prompt_lens)
        num_reqs = cm.num_reqs
        return SwaaMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            # The runner's own query_start_loc (a CPU tensor on the CPU platform), not the
            # host copy, which V2 may leave behind a device-side draft split.
            query_start_loc=cm.query_start_loc[: num_reqs + 1].cpu(),
            seq_lens=cm.seq_lens[:num_reqs].cpu(),
            prompt_lens=prompt_lens,
            block_table=cm.block_table_tensor[:num_reqs],
        )


_UNSUPPORTED = "the swaa attention backend does not support {what}; {fix}"


class SwaaAttentionImpl(AttentionImpl[SwaaMetadata]):
    """One decoder layer's SWAA attention.

    CPU: :mod:`swaa_kernels.cpu` with vLLM's C++ CPU attention op as its paged
    primitive (:mod:`swaa_vllm.platforms.cpu_attention_op`); CUDA: :mod:`swaa_vllm.platforms.cuda_path`.

    Raises:
        NotImplementedError: at model construction for features the mask cannot
            honour (ALiBi, soft-capping, model-native sliding windows, attention
            sinks as learned logits, quantized KV cache, non-decoder attention).
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        checks = [
            (alibi_slopes is not None, "ALiBi", "use a RoPE model"),
            (sliding_window is not None, "models with their own sliding window",
             "use swaa_config.sliding_window_size on a full-attention model instead"),
            (bool(logits_soft_cap), "attention logit soft-capping", "use another backend for this model"),
            (sinks is not None, "learned attention-sink logits", "use another backend for this model"),
            (kv_cache_dtype != "auto", f"kv_cache_dtype={kv_cache_dtype!r}", "leave --kv-cache-dtype at auto"),
            (attn_type != AttentionType.DECODER, f"attention type {attn_type}", "use it on decoder-only models"),
            (kv_sharing_target_layer_name is not None, "cross-layer KV sharing", "use another backend"),
        ]
        for failed, what, fix in checks:
            if failed:
                raise NotImplementedError(_UNSUPPORTED.format(what=what, fix=fix))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.plan: SwaaPlan = plan_from_hf_config(get_current_vllm_config().model_config.hf_config)
        self._layer_specs: dict[str, LayerMaskSpec] = {}
        self._paged_attention: VllmCpuPagedAttention | None = None
        self._sink_window_kernel = "torch"
        if current_platform.is_cpu():
            requested_choice()  # a bad SWAA_CPU_SINK_WINDOW_KERNEL stops the start-up even where it is not used
            if any(not spec.is_full and spec.keep_first > 0 for spec in self.plan.layers):
                self._sink_window_kernel = cpu_sink_window_kernel()  # at model construction: errors stop the start

    def _cpu_op(self, kv_cache: torch.Tensor, layer_name: str) -> VllmCpuPagedAttention:
        """This layer's vLLM CPU attention op (writer and paged attention); ISA and cache layout settled once.

        The ISA is vLLM's own choice, as under ``CPU_ATTN`` (``amx`` for bfloat16 on AMX CPUs), unless this
        layer's sink-window rows go to the torch path, which reads only ``vec``
        (:func:`~swaa_vllm.platforms.cpu_attention_op.layer_cache_isa`).
        """
        if self._paged_attention is None:
            block_size, head_size = kv_cache.shape[2], kv_cache.shape[3] // 2
            spec = self._spec(layer_name)
            sink_window_rows = not spec.is_full and spec.keep_first > 0
            amx_readable = not sink_window_rows or (
                self._sink_window_kernel == "native" and supports(self.num_heads, self.num_kv_heads, head_size)
            )
            isa = layer_cache_isa(kv_cache.dtype, block_size, head_size, amx_readable=amx_readable)
            check_cache_layout(isa, kv_cache.dtype, head_size, block_size)
            self._paged_attention = VllmCpuPagedAttention(isa)
            _log_cache_isa(isa, kv_cache.dtype)
        return self._paged_attention

    def _spec(self, layer_name: str) -> LayerMaskSpec:
        spec = self._layer_specs.get(layer_name)
        if spec is None:
            spec = self.plan.for_layer(extract_layer_index(layer_name))
            self._layer_specs[layer_name] = spec
        return spec

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write this step's keys/values ``[num_tokens, num_kv_heads, head_size]`` into the cache."""
        if kv_cache.is_cuda:
            from swaa_vllm.platforms.cuda_path import cuda_kv_views, write_kv_cache_cuda

            write_kv_cache_cuda(key, value, *cuda_kv_views(kv_cache), slot_mapping)
            return
        self._cpu_op(kv_cache, layer.layer_name).write(key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SwaaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of this step's queries ``[num_tokens, num_heads, head_size]`` into ``output``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(_UNSUPPORTED.format(what="fused output quantization", fix="disable it"))
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        if query.is_cuda:  # Triton or flash-attn path, see swaa_vllm.platforms.cuda_path
            from swaa_vllm.platforms.cuda_path import cuda_kv_views, forward_cuda

            shape = (n, self.num_heads, self.head_size)
            forward_cuda(query[:n].view(shape), *cuda_kv_views(kv_cache), attn_metadata,
                         self._spec(layer.layer_name), self.scale, output[:n].view(shape))
            return output
        paged_attention = self._cpu_op(kv_cache, layer.layer_name)
        spec = self._spec(layer.layer_name)
        paged_swaa_attention(
            query[:n].view(n, self.num_heads, self.head_size),
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.prompt_lens,
            spec,
            self.scale,
            out=output[:n].view(n, self.num_heads, self.head_size),
            plan=attn_metadata.plan_for(spec),
            paged_attention=paged_attention,
            sink_window_kernel=self._sink_window_kernel,
            cache_layout=paged_attention.cache_layout,
        )
        return output
