"""Every registered module's toy preset runs, passes its checks and is deterministic.

Parametrised over the registry, so a module added later is covered without editing this file."""
from __future__ import annotations

import pytest

from conftest import read_metrics
from core.registry import discover

MODULES = sorted(discover().modules)


@pytest.mark.parametrize("name", MODULES)
def test_toy_preset_passes_its_checks_and_repeats_exactly(name, run_module, workdir, monkeypatch, tmp_path):
    first = run_module(name, "toy")
    failed = [c["check"] for c in first.checks if not c["passed"]]
    assert first.checks, f"{name}: the toy preset evaluates no check"
    assert not failed, f"{name}: toy checks failed: {failed}"

    monkeypatch.setenv("FINETUNE_WORKDIR", str(tmp_path / "again"))
    second = run_module(name, "toy")
    assert read_metrics(second) == read_metrics(first), f"{name}: same seed, different metrics"
