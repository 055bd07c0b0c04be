"""Serving benchmark: ``vllm serve`` measured by ``vllm bench serve`` under concurrency, SWAA against CPU_ATTN.

For each configuration of ``benchmarks/cpu_e2e.py`` (vLLM's ``CPU_ATTN``; the swaa backend
without ``swaa_config``; W=1024, k=64, FA decode with every layer sliding; the same with every
other layer full) this script starts ``vllm serve`` on the bundled model on a loopback port
(eager, prefix caching off, vLLM's default chunked-prefill budget, a KV cache that holds the
largest concurrency), sends one short warm-up request, and runs vLLM's own client,

    vllm bench serve --backend vllm --dataset-name random --random-input-len N
        --random-output-len O --random-range-ratio 0 --ignore-eos --num-prompts P
        --max-concurrency C --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99
        --save-result ...

at each prompt length N (default 2048 and 8192 tokens), O output tokens (default 64) and each
max concurrency C (default 1, 4, 16), then stops the server. P is bounded so the whole run fits
in an hour on 2 cores (see :func:`prompt_count`: one full wave of C requests, more at C=1 and
short prompts).

Under concurrency vLLM's scheduler puts prefill chunks of new requests and decode rows of running
ones into the same step, so this measures a different cost mix from the one-request TTFT of
``cpu_e2e.py``. Every ratio against CPU_ATTN stands next to its FLOP-model bound
(:mod:`swaa_vllm.evaluation.costs`): TTFT against the prefill bound at N; request and output
throughput against the bound for the whole workload (prefill of N plus O - 1 decode steps at
contexts N .. N + O - 2); inter-token latency (ITL) against the decode bound, 1.00 (every
configuration decodes with full attention) at C=1 and up to the workload bound when other
requests' prefill chunks share the steps.

The dtype is chosen per machine (:func:`swaa_vllm.platforms.cpu_features.benchmark_dtype`:
bfloat16 with native bf16, float32 where bf16 would be emulated) and recorded with the CPU model,
its vector ISA, the core count and the versions. At the end the baseline repeats its concurrency-1 runs
(``--no-drift-check`` skips it): a 2-core VM's speed can change during the hour, and the report then warns
and shows paired ratios. vLLM's JSON of each run is kept in
``--raw-dir``; the summary goes to ``benchmarks/results/serve_bench.{md,json,png}``.

Run: ``make bench-serve`` (or ``.venv/bin/python benchmarks/serve_bench.py --help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_e2e import Config, configs, environment, write_results  # noqa: E402  (benchmarks/ is not a package)

from swaa_vllm.evaluation.costs import ModelShape, decode_flops, prefill_flops, prompt_masks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SERVED_NAME = "bench"
#: Fields of vLLM's saved result (``vllm/benchmarks/serve.py``) this report reads.
RESULT_FIELDS = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "median_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
    "median_itl_ms", "p50_itl_ms", "p99_itl_ms", "mean_itl_ms", "median_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
    "median_e2el_ms", "p99_e2el_ms", "max_concurrent_requests",
)


# ---------------------------------------------------------------------------
# The workload and its FLOP model.
# ---------------------------------------------------------------------------


def prompt_count(length: int, concurrency: int) -> int:
    """Prompts per run: one full wave of ``concurrency`` requests (fewer would never reach it); at
    concurrency 1, 2 prompts of up to 2k tokens and 1 longer one (smaller counts before shorter prompts)."""
    if concurrency > 1:
        return concurrency
    return 2 if length <= 2048 else 1


def default_max_run_tokens(native_bf16: bool) -> int:
    """The default ``--max-run-tokens``: the whole default grid (8192 tokens x 16 prompts = 131072) when the
    run is in bf16 and bf16 is native (AVX-512 BF16 / AMX; see benchmarks/results/serve_bench.md for the
    wall time), 65536 elsewhere (float32 on 2 AVX2 cores: the grid without that run took 54 min)."""
    return 131072 if native_bf16 else 65536


def planned_runs(lengths: list[int], concurrencies: list[int], max_run_tokens: int) -> tuple[list, list]:
    """``(runs, skipped)``: the ``(length, concurrency, prompts)`` of each run, in order, and those left out
    because their prompt tokens (``prompts * length``) exceed ``max_run_tokens`` (the time budget: on 2 AVX2
    cores a full-attention server prefills ~100-150 tokens/s at 8k, so 16 prompts of 8k take ~20 min per
    configuration)."""
    runs, skipped = [], []
    for length in lengths:
        for c in concurrencies:
            n = prompt_count(length, c)
            (runs if n * length <= max_run_tokens else skipped).append((length, c, n))
    return runs, skipped


def request_flops(shape: ModelShape, swaa_config: dict | None, length: int, output_tokens: int) -> float:
    """FLOPs of one request: prefill of ``length`` tokens (its last row gives the first output token),
    then ``output_tokens - 1`` decode steps at contexts ``length .. length + output_tokens - 2``."""
    masks = prompt_masks(swaa_config, shape.layers)
    decode = sum(decode_flops(shape, length + t) for t in range(output_tokens - 1))
    return prefill_flops(shape, masks, length) + decode


def bounds(shape: ModelShape, base: Config, config: Config, length: int, output_tokens: int) -> dict[str, float]:
    """FLOP-model ratios ``base / config``: ``prefill`` (for TTFT) and ``workload`` (for throughput)."""
    full, plan = prompt_masks(base.swaa_config, shape.layers), prompt_masks(config.swaa_config, shape.layers)
    return {
        "prefill": prefill_flops(shape, full, length) / prefill_flops(shape, plan, length),
        "workload": request_flops(shape, base.swaa_config, length, output_tokens)
        / request_flops(shape, config.swaa_config, length, output_tokens),
    }


def kv_cache_gib(shape: ModelShape, dtype: str, max_concurrency: int, max_tokens: int) -> int:
    """GiB of KV cache that hold ``max_concurrency`` requests of ``max_tokens`` tokens (10% spare, rounded up):
    ``layers * kv_heads * head_dim * 2 (K and V) * bytes per element`` per token."""
    per_token = shape.kv_bytes_per_token(dtype)
    return max(1, math.ceil(1.1 * max_concurrency * max_tokens * per_token / (1 << 30)))


# ---------------------------------------------------------------------------
# Servers and vLLM's client.
# ---------------------------------------------------------------------------


def serve_command(model_dir: Path, config: Config, port: int, dtype: str, max_model_len: int) -> list[str]:
    """The ``vllm serve`` command line of one configuration."""
    cmd = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir), "--served-model-name", SERVED_NAME,
        "--attention-backend", config.backend, "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--enforce-eager", "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port),
    ]
    if config.swaa_config is not None:
        cmd += ["--hf-overrides", json.dumps({"swaa_config": config.swaa_config})]
    return cmd


def bench_args(model_dir: Path, port: int, length: int, output_tokens: int, num_prompts: int,
               concurrency: int, result_dir: Path, result_name: str, seed: int) -> list[str]:
    """The arguments of ``vllm bench serve`` for one run (random dataset, fixed lengths, saved result)."""
    return [
        "--backend", "vllm",
        "--base-url", f"http://127.0.0.1:{port}", "--model", SERVED_NAME, "--tokenizer", str(model_dir),
        "--dataset-name", "random", "--random-input-len", str(length), "--random-output-len", str(output_tokens),
        "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--request-rate", "inf", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", result_name, "--disable-tqdm",
    ]


def run_vllm_bench(args: list[str], log: Path) -> dict:
    """``vllm bench serve ARGS`` in this process (what the console script runs: vLLM's
    ``vllm.benchmarks.serve.add_cli_args`` and ``main``; in-process saves the ~15 s of imports a
    subprocess costs per run); its printout goes to ``log``. Returns vLLM's result dict."""
    import contextlib

    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    parsed = parser.parse_args(args)
    with log.open("w") as f, contextlib.redirect_stdout(f):
        return bench_main(parsed)


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 900) -> float:
    import requests

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not healthy after {timeout_s:.0f} s; log {log}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Run:
    """One ``vllm bench serve`` run: the workload, vLLM's numbers (:data:`RESULT_FIELDS`) and the wall time."""

    config: str
    length: int
    concurrency: int
    num_prompts: int
    output_tokens: int
    wall_s: float
    result: dict


