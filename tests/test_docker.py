"""docker/: the Dockerfiles pass hadolint, the CUDA base matches the gpu extra, and the entrypoint
builds the right ``vllm serve`` command (run for real in dry-run mode; no Docker engine here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    # Default failure threshold: any finding (error, warning, info, style) fails.
    args = [str(HADOLINT), "--no-color"]
    if (ROOT / ".hadolint.yaml").exists():
        args += ["--config", str(ROOT / ".hadolint.yaml")]
    return subprocess.run(args + [str(path)], capture_output=True, text=True, timeout=120)


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = _hadolint(dockerfile)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_does_report_problems(tmp_path):
    """The linter is live: an unpinned base and unpinned apt packages fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_cuda_base_is_the_gpu_extras_vllm():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    vllm_pin = next(req for req in extra if req.startswith("vllm"))
    lower = re.search(r">=\s*([0-9.]+)", vllm_pin).group(1)
    base = re.search(r"^FROM\s+(\S+)", (DOCKER / "Dockerfile.cuda").read_text(), re.M).group(1)
    assert base == f"vllm/vllm-openai:v{lower}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_use_the_entrypoint_and_vllms_own_runner_choice(dockerfile):
    text = dockerfile.read_text()
    assert "COPY docker/entrypoint.sh /usr/local/bin/swaa-entrypoint" in text
    assert 'ENTRYPOINT ["swaa-entrypoint"]' in text
    assert "VLLM_USE_V2_MODEL_RUNNER" not in text  # swaa serves under vLLM's default (V2) runner


def _entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "SWAA_DRY_RUN": "1"}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def _command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


PLAN = {"sliding_window_size": 512, "keep_first": 64, "force_fa_decode": True, "non_sliding_layers": [1, 3]}


def test_model_and_config_from_environment():
    cmd = _command(_entrypoint(MODEL="/models/m", SWAA_CONFIG=json.dumps(PLAN)))
    assert cmd[:3] == ["vllm", "serve", "/models/m"]
    assert cmd[cmd.index("--attention-backend") + 1] == "swaa"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"swaa_config": PLAN}
    assert "--served-model-name" not in cmd


def test_model_argument_wins_and_extra_arguments_pass_through():
    cmd = _command(_entrypoint("Qwen/Qwen3-4B", "--max-model-len", "32768", "--tensor-parallel-size", "2",
                               MODEL="/models/other", PORT="9000", HOST="127.0.0.1", SERVED_MODEL_NAME="qwen"))
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen3-4B"]
    assert cmd[-4:] == ["--max-model-len", "32768", "--tensor-parallel-size", "2"]
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen"
    assert "--hf-overrides" not in cmd  # no SWAA_CONFIG: the model's own config.json decides


def test_options_only_use_the_model_from_environment():
    cmd = _command(_entrypoint("--dtype", "float32", MODEL="/m", SWAA_CONFIG=""))
    assert cmd[:3] == ["vllm", "serve", "/m"] and cmd[-2:] == ["--dtype", "float32"]
    assert "--hf-overrides" not in cmd


def test_runner_choice_is_left_to_vllm(tmp_path):
    """The entrypoint neither sets nor changes VLLM_USE_V2_MODEL_RUNNER: vLLM's default (V2) applies."""
    fake = tmp_path / "vllm"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "${VLLM_USE_V2_MODEL_RUNNER-unset}"\n')
    fake.chmod(0o755)
    for env, expected in (({}, "unset"), ({"VLLM_USE_V2_MODEL_RUNNER": "0"}, "0")):
        result = _entrypoint("/m", SWAA_DRY_RUN="0", VLLM_BIN=str(fake), **env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [expected]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{sliding_window_size: 512}", "SWAA_CONFIG is not a JSON object: Expecting property name"),
        ('{"sliding_window_size": 512', "SWAA_CONFIG is not a JSON object: Expecting ',' delimiter"),
        ("[512, 64]", "SWAA_CONFIG is not a JSON object: got a JSON list"),
        ("512", "SWAA_CONFIG is not a JSON object: got a JSON int"),
    ],
)
def test_malformed_swaa_config_is_refused(value, message):
    result = _entrypoint("/m", SWAA_CONFIG=value)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and "example: SWAA_CONFIG=" in result.stderr


def test_no_model_is_refused():
    result = _entrypoint("--dtype", "float32")
    assert result.returncode == 2
    assert "no model: pass it as the first argument or set MODEL" in result.stderr


def test_without_dry_run_it_execs_vllm(tmp_path):
    """The real path: exec replaces the shell with the vllm executable and its arguments."""
    fake = tmp_path / "vllm"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    result = _entrypoint("/m", SWAA_DRY_RUN="0", VLLM_BIN=str(fake), SWAA_CONFIG='{"sliding_window_size": 8}')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0:3] == ["serve", "/m", "--attention-backend"]
    assert json.loads(lines[lines.index("--hf-overrides") + 1]) == {"swaa_config": {"sliding_window_size": 8}}
