"""``benchmarks/serve_bench.py`` (``make bench-serve``): its ``vllm bench serve`` arguments parse with vLLM's own
parser, its FLOP bounds equal a brute-force count of the SWAA mask, and its report computes the ratios from vLLM's
numbers. (The benchmark itself takes about an hour: ``make bench-serve``.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_modules import load


@pytest.fixture(scope="module")
def serve_bench():
    return load("serve_bench")


def test_bench_args_parse_with_vllms_own_parser(serve_bench, tmp_path):
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(serve_bench.bench_args(Path("/models/m"), 8123, 8192, 64, 16, 16, tmp_path, "r.json", 3))
    assert (args.backend, args.base_url, args.model, args.tokenizer) == (
        "vllm", "http://127.0.0.1:8123", serve_bench.SERVED_NAME, "/models/m")
    assert (args.dataset_name, args.random_input_len, args.random_output_len, float(args.random_range_ratio)) == (
        "random", 8192, 64, 0.0)  # vLLM parses the range ratio (a float or a JSON dict) after argparse
    assert (args.num_prompts, args.max_concurrency, args.request_rate, args.seed) == (16, 16, float("inf"), 3)
    assert args.ignore_eos and args.save_result
    assert (args.result_dir, args.result_filename) == (str(tmp_path), "r.json")
    assert args.percentile_metrics == "ttft,tpot,itl,e2el" and args.metric_percentiles == "50,99"


def test_serve_command_names_the_backend_and_plan(serve_bench):
    import json

    from cpu_e2e import Config

    plan = {"sliding_window_size": 1024, "keep_first": 64, "force_fa_decode": True}
    cmd = serve_bench.serve_command(Path("/m"), Config("x", "swaa", plan), 9000, "float32", 8272)
    assert cmd[1:3] == ["serve", "/m"]
    assert cmd[cmd.index("--attention-backend") + 1] == "swaa"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"swaa_config": plan}
    assert cmd[cmd.index("--max-model-len") + 1] == "8272" and "--no-enable-prefix-caching" in cmd
    assert "--hf-overrides" not in serve_bench.serve_command(Path("/m"), Config("b", "CPU_ATTN", None), 1, "float32", 9)


def _brute_force_flops(shape, plan: dict | None, n: int, output_tokens: int) -> float:
    """Prefill + decode FLOPs by counting every visible (query, key) pair of shared/SWAA.md's mask."""
    window = None if plan is None else plan["sliding_window_size"]
    sinks = 0 if plan is None else plan.get("keep_first", 0)
    full_layers = set(plan.get("non_sliding_layers", [])) if plan else set()
    pairs = 0
    for layer in range(shape.layers):
        for i in range(n):
            if window is None or layer in full_layers:
                pairs += i + 1
            else:
                pairs += sum(1 for j in range(i + 1) if j < sinks or j > i - window)
    prefill = n * shape.linear_flops_per_token() + 4.0 * shape.heads * shape.head_dim * pairs \
        + 2.0 * shape.vocab * shape.hidden
    decode = sum(shape.linear_flops_per_token() + 4.0 * shape.heads * shape.head_dim * (n + t) * shape.layers
                 for t in range(output_tokens - 1))  # FA decode: every key
    return prefill, prefill + decode


def test_bounds_equal_a_brute_force_count_of_the_mask(serve_bench):
    from cpu_e2e import Config

    from swaa_vllm.evaluation.costs import ModelShape

    shape = ModelShape(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)
    base = Config("CPU_ATTN", "CPU_ATTN", None)
    for plan in ({"sliding_window_size": 8, "keep_first": 2, "force_fa_decode": True},
                 {"sliding_window_size": 8, "keep_first": 2, "force_fa_decode": True, "non_sliding_layers": [1, 3]},
                 {"sliding_window_size": 5, "keep_first": 0, "force_fa_decode": True}):
        got = serve_bench.bounds(shape, base, Config("p", "swaa", plan), 40, 6)
        full_prefill, full_total = _brute_force_flops(shape, None, 40, 6)
        plan_prefill, plan_total = _brute_force_flops(shape, plan, 40, 6)
        assert got["prefill"] == pytest.approx(full_prefill / plan_prefill)
        assert got["workload"] == pytest.approx(full_total / plan_total)
        assert 1 < got["workload"] < got["prefill"]  # decode work is the same for all: it dilutes the gain


def test_kv_cache_holds_the_largest_concurrency(serve_bench):
    from swaa_vllm.evaluation.costs import ModelShape

    smollm = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    # 16 requests x 8272 tokens x (30 layers x 3 heads x 64 x K,V x 4 bytes) = 6.10e9 bytes, +10% = 6.25 GiB -> 7.
    assert serve_bench.kv_cache_gib(smollm, "float32", 16, 8272) == 7
    assert serve_bench.kv_cache_gib(smollm, "bfloat16", 16, 8272) == 4
    assert serve_bench.kv_cache_gib(smollm, "float32", 1, 100) == 1


def test_prompt_counts_reach_the_concurrency(serve_bench):
    for length in (2048, 8192):
        for c in (1, 4, 16):
            assert serve_bench.prompt_count(length, c) >= c
    assert serve_bench.prompt_count(2048, 1) > serve_bench.prompt_count(8192, 1)