def serve_and_bench(model_dir: Path, config: Config, shape: ModelShape, dtype: str, plan: list[tuple[int, int, int]],
                    output_tokens: int, raw_dir: Path, seed: int) -> tuple[list[Run], dict]:
    """Start one server for ``config``, run each ``(length, concurrency, prompts)`` of ``plan``, stop it; the runs
    and start-up facts."""
    from vllm.utils.network_utils import get_open_port

    lengths = [length for length, _, _ in plan]
    slug = config.name.split(" (")[0].replace(", ", "-").replace(" ", "-").lower()
    port = get_open_port()
    max_model_len = max(lengths) + output_tokens + 16
    # The largest run's requests all fit at once (prompt + output tokens each).
    c_max, tokens = max(((c, length + output_tokens) for length, c, _ in plan), key=lambda ct: ct[0] * ct[1])
    kv_gib = kv_cache_gib(shape, dtype, c_max, tokens)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    log = raw_dir / f"{slug}.server.log"
    cmd = serve_command(model_dir, config, port, dtype, max_model_len)
    print(f"[{config.name}] {' '.join(cmd)}  (VLLM_CPU_KVCACHE_SPACE={kv_gib})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    runs = []
    try:
        startup_s = _wait_healthy(proc, port, log)
        import requests

        warm = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600, json={
            "model": SERVED_NAME, "prompt": [100 + i % 1000 for i in range(min(512, max_model_len - 24))],
            "max_tokens": 8})
        warm.raise_for_status()
        for length, c, n in plan:
            name = f"{slug}_{length}_c{c}.json"
            started = time.monotonic()
            run_vllm_bench(bench_args(model_dir, port, length, output_tokens, n, c, raw_dir, name, seed),
                           raw_dir / name.replace(".json", ".log"))
            wall = time.monotonic() - started
            raw = json.loads((raw_dir / name).read_text())
            missing = [f for f in RESULT_FIELDS if f not in raw]
            if missing:
                raise RuntimeError(f"vLLM's result {raw_dir / name} lacks {missing}: vllm bench serve changed")
            if raw["failed"] or raw["completed"] != n:
                raise RuntimeError(f"{name}: {raw['failed']} of {n} requests failed; see {log}")
            run = Run(config.name, length, c, n, output_tokens, wall, {f: raw[f] for f in RESULT_FIELDS})
            runs.append(run)
            r = run.result
            print(f"[{config.name}] {length} tokens, concurrency {c}, {n} prompts: {r['request_throughput']:.3f} "
                  f"req/s, {r['output_throughput']:.1f} out tok/s, TTFT p50 {r['p50_ttft_ms'] / 1e3:.2f} s, "
                  f"ITL p50 {r['p50_itl_ms']:.0f} ms ({wall:.0f} s)", flush=True)
    finally:
        _stop(proc)
    return runs, {"startup_s": startup_s, "kv_cache_gib": kv_gib, "command": cmd}


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def ratios(base: dict, other: dict) -> dict[str, float]:
    """``other`` against ``base`` (two :data:`RESULT_FIELDS` dicts), each > 1 when ``other`` is better:
    throughputs ``other / base``, latencies ``base / other``."""
    return {
        "request_throughput": other["request_throughput"] / base["request_throughput"],
        "output_throughput": other["output_throughput"] / base["output_throughput"],
        "ttft_p50": base["p50_ttft_ms"] / other["p50_ttft_ms"],
        "ttft_p99": base["p99_ttft_ms"] / other["p99_ttft_ms"],
        "itl_p50": base["p50_itl_ms"] / other["p50_itl_ms"],
        "itl_p99": base["p99_itl_ms"] / other["p99_itl_ms"],
    }


