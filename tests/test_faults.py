"""Bad input and faults: every user error is exit 2 with one line, a bug is exit 3 with its traceback
in a file, and an interrupted, killed or failed run never leaves a folder that mixes two runs."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run
from core import artifacts, cli, preloaded
from core.config import (ConfigError, InsideWorkdir, Length, Range, Seed, apply_overrides, field_problems,
                         field_types, type_name, undeclared, validate)
from core.errors import CorruptArtifact
from core.paths import ROOT
from core.run_context import RunContext, RunResult, build_config, crashed_folder, execute, read_run_index


@pytest.fixture
def quick_mdp(registry, monkeypatch):
    """The mdp module with its algorithm replaced by the recorded toy metrics and one artifact of each
    kind: these tests exercise the platform around a run, in milliseconds."""
    mdp = registry.get("mdp")
    recorded = json.loads((ROOT / "assets/results/mdp.json").read_text())["runs"]["toy"]["metrics"]

    def replay(cfg, ctx):
        ctx.path("notes.txt").write_text(f"seed {cfg.seed}")
        ctx.log("history", step=1, value=cfg.seed)
        return dict(recorded)
    monkeypatch.setattr(mdp, "run", replay)
    monkeypatch.setattr(run, "discover", lambda: registry)
    return mdp


@dataclass
class Ranged:
    steps: Annotated[int, Range(ge=1, le=1000)] = 10
    """steps"""
    lr: Annotated[float, Range(gt=0, le=1)] = 0.1
    lambdas: Annotated[tuple[float, ...], Range(ge=0, le=1)] = (0.5,)
    sweep: Annotated[tuple[int, ...], Range(ge=1, le=9), Length(0, 3)] = ()
    clip: Annotated[float, Range(gt=0, le=10)] | None = None
    cache_dir: Annotated[str, InsideWorkdir()] = "output/cache"
    top_k: Annotated[int, Range(ge=1, le=64)] = 1
    n_experts: Annotated[int, Range(ge=1, le=64)] = 4
    seed: Seed = 0

    def problems(self) -> list[str]:
        return [] if self.top_k <= self.n_experts else [f"top_k={self.top_k} exceeds n_experts={self.n_experts}"]


# --- declared ranges ----------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("steps=0", ["steps=0 is out of range", "int in [1, 1000]"]),
    ("steps=-5", ["out of range"]),
    ("steps=1000000000000", ["out of range"]),
    ("steps=１２", ["bad value '１２'", "expected int"]),  # int() would read full-width digits as 12
    ("steps=١٢", ["bad value", "expected int"]),
    ("lr=nan", ["bad value 'nan'", "float in (0, 1]"]),
    ("lr=inf", ["bad value 'inf'"]),
    ("lr=-inf", ["bad value"]),
    ("lr=1e300", ["out of range"]),
    ("lr=0", ["lr=0.0 is out of range", "(0, 1]"]),
    ("lambdas=", ["lambdas has 0 items", "1-64 comma-separated floats in [0, 1]"]),
    ("lambdas=0.5,1.5", ["item 1.5", "[0, 1]"]),
    ("lambdas=0.5,,1", ["bad value"]),
    ("sweep=1,2,3,4", ["sweep has 4 items"]),
    ("clip=0", ["out of range"]),
    ("cache_dir=../x", ["relative folder inside the work dir"]),
    ("cache_dir=/tmp/x", ["relative folder inside the work dir"]),
    ("cache_dir=", ["relative folder"]),
    ("seed=-1", ["seed=-1 is out of range", "2^32-1"]),
    (f"seed={2**40}", ["out of range"]),
    ("top_k=9", ["top_k=9 exceeds n_experts=4"]),
])
def test_a_value_outside_its_declared_range_is_refused_with_the_field_and_its_range(override, words):
    with pytest.raises(ConfigError) as refused:
        validate(apply_overrides(Ranged(), [override]))
    message = str(refused.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("override, value", [
    ("steps=1000", 1000), ("lr=1", 1.0), ("lambdas=0,1", (0.0, 1.0)), ("sweep=", ()), ("clip=none", None),
    ("cache_dir=output/x/../y", "output/x/../y"), (f"seed={2**32 - 1}", 2**32 - 1), ("top_k=4", 4), ("steps=+7", 7),
])
def test_a_value_inside_its_range_is_accepted(override, value):
    key = override.split("=")[0]
    assert getattr(validate(apply_overrides(Ranged(), [override])), key) == value


def test_help_shows_each_fields_range_and_the_registry_requires_one():
    types_ = field_types(Ranged)
    assert type_name(types_["steps"]) == "int in [1, 1000]"
    assert type_name(types_["lr"]) == "float in (0, 1]"
    assert type_name(types_["sweep"]) == "0-3 comma-separated ints in [1, 9]"
    assert type_name(types_["clip"]) == "float in (0, 10] or none"
    assert undeclared(Ranged) == []

    @dataclass
    class Loose:
        steps: int = 3
        rate: float | None = None
        names: tuple[str, ...] = ()
        seed: Seed = 0
    assert undeclared(Loose) == ["steps (int without a Range)", "rate (float without a Range)",
                                 "names (str without a marker)"]
    with pytest.raises(TypeError, match="exactly one lower end"):
        Range(ge=0, gt=0, le=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from([f.name for f in dataclasses.fields(Ranged)]), raw=st.text(max_size=30))
def test_any_text_for_any_field_is_either_refused_as_bad_input_or_lands_inside_the_declared_range(key, raw):
    try:
        config = validate(apply_overrides(Ranged(), [f"{key}={raw}"]))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    value = getattr(config, key)
    assert field_problems(key, value, field_types(Ranged)[key]) == []
    assert not (isinstance(value, float) and not math.isfinite(value))


# --- every field of every module, through the registry and the CLI -------------------------------
JUNK = ["0", "-1", "1000000000000", "nan", "inf", "-inf", "", "abc", "１２", "1e300", "0.5", "none", "[1]"]


def test_every_field_of_every_module_refuses_junk_or_declares_the_value(registry):
    accepted = 0
    for module in registry.modules.values():
        types_ = field_types(module.config_class)
        for field, tp in types_.items():
            for raw in JUNK:
                try:
                    config = build_config(module, "toy", [f"{field}={raw}"])
                except ConfigError as exc:
                    assert "\n" not in str(exc), (module.name, field, raw)
                    continue
                value = getattr(config, field)
                assert field_problems(field, value, tp) == [], (module.name, field, raw)
                assert not (isinstance(value, float) and not math.isfinite(value)), (module.name, field, raw)
                accepted += 1
    assert accepted > 0  # "0", "0.5" and "none" are valid somewhere: the test sees both outcomes


ISSUE_INPUTS = [  # the bad inputs the issue found crashing or silently accepted
    ("td_learning", "episodes=0"), ("td_learning", "episodes=-5"), ("td_learning", "episodes=1000000000000"),
    ("td_learning", "alpha=nan"), ("td_learning", "lambdas="), ("advantage", "checkpoint_every=0"),
    ("td_learning", "episodes=１２"), ("nanogpt", "lr=nan"), ("nanogpt", "lr=inf"), ("nanogpt", "batch_size=0"),
    ("moe", "top_k=99"), ("mdp", "gamma=1.5"), ("mdp", "gamma=-1"), ("cql", "batch_size=0"),
    ("nanogpt", "cache_dir=../x"),
]


@pytest.fixture
def validate_only(monkeypatch, registry):
    """run.main up to the parse and validate path: execute() validates the config, then stops."""
    def fake_execute(module, preset, overrides, seed, threads, console):
        config = build_config(module, preset, overrides, seed)
        return RunResult(module.name, preset, config, {}, [], {}, 0.0, Path("."))
    monkeypatch.setattr(run, "execute", fake_execute)
    monkeypatch.setattr(run, "discover", lambda: registry)


@pytest.mark.parametrize("module, override", ISSUE_INPUTS)
def test_the_bad_inputs_the_issue_found_exit_2_with_one_line(validate_only, workdir, capsys, module, override):
    assert run.main(["--module", module, "--toy", "--set", override]) == cli.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and override.split("=")[0] in err[0], err


@pytest.mark.parametrize("argv, words", [
    (["--module", "mdp", "--seed", "-1"], ["seed=-1 is out of range"]),
    (["--module", "mdp", "--seed", str(2**40)], ["out of range"]),
    (["--module", "mdp", "--seed", "７"], ["bad value '７'"]),
    (["--module", "mdp", "--threads", "-1"], ["--threads", "[1, 1024]"]),
    (["--module", "mdp", "--threads", "0"], ["--threads"]),
    (["--module", "mdp", "--toy", "--preset", "default"], ["not allowed with argument --toy"]),
    (["--module", "mdp", "--preset", "huge"], ["no preset 'huge'"]),
    (["--module", "mpd"], ["unknown module 'mpd'", "Did you mean: mdp"]),
    (["--nonsense"], ["unrecognized arguments: --nonsense"]),
    ([], ["say what to do: --list, --info NAME or --module NAME"]),
])
def test_bad_command_lines_exit_2_with_one_error_line(validate_only, workdir, capsys, argv, words):
    assert run.main(argv) == cli.BAD_INPUT
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0]


def test_the_accepted_boundaries_pass_validation(validate_only, workdir):
    assert run.main(["--module", "mdp", "--toy", "--seed", str(2**32 - 1), "--threads", "1"]) == cli.OK


# --- the exit contract: a bug is exit 3 with its traceback in a file -----------------------------
def test_a_bug_in_a_module_is_exit_3_with_the_traceback_in_the_crashed_folder(quick_mdp, workdir, capsys, monkeypatch):
    mdp = quick_mdp
    assert run.main(["--module", "mdp", "--toy"]) == cli.OK
    before = (workdir / mdp.rel_path / "output" / "toy" / "run.json").read_text()

    def buggy(cfg, ctx):
        ctx.path("partial.txt").write_text("written before the bug")
        return {}["missing key"]  # a KeyError in module code is a bug, not bad input
    monkeypatch.setattr(mdp, "run", buggy)
    capsys.readouterr()
    assert run.main(["--module", "mdp", "--toy"]) == cli.INTERNAL_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    log = crashed_folder(mdp, "toy") / "traceback.log"
    assert len(err) == 1 and "internal error" in err[0] and "KeyError" in err[0] and str(log) in err[0]
    assert "Traceback" in log.read_text() and "buggy" in log.read_text()
    assert (log.parent / "partial.txt").exists(), "what the run wrote stays beside its traceback"
    assert (workdir / mdp.rel_path / "output" / "toy" / "run.json").read_text() == before, "the previous run is intact"


def test_a_closed_output_pipe_stops_quietly(capsys):
    def main():
        raise BrokenPipeError(32, "Broken pipe")  # what print() raises once `| head` has gone
    assert cli.guard(main, cli.crash_log("test")) == cli.PIPE_CLOSED
    assert capsys.readouterr().err == ""


def test_an_interrupted_run_leaves_the_previous_run_and_no_staging_folder(quick_mdp, workdir, monkeypatch, capsys):
    mdp = quick_mdp
    assert run.main(["--module", "mdp", "--toy"]) == cli.OK
    link = workdir / mdp.rel_path / "output" / "toy"
    before = sorted(p.name for p in link.iterdir())

    def interrupted(cfg, ctx):
        ctx.path("half.csv").write_text("a,b\n")
        raise KeyboardInterrupt
    monkeypatch.setattr(mdp, "run", interrupted)
    assert run.main(["--module", "mdp", "--toy", "--seed", "3"]) == cli.INTERRUPTED
    assert sorted(p.name for p in link.iterdir()) == before
    assert [p for p in (link.parent / artifacts.RUNS).iterdir()] == [link.resolve()]


def test_an_unwritable_work_dir_is_exit_2_before_any_compute(registry, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FINETUNE_WORKDIR", str(blocker / "work"))
    ran = []
    monkeypatch.setattr(registry.get("mdp"), "run", lambda cfg, ctx: ran.append(1) or {})
    monkeypatch.setattr(run, "discover", lambda: registry)
    assert run.main(["--module", "mdp", "--toy"]) == cli.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0] and ran == []


def test_a_full_disk_is_exit_2_before_any_compute(registry, workdir, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(registry.get("mdp"), "run", lambda cfg, ctx: ran.append(1) or {})
    monkeypatch.setattr(run, "discover", lambda: registry)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=10 * 2**20))
    assert run.main(["--module", "mdp", "--toy"]) == cli.BAD_INPUT
    assert "MiB free" in capsys.readouterr().err and ran == []


# --- readers that survive a bad run index --------------------------------------------------------
@pytest.mark.parametrize("index_text", [
    "{not json",
    "[1, 2, 3]",
    json.dumps({"mdp": {"toy": {"run_id": "x"}}, "td_learning": ["toy"]}),
    json.dumps({"mdp": {"toy": {"run_id": "x", "finished_at": "yesterday", "wall_time_s": 1.0, "status": "passed",
                                "checks_passed": 1, "checks_total": 1, "out_dir": "../../etc"}}}),
])
def test_a_corrupt_or_hand_edited_run_index_is_reported_and_skipped_by_every_reader(quick_mdp, workdir, capsys,
                                                                                    index_text):
    index = workdir / "output" / "run_index.json"
    index.parent.mkdir(parents=True)
    index.write_text(index_text)
    assert run.main(["--list"]) == cli.OK
    assert run.main(["--info", "mdp"]) == cli.OK
    assert "warning:" in capsys.readouterr().err
    assert read_run_index() == {}

    assert run.main(["--module", "mdp", "--toy"]) == cli.OK
    out = capsys.readouterr()
    assert "PASS" in out.out and "rewritten without its unreadable entries" in out.err
    assert set(read_run_index()) == {"mdp"}
    assert (index.parent / "run_index.json.corrupt").read_text() == index_text, "the old index is kept"


@pytest.mark.parametrize("record", ["[1, 2]", '{"run_id": "x"}'])
def test_a_hand_edited_run_record_is_one_error_naming_the_file(quick_mdp, workdir, capsys, record):
    from scripts import interview_brief
    assert run.main(["--module", "mdp", "--toy"]) == cli.OK
    run_json = workdir / quick_mdp.rel_path / "output" / "toy" / "run.json"
    run_json.write_text(record)
    capsys.readouterr()
    assert interview_brief.main(["--module", "mdp"]) == cli.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run_json) in err[0] and "not a run record" in err[0]


def test_a_finished_run_prints_its_result_even_when_the_index_cannot_be_written(quick_mdp, workdir, capsys, monkeypatch):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(workdir / "output" / "run_index.json"))
    monkeypatch.setattr("core.run_context._update_index", unwritable)
    assert run.main(["--module", "mdp", "--toy"]) == cli.OK
    out = capsys.readouterr()
    assert "PASS" in out.out and "run index could not be updated" in out.err and "Permission denied" in out.err
    assert (workdir / quick_mdp.rel_path / "output" / "toy" / "run.json").exists()


# --- checkpoints are validated before they are applied -------------------------------------------
@pytest.fixture
def resumable(registry, workdir):
    @dataclass
    class Cfg:
        steps: Annotated[int, Range(ge=1, le=100)] = 10
        resume: bool = True
        seed: Seed = 0
    return RunContext(registry.get("mdp"), "toy", Cfg())


@pytest.mark.parametrize("content, words", [
    ([1, 2, 3], ["a list, not a dict"]),
    ({"step": 3}, ["no 'config'"]),
    ("drop:tables", ["no 'tables'"]),
    ("step:11", ["step 11 is outside this run's 0..10"]),
    ("step:-1", ["outside"]),
    ("step:true", ["'step' is a bool"]),
    ("rng:junk", ["'rng' does not hold"]),
])
def test_a_checkpoint_that_is_not_this_runs_is_refused_naming_the_file(resumable, content, words):
    resumable.save_checkpoint(3, {"w": torch.ones(2)})
    saved = torch.load(resumable.checkpoint_path, weights_only=True)
    if isinstance(content, str):
        key, _, value = content.partition(":")
        if key == "drop":
            del saved[value]
        else:
            saved[key] = {"step:11": 11, "step:-1": -1, "step:true": True, "rng:junk": {"python": 1}}[content]
    else:
        saved = content
    torch.save(saved, resumable.checkpoint_path)
    with pytest.raises(CorruptArtifact) as refused:
        resumable.load_checkpoint(10)
    assert str(resumable.checkpoint_path) in str(refused.value)
    for word in words:
        assert word in str(refused.value)


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_refused_naming_the_file(resumable):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    resumable.save_checkpoint(4, {"model": torch.nn.Linear(5, 2).state_dict(), "optimizer": opt.state_dict()})
    step, state = resumable.load_checkpoint(10)
    with pytest.raises(CorruptArtifact, match="does not fit this run's model.*size mismatch"):
        with resumable.restoring(opt):
            model.load_state_dict(state["model"])
    bad_opt = opt.state_dict()
    bad_opt["state"][0]["exp_avg"] = torch.zeros(7)
    with pytest.raises(CorruptArtifact, match="optimizer state 'exp_avg' has shape"):
        with resumable.restoring(opt):
            opt.load_state_dict(bad_opt)
    with pytest.raises(CorruptArtifact, match="KeyError"):
        with resumable.restoring():
            state["no such part"]


# --- killed runs: the output folder is the old run or the new one, never a mix ---------------------
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_sweep_removes_what_dead_processes_left_and_keeps_what_live_ones_write(tmp_path):
    output = tmp_path / "output"
    runs = output / artifacts.RUNS
    dead, alive = dead_pid(), os.getpid()
    for name in (f"toy-1-pid{dead}", f"toy-2-pid{alive}", f"toy-3-pid{dead}"):
        (runs / name).mkdir(parents=True)
    (output / "toy").symlink_to(Path(artifacts.RUNS) / f"toy-3-pid{dead}")  # the committed run
    leftovers = [output / f".metrics.json.{dead}.abcd1234.tmp", output / f".toy.{dead}.link.tmp"]
    leftovers[0].write_text("half")
    leftovers[1].symlink_to("nowhere")
    kept = output / f".metrics.json.{alive}.abcd1234.tmp"
    kept.write_text("being written")
    removed = artifacts.sweep_leftovers([tmp_path])
    assert sorted(removed) == sorted([*leftovers, runs / f"toy-1-pid{dead}"])
    assert sorted(p.name for p in runs.iterdir()) == [f"toy-2-pid{alive}", f"toy-3-pid{dead}"]
    assert kept.exists() and (output / "toy" / ".").resolve() == (runs / f"toy-3-pid{dead}").resolve()


def assert_one_whole_run(folder: Path, seeds: set[int]) -> int:
    record = json.loads((folder / "run.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name != "run.json")
    assert files == sorted(record["artifacts"]), "a file of another run in the folder"
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(record["metrics"]))
    newest = max((folder / name).stat().st_mtime for name in files)
    assert newest <= (folder / "run.json").stat().st_mtime, "a file written after this run finished"
    assert record["seed"] in seeds
    return record["seed"]


KILLABLE_RUN = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
import run
from core import artifacts
from core.registry import Registry
from post_train.rl_basics.mdp.module import MODULE as mdp  # only this module: no time spent importing the rest

mdp.path = Path({root!r}) / "post_train/rl_basics/mdp"
recorded = json.loads(open({record!r}).read())["runs"]["toy"]["metrics"]
KILL_AT = os.environ.get("KILL_AT")


def die_at(point):
    if point == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def replay(cfg, ctx):  # the platform's part of a run: artifacts, tables, figures
    for step in range(10):
        ctx.path(f"figure{{step}}.png").write_bytes(bytes(1000))
        ctx.log("history", step=step, seed=cfg.seed)
        die_at(f"step {{step}}")
    return dict(recorded)


def then_die(point, function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        die_at(point(*args) if callable(point) else point)
        return result
    return wrapped


def atomic_write(path, write, original=artifacts.atomic_write):
    def write_then_die(f):  # the temporary file is written, not yet renamed over the target
        write(f)
        f.flush()
        die_at("writing " + Path(path).name)
    return original(path, write_then_die)


artifacts.atomic_write = atomic_write
artifacts.write_csv = then_die("history.csv", artifacts.write_csv)
artifacts.write_json = then_die(lambda path, data: Path(path).name, artifacts.write_json)
artifacts.commit_run_folder = then_die("swapped", artifacts.commit_run_folder)
mdp.run = replay
run.discover = lambda: Registry({{"mdp": mdp}}, [])
sys.exit(run.main(sys.argv[1:]))
"""
KILL_POINTS = {  # where the run is kill -9'd -> whether the folder then holds the new run
    "step 0": False, "writing history.csv": False, "history.csv": False, "writing metrics.json": False,
    "metrics.json": False, "run.json": False, "swapped": True, "run_index.json": True, "writing run.json": False,
}


