"""Shared fixtures: the bundled real model and engine helpers.

The bundled model is converted once per machine by ``swaa-vllm-prepare-model``
(``make test`` runs it before pytest); the fixture calls the same idempotent
function, so running pytest directly works too.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from swaa_vllm.models.bundled import prepare_model

    return prepare_model()