def report(data: dict) -> str:
    """The markdown report of :func:`main`'s ``data`` (environment, runs, bounds)."""
    env, runs = data["environment"], data["runs"]
    names = list(dict.fromkeys(r["config"] for r in runs))
    base_name = names[0]
    by_key = {(r["config"], r["length"], r["concurrency"]): r for r in runs}
    lines = [
        "# Serving benchmark: `vllm bench serve` against `vllm serve`, SWAA against CPU_ATTN",
        "",
        f"`{env['command']}` on {env['date']}: {env['cpu']}, {env['isa']}, {env['cores']} cores, dtype "
        f"{env['dtype']} ({env['dtype_reason']}), Python {env['python']}, torch {env['torch']}, vLLM {env['vllm']}. "
        f"vLLM's CPU worker runs on {max(1, env['cores'] - 1)} of the {env['cores']} cores (vLLM reserves one for "
        f"its engine process; `VLLM_CPU_NUM_OF_RESERVED_CPU`). Bundled model, eager, prefix caching off, "
        f"vLLM's default chunked-prefill budget; random-token prompts of "
        f"exactly N tokens, {data['output_tokens']} output tokens (`--ignore-eos`), all requests sent at once "
        f"(`--request-rate inf`) and at most C in flight (`--max-concurrency`). "
        f"Whole run: {data['wall_s'] / 60:.1f} min.",
        "",
        "Ratios are against CPU_ATTN, > 1 is better (throughput: swaa / CPU_ATTN; latency: CPU_ATTN / swaa), "
        "each with its FLOP-model bound in brackets: TTFT the prefill bound at N, throughput the whole request "
        "(prefill + decode), ITL 1.00 (all configurations decode with full attention; under concurrency other "
        "requests' prefill chunks share the steps, so ITL can improve up to the workload bound).",
        "",
    ]
    for length in sorted({r["length"] for r in runs}):
        for c in sorted({r["concurrency"] for r in runs}):
            base = by_key.get((base_name, length, c))
            if base is None:
                continue
            b = data["bounds"]
            lines += [f"## {length} prompt tokens, max concurrency {c} ({base['num_prompts']} prompts)", "",
                      "| configuration | req/s | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | req/s ratio "
                      "(bound) | TTFT p50 ratio (bound) | ITL p50 ratio |",
                      "|---|---|---|---|---|---|---|---|"]
            for name in names:
                run = by_key.get((name, length, c))
                if run is None:
                    continue
                r = run["result"]
                cells = [f"{r['request_throughput']:.3f}", f"{r['output_throughput']:.1f}",
                         f"{r['p50_ttft_ms'] / 1e3:.2f} / {r['p99_ttft_ms'] / 1e3:.2f}",
                         f"{r['p50_itl_ms']:.0f} / {r['p99_itl_ms']:.0f}"]
                if name == base_name:
                    cells += ["1.00", "1.00", "1.00"]
                else:
                    q = ratios(base["result"], r)
                    bound = b[name][str(length)]
                    cells += [f"{q['request_throughput']:.2f} ({bound['workload']:.2f})",
                              f"{q['ttft_p50']:.2f} ({bound['prefill']:.2f})", f"{q['itl_p50']:.2f}"]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += drift_section(data)
    if data.get("skipped"):
        left = ", ".join(f"{s['length']} tokens x concurrency {s['concurrency']} ({s['num_prompts']} prompts)"
                         for s in data["skipped"])
        lines += [f"Left out (more than `--max-run-tokens {data['max_run_tokens']}` prompt tokens per run, the time "
                  f"budget): {left}.", ""]
    lines += ["## Servers", "", "| configuration | start-up to /health (s) | KV cache (GiB) |", "|---|---|---|"]
    for name in names:
        s = data["servers"][name]
        lines.append(f"| {name} | {s['startup_s']:.0f} | {s['kv_cache_gib']} |")
    lines.append("")
    return "\n".join(lines)


