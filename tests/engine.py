"""Helpers that run the bundled model through vLLM's offline ``LLM`` (one engine at a time)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path

# Engine settings shared by every offline test: float32 so that comparisons against
# float32 references are tight, eager mode so startup stays ~30 s on 2 cores, an
# explicit KV cache size because vLLM's CPU default reserves 92% of a NUMA node.
ENGINE_KWARGS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=4096,
    kv_cache_memory_bytes=1 << 30,
    seed=0,
)


@contextlib.contextmanager
def llm_engine(model_dir: Path, **kwargs) -> Iterator[object]:
    """A vLLM ``LLM`` on the bundled model, shut down on exit."""
    from vllm import LLM

    llm = LLM(str(model_dir), **{**ENGINE_KWARGS, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(llm, prompt_token_ids: list[list[int]], max_tokens: int, logprobs: int = 0):
    """Greedy continuations: list of (token_ids, [logprob of each chosen token]).

    Token ids only (no detokenization), so it also serves engines with ``skip_tokenizer_init``.
    """
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True, detokenize=False
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_token_ids], params, use_tqdm=False)
    result = []
    for out in outs:
        c = out.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs, strict=True)] if logprobs else []
        result.append((list(c.token_ids), lps))
    return result
