"""Unit tests of the dense SWAA reference (``swaa_kernels.reference``).

The oracle below is written straight from ``shared/SWAA.md`` ("Exact semantics")
with plain Python ints and sets, independently of the reference's tensor
formulation: for a query at position i of a request with P prompt tokens,

* full-attention layer (W is None): every key j with 0 <= j <= i;
* sliding layer, prompt token (i < P): the W most recent keys including itself
  plus the first k keys (their union), never a key after i;
* sliding layer, generated token (i >= P): full attention with FA decode, else
  the prompt-token rule.

``reference_attention`` is checked against hand-computable cases and a
pure-Python (``math.exp``) softmax written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from swaa_kernels.reference import reference_attention, swaa_mask

# ---------------------------------------------------------------------------
# Pure-Python oracle of the mask (no torch).
# ---------------------------------------------------------------------------


def visible_keys(i: int, prompt_len: int, window: int | None, keep_first: int, fa_decode: bool) -> set[int]:
    """The set of key positions query position ``i`` attends, per SWAA.md."""
    causal = set(range(0, i + 1))  # every key j with 0 <= j <= i
    if window is None:
        return causal
    if i >= prompt_len and fa_decode:
        return causal
    recent = set()  # the W most recent keys, counting the query itself
    for j in range(i, i - window, -1):
        if j >= 0:
            recent.add(j)
    sinks = set()  # the first k keys that exist so far (never a future key)
    for j in range(keep_first):
        if j <= i:
            sinks.add(j)
    return recent | sinks


def oracle_mask(qpos: list[int], kpos: list[int], prompt_len, window, keep_first, fa_decode) -> list[list[bool]]:
    rows = []
    for i in qpos:
        vis = visible_keys(i, prompt_len, window, keep_first, fa_decode)
        rows.append([j in vis for j in kpos])
    return rows


def as_lists(mask: torch.Tensor) -> list[list[bool]]:
    assert mask.dtype == torch.bool
    return [[bool(x) for x in row] for row in mask.tolist()]


def call_mask(qpos, kpos, prompt_len, window, keep_first, fa_decode):
    return swaa_mask(
        torch.tensor(qpos, dtype=torch.long),
        torch.tensor(kpos, dtype=torch.long),
        prompt_len,
        window,
        keep_first,
        fa_decode,
    )


WINDOWS = [1, 2, 3, 4, 5, 6, None]
KEEPS = list(range(0, 8))
PROMPTS = list(range(1, 11))
MAX_SEQ = 14


# ---------------------------------------------------------------------------
# Oracle self-checks (so the oracle itself is not trusted blindly).
# ---------------------------------------------------------------------------


def test_oracle_hand_examples():
    # W=3, k=2, P=10, position 7: window {5,6,7} + sinks {0,1}.
    assert visible_keys(7, 10, 3, 2, False) == {0, 1, 5, 6, 7}
    # Generated position 12 with FA decode: everything up to 12.
    assert visible_keys(12, 10, 3, 2, True) == set(range(13))
    # Generated position 12 without FA decode: still sink + window.
    assert visible_keys(12, 10, 3, 2, False) == {0, 1, 10, 11, 12}
    # k larger than i: only existing keys.
    assert visible_keys(1, 10, 1, 5, False) == {0, 1}
    # Full layer ignores k / fa_decode.
    assert visible_keys(4, 2, None, 3, False) == {0, 1, 2, 3, 4}


# ---------------------------------------------------------------------------
# swaa_mask vs the oracle over the full small grid.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fa_decode", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_mask_matches_oracle_grid(window, fa_decode):
    """All positions 0..13 as queries and keys, every k in 0..7 and P in 1..10."""
    pos = list(range(MAX_SEQ))
    for keep_first in KEEPS:
        for prompt_len in PROMPTS:
            got = call_mask(pos, pos, prompt_len, window, keep_first, fa_decode)
            assert got.shape == (MAX_SEQ, MAX_SEQ)
            want = oracle_mask(pos, pos, prompt_len, window, keep_first, fa_decode)
            assert as_lists(got) == want, (window, keep_first, prompt_len, fa_decode)


@pytest.mark.parametrize("fa_decode", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_mask_chunk_queries_and_unordered_keys(window, fa_decode):
    """Queries that are a chunk (not starting at 0), keys a shuffled subset.

    Positions are absolute, so the mask must depend only on the position values,
    not on their index in the tensors.
    """
    gen = torch.Generator().manual_seed(1234 + (window or 0) * 2 + int(fa_decode))
    for keep_first in KEEPS:
        for prompt_len in PROMPTS:
            for seq_len in (1, 5, 9, MAX_SEQ):
                for q_len in {1, 2, seq_len // 2 or 1, seq_len}:
                    qpos = list(range(seq_len - q_len, seq_len))
                    perm = torch.randperm(seq_len, generator=gen).tolist()
                    kpos = perm[: max(1, (2 * seq_len) // 3)]
                    got = call_mask(qpos, kpos, prompt_len, window, keep_first, fa_decode)
                    want = oracle_mask(qpos, kpos, prompt_len, window, keep_first, fa_decode)
                    assert as_lists(got) == want, (window, keep_first, prompt_len, fa_decode, qpos, kpos)


def test_mask_accepts_int32_positions():
    q = torch.arange(3, 9, dtype=torch.int32)
    k = torch.arange(0, 9, dtype=torch.int32)
    got = swaa_mask(q, k, 6, 2, 1, True)
    want = oracle_mask(list(range(3, 9)), list(range(9)), 6, 2, 1, True)
    assert as_lists(got) == want


# ---------------------------------------------------------------------------
# Named edge cases, with literal expected matrices where it is small enough.
# ---------------------------------------------------------------------------


def _rows(mask):
    return ["".join("1" if x else "." for x in row) for row in as_lists(mask)]


def test_edge_w1_k0_is_diagonal_for_prompt_tokens():
    pos = list(range(6))
    m = call_mask(pos, pos, 6, 1, 0, False)
    assert _rows(m) == [
        "1.....",
        ".1....",
        "..1...",
        "...1..",
        "....1.",
        ".....1",
    ]


def test_edge_w1_k0_fa_decode_generated_rows_full():
    pos = list(range(6))
    m = call_mask(pos, pos, 3, 1, 0, True)
    assert _rows(m) == [
        "1.....",
        ".1....",
        "..1...",
        "1111..",  # position 3 is the first generated token: full attention
        "11111.",
        "111111",
    ]


def test_edge_w2_k1_literal():
    pos = list(range(7))
    m = call_mask(pos, pos, 5, 2, 1, False)
    assert _rows(m) == [
        "1......",
        "11.....",
        "111....",
        "1.11...",
        "1..11..",
        "1...11.",  # generated, no FA decode: still sink + window
        "1....11",
    ]


def test_edge_k_at_least_w():
    # k=4 >= W=2: the sinks dominate the start, the window follows afterwards.
    pos = list(range(8))
    m = call_mask(pos, pos, 8, 2, 4, False)
    assert _rows(m) == [
        "1.......",
        "11......",
        "111.....",
        "1111....",
        "11111...",  # window {3,4} lies inside/next to the sinks
        "111111..",  # sinks 0..3 plus window {4,5}: 4 appears once
        "1111.11.",
        "1111..11",
    ]


def test_edge_window_at_least_prompt_is_causal_for_prompt_rows():
    for prompt_len in range(1, 9):
        for window in (prompt_len, prompt_len + 1, 50):
            for k in (0, 3):
                pos = list(range(prompt_len))
                m = as_lists(call_mask(pos, pos, prompt_len, window, k, False))
                for i in range(prompt_len):
                    assert m[i] == [j <= i for j in range(prompt_len)]


def test_edge_keep_first_at_least_prompt_is_causal_for_prompt_rows():
    for prompt_len in range(1, 9):
        for k in (prompt_len, prompt_len + 2):
            pos = list(range(prompt_len + 3))
            m = as_lists(call_mask(pos, pos, prompt_len, 1, k, False))
            for i in range(prompt_len):
                assert m[i] == [j <= i for j in pos]
            # Generated rows past k without FA decode: sinks [0, k) + the query itself.
            for i in range(prompt_len, len(pos)):
                assert m[i] == [(j < k and j <= i) or j == i for j in pos]


def test_edge_full_layer_ignores_k_and_fa_decode():
    pos = list(range(10))
    for k in (0, 3, 20):
        for fa in (False, True):
            m = as_lists(call_mask(pos, pos, 4, None, k, fa))
            assert m == [[j <= i for j in pos] for i in pos]


def test_edge_role_is_by_position_not_chunking():
    """A row's role depends only on its position vs P (1-token prompt chunk, straddling chunk)."""
    P, W, k = 6, 2, 1
    full = as_lists(call_mask(list(range(10)), list(range(10)), P, W, k, True))
    for start in range(10):
        for end in range(start + 1, 11):
            chunk = as_lists(call_mask(list(range(start, end)), list(range(10)), P, W, k, True))
            assert chunk == full[start:end]
    # Position P-1 (last prompt token) is sliding, position P is full.
    assert full[P - 1] == [j in (0, P - 2, P - 1) for j in range(10)]
    assert full[P] == [j <= P for j in range(10)]