def drift_section(data: dict) -> list[str]:
    """Markdown of the drift check (``data["drift_check"]``): each repeated run against the same run of the main
    pass, and each non-baseline repeat against the baseline repeated next to it."""
    check = data.get("drift_check")
    if not check:
        return []
    base_name = data["runs"][0]["config"]
    main = {(r["config"], r["length"], r["concurrency"]): r["result"] for r in data["runs"]}
    again = {(r["config"], r["length"], r["concurrency"]): r["result"] for r in check["runs"]}
    lines = ["## Drift check", "",
             "The machine's speed can change during a run (a 2-core VM with neighbours). After the main pass the "
             "baseline (and, where listed, other configurations) ran again at concurrency 1, back to back. "
             "`repeat / main` > 1 means the repeat was faster; paired ratios compare runs made minutes apart.", "",
             "| configuration | prompt tokens | TTFT p50 main / repeat (s) | TTFT repeat / main speed | "
             "ITL p50 main / repeat (ms) | paired TTFT ratio vs CPU_ATTN (bound) | paired ITL ratio |",
             "|---|---|---|---|---|---|---|"]
    for (name, length, c), r in again.items():
        m = main.get((name, length, c))
        speed = f"{m['p50_ttft_ms'] / r['p50_ttft_ms']:.2f}" if m else "-"
        main_ttft = f"{m['p50_ttft_ms'] / 1e3:.2f}" if m else "-"
        main_itl = f"{m['p50_itl_ms']:.0f}" if m else "-"
        paired, paired_itl = "-", "-"
        base = again.get((base_name, length, c))
        if name != base_name and base is not None:
            q = ratios(base, r)
            paired = f"{q['ttft_p50']:.2f} ({data['bounds'][name][str(length)]['prefill']:.2f})"
            paired_itl = f"{q['itl_p50']:.2f}"
        lines.append(f"| {name} | {length} | {main_ttft} / {r['p50_ttft_ms'] / 1e3:.2f} | {speed} | {main_itl} / "
                     f"{r['p50_itl_ms']:.0f} | {paired} | {paired_itl} |")
    speeds = [main[k]["p50_ttft_ms"] / r["p50_ttft_ms"] for k, r in again.items() if k[0] == base_name and k in main]
    worst = max(speeds, key=lambda x: abs(x - 1), default=1.0)
    if abs(worst - 1) > 0.05:
        lines += ["", f"**The baseline's repeat ran at {worst:.2f}x the speed of its main run: the machine changed "
                  "speed during the run, so the main tables' ratios of configurations measured far apart are off by "
                  "up to that factor; trust the paired ratios.**"]
    lines.append("")
    return lines


