"""Every registered module's toy preset runs, passes its checks and is deterministic; every module
that can resume ends an interrupted run with the same artifacts as an uninterrupted one.

A resumable module proves its determinism through the resume: the interrupted run repeats the first
part from the seed in a fresh work dir, and the resumed run must end byte-identical to the straight
one, so a second straight run would add nothing but its time.

Parametrised over the registry, so a module added later is covered without editing this file."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import TOY_CHAIN_GROUP, read_metrics
from core.registry import discover
from core.run_context import RunContext

REGISTRY = discover()
MODULES = sorted(REGISTRY.modules)
CHAINED = {name for name, m in REGISTRY.modules.items() if m.depends}
"""modules that start from another module's model: their work dirs get the toy chain first
(its building from nothing is tested once, in tests/test_chain.py)"""
RESUMABLE = [name for name in MODULES
             if "resume" in {f.name for f in dataclasses.fields(REGISTRY.modules[name].config_class)}]


def module_param(name: str):
    """A chained module's tests run where the toy chain is built (conftest.TOY_CHAIN_GROUP)."""
    return pytest.param(name, marks=TOY_CHAIN_GROUP) if name in CHAINED else name


def fresh_workdir(monkeypatch, path, name, request):
    monkeypatch.setenv("FINETUNE_WORKDIR", str(path))
    if name in CHAINED:
        request.getfixturevalue("toy_chain").copy_to(path)


def assert_checks_pass(name, result):
    failed = [c["check"] for c in result.checks if not c["passed"]]
    assert result.checks, f"{name}: the toy preset evaluates no check"
    assert not failed, f"{name}: toy checks failed: {failed}"


@pytest.mark.parametrize("name", [module_param(n) for n in MODULES if n not in RESUMABLE])
def test_toy_preset_passes_its_checks_and_repeats_exactly(name, run_module, monkeypatch, tmp_path, request):
    fresh_workdir(monkeypatch, tmp_path / "first", name, request)
    first = run_module(name, "toy")
    assert_checks_pass(name, first)

    fresh_workdir(monkeypatch, tmp_path / "again", name, request)
    second = run_module(name, "toy")
    assert read_metrics(second) == read_metrics(first), f"{name}: same seed, different metrics"


@pytest.mark.parametrize("name", [module_param(n) for n in RESUMABLE])
def test_toy_preset_passes_its_checks_and_an_interrupted_run_resumes_to_identical_artifacts(name, run_module, monkeypatch, tmp_path, request):
    original_save = RunContext.save_checkpoint
    saved_steps: list[int] = []

    def counting_save(self, step, state):
        original_save(self, step, state)
        saved_steps.append(step)

    monkeypatch.setattr(RunContext, "save_checkpoint", counting_save)
    fresh_workdir(monkeypatch, tmp_path / "straight", name, request)
    straight = run_module(name, "toy")
    assert_checks_pass(name, straight)
    assert len(saved_steps) >= 2, f"{name}: the toy preset should checkpoint at least twice"
    stop_at = saved_steps[len(saved_steps) // 2 - 1]

    def save_then_crash(self, step, state):
        original_save(self, step, state)
        if step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunContext, "save_checkpoint", save_then_crash)
    fresh_workdir(monkeypatch, tmp_path / "resumed", name, request)
    with pytest.raises(KeyboardInterrupt):
        run_module(name, "toy")
    monkeypatch.setattr(RunContext, "save_checkpoint", original_save)
    resumed = run_module(name, "toy", ["resume=true"])

    assert json.loads((resumed.out_dir / "run.json").read_text())["resumed_from_step"] == stop_at
    written = sorted(p.name for p in straight.out_dir.iterdir() if p.suffix in (".csv", ".json") and p.name != "run.json")
    assert "metrics.json" in written
    for file in written:
        assert (resumed.out_dir / file).read_bytes() == (straight.out_dir / file).read_bytes(), f"{name}: {file}"