def test_diagonal_always_visible():
    pos = list(range(MAX_SEQ))
    for window in WINDOWS:
        for k in KEEPS:
            for P in PROMPTS:
                for fa in (False, True):
                    m = call_mask(pos, pos, P, window, k, fa)
                    assert bool(torch.diagonal(m).all())


# ---------------------------------------------------------------------------
# reference_attention.
# ---------------------------------------------------------------------------


def python_attention(query, key, value, mask, scale):
    """Masked softmax attention with nested Python loops and math.exp (GQA: h -> h // group)."""
    q, k, v = query.double().tolist(), key.double().tolist(), value.double().tolist()
    m = mask.tolist()
    num_q, num_heads, head_size = len(q), len(q[0]), len(q[0][0])
    num_kv_heads = len(k[0])
    group = num_heads // num_kv_heads
    out = []
    for qi in range(num_q):
        row = []
        for h in range(num_heads):
            g = h // group
            vis = [kj for kj in range(len(k)) if m[qi][kj]]
            scores = [scale * sum(q[qi][h][d] * k[kj][g][d] for d in range(head_size)) for kj in vis]
            top = max(scores)
            w = [math.exp(s - top) for s in scores]
            tot = sum(w)
            row.append([sum(w[n] * v[kj][g][d] for n, kj in enumerate(vis)) / tot for d in range(head_size)])
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_attention_single_visible_key_returns_its_value():
    gen = torch.Generator().manual_seed(0)
    n, h, d = 5, 2, 4
    q = torch.randn(n, h, d, generator=gen)
    k = torch.randn(n, h, d, generator=gen)
    v = torch.randn(n, h, d, generator=gen)
    # Each query i sees exactly key (i * 2) % n.
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, (i * 2) % n] = True
    out = reference_attention(q, k, v, mask, scale=0.5)
    assert out.dtype == torch.float64
    assert out.shape == (n, h, d)
    for i in range(n):
        assert torch.equal(out[i], v[(i * 2) % n].double())


