"""``benchmarks/decode_overhead.py``: a tiny real run of both backends' decode steps (real attention classes)."""

from __future__ import annotations

from tests.benchmark_modules import load

overhead = load("decode_overhead")


def test_small_run_times_both_backends_on_equal_work(capsys):
    # step_times raises if the two backends' outputs differ, so this also checks that they run the same op.
    rows = overhead.main(["--contexts", "64", "300", "--layers", "2", "--steps", "3", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert [r["context"] for r in rows] == [64, 300]
    assert all(r["CPU_ATTN"] > 0 and r["swaa"] > 0 for r in rows)
    table = [line for line in printed.splitlines() if line.startswith("| 64 ") or line.startswith("| 300 ")]
    assert len(table) == 2
    prefill = overhead.main(["--contexts", "64", "--rows", "40", "--layers", "2", "--steps", "2", "--dtype", "float32"])
    assert prefill[0]["CPU_ATTN"] > 0 and prefill[0]["swaa"] > 0


def test_rows_longer_than_a_context_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        overhead.main(["--contexts", "64", "--rows", "65"])
    assert "--rows 65 exceeds the shortest --contexts 64" in capsys.readouterr().err
