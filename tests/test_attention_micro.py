"""``benchmarks/attention_micro.py``: its interleaved timing and a tiny real run of the whole table."""

from __future__ import annotations

import sys

from tests.benchmark_modules import load

micro = load("attention_micro")


def test_interleaved_timing_rotates_the_order_and_calls_each_once_per_repeat():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = micro._time_interleaved(fns, repeats=3)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_small_run_prints_both_sink_window_paths(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["attention_micro.py", "--lengths", "384", "--window", "64", "--keep-first", "16",
                                      "--repeats", "1", "--dtype", "float32"])
    micro.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| prefill")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    native_ms, torch_ms, native_ratio, torch_ratio = (float(cells[i]) for i in (5, 6, 13, 14))
    assert native_ms > 0 and torch_ms > 0 and native_ratio > 0 and torch_ratio > 0
