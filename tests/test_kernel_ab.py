"""``benchmarks/kernel_ab.py``: the kernel of a git revision builds beside the working tree's and both run."""

from __future__ import annotations

import sys

import pytest

from swaa_kernels import sink_window_native
from tests.benchmark_modules import load

kernel_ab = load("kernel_ab")


@pytest.mark.skipif(not sink_window_native.cpu_has_avx512(), reason="the native kernel's product path needs AVX-512")
def test_base_build_runs_beside_the_tree_and_agrees(monkeypatch, capsys):
    """HEAD's kernel against the working tree's on one small float32 case: one table row, both timed, and the two
    builds' outputs within float32 rounding of each other (equal sources give 0; a kernel change under test may
    move the sums' order, never more)."""
    monkeypatch.setattr(sys, "argv", ["kernel_ab.py", "--base", "HEAD", "--dtypes", "float32", "--lengths", "300",
                                      "--window", "64", "--keep-first", "16", "--rounds", "2"])
    kernel_ab.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float32")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    base_ms, tree_ms, max_diff = float(cells[3]), float(cells[4]), float(cells[9])
    assert base_ms > 0 and tree_ms > 0
    assert max_diff < 1e-5
