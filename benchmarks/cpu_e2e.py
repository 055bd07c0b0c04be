"""End-to-end CPU benchmark: prefill (TTFT) and decode speed of SWAA against vLLM's CPU_ATTN.

For each model (the bundled SmolLM2-135M-Instruct, and a random-weight larger model of
the same Llama architecture) and each configuration

* ``CPU_ATTN``: vLLM's own CPU backend (the baseline);
* ``swaa, no swaa_config``: the backend with full attention everywhere;
* ``swaa, all sliding``: W=1024, k=64, full-attention decode, every layer sliding;
* ``swaa, every other layer full``: the same with the odd layers full,

one engine is started (bf16 on CPUs with native bf16, else float32, see
:mod:`swaa_vllm.platforms.cpu_features`; eager, vLLM's default chunked-prefill budget, prefix
caching on so that the decode prompts are prefilled once). All four engines stay up together and
are measured in interleaved rounds (``--rounds``, default 5; within a round each measurement runs
on every engine back to back before the next measurement, in an order that rotates each round, and
every configuration gets the same prompts in a round), so drift of the machine (measured on
these VMs: up to 1.4x over an hour, ``benchmarks/results/serve_bench.md``) cancels in the paired
per-round ratios. Per round, on random-token prompts:

* time to first token (TTFT) and prefill throughput at each prompt length (default 2k, 4k, 8k,
  16k tokens, a new prompt each; ``max_tokens=1``; lengths >= ``--repeat-below`` in round 0 only);
* one single-request decode window: ``--decode-tokens`` (128) tokens after an 8k-token prompt;
* one batched decode window: ``--batch`` (16) requests of ``--batch-context`` (2048) prompt tokens
  decoding together, timed over the first 128 engine steps in which all of them decode.

Times come from vLLM's own engine-core timestamps (``RequestOutput.metrics``: ``scheduled_ts``,
``first_token_ts``, ``last_token_ts``), i.e. what ``vllm bench latency`` reports minus
tokenization. Reported: medians over rounds, and ratios as medians of the per-round paired
ratios with their range.

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
import statistics
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


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


@dataclass
class Measured:
    """One configuration's results: medians over rounds, and every round's value (same order as rounds).

    ``ttft_s[n]``: median TTFT (s) at ``n`` prompt tokens; ``decode_tok_s``: median single-request decode
    tokens/s over 128-token windows; ``batch_decode_tok_s``: median tokens/s of ``batch`` requests decoding
    together. The ``*_rounds`` / ``*_windows`` lists hold each round's value, for paired ratios.
    """

    config: str
    ttft_s: dict[int, float] = field(default_factory=dict)
    decode_tok_s: float = 0.0
    batch_decode_tok_s: float = 0.0
    ttft_rounds: dict[int, list[float]] = field(default_factory=dict)
    decode_windows: list[float] = field(default_factory=list)
    batch_decode_windows: list[float] = field(default_factory=list)

    def finish(self) -> Measured:
        """Fill the medians from the per-round lists."""
        self.ttft_s = {n: statistics.median(v) for n, v in self.ttft_rounds.items()}
        self.decode_tok_s = statistics.median(self.decode_windows)
        self.batch_decode_tok_s = statistics.median(self.batch_decode_windows)
        return self


def _params(max_tokens: int, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False, **kwargs)


def _timed(llm, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """``(TTFT s, decode tok/s)`` of one request, from vLLM's engine-core request timestamps."""
    from vllm import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], _params(max_tokens), use_tqdm=False)[0]
    m = out.metrics
    if m is None or not m.first_token_ts:
        raise RuntimeError("vLLM returned no request metrics; the benchmark needs disable_log_stats=False")
    ttft = m.first_token_ts - m.scheduled_ts
    decode = (len(out.outputs[0].token_ids) - 1) / (m.last_token_ts - m.first_token_ts) if max_tokens > 1 else 0.0
    return ttft, decode


