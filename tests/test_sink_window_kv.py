"""Sink-aware KV memory (``swaa_vllm/sink_window_cache.py``): freed exactly, never read, counted at startup.

Three levels, each against an independent reference:

* the gap rule against the SWAA mask itself (``shared/SWAA.md``): a block is freed
  iff no present or future query can see any of its positions;
* :class:`SinkWindowManager` driven as vLLM's ``allocate_slots`` drives it (frees,
  then allocation, chunk by chunk), with a real ``BlockPool``: the blocks every
  query needs are the ones first allocated to them, and the blocks held stay within
  the documented bound; its prefix-cache lookup against a brute-force search;
* whole engines (tiny random Llama, in-process so the test can see the scheduler
  and the worker): a 600-token prompt, W=64, k=8, 200 generated tokens, under
  chunked prefill below W, preemption and prefix-cache hits, token by token against
  ``tests/hf_reference.py``; the blocks a request holds in the sink-window group;
  freed blocks poisoned with NaN while they are free, so an attention that loaded
  one would turn its output NaN; vLLM's start-up "Maximum concurrency" figure.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from swaa_vllm.config import build_plan
from swaa_vllm.sink_window_cache import (
    SinkWindowManager,
    SinkWindowSpec,
    gap_blocks,
    max_sink_window_blocks,
    register_sink_window_spec,
    sink_window_kv_specs,
)
from tests import hf_reference, tiny_models
from tests.v2_runner import run_with_runner


def _visible(i: int, j: int, window: int, sinks: int) -> bool:
    """The SWAA rule of a sliding row (shared/SWAA.md), written out independently."""
    return j <= i and (j < sinks or j > i - window)


def _full_spec(block_size: int = 16) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float32)


def _sink_spec(window: int, sinks: int, block_size: int = 16) -> SinkWindowSpec:
    return SinkWindowSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float32,
                          sliding_window=window, sink_tokens=sinks)


# ---------------------------------------------------------------------------
# The gap rule and the bound.
# ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 200), window=st.integers(1, 70), sinks=st.integers(0, 40), block=st.sampled_from([1, 4, 16]))
def test_gap_is_exactly_the_blocks_no_future_query_sees(n, window, sinks, block):
    first, end = gap_blocks(n, window, sinks, block)
    horizon = n + window + sinks + 2 * block  # later queries see no more than these
    for b in range(cdiv(n, block) + 1):
        seen = any(_visible(i, j, window, sinks) for j in range(b * block, (b + 1) * block)
                   for i in range(max(n, j), horizon))
        assert (first <= b < end) == (not seen), f"block {b}: n={n} W={window} k={sinks} B={block}"


# ---------------------------------------------------------------------------
# The manager, driven as vLLM's allocate_slots drives it.
# ---------------------------------------------------------------------------


def _manager(spec: SinkWindowSpec, num_blocks: int, chunk: int, max_len: int, caching: bool = False):
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=caching, hash_block_size=spec.block_size)
    manager = SinkWindowManager(
        spec, block_pool=pool, enable_caching=caching, kv_cache_group_id=0, scheduler_block_size=spec.block_size,
        max_admission_blocks_per_request=spec.max_admission_blocks_per_request(chunk, max_len),
    )
    return manager, pool


@settings(max_examples=120, deadline=None)
@given(prompt=st.integers(1, 300), generated=st.integers(0, 80), window=st.integers(1, 70), sinks=st.integers(0, 40),
       chunk=st.integers(1, 64), block=st.sampled_from([4, 16]), lookahead=st.integers(0, 3))
def test_manager_keeps_every_needed_block_and_stays_within_the_bound(
    prompt, generated, window, sinks, chunk, block, lookahead
):
    spec = _sink_spec(window, sinks, block)
    total = prompt + generated
    max_len = total + lookahead + 1
    manager, pool = _manager(spec, num_blocks=cdiv(max_len, block) + 2, chunk=chunk + lookahead, max_len=max_len)
    bound = max_sink_window_blocks(window, sinks, block, chunk + lookahead, max_len)
    owner: dict[int, int] = {}  # position's block index -> the block id first given to it
    computed = 0
    while computed < total:
        step = min(chunk, prompt - computed) if computed < prompt else 1  # prefill chunks, then decode
        manager.remove_skipped_blocks("r", computed)  # vLLM frees first, on the processed basis
        num_tokens = computed + step + lookahead
        assert manager.get_num_blocks_to_allocate("r", num_tokens, [], computed, computed, computed + step) >= 0
        manager.allocate_new_blocks("r", num_tokens, computed + step)
        manager.num_cached_block.setdefault("r", 0)
        blocks = manager.req_to_blocks["r"]
        for b, blk in enumerate(blocks):
            if not blk.is_null:
                assert owner.setdefault(b, blk.block_id) == blk.block_id, "a block moved position"
        # Every key a query of this step needs is in the block first given to its position.
        for i in range(computed, computed + step):
            for j in range(i + 1):
                if _visible(i, j, window, sinks):
                    blk = blocks[j // block]
                    assert not blk.is_null and blk.block_id == owner[j // block], f"query {i} lost key {j}"
        held = sum(not blk.is_null for blk in blocks)
        assert held <= bound, f"{held} blocks held > bound {bound}"
        computed += step
    manager.free("r")
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all back (the null block is never free)


def test_a_long_request_really_frees_its_gap():
    spec = _sink_spec(window=64, sinks=8, block_size=16)
    manager, pool = _manager(spec, num_blocks=80, chunk=48, max_len=1024)
    computed = 0
    for step in [48] * 12 + [24] + [1] * 200:  # a 600-token prompt in 48-token chunks, then 200 decode steps
        manager.remove_skipped_blocks("r", computed)
        manager.allocate_new_blocks("r", computed + step, computed + step)
        computed += step
    blocks = manager.req_to_blocks["r"]
    held = [b for b, blk in enumerate(blocks) if not blk.is_null]
    # Sink block 0, then the blocks of the last 64 positions before the next query (position 800).
    assert held == [0] + list(range((800 - 64 + 1) // 16, cdiv(800, 16)))
    assert pool.get_num_free_blocks() == 79 - len(held)


# ---------------------------------------------------------------------------
# Prefix-cache lookup against brute force.
# ---------------------------------------------------------------------------


@dataclass
class _FakeBlock:
    block_id: int
    is_null: bool = False


class _FakePool:
    """The three BlockPool members the lookup uses; hashes are block indices."""

    def __init__(self, cached: set[int], block_size: int):
        self.cached = cached
        self.hash_block_size = block_size
        self.null_block = _FakeBlock(-1, is_null=True)
        self.blocks = {i: _FakeBlock(i) for i in cached}

    def get_cached_block(self, block_hash, group_ids):
        return [self.blocks[block_hash]] * len(group_ids) if block_hash in self.cached else None


@settings(max_examples=400, deadline=None)
@given(n=st.integers(0, 24), window=st.integers(1, 60), sinks=st.integers(0, 40), align_blocks=st.sampled_from([1, 2]),
       data=st.data())
def test_prefix_cache_hit_is_the_longest_whose_needed_blocks_are_cached(n, window, sinks, align_blocks, data):
    block = 8
    cached = set(data.draw(st.lists(st.integers(0, max(0, n - 1)), unique=True)) if n else [])
    max_length = data.draw(st.integers(0, n * block + block))
    pool = _FakePool(cached, block)
    spec = _sink_spec(window, sinks, block)
    hit, length = SinkWindowManager.find_longest_cache_hit(
        list(range(n)), max_length, [0, 1], pool, spec, drop_eagle_block=False, alignment_tokens=block * align_blocks,
    )

    def needed(m: int) -> set[int]:  # blocks queries from position m*block on read below m*block
        lo = m * block
        return {j // block for j in range(lo) if any(_visible(i, j, window, sinks) for i in range(lo, lo + window + 1))}

    best = max(m for m in range(min(n, max_length // block) + 1)
               if m % align_blocks == 0 and needed(m) <= cached)
    assert length == best * block
    for group in hit:
        assert len(group) == best
        for b, blk in enumerate(group):
            if b in needed(best):
                assert blk.block_id == b
            else:
                assert blk.is_null, f"block {b} is not needed but was taken"


# ---------------------------------------------------------------------------
# Registration and spec selection.
# ---------------------------------------------------------------------------


def test_registry_maps_the_spec_to_its_manager_and_keeps_vllms_builtins():
    register_sink_window_spec()
    register_sink_window_spec()  # idempotent
    assert KVCacheSpecRegistry.get_manager_class(_sink_spec(64, 8)) is SinkWindowManager
    assert KVCacheSpecRegistry.get_manager_class(_full_spec()) is FullAttentionManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(_sink_spec(64, 8)) is SinkWindowSpec


def test_vllm_registry_still_skips_its_builtins_once_a_plugin_registered_first():
    """Pins why register_sink_window_spec registers vLLM's built-ins first (fails if vLLM fixes it)."""
    code = (
        "from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry\n"
        "from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager\n"
        "from vllm.v1.kv_cache_interface import FullAttentionSpec\n"
        "import dataclasses, torch\n"
        "@dataclasses.dataclass(frozen=True, kw_only=True)\n"
        "class Mine(FullAttentionSpec): pass\n"
        "KVCacheSpecRegistry.register(Mine, FullAttentionManager)\n"
        "spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)\n"
        "print(KVCacheSpecRegistry.get_manager_class(spec))\n"
    )
    # A fresh process that loads no plugin (only vLLM's plugin loader would import swaa_vllm).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "None", out.stdout


