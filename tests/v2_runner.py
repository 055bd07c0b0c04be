"""Run vLLM with a chosen model runner in the tests: V1, or V2 through the Triton CPU stand-in.

``VLLM_USE_V2_MODEL_RUNNER`` picks vLLM's runner. V2 prepares its inputs with
Triton kernels, which on this CPU run in Triton's interpreter behind a stand-in
``cpu`` backend (``tests/triton_cpu_standin/sitecustomize.py`` explains it). The
stand-in must be registered before vLLM is imported in every engine process, so it
is a ``sitecustomize`` module that each spawned process loads from ``PYTHONPATH``;
the test process itself never registers it: :func:`run_with_runner` runs a V2
engine in a fresh spawned process (vLLM's front end also checks for Triton).
Test-only: the package never ships it.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parent / "triton_cpu_standin"
RUNNERS = ("v1", "v2")


def runner_env(runner: str) -> dict[str, str]:
    """Environment variables that make every vLLM process started from here use ``runner``.

    Args:
        runner: ``"v1"`` (vLLM's deprecated runner) or ``"v2"`` (its default; here via
            the Triton interpreter).

    Raises:
        ValueError: for another runner name.
    """
    if runner == "v1":
        return {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    if runner == "v2":
        path = os.environ.get("PYTHONPATH")
        return {
            "VLLM_USE_V2_MODEL_RUNNER": "1",
            "SWAA_TRITON_CPU_STANDIN": "1",
            "TRITON_INTERPRET": "1",
            "PYTHONPATH": f"{STANDIN_DIR}{os.pathsep}{path}" if path else str(STANDIN_DIR),
        }
    raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")


def use_runner(monkeypatch, runner: str) -> None:
    """Set :func:`runner_env` for the rest of one test (pytest's ``monkeypatch`` restores it).

    The engine processes vLLM spawns inherit it; the test process only reads
    ``VLLM_USE_V2_MODEL_RUNNER`` (vLLM's config does, lazily).
    """
    for name, value in runner_env(runner).items():
        monkeypatch.setenv(name, value)


def run_with_runner(monkeypatch, runner: str, fn, *args):
    """``fn(*args)`` with every vLLM engine it starts on ``runner``; returns what ``fn`` returns.

    V1: in this process, with ``VLLM_USE_V2_MODEL_RUNNER=0``. V2: in a fresh spawned
    process whose environment is :func:`runner_env` (so it, and the engine processes it
    spawns, load the Triton CPU stand-in before vLLM); ``fn``, ``args`` and the result
    must pickle. Exceptions propagate.
    """
    use_runner(monkeypatch, runner)
    if runner == "v1":
        return fn(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
