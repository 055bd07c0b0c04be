"""vLLM's Ray executor on the CPU build (shim 6 of :mod:`swaa_vllm.vllm_shims`).

**Why.** vLLM 0.32 runs ``--distributed-executor-backend ray`` through
``RayExecutorV2`` (its default, ``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=1``): Ray actors
that run the multiprocessing executor's worker loop, driven over vLLM's shared-memory
/ TCP message queues, with gloo for the tensor- and pipeline-parallel collectives on
CPU. Three things stop it on the CPU build, all about naming the Ray resource a
worker holds:

1. ``CpuPlatform.ray_device_key`` is empty, so ``initialize_ray_cluster`` refuses
   with "current platform cpu does not support ray" (vLLM issue #21602).
   :class:`SwaaCpuRayExecutor` sets it to ``"CPU"`` in the engine process before
   vLLM's own initialisation runs: the placement group then reserves one Ray CPU per
   worker (``[{"CPU": 1.0}] * world_size``), on whichever nodes have them.
2. ``RayExecutorV2._get_actor_resource_kwargs`` asks for ``resources={"CPU": 1.0}``
   for a non-GPU key, which Ray rejects ("Use the 'num_cpus' ... keyword"). The
   subclass answers ``{"num_gpus": 0}``: each actor is scheduled into its
   placement-group bundle (which holds the CPU) with ``num_cpus=0``, as vLLM already
   does for GPU workers.
3. ``RayWorkerProc.get_node_and_physical_gpu_ids`` reads Ray's accelerator ids under
   that key, which has none for ``"CPU"`` (``KeyError``). vLLM spawns the actors from
   the module global ``ray_executor_v2.RayWorkerProc``; the subclass points it at
   :class:`CpuRayWorkerProc`, which answers "no device ids" (a CPU worker uses none;
   its ``local_rank`` still comes from the count of workers on its node). Ray
   pickles an importable class by reference, so each actor process imports this
   module: every node needs swaa-vllm installed, as it does for the backend anyway.

Scope: the config hook (shim 3) swaps ``distributed_executor_backend="ray"`` for
:class:`SwaaCpuRayExecutor` only on the CPU platform and only when the config
selects ``--attention-backend swaa``; other backends keep vLLM's behaviour. vLLM
accepts an ``Executor`` subclass there and still reports ``use_ray`` (the class has
``uses_ray = True``). The legacy Ray executor (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``,
compiled Ray DAGs) hard-codes the same resource request in a method too large to
adapt, so that setting is refused with a message.

Each Ray worker then loads the plugin itself (vLLM's ``WorkerWrapperBase.init_worker``
calls ``load_general_plugins``), builds :class:`swaa_vllm.worker.SwaaCPUWorker` from
``parallel_config.worker_cls``, and every layer's
:class:`~swaa_vllm.backend.SwaaAttentionImpl` resolves its mask from the model
config. Tensor parallelism gives each rank a slice of the query and KV heads; the
mask depends only on token positions, so it is the same on every rank.
``LLM.collective_rpc("swaa_attention_report")`` shows it per worker
(:meth:`swaa_vllm.worker.AttentionReportMixin.swaa_attention_report`).

Threads: vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` is applied only by the multiprocessing
executor when it spawns its workers. Ray starts its actors itself and sets
``OMP_NUM_THREADS`` from the actor's CPU request (1 for ``num_cpus=0``), so each Ray
CPU worker runs one OpenMP thread unless the job's ``runtime_env`` sets
``OMP_NUM_THREADS``.
"""

from __future__ import annotations

from typing import Any

import vllm.envs as envs
from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

__all__ = ["CpuRayWorkerProc", "RAY_CPU_KEY", "SwaaCpuRayExecutor", "cpu_ray_executor"]

RAY_CPU_KEY = "CPU"  # the Ray resource one CPU worker reserves in the placement group


class CpuRayWorkerProc(RayWorkerProc):
    """vLLM's Ray worker actor, answering "no device ids" on the CPU platform."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        """``(Ray node id, [])``: a CPU worker holds no accelerator."""
        return ray_executor_v2.ray.get_runtime_context().get_node_id(), []


class SwaaCpuRayExecutor(RayExecutorV2):
    """vLLM's Ray executor (``RayExecutorV2``) with the CPU platform's Ray resource named.

    Selected by the config hook for ``--distributed-executor-backend ray`` with
    ``--attention-backend swaa`` on CPU; see the module docstring for each change.
    """

    @staticmethod
    def _get_actor_resource_kwargs() -> dict[str, Any]:
        return {"num_gpus": 0}

    def _init_executor(self) -> None:
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.ray_device_key = RAY_CPU_KEY  # read by vLLM's placement-group helpers
        ray_executor_v2.RayWorkerProc = CpuRayWorkerProc  # the class _init_executor spawns
        super()._init_executor()


def cpu_ray_executor() -> type[SwaaCpuRayExecutor]:
    """The executor class that replaces ``distributed_executor_backend="ray"`` on CPU.

    Raises:
        ValueError: if the legacy Ray executor is requested (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``).
    """
    if not envs.VLLM_USE_RAY_V2_EXECUTOR_BACKEND:
        raise ValueError(
            "--distributed-executor-backend ray with --attention-backend swaa on the CPU build runs on vLLM's "
            "default Ray executor; unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND or set it to 1"
        )
    return SwaaCpuRayExecutor
