"""The SWAA workers: vLLM's CPU and GPU workers, with prompt lengths bound for the SWAA builder.

SWAA decides whether a query token is a prompt token by its position against its
request's prompt length P (``shared/SWAA.md``), which vLLM does not pass to
attention metadata builders. :mod:`swaa_vllm.prompt_lengths` reads P from the
model runner's own request table; the workers here bind it to every
:class:`~swaa_vllm.backend.SwaaMetadataBuilder` once the runner has created its
builders (``initialize_from_config``, after ``initialize_kv_cache``). They do not
subclass or re-class the model runner, so whichever runner vLLM builds (V2, its
default, or the deprecated V1; CPU or GPU) runs unchanged, and the worker logs
which one serves the SWAA backend.

The worker class is selected through vLLM's own ``parallel_config.worker_cls``
setting (done by :mod:`swaa_vllm.vllm_shims` when the backend is ``swaa``).
Mirrors ``vllm/v1/worker/cpu_worker.py`` and ``vllm/v1/worker/gpu_worker.py``.

Both workers also hand vLLM a sink-window KV cache spec for the layers that slide
while decoding (:class:`SinkWindowKVWorkerMixin`, :mod:`swaa_vllm.sink_window_cache`),
so vLLM frees their blocks outside the sinks and the window.

Both workers also answer ``collective_rpc("swaa_attention_report")``
(:class:`AttentionReportMixin`): which attention each layer runs on that worker, with
its share of the heads and the mask it applied. It is how an operator (and
``tests/test_ray_parallel.py``) checks that every tensor-parallel rank and pipeline stage, e.g. each Ray
actor, runs the SWAA plan; a method name travels to the workers without vLLM's
opt-in pickling of callables (``VLLM_ALLOW_INSECURE_SERIALIZATION``).
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from swaa_vllm.prompt_lengths import bind_prompt_lengths

logger = init_logger("vllm.swaa")  # under "vllm" so that vLLM's log config shows it

__all__ = [
    "AttentionReportMixin",
    "PipelineReceiveBufferMixin",
    "PromptLengthsWorkerMixin",
    "SinkWindowKVWorkerMixin",
    "SwaaCPUWorker",
    "SwaaGPUWorker",
]


class PromptLengthsWorkerMixin:
    """Worker mixin: bind the model runner's prompt lengths to the SWAA builders it created.

    ``initialize_from_config`` is vLLM's worker step that allocates the KV cache and
    creates the attention metadata builders (``Worker.initialize_from_config`` ->
    ``model_runner.initialize_kv_cache``, 0.32 and 0.33, inherited by the CPU worker);
    every step, warm-up and CUDA-graph capture comes after it.
    """

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        logger.info_once("SWAA backend on %s.", bind_prompt_lengths(self.model_runner).describe())


class SinkWindowKVWorkerMixin:
    """Worker mixin: layers that slide while decoding get a :class:`~swaa_vllm.sink_window_cache.SinkWindowSpec`.

    ``get_kv_cache_spec`` is the worker call through which vLLM's engine collects the
    per-layer KV cache specs of every worker (``Executor.get_kv_cache_specs``, 0.32 and
    0.33) before it sizes the KV cache and builds the scheduler's managers; the model
    runner (V1 or V2) builds its KV cache groups from what comes back. Layers are
    matched to the plan by their global index (their name), so a pipeline stage
    converts exactly its own layers.
    """

    def get_kv_cache_spec(self):
        from swaa_vllm.config import plan_from_hf_config
        from swaa_vllm.sink_window_cache import sink_window_kv_specs

        specs = super().get_kv_cache_spec()
        plan = plan_from_hf_config(self.vllm_config.model_config.hf_config)
        disabled = bool(self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager)
        specs, layers, reason = sink_window_kv_specs(specs, plan, disabled)
        if layers:
            logger.info_once(
                "SWAA KV memory: layers %s slide while decoding and keep only their sink and window blocks "
                "(sink-window KV cache spec); the other layers keep every block.", str(layers),
            )
        elif reason:
            logger.warning_once("SWAA KV memory: layers that slide while decoding keep every block: %s.", reason)
        return specs


class AttentionReportMixin:
    """Worker mixin: :meth:`swaa_attention_report` for ``collective_rpc``; no state of its own."""

    def swaa_attention_report(self) -> dict[str, Any]:
        """What attention each layer of this worker runs.

        Returns:
            ``{"pid", "in_ray_actor", "ray_node_id", "rank", "tp_rank", "pp_rank", "worker_cls", "layers"}``
            (``ray_node_id``: the Ray node of the worker's actor, None outside Ray); ``layers`` maps each
            attention layer of this worker (its pipeline stage's layers, by global name) to
            ``{"impl", "num_heads", "num_kv_heads", "mask"}`` (heads on this rank), ``mask`` being
            ``[window, keep_first, fa_decode]`` of the SWAA mask the layer applied in a forward step on
            this worker (None before its first step, or for another impl).
        """
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        in_ray_actor, ray_node_id = False, None
        try:
            import ray

            if ray.is_initialized():
                context = ray.get_runtime_context()
                in_ray_actor = context.get_actor_id() is not None
                ray_node_id = context.get_node_id() if in_ray_actor else None
        except ImportError:
            pass
        layers = {}
        for name, layer in self.vllm_config.compilation_config.static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if impl is None:
                continue
            spec = getattr(impl, "_layer_specs", {}).get(name)
            layers[name] = {
                "impl": type(impl).__name__,
                "num_heads": impl.num_heads,
                "num_kv_heads": impl.num_kv_heads,
                "mask": None if spec is None else [spec.window, spec.keep_first, spec.fa_decode],
            }
        return {
            "pid": os.getpid(),
            "in_ray_actor": in_ray_actor,
            "rank": self.rank,
            "tp_rank": get_tensor_model_parallel_rank(),
            "pp_rank": get_pp_group().rank_in_group,
            "ray_node_id": ray_node_id,
            "worker_cls": type(self).__name__,
            "layers": layers,
        }


class PipelineReceiveBufferMixin:
    """CPU worker mixin: a later pipeline stage gets its receive buffer before the first step.

    **Why.** vLLM's V1 model runner receives the previous stage's hidden states into
    ``model_runner.intermediate_tensors``, a buffer it allocates only inside ``_dummy_run``
    (``vllm/v1/worker/gpu_model_runner.py``; ``execute_model`` asserts it exists). The GPU
    worker always runs ``_dummy_run`` while warming up; vLLM's CPU worker does not in eager mode
    (``CPUModelRunner.warming_up_model`` returns at once for ``CompilationMode.NONE``, and
    ``CPUWorker._should_warm_up_model`` is False with an explicit KV cache size), so on the CPU
    build ``--pipeline-parallel-size 2 --enforce-eager`` fails on its first step with
    ``KeyError: <request id>`` in the scheduler (the last stage returned no output). This
    allocates the buffer exactly as ``_dummy_run`` does (``model.make_empty_intermediate_tensors``
    for ``max_num_tokens`` rows, the model's dtype and device) after vLLM's own warm-up, only
    where vLLM left it unallocated; with vLLM's warm-up it is a no-op. Pinned by
    ``tests/test_vllm_shims.py`` (vLLM still allocates it only in ``_dummy_run``) and exercised by
    ``tests/test_ray_parallel.py`` (pipeline parallelism 2, eager).
    """

    def compile_or_warm_up_model(self):
        times = super().compile_or_warm_up_model()
        allocate_pipeline_receive_buffer(self.model_runner)
        return times


def allocate_pipeline_receive_buffer(model_runner) -> bool:
    """Allocate ``model_runner.intermediate_tensors`` on a non-first pipeline stage if vLLM has not.

    Args:
        model_runner: vLLM's V1 model runner (``GPUModelRunner`` or ``CPUModelRunner``); another runner
            (V2 keeps its own buffers) has no ``intermediate_tensors`` attribute and is left alone.

    Returns:
        True if the buffer was allocated here.
    """
    from vllm.distributed import get_pp_group

    if get_pp_group().is_first_rank or getattr(model_runner, "intermediate_tensors", False) is not None:
        return False
    model_runner.intermediate_tensors = model_runner.model.make_empty_intermediate_tensors(
        batch_size=model_runner.max_num_tokens, dtype=model_runner.model_config.dtype, device=model_runner.device,
    )
    return True


class SwaaCPUWorker(PromptLengthsWorkerMixin, SinkWindowKVWorkerMixin, AttentionReportMixin,
                    PipelineReceiveBufferMixin, CPUWorker):
    """vLLM's CPU worker (V1 or V2 model runner, as vLLM chooses) plus the SWAA mixins; no state of its own."""


class SwaaGPUWorker(PromptLengthsWorkerMixin, SinkWindowKVWorkerMixin, AttentionReportMixin, Worker):
    """vLLM's GPU worker (V1 or V2 model runner, as vLLM chooses) plus the SWAA mixins; no state of its own."""
