"""The native (C++) sink-window kernel (``kernels/sink_window_cpu.cpp``) against the dense reference.

Each case writes dense random keys/values into a paged cache with a shuffled block table
(never-written slots hold NaN, so a stray read shows), runs one run of sink-window rows
through ``native_sink_window_attention`` and compares with ``reference_attention`` under
``swaa_mask`` (``shared/SWAA.md``). The mixed-batch and property tests of
``test_cpu_kernel.py`` cover the kernel inside ``paged_swaa_attention``; this module covers
the shapes those tiny batches do not reach (several 32-key blocks and 16-row tiles, large
GQA groups, head sizes 16-256, float16), the argument checks, the choice of kernel and the
portable (non-AVX-512) build.

Tolerances as in ``test_cpu_kernel.py``: float32 1e-5; bfloat16 2e-2 (the kernel rounds the
probabilities to bf16 before PV on AVX512_BF16 CPUs, as FlashAttention does; the output is
bf16 anyway); float16 3e-3 (output rounding, 2**-11 relative, on values up to ~3).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swaa_kernels.cpu as cpu
from swaa_kernels import sink_window_native
from swaa_kernels.cpu import (
    LayerMaskSpec,
    amx_key_value_blocks,
    paged_swaa_attention,
    write_kv_cache,
    write_kv_cache_amx,
)
from swaa_kernels.reference import reference_attention, swaa_mask

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}

# The kernel, built with -march=native, runs bfloat16 on AMX tiles on CPUs that have them and where Linux grants
# them (the kernel asks itself, with the arch_prctl that torch.cpu._init_amx makes).
AMX_TILES = torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()


def paged_case(seq_len, num_heads, num_kv_heads, head_size, block_size, dtype, seed):
    """Dense q/k/v of one request and its paged cache (shuffled blocks, NaN in unwritten slots)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, num_heads, head_size, generator=gen).to(dtype)
    k = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
    blocks = -(-seq_len // block_size)
    pool = blocks + 3
    ids = torch.randperm(pool, generator=gen)[:blocks]
    kv_cache = torch.full((pool, num_kv_heads, block_size, 2 * head_size), float("nan"), dtype=dtype)
    slots = ids.repeat_interleave(block_size)[:seq_len] * block_size + torch.arange(seq_len) % block_size
    write_kv_cache(k, v, kv_cache, slots)
    block_row = torch.zeros(blocks + 2, dtype=torch.int32)
    block_row[:blocks] = ids.to(torch.int32)
    return q, k, v, kv_cache, block_row


def expected(q, k, v, first, end, window, sinks, scale):
    mask = swaa_mask(torch.arange(first, end), torch.arange(end), end, window, sinks, False)
    return reference_attention(q[first:end], k[:end], v[:end], mask, scale)


def run_native(q, kv_cache, block_row, first, end, window, sinks, scale, amx_tiles=True):
    out = torch.full_like(q[first:end], float("nan"))
    sink_window_native.native_sink_window_attention(q[first:end], kv_cache, block_row, out, sinks, window, first, scale,
                                                    amx_tiles=amx_tiles)
    return out


SHAPES = [  # (num_heads, num_kv_heads, head_size, block_size, window, sinks, rows)
    (9, 3, 64, 128, 100, 64, 70),  # the bundled model's heads, several key blocks and row tiles
    (16, 1, 128, 16, 33, 31, 17),  # GQA group 16; window and sinks not multiples of 32
    (4, 4, 256, 32, 7, 1, 40),  # no GQA; head size 256
    (6, 2, 16, 16, 1, 5, 3),  # W = 1, head size 16
    (8, 2, 80, 48, 64, 32, 1),  # one row (a decode row without FA decode); head size 80 = 5 vectors
    (4, 2, 64, 32, 300, 64, 40),  # several full 128-key softmax steps per tile
]
SHAPE_NAMES = ("num_heads", "num_kv_heads", "head_size", "block_size", "window", "sinks", "rows")


@pytest.mark.parametrize(
    ("dtype", "amx_tiles"),
    [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
    ids=["f32", "bf16", "bf16-no-amx-tiles", "f16"],
)
@pytest.mark.parametrize(SHAPE_NAMES, SHAPES)
def test_native_kernel_matches_reference(num_heads, num_kv_heads, head_size, block_size, window, sinks, rows, dtype,
                                         amx_tiles):
    """``bf16-no-amx-tiles``: the VDPBF16PS path that CPUs with AVX512_BF16 but no AMX run (on AMX machines the
    default takes the tiles for head sizes that are multiples of 32, so without it that path goes untested there)."""
    first = window + sinks + 5  # rows at positions >= W + k, as plan_rows hands them over
    end = first + rows
    q, k, v, kv_cache, block_row = paged_case(end, num_heads, num_kv_heads, head_size, block_size, dtype, seed=rows)
    scale = 0.7 / head_size**0.5
    got = run_native(q, kv_cache, block_row, first, end, window, sinks, scale, amx_tiles=amx_tiles)
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), "read a never-written (NaN) cache slot or left a row unwritten"
    torch.testing.assert_close(got.double(), expected(q, k, v, first, end, window, sinks, scale), **TOL[dtype])
    if not amx_tiles and AMX_TILES and head_size % 32 == 0 and window >= 64:
        # Another instruction path sums in another float32 order: some bf16 output differs from the tiles'.
        tiles = run_native(q, kv_cache, block_row, first, end, window, sinks, scale)
        assert not torch.equal(got, tiles), "amx_tiles=False ran the AMX tiles all the same"


def _vllm_amx_writer(key, value, kv_cache, slots):
    """vLLM's own ``cpu_attn_reshape_and_cache`` with ISA amx (a plain reshape: runs on any CPU)."""
    from swaa_vllm.platforms.cpu_attention_op import write_kv_cache_op

    write_kv_cache_op(key, value, kv_cache, slots, "amx")


@pytest.mark.parametrize(("block_size", "head_size"), [(32, 32), (32, 64), (128, 64), (64, 128), (32, 256)])
def test_amx_writer_matches_vllm_bit_for_bit(block_size, head_size):
    """``write_kv_cache_amx`` == vLLM's writer with ISA amx, and ``amx_key_value_blocks`` reads back what was
    written: pins vLLM's private AMX layout (fails when a vLLM upgrade changes it)."""
    gen = torch.Generator().manual_seed(block_size + head_size)
    n, hkv, nb = 2 * block_size + 5, 3, 4
    key = torch.randn(n, hkv, head_size, generator=gen).bfloat16()
    value = torch.randn(n, hkv, head_size, generator=gen).bfloat16()
    slots = torch.randperm(nb * block_size, generator=gen)[:n]
    slots[3] = -1  # a padding token
    ours, theirs = torch.zeros(2, nb, hkv, block_size, 2 * head_size, dtype=torch.bfloat16)
    write_kv_cache_amx(key, value, ours, slots)
    _vllm_amx_writer(key, value, theirs, slots)
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0
    keys, values = amx_key_value_blocks(ours)
    valid = slots >= 0
    blocks, offsets = slots[valid] // block_size, slots[valid] % block_size
    assert torch.equal(keys[blocks, :, offsets], key[valid]) and torch.equal(values[blocks, :, offsets], value[valid])


def test_amx_layout_refuses_caches_it_does_not_exist_for():
    with pytest.raises(ValueError, match="bfloat16 caches with block and head sizes that are multiples of 32"):
        amx_key_value_blocks(torch.zeros(2, 1, 16, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="got torch.float32"):
        write_kv_cache_amx(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), torch.zeros(2, 1, 32, 128), torch.zeros(1))


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_size", "block_size", "window", "sinks", "rows"),
    [
        (9, 3, 64, 128, 100, 64, 70),  # the bundled model's heads
        (16, 1, 128, 32, 33, 31, 17),  # GQA group 16; window and sinks not multiples of 16
        (4, 4, 256, 64, 7, 1, 40),
        (8, 2, 32, 32, 64, 32, 1),  # one row (a decode row without FA decode)
    ],
)
def test_native_kernel_reads_the_amx_layout(num_heads, num_kv_heads, head_size, block_size, window, sinks, rows):
    """bfloat16 caches written by vLLM's amx writer: the kernel matches the reference, and gives bit for bit what
    it gives on the same keys in the vec layout (only the packing differs)."""
    first = window + sinks + 5
    end = first + rows
    q, k, v, vec_cache, block_row = paged_case(end, num_heads, num_kv_heads, head_size, block_size, torch.bfloat16,
                                               seed=rows)
    amx_cache = torch.full_like(vec_cache, float("nan"))
    _vllm_amx_writer(k, v, amx_cache, _slots(block_row, end, block_size))
    scale = 0.7 / head_size**0.5
    got = torch.full_like(q[first:end], float("nan"))
    sink_window_native.native_sink_window_attention(q[first:end], amx_cache, block_row, got, sinks, window, first,
                                                    scale, amx_layout=True)
    assert torch.isfinite(got).all(), "read a never-written (NaN) cache slot or left a row unwritten"
    torch.testing.assert_close(got.double(), expected(q, k, v, first, end, window, sinks, scale),
                               **TOL[torch.bfloat16])
    assert torch.equal(got, run_native(q, vec_cache, block_row, first, end, window, sinks, scale))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(1, 70),
    sinks=st.integers(1, 40),
    rows=st.integers(1, 40),
    gap=st.integers(0, 30),
    num_kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 5]),
    head_size=st.sampled_from([16, 32, 48, 64]),
    block_size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_property_native_kernel_matches_reference(window, sinks, rows, gap, num_kv_heads, group, head_size,
                                                  block_size, seed):
    first = window + sinks + gap
    end = first + rows
    q, k, v, kv_cache, block_row = paged_case(end, num_kv_heads * group, num_kv_heads, head_size, block_size,
                                              torch.float32, seed)
    got = run_native(q, kv_cache, block_row, first, end, window, sinks, head_size**-0.5)
    torch.testing.assert_close(got.double(), expected(q, k, v, first, end, window, sinks, head_size**-0.5),
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_large_scores_rescale_the_running_max(dtype):
    """Scores spread over tens of nats: the lazily raised running max moves many times and stays exact."""
    first, end = 400, 480
    q, k, v, kv_cache, block_row = paged_case(end, 6, 3, 64, 16, dtype, seed=11)
    ramp = torch.linspace(0.2, 4.0, end)[:, None, None].to(dtype)  # later keys score ever higher
    k = (k.float() * ramp).to(dtype)
    write_kv_cache(k, v, kv_cache, _slots(block_row, end, 16))
    scale = 3.0 / 64**0.5
    got = run_native(q, kv_cache, block_row, first, end, 200, 16, scale)
    torch.testing.assert_close(got.double(), expected(q, k, v, first, end, 200, 16, scale), **TOL[dtype])


def _slots(block_row, seq_len, block_size):
    positions = torch.arange(seq_len)
    return block_row.long()[positions // block_size] * block_size + positions % block_size


def test_negative_control_one_key_more_is_detected():
    """The tolerance sees a one-key difference of the window (W vs W + 1) at these sizes."""
    q, k, v, kv_cache, block_row = paged_case(300, 9, 3, 64, 128, torch.bfloat16, seed=5)
    got = run_native(q, kv_cache, block_row, 200, 300, 100, 64, 0.125)
    wrong = expected(q, k, v, 200, 300, 101, 64, 0.125)
    assert (got.double() - wrong).abs().max() > 10 * TOL[torch.bfloat16]["atol"]


def test_paged_swaa_attention_sends_sink_window_rows_to_the_native_kernel(monkeypatch):
    calls = []
    real = cpu.native_sink_window_attention
    monkeypatch.setattr(cpu, "native_sink_window_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    q, k, v, kv_cache, block_row = paged_case(200, 4, 2, 64, 16, torch.float32, seed=1)
    spec = LayerMaskSpec(window=20, keep_first=8, fa_decode=True)
    seq = torch.tensor([200], dtype=torch.int32)
    got = paged_swaa_attention(q, kv_cache, block_row[None], torch.tensor([0, 200]), seq, seq, spec, 0.125,
                               sink_window_kernel="native")
    assert calls == [200 - 28]  # one run: every row from W + k on
    mask = swaa_mask(torch.arange(200), torch.arange(200), 200, 20, 8, True)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, mask, 0.125), **TOL[torch.float32])


def test_unsupported_head_layout_takes_the_torch_path(monkeypatch):
    """A head size that is not a multiple of 16 never reaches the kernel (which would refuse it)."""
    assert not sink_window_native.supports(4, 2, 24) and not sink_window_native.supports(17 * 2, 2, 64)
    monkeypatch.setattr(cpu, "native_sink_window_attention", lambda *a: pytest.fail("native kernel called"))
    q, k, v, kv_cache, block_row = paged_case(60, 4, 2, 24, 16, torch.float32, seed=2)
    spec = LayerMaskSpec(window=10, keep_first=4, fa_decode=False)
    seq = torch.tensor([60], dtype=torch.int32)
    got = paged_swaa_attention(q, kv_cache, block_row[None], torch.tensor([0, 60]), seq, seq, spec, 0.2,
                               sink_window_kernel="native")
    mask = swaa_mask(torch.arange(60), torch.arange(60), 60, 10, 4, False)
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, mask, 0.2), **TOL[torch.float32])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(first=30), "first_position >= sinks \\+ window"),
        (dict(block_row_len=1), "does not cover position"),
        (dict(query_dtype=torch.float64), "float32, bfloat16 or float16"),
        (dict(cache_dtype=torch.bfloat16), "share a dtype"),
        (dict(amx_layout=True), "AMX cache layout exists for bfloat16"),
        (dict(scale=0.0), "scale must be > 0"),
    ],
)
def test_op_refuses_bad_arguments(change, message):
    q, _, _, kv_cache, block_row = paged_case(100, 4, 2, 64, 16, torch.float32, seed=3)
    first = change.get("first", 60)
    query = q[first:].to(change.get("query_dtype", torch.float32))
    cache = kv_cache.to(change.get("cache_dtype", torch.float32))
    row = block_row[: change.get("block_row_len", block_row.shape[0])]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.swaa_cpu.sink_window_attention(query, cache, row, torch.empty_like(query), 20, 30, first,
                                                 change.get("scale", 0.1),
                                                 change.get("amx_layout", False))


