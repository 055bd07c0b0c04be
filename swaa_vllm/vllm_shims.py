"""Every change swaa-vllm makes to vLLM at plugin load, in one place.

vLLM 0.32 lets a plugin register a backend by name, but three things stand
between that and a working ``--attention-backend swaa`` on CPU (shims 1-3), and
vLLM's prefix cache cannot tell prompt KV from decode KV (shim 4). Each shim below
is the smallest change that fixes one of them; ``tests/test_vllm_shims.py`` checks
both that the shim works and that the vLLM behaviour it works around is still
there, so a vLLM upgrade that makes a shim unnecessary (or breaks it) fails CI.

1. **Enum member that survives spawn.** ``register_backend("SWAA", path)`` adds a
   member to ``AttentionBackendEnum`` at runtime. Enum members pickle by value,
   and the CPU build *spawns* the engine core and workers, which unpickle the
   config before loading plugins, so ``AttentionBackendEnum(path)`` would fail
   there. The member gets its own ``__reduce_ex__`` that unpickles through
   :func:`swaa_backend_member`, which imports this module (registering the
   member) first.
2. **CPU backend selection.** ``CpuPlatform.get_attn_backend_cls`` answers
   ``CPU_ATTN`` for any selected backend. The wrapper returns the SWAA backend
   when SWAA is selected and defers to vLLM otherwise.
3. **Config hook.** ``CpuPlatform.check_and_update_config`` runs once per config
   in the front-end process (at startup, before any engine process). The wrapper
   runs vLLM's hook, then, when SWAA is selected: validates ``swaa_config``
   (errors name the field), logs the per-layer plan once, and selects the SWAA
   worker through vLLM's own ``parallel_config.worker_cls`` setting
   (:mod:`swaa_vllm.worker`). A model with ``swaa_config`` served by another
   backend gets a warning instead of silently losing its mask.
4. **Prefix-cache keys of generated tokens.** With full-attention decode, the KV
   of a generated token is computed under full attention, while the same token in a
   later prompt (the next chat turn) must be computed under the sliding window. vLLM
   hashes cached blocks by token ids only, so the next turn would reuse the decode
   KV and its output would depend on what happened to be cached. When the plan has
   a sliding layer with FA decode, ``kv_cache_utils.generate_block_hash_extra_keys``
   is wrapped to add the extra key ``("swaa_prompt_tokens_in_block", n)`` to every
   block that holds generated tokens (n = how many of its tokens were prompt
   tokens). A block is then reused only by a request that computed it with the same
   roles: its own recomputation after preemption, or the same prompt again, never a
   later turn. Blocks inside the prompt keep vLLM's keys and are shared as usual.
   (vLLM's KV events, built in ``block_pool.py`` from its own import of the
   function, do not carry the extra key.)
5. **CUDA config hook.** On CUDA no selector shim is needed: vLLM's CUDA platform
   honours ``--attention-backend`` and validates the selected backend with
   ``validate_configuration`` (``vllm/platforms/cuda.py``, 0.32 and 0.33). Its
   ``check_and_update_config`` is wrapped like shim 3 to validate the plan, set
   shim 4's flag and select :class:`swaa_vllm.worker.SwaaGPUWorker`. Either of
   vLLM's model runners (V2, the default, or V1) serves the backend
   (:mod:`swaa_vllm.prompt_lengths`).
6. **Ray executor on CPU.** vLLM 0.32's CPU platform names no Ray resource
   (``ray_device_key``), so ``--distributed-executor-backend ray`` stops with
   "current platform cpu does not support ray". When SWAA is selected with the Ray
   backend on CPU, shim 3 swaps ``"ray"`` for
   :class:`swaa_vllm.platforms.ray_executor.SwaaCpuRayExecutor`, vLLM's own (V2) Ray executor
   with the CPU resource named (explained in that module). ``use_ray`` stays true.
7. **KV cache spec registration order.** Not a change to vLLM: the sink-window KV
   cache spec and manager (:mod:`swaa_vllm.sink_window_cache`) are registered in
   vLLM's KV cache spec registry, whose lazy registration of the built-in specs runs
   only while the registry is empty; the built-ins are registered first.

Not here because it changes nothing of vLLM's: the SWAA CPU worker's own fix for a vLLM
0.32 CPU bug (a later pipeline stage never gets its receive buffer in eager mode;
:class:`swaa_vllm.worker.PipelineReceiveBufferMixin`), pinned in the same test file.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

logger = init_logger("vllm.swaa")  # under "vllm" so that vLLM's log config shows it

BACKEND_NAME = "SWAA"  # --attention-backend swaa (vLLM upper-cases the name)

BACKEND_PATH = "swaa_vllm.backend.SwaaAttentionBackend"
CPU_WORKER = "swaa_vllm.worker.SwaaCPUWorker"
_VLLM_CPU_WORKERS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker")
GPU_WORKER = "swaa_vllm.worker.SwaaGPUWorker"
# Speculative decoding whose drafts come from tokens, not a model: verification steps only (tested: ngram).
MODEL_FREE_SPECULATORS = ("ngram", "ngram_gpu", "suffix")
_VLLM_GPU_WORKERS = ("auto", "vllm.v1.worker.gpu_worker.Worker")

__all__ = ["install", "swaa_backend_member", "is_swaa_selected"]


def swaa_backend_member() -> AttentionBackendEnum:
    """The ``AttentionBackendEnum.SWAA`` member, registering it first if needed.

    Also the unpickling entry point of that member (shim 1).
    """
    member = AttentionBackendEnum.__members__.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, BACKEND_PATH)
        member = AttentionBackendEnum[BACKEND_NAME]
        member.__reduce_ex__ = _reduce_swaa_member  # instance attribute: pickle looks it up on the object
    return member


def _reduce_swaa_member(protocol: int):
    return (swaa_backend_member, ())


def is_swaa_selected(vllm_config) -> bool:
    """Whether the config selects the SWAA attention backend."""
    backend = vllm_config.attention_config.backend
    return backend is not None and backend.name == BACKEND_NAME


def _patch_cpu_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_swaa_patched", False):
        return
    original_select = CpuPlatform.get_attn_backend_cls.__func__
    original_check = CpuPlatform.check_and_update_config.__func__

    @functools.wraps(original_select)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            # As vLLM's CUDA selector does for a selected backend (vllm/platforms/cuda.py).
            reasons = selected_backend.get_class().validate_configuration(
                device_capability=None, **attn_selector_config._asdict()
            )
            if reasons:
                raise ValueError(
                    f"--attention-backend swaa cannot serve this configuration: {', '.join(reasons)} "
                    f"({attn_selector_config}). See the README section 'How it works' for what is supported."
                )
            logger.info_once("Using the SWAA attention backend (swaa-vllm).")
            return selected_backend.get_path()
        return original_select(cls, selected_backend, attn_selector_config, *args, **kwargs)

    @functools.wraps(original_check)
    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        _after_platform_config(vllm_config, cpu_worker=CPU_WORKER)
        if is_swaa_selected(vllm_config) and vllm_config.parallel_config.distributed_executor_backend == "ray":
            from swaa_vllm.platforms.ray_executor import cpu_ray_executor  # shim 6

            vllm_config.parallel_config.distributed_executor_backend = cpu_ray_executor()

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform._swaa_patched = True


def _patch_cuda_platform() -> None:
    """Shim 5: the CUDA platform's config hook (only when vLLM runs on CUDA)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    platform_cls = type(current_platform)
    if getattr(platform_cls, "_swaa_patched", False):
        return
    original_check = platform_cls.check_and_update_config.__func__

    @functools.wraps(original_check)
    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        _after_platform_config(vllm_config, cpu_worker=GPU_WORKER, vllm_workers=_VLLM_GPU_WORKERS)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._swaa_patched = True


