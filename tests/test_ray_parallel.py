"""Tensor and pipeline parallelism under vLLM's Ray executor on CPU, across the nodes of a Ray cluster.

A two-node cluster on this machine (Ray's ``ray.cluster_utils.Cluster``: two raylets with one CPU
each, :mod:`tests.ray_cluster`) and a tiny random-weight Llama of 4 layers whose 4 query heads and 2
KV heads split over 2 ranks. vLLM's Ray executor places one worker per node. The plan has sliding
layers with sinks on both pipeline stages, full layers on both, and a list-valued
``force_fa_decode`` (layer 2 only), so stage 1 applies a different plan by global layer index (2, 3)
than it would by its local index (0, 1). The prompts are several windows long, so the mask matters.
Checked, for TP=2 across the nodes and PP=2 across the nodes (and TP=2 x PP=2 over four nodes in
``make sweep``):

* greedy tokens equal one process (TP=1, vLLM's default executor) and the independent transformers
  reference with the same masks (``tests/hf_reference.py``), and differ from full attention;
* ``collective_rpc("swaa_attention_report")``: one Ray actor per node, each a SWAA worker with its
  share of the heads (TP) or exactly its stage's layers (PP), every layer a ``SwaaAttentionImpl``
  that applied the mask of its *global* index;
* the plan discriminates: applied by local index on stage 1 it gives other masks and other tokens
  (reference run with that plan), so a stage that indexed locally would fail the checks above;
* shim 6 (``swaa_vllm.platforms.ray_executor``) is still needed and is scoped: vLLM's CPU platform
  still names no Ray resource, the config hook swaps ``"ray"`` only for the swaa backend, and the
  legacy Ray executor is refused with a message.

Pipeline parallelism on the CPU build in eager mode also needs the worker's receive buffer
(:class:`swaa_vllm.worker.PipelineReceiveBufferMixin`): without it vLLM 0.32 fails the first step.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests import hf_reference, tiny_models
from tests.engine import greedy, llm_engine
from tests.ray_cluster import alive_node_ids, ray_cluster

pytestmark = pytest.mark.e2e

SWAA_CONFIG = {"sliding_window_size": 16, "keep_first": 4, "force_fa_decode": [2], "non_sliding_layers": [0, 3]}
NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 4, 4, 2
MAX_TOKENS = 8
TINY_ENGINE = dict(
    attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG}, skip_tokenizer_init=True,
    max_model_len=512, block_size=16, kv_cache_memory_bytes=64 << 20,
)
# name -> (tensor_parallel_size, pipeline_parallel_size); each on a cluster of tp x pp one-CPU nodes.
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}
SWEEP_LAYOUTS = {"tp2-pp2": (2, 2)}


def planned_mask(layer: int, cfg: dict = SWAA_CONFIG) -> list:
    """``[window, keep_first, fa_decode]`` of a layer under ``cfg``, as the attention report gives it."""
    if layer in cfg.get("non_sliding_layers", []):
        return [None, 0, False]
    fa = cfg.get("force_fa_decode", False)
    return [cfg["sliding_window_size"], cfg.get("keep_first", 0), fa if isinstance(fa, bool) else layer in fa]


def local_index_config(stages: list[list[int]]) -> dict:
    """The plan each stage would apply if it read ``SWAA_CONFIG`` by its local layer index."""
    full, fa = [], []
    for layers in stages:
        for local, layer in enumerate(layers):
            window, _, fa_decode = planned_mask(local)
            if window is None:
                full.append(layer)
            elif fa_decode:
                fa.append(layer)
    return {**SWAA_CONFIG, "non_sliding_layers": full, "force_fa_decode": fa or False}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_models.make_checkpoint(
        tmp_path_factory.mktemp("tiny_llama_parallel"), "llama",
        num_layers=NUM_LAYERS, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=64,
    )


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(2, tiny_models.VOCAB) for _ in range(n)] for n in (37, 90, 150)]


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return hf_reference.load_model(tiny_llama)


@pytest.fixture(scope="module")
def single_process(tiny_llama, prompts):
    """Greedy tokens and logprobs of TP=1, PP=1 on vLLM's default executor."""
    with llm_engine(tiny_llama, **TINY_ENGINE) as llm:
        return greedy(llm, prompts, MAX_TOKENS, logprobs=1)