def batch_window(steps: list[tuple[float, int, int]], batch: int, tokens: int) -> float:
    """Tokens/s of the first ``tokens`` engine steps in which all ``batch`` requests decode together.

    Args:
        steps: per engine step, in order, ``(engine-core timestamp s, requests that got a token in the
            step, requests that have had their first token by then)``.
        batch: requests in the batch.
        tokens: steps in the window (each gives ``batch`` tokens).

    Returns:
        ``batch * tokens / (t[s0 + tokens] - t[s0])``, where ``s0`` is the step that gave the last
        request its first token; the ``tokens`` steps after it must each give ``batch`` tokens.

    Raises:
        RuntimeError: if there are not that many such steps (yet, or at all: a request finished, was
            preempted or aborted).
    """
    s0 = next((i for i, (_, _, started) in enumerate(steps) if started >= batch), None)
    if s0 is None:
        raise RuntimeError(f"not all {batch} requests got a first token")
    window = steps[s0 + 1 : s0 + 1 + tokens]
    if len(window) < tokens or any(count != batch for _, count, _ in window):
        raise RuntimeError(f"fewer than {tokens} steps with all {batch} requests decoding after step {s0}")
    return batch * tokens / (window[-1][0] - steps[s0][0])


def _batch_decode(llm, prompts: list[list[int]], tokens: int) -> float:
    """Decode tokens/s of ``prompts`` decoding together (:func:`batch_window`), stepping vLLM's engine.

    Each request may generate ``tokens`` + 64 tokens; the rest are aborted once the window is complete.
    """
    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = _params(tokens + 64, output_kind=RequestOutputKind.DELTA)
    ids = [f"batch-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=p), params)
    steps: list[tuple[float, int, int]] = []
    started: set[str] = set()
    try:
        while engine.has_unfinished_requests():
            outs = [o for o in engine.step() if o.outputs and o.outputs[0].token_ids]
            if not outs:
                continue
            started.update(o.request_id for o in outs)
            steps.append((max(o.metrics.last_token_ts for o in outs), len(outs), len(started)))
            if len(started) == len(prompts) and steps[-1][1] == len(prompts):
                with contextlib.suppress(RuntimeError):
                    return batch_window(steps, len(prompts), tokens)
        return batch_window(steps, len(prompts), tokens)
    finally:
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()


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


def kv_cache_tokens(lengths: list[int], decode_context: int, decode_tokens: int, batch: int,
                    batch_context: int, block: int = 128) -> int:
    """KV cache tokens an engine needs so that no measurement evicts the cached decode prompts.

    A round's new prompts (every TTFT length), the single-request decode prompt and the ``batch``
    decode prompts, each with its generated tokens and one block of rounding.
    """
    batch_need = batch * (batch_context + decode_tokens + 64 + block)
    return batch_need + decode_context + decode_tokens + block + sum(n + block for n in lengths) + 4 * block


def measure_all(model: str, shape: Shape, config_list: list[Config], lengths: list[int], args,
                load_format: str, dtype: str) -> list[Measured]:
    """Every configuration's engine at once, measured in interleaved rounds (paired, drift-robust).

    Round ``r`` measures, each on every configuration back to back in the order of
    :func:`round_order` before the next measurement: TTFT at each length of ``lengths`` (lengths >=
    ``args.repeat_below`` only in round 0), the same fresh random prompt for every configuration; one
    single-request decode window (``args.decode_tokens`` tokens after the
    ``args.decode_context``-token prompt, prefix-cached after the warm-up); one batched window
    (``args.batch`` prompts of ``args.batch_context`` tokens, cached, decoding together).
    """
    import numpy as np

    kv_tokens = kv_cache_tokens(lengths, args.decode_context, args.decode_tokens, args.batch, args.batch_context)
    kv_bytes = kv_tokens * shape.kv_bytes_per_token(dtype)
    weights = (shape.linear_flops_per_token() / 2 + shape.vocab * shape.hidden) * (4 if dtype == "float32" else 2)
    check_memory(len(config_list), kv_bytes + int(weights))
    max_len = max(lengths + [args.decode_context + args.decode_tokens, args.batch_context + args.decode_tokens + 64])
    base_kwargs = dict(
        dtype=dtype, enforce_eager=True, max_model_len=max_len + 16, kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=True, disable_log_stats=False, skip_tokenizer_init=True, load_format=load_format,
        seed=0,
    )
    rng = np.random.default_rng(1)

    def prompt(n: int) -> list[int]:
        return rng.integers(100, shape.vocab - 100, size=n).tolist()

    decode_prompt = prompt(args.decode_context)
    batch_prompts = [prompt(args.batch_context) for _ in range(args.batch)]
    results = [Measured(c.name) for c in config_list]
    with contextlib.ExitStack() as stack:
        llms = []
        for c in config_list:
            kwargs = dict(base_kwargs, attention_backend=c.backend)
            if c.swaa_config is not None:
                kwargs["hf_overrides"] = {"swaa_config": c.swaa_config}
            llms.append(stack.enter_context(engine(model, **kwargs)))
        for llm in llms:  # warm-up; fills the prefix cache with the decode prompts
            _timed(llm, prompt(512), 4)
            _timed(llm, decode_prompt, 2)
            _batch_decode(llm, batch_prompts, 4)
        for r in range(args.rounds):
            round_lengths = [n for n in lengths if r == 0 or n < args.repeat_below]
            round_prompts = {n: prompt(n) for n in round_lengths}
            # Measurement-major: each measurement runs on every engine back to back before the next one, so
            # the pairs a ratio compares are seconds apart (this VM's speed drifts over tens of seconds).
            for what in [*round_lengths, "decode", "batch"]:
                for i in round_order(len(llms), r):
                    llm, res = llms[i], results[i]
                    if what == "decode":
                        _, value = _timed(llm, decode_prompt, args.decode_tokens + 1)
                        res.decode_windows.append(value)
                    elif what == "batch":
                        value = _batch_decode(llm, batch_prompts, args.decode_tokens)
                        res.batch_decode_windows.append(value)
                    else:
                        value, _ = _timed(llm, round_prompts[what], 1)
                        res.ttft_rounds.setdefault(what, []).append(value)
                    time.sleep(0.5)  # let this engine's threads go idle before the next one runs
            for res in results:
                ttfts = ", ".join(f"{n}: {res.ttft_rounds[n][-1]:.2f} s" for n in round_lengths)
                print(f"  round {r} {res.config}: TTFT {ttfts}; decode {res.decode_windows[-1]:.1f} tok/s, "
                      f"{args.batch} together {res.batch_decode_windows[-1]:.1f} tok/s", flush=True)
    return [res.finish() for res in results]


def round_order(engines: int, r: int) -> list[int]:
    """Engine order of round ``r``: ``0 .. engines - 1`` rotated by ``r // 2``, reversed in odd rounds (over
    ``2 * engines`` rounds each engine leads twice).

    A rotation alone keeps the cyclic order, so every engine would always run right after the same neighbour
    (engine 1 after engine 0, CPU_ATTN, in every measurement of every round): a neighbour that leaves the
    machine slower for a moment (its threads still spinning, the caches full of its weights) would bias one
    pair of ratios. Reversing odd rounds gives each engine both neighbours as its predecessor.
    """
    shift = (r // 2) % engines
    order = list(range(shift, engines)) + list(range(shift))
    return order[::-1] if r % 2 else order


def check_memory(engines: int, bytes_per_engine: int, overhead: int = 1 << 30) -> None:
    """Refuse to start when ``engines`` engines of ``bytes_per_engine`` (+ ``overhead``) exceed 90% of free memory.

    Raises:
        SystemExit: naming the need, the free memory and the options that shrink the need.
    """
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    need = engines * (bytes_per_engine + overhead)
    if need > 0.9 * available:
        raise SystemExit(f"cpu_e2e: {engines} engines need ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB "
                         "available; lower --batch or --batch-context, drop the longest --lengths, or run one "
                         "model at a time (--models bundled)")


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


def paired_ratio(base: list[float], other: list[float], faster_is_higher: bool) -> tuple[float, float, float]:
    """``(median, min, max)`` over rounds of the speed-up of ``other`` over ``base``, round by round.

    The lists hold one value per round, in round order (the same prompts in a round). Speed-up is
    ``other / base`` for rates (``faster_is_higher``), ``base / other`` for times.

    Raises:
        ValueError: if the lists differ in length or are empty.
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired ratio needs equal, non-empty lists (got {len(base)} and {len(other)})")
    ratios = [(o / b) if faster_is_higher else (b / o) for b, o in zip(base, other, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _ratios(base: dict, r: dict) -> dict:
    """Paired speed-ups of result ``r`` over ``base``: TTFT per length, single and batched decode."""
    out = {f"ttft_{n}": paired_ratio(base["ttft_rounds"][n], r["ttft_rounds"][n], False) for n in base["ttft_rounds"]}
    out["decode"] = paired_ratio(base["decode_windows"], r["decode_windows"], True)
    out["batch_decode"] = paired_ratio(base["batch_decode_windows"], r["batch_decode_windows"], True)
    return out


def report(models: list[dict], env: dict, targets: list[str]) -> str:
    rounds = env.get("rounds", 1)
    batch = env.get("batch", 16)
    lines = [
        "# CPU end-to-end benchmark: SWAA against vLLM's CPU_ATTN",
        "",
        f"`{env['command']}` on {env['date']}: {env['cpu']}, {env.get('isa', 'ISA not recorded')}, "
        f"{env['cores']} cores, Python {env['python']}, torch {env['torch']}, vLLM {env['vllm']}. "
        f"{env.get('dtype', 'bfloat16')}, eager, prefix caching on (the decode prompts are cached; every TTFT "
        "prompt is new). TTFT and decode from vLLM's engine-core timestamps. Every configuration's engine runs "
        f"in one process group at once, measured in {rounds} interleaved rounds (each measurement on every "
        "engine back to back, so paired values are seconds apart; order rotated every second round and reversed "
        "in odd rounds, so no engine always follows the same one; the same "
        f"prompts for every configuration within a round); TTFT below {env.get('repeat_below', '-')} tokens and "
        "the decode windows are medians over the rounds, longer TTFTs one round. Ratios are medians of the "
        "per-round paired ratios [min-max]. Decode: "
        f"{env.get('decode_tokens', 128)}-token windows, one request at a {env.get('decode_context', 8192)}-token "
        f"context, and {batch} requests of {env.get('batch_context', 2048)} prompt tokens decoding together "
        "(tokens/s of the batch). `bound` is the FLOP-model ratio (linear layers + attention over the keys each "
        "layer's mask lets a query see); `of bound` = measured ratio / bound.",
        "",
    ]
    for m in models:
        lines += [f"## {m['name']}", "", f"Shape: {m['shape']}", ""]
        base = m["results"][0]
        lengths = sorted(int(n) for n in base["ttft_s"])
        header = ("| configuration | " + " | ".join(f"TTFT {n} (s)" for n in lengths)
                  + f" | decode tok/s | {batch} together tok/s |")
        lines += [header, "|---" * (len(lengths) + 3) + "|"]
        for r in m["results"]:
            cells = [f"{r['ttft_s'][n]:.2f}" for n in lengths]
            lines.append(f"| {r['config']} | " + " | ".join(cells)
                         + f" | {r['decode_tok_s']:.1f} | {r['batch_decode_tok_s']:.1f} |")
        lines += ["", "Speed-up over CPU_ATTN (paired median [min-max] / FLOP bound / of bound):", "",
                  "| configuration | " + " | ".join(f"{n}" for n in lengths) + f" | decode | {batch} together |",
                  "|---" * (len(lengths) + 3) + "|"]
        for r in m["results"][1:]:
            ratios = _ratios(base, r)
            cells = []
            for n in lengths:
                med, lo, hi = ratios[f"ttft_{n}"]
                bound = m["bounds"][r["config"]][str(n)]
                spread = f" [{lo:.2f}-{hi:.2f}]" if len(base["ttft_rounds"][n]) > 1 else ""
                cells.append(f"{med:.2f}{spread} / {bound:.2f} / {med / bound:.2f}")
            for key in ("decode", "batch_decode"):
                med, lo, hi = ratios[key]
                cells.append(f"{med:.2f} [{lo:.2f}-{hi:.2f}] / 1.00 / {med:.2f}")
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
        lines += ["", "Prefill throughput (tokens/s, from the median TTFT):", "",
                  "| configuration | " + " | ".join(f"{n}" for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for r in m["results"]:
            lines.append(f"| {r['config']} | " + " | ".join(f"{n / r['ttft_s'][n]:.0f}" for n in lengths) + " |")
        lines.append("")
    lines += ["## Targets (issues 5 and 16)", ""] + [f"- {t}" for t in targets] + [""]
    return "\n".join(lines)


def check_targets(model: dict) -> list[str]:
    """The issues' targets on one model's results, as readable lines.

    Issue 5: the sliding configurations reach >= 0.8 of the FLOP bound at the longest length; swaa
    without ``swaa_config`` is never more than 10% slower. Issue 16: decode (single and batched) >= 1.0x
    CPU_ATTN and TTFT at the shortest length >= 0.98x, as paired medians.
    """
    base, *rest = model["results"]
    by_name = {r["config"]: r for r in rest}
    lengths = sorted(int(n) for n in base["ttft_s"])
    shortest, longest = lengths[0], lengths[-1]
    out = []
    for name in list(by_name)[1:]:
        r = by_name[name]
        ratio = _ratios(base, r)[f"ttft_{longest}"][0]
        bound = model["bounds"][name][str(longest)]
        verdict = "met" if ratio >= 0.8 * bound else f"missed by {0.8 * bound - ratio:.2f}"
        out.append(f"{model['name']}, {name}, {longest} tokens: CPU_ATTN/swaa = {ratio:.2f}, "
                   f"bound {bound:.2f}, {ratio / bound:.2f} of bound (target >= 0.80): {verdict}")
    none = by_name["swaa, no swaa_config"]
    worst = 1 / min(_ratios(base, none)[f"ttft_{n}"][0] for n in lengths)
    out.append(f"{model['name']}, swaa without swaa_config: worst TTFT ratio swaa/CPU_ATTN = {worst:.2f} "
               f"(target <= 1.10): {'met' if worst <= 1.10 else 'missed'}")
    for name, r in by_name.items():
        ratios = _ratios(base, r)
        for key, what in (("decode", "decode"), ("batch_decode", "batched decode")):
            d = ratios[key][0]
            out.append(f"{model['name']}, {name}: {what} {d:.2f} x CPU_ATTN (target >= 1.00): "
                       f"{'met' if d >= 1.0 else 'missed'}")
        t = ratios[f"ttft_{shortest}"][0]
        out.append(f"{model['name']}, {name}: TTFT at {shortest} tokens {t:.2f} x CPU_ATTN (target >= 0.98): "
                   f"{'met' if t >= 0.98 else 'missed'}")
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
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode window")
    parser.add_argument("--batch", type=int, default=16, help="requests decoding together in a batched window")
    parser.add_argument("--batch-context", type=int, default=2048, help="prompt tokens of each batched request")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds: decode windows and short TTFTs are medians of this many")
    parser.add_argument("--repeat-below", type=int, default=8192,
                        help="TTFT lengths below this are measured every round, longer ones in round 0 only")
    parser.add_argument("--models", nargs="+", default=["bundled", "large"], choices=["bundled", "large"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 with native bf16 (AVX-512 BF16 / AMX), else float32")
    args = parser.parse_args()
    from swaa_vllm.platforms.cpu_features import benchmark_dtype

    dtype = benchmark_dtype() if args.dtype == "auto" else args.dtype

    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # the bundled model was trained to 8k
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:  # vLLM's CPU platform lets it win
        print("note: VLLM_CPU_KVCACHE_SPACE ignored (each engine's KV cache is sized to the measurements)")
    from swaa_vllm.models.bundled import prepare_model

    bundled = prepare_model()
    env = {**environment(), "dtype": dtype, "rounds": args.rounds, "repeat_below": args.repeat_below,
           "decode_context": args.decode_context, "decode_tokens": args.decode_tokens, "batch": args.batch,
           "batch_context": args.batch_context}
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
        config_list = configs(shape.layers)
        results = [asdict(m) for m in measure_all(str(path), shape, config_list, lengths, args, load_format, dtype)]
        bounds = {c.name: {str(n): prefill_flops(shape, config_list[0], n) / prefill_flops(shape, c, n)
                           for n in lengths} for c in config_list[1:]}
        models.append({"name": name, "shape": asdict(shape), "results": results, "bounds": bounds})
    # JSON keys are strings; normalise ttft keys to int for the report.
    for m in models:
        for r in m["results"]:
            r["ttft_s"] = {int(k): v for k, v in r["ttft_s"].items()}
            r["ttft_rounds"] = {int(k): v for k, v in r["ttft_rounds"].items()}
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
