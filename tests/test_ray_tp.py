"""Tensor parallelism under vLLM's Ray executor on CPU (issue 7, part 1).

A local Ray instance (2 CPUs, no dashboard) and a tiny random-weight Llama whose 4
query heads and 2 KV heads split over 2 ranks. The plan has sliding layers with sinks
and full-attention decode plus one full layer, and the prompts are several windows
long, so the mask matters. Checked:

* greedy tokens of TP=2 under ``distributed_executor_backend="ray"`` equal TP=1, and
  both equal the independent transformers reference with the same masks (and differ
  from full attention, so the windows really cut);
* the SWAA backend ran on each Ray worker: ``collective_rpc("swaa_attention_report")``
  answers from two Ray actors (ranks 0 and 1), each running the SWAA worker with half
  of the heads, every layer a ``SwaaAttentionImpl`` that applied its planned mask;
* shim 6 (``swaa_vllm.platforms.ray_executor``) is still needed and is scoped: vLLM's CPU
  platform still names no Ray resource, the config hook swaps ``"ray"`` only for the
  swaa backend, and the legacy Ray executor is refused with a message.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests import hf_reference, tiny_models
from tests.engine import greedy, llm_engine

pytestmark = pytest.mark.e2e

SWAA_CONFIG = {"sliding_window_size": 16, "keep_first": 4, "force_fa_decode": True, "non_sliding_layers": [1]}
NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 4, 4, 2
MAX_TOKENS = 8
TINY_ENGINE = dict(
    attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG}, skip_tokenizer_init=True,
    max_model_len=512, block_size=16, kv_cache_memory_bytes=64 << 20,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_models.make_checkpoint(
        tmp_path_factory.mktemp("tiny_llama_tp"), "llama",
        num_layers=NUM_LAYERS, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=64,
    )


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(2, tiny_models.VOCAB) for _ in range(n)] for n in (37, 90, 150)]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance whose address the spawned engine process finds through ``RAY_ADDRESS``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def runs(tiny_llama, prompts, local_ray):
    """Greedy outputs of TP=1 (vLLM's default executor) and TP=2 on Ray, plus the Ray workers' reports."""
    out = {}
    t0 = time.perf_counter()
    with llm_engine(tiny_llama, **TINY_ENGINE) as llm:
        out["startup_tp1"] = time.perf_counter() - t0
        out["tp1"] = greedy(llm, prompts, MAX_TOKENS, logprobs=1)
    t0 = time.perf_counter()
    with llm_engine(tiny_llama, tensor_parallel_size=2, distributed_executor_backend="ray", **TINY_ENGINE) as llm:
        out["startup_tp2_ray"] = time.perf_counter() - t0
        out["tp2"] = greedy(llm, prompts, MAX_TOKENS, logprobs=1)
        out["reports"] = llm.collective_rpc("swaa_attention_report")
    print(f"engine startup: TP=1 {out['startup_tp1']:.1f} s, TP=2 on Ray {out['startup_tp2_ray']:.1f} s")
    return out


def test_tp2_on_ray_equals_tp1_and_the_reference(runs, tiny_llama, prompts):
    tp1 = [tokens for tokens, _ in runs["tp1"]]
    tp2 = [tokens for tokens, _ in runs["tp2"]]
    assert tp2 == tp1
    for (_, lp1), (_, lp2) in zip(runs["tp1"], runs["tp2"], strict=True):
        assert lp2 == pytest.approx(lp1, abs=2e-3)  # sharded matmuls + gloo all-reduce: rounding only

    model = hf_reference.load_model(tiny_llama)
    reference = [hf_reference.greedy(model, SWAA_CONFIG, p, MAX_TOKENS)[0] for p in prompts]
    full_attention = [hf_reference.greedy(model, None, p, MAX_TOKENS)[0] for p in prompts]
    assert tp2 == reference
    assert reference != full_attention, "the windows change nothing on these prompts: make them longer"


def test_swaa_backend_ran_on_each_ray_worker(runs):
    reports = runs["reports"]
    assert len(reports) == 2
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert sorted(r["tp_rank"] for r in reports) == [0, 1]
    assert len({r["pid"] for r in reports} | {os.getpid()}) == 3
    expected = {i: [None, 0, False] if i in SWAA_CONFIG["non_sliding_layers"] else [16, 4, True]
                for i in range(NUM_LAYERS)}
    for r in reports:
        assert r["in_ray_actor"], r
        assert r["worker_cls"] == "SwaaCPUWorker"
        assert len(r["layers"]) == NUM_LAYERS
        for name, layer in r["layers"].items():
            index = int(name.split(".")[2])  # model.layers.<i>.self_attn.attn
            assert layer == {
                "impl": "SwaaAttentionImpl",
                "num_heads": NUM_HEADS // 2,
                "num_kv_heads": NUM_KV_HEADS // 2,
                "mask": expected[index],  # set by a forward step on this worker
            }, name


def test_vllm_cpu_platform_still_names_no_ray_resource():
    """Why shim 6 exists: without it vLLM's Ray executor refuses the CPU platform."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import Platform

    assert Platform.ray_device_key == ""
    assert "ray_device_key" not in vars(CpuPlatform) or CpuPlatform.ray_device_key == ""


def _executor_backend(tiny_llama, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_llama), skip_tokenizer_init=True, max_model_len=512, block_size=16,
                      kv_cache_memory_bytes=64 << 20, tensor_parallel_size=2,
                      distributed_executor_backend="ray", **kwargs)
    return args.create_engine_config().parallel_config


def test_config_hook_swaps_ray_only_for_swaa(tiny_llama, monkeypatch):
    import swaa_vllm
    from swaa_vllm.platforms.ray_executor import SwaaCpuRayExecutor

    swaa_vllm.register()
    swaa = _executor_backend(tiny_llama, attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG})
    assert swaa.distributed_executor_backend is SwaaCpuRayExecutor
    assert swaa.use_ray
    other = _executor_backend(tiny_llama, attention_backend="CPU_ATTN")
    assert other.distributed_executor_backend == "ray"

    monkeypatch.setenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", "0")
    with pytest.raises(ValueError, match="unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND or set it to 1"):
        _executor_backend(tiny_llama, attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG})