def test_spec_footprint_is_the_bound_and_pages_match_full_attention():
    spec = _sink_spec(window=64, sinks=8)
    assert spec.page_size_bytes == _full_spec().page_size_bytes
    # k=8 -> 1 sink block; W-1 + 48 in flight = 111 tokens -> 7 blocks, +1 unaligned window start.
    assert spec.max_admission_blocks_per_request(48, 8192) == 1 + 7 + 1
    assert spec.max_admission_blocks_per_request(48, 64) == 4  # never more than max_model_len's blocks


def test_only_layers_that_slide_while_decoding_get_the_spec():
    plan = build_plan({"sliding_window_size": 64, "keep_first": 8, "force_fa_decode": [3],
                       "non_sliding_layers": [0]}, 5)
    specs = {f"model.layers.{i}.self_attn.attn": _full_spec() for i in range(5)}
    out, layers, reason = sink_window_kv_specs(specs, plan, hybrid_manager_disabled=False)
    assert layers == [1, 2, 4] and reason is None
    for i in range(5):
        spec = out[f"model.layers.{i}.self_attn.attn"]
        if i in (1, 2, 4):
            assert type(spec) is SinkWindowSpec and (spec.sliding_window, spec.sink_tokens) == (64, 8)
            assert (spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype) == (16, 2, 64, torch.float32)
        else:
            assert spec is specs[f"model.layers.{i}.self_attn.attn"]
    # A pipeline stage holding layers 3-4 only: global indices decide.
    stage = {f"model.layers.{i}.self_attn.attn": _full_spec() for i in (3, 4)}
    assert sink_window_kv_specs(stage, plan, False)[1] == [4]
    # The recipe (FA decode everywhere) changes nothing.
    recipe = build_plan({"sliding_window_size": 64, "keep_first": 8, "force_fa_decode": True}, 5)
    assert sink_window_kv_specs(specs, recipe, False) == (specs, [], None)


