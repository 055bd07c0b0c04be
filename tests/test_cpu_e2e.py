"""``benchmarks/cpu_e2e.py`` (``make bench``): its decode windows, paired ratios and targets, on synthetic numbers
computed here by hand. (The benchmark itself runs four engines for about half an hour: ``make bench``.)"""

from __future__ import annotations

import statistics
from dataclasses import asdict

import pytest

from tests.benchmark_modules import load


@pytest.fixture(scope="module")
def cpu_e2e():
    return load("cpu_e2e")


def test_batch_window_starts_when_the_last_request_has_its_first_token(cpu_e2e):
    # 3 requests: first tokens in steps 0 (one) and 1 (two); steps 1.. give 3 tokens each, 0.1 s apart.
    times = [0.0, 0.5] + [0.5 + 0.1 * i for i in range(1, 10)]
    steps = [(times[0], 1, 1), (times[1], 3, 3)] + [(t, 3, 3) for t in times[2:]]
    # window: the 4 steps after step 1, i.e. 12 tokens from t=0.5 to t=0.9
    assert cpu_e2e.batch_window(steps, 3, 4) == pytest.approx(12 / 0.4)


def test_batch_window_refuses_a_window_where_a_request_stopped(cpu_e2e):
    steps = [(0.0, 2, 2), (0.1, 2, 2), (0.2, 1, 2), (0.3, 2, 2)]
    with pytest.raises(RuntimeError, match="fewer than 3 steps"):
        cpu_e2e.batch_window(steps, 2, 3)
    with pytest.raises(RuntimeError, match="first token"):
        cpu_e2e.batch_window([(0.0, 1, 1)], 2, 1)


def test_paired_ratio_is_the_median_of_per_round_ratios(cpu_e2e):
    # times: base / other per round = 2, 1, 2 -> median 2 (the ratio of medians would be 4/3)
    assert cpu_e2e.paired_ratio([2.0, 4.0, 6.0], [1.0, 4.0, 3.0], faster_is_higher=False) == (2.0, 1.0, 2.0)
    # rates: other / base
    assert cpu_e2e.paired_ratio([10.0, 10.0], [9.0, 12.0], faster_is_higher=True) == (
        pytest.approx(1.05), pytest.approx(0.9), pytest.approx(1.2))
    with pytest.raises(ValueError, match="equal"):
        cpu_e2e.paired_ratio([1.0], [1.0, 2.0], True)


def _model(cpu_e2e, decode_scale: float, ttft_scale: float) -> dict:
    """Four configurations; each swaa one decodes ``decode_scale`` x and prefills 2k in ``ttft_scale`` x the time."""
    results = []
    for i, c in enumerate(cpu_e2e.configs(4)):
        m = cpu_e2e.Measured(c.name)
        f_dec, f_ttft = (1.0, 1.0) if i == 0 else (decode_scale, ttft_scale)
        m.ttft_rounds = {2048: [1.0 * f_ttft, 1.2 * f_ttft, 0.9 * f_ttft], 8192: [10.0 / (1 + i)]}
        m.decode_windows = [20.0 * f_dec, 21.0 * f_dec, 19.0 * f_dec]
        m.batch_decode_windows = [100.0 * f_dec, 90.0 * f_dec, 110.0 * f_dec]
        results.append(asdict(m.finish()))
    bounds = {c.name: {"2048": 1.0, "8192": 1.0 + i} for i, c in enumerate(cpu_e2e.configs(4)[1:], start=1)}
    return {"name": "m", "shape": {}, "results": results, "bounds": bounds}


def test_medians_targets_and_report(cpu_e2e):
    good = _model(cpu_e2e, decode_scale=1.02, ttft_scale=1.0)
    base = good["results"][0]
    assert base["ttft_s"][2048] == 1.0 and base["decode_tok_s"] == 20.0 and base["batch_decode_tok_s"] == 100.0
    lines = cpu_e2e.check_targets(good)
    decode = [ln for ln in lines if ": decode " in ln]
    assert len(decode) == 3 and all("1.02 x CPU_ATTN" in ln and ln.endswith("met") for ln in decode)
    assert sum("TTFT at 2048 tokens 1.00 x CPU_ATTN (target >= 0.98): met" in ln for ln in lines) == 3

    slow = _model(cpu_e2e, decode_scale=0.97, ttft_scale=1.03)  # decode 0.97x, 2k TTFT 1/1.03 = 0.97x
    lines = cpu_e2e.check_targets(slow)
    assert sum(ln.endswith("batched decode 0.97 x CPU_ATTN (target >= 1.00): missed") for ln in lines) == 3
    assert sum("TTFT at 2048 tokens 0.97 x CPU_ATTN (target >= 0.98): missed" in ln for ln in lines) == 3

    env = {"command": "cpu_e2e.py", "date": "d", "cpu": "c", "isa": "i", "cores": 2, "python": "3", "torch": "t",
           "vllm": "v", "dtype": "float32", "rounds": 3, "batch": 16}
    text = cpu_e2e.report([good], env, lines)
    # medians in the first table; paired ratio with its range in the second
    assert f"| CPU_ATTN | {statistics.median([1.0, 1.2, 0.9]):.2f} | 10.00 | 20.0 | 100.0 |" in text
    assert "1.02 [1.02-1.02] / 1.00 / 1.02" in text