def plot(data: dict, path: Path) -> None:
    """Output throughput and TTFT p50 against concurrency, one column per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    lengths = sorted({r["length"] for r in runs})
    names = list(dict.fromkeys(r["config"] for r in runs))
    fig, axes = plt.subplots(2, len(lengths), figsize=(5.5 * len(lengths), 7), squeeze=False)
    for col, length in enumerate(lengths):
        for name in names:
            rs = sorted((r for r in runs if r["config"] == name and r["length"] == length),
                        key=lambda r: r["concurrency"])
            cs = [r["concurrency"] for r in rs]
            axes[0][col].plot(cs, [r["result"]["output_throughput"] for r in rs], marker="o", label=name)
            axes[1][col].plot(cs, [r["result"]["p50_ttft_ms"] / 1e3 for r in rs], marker="o", label=name)
        for row, label in ((0, "output tokens/s"), (1, "TTFT p50 (s)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency")
            ax.set_ylabel(label)
            ax.set_title(f"{length} prompt tokens, {data['output_tokens']} output", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"vllm bench serve, bundled model, {data['environment']['dtype']}, "
                 f"{data['environment']['cores']} cores ({data['environment']['isa']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                        help="prompt tokens (default 2048 8192)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="max concurrency (default 1 4 16)")
    parser.add_argument("--output-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 with native bf16 (AVX-512 BF16 / AMX), else float32")
    parser.add_argument("--configs", type=int, nargs="+", default=None,
                        help="indices of the configurations to run (default all; 0 = CPU_ATTN, always run first)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where serve_bench.{md,json,png} go")
    parser.add_argument("--raw-dir", type=Path, default=REPO / ".cache" / "serve_bench",
                        help="vLLM's JSON and log of each run, and the server logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-run-tokens", type=int, default=None,
                        help="leave out runs of more prompt tokens than this (prompts x length). Default: the "
                             "whole grid (131072) in bf16 on CPUs with native bf16 (38 min on 2 AVX-512 cores); "
                             "65536 elsewhere (float32 on AVX2 is ~4x slower: 8192 tokens x 16 prompts is left out "
                             "so that the run stays near an hour)")
    parser.add_argument("--no-drift-check", action="store_true",
                        help="skip the baseline's repeat of the concurrency-1 runs at the end (~4 min)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.lengths + args.concurrency) or args.output_tokens < 2:
        parser.error("--lengths and --concurrency must be >= 1, --output-tokens >= 2")

    from swaa_vllm.models.bundled import prepare_model
    from swaa_vllm.platforms.cpu_features import benchmark_dtype, has_native_bf16

    dtype = benchmark_dtype() if args.dtype == "auto" else args.dtype
    if args.max_run_tokens is None:
        args.max_run_tokens = default_max_run_tokens(dtype == "bfloat16" and has_native_bf16())
    reason = ("chosen: native bf16" if has_native_bf16() else "chosen: no native bf16 on this CPU") \
        if args.dtype == "auto" else "--dtype"
    model_dir = Path(prepare_model())
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    all_configs = configs(shape.layers)
    chosen = [all_configs[i] for i in sorted({0, *(args.configs or range(len(all_configs)))})]
    plan, skipped = planned_runs(args.lengths, args.concurrency, args.max_run_tokens)
    if not plan:
        parser.error("--max-run-tokens leaves no run; raise it")
    for length, c, n in skipped:
        print(f"left out: {length} tokens x concurrency {c} ({n} prompts, {n * length} tokens > --max-run-tokens "
              f"{args.max_run_tokens})", flush=True)
    (args.raw_dir / "drift").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs, servers = [], {}
    for config in chosen:
        config_runs, servers[config.name] = serve_and_bench(model_dir, config, shape, dtype, plan, args.output_tokens,
                                                            args.raw_dir, args.seed)
        runs += config_runs
    drift = None
    if not args.no_drift_check:
        repeat = [(length, c, n) for length, c, n in plan if c == 1]
        if repeat:
            drift_runs, _ = serve_and_bench(model_dir, chosen[0], shape, dtype, repeat, args.output_tokens,
                                            args.raw_dir / "drift", args.seed)
            drift = {"runs": [asdict(r) for r in drift_runs]}
    data = {
        "environment": {**environment(), "dtype": dtype, "dtype_reason": reason},
        "output_tokens": args.output_tokens,
        "wall_s": time.monotonic() - started,
        "configs": [asdict(c) for c in chosen],
        "bounds": {c.name: {str(n): bounds(shape, chosen[0], c, n, args.output_tokens) for n in args.lengths}
                   for c in chosen[1:]},
        "servers": servers,
        "max_run_tokens": args.max_run_tokens,
        "skipped": [{"length": n_, "concurrency": c, "num_prompts": p} for n_, c, p in skipped],
        "runs": [asdict(r) for r in runs],
        "drift_check": drift,
    }
    write_results(args.out, "serve_bench", data, report(data), lambda path: plot(data, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