def test_attention_uniform_scores_average_values():
    # Zero queries -> all scores equal -> plain mean of the visible values.
    q = torch.zeros(3, 1, 2)
    k = torch.randn(4, 1, 2)
    v = torch.tensor([[[1.0, 10.0]], [[2.0, 20.0]], [[3.0, 30.0]], [[6.0, 60.0]]])
    mask = torch.tensor(
        [
            [True, True, False, False],  # mean of rows 0,1 -> (1.5, 15)
            [True, False, True, True],  # mean of rows 0,2,3 -> (10/3, 100/3)
            [True, True, True, True],  # mean of all -> (3, 30)
        ]
    )
    out = reference_attention(q, k, v, mask, scale=1.0)
    want = torch.tensor([[[1.5, 15.0]], [[10 / 3, 100 / 3]], [[3.0, 30.0]]], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_attention_two_keys_hand_computed():
    # One query q=(1,0), keys (1,0) and (0,1) -> scores scale*1 and 0.
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    mask = torch.tensor([[True, True]])
    scale = 2.0
    w0 = math.exp(2.0) / (math.exp(2.0) + 1.0)
    out = reference_attention(q, k, v, mask, scale)
    torch.testing.assert_close(out, torch.tensor([[[w0, 1 - w0]]], dtype=torch.float64), rtol=0, atol=1e-12)
    # Masking the first key leaves only the second one.
    out = reference_attention(q, k, v, torch.tensor([[False, True]]), scale)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0]]], dtype=torch.float64), rtol=0, atol=0)


