"""Every registered module's toy preset runs, passes its checks and is deterministic; every module
that can resume ends an interrupted run with the same artifacts as an uninterrupted one.

A resumable module proves its determinism through the resume: the interrupted run repeats the first
part from the seed in a fresh work dir, and the resumed run must end byte-identical to the straight
one, so a second straight run would add nothing but its time. The toy chain has already run the
modules it is made of straight (conftest.toy_chain), so for those its runs are the straight ones.

Parametrised over the registry, so a module added later is covered without editing this file."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import CHAIN_MODULE, read_metrics
from core.registry import discover
from core.run_context import RunContext

REGISTRY = discover()
MODULES = sorted(REGISTRY.modules)
CHAINED = {name for name, m in REGISTRY.modules.items() if m.depends}
"""modules that start from another module's model: their work dirs get the toy chain first
(its building from nothing is tested once, in tests/test_chain.py)"""
RESUMABLE = [name for name in MODULES
             if "resume" in {f.name for f in dataclasses.fields(REGISTRY.modules[name].config_class)}]


def with_upstream(name: str) -> set[str]:
    return {name, *(up for dep in REGISTRY.get(name).depends for up in with_upstream(dep))}


IN_THE_CHAIN = with_upstream(CHAIN_MODULE)
"""the modules whose toy preset the toy chain runs, straight and from the same upstream as these tests"""


def module_param(name: str):
    """Tests that use the toy chain run after it is built (conftest.needs_toy_chain)."""
    return pytest.param(name, marks=pytest.mark.toy_chain) if name in CHAINED | IN_THE_CHAIN else name


def fresh_workdir(monkeypatch, path, name, request):
    monkeypatch.setenv("FINETUNE_WORKDIR", str(path))
    if name in CHAINED:
        request.getfixturevalue("toy_chain").copy_to(path)


def assert_checks_pass(name, checks):
    failed = [c["check"] for c in checks if not c["passed"]]
    assert checks, f"{name}: the toy preset evaluates no check"
    assert not failed, f"{name}: toy checks failed: {failed}"


@pytest.mark.parametrize("name", [module_param(n) for n in MODULES if n not in RESUMABLE])
def test_toy_preset_passes_its_checks_and_repeats_exactly(name, run_module, monkeypatch, tmp_path, request):
    fresh_workdir(monkeypatch, tmp_path / "first", name, request)
    first = run_module(name, "toy")
    assert_checks_pass(name, first.checks)

    fresh_workdir(monkeypatch, tmp_path / "again", name, request)
    second = run_module(name, "toy")
    assert read_metrics(second) == read_metrics(first), f"{name}: same seed, different metrics"


@pytest.mark.parametrize("name", [module_param(n) for n in RESUMABLE])
def test_toy_preset_passes_its_checks_and_an_interrupted_run_resumes_to_identical_artifacts(name, run_module, monkeypatch, tmp_path, request):
    if name in IN_THE_CHAIN:
        straight = request.getfixturevalue("toy_chain").folder / REGISTRY.get(name).rel_path / "output" / "toy"
        checks = json.loads((straight / "run.json").read_text())["checks"]
    else:
        fresh_workdir(monkeypatch, tmp_path / "straight", name, request)
        result = run_module(name, "toy")
        straight, checks = result.out_dir, result.checks
    assert_checks_pass(name, checks)

    original_save = RunContext.save_checkpoint
    saved_steps: list[int] = []

    def save_then_crash_after_the_first(self, step, state):
        original_save(self, step, state)
        saved_steps.append(step)
        if len(saved_steps) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunContext, "save_checkpoint", save_then_crash_after_the_first)
    fresh_workdir(monkeypatch, tmp_path / "resumed", name, request)
    with pytest.raises(KeyboardInterrupt):
        run_module(name, "toy")
    resumed = run_module(name, "toy", ["resume=true"])  # still counting the checkpoints it saves

    assert len(saved_steps) >= 2, f"{name}: the toy preset should checkpoint at least twice"
    assert json.loads((resumed.out_dir / "run.json").read_text())["resumed_from_step"] == saved_steps[0]
    written = sorted(p.name for p in straight.iterdir() if p.suffix in (".csv", ".json") and p.name != "run.json")
    assert "metrics.json" in written
    for file in written:
        assert (resumed.out_dir / file).read_bytes() == (straight / file).read_bytes(), f"{name}: {file}"