def test_runs_killed_at_every_point_leave_the_old_run_or_the_new_one(registry, workdir, tmp_path):
    script = tmp_path / "killable_run.py"
    script.write_text(KILLABLE_RUN.format(root=str(ROOT), record=str(ROOT / "assets/results/mdp.json")))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "FINETUNE_WORKDIR": str(workdir)}
    argv = [str(script), "--module", "mdp", "--toy"]
    status, log = preloaded.run([*argv, "--seed", "0"], ROOT, env, timeout=120)
    assert status == 0, log[-2000:]
    link = workdir / registry.get("mdp").rel_path / "output" / "toy"
    assert_one_whole_run(link, {0})
    points = [f"step {random.Random(13).randrange(1, 10)}", *KILL_POINTS]  # a step drawn at random, then each point
    for seed, point in enumerate(points, start=1):
        before = assert_one_whole_run(link, set(range(seed)))
        status, log = preloaded.run([*argv, "--seed", str(seed)], ROOT, {**env, "KILL_AT": point}, timeout=120)
        assert status == -9, f"{point}: the run was not killed ({status}): {log[-1000:]}"
        expected = seed if KILL_POINTS.get(point, False) else before
        assert assert_one_whole_run(link, set(range(seed + 1))) == expected, point
    assert len(list((link.parent / artifacts.RUNS).iterdir())) == 2 and list(workdir.rglob("*.tmp")), \
        "the last killed run left its folder and a temp file"
    status, log = preloaded.run([*argv, "--seed", "99"], ROOT, env, timeout=120)
    assert status == 0, log[-2000:]
    assert assert_one_whole_run(link, {99}) == 99
    assert list((link.parent / artifacts.RUNS).iterdir()) == [link.resolve()], "the next start swept them"
    assert not list(workdir.rglob("*.tmp"))