def test_attention_scale_is_applied():
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([[[1.0]], [[0.0]]])
    v = torch.tensor([[[1.0]], [[0.0]]])
    mask = torch.tensor([[True, True]])
    for scale in (0.1, 1.0, 3.0):
        want = math.exp(scale) / (math.exp(scale) + 1.0)
        out = reference_attention(q, k, v, mask, scale)
        assert abs(out.item() - want) < 1e-12


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_attention_gqa_uses_kv_head_h_div_group(ratio):
    num_kv_heads = 2
    num_heads = num_kv_heads * ratio
    n, d = 4, 3
    # Values of KV head g are the constant g+1 (uniform scores not needed: any
    # softmax of a constant is that constant), so output head h reveals its KV head.
    q = torch.randn(n, num_heads, d)
    k = torch.randn(n, num_kv_heads, d)
    v = torch.stack([torch.full((n, d), float(g + 1)) for g in range(num_kv_heads)], dim=1)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    out = reference_attention(q, k, v, mask, scale=0.3)
    for h in range(num_heads):
        assert torch.allclose(out[:, h], torch.full((n, d), float(h // ratio + 1), dtype=torch.float64)), h


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_attention_matches_python_loops_with_gqa(ratio):
    gen = torch.Generator().manual_seed(ratio)
    num_kv_heads = 2
    num_heads = num_kv_heads * ratio
    n, d = 6, 4
    q = torch.randn(n, num_heads, d, generator=gen)
    k = torch.randn(n, num_kv_heads, d, generator=gen)
    v = torch.randn(n, num_kv_heads, d, generator=gen)
    pos = list(range(n))
    mask = torch.tensor(oracle_mask(pos, pos, 4, 2, 1, True))
    out = reference_attention(q, k, v, mask, scale=0.7)
    torch.testing.assert_close(out, python_attention(q, k, v, mask, 0.7), rtol=0, atol=1e-12)


def test_attention_low_precision_inputs_computed_in_float64():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(5, 2, 8, generator=gen).bfloat16()
    k = torch.randn(5, 1, 8, generator=gen).bfloat16()
    v = torch.randn(5, 1, 8, generator=gen).bfloat16()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out = reference_attention(q, k, v, mask, 0.35)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, python_attention(q, k, v, mask, 0.35), rtol=0, atol=1e-12)


def test_attention_rejects_row_without_visible_key():
    q = torch.randn(2, 1, 2)
    k = torch.randn(2, 1, 2)
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="no visible key"):
        reference_attention(q, k, k, mask, 1.0)


def test_attention_rejects_non_multiple_heads():
    q = torch.randn(2, 3, 2)
    k = torch.randn(2, 2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, k, k, mask, 1.0)
