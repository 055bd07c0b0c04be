"""SWA-aware LoRA fine-tuning (SWAA.md, method 5): train an adapter under the masks it will be served with.

Recipe (Yu et al., arXiv 2512.10411, SWA-aware fine-tuning): LoRA on the attention projections q/k/v,
rank 16, alpha 32, rank-stabilised scaling (rsLoRA), dropout 0.1, learning rate 1e-4, one epoch over
self-distilled data (:mod:`swaa_vllm.finetuning.distill`). Each training sequence is ``prompt + answer`` in one
forward; the loss is the cross-entropy of the answer tokens only. Attention follows the ``swaa_config``
plan layer by layer (:mod:`swaa_vllm.finetuning.training_attention`): prompt positions use sinks + window in sliding
layers, answer positions use full attention in FA-decode layers, exactly as the ``swaa`` backend serves.

    python -m swaa_vllm.finetuning.train --data adapters/distill.jsonl --output adapters/recipe_w128 \\
        --preset recipe --window 128

The presets are the accuracy harness's rows of the same name (:mod:`swaa_vllm.evaluation.recipes`).

Writes a standard peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) plus
``swaa_training.json`` (the ``swaa_config`` to serve it with, hyperparameters, data, timing) and
``loss_log.jsonl`` (one line per step). Serve it with the same ``swaa_config``::

    vllm serve MODEL --attention-backend swaa --hf-overrides '{"swaa_config": ...}' \\
        --enable-lora --max-lora-rank 16 --lora-modules swaa-lora=adapters/recipe_w128

Optimiser: AdamW, batch of one sequence (no padding, no accumulation), 5% linear warm-up then linear
decay, gradient norm clipped at 1.0. bfloat16 autocast by default (about 1.6x faster than float32 on a
CPU with AVX512-BF16; LoRA weights and optimiser state stay float32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swaa_vllm.config import SwaaConfigError, build_plan
from swaa_vllm.evaluation.recipes import PRESETS, preset_config

__all__ = ["LoraHyperparameters", "main", "train"]


@dataclass(frozen=True)
class LoraHyperparameters:
    """The paper's LoRA settings (defaults) and the loop's.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; with ``rslora`` the scale is ``alpha / sqrt(rank)``.
        rslora: rank-stabilised scaling.
        dropout: LoRA dropout.
        learning_rate: peak AdamW learning rate.
        epochs: passes over the data.
        target_modules: module names that get adapters (Llama/Qwen attention projections).
        warmup_fraction: fraction of steps of linear warm-up.
        max_grad_norm: gradient clipping.
        seed: shuffling, dropout and LoRA initialisation.
    """

    rank: int = 16
    alpha: int = 32
    rslora: bool = True
    dropout: float = 0.1
    learning_rate: float = 1e-4
    epochs: int = 1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model_dir: Path, swaa_config: dict, rows: list[dict], output: Path,
          hp: LoraHyperparameters = LoraHyperparameters(), bf16: bool = True, progress: bool = True) -> dict:
    """Train a LoRA adapter under the SWAA masks of ``swaa_config`` and save it to ``output``.

    Args:
        model_dir: Hugging Face model directory (a Llama/Qwen-style decoder; the adapter's base).
        swaa_config: the plan to train under, validated like the backend's (``build_plan``).
        rows: distillation rows with ``prompt_ids`` and ``answer_ids`` (token id lists).
        output: adapter directory to write (created).
        hp: hyperparameters.
        bf16: bfloat16 autocast for the forward/backward.
        progress: show a tqdm bar with the running loss.

    Returns:
        The summary written to ``output/swaa_training.json``.

    Raises:
        SwaaConfigError: an invalid ``swaa_config`` for this model.
        ValueError: empty ``rows`` or a row longer than the model's context.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from swaa_vllm.finetuning import training_attention

    if not rows:
        raise ValueError("no training rows")
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=training_attention.register())
    plan = build_plan(swaa_config, model.config.num_hidden_layers)
    longest = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in rows)
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"a training row has {longest} tokens, above the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    lora = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, use_rslora=hp.rslora, lora_dropout=hp.dropout,
                      target_modules=list(hp.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate)
    order = [i for _ in range(hp.epochs) for i in random.sample(range(len(rows)), len(rows))]
    total, warmup = len(order), max(1, math.ceil(hp.warmup_fraction * len(order)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "loss_log.jsonl"
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(order, desc=f"LoRA under SWAA ({output.name})", unit="seq", file=sys.stderr, disable=not progress)
    with open(log_path, "w") as log:
        for step, index in enumerate(bar):
            row = rows[index]
            prompt, answer = row["prompt_ids"], row["answer_ids"]
            ids = torch.tensor([prompt + answer[:-1]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # logits of the last len(answer) positions: P-1 .. P+A-2 predict answer[0 .. A-1]
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer), swaa_plan=plan,
                               swaa_prompt_len=len(prompt)).logits[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            losses.append(loss.item())
            recent = sum(losses[-16:]) / len(losses[-16:])
            bar.set_postfix(loss=f"{recent:.3f}")
            log.write(json.dumps({"step": step, "loss": round(losses[-1], 5), "lr": lr, "task": row.get("task"),
                                  "tokens": ids.shape[1] + 1, "elapsed_s": round(time.perf_counter() - start, 2)})
                      + "\n")
    elapsed = time.perf_counter() - start
    model.save_pretrained(output)
    quarter = max(1, len(losses) // 4)
    summary = {
        "swaa_config": swaa_config,
        "plan": plan.describe(),
        "base_model": str(model_dir),
        "hyperparameters": asdict(hp),
        "bf16_autocast": bf16,
        "steps": len(losses),
        "sequences": len(rows),
        "tokens": sum(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in rows) * hp.epochs,
        "answer_tokens": sum(len(r["answer_ids"]) for r in rows) * hp.epochs,
        "loss_first_quarter": round(sum(losses[:quarter]) / quarter, 4),
        "loss_last_quarter": round(sum(losses[-quarter:]) / quarter, 4),
        "train_s": round(elapsed, 1),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    (output / "swaa_training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI's arguments (see ``python -m swaa_vllm.finetuning.train --help``)."""
    p = argparse.ArgumentParser(prog="python -m swaa_vllm.finetuning.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("adapters/distill.jsonl"),
                   help="self-distilled JSONL from python -m swaa_vllm.finetuning.distill")
    p.add_argument("--output", type=Path, required=True, help="adapter directory to write")
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: the bundled model)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=tuple(PRESETS), default="recipe",
                       help="recipe: W, 16 sinks, FA decode, odd layers full; swa_only: W alone")
    group.add_argument("--swaa-config", type=str, default=None, help="a swaa_config JSON object instead of a preset")
    p.add_argument("--window", type=int, default=128, help="W for --preset")
    defaults = LoraHyperparameters()
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank r (serve with --max-lora-rank >= r)")
    p.add_argument("--alpha", type=int, default=defaults.alpha, help="LoRA alpha (rsLoRA scale alpha/sqrt(r))")
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="LoRA dropout")
    p.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak AdamW learning rate")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data")
    p.add_argument("--seed", type=int, default=defaults.seed, help="shuffling, dropout and LoRA initialisation")
    p.add_argument("--max-samples", type=int, default=None, help="train on the first N rows only")
    p.add_argument("--no-bf16", action="store_true", help="float32 instead of bfloat16 autocast")
    args = p.parse_args(argv)
    for name in ("rank", "alpha", "epochs", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point (``python -m swaa_vllm.finetuning.train``, ``swaa-vllm-finetune``, ``make finetune``)."""
    args = parse_args(argv)
    from transformers import AutoConfig

    from swaa_vllm.finetuning.distill import read_jsonl
    from swaa_vllm.models.bundled import prepare_model

    model_dir = args.model or prepare_model()
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    if args.swaa_config is not None:
        try:
            swaa_config = json.loads(args.swaa_config)
        except json.JSONDecodeError as err:
            sys.exit(f"--swaa-config is not valid JSON: {err}")
    else:
        swaa_config = preset_config(args.preset, args.window, num_layers)
    try:
        build_plan(swaa_config, num_layers)  # the config first: it does not depend on the data
    except SwaaConfigError as err:
        sys.exit(str(err))
    if not args.data.exists():
        sys.exit(f"--data {args.data} does not exist; make it with: "
                 f"python -m swaa_vllm.finetuning.distill --output {args.data}")
    try:
        rows = read_jsonl(args.data)
    except ValueError as err:
        sys.exit(str(err))
    rows = rows[: args.max_samples] if args.max_samples else rows
    hp = LoraHyperparameters(rank=args.rank, alpha=args.alpha, dropout=args.dropout, learning_rate=args.lr,
                             epochs=args.epochs, seed=args.seed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    summary = train(model_dir, swaa_config, rows, args.output, hp, bf16=not args.no_bf16)
    print(f"adapter -> {args.output} ({summary['steps']} steps, {summary['train_s']:.0f} s, loss "
          f"{summary['loss_first_quarter']:.3f} -> {summary['loss_last_quarter']:.3f})", file=sys.stderr)
    print(f"serve: vllm serve {model_dir} --served-model-name base --attention-backend swaa --hf-overrides "
          f"'{json.dumps({'swaa_config': swaa_config})}' --enable-lora --max-lora-rank {args.rank} "
          f"--lora-modules swaa-lora={args.output}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
