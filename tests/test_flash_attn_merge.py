"""The flash-attn path's row split, sink attention and LSE merge on CPU (``kernels/flash_attn_path.py``).

flash-attn itself needs CUDA, so the paged varlen call is replaced by a stand-in
with the same contract, :func:`reference_window_fn`: dense float64 attention per
chunk with flash-attn's bottom-right causal alignment and ``window_size=(left, 0)``,
returning ``(out, lse [H, N])``. Everything else (which rows are sliding or full,
the sink keys outside each row's window, the LSE merge) is the code that runs on
the GPU, and the result must equal the dense SWAA reference. The GPU check
(``benchmarks/gpu_check.sh``) runs the same path with the real flash-attn.

Tolerance: float32 stand-in outputs, float32 sink attention and merge against a
float64 reference over <= 80 keys: atol=rtol=1e-5 (worst seen ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.flash_attn_path import (
    flash_attn_swaa_attention,
    lse_merge,
    sink_attention,
)
from tests.paged_cases import (
    EDGE_BATCH,
    EDGE_SPECS,
    LONG_BATCH,
    SLIDING_DECODE_SPECS,
    make_batch,
    poison_freed_blocks,
    reference_output,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}

BATCH, SPECS = EDGE_BATCH, EDGE_SPECS


def reference_window_fn(query, key_cache, value_cache, block_table, cu_seqlens_q, seqused_k,
                        max_seqlen_q, max_seqlen_k, scale, window_left, calls=None):
    """Stand-in for flash-attn's paged varlen call: float64 dense attention, ``(out, lse [H, N])``."""
    if calls is not None:
        calls.append((window_left, cu_seqlens_q.tolist(), seqused_k.tolist()))
    num_tokens, num_heads, _ = query.shape
    block_size = key_cache.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    lse = torch.full((num_heads, num_tokens), float("-inf"), dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for b, used in enumerate(seqused_k.tolist()):
        n = cu[b + 1] - cu[b]
        assert n <= max_seqlen_q and used <= max_seqlen_k
        j = torch.arange(used)
        blocks, offsets = block_table[b, j // block_size].long(), j % block_size
        group = num_heads // key_cache.shape[2]
        k = key_cache[blocks, offsets].double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, K, D]
        v = value_cache[blocks, offsets].double().repeat_interleave(group, dim=1).transpose(0, 1)
        pos = torch.arange(used - n, used)[:, None]  # bottom-right aligned
        visible = j[None, :] <= pos
        if window_left >= 0:
            visible &= j[None, :] >= pos - window_left
        q = query[cu[b] : cu[b + 1]].double().transpose(0, 1)  # [H, n, D]
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [H, n]
        out[cu[b] : cu[b + 1]] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)
        lse[:, cu[b] : cu[b + 1]] = row_lse
    return out.to(query.dtype), lse.float()


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("heads", [(4, 2, 32), (6, 2, 16)], ids=["gqa2", "gqa3"])
def test_matches_reference(name, heads):
    num_heads, num_kv_heads, head_size = heads
    batch = make_batch(BATCH, num_heads, num_kv_heads, head_size, 8, seed=11)
    spec, scale = SPECS[name], head_size**-0.5
    out = flash_attn_swaa_attention(*batch.kernel_args(), spec, scale, window_fn=reference_window_fn)
    torch.testing.assert_close(out.double(), reference_output(batch, spec, scale), **TOL)


@pytest.mark.parametrize("name", list(SLIDING_DECODE_SPECS))
def test_freed_blocks_never_reach_the_window_call(name):
    """Freed blocks hold NaN; the stand-in, like flash-attn, loads every key up to seqused_k of its table.

    flash-attn loads whole key tiles and masks inside them, so a tile can start before a
    row's window; the path points the block-table entries before the window at vLLM's
    null block (block 0), whose keys are finite and masked.
    """
    spec = SLIDING_DECODE_SPECS[name]
    batch = make_batch(LONG_BATCH, 4, 2, 32, 8, seed=17, null_block=True)
    assert poison_freed_blocks(batch, spec) > 0
    out = flash_attn_swaa_attention(*batch.kernel_args(), spec, 32**-0.5, window_fn=reference_window_fn)
    torch.testing.assert_close(out.double(), reference_output(batch, spec, 32**-0.5), **TOL)