def _after_platform_config(vllm_config, cpu_worker: str, vllm_workers: tuple[str, ...] = _VLLM_CPU_WORKERS) -> None:
    """Validate and log the SWAA plan, and select the SWAA worker ``cpu_worker`` (shims 3 and 5).

    ``vllm_workers``: the worker settings of vLLM's own that the SWAA worker replaces.
    """
    from swaa_vllm.config import plan_from_hf_config

    model_config = vllm_config.model_config
    if model_config is None:
        return
    has_swaa_config = getattr(model_config.hf_config, "swaa_config", None) is not None
    if not is_swaa_selected(vllm_config):
        if has_swaa_config:
            logger.warning(
                "The model config has a swaa_config but the attention backend is %s, which ignores it: "
                "the model runs with full attention. Pass --attention-backend swaa to apply it.",
                vllm_config.attention_config.backend or "auto",
            )
        return
    _check_model_supported(vllm_config)
    plan = plan_from_hf_config(model_config.hf_config)  # raises SwaaConfigError naming the field
    set_generated_block_tagging(any(spec.window is not None and spec.fa_decode for spec in plan.layers))
    parallel_config = vllm_config.parallel_config
    if parallel_config.worker_cls != cpu_worker:  # first pass (front end); engine processes re-run the hook
        logger.info("%s", plan.describe())
        windows = {spec.window for spec in plan.layers if spec.window is not None}
        max_len = getattr(model_config, "max_model_len", None)
        if windows and max_len and min(windows) >= max_len:
            logger.warning(
                "swaa_config.sliding_window_size=%d >= max_model_len=%d: every prompt fits in the window, "
                "so SWAA computes full attention; lower sliding_window_size to save prefill work.",
                min(windows), max_len,
            )
    if parallel_config.worker_cls not in vllm_workers + (cpu_worker,):
        raise ValueError(
            f"--attention-backend swaa needs its own worker ({cpu_worker}) to pass prompt lengths to the "
            f"attention backend, but --worker-cls is {parallel_config.worker_cls!r}; remove --worker-cls"
        )
    parallel_config.worker_cls = cpu_worker


