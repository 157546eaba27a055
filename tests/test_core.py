"""The platform itself: typed presets, checks, atomic artifacts, checkpoints, registry, run index."""
from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch

from core import artifacts
from core.checks import Check
from core.config import ConfigError, Range, Seed, apply_overrides, field_docs, parse_value
from core.registry import Module, discover, validate
from core.run_context import RunContext, ResumeMismatch, latest_run, read_run_index


@dataclass
class DemoConfig:
    lr: Annotated[float, Range(gt=0, le=1)] = 0.1
    """learning rate"""
    steps: Annotated[int, Range(ge=1, le=1000)] = 10
    """how many steps"""
    use_baseline: bool = False
    arch: Literal["llama", "mla"] = "llama"
    lambdas: Annotated[tuple[float, ...], Range(ge=0, le=1)] = (0.0, 1.0)
    limit: Annotated[int, Range(ge=1, le=100)] | None = None
    seed: Seed = 0
    resume: bool = False


@dataclass
class LooseConfig:
    steps: int = 10
    seed: int = 0


# --- config -------------------------------------------------------------------------------------
def test_overrides_are_parsed_to_the_field_types():
    cfg = apply_overrides(DemoConfig(), ["lr=3e-4", "steps=400", "use_baseline=true", "arch=mla",
                                         "lambdas=0,0.5,1", "limit=none"])
    assert cfg == DemoConfig(lr=3e-4, steps=400, use_baseline=True, arch="mla", lambdas=(0.0, 0.5, 1.0), limit=None)
    assert apply_overrides(DemoConfig(), ["limit=7"]).limit == 7
    assert parse_value("off", bool) is False


@pytest.mark.parametrize("override, words", [
    ("nope=1", ["unknown key 'nope'", "allowed keys: lr, steps, use_baseline"]),
    ("steps=1.5", ["'steps'", "expected int"]),
    ("lr=fast", ["'lr'", "expected float"]),
    ("use_baseline=maybe", ["expected bool"]),
    ("arch=gpt", ["expected one of llama|mla"]),
    ("steps", ["key=value"]),
])
def test_bad_overrides_say_which_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as err:
        apply_overrides(DemoConfig(), [override])
    for word in words:
        assert word in str(err.value)


def test_field_docs_come_from_the_docstring_under_each_field():
    assert field_docs(DemoConfig) == {"lr": "learning rate", "steps": "how many steps"}


# --- checks -------------------------------------------------------------------------------------
def test_checks_compare_with_thresholds_and_other_metrics():
    metrics = {"loss": 0.5, "baseline": 0.7, "bad": float("nan")}
    assert Check("loss", "<", 0.6).evaluate(metrics)["passed"]
    assert not Check("loss", "<", 0.4).evaluate(metrics)["passed"]
    assert Check("loss", "<", ref="baseline").evaluate(metrics)["passed"]
    assert not Check("baseline", "<=", ref="loss").evaluate(metrics)["passed"]
    assert not Check("bad", "<", 1.0).evaluate(metrics)["passed"], "NaN must never pass"
    assert not Check("missing", "<", 1.0).evaluate(metrics)["passed"]
    assert Check("loss", "==", 0.5).evaluate(metrics)["passed"]
    assert not Check("loss", "==", ref="baseline").evaluate(metrics)["passed"]
    with pytest.raises(ValueError):
        Check("loss", "<")
    with pytest.raises(ValueError):
        Check("loss", "~", 1.0)


def test_checks_apply_only_to_their_presets_and_conditions():
    check = Check("x", ">", 0.0, presets=("default",), when=lambda c: c.lr > 0.05)
    assert check.applies("default", DemoConfig())
    assert not check.applies("toy", DemoConfig())
    assert not check.applies("default", DemoConfig(lr=0.01))


# --- artifacts ----------------------------------------------------------------------------------
def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "metrics.json"
    artifacts.write_json(target, {"loss": 1.0})

    def crash(f):
        f.write(b'{"loss": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"loss": 1.0}
    assert list(tmp_path.iterdir()) == [target], "no temporary file is left behind"
    with pytest.raises(TypeError):
        artifacts.write_json(target, {"loss": object()})
    assert json.loads(target.read_text()) == {"loss": 1.0}


def test_json_never_holds_nan(tmp_path):
    artifacts.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None]}


def test_csv_rows_may_have_different_columns(tmp_path):
    artifacts.write_csv(tmp_path / "h.csv", [{"step": 1, "loss": 2.0}, {"step": 2, "acc": 0.5}])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["step,loss,acc", "1,2.0,", "2,,0.5"]


def test_corrupt_files_are_reported_by_name(tmp_path):
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(artifacts.CorruptArtifact, match="state.pt"):
        artifacts.load_checkpoint(bad)
    (tmp_path / "run.json").write_text("{half")
    with pytest.raises(artifacts.CorruptArtifact, match="run.json"):
        artifacts.read_json(tmp_path / "run.json")


