"""End to end on the bundled real model through vLLM's offline ``LLM.generate``.

* no ``swaa_config`` and a window longer than every prompt: greedy output equals
  vLLM's own CPU backend (CPU_ATTN);
* a small window: output differs from full attention and equals the independent
  transformers reference run with the same per-layer masks.
"""

from __future__ import annotations

import pytest

from tests import engine, hf_reference

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
FILLER = (
    "The museum opens at nine and closes at five. Visitors may bring a camera but no tripod. "
    "The cafe on the second floor serves soup, bread and tea. "
)
SMALL_WINDOW = {"sliding_window_size": 24, "keep_first": 4, "force_fa_decode": True, "non_sliding_layers": [1, 7, 20]}


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        "What is the capital of France?",
        "The secret code is 4817. " + FILLER * 4 + "What is the secret code?",
        "List three colours of the rainbow.",
    ]
    ids = [list(_chat_ids(tok, t)) for t in texts]
    if not isinstance(ids[0][0], int):  # transformers returning a BatchEncoding
        ids = [list(_chat_ids(tok, t)["input_ids"]) for t in texts]
    assert max(map(len, ids)) < 400 and min(map(len, ids)) > 24
    return ids


@pytest.fixture(scope="module")
def runs(model_dir, prompts):
    """Greedy outputs of each engine configuration, one engine alive at a time."""
    configs = {
        "cpu_attn": dict(attention_backend="CPU_ATTN"),
        "swaa_no_config": dict(attention_backend="swaa"),
        "swaa_big_window": dict(
            attention_config={"backend": "swaa"},
            hf_overrides={"swaa_config": {"sliding_window_size": 4096, "keep_first": 0}},
        ),
        "swaa_small_window": dict(attention_backend="SWAA", hf_overrides={"swaa_config": SMALL_WINDOW}),
        # Same plan, scheduled differently: 40-token chunks (prefill chunks whose context is
        # already cached, crossing the 24-token window edge) and 16-token blocks, so the
        # shared chat-template prefix is a prefix-cache hit for later prompts.
        "swaa_small_window_chunked": dict(
            attention_backend="swaa", hf_overrides={"swaa_config": SMALL_WINDOW},
            max_num_batched_tokens=40, max_num_seqs=4, block_size=16,
        ),
    }
    results = {}
    for name, kwargs in configs.items():
        with engine.llm_engine(model_dir, **kwargs) as llm:
            results[name] = engine.greedy(llm, prompts, MAX_TOKENS, logprobs=1)
    return results


@pytest.mark.parametrize("name", ["swaa_no_config", "swaa_big_window"])
def test_full_attention_equivalents_match_cpu_attn(runs, name):
    for (ref_tokens, ref_lps), (tokens, lps) in zip(runs["cpu_attn"], runs[name], strict=True):
        assert tokens == ref_tokens
        # float32 engines with different attention kernels: logprobs agree to rounding.
        assert lps == pytest.approx(ref_lps, abs=2e-3)


def test_small_window_changes_output(runs):
    # The second prompt's code sits far outside a 24-token window.
    assert [t for t, _ in runs["swaa_small_window"]] != [t for t, _ in runs["cpu_attn"]]


@pytest.mark.parametrize("name", ["swaa_small_window", "swaa_small_window_chunked"])
def test_small_window_matches_transformers_reference(runs, model_dir, prompts, name):
    model = hf_reference.load_model(model_dir)
    for prompt, (tokens, lps) in zip(prompts, runs[name], strict=True):
        ref_tokens, ref_lps = hf_reference.greedy(model, SMALL_WINDOW, prompt, MAX_TOKENS)
        assert tokens == ref_tokens
        # vLLM float32 vs transformers float32 (float64 attention): kernels differ in
        # summation order only; 2e-3 nats is far below any greedy decision margin seen.
        assert lps == pytest.approx(ref_lps, abs=2e-3)


def test_hf_reference_without_window_matches_cpu_attn(runs, model_dir, prompts):
    """The transformers reference itself agrees with vLLM under full attention."""
    model = hf_reference.load_model(model_dir)
    ref_tokens, _ = hf_reference.greedy(model, None, prompts[0], MAX_TOKENS)
    assert ref_tokens == runs["cpu_attn"][0][0]