def test_a_chain_rebuilds_an_upstream_whose_model_folder_is_gone(registry, workdir, monkeypatch, capsys):
    """The run index names the latest upstream run, but its model folder was deleted: the downstream
    run builds the upstream again (one line says why) instead of failing on a missing file."""
    import core.registry
    from core.run_context import upstream_models

    built = []

    def upstream(cfg, ctx):
        built.append(ctx.preset)
        ctx.models_dir.mkdir(parents=True)
        (ctx.models_dir / "weights.txt").write_text("w")
        return json.loads((ROOT / "assets/results/mdp.json").read_text())["runs"]["toy"]["metrics"]

    def downstream(cfg, ctx):
        assert (upstream_models(ctx, "mdp") / "weights.txt").read_text() == "w"
        return json.loads((ROOT / "assets/results/gae.json").read_text())["runs"]["toy"]["metrics"]

    monkeypatch.setattr(registry.get("mdp"), "run", upstream)
    monkeypatch.setattr(registry.get("gae"), "run", downstream)
    monkeypatch.setattr(core.registry, "discover", lambda: registry)
    execute(registry.get("mdp"), "toy")
    execute(registry.get("gae"), "toy")
    assert built == ["toy"], "a present upstream is reused"
    model_dir = next(workdir.rglob("mdp/output/toy/model"))
    shutil.rmtree(model_dir)
    execute(registry.get("gae"), "toy")
    assert built == ["toy", "toy"]
    assert f"the indexed run's {model_dir} is gone" in capsys.readouterr().err.replace("\n", "")