class NotATensor:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    artifacts.save_checkpoint(path, {"w": torch.arange(3.0), "step": 5, "rng": {"state": 2**100}})
    loaded = artifacts.load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["step"] == 5 and loaded["rng"]["state"] == 2**100
    torch.save({"obj": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(artifacts.CorruptArtifact, match="code.pt"):
        artifacts.load_checkpoint(tmp_path / "code.pt")


# --- registry -----------------------------------------------------------------------------------
def _module(**changes) -> Module:
    fields = dict(name="demo", category="cat", title="t", summary="s",
                  presets={"toy": DemoConfig(steps=1), "default": DemoConfig()}, run=lambda c, ctx: {"loss": 0.0},
                  metrics={"loss": "the loss"}, checks=[Check("loss", "<", 1.0)])
    return Module(**{**fields, **changes})


QUESTIONS = '[[question]]\nid = "demo-q"\nlevel = 1\nq = "?"\nanswer = "!"\nkey_points = ["x"]\n'
BRIEF_SECTION = ('definition = "d"\nhow_it_works = "h"\npitfalls = ["p"]\ncomparison_q = "c?"\ncomparison = "c"\n'
                 'ran_aloud = "The loss fell to {loss:.2f}."\n')
BRIEF = (f'[en]\n{BRIEF_SECTION}[zh]\n{BRIEF_SECTION}title = "t"\n[zh.metrics]\nloss = "l"\n'
         '[zh.checks]\n"loss < 1" = "c"\n')
BUGS = "".join(f'[[bug]]\nid = "b{i}"\ntitle = "t"\nfile = "core/checks.py"\nfind = \'"{op}": operator.{name}\'\n'
               f'replace = \'"{op}": operator.ne\'\nsymptom = "s"\ncaught_by = ["check:loss"]\n'
               for i, (op, name) in enumerate([("<", "lt"), (">", "gt"), ("<=", "le")]))
"""three planted bugs in a real file of the checkout (a bug's file is relative to the repository root)"""


def _folder(tmp_path: Path, category="cat", readme=True, questions=QUESTIONS, brief=BRIEF, bugs=BUGS) -> Path:
    folder = tmp_path / category / "demo"
    folder.mkdir(parents=True)
    if readme:
        (folder / "README.md").write_text("# demo")
    if questions is not None:
        (folder / "questions.toml").write_text(questions)
    if brief is not None:
        (folder / "brief.toml").write_text(brief, encoding="utf-8")
    if bugs is not None:
        (folder / "bugs.toml").write_text(bugs, encoding="utf-8")
    return folder / "module.py"


def test_a_valid_manifest_passes_validation(tmp_path):
    assert validate(_module(), _folder(tmp_path)) == []


@pytest.mark.parametrize("module_changes, folder_changes, expected", [
    ({}, {"category": "other"}, "does not match its folder"),
    ({}, {"readme": False}, "missing README.md"),
    ({}, {"questions": None}, "missing questions.toml"),
    ({}, {"questions": "[[question]]\nid = 'x'\n"}, "question #1 (x): KeyError('level')"),
    ({}, {"questions": "[[question]]\nid = 'x'\nlevel = 4\nq = 'q'\nanswer = 'a'\nkey_points = []\n"},
     "level must be 1, 2 or 3"),
    ({}, {"questions": QUESTIONS + "follow_ups = ['demo-nope']\n"}, "follow-ups not in this bank"),
    ({}, {"questions": "not toml ["}, "Expected '='"),
    ({}, {"brief": None}, "missing brief.toml"),
    ({}, {"brief": f"[en]\n{BRIEF_SECTION}"}, "no [zh] table"),
    ({}, {"brief": BRIEF.replace('how_it_works = "h"\n', "", 1)}, "[en] lacks how_it_works"),
    ({}, {"brief": BRIEF.replace('pitfalls = ["p"]', "pitfalls = []")}, "[en] pitfalls must be a non-empty list"),
    ({}, {"brief": f"[en]\n{BRIEF_SECTION}[zh]\n" + BRIEF_SECTION.replace('comparison = "c"', 'comparison = " "')},
     "[zh] comparison must be a non-empty string"),
    ({}, {"brief": "[en\n"}, "Expected ']'"),
    ({}, {"bugs": None}, "missing bugs.toml"),
    ({}, {"bugs": BUGS.split("[[bug]]", 3)[0] + "[[bug]]" + BUGS.split("[[bug]]")[1]}, "1 planted bugs; a module lists at least 3"),
    ({}, {"bugs": BUGS.replace("operator.lt\'", "operator.lt  \'")}, "occurs 0 times in core/checks.py"),
    ({}, {"bugs": BUGS.replace('caught_by = ["check:loss"]', 'caught_by = ["check:accuracy"]', 1)},
     "names check 'accuracy', which is not a check of the toy preset"),
    ({"presets": {"default": DemoConfig()}}, {}, "missing preset 'toy'"),
    ({"checks": [Check("accuracy", ">", 0.9)]}, {}, "'accuracy', which is not a reported metric"),
    ({"checks": [Check("loss", "<", ref="baseline")]}, {}, "'baseline', which is not a reported metric"),
    ({"checks": [Check("loss", "<", 1.0, presets=("big",))]}, {}, "unknown preset 'big'"),
    ({"presets": {"toy": LooseConfig(), "default": LooseConfig()}}, {},
     "config fields that do not declare their valid values: steps (int without a Range), seed (int without a Range)"),
    ({"presets": {"toy": DemoConfig(steps=0), "default": DemoConfig()}}, {},
     "preset 'toy' is not valid: steps=0 is out of range: expected int in [1, 1000]"),
])
def test_contract_violations_are_named(tmp_path, module_changes, folder_changes, expected):
    errors = validate(_module(**module_changes), _folder(tmp_path, **folder_changes))
    assert any(expected in e for e in errors), errors


def test_a_broken_manifest_is_reported_and_the_rest_still_list(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    good = tmp_path / "post_train" / "zz_registry_test" / "good"
    broken = tmp_path / "post_train" / "zz_registry_test" / "broken"
    for folder in (good, broken):
        folder.mkdir(parents=True)
        (folder / "README.md").write_text("# x")
        (folder / "questions.toml").write_text(QUESTIONS)
        (folder / "brief.toml").write_text(BRIEF)
        (folder / "bugs.toml").write_text(BUGS)
    (good / "module.py").write_text(textwrap.dedent("""
        from core.checks import Check
        from core.registry import Module
        from tests.test_core import DemoConfig
        MODULE = Module(name="zz_good", category="zz_registry_test", title="t", summary="s",
                        presets={"toy": DemoConfig(), "default": DemoConfig()}, run=lambda c, ctx: {"loss": 0.0},
                        metrics={"loss": "l"}, checks=[Check("loss", "<", 1.0)])
    """))
    (broken / "module.py").write_text("MODULE = Module(  # syntax error\n")
    registry = discover(tmp_path)
    assert list(registry.modules) == ["zz_good"]
    assert [b.path for b in registry.broken] == [broken / "module.py"]
    assert "SyntaxError" in registry.broken[0].error


def test_the_shipped_modules_are_all_valid(registry):
    assert registry.broken == []
    assert {"mdp", "td_learning", "gae", "advantage"} <= set(registry.modules)


# --- run context --------------------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_from_another_config(registry, workdir):
    module = registry.get("mdp")
    ctx = RunContext(module, "toy", DemoConfig(resume=True))
    ctx.save_checkpoint(3, {"w": torch.ones(2)})
    step, state = ctx.load_checkpoint(10)
    assert step == 3 and torch.equal(state["w"], torch.ones(2))
    other = RunContext(module, "toy", DemoConfig(lr=0.5, resume=True))
    with pytest.raises(ResumeMismatch, match="differs in: lr"):
        other.load_checkpoint(10)
    assert RunContext(module, "toy", DemoConfig(resume=False)).load_checkpoint(10) is None


def test_run_writes_artifacts_and_indexes_the_latest_run_per_preset(run_module, workdir):
    first = run_module("mdp", "toy", ["eval_episodes=200"])
    first_id = json.loads((first.out_dir / "run.json").read_text())["run_id"]
    second = run_module("mdp", "toy", ["eval_episodes=300"], seed=4)
    record = json.loads((second.out_dir / "run.json").read_text())
    assert record["config"]["eval_episodes"] == 300 and record["seed"] == 4
    assert record["overrides"] == ["eval_episodes=300"]
    assert {"torch", "numpy", "gymnasium", "python"} <= set(record["versions"])
    assert all(set(c) >= {"check", "actual", "target", "passed"} for c in record["checks"])
    assert set(record["artifacts"]) >= {"metrics.json", "values_policy.png", "vi_convergence.csv"}
    assert all((second.out_dir / name).exists() for name in record["artifacts"])
    assert first_id != record["run_id"]
    assert read_run_index()["mdp"]["toy"]["run_id"] == record["run_id"], "the index names the latest run"
    assert latest_run("mdp", "toy")["run_id"] == record["run_id"]
    assert latest_run("mdp", "default") is None
    assert math.isfinite(json.loads((second.out_dir / "metrics.json").read_text())["v_start"])


def test_default_threads_one_for_toys_idle_cores_otherwise(monkeypatch):
    from core import run_context

    monkeypatch.setattr(run_context.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(run_context.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert run_context.default_threads("toy") == 1
    assert run_context.default_threads("default") == 5  # 8 cores, 2.6 busy: 5 idle
    monkeypatch.setattr(run_context.os, "getloadavg", lambda: (11.0, 0.0, 0.0))
    assert run_context.default_threads("default") == 1  # an overloaded machine still gets one
    monkeypatch.setattr(run_context.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert run_context.default_threads("default") == 8
