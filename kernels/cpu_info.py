"""This CPU's ``/proc/cpuinfo``: the instruction-set flags the CPU kernels are built and chosen for.

Shared by :mod:`swaa_kernels.sink_window_native` (which build to load, and whether ``auto`` takes
the native kernel) and ``swaa_vllm.platforms.cpu_features`` (the benchmarks' dtype and records).
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["cpu_flags", "cpuinfo_text"]


@functools.cache
def cpuinfo_text() -> str:
    """The text of ``/proc/cpuinfo`` (read once per process); empty off Linux."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (or of the text given); empty off Linux."""
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