def _check_model_supported(vllm_config) -> None:
    """Refuse, at startup, models and settings the SWAA mask cannot honour.

    Raises:
        ValueError: naming the setting and the fix.
    """
    model_config = vllm_config.model_config
    problems = []
    if model_config.use_mla:
        problems.append("the model uses MLA attention; SWAA supports multi-head/grouped-query attention models")
    native_window = model_config.get_sliding_window()
    if native_window is not None:
        problems.append(
            f"the model has its own sliding window ({native_window}); use a full-attention "
            "model and set swaa_config.sliding_window_size instead"
        )
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype} is not supported; use auto")
    speculative_config = getattr(vllm_config, "speculative_config", None)
    method = getattr(speculative_config, "method", None)
    if speculative_config is not None and method not in MODEL_FREE_SPECULATORS:
        # A draft model's attention metadata is built outside the step's request table (V2 passes no
        # CommonAttentionMetadata.req_idx there; V1's drafter has builders of its own), so its SWAA
        # layers would not know their prompt lengths.
        problems.append(
            f"speculative_config.method={method!r} runs a draft model, whose attention steps carry no prompt "
            f"lengths; use a model-free method ({', '.join(MODEL_FREE_SPECULATORS)}) or no speculative decoding"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from swaa_vllm.platforms.cpu_attention_op import cpu_attention_isa

        try:  # what vLLM's CPU attention op (used by the CPU path) can serve
            cpu_attention_isa(vllm_config.cache_config.block_size or 128, model_config.get_head_size())
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("--attention-backend swaa: " + "; ".join(problems))


GENERATED_BLOCK_KEY = "swaa_prompt_tokens_in_block"
_tag_generated_blocks = False  # set per process by the config hook (shim 3) from the plan


def set_generated_block_tagging(enabled: bool) -> None:
    """Turn shim 4 on (plan has a sliding layer with FA decode) or off."""
    global _tag_generated_blocks
    _tag_generated_blocks = enabled


def _patch_block_hash_extra_keys() -> None:
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(original, "_swaa_patched", False):
        return

    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        extra_keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        num_prompt_tokens = request.num_prompt_tokens
        if _tag_generated_blocks and end_token_idx > num_prompt_tokens:
            tag = (GENERATED_BLOCK_KEY, max(0, num_prompt_tokens - start_token_idx))
            extra_keys = (*(extra_keys or ()), tag)
        return extra_keys, next_mm_idx

    generate_block_hash_extra_keys._swaa_patched = True
    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys


def install() -> None:
    """Apply all shims; idempotent, safe in every vLLM process."""
    swaa_backend_member()
    _patch_cpu_platform()
    _patch_cuda_platform()
    _patch_block_hash_extra_keys()
    from swaa_vllm.sink_window_cache import register_sink_window_spec

    register_sink_window_spec()  # 7
