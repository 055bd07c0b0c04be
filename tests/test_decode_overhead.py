"""``benchmarks/decode_overhead.py``: a tiny real run of both backends' decode steps (real attention classes)."""

from __future__ import annotations

from tests.benchmark_modules import load

overhead = load("decode_overhead")


def test_small_run_times_both_backends_on_equal_work(capsys):
    # step_times raises if the two backends' outputs differ, so this also checks that they run the same op.
    rows = overhead.main(["--contexts", "64", "300", "--layers", "2", "--steps", "3", "--dtype", "float32"])
    assert [r["context"] for r in rows] == [64, 300]
    assert all(r["CPU_ATTN"] > 0 and r["swaa"] > 0 for r in rows)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 ") or
             line.startswith("| 300 ")]
    assert len(table) == 2
