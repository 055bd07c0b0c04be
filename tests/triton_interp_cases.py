"""The Triton SWAA kernel under ``TRITON_INTERPRET=1`` against the dense reference.

Not collected by the main test run (the file name does not match ``test_*.py``):
``tests/test_triton_kernel.py`` runs it in a child pytest with
``TRITON_INTERPRET=1``, because Triton fixes interpreted-or-compiled when it is
first imported and the main run imports Triton (through vLLM) compiled. Run it
directly with ``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton_interp_cases.py``.

The interpreter executes every program of the grid in numpy, so shapes are tiny.
Float32 tolerance 1e-4: the kernel accumulates in float32 against a float64
reference over at most ~200 keys (worst seen 1e-6); a wrongly visible or missing
key moves outputs by ~1e-2 or more. Float16: inputs rounded before the
reference, the kernel's fp16 products and fp16 output rounding (one fp16 step at
magnitude ~2 is 2e-3); tolerance 1e-2. bfloat16 is not run here: the Triton 3.9
interpreter's ``tl.dot`` on bfloat16 operands returns garbage (checked with a
16x16 matmul); bfloat16 is covered by the sm_90 compile test and the GPU check.
"""

from __future__ import annotations

import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guarded by the wrapper
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/test_triton_kernel.py)", allow_module_level=True)

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.triton_swaa import triton_paged_swaa_attention
from tests.paged_cases import (
    EDGE_BATCH,
    EDGE_SPECS,
    LONG_BATCH,
    SLIDING_DECODE_SPECS,
    make_batch,
    poison_freed_blocks,
    reference_output,
)

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}

# (seq_len, q_len, prompt_len): a first chunk straddling the prompt end, multi-token
# generated rows, a whole prompt, a single decode, an empty query (padding request),
# a later chunk straddling the prompt end, a later all-prompt chunk, a chunk of a
# prompt longer than the sequence so far.
BATCH, SPECS = EDGE_BATCH, EDGE_SPECS


def _check(batch, spec, dtype=torch.float32, **launch):
    scale = batch.query.shape[-1] ** -0.5
    out = triton_paged_swaa_attention(*batch.kernel_args(), spec, scale, **launch)
    expected = reference_output(batch, spec, scale)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("name", list(SPECS))
def test_specs_gqa2_head64(name):
    _check(make_batch(BATCH, 4, 2, 64, 8, seed=1), SPECS[name], block_m=16, tile_n=16)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size,block_size,spec_name,launch",
    [
        (6, 2, 64, 16, "W5_k3_fa", {"block_m": 16, "tile_n": 16}),  # group of 3: a padded row per program
        (2, 2, 128, 16, "W16_k0_fa", {"block_m": 16, "tile_n": 32}),
        (2, 1, 256, 4, "W4_k10_k_ge_W", {"block_m": 16, "tile_n": 16}),
        (8, 2, 64, 8, "W7_k100_k_beyond_seq_fa", {"block_m": 32, "tile_n": 16}),
        (4, 2, 64, 8, "W5_k3_fa", {}),  # the default (GPU prefill) launch configuration
        (4, 2, 64, 8, "W5_k3_fa", {"max_query_len": 40}),
    ],
)
def test_shapes(num_heads, num_kv_heads, head_size, block_size, spec_name, launch):
    _check(make_batch(BATCH[:4], num_heads, num_kv_heads, head_size, block_size, seed=2), SPECS[spec_name], **launch)


@pytest.mark.parametrize("tile_n", [16, 32])
@pytest.mark.parametrize("name", list(SLIDING_DECODE_SPECS))
def test_freed_blocks_are_never_loaded(name, tile_n):
    """Blocks the sink-window KV manager freed hold NaN; key tiles wider than a block must not load them."""
    spec = SLIDING_DECODE_SPECS[name]
    batch = make_batch(LONG_BATCH, 4, 2, 64, 8, seed=6)
    assert poison_freed_blocks(batch, spec) > 0
    _check(batch, spec, block_m=16, tile_n=tile_n)


def test_float16():
    batch = make_batch(BATCH[:4], 4, 2, 64, 8, dtype=torch.float16, seed=3)
    _check(batch, SPECS["W5_k3_fa"], dtype=torch.float16, block_m=16, tile_n=16)


def test_decode_batch_small_config():
    """A uniform single-token decode batch (the CUDA-graph case) with the decode launch config."""
    batch = make_batch([(40, 1, 10), (7, 1, 7), (25, 1, 30), (64, 1, 64)], 4, 2, 64, 16, seed=4)
    _check(batch, SPECS["W5_k3_fa"], max_query_len=1)
    _check(batch, LayerMaskSpec(5, 3, False), max_query_len=1)