def test_paged_swaa_attention_refuses_an_unknown_kernel_name():
    q, _, _, kv_cache, block_row = paged_case(20, 2, 1, 16, 16, torch.float32, seed=4)
    seq = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="sink_window_kernel must be 'torch' or 'native'"):
        paged_swaa_attention(q, kv_cache, block_row[None], torch.tensor([0, 20]), seq, seq,
                             LayerMaskSpec(window=4, keep_first=2), 0.1, sink_window_kernel="fast")


# ---------------------------------------------------------------------------
# Which kernel runs (SWAA_CPU_SINK_WINDOW_KERNEL).
# ---------------------------------------------------------------------------


def test_kernel_choice_torch_and_bad_values(monkeypatch):
    monkeypatch.setenv(sink_window_native.ENV_VAR, "torch")
    assert sink_window_native.kernel_choice() == "torch"
    monkeypatch.setenv(sink_window_native.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="SWAA_CPU_SINK_WINDOW_KERNEL must be auto, native or torch, got 'fastest'"):
        sink_window_native.kernel_choice()


def test_kernel_choice_auto_follows_the_cpu(monkeypatch):
    monkeypatch.delenv(sink_window_native.ENV_VAR, raising=False)
    monkeypatch.setattr(sink_window_native, "cpu_has_avx512", lambda: False)
    assert sink_window_native.kernel_choice() == "torch"
    monkeypatch.setattr(sink_window_native, "cpu_has_avx512", lambda: True)
    assert sink_window_native.kernel_choice() == "native"


