"""The package layout and the places that name module paths: pyproject's packages and scripts, the
``python -m`` commands of the Makefile, README and docs, and the vLLM plugin entry point."""

from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_subpackage_is_packaged():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "swaa_vllm").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "swaa_kernels" in listed and PYPROJECT["tool"]["setuptools"]["package-dir"]["swaa_kernels"] == "kernels"


@pytest.mark.parametrize("target", [*PYPROJECT["project"]["scripts"].values(),
                                    *PYPROJECT["project"]["entry-points"]["vllm.general_plugins"].values()])
def test_entry_points_resolve(target):
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def _python_m_modules() -> set[str]:
    texts = [(REPO / "Makefile").read_text(), (REPO / "README.md").read_text(),
             *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))]
    return {m for text in texts for m in re.findall(r"-m (swaa_vllm(?:\.\w+)+)", text)}


def test_python_m_commands_name_existing_modules():
    modules = _python_m_modules()
    assert "swaa_vllm.finetuning.train" in modules  # the scan works
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"python -m targets that do not exist: {missing}"