def test_hybrid_manager_disabled_keeps_mixed_models_whole_and_says_why():
    plan = build_plan({"sliding_window_size": 64, "keep_first": 8, "non_sliding_layers": [0]}, 3)
    specs = {f"model.layers.{i}.self_attn.attn": _full_spec() for i in range(3)}
    out, layers, reason = sink_window_kv_specs(specs, plan, hybrid_manager_disabled=True)
    assert out == specs and layers == [] and "--disable-hybrid-kv-cache-manager" in reason
    # All layers sliding: one uniform group, which needs no hybrid manager.
    all_sliding = build_plan({"sliding_window_size": 64, "keep_first": 8}, 3)
    assert sink_window_kv_specs(specs, all_sliding, True)[1] == [0, 1, 2]


# ---------------------------------------------------------------------------
# Whole engines.
# ---------------------------------------------------------------------------

W, K, BLOCK, CHUNK = 64, 8, 16, 48
MIXED = {"sliding_window_size": W, "keep_first": K, "force_fa_decode": [3], "non_sliding_layers": [0]}
ALL_SLIDING = {"sliding_window_size": W, "keep_first": K}
MAX_LEN, GENERATED = 1024, 200
BOUND = cdiv(K, BLOCK) + cdiv(W - 1 + CHUNK, BLOCK) + 1  # the documented bound, from the formula


