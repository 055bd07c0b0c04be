"""Backend-level tests of the CPU paged SWAA kernel against the dense reference.

Every test fills a paged cache through ``write_kv_cache`` (with random block
tables, padding slots of -1 and never-written slots poisoned with NaN), runs
``paged_swaa_attention`` over a mixed batch, with either paged attention primitive
for the causal/windowed rows (plain torch, or vLLM's C++ CPU attention op as the
backend uses it), and compares each request with

    reference_attention(q, k_all, v_all,
                        swaa_mask(q_pos, arange(seq_len), P, W, k, fa_decode), scale)

computed from the dense, unpaged K/V of that request.

Tolerances:

* float32: the kernel runs fused SDPA in float32 while the reference runs in
  float64; with |scores| of order 1 and at most a few hundred keys the float32
  rounding error is ~1e-6 (worst seen over the parametrized grid: 1.4e-6), so
  atol=rtol=1e-5 leaves headroom but still catches any wrongly visible or
  missing key (whose effect is of order 1e-2 or more).
* bfloat16: inputs are rounded to bf16 *before* building the dense reference, so
  the reference sees exactly the values the kernel sees; the remaining error is
  the kernel's bf16 arithmetic and the final rounding of the output to bf16
  (relative step 2**-8 ~ 4e-3 on values of magnitude <= ~3; worst seen over the
  grid: 7.8e-3, one bf16 step at magnitude 1-2). atol=rtol=2e-2 covers that with
  margin; a mask error on these random inputs shifts outputs by far more
  (checked by the negative-control test below).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import swaa_kernels.cpu as cpu
from swaa_kernels.cpu import LayerMaskSpec, paged_swaa_attention, plan_rows, write_kv_cache, write_kv_cache_amx
from swaa_kernels.reference import reference_attention, swaa_mask
from swaa_vllm.platforms.cpu_attention_op import VllmCpuPagedAttention, cpu_attention_isa, write_kv_cache_op

# Value of never-written cache slots per primitive (see build_batch).
POISON = {"torch": float("nan"), "vllm": 64.0, "amx": 64.0}

#: vLLM's op with ISA amx runs only where the CPU has AMX tiles (and Linux grants them to the process).
HAS_AMX = torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run these tiny kernels single-threaded, restoring the setting afterwards.

    The shapes here are a few dozen rows; with torch's default intra-op threads on
    a small shared machine, OpenMP barriers stall whenever another process holds
    a core, which made this module 10-20x slower (50-150 s instead of ~8 s)
    without changing any result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Batch construction.
# ---------------------------------------------------------------------------


@dataclass
class Req:
    prompt_len: int  # P
    seq_len: int  # tokens in the cache after this step (context + query)
    q_len: int  # this step's new tokens (queries), the last q_len positions

    @property
    def context(self) -> int:
        return self.seq_len - self.q_len


@dataclass(repr=False)
class Batch:
    reqs: list[Req]
    query: torch.Tensor  # [num_tokens, H, D]
    k_dense: list[torch.Tensor]  # per request [seq_len, Hkv, D] (already in the cache dtype)
    v_dense: list[torch.Tensor]
    kv_cache: torch.Tensor  # [num_blocks, Hkv, block_size, 2 * D]
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    prompt_lens: torch.Tensor

    def __repr__(self) -> str:  # keep hypothesis / assertion output readable
        return (f"Batch({self.reqs}, heads={self.query.shape[1]}/{self.kv_cache.shape[1]}, "
                f"block_size={self.kv_cache.shape[2]})")


def build_batch(
    reqs: list[Req],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    poison: float = float("nan"),
    writer=write_kv_cache,
) -> Batch:
    """Random Q/K/V, a random paged layout, and a cache filled through write_kv_cache.

    The earlier context of each request is written in a first call (as an
    earlier scheduler step would have), this step's tokens in a second, batched
    call whose slot mapping interleaves -1 padding rows carrying NaN K/V and ends
    with extra trailing entries (only the first ``num_tokens`` slots count).
    Every cache slot that is never written holds ``poison``: NaN by default, so
    reading a wrong slot poisons the output. vLLM's op multiplies masked keys' zero
    weights with their values, so unused slots of a request's last block must be
    finite for it, as they are in vLLM (caches start zeroed; stale slots hold old
    finite K/V): :data:`POISON` gives it a large finite value instead, which shifts
    the output far beyond tolerance if a wrong slot is attended.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    blocks_needed = [math.ceil(r.seq_len / block_size) for r in reqs]
    num_blocks = sum(blocks_needed) + 3  # a few blocks that belong to no one
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_needed + [1]) + 2
    block_table = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    owned: list[list[int]] = []
    cursor = 0
    for r, n in enumerate(blocks_needed):
        ids = perm[cursor : cursor + n]
        cursor += n
        owned.append(ids)
        block_table[r, :n] = torch.tensor(ids, dtype=torch.int32)
        # Tail of the row: ids of blocks that are not this request's (never to be read).
        block_table[r, n:] = perm[-1]

    kv_cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size), poison, dtype=dtype)

    def slot(r: int, p: int) -> int:
        return owned[r][p // block_size] * block_size + p % block_size

    k_dense, v_dense = [], []
    for req in reqs:
        # Round to the cache dtype up front: the reference then sees exactly the stored values.
        k_dense.append(torch.randn(req.seq_len, num_kv_heads, head_size, generator=gen).to(dtype))
        v_dense.append(torch.randn(req.seq_len, num_kv_heads, head_size, generator=gen).to(dtype))

    def write(rows: list[tuple[int, int] | None], trailing: int) -> None:
        """rows: (request, position) or None for a padding row (slot -1, NaN K/V)."""
        keys, values, slots = [], [], []
        for row in rows:
            if row is None:
                keys.append(torch.full((num_kv_heads, head_size), float("nan"), dtype=dtype))
                values.append(torch.full((num_kv_heads, head_size), float("nan"), dtype=dtype))
                slots.append(-1)
            else:
                r, p = row
                keys.append(k_dense[r][p])
                values.append(v_dense[r][p])
                slots.append(slot(r, p))
        if not keys:
            return
        # Trailing slot entries beyond num_tokens (vLLM pads slot_mapping): must be ignored.
        slots += [slot(0, 0) if reqs[0].seq_len else -1] * trailing
        writer(torch.stack(keys), torch.stack(values), kv_cache, torch.tensor(slots, dtype=torch.int64))

    def with_padding(rows):
        out = []
        for row in rows:
            if rng.random() < 0.15:
                out.append(None)
            out.append(row)
        out.append(None)
        return out

    earlier = [(r, p) for r, req in enumerate(reqs) for p in range(req.context)]
    write(with_padding(earlier), trailing=2)
    now = [(r, p) for r, req in enumerate(reqs) for p in range(req.context, req.seq_len)]
    write(with_padding(now), trailing=3)

    query = torch.randn(sum(r.q_len for r in reqs), num_heads, head_size, generator=gen).to(dtype)
    qsl = [0]
    for req in reqs:
        qsl.append(qsl[-1] + req.q_len)
    return Batch(
        reqs=reqs,
        query=query,
        k_dense=k_dense,
        v_dense=v_dense,
        kv_cache=kv_cache,
        block_table=block_table,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([r.seq_len for r in reqs], dtype=torch.int32),
        prompt_lens=torch.tensor([r.prompt_len for r in reqs], dtype=torch.int32),
    )


def primitive(name: str, b: Batch, query_tile: int):
    """The paged attention primitive for causal/windowed rows: plain torch or vLLM's op (ISA vec/vec16 or amx)."""
    if name == "torch":
        return lambda q, kv, batch, scale, out: cpu.torch_paged_attention(q, kv, batch, scale, out, query_tile)
    if name == "amx":
        return VllmCpuPagedAttention("amx")
    return VllmCpuPagedAttention(cpu_attention_isa(b.kv_cache.shape[2], b.kv_cache.shape[3] // 2))


def run_kernel(b: Batch, spec: LayerMaskSpec, scale: float, query_tile: int, out=None, prim="torch",
               sink_kernel="torch") -> torch.Tensor:
    return paged_swaa_attention(
        b.query,
        b.kv_cache,
        b.block_table,
        b.query_start_loc,
        b.seq_lens,
        b.prompt_lens,
        spec,
        scale,
        out=out,
        paged_attention=primitive(prim, b, query_tile),
        query_tile=query_tile,
        sink_window_kernel=sink_kernel,
        cache_layout="amx" if prim == "amx" else "vec",
    )


def expected(b: Batch, spec: LayerMaskSpec, scale: float) -> list[torch.Tensor]:
    """Per request: dense reference over the unpaged K/V (float64)."""
    outs = []
    starts = b.query_start_loc.tolist()
    for r, req in enumerate(b.reqs):
        q = b.query[starts[r] : starts[r + 1]]
        if req.q_len == 0:
            outs.append(q.double())
            continue
        qpos = torch.arange(req.context, req.seq_len)
        mask = swaa_mask(qpos, torch.arange(req.seq_len), req.prompt_len, spec.window, spec.keep_first, spec.fa_decode)
        outs.append(reference_attention(q, b.k_dense[r], b.v_dense[r], mask, scale))
    return outs


def check(b: Batch, spec: LayerMaskSpec, scale: float, query_tile: int, dtype: torch.dtype, prim="torch",
          sink_kernel="torch") -> None:
    got = run_kernel(b, spec, scale, query_tile, prim=prim, sink_kernel=sink_kernel)
    assert got.shape == b.query.shape
    assert got.dtype == b.query.dtype
    starts = b.query_start_loc.tolist()
    for r, want in enumerate(expected(b, spec, scale)):
        g = got[starts[r] : starts[r + 1]].double()
        assert torch.isfinite(g).all(), f"request {r} {b.reqs[r]} read a never-written (NaN) cache slot"
        torch.testing.assert_close(
            g, want, **TOL[dtype],
            msg=lambda m, r=r: f"request {r} {b.reqs[r]} spec={spec} tile={query_tile} {prim}/{sink_kernel}: {m}"
        )


# A mixed batch covering every scheduling shape of SWAA.md's "role is fixed by position" rule.
MIXED = [
    Req(prompt_len=23, seq_len=23, q_len=23),  # pure prefill of a whole prompt
    Req(prompt_len=30, seq_len=20, q_len=7),  # chunked prefill, middle chunk (context 13 in cache)
    Req(prompt_len=19, seq_len=19, q_len=5),  # chunked prefill, last chunk
    Req(prompt_len=12, seq_len=17, q_len=1),  # single-token decode
    Req(prompt_len=9, seq_len=10, q_len=1),  # first generated token in the cache (position P)
    Req(prompt_len=10, seq_len=18, q_len=4),  # multi-token generated rows (speculative decoding)
    Req(prompt_len=11, seq_len=16, q_len=9),  # straddles the prompt end (recompute after preemption)
    Req(prompt_len=15, seq_len=6, q_len=1),  # 1-token prompt chunk
    Req(prompt_len=20, seq_len=20, q_len=2),  # prefix-cache hit leaving a short tail
    Req(prompt_len=4, seq_len=26, q_len=26),  # full recompute: prompt + many generated tokens
]

SPECS = [
    LayerMaskSpec(window=8, keep_first=4, fa_decode=True),
    LayerMaskSpec(window=5, keep_first=0, fa_decode=False),
    LayerMaskSpec(window=1, keep_first=0, fa_decode=True),  # W=1, k=0
    LayerMaskSpec(window=3, keep_first=10, fa_decode=False),  # k >= W, k >= some prompts
    LayerMaskSpec(window=2, keep_first=2, fa_decode=True),
    LayerMaskSpec(window=100, keep_first=1, fa_decode=False),  # W >= every prompt
    LayerMaskSpec(window=None),  # full attention
]


def _mixed_batch_case(prim, block_size, ratio, dtype, query_tile, sink_kernel):
    num_kv_heads = 1 if ratio == 8 else 2
    head_size = 128 if (block_size + ratio) % 2 else 64
    reqs = list(MIXED)
    random.Random(block_size * 100 + ratio).shuffle(reqs)
    b = build_batch(
        reqs,
        num_heads=num_kv_heads * ratio,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        seed=block_size * 1000 + ratio * 10 + query_tile,
        poison=POISON[prim],
        writer=write_kv_cache_amx if prim == "amx" else write_kv_cache,
    )
    scale = 0.8 / math.sqrt(head_size)  # not the default scale: the kernel must use the one given
    for spec in SPECS:
        check(b, spec, scale, query_tile, dtype, prim, sink_kernel)


@pytest.mark.parametrize("query_tile", [1, 3, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ratio", [1, 2, 3, 8])
@pytest.mark.parametrize(
    ("prim", "block_size"), [("torch", 1), ("torch", 4), ("torch", 16), ("vllm", 16), ("vllm", 32)]
)
def test_mixed_batch_matches_reference(prim, block_size, ratio, dtype, query_tile):
    _mixed_batch_case(prim, block_size, ratio, dtype, query_tile, "torch")


@pytest.mark.parametrize("ratio", [1, 2, 3, 8])
@pytest.mark.parametrize(
    ("prim", "block_size", "dtype"),
    [(prim, block_size, dtype) for prim, block_size in (("torch", 1), ("torch", 4), ("vllm", 16), ("vllm", 32))
     for dtype in (torch.float32, torch.bfloat16)] + [("torch", 4, torch.float16)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_mixed_batch_native_sink_window_matches_reference(prim, block_size, ratio, dtype):
    """The same mixed batch with sink-window rows on the C++ kernel (swaa_kernels.sink_window_native)."""
    _mixed_batch_case(prim, block_size, ratio, dtype, 3, "native")


@pytest.mark.skipif(not HAS_AMX, reason="vLLM's amx attention needs a CPU with AMX tiles (none here)")
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("ratio", [1, 3])
def test_mixed_batch_amx_cache_matches_reference(block_size, ratio):
    """bfloat16 on AMX CPUs: the cache in vLLM's AMX layout (written by the torch writer ``write_kv_cache_amx``),
    causal/windowed rows on vLLM's amx op, sink-window rows on the native kernel reading that layout."""
    _mixed_batch_case("amx", block_size, ratio, torch.bfloat16, 3, "native")


def test_amx_cache_refuses_the_torch_readers():
    """An amx cache meeting a reader of the vec layout is an error, never a silent wrong result."""
    b = build_batch(MIXED, num_heads=4, num_kv_heads=2, head_size=64, block_size=32, dtype=torch.bfloat16, seed=1,
                    poison=64.0, writer=write_kv_cache_amx)
    spec = LayerMaskSpec(window=8, keep_first=4, fa_decode=True)
    args = (b.query, b.kv_cache, b.block_table, b.query_start_loc, b.seq_lens, b.prompt_lens, spec, 0.125)
    with pytest.raises(ValueError, match="torch_paged_attention reads the vec cache layout only"):
        paged_swaa_attention(*args, cache_layout="amx")
    with pytest.raises(ValueError, match="sink-window rows of an amx cache need the native kernel"):
        paged_swaa_attention(*args, paged_attention=VllmCpuPagedAttention("amx"), cache_layout="amx")
    with pytest.raises(ValueError, match="cache_layout must be one of"):
        paged_swaa_attention(*args, cache_layout="avx")


@pytest.mark.parametrize(("prim", "sink_kernel"), [("torch", "torch"), ("vllm", "torch"), ("vllm", "native")])
@pytest.mark.parametrize("head_size", [64, 80, 128, 256])
def test_head_sizes(head_size, prim, sink_kernel):
    b = build_batch(
        list(MIXED), num_heads=6, num_kv_heads=2, head_size=head_size, block_size=16, dtype=torch.float32,
        seed=head_size,
        poison=POISON[prim],
    )
    for spec in SPECS:
        check(b, spec, head_size**-0.5, 5, torch.float32, prim, sink_kernel)


def test_negative_control_wrong_mask_is_detected():
    """The tolerances are tight enough to see a one-key mask difference (W vs W+1)."""
    b = build_batch(list(MIXED), num_heads=4, num_kv_heads=2, head_size=64, block_size=4, dtype=torch.bfloat16, seed=3)
    scale = 64**-0.5
    got = run_kernel(b, LayerMaskSpec(window=6, keep_first=2, fa_decode=False), scale, 3)
    wrong = expected(b, LayerMaskSpec(window=7, keep_first=2, fa_decode=False), scale)
    starts = b.query_start_loc.tolist()
    worst = max(
        (got[starts[r] : starts[r + 1]].double() - w).abs().max().item() for r, w in enumerate(wrong) if w.numel()
    )
    assert worst > 10 * TOL[torch.bfloat16]["atol"]


def test_full_attention_spec_equals_plain_causal():
    """LayerMaskSpec(window=None) is plain causal attention whatever k / fa_decode say.

    The expectation uses a hand-built causal mask (j <= i), not swaa_mask.
    """
    b = build_batch(list(MIXED), num_heads=6, num_kv_heads=2, head_size=64, block_size=4, dtype=torch.float32, seed=11)
    scale = 0.125
    starts = b.query_start_loc.tolist()
    for spec in (LayerMaskSpec(window=None), LayerMaskSpec(window=None, keep_first=3, fa_decode=True)):
        for tile in (1, 4, 256):
            got = run_kernel(b, spec, scale, tile)
            for r, req in enumerate(b.reqs):
                i = torch.arange(req.context, req.seq_len)[:, None]
                j = torch.arange(req.seq_len)[None, :]
                causal = j <= i
                q = b.query[starts[r] : starts[r + 1]]
                want = reference_attention(q, b.k_dense[r], b.v_dense[r], causal, scale)
                torch.testing.assert_close(got[starts[r] : starts[r + 1]].double(), want, **TOL[torch.float32])


def test_full_attention_decode_equals_softmax_over_all_keys():
    """Independent of any mask helper: a decode row of a full layer = softmax over all cached keys."""
    b = build_batch(
        [Req(prompt_len=5, seq_len=13, q_len=1)],
        num_heads=2,
        num_kv_heads=1,
        head_size=64,
        block_size=4,
        dtype=torch.float32,
        seed=5,
    )
    scale = 0.1
    got = run_kernel(b, LayerMaskSpec(window=None), scale, 256)
    q = b.query[0].double()  # [H, D]
    k = b.k_dense[0][:, 0].double()  # [S, D]
    v = b.v_dense[0][:, 0].double()
    w = torch.softmax(q @ k.T * scale, dim=-1)
    torch.testing.assert_close(got[0].double(), w @ v, **TOL[torch.float32])


def test_out_buffer_is_used_and_trimmed():
    b = build_batch(list(MIXED), num_heads=4, num_kv_heads=2, head_size=64, block_size=4, dtype=torch.float32, seed=9)
    n = b.query.shape[0]
    out = torch.full((n + 5, 4, 64), 7.0)
    spec = LayerMaskSpec(window=4, keep_first=1, fa_decode=True)
    got = run_kernel(b, spec, 0.125, 3, out=out)
    assert got.shape == (n, 4, 64)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out[n:], torch.full((5, 4, 64), 7.0))  # padding rows untouched
    starts = b.query_start_loc.tolist()
    for r, want in enumerate(expected(b, spec, 0.125)):
        torch.testing.assert_close(out[starts[r] : starts[r + 1]].double(), want, **TOL[torch.float32])


def test_query_longer_than_sequence_raises():
    b = build_batch([Req(prompt_len=4, seq_len=4, q_len=4)], num_heads=1, num_kv_heads=1, head_size=8,
                    block_size=4, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        paged_swaa_attention(
            b.query, b.kv_cache, b.block_table, b.query_start_loc,
            torch.tensor([3], dtype=torch.int32), b.prompt_lens, LayerMaskSpec(window=2), 1.0,
        )


# ---------------------------------------------------------------------------
# write_kv_cache on its own.
# ---------------------------------------------------------------------------


def test_write_kv_cache_skips_padding_and_places_slots():
    """Hand-built expectation of the layout: keys transposed per (block, head), values not."""
    num_blocks, block_size, hkv, d = 3, 2, 1, 2
    kv = torch.zeros(num_blocks, hkv, block_size, 2 * d)
    key = torch.tensor([[[1.0, 10.0]], [[9.0, 9.0]], [[2.0, 20.0]], [[3.0, 30.0]]])
    value = -key
    # Slot 5 = block 2 offset 1, slot 0 = block 0 offset 0, slot 2 = block 1 offset 0.
    slots = torch.tensor([5, -1, 0, 2, 4, 4])  # trailing entries past num_tokens are ignored
    write_kv_cache(key, value, kv, slots)
    # Memory of one (block, head): keys as [d, block_size], then values as [block_size, d].
    want = torch.zeros(num_blocks, hkv, 2 * block_size * d)
    want[2, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 10.0])  # key (1, 10) at offset 1: columns
    want[2, 0, 4:] = torch.tensor([0.0, 0.0, -1.0, -10.0])
    want[0, 0, :4] = torch.tensor([2.0, 0.0, 20.0, 0.0])
    want[0, 0, 4:] = torch.tensor([-2.0, -20.0, 0.0, 0.0])
    want[1, 0, :4] = torch.tensor([3.0, 0.0, 30.0, 0.0])
    want[1, 0, 4:] = torch.tensor([-3.0, -30.0, 0.0, 0.0])
    assert torch.equal(kv.reshape(num_blocks, hkv, -1), want)


def test_write_kv_cache_casts_to_cache_dtype():
    kv = torch.zeros(2, 1, 2, 8, dtype=torch.bfloat16)
    key = torch.full((1, 1, 4), 1.5, dtype=torch.float32)
    write_kv_cache(key, key * 2, kv, torch.tensor([3]))
    assert kv.dtype == torch.bfloat16
    assert torch.equal(cpu.key_blocks(kv)[1, 0, :, 1], torch.full((4,), 1.5, dtype=torch.bfloat16))
    assert torch.equal(cpu.value_blocks(kv)[1, 0, 1], torch.full((4,), 3.0, dtype=torch.bfloat16))
    assert kv[0].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize(("block_size", "head_size"), [(16, 64), (32, 64), (128, 64), (16, 80), (32, 128), (64, 256)])
def test_vllm_writer_uses_the_layout_we_read(block_size, head_size, dtype):
    """vLLM's ``cpu_attn_reshape_and_cache`` (the backend's writer) == ``write_kv_cache``, bit for bit.

    Pins vLLM's private CPU cache layout: fails when a vLLM upgrade changes it.
    """
    gen = torch.Generator().manual_seed(block_size + head_size)
    n, hkv, nb = 3 * block_size + 5, 3, 6
    key = torch.randn(n, hkv, head_size, generator=gen).to(dtype)
    value = torch.randn(n, hkv, head_size, generator=gen).to(dtype)
    slots = torch.randperm(nb * block_size, generator=gen)[: n + 2]
    slots[4] = -1  # a padding token
    ours = torch.zeros(nb, hkv, block_size, 2 * head_size, dtype=dtype)
    theirs = torch.zeros_like(ours)
    write_kv_cache(key, value, ours, slots)
    write_kv_cache_op(key, value, theirs, slots, cpu_attention_isa(block_size, head_size))
    assert torch.equal(ours, theirs)
    assert ours.abs().sum() > 0


def test_paged_attention_writer_keeps_views_per_cache_tensor():
    """``VllmCpuPagedAttention.write`` (the backend's per-layer writer) keeps its views of the last cache, and a
    second cache passed through the same instance is written, not the first one again."""
    gen = torch.Generator().manual_seed(3)
    block_size, head_size, hkv, nb, n = 32, 64, 2, 4, 40
    paged = VllmCpuPagedAttention(cpu_attention_isa(block_size, head_size))
    for _ in range(2):
        key = torch.randn(n, hkv, head_size, generator=gen)
        value = torch.randn(n, hkv, head_size, generator=gen)
        slots = torch.randperm(nb * block_size, generator=gen)[:n]
        expected, got = torch.zeros(2, nb, hkv, block_size, 2 * head_size)
        write_kv_cache(key, value, expected, slots)
        paged.write(key, value, got, slots)
        paged.write(key, value, got, slots)  # second write through the kept views: same result
        assert torch.equal(got, expected) and got.abs().sum() > 0


@pytest.mark.parametrize("has_amx", [False, True], ids=["no-amx", "amx"])
def test_layer_cache_isa_takes_vllms_choice_where_the_layer_can_read_it(monkeypatch, has_amx):
    """Full layers (and sink-window layers on the native kernel) use the ISA vLLM's CPU_ATTN picks, so they cost
    what they cost there; ``amx`` only for bfloat16 with block size and head size multiples of 32 (the layout
    ``write_kv_cache_amx`` knows). Fails when vLLM's own ``_get_attn_isa`` changes its rule or signature."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    import swaa_vllm.platforms.cpu_attention_op as op_module

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for block_size, head_size in ((128, 64), (16, 64), (32, 80), (64, 128), (48, 64)):
            theirs = _get_attn_isa(dtype, block_size, head_size)
            amx = has_amx and dtype == torch.bfloat16 and block_size % 32 == 0 and head_size % 32 == 0
            assert theirs == ("amx" if amx else cpu_attention_isa(block_size, head_size))
            assert op_module.vllm_attention_isa(dtype, block_size, head_size) == theirs
            assert op_module.layer_cache_isa(dtype, block_size, head_size, amx_readable=True) == theirs
            assert op_module.layer_cache_isa(dtype, block_size, head_size, amx_readable=False) == cpu_attention_isa(
                block_size, head_size)


def test_layer_cache_isa_falls_back_when_linux_refuses_amx_tiles(monkeypatch):
    """``torch.cpu._init_amx`` (the arch_prctl permission request) failing means vLLM's amx op would die with
    SIGILL: the layer keeps vec."""
    import swaa_vllm.platforms.cpu_attention_op as op_module

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False)
    assert op_module.layer_cache_isa(torch.bfloat16, 128, 64, amx_readable=True) == "vec"


def test_cpu_attention_isa_refuses_sizes_the_op_cannot_serve():
    assert cpu_attention_isa(128, 64) == "vec"
    assert cpu_attention_isa(16, 64) == "vec16"
    assert cpu_attention_isa(32, 80) == "vec16"
    with pytest.raises(ValueError, match="block_size=8"):
        cpu_attention_isa(8, 64)
    with pytest.raises(ValueError, match="head_size=16"):
        cpu_attention_isa(16, 16)


# ---------------------------------------------------------------------------
# Sliding tiles only read the keys they can see.
# ---------------------------------------------------------------------------


class AttendRecorder:
    """Wraps ``swaa_kernels.cpu._attend``, the one place a torch tile's keys are attended.

    Records, per call, the tile's query rows and the number of keys it was given.
    """

    def __init__(self, real):
        self.real = real
        self.key_counts: list[int] = []
        self.query_counts: list[int] = []

    def __call__(self, q, k, v, mask, scale, **kwargs):
        self.query_counts.append(q.shape[0])
        self.key_counts.append(k.shape[1])  # k: [Hkv, keys, D]
        return self.real(q, k, v, mask, scale, **kwargs)


def _record(monkeypatch) -> AttendRecorder:
    rec = AttendRecorder(cpu._attend)
    monkeypatch.setattr(cpu, "_attend", rec)
    return rec


@pytest.mark.parametrize("prim", ["torch", "vllm"])
def test_sliding_tiles_read_only_visible_keys(monkeypatch, prim):
    W, k, tile, P = 8, 4, 16, 200
    rec = _record(monkeypatch)
    b = build_batch([Req(prompt_len=P, seq_len=P, q_len=P)], num_heads=2, num_kv_heads=1, head_size=64,
                    block_size=16, dtype=torch.float32, seed=21, poison=POISON[prim])
    spec = LayerMaskSpec(window=W, keep_first=k, fa_decode=True)
    check(b, spec, 0.125, tile, torch.float32, prim)  # still exact
    # Rows below W + k see [0, i] (causal primitive); the other P - W - k rows are
    # sink-window tiles, each given its k sinks and W - 1 + tile window keys.
    sink_rows = P - (W + k)
    sink_calls = [(q, n) for q, n in zip(rec.query_counts, rec.key_counts, strict=True) if n == k + W - 1 + q]
    assert sum(q for q, _ in sink_calls) == sink_rows
    assert len(sink_calls) == math.ceil(sink_rows / tile)
    assert max(rec.key_counts) <= k + W - 1 + tile, rec.key_counts
    # O(n * (W + k + tile)) instead of O(n^2 / 2).
    assert sum(rec.key_counts) <= (math.ceil(P / tile) + 1) * (k + W - 1 + tile)


def test_sliding_tiles_generated_rows_without_fa_decode_stay_bounded(monkeypatch):
    W, k, tile = 8, 4, 16
    rec = _record(monkeypatch)
    # A long recompute: 50 prompt rows then 100 generated rows in one chunk.
    b = build_batch([Req(prompt_len=50, seq_len=150, q_len=150)], num_heads=2, num_kv_heads=2, head_size=64,
                    block_size=16, dtype=torch.float32, seed=22, poison=POISON["vllm"])
    check(b, LayerMaskSpec(window=W, keep_first=k, fa_decode=False), 0.125, tile, torch.float32, "vllm")
    assert sum(rec.query_counts) == 150 - (W + k)  # every row from W + k on is a sink-window row
    assert max(rec.key_counts) <= k + W - 1 + tile, rec.key_counts


def test_recorder_sees_full_reads_for_full_layers_and_fa_decode(monkeypatch):
    """Control for the two tests above: the recorder does see long key ranges when they are needed."""
    rec = _record(monkeypatch)
    b = build_batch([Req(prompt_len=100, seq_len=100, q_len=100), Req(prompt_len=60, seq_len=90, q_len=1)],
                    num_heads=2, num_kv_heads=1, head_size=64, block_size=16, dtype=torch.float32, seed=23)
    check(b, LayerMaskSpec(window=None), 0.125, 16, torch.float32)
    assert max(rec.key_counts) == 100
    rec.key_counts.clear()
    check(b, LayerMaskSpec(window=8, keep_first=4, fa_decode=True), 0.125, 16, torch.float32)
    assert 90 in rec.key_counts  # the FA-decode row reads the whole context


# ---------------------------------------------------------------------------
# Row classes against the reference mask.
# ---------------------------------------------------------------------------


def _rows_of(batch) -> set[int]:
    if batch is None:
        return set()
    if batch.rows is None:
        return set(range(batch.num_rows))
    return set(batch.rows.tolist())


@pytest.mark.parametrize("spec", SPECS + [LayerMaskSpec(window=4, keep_first=3, fa_decode=False)], ids=str)
def test_row_classes_follow_the_reference_mask(spec):
    """Each row's class is the shape of its visible key set under ``swaa_mask``.

    causal: exactly [0, i]; windowed: exactly (i - W, i] with k = 0; sink-window:
    [0, k) and (i - W, i], disjoint. Every row is in exactly one class, and each
    primitive segment ends at its last row's position + 1.
    """
    b = build_batch(list(MIXED), num_heads=2, num_kv_heads=1, head_size=16, block_size=4, dtype=torch.float32, seed=1)
    plan = plan_rows(b.query_start_loc, b.seq_lens, b.prompt_lens, b.block_table, spec)
    causal, windowed = _rows_of(plan.causal), _rows_of(plan.windowed)
    sink_window = {row for _, first, end, _ in plan.sink_window for row in range(first, end)}
    assert not (causal & windowed) and not (causal & sink_window) and not (windowed & sink_window)
    starts = b.query_start_loc.tolist()
    for r, req in enumerate(b.reqs):
        for row in range(starts[r], starts[r + 1]):
            i = req.context + row - starts[r]
            visible = set(torch.nonzero(swaa_mask(torch.tensor([i]), torch.arange(i + 1), req.prompt_len,
                                                   spec.window, spec.keep_first, spec.fa_decode)[0]).flatten().tolist())
            if visible == set(range(i + 1)) and row in causal:
                continue
            if row in windowed:
                assert spec.keep_first == 0 and visible == set(range(max(0, i - spec.window + 1), i + 1)), (r, i)
            else:
                assert row in sink_window, (r, i, spec)
                k, w = spec.keep_first, spec.window
                assert visible == set(range(k)) | set(range(i - w + 1, i + 1)) and i - w + 1 > k, (r, i)
    for batch in (plan.causal, plan.windowed):
        if batch is not None and batch.rows is not None:
            ends = batch.query_start_loc[1:].tolist()
            for s, end in enumerate(ends):
                row = batch.rows[end - 1].item()
                r = next(r for r in range(len(b.reqs)) if starts[r] <= row < starts[r + 1])
                assert batch.seq_lens[s].item() == b.reqs[r].context + row - starts[r] + 1


def test_decode_batch_and_full_layers_go_to_the_primitive_whole():
    """A decode step under FA decode, and any step of a full layer: one primitive call, no gather."""
    reqs = [Req(prompt_len=30, seq_len=40, q_len=1), Req(prompt_len=5, seq_len=90, q_len=1)]
    b = build_batch(reqs, num_heads=2, num_kv_heads=1, head_size=16, block_size=4, dtype=torch.float32, seed=2)
    for spec in (LayerMaskSpec(window=8, keep_first=4, fa_decode=True), LayerMaskSpec(window=None)):
        plan = plan_rows(b.query_start_loc, b.seq_lens, b.prompt_lens, b.block_table, spec)
        assert plan.causal is not None and plan.causal.rows is None
        assert plan.windowed is None and plan.sink_window == []


# ---------------------------------------------------------------------------
# Property test.
# ---------------------------------------------------------------------------


@st.composite
def batches(draw):
    num_reqs = draw(st.integers(1, 4))
    reqs = []
    for _ in range(num_reqs):
        prompt_len = draw(st.integers(1, 40))
        seq_len = draw(st.integers(1, 48))
        kind = draw(st.sampled_from(["any", "prefill", "decode", "zero"]))
        if kind == "prefill":
            q_len = seq_len
        elif kind == "decode":
            q_len = 1
        elif kind == "zero":
            q_len = 0
        else:
            q_len = draw(st.integers(1, seq_len))
        reqs.append(Req(prompt_len=prompt_len, seq_len=seq_len, q_len=q_len))
    window = draw(st.one_of(st.none(), st.integers(1, 12)))
    keep_first = draw(st.integers(0, 12))
    fa_decode = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    query_tile = draw(st.sampled_from([1, 2, 3, 5, 16, 256]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 3]))
    head_size = draw(st.sampled_from([16, 64]))
    seed = draw(st.integers(0, 2**16))
    return dict(
        reqs=reqs,
        spec=LayerMaskSpec(window=window, keep_first=keep_first, fa_decode=fa_decode),
        block_size=block_size,
        query_tile=query_tile,
        num_kv_heads=num_kv_heads,
        ratio=ratio,
        head_size=head_size,
        seed=seed,
    )


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=batches(), prim=st.sampled_from(["torch", "vllm"]), sink_kernel=st.sampled_from(["torch", "native"]))
def test_property_paged_kernel_matches_reference(case, prim, sink_kernel):
    if prim == "vllm":  # vLLM's op serves block sizes that are multiples of 16, head sizes from 32
        case["block_size"], case["head_size"] = 16, 64
    b = build_batch(
        case["reqs"],
        num_heads=case["num_kv_heads"] * case["ratio"],
        num_kv_heads=case["num_kv_heads"],
        head_size=case["head_size"],
        block_size=case["block_size"],
        dtype=torch.float32,
        seed=case["seed"],
        poison=POISON[prim],
    )
    check(b, case["spec"], case["head_size"] ** -0.5, case["query_tile"], torch.float32, prim, sink_kernel)


def test_layout_check_refuses_a_cache_layout_we_do_not_read(monkeypatch):
    """The start-up check raises when vLLM's writer and ours disagree (e.g. a new vLLM layout)."""
    import swaa_vllm.platforms.cpu_attention_op as op_module

    op_module.check_cache_layout.cache_clear()
    monkeypatch.setattr(op_module, "write_kv_cache_op", lambda key, value, kv, slots, isa: kv.fill_(1.0))
    try:
        with pytest.raises(RuntimeError, match="layout swaa_kernels.cpu does not read"):
            op_module.check_cache_layout("vec", torch.float32, 64, 32)
    finally:
        op_module.check_cache_layout.cache_clear()
    monkeypatch.undo()
    op_module.check_cache_layout("vec", torch.float32, 64, 32)  # the real writer passes
