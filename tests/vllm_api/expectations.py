"""The vLLM interfaces swaa-vllm's CUDA path and model-runner hooks rely on, one record each.

Derived by reading the files that run under ``vllm serve --attention-backend swaa``
on a GPU: ``swaa_vllm/__init__.py`` (plugin entry point), ``swaa_vllm/vllm_shims.py``
(shims 1, 4 and 5, and shim 2/3's patching of ``CpuPlatform``, which ``install()``
does in every process), ``swaa_vllm/config.py`` (no vLLM import), ``swaa_vllm/backend.py``,
``swaa_vllm/platforms/cuda_path.py``, ``swaa_vllm/worker.py``, ``swaa_vllm/prompt_lengths.py``,
``swaa_vllm/sink_window_cache.py``,
``kernels/flash_attn_path.py`` and ``kernels/triton_swaa.py`` (no vLLM import), plus
the module imports ``swaa_vllm/platforms/cpu_attention_op.py`` does at import time (``backend.py``
imports it on every platform) and the public API of the Ray Data pipeline
(``swaa_vllm/batch/ray_data.py``, which also runs on GPU replicas) and the accuracy harness's engine step
(``swaa_vllm/evaluation/harness.py``, also used by the plan search). CPU-only uses are not
listed: ``cpu_attention_op``'s ``vllm._C`` ops, the CPU selector's calls, and the Ray
executor of ``swaa_vllm/platforms/ray_executor.py`` (``tests/test_vllm_api.py`` keeps their
imports in an explicit allow-list).

:mod:`tests.vllm_api.check` resolves every record by parsing vLLM's sources
(``make check-vllm-gpu-api`` on the official CUDA wheel, ``vllm==0.33.*``), and
``tests/test_vllm_api.py`` checks that every ``from vllm... import`` of the plugin
is listed here. When a record fails on a new vLLM, the fix belongs in the file named
by its ``used_by``; then update the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["EXPECTATIONS", "Expect", "Kind"]


class Kind(StrEnum):
    """What a record names."""

    MODULE = "module"
    CLASS = "class"
    FUNCTION = "function"  # a module-level def
    METHOD = "method"  # a def in a class body (or a base's)
    ATTRIBUTE = "attribute"  # module variable, class attribute, dataclass field, property or self.x assignment
    ENUM_MEMBER = "enum member"
    SOURCE = "source"  # the object's source contains a snippet (whitespace and comments ignored)
    ABSTRACTS = "abstract methods"  # every abstract method of a class is among ``params`` (the ones we implement)


@dataclass(frozen=True)
class Expect:
    """One vLLM interface we rely on.

    Attributes:
        module: dotted vLLM module the name is looked up in (it may re-export it).
        obj: qualified name in that module (``Worker.initialize_from_config``); "" for
            the module itself (kinds ``MODULE``, or ``SOURCE`` over the whole file).
        kind: what ``obj`` must be.
        used_by: which of our files relies on it, and why (one short phrase).
        params: parameter names a callable must have (positional or keyword; ``**kwargs`` does not count);
            for ``ABSTRACTS``, the methods our subclass implements.
        decorators: decorator names a callable must carry (``classmethod``: we read ``.__func__``).
        snippet: for ``SOURCE``, text the object's source must contain, whitespace and comments ignored.
    """

    module: str
    obj: str
    kind: Kind
    used_by: str
    params: tuple[str, ...] = ()
    decorators: tuple[str, ...] = ()
    snippet: str = ""


def module(name: str, *, used_by: str) -> Expect:
    """A record: vLLM module ``name`` exists."""
    return Expect(name, "", Kind.MODULE, used_by)


def cls(mod: str, qualname: str, *, used_by: str) -> Expect:
    """A record: ``mod.qualname`` is a class."""
    return Expect(mod, qualname, Kind.CLASS, used_by)


def function(mod: str, qualname: str, params: tuple[str, ...] = (), *, used_by: str) -> Expect:
    """A record: ``mod.qualname`` is a module-level function with parameters ``params``."""
    return Expect(mod, qualname, Kind.FUNCTION, used_by, params=params)


def method(
    mod: str, qualname: str, params: tuple[str, ...] = (), *, used_by: str, decorators: tuple[str, ...] = ()
) -> Expect:
    """A record: ``mod.qualname`` is a method (own or inherited) with ``params`` and ``decorators``."""
    return Expect(mod, qualname, Kind.METHOD, used_by, params=params, decorators=decorators)


def attribute(mod: str, qualname: str, *, used_by: str) -> Expect:
    """A record: ``mod.qualname`` is a module variable, class attribute, field, property or ``self.x``."""
    return Expect(mod, qualname, Kind.ATTRIBUTE, used_by)


def member(mod: str, qualname: str, *, used_by: str) -> Expect:
    """A record: ``mod.qualname`` is a member of an Enum class."""
    return Expect(mod, qualname, Kind.ENUM_MEMBER, used_by)


def abstracts(mod: str, qualname: str, implemented: tuple[str, ...], *, used_by: str) -> Expect:
    """A record: every abstract method class ``mod.qualname`` leaves open is in ``implemented``."""
    return Expect(mod, qualname, Kind.ABSTRACTS, used_by, params=implemented)


def source(mod: str, qualname: str, snippet: str, *, used_by: str) -> Expect:
    """A record: the source of ``mod.qualname`` (the module if "") contains ``snippet``."""
    return Expect(mod, qualname, Kind.SOURCE, used_by, snippet=snippet)


_BACKEND = "vllm.v1.attention.backend"
_REGISTRY = "vllm.v1.attention.backends.registry"
_ATTN_LAYER = "vllm.model_executor.layers.attention.attention"
_V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
_V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
_STM = "vllm.v1.core.single_type_kv_cache_manager"
_SWC = "swaa_vllm/sink_window_cache.py"
_FA_UTILS = "vllm.v1.attention.backends.fa_utils"
# The methods SwaaAttentionBackend defines in swaa_vllm/backend.py (tests/test_vllm_api.py keeps it in sync).
_SWAA_BACKEND_METHODS = (
    "get_name", "get_impl_cls", "get_builder_cls", "supported_kv_cache_layouts", "get_supported_kernel_block_sizes",
    "get_supported_head_sizes", "supports_attn_type", "supports_kv_connector",
    "supports_device_cpu_query_lens_mismatch",
)

EXPECTATIONS: tuple[Expect, ...] = (
    # -- plugin loading (pyproject.toml entry point -> swaa_vllm/__init__.py:register) ----------------------
    source("vllm.plugins", "", 'DEFAULT_PLUGINS_GROUP = "vllm.general_plugins"',
           used_by="pyproject.toml: the entry point group that loads swaa_vllm:register in every process"),
    function("vllm.plugins", "load_general_plugins", used_by="swaa_vllm/__init__.py: register() runs from it"),
    # -- logging (every module) --------------------------------------------------------------------------------
    module("vllm.logger", used_by="swaa_vllm/vllm_shims.py, backend.py, worker.py: logger"),
    function("vllm.logger", "init_logger", ("name",), used_by="swaa_vllm/vllm_shims.py, backend.py, worker.py: logger"),
    method("vllm.logger", "_VllmLogger.info_once", ("msg",),
           used_by="swaa_vllm/worker.py: logs which model runner serves SWAA"),
    # -- shim 1: the backend name -------------------------------------------------------------------------------
    module(_REGISTRY, used_by="swaa_vllm/vllm_shims.py: backend registry"),
    cls(_REGISTRY, "AttentionBackendEnum", used_by="swaa_vllm/vllm_shims.py: the SWAA member (shim 1)"),
    function(_REGISTRY, "register_backend", ("backend", "class_path"),
             used_by="swaa_vllm/vllm_shims.py: register_backend('SWAA', path)"),
    method(_REGISTRY, "AttentionBackendEnum.register", ("name", "value"), decorators=("classmethod",),
           used_by="swaa_vllm/vllm_shims.py: register_backend adds the SWAA member through it"),
    source(_REGISTRY, "register_backend", "AttentionBackendEnum.register(backend",
           used_by="swaa_vllm/vllm_shims.py: a str name becomes a new enum member"),
    source("vllm.config.attention", "AttentionConfig.validate_backend_before", "AttentionBackendEnum[value.upper()]",
           used_by="swaa_vllm/vllm_shims.py: --attention-backend swaa resolves to the SWAA member"),
    attribute("vllm.config.attention", "AttentionConfig.backend",
              used_by="swaa_vllm/vllm_shims.py: is_swaa_selected reads attention_config.backend"),
    # -- shim 4: prefix-cache keys ------------------------------------------------------------------------------
    module("vllm.v1.core.kv_cache_utils", used_by="swaa_vllm/vllm_shims.py: shim 4 replaces a function in it"),
    function("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys",
             ("request", "start_token_idx", "end_token_idx", "start_mm_idx"),
             used_by="swaa_vllm/vllm_shims.py: shim 4 wraps it with this signature"),
    source("vllm.v1.core.kv_cache_utils", "get_request_block_hasher",
           "extra_keys, curr_mm_idx = generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, "
           "curr_mm_idx)",
           used_by="swaa_vllm/vllm_shims.py: block hashing calls the module global shim 4 replaces"),
    attribute("vllm.v1.request", "Request.num_prompt_tokens",
              used_by="swaa_vllm/vllm_shims.py: shim 4 tags blocks past the prompt"),
    # -- shim 5: the CUDA platform's config hook ----------------------------------------------------------------
    attribute("vllm.platforms", "current_platform", used_by="swaa_vllm/vllm_shims.py, backend.py: platform checks"),
    source("vllm.platforms", "cuda_platform_plugin", '"vllm.platforms.cuda.CudaPlatform"',
           used_by="swaa_vllm/vllm_shims.py: type(current_platform) on CUDA is the class shim 5 patches"),
    method("vllm.platforms.interface", "Platform.is_cuda", used_by="swaa_vllm/vllm_shims.py: shim 5 only on CUDA"),
    method("vllm.platforms.interface", "Platform.is_cpu",
           used_by="swaa_vllm/backend.py, vllm_shims.py: CPU vs CUDA layout and checks"),
    method("vllm.platforms.cuda", "CudaPlatform.check_and_update_config", ("vllm_config",),
           decorators=("classmethod",),
           used_by="swaa_vllm/vllm_shims.py: shim 5 wraps it (reads .__func__)"),
    source("vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config",
           'parallel_config.worker_cls = "vllm.v1.worker.gpu_worker.Worker"',
           used_by="swaa_vllm/vllm_shims.py: _VLLM_GPU_WORKERS, the setting SwaaGPUWorker replaces"),
    source("vllm.platforms.cuda", "CudaPlatformBase.get_attn_backend_cls",
           "backend_class.validate_configuration(device_capability=device_capability, "
           "**attn_selector_config._asdict()",
           used_by="swaa_vllm/vllm_shims.py: CUDA honours --attention-backend swaa, validated (no selector shim)"),
    source("vllm.config.vllm", "VllmConfig.__post_init__", "current_platform.check_and_update_config(self)",
           used_by="swaa_vllm/vllm_shims.py: shims 3 and 5 run from the platform config hook"),
    # install() patches the CPU platform in every process, GPU ones too: it reads .__func__ of both classmethods.
    module("vllm.platforms.cpu", used_by="swaa_vllm/vllm_shims.py: install() imports it on every platform"),
    method("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls", ("selected_backend", "attn_selector_config"),
           decorators=("classmethod",), used_by="swaa_vllm/vllm_shims.py: install() wraps it (shim 2)"),
    method("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", ("vllm_config",),
           decorators=("classmethod",), used_by="swaa_vllm/vllm_shims.py: install() wraps it (shim 3)"),
    # -- the config the hooks read --------------------------------------------------------------------------------
    module("vllm.config", used_by="swaa_vllm/backend.py: VllmConfig, get_current_vllm_config"),
    cls("vllm.config", "VllmConfig", used_by="swaa_vllm/backend.py: builder signature"),
    function("vllm.config", "get_current_vllm_config", used_by="swaa_vllm/backend.py: the impl reads swaa_config"),
    attribute("vllm.config", "VllmConfig.attention_config", used_by="swaa_vllm/vllm_shims.py: selected backend"),
    attribute("vllm.config", "VllmConfig.parallel_config", used_by="swaa_vllm/vllm_shims.py: worker_cls"),
    attribute("vllm.config", "VllmConfig.model_config", used_by="swaa_vllm/vllm_shims.py, backend.py: hf_config"),
    attribute("vllm.config", "VllmConfig.cache_config", used_by="swaa_vllm/vllm_shims.py: kv-cache dtype check"),
    attribute("vllm.config", "VllmConfig.scheduler_config", used_by="swaa_vllm/platforms/cuda_path.py: max_num_seqs"),
    attribute("vllm.config", "VllmConfig.compilation_config",
              used_by="swaa_vllm/worker.py: static_forward_context for the attention report"),
    attribute("vllm.config.parallel", "ParallelConfig.worker_cls",
              used_by="swaa_vllm/vllm_shims.py: selects SwaaGPUWorker"),
    attribute("vllm.config.model", "ModelConfig.hf_config",
              used_by="swaa_vllm/vllm_shims.py, backend.py: swaa_config and num_hidden_layers"),
    attribute("vllm.config.model", "ModelConfig.use_mla", used_by="swaa_vllm/vllm_shims.py: refuses MLA models"),
    method("vllm.config.model", "ModelConfig.get_sliding_window",
           used_by="swaa_vllm/vllm_shims.py: refuses models with their own window"),
    attribute("vllm.config.model", "ModelConfig.max_model_len", used_by="swaa_vllm/vllm_shims.py: window warning"),
    attribute("vllm.config.model", "ModelConfig.dtype",
              used_by="swaa_vllm/platforms/cuda_path.py: flash-attn needs fp16/bf16"),
    attribute("vllm.config.cache", "CacheConfig.cache_dtype", used_by="swaa_vllm/vllm_shims.py: refuses fp8 KV"),
    attribute("vllm.config.scheduler", "SchedulerConfig.max_num_seqs",
              used_by="swaa_vllm/platforms/cuda_path.py: size of the persistent prompt-length buffer"),
    attribute("vllm.config.compilation", "CompilationConfig.static_forward_context",
              used_by="swaa_vllm/worker.py: swaa_attention_report walks the attention layers"),
    # -- the backend (swaa_vllm/backend.py) -----------------------------------------------------------------------
    module(_BACKEND, used_by="swaa_vllm/backend.py: backend base classes"),
    cls(_BACKEND, "AttentionBackend", used_by="swaa_vllm/backend.py: SwaaAttentionBackend base"),
    attribute(_BACKEND, "AttentionBackend.forward_includes_kv_cache_update",
              used_by="swaa_vllm/backend.py: False, so vLLM calls do_kv_cache_update"),
    attribute(_BACKEND, "AttentionBackend.supported_dtypes", used_by="swaa_vllm/backend.py: overridden"),
    attribute(_BACKEND, "AttentionBackend.supported_kv_cache_dtypes", used_by="swaa_vllm/backend.py: overridden"),
    abstracts(_BACKEND, "AttentionBackend", _SWAA_BACKEND_METHODS,
              used_by="swaa_vllm/backend.py: SwaaAttentionBackend must implement every abstract method"),
    method(_BACKEND, "AttentionBackend.get_name", decorators=("staticmethod",),
           used_by="swaa_vllm/backend.py: overridden"),
    method(_BACKEND, "AttentionBackend.get_impl_cls", decorators=("staticmethod",),
           used_by="swaa_vllm/backend.py: overridden"),
    method(_BACKEND, "AttentionBackend.get_builder_cls", decorators=("staticmethod",),
           used_by="swaa_vllm/backend.py: overridden"),
    method(_BACKEND, "AttentionBackend.get_supported_kernel_block_sizes", ("kv_cache_spec",),
           decorators=("staticmethod",), used_by="swaa_vllm/backend.py: overridden (MultipleOf(16))"),
    method(_BACKEND, "AttentionBackend.get_supported_head_sizes", decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: overridden"),
    method(_BACKEND, "AttentionBackend.supports_attn_type", ("attn_type",), decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: overridden (decoder only)"),
    method(_BACKEND, "AttentionBackend.supports_kv_connector", decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: overridden (refuses KV connectors)"),
    method(_BACKEND, "AttentionBackend.supports_device_cpu_query_lens_mismatch", decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: overridden (refuses V2 adaptive verification)"),
    method(_BACKEND, "AttentionBackend.supported_kv_cache_layouts", decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: overridden (LBNHC on CUDA)"),
    method(_BACKEND, "AttentionBackend.validate_configuration",
           ("head_size", "dtype", "kv_cache_dtype", "block_size", "device_capability", "attn_type",
            "use_kv_connector", "use_adaptive_verification"),
           decorators=("classmethod",),
           used_by="swaa_vllm/backend.py: inherited; vLLM's CUDA selector and our CPU shim call it"),
    source(_BACKEND, "AttentionBackend.validate_configuration", "use_kv_connector and not cls.supports_kv_connector()",
           used_by="swaa_vllm/backend.py: supports_kv_connector=False refuses KV connectors at selection"),
    source(_BACKEND, "AttentionBackend.validate_configuration", "not cls.supports_device_cpu_query_lens_mismatch()",
           used_by="swaa_vllm/backend.py: the refusal of adaptive verification happens at selection"),
    source("vllm.v1.attention.backends.utils", "get_supported_kv_cache_layouts",
           "backend.supported_kv_cache_layouts()",
           used_by="swaa_vllm/backend.py: vLLM allocates the layout the backend declares"),
    cls(_BACKEND, "AttentionCGSupport", used_by="swaa_vllm/backend.py: builder CUDA-graph support"),
    member(_BACKEND, "AttentionCGSupport.UNIFORM_BATCH", used_by="swaa_vllm/backend.py: uniform decode graphs"),
    cls(_BACKEND, "AttentionType", used_by="swaa_vllm/backend.py: decoder-only check"),
    member(_BACKEND, "AttentionType.DECODER", used_by="swaa_vllm/backend.py: decoder-only check"),
    cls(_BACKEND, "MultipleOf", used_by="swaa_vllm/backend.py: kernel block sizes"),
    attribute(_BACKEND, "MultipleOf.base", used_by="swaa_vllm/backend.py: MultipleOf(16)"),
    cls(_BACKEND, "AttentionLayer", used_by="swaa_vllm/backend.py: forward's layer annotation"),
    cls(_BACKEND, "AttentionMetadataBuilder", used_by="swaa_vllm/backend.py: SwaaMetadataBuilder base"),
    abstracts(_BACKEND, "AttentionMetadataBuilder", ("__init__", "build"),
              used_by="swaa_vllm/backend.py: SwaaMetadataBuilder must implement every abstract method"),
    attribute(_BACKEND, "AttentionMetadataBuilder._cudagraph_support",
              used_by="swaa_vllm/backend.py: set to UNIFORM_BATCH"),
    method(_BACKEND, "AttentionMetadataBuilder.__init__", ("kv_cache_spec", "layer_names", "vllm_config", "device"),
           used_by="swaa_vllm/backend.py: SwaaMetadataBuilder.__init__ calls super() with these"),
    method(_BACKEND, "AttentionMetadataBuilder.build", ("common_prefix_len", "common_attn_metadata", "fast_build"),
           used_by="swaa_vllm/backend.py: SwaaMetadataBuilder.build overrides it"),
    attribute(_BACKEND, "AttentionMetadataBuilder.kv_cache_spec",
              used_by="swaa_vllm/platforms/cuda_path.py: head_size"),
    attribute(_BACKEND, "AttentionMetadataBuilder.vllm_config",
              used_by="swaa_vllm/platforms/cuda_path.py: dtype, max_num_seqs"),
    attribute(_BACKEND, "AttentionMetadataBuilder.device",
              used_by="swaa_vllm/backend.py, platforms/cuda_path.py: CUDA dispatch"),
    cls(_BACKEND, "CommonAttentionMetadata", used_by="swaa_vllm/backend.py: build's input"),
    *(
        attribute(_BACKEND, f"CommonAttentionMetadata.{name}", used_by=f"swaa_vllm/{user}: reads {name}")
        for name, user in (
            ("num_reqs", "backend.py, platforms/cuda_path.py, prompt_lengths.py"),
            ("num_actual_tokens", "backend.py, platforms/cuda_path.py"),
            ("query_start_loc", "backend.py, platforms/cuda_path.py"),
            ("query_start_loc_cpu", "platforms/cuda_path.py (flash-attn row split)"),
            ("seq_lens", "backend.py, platforms/cuda_path.py"),
            ("block_table_tensor", "backend.py, platforms/cuda_path.py"),
            ("max_query_len", "platforms/cuda_path.py (kernel choice)"),
            ("req_idx", "prompt_lengths.py (V2 row -> request-table entry)"),
        )
    ),
    cls(_BACKEND, "AttentionImpl", used_by="swaa_vllm/backend.py: SwaaAttentionImpl base"),
    abstracts(_BACKEND, "AttentionImpl", ("__init__", "_cpu_op", "_spec", "do_kv_cache_update", "forward"),
              used_by="swaa_vllm/backend.py: SwaaAttentionImpl must implement every abstract method"),
    method(_BACKEND, "AttentionImpl.__init__",
           ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window", "kv_cache_dtype",
            "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name"),
           used_by="swaa_vllm/backend.py: SwaaAttentionImpl.__init__ takes these"),
    method(_BACKEND, "AttentionImpl.forward",
           ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
            "output_block_scale"),
           used_by="swaa_vllm/backend.py: SwaaAttentionImpl.forward overrides it"),
    method("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.do_kv_cache_update",
           ("layer", "key", "value", "kv_cache", "slot_mapping"),
           used_by="swaa_vllm/backend.py: do_kv_cache_update mirrors vLLM's CUDA backend (AttentionImpl has none)"),
    source(_ATTN_LAYER, "unified_kv_cache_update",
           "attn_layer.impl.do_kv_cache_update(attn_layer, key, value, kv_cache, layer_slot_mapping,",
           used_by="swaa_vllm/backend.py: how vLLM calls do_kv_cache_update"),
    source(_ATTN_LAYER, "unified_attention_with_output",
           "self.impl.forward(self, query, key, value, kv_cache, attn_metadata, output=output, "
           "output_scale=output_scale, output_block_scale=output_block_scale,",
           used_by="swaa_vllm/backend.py: how vLLM calls forward"),
    source(_ATTN_LAYER, "Attention.__init__",
           "impl_cls(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype, "
           "logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra_impl_args,",
           used_by="swaa_vllm/backend.py: how vLLM constructs SwaaAttentionImpl"),
    source(_ATTN_LAYER, "Attention.forward", "not self.attn_backend.forward_includes_kv_cache_update",
           used_by="swaa_vllm/backend.py: forward_includes_kv_cache_update=False routes the cache write"),
    attribute(_ATTN_LAYER, "Attention.layer_name", used_by="swaa_vllm/backend.py: layer index of the SWAA plan"),
    attribute(_ATTN_LAYER, "Attention.impl", used_by="swaa_vllm/worker.py: swaa_attention_report"),
    module("vllm.model_executor.models.utils", used_by="swaa_vllm/backend.py: extract_layer_index"),
    function("vllm.model_executor.models.utils", "extract_layer_index", ("layer_name",),
             used_by="swaa_vllm/backend.py: layer name -> plan index"),
    module("vllm.v1.kv_cache_interface", used_by="swaa_vllm/backend.py: AttentionSpec"),
    cls("vllm.v1.kv_cache_interface", "AttentionSpec", used_by="swaa_vllm/backend.py: builder annotation"),
    attribute("vllm.v1.kv_cache_interface", "AttentionSpec.head_size",
              used_by="swaa_vllm/platforms/cuda_path.py: flash-attn head-size check"),
    module("vllm.v1.kv_cache_layout", used_by="swaa_vllm/backend.py: KVCacheLayout"),
    cls("vllm.v1.kv_cache_layout", "KVCacheLayout", used_by="swaa_vllm/backend.py: supported_kv_cache_layouts"),
    member("vllm.v1.kv_cache_layout", "KVCacheLayout.LBNHC",
           used_by="swaa_vllm/backend.py: token-major pages on CUDA (cuda_kv_views)"),
    member("vllm.v1.kv_cache_layout", "KVCacheLayout.LBHNC", used_by="swaa_vllm/backend.py: CPU layout"),
    # backend.py imports swaa_vllm/platforms/cpu_attention_op.py on every platform, which imports these at import time.
    module("vllm._custom_ops", used_by="swaa_vllm/platforms/cpu_attention_op.py: imported at import time (backend.py)"),
    module("vllm.envs", used_by="swaa_vllm/platforms/cpu_attention_op.py: imported at import time (backend.py)"),
    # -- the CUDA path (swaa_vllm/platforms/cuda_path.py, kernels/flash_attn_path.py) ---------------------------
    module("vllm.vllm_flash_attn", used_by="swaa_vllm/platforms/cuda_path.py: flash_attn_available()"),
    function("vllm.vllm_flash_attn", "flash_attn_varlen_func",
             used_by="swaa_vllm/platforms/cuda_path.py: flash_attn_available()"),
    module(_FA_UTILS, used_by="kernels/flash_attn_path.py: vLLM's flash-attn entry points"),
    function(_FA_UTILS, "flash_attn_varlen_func",
             ("q", "k", "v", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale", "causal",
              "window_size", "block_table", "return_softmax_lse", "fa_version"),
             used_by="kernels/flash_attn_path.py: the keywords vllm_flash_attn_window_fn passes (CUDA branch)"),
    function(_FA_UTILS, "get_flash_attn_version", ("head_size",),
             used_by="kernels/flash_attn_path.py: FA version choice"),
    # -- the workers (swaa_vllm/worker.py) --------------------------------------------------------------------
    module("vllm.v1.worker.gpu_worker", used_by="swaa_vllm/worker.py: SwaaGPUWorker base"),
    cls("vllm.v1.worker.gpu_worker", "Worker", used_by="swaa_vllm/worker.py: SwaaGPUWorker base"),
    method("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", ("kv_cache_config",),
           used_by="swaa_vllm/worker.py: overridden to bind prompt lengths"),
    source("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", "self.model_runner.initialize_kv_cache(",
           used_by="swaa_vllm/worker.py: the builders exist once super().initialize_from_config returns"),
    source("vllm.v1.engine.core", "EngineCore._initialize_kv_caches",
           "self.model_executor.initialize_from_config(kv_cache_configs)",
           used_by="swaa_vllm/worker.py: initialize_from_config runs before the first step"),
    source("vllm.v1.engine.core", "EngineCore._initialize_kv_caches",
           "self.model_executor.compile_or_warm_up_model()",
           used_by="swaa_vllm/worker.py: warm-up and CUDA-graph capture come after initialize_from_config"),
    attribute("vllm.v1.worker.gpu_worker", "Worker.model_runner", used_by="swaa_vllm/worker.py: bind_prompt_lengths"),
    attribute("vllm.v1.worker.gpu_worker", "Worker.rank", used_by="swaa_vllm/worker.py: swaa_attention_report"),
    attribute("vllm.v1.worker.gpu_worker", "Worker.vllm_config", used_by="swaa_vllm/worker.py: swaa_attention_report"),
    module("vllm.v1.worker.cpu_worker", used_by="swaa_vllm/worker.py: imported on every platform"),
    cls("vllm.v1.worker.cpu_worker", "CPUWorker", used_by="swaa_vllm/worker.py: SwaaCPUWorker base (imported on GPU)"),
    module("vllm.distributed", used_by="swaa_vllm/worker.py: get_tensor_model_parallel_rank"),
    function("vllm.distributed", "get_tensor_model_parallel_rank",
             used_by="swaa_vllm/worker.py: swaa_attention_report tp_rank"),
    function("vllm.distributed", "get_pp_group", used_by="swaa_vllm/worker.py: swaa_attention_report pp_rank"),
    attribute("vllm.distributed.parallel_state", "GroupCoordinator.rank_in_group",
              used_by="swaa_vllm/worker.py: swaa_attention_report pp_rank"),
    # -- prompt lengths from both model runners (swaa_vllm/prompt_lengths.py) -------------------------------
    module(_V2_RUNNER, used_by="swaa_vllm/prompt_lengths.py: runner_version"),
    cls(_V2_RUNNER, "GPUModelRunner", used_by="swaa_vllm/prompt_lengths.py: the V2 runner"),
    attribute(_V2_RUNNER, "GPUModelRunner.req_states", used_by="swaa_vllm/prompt_lengths.py: V2 request table"),
    source(_V2_RUNNER, "GPUModelRunner.__init__", "self.req_states = RequestState(",
           used_by="swaa_vllm/prompt_lengths.py: req_states is a RequestState"),
    attribute(_V2_RUNNER, "GPUModelRunner.attn_groups", used_by="swaa_vllm/prompt_lengths.py: bind_prompt_lengths"),
    source(_V2_RUNNER, "GPUModelRunner.initialize_kv_cache", "init_attn_backend(",
           used_by="swaa_vllm/prompt_lengths.py: V2 creates its builders in initialize_kv_cache"),
    module("vllm.v1.worker.gpu.states", used_by="swaa_vllm/prompt_lengths.py: V2 RequestState"),
    cls("vllm.v1.worker.gpu.states", "RequestState", used_by="swaa_vllm/prompt_lengths.py: V2 request table"),
    attribute("vllm.v1.worker.gpu.states", "RequestState.prompt_len",
              used_by="swaa_vllm/prompt_lengths.py: V2 prompt lengths"),
    source("vllm.v1.worker.gpu.states", "RequestState.add_request", "self.prompt_len.np[req_idx] = prompt_len",
           used_by="swaa_vllm/prompt_lengths.py: prompt_len.np holds the user prompt length P"),
    attribute("vllm.v1.worker.gpu.buffer_utils", "UvaBackedTensor.np",
              used_by="swaa_vllm/prompt_lengths.py: reads prompt_len.np on the host"),
    source("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.prepare_attn",
           "req_idx=input_batch.idx_mapping_np",
           used_by="swaa_vllm/prompt_lengths.py: V2 passes each row's request-table entry"),
    function("vllm.v1.worker.gpu.attn_utils", "build_attn_metadata", ("req_idx",),
             used_by="swaa_vllm/prompt_lengths.py: V2 builds CommonAttentionMetadata with req_idx"),
    source("vllm.v1.worker.gpu.attn_utils", "build_attn_metadata", "req_idx=req_idx",
           used_by="swaa_vllm/prompt_lengths.py: req_idx reaches CommonAttentionMetadata"),
    module(_V1_RUNNER, used_by="swaa_vllm/prompt_lengths.py: runner_version"),
    cls(_V1_RUNNER, "GPUModelRunner", used_by="swaa_vllm/prompt_lengths.py: the V1 runner"),
    attribute(_V1_RUNNER, "GPUModelRunner.input_batch", used_by="swaa_vllm/prompt_lengths.py: V1 request table"),
    source(_V1_RUNNER, "GPUModelRunner.__init__", "self.input_batch = InputBatch(",
           used_by="swaa_vllm/prompt_lengths.py: input_batch is an InputBatch"),
    attribute(_V1_RUNNER, "GPUModelRunner.attn_groups", used_by="swaa_vllm/prompt_lengths.py: bind_prompt_lengths"),
    source(_V1_RUNNER, "GPUModelRunner.initialize_kv_cache", "self.initialize_attn_backend(kv_cache_config",
           used_by="swaa_vllm/prompt_lengths.py: V1 creates its builders in initialize_kv_cache"),
    module("vllm.v1.worker.gpu_input_batch", used_by="swaa_vllm/prompt_lengths.py: V1 InputBatch"),
    cls("vllm.v1.worker.gpu_input_batch", "InputBatch", used_by="swaa_vllm/prompt_lengths.py: V1 request table"),
    attribute("vllm.v1.worker.gpu_input_batch", "InputBatch.num_prompt_tokens",
              used_by="swaa_vllm/prompt_lengths.py: V1 prompt lengths in batch order"),
    attribute("vllm.v1.worker.gpu_input_batch", "InputBatch.num_reqs",
              used_by="swaa_vllm/prompt_lengths.py: V1 real rows of the step"),
    module("vllm.v1.worker.utils", used_by="swaa_vllm/prompt_lengths.py: AttentionGroup"),
    cls("vllm.v1.worker.utils", "AttentionGroup", used_by="swaa_vllm/prompt_lengths.py: runner.attn_groups entries"),
    attribute("vllm.v1.worker.utils", "AttentionGroup.metadata_builders",
              used_by="swaa_vllm/prompt_lengths.py: the SWAA builders to bind"),
    # -- sink-aware KV memory (swaa_vllm/sink_window_cache.py, swaa_vllm/worker.py SinkWindowKVWorkerMixin)
    function("vllm.utils.math_utils", "cdiv", used_by=_SWC + ": block arithmetic"),
    attribute("vllm.v1.core.kv_cache_utils", "BlockHashList", used_by=_SWC + ": find_longest_cache_hit signature"),
    cls("vllm.v1.core.kv_cache_utils", "KVCacheBlock", used_by=_SWC + ": block lists"),
    function("vllm.v1.core.kv_cache_utils", "resolve_block_hashes",
             ("block_hashes", "hash_block_size", "block_size", "alignment_tokens"), used_by=_SWC + ": hit lookup"),
    cls(_STM, "SingleTypeKVCacheManager", used_by=_SWC + ": SinkWindowManager's base"),
    abstracts(_STM, "SingleTypeKVCacheManager",
              ("__init__", "_gap", "remove_skipped_blocks", "get_num_blocks_to_allocate", "add_local_computed_blocks",
               "allocate_external_computed_blocks", "find_longest_cache_hit", "reachable_block_mask"),
              used_by=_SWC + ": SinkWindowManager"),
    method(_STM, "SingleTypeKVCacheManager.remove_skipped_blocks",
           ("request_id", "processed_computed_tokens", "num_prompt_tokens"), used_by=_SWC + ": frees the gap"),
    method(_STM, "SingleTypeKVCacheManager.get_num_blocks_to_allocate",
           ("request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens", "num_local_computed_tokens",
            "num_tokens_main_model", "apply_admission_cap", "prefill_end"), used_by=_SWC + ": overridden"),
    method(_STM, "SingleTypeKVCacheManager.add_local_computed_blocks",
           ("request_id", "new_computed_blocks", "num_local_computed_tokens", "num_external_computed_tokens"),
           used_by=_SWC + ": overridden (prefix hits with a null gap)"),
    method(_STM, "SingleTypeKVCacheManager.allocate_external_computed_blocks",
           ("request_id", "num_local_computed_tokens", "num_external_computed_tokens"), used_by=_SWC + ": refused"),
    method(_STM, "SingleTypeKVCacheManager.reachable_block_mask",
           ("start_block", "end_block", "alignment_tokens", "kv_cache_spec", "use_eagle"),
           decorators=("classmethod",), used_by=_SWC + ": dense caching"),
    method(_STM, "SingleTypeKVCacheManager.find_longest_cache_hit",
           ("block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec", "drop_eagle_block",
            "alignment_tokens"), decorators=("classmethod",), used_by=_SWC + ": hit lookup"),
    method(_STM, "SingleTypeKVCacheManager._remove_blocks_in_range", ("request_id", "first_block", "last_block"),
           used_by=_SWC + ": frees a block range to the null block"),
    method(_STM, "SingleTypeKVCacheManager._get_num_evictable_blocks", ("blocks",), used_by=_SWC + ": admission"),
    attribute(_STM, "SingleTypeKVCacheManager.req_to_blocks", used_by=_SWC + ": the request's block list"),
    attribute(_STM, "SingleTypeKVCacheManager.num_cached_block", used_by=_SWC + ": running-request test"),
    attribute(_STM, "SingleTypeKVCacheManager._null_block", used_by=_SWC + ": freed entries"),
    attribute(_STM, "SingleTypeKVCacheManager.max_admission_blocks_per_request", used_by=_SWC + ": admission cap"),
    source(_STM, "get_manager_for_kv_cache_spec", "kv_cache_spec.max_admission_blocks_per_request(",
           used_by=_SWC + ": a SlidingWindowSpec subclass gets its admission cap"),
    source("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", "self.coordinator.remove_skipped_blocks(",
           used_by=_SWC + ": frees run before each allocation (the bound)"),
    method("vllm.v1.core.block_pool", "BlockPool.get_cached_block", ("block_hash", "kv_cache_group_ids"),
           used_by=_SWC + ": hit lookup"),
    attribute("vllm.v1.core.block_pool", "BlockPool.null_block", used_by=_SWC + ": hit lookup"),
    attribute("vllm.v1.core.block_pool", "BlockPool.hash_block_size", used_by=_SWC + ": hit lookup"),
    cls("vllm.v1.kv_cache_interface", "KVCacheSpec", used_by=_SWC + ": spec types"),
    cls("vllm.v1.kv_cache_interface", "FullAttentionSpec", used_by=_SWC + ": the specs converted"),
    cls("vllm.v1.kv_cache_interface", "SlidingWindowSpec", used_by=_SWC + ": SinkWindowSpec's base"),
    function("vllm.v1.kv_cache_interface", "replace_as", ("spec", "target_cls", "drop"),
             used_by=_SWC + ": a layer's FullAttentionSpec rebuilt as SinkWindowSpec"),
    attribute("vllm.v1.kv_cache_interface", "SlidingWindowSpec.extra_retained_tokens", used_by=_SWC + ": the gap"),
    method("vllm.v1.kv_cache_interface", "SlidingWindowSpec.max_admission_blocks_per_request",
           ("max_in_flight_tokens", "max_model_len"), used_by=_SWC + ": overridden (sinks added)"),
    source("vllm.v1.kv_cache_interface", "SlidingWindowSpec.max_memory_usage_bytes",
           "self.max_admission_blocks_per_request(", used_by=_SWC + ": start-up capacity uses the cap"),
    method("vllm.v1.kv_cache_interface", "SlidingWindowSpec.is_uniform_with_collection", ("kv_cache_specs",),
           used_by=_SWC + ": overridden"),
    cls("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry", used_by=_SWC + ": registration"),
    method("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register",
           ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"), decorators=("classmethod",),
           used_by=_SWC + ": registration"),
    method("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered", decorators=("classmethod",),
           used_by=_SWC + ": built-ins first (shim 7)"),
    method("vllm.v1.worker.gpu_worker", "Worker.get_kv_cache_spec",
           used_by="swaa_vllm/worker.py: SinkWindowKVWorkerMixin converts the specs vLLM collects"),
    source("vllm.v1.executor.abstract", "Executor.get_kv_cache_specs", 'collective_rpc("get_kv_cache_spec")',
           used_by="swaa_vllm/worker.py: the engine collects specs from the worker method"),
    attribute("vllm.config.scheduler", "SchedulerConfig.disable_hybrid_kv_cache_manager",
              used_by="swaa_vllm/worker.py: mixed plans need the hybrid KV cache manager"),
    # -- the Ray Data pipeline's engine (swaa_vllm/batch/ray_data.py, also on GPU replicas; finetuning/distill.py too)
    cls("vllm", "LLM", used_by="swaa_vllm/batch/ray_data.py, finetuning/distill.py: one engine per replica"),
    cls("vllm", "SamplingParams", used_by="swaa_vllm/batch/ray_data.py, finetuning/distill.py: sampling options"),
    cls("vllm", "TokensPrompt", used_by="swaa_vllm/finetuning/distill.py, evaluation/harness.py: token-id prompts"),
    # -- the accuracy harness's engine step (swaa_vllm/evaluation/harness.py; the plan search's validation)
    module("vllm.lora.request", used_by="swaa_vllm/evaluation/harness.py: LoRA rows of the accuracy harness"),
    cls("vllm.lora.request", "LoRARequest", used_by="swaa_vllm/evaluation/harness.py: an adapter per plan"),
)