def test_calls_window_and_full():
    """Sliding rows go through one window_left = W-1 call, FA-decode rows through one full call."""
    batch = make_batch(BATCH, 4, 2, 32, 8, seed=12)
    calls = []

    def window_fn(*args):
        return reference_window_fn(*args, calls=calls)

    spec = LayerMaskSpec(5, 3, True)
    out = torch.full((batch.query.shape[0] + 2, 4, 32), float("nan"))
    result = flash_attn_swaa_attention(*batch.kernel_args(), spec, 32**-0.5, out=out, window_fn=window_fn)
    assert result.data_ptr() == out.data_ptr()
    assert sorted(c[0] for c in calls) == [-1, 4]
    full = next(c for c in calls if c[0] == -1)
    # generated rows only: (40,40,30) rows 30-39, (50,3,20) all 3, (33,1,10) the 1, (60,25,50) rows 50-59
    assert full[2] == [40, 50, 33, 60]
    assert full[1] == [0, 10, 13, 14, 24]
    calls.clear()
    flash_attn_swaa_attention(*batch.kernel_args(), LayerMaskSpec(None), 1.0, window_fn=window_fn)
    assert [c[0] for c in calls] == [-1]


def test_window_fn_ignoring_window_fails():
    """Negative control: a windowed call that attends everything double-counts the sinks."""
    batch = make_batch(BATCH[:2], 4, 2, 32, 8, seed=13)
    spec = LayerMaskSpec(5, 3, False)

    def no_window(*args):
        return reference_window_fn(*args[:-1], -1)

    out = flash_attn_swaa_attention(*batch.kernel_args(), spec, 32**-0.5, window_fn=no_window)
    assert not torch.allclose(out.double(), reference_output(batch, spec, 32**-0.5), atol=1e-3)


def _partial(q, k, v, mask, scale):
    """float64 attention of q [N, H, D] over k/v [K, H, D] restricted by mask [N, K], with lse [N, H]."""
    scores = torch.einsum("nhd,khd->hnk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    return torch.einsum("hnk,khd->nhd", probs, v.double()), lse.transpose(0, 1)


def test_lse_merge_of_disjoint_sets_is_union():
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(n, 3, 8, generator=gen) for n in (6, 20, 20))
    split = torch.rand(6, 20, generator=gen) < 0.5
    split[0] = True  # row 0: every key on side a, side b empty
    full_out, full_lse = _partial(q, k, v, torch.ones(6, 20, dtype=torch.bool), 0.3)
    a_out, a_lse = _partial(q, k, v, split, 0.3)
    b_out, b_lse = _partial(q, k, v, ~split, 0.3)
    assert torch.isinf(b_lse[0]).all()
    out, lse = lse_merge(a_out, a_lse, b_out, b_lse)
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=1e-5)  # the merge runs in float32
    torch.testing.assert_close(lse.double(), full_lse, atol=1e-5, rtol=1e-6)
    empty = torch.full_like(a_lse, float("-inf"))
    out, lse = lse_merge(torch.zeros_like(a_out), empty, torch.zeros_like(a_out), empty)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_lse_merge_equals_vllm_merge_attn_states():
    """vLLM's merge utility (its torch fallback on CPU) computes the same merge."""
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    gen = torch.Generator().manual_seed(15)
    a_out, b_out = torch.randn(7, 4, 16, generator=gen), torch.randn(7, 4, 16, generator=gen)
    a_lse, b_lse = torch.randn(7, 4, generator=gen), torch.randn(7, 4, generator=gen)
    a_lse[2, 1] = float("-inf")
    vllm_out = torch.empty_like(a_out)
    vllm_lse = torch.empty(4, 7)
    merge_attn_states(vllm_out, a_out, a_lse.T.contiguous(), b_out, b_lse.T.contiguous(), vllm_lse)
    out, lse = lse_merge(a_out, a_lse, b_out, b_lse)
    torch.testing.assert_close(out, vllm_out)
    torch.testing.assert_close(lse, vllm_lse.T)


def test_sink_attention_excludes_window_keys():
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(5, 2, 8, generator=gen)
    k, v = torch.randn(4, 1, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
    positions = torch.tensor([3, 4, 5, 6, 9])
    out, lse = sink_attention(q, k, v, positions, window=4, scale=0.5)
    # W=4: position 3 sees no sink (j <= -1), 4 sees j=0, 5 sees j<=1, 6 j<=2, 9 all four.
    assert torch.isinf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    mask = torch.arange(4)[None, :] <= positions[:, None] - 4
    ref_out, ref_lse = _partial(q, k.expand(4, 2, 8), v.expand(4, 2, 8), mask, 0.5)
    torch.testing.assert_close(out[1:].double(), ref_out[1:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[1:].double(), ref_lse[1:], atol=1e-5, rtol=1e-6)
