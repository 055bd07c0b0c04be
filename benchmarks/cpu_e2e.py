"""End-to-end CPU benchmark: prefill (TTFT) and decode speed of SWAA against vLLM's CPU_ATTN.

For each model (the bundled SmolLM2-135M-Instruct, and a random-weight larger model of
the same Llama architecture) and each configuration

* ``CPU_ATTN``: vLLM's own CPU backend (the baseline);
* ``swaa, no swaa_config``: the backend with full attention everywhere;
* ``swaa, all sliding``: W=1024, k=64, full-attention decode, every layer sliding;
* ``swaa, every other layer full``: the same with the odd layers full,

one engine is started (bf16 on CPUs with native bf16, else float32, see
:mod:`swaa_vllm.platforms.cpu_features`; eager, prefix caching off, vLLM's default chunked-prefill
budget) and measures, on random-token prompts:

* time to first token (TTFT) and prefill throughput at each prompt length
  (default 2k, 4k, 8k, 16k tokens; ``max_tokens=1``);
* decode tokens per second at an 8k-token context (``--decode-tokens`` tokens after an
  8k prompt).

Times come from vLLM's own per-request engine-core timestamps
(``RequestOutput.metrics``: ``scheduled_ts``, ``first_token_ts``, ``last_token_ts``),
i.e. what ``vllm bench latency`` reports minus tokenization; one engine per
configuration serves all lengths (``vllm bench latency`` would start one engine per
length, which on 2 cores costs more than the measurements).

Every ratio is printed next to its FLOP-model bound: the FLOPs of the CPU_ATTN run over
the FLOPs of the SWAA run, counting the linear layers (q/k/v/o projections, MLP, one
logits row) and attention (4 * heads * head_dim per visible query-key pair, from the
SWAA mask of each layer); see :func:`prefill_flops`. Results go to
``benchmarks/results/cpu_e2e.{md,json,png}`` with the machine and versions.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/cpu_e2e.py --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swaa_vllm.evaluation.costs import ModelShape, prompt_masks
from swaa_vllm.evaluation.costs import prefill_flops as costs_prefill_flops
from swaa_vllm.evaluation.recipes import full_layer_indices

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW, SINKS = 1024, 64


@dataclass
class Config:
    """One benchmarked configuration."""

    name: str
    backend: str
    swaa_config: dict | None


def configs(num_layers: int) -> list[Config]:
    sliding = {"sliding_window_size": WINDOW, "keep_first": SINKS, "force_fa_decode": True}
    return [
        Config("CPU_ATTN", "CPU_ATTN", None),
        Config("swaa, no swaa_config", "swaa", None),
        Config(f"swaa, all sliding (W={WINDOW}, k={SINKS})", "swaa", sliding),
        Config("swaa, every other layer full", "swaa",
               {**sliding, "non_sliding_layers": full_layer_indices("odd", num_layers)}),
    ]


# ---------------------------------------------------------------------------
# FLOP model.
# ---------------------------------------------------------------------------


Shape = ModelShape  # the cost model's shape (swaa_vllm/evaluation/costs.py)


def prefill_flops(shape: Shape, config: Config, n: int) -> float:
    """FLOPs of prefilling n tokens under ``config`` (:func:`swaa_vllm.evaluation.costs.prefill_flops`)."""
    return costs_prefill_flops(shape, prompt_masks(config.swaa_config, shape.layers), n)


def decode_flops(shape: Shape, config: Config, context: int) -> float:
    """FLOPs of one decode step at a context: every config decodes with full attention (FA decode)."""
    return shape.linear_flops_per_token() + 4.0 * shape.heads * shape.head_dim * context * shape.layers


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


@dataclass
class Measured:
    config: str
    ttft_s: dict[int, float] = field(default_factory=dict)
    decode_tok_s: float = 0.0


def _timed(llm, prompt: list[int], max_tokens: int):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    wall = time.perf_counter() - start
    m = out.metrics
    if m is None or not m.first_token_ts:
        raise RuntimeError("vLLM returned no request metrics; the benchmark needs disable_log_stats=False")
    ttft = m.first_token_ts - m.scheduled_ts
    decode = (len(out.outputs[0].token_ids) - 1) / (m.last_token_ts - m.first_token_ts) if max_tokens > 1 else 0.0
    return ttft, decode, wall


@contextlib.contextmanager
def engine(model: str, **kwargs) -> Iterator:
    """A vLLM ``LLM(model, **kwargs)``, its engine core shut down and memory released on exit."""
    from vllm import LLM

    llm = LLM(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def measure(model: str, config: Config, lengths: list[int], decode_context: int, decode_tokens: int,
            load_format: str, seed: int, dtype: str = "bfloat16") -> Measured:
    kwargs = dict(
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max(lengths + [decode_context]) + decode_tokens + 16,
        kv_cache_memory_bytes=3 << 30,
        enable_prefix_caching=False,
        disable_log_stats=False,
        skip_tokenizer_init=True,
        load_format=load_format,
        seed=0,
        attention_backend=config.backend,
    )
    if config.swaa_config is not None:
        kwargs["hf_overrides"] = {"swaa_config": config.swaa_config}
    with engine(model, **kwargs) as llm:
        rng = random.Random(seed)
        vocab = llm.llm_engine.model_config.get_vocab_size()

        def prompt(n: int) -> list[int]:
            return [rng.randrange(100, vocab - 100) for _ in range(n)]

        result = Measured(config.name)
        _timed(llm, prompt(512), 4)  # warm-up
        for n in lengths:
            result.ttft_s[n], _, _ = _timed(llm, prompt(n), 1)
            print(f"  {config.name}: {n} tokens TTFT {result.ttft_s[n]:.2f} s", flush=True)
        _, result.decode_tok_s, _ = _timed(llm, prompt(decode_context), decode_tokens + 1)
        print(f"  {config.name}: decode at {decode_context} {result.decode_tok_s:.1f} tok/s", flush=True)
    return result


def larger_model_dir(base: Path, target: Path) -> Path:
    """A random-weight Llama config (SmolLM2-360M's shape) next to the bundled tokenizer files."""
    target.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
               num_key_value_heads=5, head_dim=64, max_position_embeddings=32768)
    cfg.pop("swaa_config", None)
    (target / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("generation_config.json",):
        if (base / name).exists():
            (target / name).write_text((base / name).read_text())
    return target


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def environment() -> dict:
    """Date, CPU model, vector ISA (:func:`swaa_vllm.platforms.cpu_features.describe`), cores, versions, command."""
    import torch
    import vllm

    from swaa_vllm.platforms.cpu_features import cpu_model, describe

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "isa": describe(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def report(models: list[dict], env: dict, targets: list[str]) -> str:
    lines = [
        "# CPU end-to-end benchmark: SWAA against vLLM's CPU_ATTN",
        "",
        f"`{env['command']}` on {env['date']}: {env['cpu']}, {env.get('isa', 'ISA not recorded')}, "
        f"{env['cores']} cores, Python {env['python']}, torch {env['torch']}, vLLM {env['vllm']}. "
        f"{env.get('dtype', 'bfloat16')}, eager, prefix caching off, one request at a time; "
        "TTFT and decode from vLLM's engine-core request timestamps. `bound` is the FLOP-model ratio "
        "(linear layers + attention over the keys each layer's mask lets a query see); `of bound` = "
        "measured ratio / bound.",
        "",
    ]
    for m in models:
        lines += [f"## {m['name']}", "", f"Shape: {m['shape']}", ""]
        base = m["results"][0]
        lengths = sorted(int(n) for n in base["ttft_s"])
        header = "| configuration | " + " | ".join(f"TTFT {n} (s)" for n in lengths) + " | decode tok/s |"
        lines += [header, "|---" * (len(lengths) + 2) + "|"]
        for r in m["results"]:
            cells = [f"{r['ttft_s'][n]:.2f}" for n in lengths]
            lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | {r['decode_tok_s']:.1f} |")
        lines += ["", "Speed-up over CPU_ATTN (measured / FLOP bound / of bound):", "",
                  "| configuration | " + " | ".join(f"{n}" for n in lengths) + " | decode |",
                  "|---" * (len(lengths) + 2) + "|"]
        for r in m["results"][1:]:
            cells = []
            for n in lengths:
                ratio = base["ttft_s"][n] / r["ttft_s"][n]
                bound = m["bounds"][r["config"]][str(n)]
                cells.append(f"{ratio:.2f} / {bound:.2f} / {ratio / bound:.2f}")
            d = r["decode_tok_s"] / base["decode_tok_s"]
            cells.append(f"{d:.2f} / 1.00 / {d:.2f}")
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
        lines += ["", "Prefill throughput (tokens/s):", "",
                  "| configuration | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for r in m["results"]:
            lines.append(f"| {r['config']} | " + " | ".join(f"{n / r['ttft_s'][n]:.0f}" for n in lengths) + " |")
        lines.append("")
    lines += ["## Targets (issue 5)", ""] + [f"- {t}" for t in targets] + [""]
    return "\n".join(lines)


def check_targets(model: dict) -> list[str]:
    """The issue's targets on one model's results, as readable lines."""
    base, *rest = model["results"]
    by_name = {r["config"]: r for r in rest}
    lengths = sorted(int(n) for n in base["ttft_s"])
    longest = lengths[-1]
    out = []
    for name in list(by_name)[1:]:
        r = by_name[name]
        ratio = base["ttft_s"][longest] / r["ttft_s"][longest]
        bound = model["bounds"][name][str(longest)]
        verdict = "met" if ratio >= 0.8 * bound else f"missed by {0.8 * bound - ratio:.2f}"
        out.append(f"{model['name']}, {name}, {longest} tokens: CPU_ATTN/swaa = {ratio:.2f}, "
                   f"bound {bound:.2f}, {ratio / bound:.2f} of bound (target >= 0.80): {verdict}")
    none = by_name["swaa, no swaa_config"]
    worst = max(none["ttft_s"][n] / base["ttft_s"][n] for n in lengths)
    out.append(f"{model['name']}, swaa without swaa_config: worst TTFT ratio swaa/CPU_ATTN = {worst:.2f} "
               f"(target <= 1.10): {'met' if worst <= 1.10 else 'missed'}")
    for name, r in by_name.items():
        d = r["decode_tok_s"] / base["decode_tok_s"]
        out.append(f"{model['name']}, {name}: decode {d:.2f} x CPU_ATTN (target >= 0.90): "
                   f"{'met' if d >= 0.9 else 'missed'}")
    return out


def plot(models: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for r in m["results"]:
            lengths = sorted(int(n) for n in r["ttft_s"])
            ax.plot(lengths, [r["ttft_s"][n] for n in lengths], marker="o", label=r["config"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (s)")
        ax.set_title(m["name"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--large-lengths", type=int, nargs="+", default=[2048, 4096, 8192],
                        help="prompt lengths for the larger random-weight model")
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["bundled", "large"], choices=["bundled", "large"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 with native bf16 (AVX-512 BF16 / AMX), else float32")
    args = parser.parse_args()
    from swaa_vllm.platforms.cpu_features import benchmark_dtype

    dtype = benchmark_dtype() if args.dtype == "auto" else args.dtype

    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # the bundled model was trained to 8k
    from swaa_vllm.models.bundled import prepare_model

    bundled = prepare_model()
    env = {**environment(), "dtype": dtype}
    models = []
    for which in args.models:
        if which == "bundled":
            path, name, load_format, lengths = bundled, "SmolLM2-135M-Instruct (bundled)", "auto", args.lengths
        else:
            path = larger_model_dir(bundled, Path.home() / ".cache" / "swaa-vllm" / "llama-360m-random")
            name, load_format, lengths = "Llama, SmolLM2-360M shape, random weights", "dummy", args.large_lengths
        cfg = json.loads((Path(path) / "config.json").read_text())
        shape = Shape.from_config(cfg)
        print(f"{name}: {shape}", flush=True)
        results, bounds = [], {}
        base_config = None
        for config in configs(shape.layers):
            results.append(asdict(measure(str(path), config, lengths, args.decode_context, args.decode_tokens,
                                          load_format, seed=1, dtype=dtype)))
            if base_config is None:
                base_config = config
            else:
                bounds[config.name] = {str(n): prefill_flops(shape, base_config, n) / prefill_flops(shape, config, n)
                                       for n in lengths}
        models.append({"name": name, "shape": asdict(shape), "results": results, "bounds": bounds})
    # JSON keys are strings; normalise ttft keys to int for the report.
    for m in models:
        for r in m["results"]:
            r["ttft_s"] = {int(k): v for k, v in r["ttft_s"].items()}
    targets = [line for m in models for line in check_targets(m)]
    write_results(args.out, "cpu_e2e", {"environment": env, "models": models}, report(models, env, targets),
                  lambda path: plot(models, path))


def write_results(out_dir: Path, stem: str, data: dict, text: str, plot_to) -> None:
    """``<stem>.json`` (``data``), ``<stem>.md`` (``text``) and ``<stem>.png`` (``plot_to(path)``); prints the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (out_dir / f"{stem}.md").write_text(text)
    plot_to(out_dir / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
