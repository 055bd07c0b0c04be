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


def test_rounds_pair_each_measurement_across_engines_back_to_back(cpu_e2e, monkeypatch):
    """Within a round every engine runs one measurement before any engine runs the next, in an order rotated
    every second round and reversed in odd rounds, so each paired ratio compares values taken seconds apart
    (fake engines record the order of the calls)."""
    import argparse
    import contextlib

    calls = []

    class FakeLLM:
        def __init__(self, name):
            self.name = name

    @contextlib.contextmanager
    def fake_engine(model, **kwargs):
        yield FakeLLM(kwargs["attention_backend"] + str(kwargs.get("hf_overrides", "")))

    def fake_timed(llm, prompt, max_tokens):
        calls.append((llm.name, "decode" if max_tokens > 1 else len(prompt)))
        return 1.0, 10.0

    def fake_batch(llm, prompts, tokens):
        calls.append((llm.name, "batch"))
        return 100.0

    monkeypatch.setattr(cpu_e2e, "engine", fake_engine)
    monkeypatch.setattr(cpu_e2e, "_timed", fake_timed)
    monkeypatch.setattr(cpu_e2e, "_batch_decode", fake_batch)
    monkeypatch.setattr(cpu_e2e, "check_memory", lambda *a: None)
    monkeypatch.setattr(cpu_e2e.time, "sleep", lambda s: None)
    shape = cpu_e2e.Shape(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=1000)
    config_list = cpu_e2e.configs(2)
    args = argparse.Namespace(decode_context=256, decode_tokens=4, batch=2, batch_context=128, rounds=3,
                              repeat_below=1024)
    results = cpu_e2e.measure_all("model", shape, config_list, [512, 2048], args, "dummy", "float32")
    names = [FakeLLM(c.backend + str({"swaa_config": c.swaa_config} if c.swaa_config else "")).name
             for c in config_list]
    measured = calls[3 * len(names):]  # after the warm-up (3 calls per engine)
    per_round = [[512, 2048, "decode", "batch"], [512, "decode", "batch"], [512, "decode", "batch"]]
    expected = []
    for r, whats in enumerate(per_round):
        shift = r // 2
        order = names[shift:] + names[:shift]
        order = order[::-1] if r % 2 else order  # rotated every second round, odd rounds reversed
        expected += [(name, what) for what in whats for name in order]
    assert measured == expected
    assert [len(res.decode_windows) for res in results] == [3] * 4
    assert [len(res.ttft_rounds[512]) for res in results] == [3] * 4


def test_round_order_varies_each_engines_predecessor(cpu_e2e):
    """Over ``2 * engines`` rounds each engine leads twice and runs after at least two different engines: with a
    plain rotation engine 1 (swaa without swaa_config) always ran right after engine 0 (CPU_ATTN)."""
    engines, rounds = 4, 8
    orders = [cpu_e2e.round_order(engines, r) for r in range(rounds)]
    assert all(sorted(o) == list(range(engines)) for o in orders)
    assert sorted(o[0] for o in orders) == sorted(list(range(engines)) * 2)
    sequence = [e for o in orders for e in o]
    for engine in range(engines):
        before = {sequence[i - 1] for i in range(1, len(sequence)) if sequence[i] == engine}
        assert len(before) >= 2, f"engine {engine} always runs after {before}"