def run_on_cluster(tiny_llama, prompts, tp: int, pp: int) -> dict:
    """Start a cluster of ``tp * pp`` one-CPU nodes, run the engine on it, return outputs and reports."""
    with ray_cluster(nodes=tp * pp) as cluster:
        out = {"nodes": alive_node_ids(), "cluster_startup_s": cluster.startup_s}
        start = time.perf_counter()
        with llm_engine(tiny_llama, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                        distributed_executor_backend="ray", **TINY_ENGINE) as llm:
            out["engine_startup_s"] = time.perf_counter() - start
            out["outputs"] = greedy(llm, prompts, MAX_TOKENS, logprobs=1)
            out["reports"] = llm.collective_rpc("swaa_attention_report")
    print(f"TP={tp} PP={pp} on {tp * pp} nodes: cluster {out['cluster_startup_s']:.1f} s, "
          f"engine start-up {out['engine_startup_s']:.1f} s")
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tiny_llama, prompts):
    tp, pp = LAYOUTS[request.param]
    return tp, pp, run_on_cluster(tiny_llama, prompts, tp, pp)


def check_equal_to_single_process_and_reference(run, single_process, hf_model, prompts):
    tokens = [t for t, _ in run["outputs"]]
    assert tokens == [t for t, _ in single_process]
    for (_, lp1), (_, lp2) in zip(single_process, run["outputs"], strict=True):
        assert lp2 == pytest.approx(lp1, abs=2e-3)  # sharded matmuls + gloo collectives: rounding only
    reference = [hf_reference.greedy(hf_model, SWAA_CONFIG, p, MAX_TOKENS)[0] for p in prompts]
    full_attention = [hf_reference.greedy(hf_model, None, p, MAX_TOKENS)[0] for p in prompts]
    assert tokens == reference
    assert reference != full_attention, "the windows change nothing on these prompts: make them longer"


def stages_of(reports) -> list[list[int]]:
    """The global layer indices of each pipeline stage, from the workers' reports."""
    by_stage: dict[int, set[int]] = {}
    for r in reports:
        by_stage.setdefault(r["pp_rank"], set()).update(int(n.split(".")[2]) for n in r["layers"])
    return [sorted(by_stage[s]) for s in sorted(by_stage)]


def check_reports(reports, tp: int, pp: int, nodes: set[str]):
    assert len(reports) == tp * pp
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in reports) == [(s, t) for s in range(pp) for t in range(tp)]
    assert {r["ray_node_id"] for r in reports} == nodes, "one worker per node of the cluster"
    assert len({r["pid"] for r in reports} | {os.getpid()}) == tp * pp + 1
    stages = stages_of(reports)
    per_stage = NUM_LAYERS // pp
    assert stages == [list(range(s * per_stage, (s + 1) * per_stage)) for s in range(pp)]
    for r in reports:
        assert r["in_ray_actor"], r
        assert r["worker_cls"] == "SwaaCPUWorker"
        assert sorted(int(n.split(".")[2]) for n in r["layers"]) == stages[r["pp_rank"]]
        for name, layer in r["layers"].items():
            index = int(name.split(".")[2])  # model.layers.<global index>.self_attn.attn
            assert layer == {
                "impl": "SwaaAttentionImpl",
                "num_heads": NUM_HEADS // tp,
                "num_kv_heads": NUM_KV_HEADS // tp,
                "mask": planned_mask(index),  # set by a forward step on this worker
            }, name


def test_parallel_on_ray_nodes_equals_one_process_and_the_reference(layout, single_process, hf_model, prompts):
    _, _, run = layout
    check_equal_to_single_process_and_reference(run, single_process, hf_model, prompts)


def test_each_ray_worker_applies_the_plan_of_its_global_layers(layout):
    tp, pp, run = layout
    assert len(run["nodes"]) == tp * pp
    check_reports(run["reports"], tp, pp, run["nodes"])
    if pp > 1:
        # A stage indexing the plan by its local layer index would apply other masks and give other tokens.
        stages = stages_of(run["reports"])
        wrong = local_index_config(stages)
        assert [planned_mask(i, wrong) for i in stages[1]] != [planned_mask(i) for i in stages[1]]


def test_the_plan_tells_local_from_global_layer_indices(single_process, hf_model, prompts):
    """The reference under the plan a local-indexing stage 1 of PP=2 would apply gives other tokens."""
    wrong = local_index_config([[0, 1], [2, 3]])
    assert wrong != SWAA_CONFIG
    tokens = [hf_reference.greedy(hf_model, wrong, p, MAX_TOKENS)[0] for p in prompts]
    assert tokens != [t for t, _ in single_process]


@pytest.mark.skipif(os.environ.get("SWAA_MATRIX") != "full", reason="four workers on four nodes: make sweep")
@pytest.mark.parametrize("name", list(SWEEP_LAYOUTS))
def test_tp_x_pp_on_four_ray_nodes(name, tiny_llama, prompts, single_process, hf_model):
    tp, pp = SWEEP_LAYOUTS[name]
    run = run_on_cluster(tiny_llama, prompts, tp, pp)
    check_equal_to_single_process_and_reference(run, single_process, hf_model, prompts)
    check_reports(run["reports"], tp, pp, run["nodes"])


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
