"""Worker and model runner that hand per-request prompt lengths to the SWAA builder.

SWAA decides whether a query token is a prompt token by its position against its
request's prompt length P (``shared/SWAA.md``). vLLM's ``CommonAttentionMetadata``
carries ``is_prefilling`` but not P, and the difference matters: a request resumed
after preemption recomputes prompt and generated tokens in one chunk. The model
runner knows P (``input_batch.num_prompt_tokens_cpu_tensor``, in batch order), so
this runner points every :class:`~swaa_vllm.backend.SwaaMetadataBuilder` at that
tensor right before vLLM builds the step's attention metadata.

The worker class is selected through vLLM's own ``parallel_config.worker_cls``
setting (done by :mod:`swaa_vllm.vllm_shims` when the backend is ``swaa``).
Mirrors ``vllm/v1/worker/cpu_worker.py`` and ``vllm/v1/worker/cpu_model_runner.py``.

Both workers also answer ``collective_rpc("swaa_attention_report")``
(:class:`AttentionReportMixin`): which attention each layer runs on that worker, with
its share of the heads and the mask it applied. It is how an operator (and
``tests/test_ray_tp.py``) checks that every tensor-parallel rank, e.g. each Ray
actor, runs the SWAA plan; a method name travels to the workers without vLLM's
opt-in pickling of callables (``VLLM_ALLOW_INSECURE_SERIALIZATION``).
"""

from __future__ import annotations

import os
from typing import Any

from swaa_vllm.backend import SwaaMetadataBuilder
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

__all__ = [
    "AttentionReportMixin", "PromptLengthsRunnerMixin", "SwaaCPUModelRunner", "SwaaCPUWorker", "SwaaGPUModelRunner",
    "SwaaGPUWorker",
]


class PromptLengthsRunnerMixin:
    """Model-runner mixin: publish prompt lengths to SWAA builders before each build."""

    def _build_attention_metadata(self, *args, **kwargs):  # signature: GPUModelRunner's
        prompt_lens = self.input_batch.num_prompt_tokens_cpu_tensor
        for group in self._attn_group_iterator():
            for builder in group.metadata_builders:
                if isinstance(builder, SwaaMetadataBuilder):
                    builder.prompt_lens_source = prompt_lens
        return super()._build_attention_metadata(*args, **kwargs)


class AttentionReportMixin:
    """Worker mixin: :meth:`swaa_attention_report` for ``collective_rpc``; no state of its own."""

    def swaa_attention_report(self) -> dict[str, Any]:
        """What attention each layer of this worker runs.

        Returns:
            ``{"pid", "in_ray_actor", "rank", "tp_rank", "worker_cls", "layers"}``; ``layers`` maps
            each attention layer name to ``{"impl", "num_heads", "num_kv_heads", "mask"}`` (heads on
            this rank), ``mask`` being ``[window, keep_first, fa_decode]`` of the SWAA mask the layer
            applied in a forward step on this worker (None before its first step, or for another impl).
        """
        from vllm.distributed import get_tensor_model_parallel_rank

        in_ray_actor = False
        try:
            import ray

            in_ray_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
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
            "worker_cls": type(self).__name__,
            "layers": layers,
        }


class SwaaCPUModelRunner(PromptLengthsRunnerMixin, CPUModelRunner):
    """vLLM's V1 CPU model runner plus :class:`PromptLengthsRunnerMixin`; no state of its own."""


class SwaaCPUWorker(AttentionReportMixin, CPUWorker):
    """vLLM's CPU worker whose model runner is :class:`SwaaCPUModelRunner`.

    Raises:
        RuntimeError: if vLLM built a model runner other than its V1 CPU runner
            (e.g. ``VLLM_USE_V2_MODEL_RUNNER=1``), which SWAA does not support yet.
    """

    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                f"the swaa backend needs vLLM's V1 CPU model runner, got {type(self.model_runner).__name__}; "
                "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
            )
        # SwaaCPUModelRunner adds one method override and no state, so re-classing the
        # runner CPUWorker.init_device just built is exact and avoids building it twice.
        self.model_runner.__class__ = SwaaCPUModelRunner


class SwaaGPUModelRunner(PromptLengthsRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner plus :class:`PromptLengthsRunnerMixin`; no state of its own."""


class SwaaGPUWorker(AttentionReportMixin, Worker):
    """vLLM's GPU worker whose model runner is :class:`SwaaGPUModelRunner`.

    Uses ``Worker._make_model_runner``, the hook vLLM's GPU worker provides for
    subclasses (0.32 and 0.33).

    Raises:
        RuntimeError: if vLLM's V2 model runner is enabled (``VLLM_USE_V2_MODEL_RUNNER``,
            the 0.33 default when Triton is present), which SWAA does not support yet.
    """

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError(
                "the swaa backend needs vLLM's V1 GPU model runner; set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        return SwaaGPUModelRunner(self.vllm_config, self.device)