def test_failed_build_falls_back_under_auto_and_raises_under_native(monkeypatch, caplog):
    def broken():
        raise sink_window_native.NativeKernelError("g++: not found")

    monkeypatch.setattr(sink_window_native, "load", broken)
    monkeypatch.setattr(sink_window_native, "cpu_has_avx512", lambda: True)
    monkeypatch.setenv(sink_window_native.ENV_VAR, "auto")
    with caplog.at_level(logging.WARNING, logger="vllm.swaa"):
        assert sink_window_native.kernel_choice() == "torch"
    assert "did not build: g++: not found" in caplog.text
    monkeypatch.setenv(sink_window_native.ENV_VAR, "native")
    with pytest.raises(sink_window_native.NativeKernelError, match="g\\+\\+: not found"):
        sink_window_native.kernel_choice()


def test_build_failure_message_names_the_fix(monkeypatch, tmp_path):
    """A real failed build (no compiler on PATH) raises NativeKernelError with the way out."""
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'x': [1/2] c++ -MMD -O3 -c sink_window_cpu.cpp\n"
                           "FAILED: [code=127] sink_window_cpu.o\nc++ -MMD -O3 -c sink_window_cpu.cpp\n"
                           "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fix = "install g\\+\\+ and ninja .* SWAA_CPU_SINK_WINDOW"
    with pytest.raises(sink_window_native.NativeKernelError, match=fix) as err:
        sink_window_native._load.__wrapped__("native")
    assert "c++: not found" in str(err.value) and "-MMD" not in str(err.value)  # the cause, not the command