def test_run_budget_leaves_out_only_the_runs_over_it(serve_bench):
    runs, skipped = serve_bench.planned_runs([2048, 8192], [1, 4, 16], 65536)
    assert runs == [(2048, 1, 2), (2048, 4, 4), (2048, 16, 16), (8192, 1, 1), (8192, 4, 4)]
    assert skipped == [(8192, 16, 16)]  # 16 x 8192 = 131072 prompt tokens
    runs, skipped = serve_bench.planned_runs([2048, 8192], [1, 4, 16], 131072)
    assert (8192, 16, 16) in runs and skipped == []


def test_default_budget_is_the_whole_grid_only_with_native_bf16(serve_bench):
    """bf16 on native-bf16 CPUs runs the whole default grid; float32 (AVX2 machines) leaves out 8k x 16."""
    full = serve_bench.default_max_run_tokens(True)
    assert serve_bench.planned_runs([2048, 8192], [1, 4, 16], full)[1] == []
    assert serve_bench.planned_runs([2048, 8192], [1, 4, 16], serve_bench.default_max_run_tokens(False))[1] == [
        (8192, 16, 16)]


def _result(req_s, out_s, ttft_ms, itl_ms):
    fields = dict.fromkeys(("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                            "total_token_throughput", "max_concurrent_requests"), 0)
    return {**fields, "request_throughput": req_s, "output_throughput": out_s, "p50_ttft_ms": ttft_ms,
            "p99_ttft_ms": 2 * ttft_ms, "p50_itl_ms": itl_ms, "p99_itl_ms": 3 * itl_ms}


def test_report_ratios_come_from_vllms_numbers(serve_bench, tmp_path):
    runs = [
        {"config": "CPU_ATTN", "length": 8192, "concurrency": 16, "num_prompts": 16, "output_tokens": 64,
         "wall_s": 1.0, "result": _result(0.50, 32.0, 4000.0, 200.0)},
        {"config": "swaa, all sliding", "length": 8192, "concurrency": 16, "num_prompts": 16, "output_tokens": 64,
         "wall_s": 1.0, "result": _result(0.75, 48.0, 2000.0, 250.0)},
    ]
    q = serve_bench.ratios(runs[0]["result"], runs[1]["result"])
    assert q["request_throughput"] == pytest.approx(1.5) and q["output_throughput"] == pytest.approx(1.5)
    assert q["ttft_p50"] == pytest.approx(2.0) and q["itl_p50"] == pytest.approx(0.8)
    env = {"command": "serve_bench.py", "date": "d", "cpu": "c", "isa": "AVX2 only", "cores": 2, "dtype": "float32",
           "dtype_reason": "r", "python": "3", "torch": "t", "vllm": "v"}
    data = {"environment": env, "output_tokens": 64, "wall_s": 60.0, "runs": runs, "max_run_tokens": 65536,
            "skipped": [{"length": 8192, "concurrency": 32, "num_prompts": 32}],
            "bounds": {"swaa, all sliding": {"8192": {"prefill": 1.9, "workload": 1.6}}},
            "servers": {"CPU_ATTN": {"startup_s": 50, "kv_cache_gib": 7},
                        "swaa, all sliding": {"startup_s": 51, "kv_cache_gib": 7}}}
    text = serve_bench.report(data)
    assert "## 8192 prompt tokens, max concurrency 16 (16 prompts)" in text
    assert "| swaa, all sliding | 0.750 | 48.0 | 2.00 / 4.00 | 250 / 750 | 1.50 (1.60) | 2.00 (1.90) | 0.80 |" in text
    assert "AVX2 only" in text and "float32" in text
    assert "Left out (more than `--max-run-tokens 65536` prompt tokens per run" in text and "concurrency 32" in text
    serve_bench.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_drift_check_warns_when_the_baseline_changed_speed(serve_bench):
    base = {"config": "CPU_ATTN", "length": 2048, "concurrency": 1, "num_prompts": 2, "output_tokens": 64,
            "wall_s": 1.0}
    plan = {**base, "config": "swaa, all sliding"}
    data = {"runs": [{**base, "result": _result(0.1, 6.0, 13000.0, 80.0)},
                     {**plan, "result": _result(0.1, 6.0, 9000.0, 60.0)}],
            "bounds": {"swaa, all sliding": {"2048": {"prefill": 1.06, "workload": 1.05}}},
            "drift_check": {"runs": [{**base, "result": _result(0.1, 6.0, 10000.0, 60.0)},
                                     {**plan, "result": _result(0.1, 6.0, 9500.0, 61.0)}]}}
    text = "\n".join(serve_bench.drift_section(data))
    assert "| CPU_ATTN | 2048 | 13.00 / 10.00 | 1.30 | 80 / 60 | - | - |" in text
    assert "| swaa, all sliding | 2048 | 9.00 / 9.50 | 0.95 | 60 / 61 | 1.05 (1.06) | 0.98 |" in text
    assert "ran at 1.30x the speed of its main run" in text
    data["drift_check"]["runs"][0]["result"] = _result(0.1, 6.0, 12800.0, 80.0)
    assert "changed speed" not in "\n".join(serve_bench.drift_section(data))
