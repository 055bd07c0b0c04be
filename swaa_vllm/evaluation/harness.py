"""Run one SWAA plan through vLLM's offline engine on the retrieval samples and score it.

The engine step of the accuracy harness, shared by its grid runner (``benchmarks/accuracy_grid.py``,
``make eval``) and the plan search's validation (:mod:`swaa_vllm.planning`): one ``LLM`` per plan
(``swaa_config`` is part of the model config), every sample of the plan in one ``LLM.generate`` batch,
greedy decoding, exact-match scoring (:mod:`swaa_vllm.evaluation.scoring`).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GridConfig", "MAX_TOKENS", "MAX_TOKENS_DEFAULT", "STOP", "STOP_DEFAULT", "run_config"]

# Greedy tokens to generate. Without an answer prefix the model words its answer ("The special magic
# number for vivid-badger mentioned in the provided text is 121838." is 23 tokens); single-value answers
# stop at the first period. Two listed values ("are:\n\n1. 593834\n2. 652542") take about 36 tokens.
MAX_TOKENS = {"niah_multivalue": 40}
MAX_TOKENS_DEFAULT = 28
STOP = {"niah_multivalue": None}
STOP_DEFAULT = ["."]


@dataclass(frozen=True)
class GridConfig:
    """One engine of the grid.

    Attributes:
        name: short id (``swa_k_fa_odd``).
        label: the paper-style row name (``SWA + keep 16 + FA decode + odd layers full``).
        window: W, or None for full attention.
        keep_first: k.
        fa_decode: full-attention decode on every sliding layer.
        full_layers: which layers keep full attention (``"odd"``, ``"even"``, ``"1/4"``, ``""``, or a free-form
            name such as the plan search's ``"calibrated"``).
        swaa_config: what goes into ``hf_overrides={"swaa_config": ...}``; None for full attention.
        adapter: a peft LoRA adapter directory served with the configuration, or None.
    """

    name: str
    label: str
    window: int | None
    keep_first: int = 0
    fa_decode: bool = False
    full_layers: str = ""
    swaa_config: dict | None = field(default=None, compare=False)
    adapter: str | None = None


def run_config(model_dir: Path, cfg: GridConfig, samples, dtype: str, max_model_len: int, seed: int) -> dict:
    """Start one engine for ``cfg``, generate greedily for every sample in one batch, score, shut down.

    Returns the configuration's entry of the results dictionary (see :mod:`swaa_vllm.evaluation.report`).
    """
    from vllm import LLM, SamplingParams, TokensPrompt

    from swaa_vllm.evaluation.scoring import score

    kwargs = {"hf_overrides": {"swaa_config": cfg.swaa_config}} if cfg.swaa_config else {}
    lora_request = None
    if cfg.adapter:
        from vllm.lora.request import LoRARequest

        rank = json.loads((Path(cfg.adapter) / "adapter_config.json").read_text())["r"]
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        lora_request = LoRARequest(cfg.name, 1, cfg.adapter)
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), attention_backend="swaa", dtype=dtype, enforce_eager=True, seed=seed,
              max_model_len=max_model_len, kv_cache_memory_bytes=1 << 30, **kwargs)
    t1 = time.perf_counter()
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS.get(s.task, MAX_TOKENS_DEFAULT),
                                 stop=STOP.get(s.task, STOP_DEFAULT)) for s in samples]
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(s.prompt_ids)) for s in samples], params,
                            use_tqdm=False, lora_request=lora_request)
    finally:
        t2 = time.perf_counter()
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    records = []
    for s, out in zip(samples, outs, strict=True):
        text = out.outputs[0].text
        records.append({"task": s.task, "seed": s.seed, "depth": round(s.depth, 4), "prompt_tokens": s.num_tokens,
                        "needle_token_pos": s.needle_token_pos, "answers": list(s.answers), "output": text,
                        "correct": score(s.task, text, s.answers)})
    return {"name": cfg.name, "label": cfg.label, "window": cfg.window, "keep_first": cfg.keep_first,
            "fa_decode": cfg.fa_decode, "full_layers": cfg.full_layers, "swaa_config": cfg.swaa_config,
            "adapter": cfg.adapter,
            "startup_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2), "records": records}
