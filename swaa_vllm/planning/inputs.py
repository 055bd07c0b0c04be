"""Checks of the plan search's inputs: the model directory and the calibration prompts.

Every failure raises :class:`PlanInputError` with a message naming the option and the fix; the command line
(:mod:`swaa_vllm.planning.cli`) prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SUPPORTED_ARCHITECTURES", "PlanInputError", "check_model", "check_window", "read_prompts"]

# Decoder-only RoPE models whose transformers implementation the calibration drives layer by layer and that
# the swaa backend serves (tests/tiny_models.py covers Llama, Qwen2, Qwen3).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class PlanInputError(ValueError):
    """An input of the plan search that cannot be used; the message names the option and the fix."""


def check_model(model_dir: Path) -> dict:
    """The model's ``config.json`` if the swaa backend and the calibration can run it.

    Refuses what the backend refuses at load (``swaa_vllm/vllm_shims._check_model_supported`` and
    ``SwaaAttentionImpl``): MLA, a model-native sliding window, ALiBi, logit soft-capping, learned sink
    logits, and (on vLLM's CPU build) head sizes its attention op does not serve; and architectures outside
    :data:`SUPPORTED_ARCHITECTURES`.

    Raises:
        PlanInputError: naming ``--model`` and what to do.
    """
    path = model_dir / "config.json"
    if not path.is_file():
        raise PlanInputError(f"--model {model_dir}: no config.json there; pass a Hugging Face model directory "
                             "(for the bundled model: the path `swaa-vllm-prepare-model` prints)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlanInputError(f"--model {model_dir}: config.json is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise PlanInputError(f"--model {model_dir}: config.json holds a JSON {type(cfg).__name__}, not the object "
                             "of a Hugging Face model config")
    archs = cfg.get("architectures") or []
    problems = []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        problems.append(f"architecture {archs or cfg.get('model_type')!r} is not one the plan search and the "
                        f"swaa backend support ({', '.join(SUPPORTED_ARCHITECTURES)})")
    native = cfg.get("sliding_window")
    if native is not None and cfg.get("use_sliding_window", True) or "sliding_attention" in (cfg.get("layer_types")
                                                                                              or []):
        problems.append(f"the model has its own sliding window ({native}); use a full-attention model and set "
                        "--window instead")
    if cfg.get("kv_lora_rank") is not None:
        problems.append("the model uses MLA attention; SWAA supports multi-head/grouped-query attention models")
    if cfg.get("alibi") or cfg.get("position_embedding_type") == "alibi":
        problems.append("the model uses ALiBi; SWAA supports RoPE models")
    if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
        problems.append("the model uses logit soft-capping, which the swaa backend does not support")
    head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from swaa_vllm.platforms.cpu_attention_op import SUPPORTED_HEAD_SIZES

            if head not in SUPPORTED_HEAD_SIZES:
                problems.append(f"head size {head} is not served by vLLM's CPU attention op "
                                f"({', '.join(map(str, SUPPORTED_HEAD_SIZES))})")
    except ImportError:
        pass
    if problems:
        raise PlanInputError(f"--model {model_dir}: the swaa backend refuses this model: " + "; ".join(problems))
    return cfg


def read_prompts(path: Path, tokenizer) -> list[list[int]]:
    """Calibration prompts from a JSONL file, as token ids.

    Each line is a JSON object with one of: ``"prompt_ids"`` (a list of token ids, used as is), ``"prompt"``
    (text: sent as a user message through the tokenizer's chat template if it has one, else encoded with the
    tokenizer's special tokens) or ``"messages"`` (a chat, templated with the generation prompt). Blank lines
    are skipped.

    Raises:
        PlanInputError: a missing or empty file, a line that is not a JSON object with one of those keys,
            token ids outside the vocabulary (messages name ``--prompts`` and the line).
    """
    if path.is_dir():
        raise PlanInputError(f"--prompts {path} is a directory; pass a JSONL file")
    if not path.is_file():
        raise PlanInputError(f"--prompts {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PlanInputError(f"--prompts {path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                             "write the JSONL file in UTF-8") from None
    prompts = []
    vocab = len(tokenizer)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts {path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlanInputError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line, e.g. "
                                 '{"prompt": "..."}') from None
        if not isinstance(obj, dict) or not ({"prompt", "prompt_ids", "messages"} & obj.keys()):
            raise PlanInputError(f"{where}: expected a JSON object with \"prompt\" (text), \"prompt_ids\" (token "
                                 "ids) or \"messages\" (a chat)")
        if "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise PlanInputError(f"{where}: \"prompt_ids\" must be a non-empty list of token ids in [0, {vocab})")
        else:
            messages = obj.get("messages") or [{"role": "user", "content": obj.get("prompt")}]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         and m["content"] for m in messages):
                raise PlanInputError(f"{where}: \"prompt\" must be a non-empty string (\"messages\": a list of "
                                     "{\"role\", \"content\"} objects)")
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
                    ids = ids["input_ids"]
            else:
                ids = tokenizer.encode("\n".join(m["content"] for m in messages))
        prompts.append([int(t) for t in ids])
    if not prompts:
        raise PlanInputError(f"--prompts {path}: the file has no prompts; add one JSON object per line, e.g. "
                             '{"prompt": "..."}, or leave --prompts out to use the bundled task families')
    return prompts


def check_window(windows: Sequence[int], keeps: Sequence[int], prompts: Sequence[Sequence[int]], source: str) -> None:
    """Every (W, k) leaves some prompt rows outside sinks + window in every calibration prompt.

    Raises:
        PlanInputError: W < 1, k < 0, or W + k >= the shortest prompt (naming ``--window``).
    """
    bad = [w for w in windows if w < 1]
    if bad:
        raise PlanInputError(f"--window {bad[0]}: W must be >= 1")
    bad = [k for k in keeps if k < 0]
    if bad:
        raise PlanInputError(f"--keep-first {bad[0]}: k must be >= 0")
    shortest = min(len(p) for p in prompts)
    for w in windows:
        for k in keeps:
            if w + k >= shortest:
                raise PlanInputError(
                    f"--window {w} (with --keep-first {k}) is larger than the calibration prompts ({source}: the "
                    f"shortest has {shortest} tokens, and W + k must be below it for the window to hide anything); "
                    "lower --window, or use longer prompts (--context-tokens, or a --prompts file)")
