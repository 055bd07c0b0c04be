"""Helpers that run ``vllm serve`` as a subprocess, the way a user starts it (the console script)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 300


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_serve(model_dir: Path, port: int, swaa_config, log_path: Path, served_name: str,
               extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``vllm serve MODEL --attention-backend swaa`` (float32, eager, 2048 tokens, 1 GiB KV cache).

    stdout and stderr go to ``log_path``; ``env`` adds to the test's environment.
    """
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [
        str(vllm), "serve", str(model_dir), "--served-model-name", served_name,
        "--attention-backend", "swaa", "--hf-overrides", json.dumps({"swaa_config": swaa_config}),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port), *extra,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_until_healthy(proc: subprocess.Popen, base: str, log_path: Path,
                       timeout_s: float = STARTUP_TIMEOUT_S) -> float:
    """Poll ``base/health`` until it answers 200; fail the test (with the log tail) if the server exits or
    times out. Returns the start-up time in seconds."""
    import requests

    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.ConnectionError:
            pass
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"vllm serve not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 60 s."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_exit(proc: subprocess.Popen, timeout_s: float = STARTUP_TIMEOUT_S) -> int:
    """The exit status of a server expected to stop by itself (killed after ``timeout_s``)."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def openai_client(base: str):
    """An OpenAI client for the server at ``base`` (no retries, 120 s timeout)."""
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
