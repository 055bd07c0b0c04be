"""Per-request prompt lengths for the SWAA metadata builder, under vLLM's V1 and V2 model runners.

SWAA decides whether a query token is a prompt token by its position against its
request's prompt length P, never by the step's query length (``shared/SWAA.md``):
a request resumed after preemption recomputes prompt and generated tokens in one
chunk, a prefix-cache hit can leave a one-token prompt tail. vLLM's
``CommonAttentionMetadata`` carries ``is_prefilling`` but not P. Both of vLLM's
model runners keep P in a request table, and both tell which table entry each batch
row belongs to; only the table and the mapping differ:

================  ==================================================  ============================================
runner            table of prompt lengths (numpy, host)               batch row ``r`` -> table entry
================  ==================================================  ============================================
V1 (deprecated)   ``runner.input_batch.num_prompt_tokens``            ``r`` (the input batch is kept in batch
                  (``vllm/v1/worker/gpu_input_batch.py``)              order) for ``r < input_batch.num_reqs``
V2 (default)      ``runner.req_states.prompt_len.np``                 ``common_attn_metadata.req_idx[r]`` (V2's
                  (``vllm/v1/worker/gpu/states.py``)                   ``input_batch.idx_mapping_np``, passed by
                                                                      ``vllm/v1/worker/gpu/model_states/default.py``)
================  ==================================================  ============================================

:class:`RunnerPromptLengths` is that one mechanism: bound once to a model runner
after its KV cache (and so its attention metadata builders) exists
(:func:`bind_prompt_lengths`, called by the SWAA workers of :mod:`swaa_vllm.worker`),
it answers each build with the prompt lengths of the step's rows, read from the
runner's live table at build time. V2 may reuse a freed table entry for a new
request and reorders rows freely between steps; ``req_idx`` is computed each step,
so a row never reads another request's length. Rows past the step's real requests
(request padding of full CUDA graphs under either runner) get P = 0, never a stale
entry; such rows have no query tokens.

The CPU build's V2 runner (``vllm/v1/worker/cpu/model_runner.py``) subclasses the
V2 GPU runner, and the CPU V1 runner subclasses the V1 GPU runner, so two cases
cover all four runners.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RunnerPromptLengths", "bind_prompt_lengths", "runner_version"]

# Where each runner's prompt lengths come from (the table above), for the start-up log.
_SOURCES = {
    "V2": "req_states.prompt_len by CommonAttentionMetadata.req_idx",
    "V1": "input_batch.num_prompt_tokens in batch order",
}


def runner_version(model_runner) -> str:
    """``"V2"`` or ``"V1"``: which of vLLM's model runners ``model_runner`` is (CPU and GPU alike).

    Raises:
        TypeError: for a runner derived from neither (e.g. a platform plugin's own runner).
    """
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1ModelRunner

    if isinstance(model_runner, V2ModelRunner):
        return "V2"
    if isinstance(model_runner, V1ModelRunner):
        return "V1"
    raise TypeError(
        f"the swaa backend knows vLLM's V1 and V2 model runners, got {type(model_runner).__qualname__}; "
        "use vLLM's own worker for this platform"
    )


class RunnerPromptLengths:
    """The prompt length of each batch row of a model runner's steps (see the module docstring).

    Args:
        model_runner: a vLLM V1 or V2 model runner (GPU or CPU). Only a reference is
            kept; its tables are read at each :meth:`for_batch`.

    Raises:
        TypeError: from :func:`runner_version` for any other runner.
    """

    def __init__(self, model_runner) -> None:
        self.model_runner = model_runner
        self.version = runner_version(model_runner)

    def describe(self) -> str:
        """One log line: which runner, and which of its tables the prompt lengths come from."""
        return (
            f"vLLM's {self.version} model runner ({type(self.model_runner).__module__}): "
            f"prompt lengths from {_SOURCES[self.version]}"
        )

    def table_and_rows(self, common_attn_metadata) -> tuple[np.ndarray, np.ndarray]:
        """``(table, rows)``: the runner's prompt-length table and the entry of each real batch row.

        ``rows`` has one entry per real request of the step (``<= num_reqs``); the
        rest of ``common_attn_metadata.num_reqs`` rows are request padding.
        """
        runner = self.model_runner
        if self.version == "V2":
            rows = common_attn_metadata.req_idx
            if rows is None:
                # V2 leaves req_idx unset outside its default model state: draft-model speculators
                # (spec_decode/speculator.py), hybrid Mamba and encoder-decoder states. The config
                # hook refuses those at startup; reaching here means a new vLLM path.
                raise RuntimeError(
                    "the SWAA backend got attention metadata without CommonAttentionMetadata.req_idx from "
                    "vLLM's V2 model runner, so it cannot tell each row's prompt length; this vLLM path "
                    "(e.g. a draft-model speculator) is not supported"
                )
            return runner.req_states.prompt_len.np, np.asarray(rows)
        input_batch = runner.input_batch
        return input_batch.num_prompt_tokens, np.arange(input_batch.num_reqs)

    def for_batch(self, common_attn_metadata) -> torch.Tensor:
        """Prompt lengths of the step's rows.

        Args:
            common_attn_metadata: vLLM's ``CommonAttentionMetadata`` of the build.

        Returns:
            int32 CPU tensor ``[num_reqs]`` (a fresh copy, safe to keep): P of each
            real row in batch order, 0 for padding rows.

        Raises:
            RuntimeError: under V2, for metadata without ``req_idx`` (not a step of
                V2's default model state).
        """
        table, rows = self.table_and_rows(common_attn_metadata)
        num_reqs = common_attn_metadata.num_reqs
        prompt_lens = torch.zeros(num_reqs, dtype=torch.int32)
        num_real = min(len(rows), num_reqs)
        if num_real:
            prompt_lens[:num_real] = torch.from_numpy(np.asarray(table[rows[:num_real]], dtype=np.int32))
        return prompt_lens


def bind_prompt_lengths(model_runner) -> RunnerPromptLengths:
    """Point every SWAA metadata builder of ``model_runner`` at its prompt lengths.

    Call after ``model_runner.initialize_kv_cache`` (which creates the builders,
    ``runner.attn_groups[kv_cache_group][attn_group].metadata_builders`` in V1 and V2)
    and before the first step; idempotent.

    Returns:
        The :class:`RunnerPromptLengths` the builders now use.
    """
    from swaa_vllm.backend import SwaaMetadataBuilder

    source = RunnerPromptLengths(model_runner)
    for groups in model_runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if isinstance(builder, SwaaMetadataBuilder):
                    builder.prompt_lengths = source
    return source