def _engine_run(model_dir: str, swaa_config: dict, waves: list[list[list[int]]], num_blocks: int | None,
                prefix_caching: bool, poison: bool) -> dict:
    """Run ``waves`` of prompts through one in-process engine; outputs and what the KV manager did."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
    from vllm import SamplingParams, TokensPrompt

    from tests.engine import llm_engine

    kwargs = dict(attention_backend="swaa", max_model_len=MAX_LEN, block_size=BLOCK, max_num_batched_tokens=CHUNK,
                  max_num_seqs=4, kv_cache_memory_bytes=1 << 24, skip_tokenizer_init=True, disable_log_stats=False,
                  enable_prefix_caching=prefix_caching, hf_overrides={"swaa_config": swaa_config})
    if num_blocks is not None:
        kwargs["num_gpu_blocks_override"] = num_blocks
    result = {"outputs": [], "peak_blocks": 0, "poisoned": 0}
    with llm_engine(model_dir, **kwargs) as llm:
        core = llm.llm_engine.engine_core.engine_core
        scheduler = core.scheduler
        managers = [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers
                    if isinstance(m, SinkWindowManager)]
        result["sink_window_groups"] = len(managers)
        result["managers"] = [type(m).__name__ for m in scheduler.kv_cache_manager.coordinator.single_type_managers]
        result["max_concurrency"] = core.vllm_config.cache_config.kv_cache_max_concurrency
        result["num_blocks"] = scheduler.kv_cache_manager.block_pool.num_gpu_blocks
        original_schedule = scheduler.schedule

        def schedule(*args, **kwargs):
            out = original_schedule(*args, **kwargs)
            for m in managers:  # after this step's frees and allocations: the peak
                for blocks in m.req_to_blocks.values():
                    result["peak_blocks"] = max(result["peak_blocks"], sum(not b.is_null for b in blocks))
            return out

        scheduler.schedule = schedule
        if poison:
            # Freed blocks hold NaN while they are free (and vLLM's null block always does): any attention
            # that loads one, even under a zero weight, turns NaN. A block handed out again is zeroed
            # first, as a fresh allocation, since vLLM's op reads the unwritten slots of a sequence's last
            # block (with zero weights, see tests/test_cpu_kernel.py).
            worker = core.model_executor.driver_worker.worker
            caches = [layer.kv_cache for layer in worker.vllm_config.compilation_config.static_forward_context.values()]
            pool = scheduler.kv_cache_manager.block_pool
            original_free, original_new = pool.free_blocks, pool.get_new_blocks

            def free_blocks(ordered_blocks):
                blocks = list(ordered_blocks)
                original_free(blocks)
                dead = [b.block_id for b in blocks if b.ref_cnt == 0 and not b.is_null]
                for cache in caches:
                    cache[dead] = float("nan")
                result["poisoned"] += len(dead)

            def get_new_blocks(num_blocks):
                blocks = original_new(num_blocks)
                for cache in caches:
                    cache[[b.block_id for b in blocks]] = 0.0
                return blocks

            pool.free_blocks, pool.get_new_blocks = free_blocks, get_new_blocks
            for cache in caches:
                cache[0] = float("nan")  # vLLM's null block
        params = SamplingParams(max_tokens=GENERATED, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False)
        for prompts in waves:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            for out in outs:
                c = out.outputs[0]
                logprobs = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs, strict=True)]
                result["outputs"].append((list(c.token_ids), logprobs))
        result["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    return result


def _check_against_reference(model_dir, swaa_config, prompts, outputs, tol=5e-3):
    model = hf_reference.load_model(model_dir)
    failures = []
    for n, (prompt, (tokens, logprobs)) in enumerate(zip(prompts, outputs, strict=True)):
        argmax, ref_logprobs, _ = hf_reference.teacher_forced(model, swaa_config, prompt, tokens)
        for step, (tok, best, lp, ref) in enumerate(zip(tokens, argmax, logprobs, ref_logprobs, strict=True)):
            if tok != best or abs(lp - ref) > tol:
                failures.append(f"prompt {n} (len {len(prompt)}) step {step}: vllm {tok} ({lp:.5f}), "
                                f"reference {best} (vllm token's reference logprob {ref:.5f})")
                break
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_models.make_checkpoint(tmp_path_factory.mktemp("sinkwin"), "llama", num_layers=4, num_heads=4,
                                       num_kv_heads=2, head_dim=64)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, tiny_models.VOCAB) for _ in range(n)]


# V2 (~90 s here, its kernels in the Triton interpreter) in make sweep; make test's V2 matrix case
# llama-r2-ngram-sliding-decode-mixed has a sliding-decode layer too (prefix hits, preemption, ngram drafts).
MIXED_RUNNERS = ("v1", "v2") if os.environ.get("SWAA_MATRIX") == "full" else ("v1",)


@pytest.mark.e2e
@pytest.mark.parametrize("runner", MIXED_RUNNERS)
def test_mixed_plan_exact_under_chunking_preemption_and_prefix_hits(runner, tiny_llama, monkeypatch):
    """Layer 0 full, 1-2 sliding decode (sink-window spec), 3 sliding with FA decode: two KV cache groups."""
    rng = random.Random(1)
    a = _tokens(rng, 600)
    # Wave 2: `a` again (a 592-token hit: sink block, nulls, then the window blocks a left cached), a fresh
    # prompt, and one sharing a's first 400 tokens, whose sink-window blocks around 400 were freed and
    # evicted meanwhile (the hit must stop where they are missing). 105 blocks hold two 600-token prompts
    # (2 x (38 full + <= 9 sink-window)) but not their 800-token ends: preemption.
    waves = [[a], [a, _tokens(rng, 600), a[:400] + _tokens(rng, 200)]]
    result = run_with_runner(monkeypatch, runner, _engine_run, str(tiny_llama), MIXED, waves, 105, True, False)
    assert result["managers"] == ["FullAttentionManager", "SinkWindowManager"]
    assert result["metrics"]["vllm:num_preemptions"] > 0, "no preemption"
    assert result["metrics"]["vllm:prefix_cache_hits"] >= 592, "no long prefix-cache hit"
    assert 0 < result["peak_blocks"] <= BOUND
    # Capacity as vLLM reports it: one block per layer pair and group; per request 64 full blocks + BOUND.
    assert result["max_concurrency"] == pytest.approx(result["num_blocks"] / (cdiv(MAX_LEN, BLOCK) + BOUND))
    _check_against_reference(tiny_llama, MIXED, [p for wave in waves for p in wave], result["outputs"])


@pytest.mark.e2e
def test_freed_blocks_are_never_read_and_capacity_counts_the_real_footprint(tiny_llama, monkeypatch):
    """All layers slide while decoding (one uniform group); every freed block is poisoned at once."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    rng = random.Random(2)
    waves = [[_tokens(rng, 600), _tokens(rng, 600), _tokens(rng, 130)]]
    result = _engine_run(str(tiny_llama), ALL_SLIDING, waves, None, False, True)
    assert result["managers"] == ["SinkWindowManager"]
    assert result["poisoned"] > 100, "too few blocks freed to show anything"
    assert 0 < result["peak_blocks"] <= BOUND
    # vLLM's figure: the pool's blocks over the per-request footprint, BOUND blocks instead of 64.
    assert result["max_concurrency"] == pytest.approx(result["num_blocks"] / BOUND)
    _check_against_reference(tiny_llama, ALL_SLIDING, waves[0], result["outputs"])
