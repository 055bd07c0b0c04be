"""Self-distillation data for SWA-aware fine-tuning: the full-attention model answers long prompts.

As in the SWAA paper (Yu et al., arXiv 2512.10411, "SWA-aware fine-tuning"), the training targets are the
model's own answers under full attention, kept only where they are right, so that the adapter learns to
reproduce full-attention behaviour under the SWAA masks rather than new knowledge. The prompts come from
:data:`swaa_vllm.evaluation.tasks.TRAINING_TASKS` (words, codes and places in their own filler text), never
from the families the accuracy harness scores.

The teacher is vLLM with the ``swaa`` backend and no ``swaa_config`` (plain causal attention, equal to
vLLM's CPU_ATTN per ``tests/test_e2e_offline.py``), float32, greedy, one ``LLM.generate`` batch. Answers
run until the model's end-of-turn token; an answer that does not end there or is wrong is dropped.

    python -m swaa_vllm.finetuning.distill --output adapters/distill.jsonl --per-task 80

Output: one JSON object per line, ``{"task", "seed", "depth", "answers", "prompt_ids", "answer_ids",
"answer_text"}``; ``answer_ids`` ends with the end-of-turn token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from swaa_vllm.evaluation.scoring import score
from swaa_vllm.evaluation.tasks import TRAINING_TASKS, Sample, TaskSpec, make_sample

__all__ = ["CONTEXT_LENGTHS", "build_samples", "distill", "main", "read_jsonl"]

# Prompt lengths of the training data, cycled over the samples: around the harness's 640 tokens, with
# windows of 128-256 all well inside the prompt.
CONTEXT_LENGTHS = (448, 576, 704, 832)
MAX_ANSWER_TOKENS = 48
# One distractor needle per prompt: with three (the TaskSpec default) the 135M teacher answered only 33 of
# 120 prompts right (27%), with one it answers about 50% (measured on the bundled model, float32).
NUM_KEYS = 2


def build_samples(tokenizer, per_task: int, seed: int = 1, tasks: Sequence[str] = TRAINING_TASKS,
                  lengths: Sequence[int] = CONTEXT_LENGTHS) -> list[Sample]:
    """``per_task`` prompts of each training family; sample i has length ``lengths[i % len]``, a needle
    depth drawn from its seed (uniform in [0.05, 0.95]) and :data:`NUM_KEYS` needles.

    Raises:
        ValueError: a task outside :data:`TRAINING_TASKS` (the harness's families must stay unseen).
    """
    import random

    unknown = [t for t in tasks if t not in TRAINING_TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown} are not training families; choose from {TRAINING_TASKS}")
    out = []
    for task in tasks:
        for i in range(per_task):
            sample_seed = seed * 100_000 + i
            depth = random.Random(f"depth/{task}/{sample_seed}").uniform(0.05, 0.95)
            out.append(make_sample(tokenizer, TaskSpec(task, lengths[i % len(lengths)], num_keys=NUM_KEYS), sample_seed,
                                   depth))
    return out


def distill(model_dir: Path, samples: Sequence[Sample], eos_token_id: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Answer every sample with the full-attention model; keep right answers that end at ``eos_token_id``.

    Returns:
        ``(rows, stats)``: the kept rows (see the module docstring) and counts per task
        (``{"task": {"asked", "kept", "wrong", "unfinished"}}``) plus ``"generate_s"``.
    """
    from vllm import LLM, SamplingParams, TokensPrompt

    max_len = max(s.num_tokens for s in samples) + MAX_ANSWER_TOKENS + 8
    llm = LLM(str(model_dir), attention_backend="swaa", dtype="float32", enforce_eager=True, seed=seed,
              max_model_len=max_len, kv_cache_memory_bytes=1 << 30)
    try:
        t0 = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=MAX_ANSWER_TOKENS, stop_token_ids=[eos_token_id],
                                include_stop_str_in_output=True, skip_special_tokens=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(s.prompt_ids)) for s in samples], params)
        elapsed = time.perf_counter() - t0
    finally:
        llm.llm_engine.engine_core.shutdown()
    rows: list[dict] = []
    stats: dict = {}
    for sample, out in zip(samples, outs, strict=True):
        counts = stats.setdefault(sample.task, {"asked": 0, "kept": 0, "wrong": 0, "unfinished": 0})
        counts["asked"] += 1
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        if not ids or ids[-1] != eos_token_id:
            counts["unfinished"] += 1
            continue
        if not score(sample.task, completion.text, sample.answers):
            counts["wrong"] += 1
            continue
        counts["kept"] += 1
        rows.append({"task": sample.task, "seed": sample.seed, "depth": round(sample.depth, 4),
                     "answers": list(sample.answers), "prompt_ids": list(sample.prompt_ids), "answer_ids": ids,
                     "answer_text": completion.text})
    stats["generate_s"] = round(elapsed, 1)
    return rows, stats


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a distillation file.

    Raises:
        ValueError: a line that is not a JSON object with non-empty ``prompt_ids`` and ``answer_ids``
            (the message names the line and the field), or an empty file.
    """
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            for field in ("prompt_ids", "answer_ids"):
                value = row.get(field) if isinstance(row, dict) else None
                if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
                    raise ValueError(f"{path}:{number}: field {field!r} must be a non-empty list of token ids; "
                                     f"regenerate the file with python -m swaa_vllm.finetuning.distill")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows; regenerate it with python -m swaa_vllm.finetuning.distill")
    return rows


def main(argv: list[str] | None = None) -> Path:
    """CLI: build the prompts, distil, write the JSONL file and a ``.stats.json`` beside it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: the bundled model)")
    p.add_argument("--per-task", type=int, default=80, help="prompts per training family before filtering")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.per_task < 1:
        p.error("--per-task must be >= 1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from transformers import AutoTokenizer

    from swaa_vllm.models.bundled import prepare_model

    model_dir = args.model or prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = build_samples(tokenizer, args.per_task, args.seed)
    rows, stats = distill(model_dir, samples, tokenizer.eos_token_id, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    stats.update(model=str(model_dir), per_task=args.per_task, seed=args.seed, kept=len(rows),
                 prompt_tokens=sum(len(r["prompt_ids"]) for r in rows),
                 answer_tokens=sum(len(r["answer_ids"]) for r in rows))
    args.output.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"kept {len(rows)} of {len(samples)} answers -> {args.output}", file=sys.stderr)
    return args.output


if __name__ == "__main__":
    main()
