"""Shared fixtures: every test that runs a module writes into a temporary work dir, never into
the checkout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.registry import discover
from core.run_context import RunResult, execute


@pytest.fixture(scope="session")
def registry():
    return discover()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_WORKDIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def run_module(registry, workdir):
    """run_module("mdp", "toy", ["gamma=0.9"], seed=1) -> RunResult, artifacts under a tmp dir."""
    def _run(name: str, preset: str = "toy", overrides: list[str] = (), seed: int | None = None) -> RunResult:
        return execute(registry.get(name), preset, list(overrides), seed)
    return _run


def read_metrics(result: RunResult) -> dict:
    return json.loads((result.out_dir / "metrics.json").read_text())