def test_build_folder_is_per_instruction_set(monkeypatch):
    """A cache moved to a machine of another ISA never loads code built for the first one."""
    monkeypatch.setattr(sink_window_native, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "fma"}))
    avx512 = sink_window_native._build_directory("native")
    monkeypatch.setattr(sink_window_native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    avx2 = sink_window_native._build_directory("native")
    assert avx512 != avx2 and avx512.parent == avx2.parent
    assert sink_window_native._build_directory("x86-64-v3") != avx2


PORTABLE_CHECK = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from swaa_kernels import sink_window_native
    from test_sink_window_native import TOL, expected, paged_case, run_native
    sink_window_native._load("x86-64-v3")  # AVX2 without AVX-512: the portable vector type
    sink_window_native.load = lambda: None
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, kv, row = paged_case(150, 9, 3, 64, 16, dtype, seed=9)
        got = run_native(q, kv, row, 100, 150, 40, 33, 0.125)
        torch.testing.assert_close(got.double(), expected(q, k, v, 100, 150, 40, 33, 0.125), **TOL[dtype])
    print("portable ok")
    """
)


def test_portable_build_matches_reference():
    """The kernel built for AVX2 (-march=x86-64-v3, no AVX-512 code) is exact too (a fresh process: one build
    per process)."""
    code = PORTABLE_CHECK.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "portable ok" in result.stdout