def test_output_buffer_and_errors():
    batch = make_batch(BATCH[:2], 4, 2, 64, 8, seed=5)
    out = torch.full((batch.query.shape[0] + 3, 4, 64), float("nan"))
    result = triton_paged_swaa_attention(*batch.kernel_args(), SPECS["W5_k3_fa"], 0.125, out=out, block_m=16, tile_n=16)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(result.double(), reference_output(batch, SPECS["W5_k3_fa"], 0.125), **TOL[torch.float32])
    with pytest.raises(ValueError, match="multiple"):
        triton_paged_swaa_attention(batch.query[:, :3], *batch.kernel_args()[1:], SPECS["full"], 0.125)
    with pytest.raises(ValueError, match="dtype"):
        triton_paged_swaa_attention(batch.query.half(), *batch.kernel_args()[1:], SPECS["full"], 0.125)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    reqs=st.lists(
        st.integers(1, 70).flatmap(
            lambda s: st.tuples(st.just(s), st.integers(0, s), st.integers(1, s + 20))
        ),
        min_size=1,
        max_size=4,
    ),
    window=st.one_of(st.none(), st.integers(1, 40)),
    keep_first=st.integers(0, 40),
    fa_decode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_batches(reqs, window, keep_first, fa_decode, seed):
    spec = LayerMaskSpec(window, keep_first if window else 0, fa_decode)
    _check(make_batch(reqs, 4, 2, 32, 8, seed=seed), spec, block_m=16, tile_n=16)


# ---------------------------------------------------------------------------
# Tile visits: prompt rows read only the sink tiles and the window tiles.
# ---------------------------------------------------------------------------


def _expected_tiles(q_lo, q_hi, prompt_len, spec, tile):
    """Tiles a program with rows at positions [q_lo, q_hi] must visit (written from SWAA.md)."""
    end = math.ceil((q_hi + 1) / tile)
    if spec.window is None or (spec.fa_decode and q_hi >= prompt_len):
        return set(range(end))
    sinks = set(range(math.ceil(min(spec.keep_first, q_hi + 1) / tile)))
    window = set(range(max(q_lo - spec.window + 1, 0) // tile, end))
    return sinks | window


@pytest.mark.parametrize("spec", [LayerMaskSpec(20, 10, True), LayerMaskSpec(9, 40, False), LayerMaskSpec(None)],
                         ids=["W20_k10_fa", "W9_k40", "full"])
def test_tile_visits(spec):
    block_m, tile, num_heads, num_kv_heads = 16, 16, 2, 1
    block_q = block_m // (num_heads // num_kv_heads)
    reqs = [(200, 200, 200), (150, 30, 120), (100, 2, 50)]
    batch = make_batch(reqs, num_heads, num_kv_heads, 32, 16, seed=6)
    max_tiles = math.ceil(max(s for s, _, _ in reqs) / tile)
    visits = torch.zeros(batch.query.shape[0], num_heads, max_tiles, dtype=torch.int32)
    scale = 32**-0.5
    out = triton_paged_swaa_attention(*batch.kernel_args(), spec, scale, tile_visits=visits, block_m=block_m,
                                      tile_n=tile)
    torch.testing.assert_close(out.double(), reference_output(batch, spec, scale), **TOL[torch.float32])

    assert int(visits.max()) == 1, "a tile was visited twice by one program (double counting)"
    starts = batch.query_start_loc.tolist()
    for r, (seq_len, q_len, prompt_len) in enumerate(reqs):
        context = seq_len - q_len
        for t in range(q_len):
            first = (t // block_q) * block_q
            q_lo, q_hi = context + first, context + min(first + block_q, q_len) - 1
            expected = _expected_tiles(q_lo, q_hi, prompt_len, spec, tile)
            for h in range(num_heads):
                got = set(torch.nonzero(visits[starts[r] + t, h]).flatten().tolist())
                assert got == expected, (r, t, h, sorted(got), sorted(expected))
            if spec.window is not None and q_hi < prompt_len:
                # The ceil bound: sink tiles plus the tiles spanned by the program's window.
                bound = math.ceil(spec.keep_first / tile) + math.ceil((spec.window - 1 + block_q) / tile) + 1
                assert len(expected) <= bound
                # and none of them lies wholly between the sinks and the row's window
                assert all(x * tile < spec.keep_first or (x + 1) * tile > q_lo - spec.window + 1 for x in got)
    if spec.window is not None:
        # The last rows of the 200-token prompt: far fewer tiles than full attention's 13.
        last = visits[starts[0] + 199, 0]
        assert int(last.sum()) <= math.ceil(spec.keep_first / tile) + math.ceil((spec.window - 1 + block_q) / tile) + 1
        assert int(last.sum()) < max_tiles // 2


def test_head_major_cache_views():
    """The kernel reads vLLM's head-major (LBHNC) cache through the backend's CUDA views."""
    from swaa_vllm.platforms.cuda_path import cuda_kv_views

    batch = make_batch(BATCH[:4], 4, 2, 32, 8, seed=7)
    token_major = torch.cat([batch.key_cache, batch.value_cache], dim=-1)  # [nb, bs, Hkv, 2D]
    head_major = token_major.permute(0, 2, 1, 3).contiguous()  # logical [nb, Hkv, bs, 2D], LBHNC memory
    key_cache, value_cache = cuda_kv_views(head_major)
    assert key_cache.shape == batch.key_cache.shape and not key_cache.is_contiguous()
    spec = SPECS["W5_k3_fa"]
    out = triton_paged_swaa_attention(batch.query, key_cache, value_cache, *batch.kernel_args()[3:], spec, 0.2,
                                      block_m=16, tile_n=16)
    torch.testing.assert_close(out.double(), reference_output(batch, spec, 0.2), **TOL[torch.float32])
