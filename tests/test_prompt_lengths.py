"""Prompt lengths reach the SWAA builder from the right request, under vLLM's V1 and V2 model runners.

The runners' own request tables are used (V2: vLLM's ``RequestState``), with
requests added, removed and re-added so that table slots are reused and batch
rows come in an order unrelated to slots; the independent truth is the prompt
length each request was added with. ``tests/test_matrix.py`` checks the same end
to end, token by token, under both runners; the vLLM interfaces read here are pinned
by ``tests/vllm_api/expectations.py`` (checked on the installed vLLM by
``tests/test_vllm_api.py``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from swaa_vllm.backend import SwaaMetadataBuilder
from swaa_vllm.prompt_lengths import RunnerPromptLengths, bind_prompt_lengths, runner_version


def _v2_runner(monkeypatch, max_num_reqs=4):
    """A V2 runner object holding only vLLM's real request table (CPU buffers, as the CPU runner uses)."""
    import vllm.v1.worker.cpu.buffer_utils as cpu_buffer_utils
    import vllm.v1.worker.gpu.buffer_utils as gpu_buffer_utils
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.states import RequestState

    # What vLLM's CPU V2 runner does at import (vllm/v1/worker/cpu/shm.py): host buffers without pinning.
    monkeypatch.setattr(gpu_buffer_utils, "UvaBuffer", cpu_buffer_utils.UvaBuffer)
    runner = object.__new__(GPUModelRunner)
    runner.req_states = RequestState(
        max_num_reqs=max_num_reqs, max_model_len=256, max_num_batched_tokens=256, num_speculative_steps=0,
        vocab_size=100, device=torch.device("cpu"),
    )
    return runner


def _add(runner, req_id, prompt_len, num_generated=0):
    # all_token_ids longer than the prompt: a request resumed after preemption (prefill_len > prompt_len).
    runner.req_states.add_request(req_id, prompt_len, list(range(prompt_len + num_generated)), 0, 16)


def _metadata(num_reqs, req_idx=None):
    return types.SimpleNamespace(num_reqs=num_reqs, req_idx=req_idx)


def test_v2_rows_read_their_own_request_after_slots_are_reused_and_rows_reordered(monkeypatch):
    runner = _v2_runner(monkeypatch)
    truth = {"a": 5, "b": 9, "c": 3}
    for req_id, prompt_len in truth.items():
        _add(runner, req_id, prompt_len)
    runner.req_states.remove_request("b")
    _add(runner, "d", 11, num_generated=4)  # reuses b's slot, resumed after preemption
    truth["d"] = 11
    del truth["b"]
    source = RunnerPromptLengths(runner)
    assert source.version == "V2"
    assert "prompt lengths from req_states.prompt_len by CommonAttentionMetadata.req_idx" in source.describe()
    slot = runner.req_states.req_id_to_index
    assert slot["d"] != 0, "the test needs a request whose slot differs from its batch row"
    for order in (["d", "a", "c"], ["c", "d", "a"], ["a"]):
        req_idx = np.array([slot[r] for r in order])
        got = source.for_batch(_metadata(len(order), req_idx))
        assert got.tolist() == [truth[r] for r in order], order
        assert got.dtype == torch.int32


def test_v2_padding_rows_get_zero_not_a_stale_entry(monkeypatch):
    runner = _v2_runner(monkeypatch)
    for req_id, prompt_len in {"a": 5, "b": 9, "c": 3, "e": 7}.items():
        _add(runner, req_id, prompt_len)
    runner.req_states.remove_request("b")  # its table entry still holds 9
    slot = runner.req_states.req_id_to_index
    got = RunnerPromptLengths(runner).for_batch(_metadata(4, np.array([slot["c"], slot["a"]])))
    assert got.tolist() == [3, 5, 0, 0]  # two real rows, two rows of request padding (full CUDA graph)


def test_v2_metadata_without_req_idx_is_refused_not_guessed(monkeypatch):
    runner = _v2_runner(monkeypatch)
    _add(runner, "a", 5)
    with pytest.raises(RuntimeError, match="req_idx"):
        RunnerPromptLengths(runner).for_batch(_metadata(1, None))


def test_v2_result_is_a_copy_that_later_steps_do_not_change(monkeypatch):
    runner = _v2_runner(monkeypatch)
    _add(runner, "a", 5)
    slot = runner.req_states.req_id_to_index["a"]
    got = RunnerPromptLengths(runner).for_batch(_metadata(1, np.array([slot])))
    runner.req_states.remove_request("a")
    _add(runner, "z", 42)  # same slot, new request
    assert got.tolist() == [5]


def _v1_runner(num_prompt_tokens, num_reqs):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = object.__new__(GPUModelRunner)
    runner.input_batch = types.SimpleNamespace(num_prompt_tokens=np.array(num_prompt_tokens), num_reqs=num_reqs)
    return runner


def test_v1_rows_are_input_batch_order_and_padding_is_zero():
    runner = _v1_runner([7, 2, 30, 99], num_reqs=3)  # entry 3 is stale (a finished request)
    source = RunnerPromptLengths(runner)
    assert source.version == "V1"
    assert source.describe().startswith("vLLM's V1 model runner (vllm.v1.worker.gpu_model_runner)")
    assert source.for_batch(_metadata(3)).tolist() == [7, 2, 30]
    assert source.for_batch(_metadata(4)).tolist() == [7, 2, 30, 0]  # request padding of a full CUDA graph
    runner.input_batch = types.SimpleNamespace(num_prompt_tokens=np.array([4, 8]), num_reqs=2)  # re-allocated
    assert source.for_batch(_metadata(2)).tolist() == [4, 8]  # read at build time, not at bind time


def test_cpu_runners_are_recognised_by_their_vllm_base():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CPUModelRunnerV1

    assert runner_version(object.__new__(CPUModelRunnerV2)) == "V2"
    assert runner_version(object.__new__(CPUModelRunnerV1)) == "V1"


def test_unknown_runner_is_refused_by_name():
    class PluginRunner:
        pass

    with pytest.raises(TypeError, match="PluginRunner"):
        RunnerPromptLengths(PluginRunner())


def test_bind_reaches_every_swaa_builder_and_only_those():
    swaa_builders = [object.__new__(SwaaMetadataBuilder) for _ in range(3)]
    other = types.SimpleNamespace()
    runner = _v1_runner([5], num_reqs=1)
    runner.attn_groups = [
        [types.SimpleNamespace(metadata_builders=swaa_builders[:2])],  # two ubatch builders of one group
        [types.SimpleNamespace(metadata_builders=[other]), types.SimpleNamespace(metadata_builders=swaa_builders[2:])],
    ]
    source = bind_prompt_lengths(runner)
    assert all(b.prompt_lengths is source for b in swaa_builders)
    assert not hasattr(other, "prompt_lengths")


def test_builder_uses_the_bound_lengths():
    builder = object.__new__(SwaaMetadataBuilder)
    builder.device = torch.device("cpu")
    builder.prompt_lengths = RunnerPromptLengths(_v1_runner([6, 3], num_reqs=2))
    cm = types.SimpleNamespace(
        num_reqs=2, num_actual_tokens=5, query_start_loc=torch.tensor([0, 4, 5], dtype=torch.int32),
        seq_lens=torch.tensor([4, 9], dtype=torch.int32), block_table_tensor=torch.zeros(2, 1, dtype=torch.int32),
        req_idx=None,
    )
    md = builder.build(common_prefix_len=0, common_attn_metadata=cm)
    assert md.prompt_lens.tolist() == [6, 3]
    assert md.query_start_loc.tolist() == [0, 4, 5]
