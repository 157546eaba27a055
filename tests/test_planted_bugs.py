"""Planted bugs (core/planted_bugs.py): every bug a module lists is caught, by its tests or, when it names
none, by its checks (scripts/plant_bugs.py runs every catcher); the contract refuses a bugs.toml that
plants nowhere, and the hunter itself reports a survivor."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.contract import BugsError, PlantedBug, parse_bugs
from core.paths import ROOT
from core import preloaded
from core.planted_bugs import hunt, sufficient_catchers
from core.registry import _validate_bugs, discover

REGISTRY = discover()


def needs_upstream(module, bug) -> bool:
    """A chained module's toy run starts from the toy chain; its test catchers need no upstream."""
    return bool(module.depends) and any(c.startswith("check:") for c in sufficient_catchers(bug))


BUGS = [pytest.param(m.name, b.id, id=f"{m.name}/{b.id}", marks=[pytest.mark.toy_chain] if needs_upstream(m, b) else [])
        for m in REGISTRY.modules.values() for b in m.bugs]


@pytest.mark.parametrize("module_name,bug_id", BUGS)
def test_every_planted_bug_is_caught(module_name, bug_id, request, pretrained_cache, monkeypatch):
    monkeypatch.setenv("FINETUNE_PRETRAINED_CACHE", str(pretrained_cache))  # the hunts share the session's
    module = REGISTRY.get(module_name)
    bug = next(b for b in module.bugs if b.id == bug_id)
    upstream = request.getfixturevalue("toy_chain").folder if needs_upstream(module, bug) else None
    found = hunt(module, bug, upstream, only=sufficient_catchers(bug))  # every catcher: scripts/plant_bugs.py
    survivors = [f"{v.catcher}: {v.detail}" for v in found.verdicts if not v.caught]
    assert not survivors, f"{module_name}/{bug_id} survived:\n" + "\n".join(survivors)


def test_the_hunter_reports_a_survivor_and_a_crash():
    """A harmless edit survives both kinds of catcher, and an edit that crashes is not a catch: the
    hunter cannot report a bug caught that its catcher did not see."""
    mdp = REGISTRY.get("mdp")
    line = "    return R + gamma * P @ V"
    test = "test:tests/test_mdp.py::test_linear_solve_and_iterative_evaluation_match_hand_values"  # parametrised
    edits = {"survived": (line + "  # harmless", ("check:vi_pi_max_abs_diff", test)),
             "crashed": (line + " + undefined_name", ("check:vi_pi_max_abs_diff",))}
    for word, (replace, catchers) in edits.items():
        bug = PlantedBug(id=word, module="mdp", title="t", file="post_train/rl_basics/mdp/code/mdp.py",
                         find=line, replace=replace, symptom="s", caught_by=catchers)
        verdicts = hunt(mdp, bug).verdicts
        assert [v.catcher for v in verdicts] == list(catchers)
        assert all(not v.caught and word in v.detail for v in verdicts), verdicts
    only_the_test = hunt(mdp, bug, only=(test,)).verdicts  # the crashing edit: its test alone runs, and is no catch
    assert [(v.catcher, v.caught) for v in only_the_test] == [(test, False)]


def test_the_suite_proves_each_bug_with_its_tests_else_its_checks():
    def bug(*catchers):
        return PlantedBug(id="b", module="m", title="t", file="f", find="x", replace="y", symptom="s", caught_by=catchers)
    test, other_test = "test:tests/test_x.py::test_a[1]", "test:tests/test_x.py::test_b"
    assert sufficient_catchers(bug("check:loss", test, "check:acc", other_test)) == (test, other_test)
    assert sufficient_catchers(bug("check:loss", "check:acc")) == ("check:loss", "check:acc")


def test_the_preloaded_launcher_runs_the_copy_with_its_env_and_stops_at_the_timeout(tmp_path):
    """Forked runs import this project's code from the copy they run in (not from the checkout the
    launcher was started from), see their own env and exit status, and are killed at the timeout."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "probe.py").write_text("import os, sys, time, core\n"
                                       "print(core.__file__, os.getcwd(), os.environ['PROBE'], sys.argv[1:])\n"
                                       "time.sleep(float(os.environ['NAP']))\nsys.exit(3)\n")
    status, output = preloaded.run(["probe.py", "a"], tmp_path, {"PROBE": "seen", "NAP": "0"}, timeout=60)
    assert status == 3
    assert output.split() == [str(tmp_path / "core" / "__init__.py"), str(tmp_path), "seen", "['a']"]
    assert preloaded.run(["probe.py"], tmp_path, {"PROBE": "x", "NAP": "30"}, timeout=1)[0] is None


def _write_bugs(tmp_path: Path, entries: list[dict]) -> Path:
    (tmp_path / "code.py").write_text("x = 1\ny = x + 1\nz = y * 2\n")
    lines = []
    for e in entries:
        lines.append("[[bug]]")
        lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {list(v)!r}" for k, v in e.items()]
    path = tmp_path / "bugs.toml"
    path.write_text("\n".join(lines).replace("'", '"'))
    return path


def _bug(i: int, **changes) -> dict:
    return {"id": f"b{i}", "title": "t", "file": "code.py", "find": ["x = 1", "y = x + 1", "z = y * 2"][i % 3],
            "replace": "x = 0", "symptom": "s", "caught_by": ["test:tests/test_x.py::test_y"], **changes}


def test_the_contract_refuses_bugs_that_plant_nowhere_or_name_no_catcher(tmp_path):
    assert len(parse_bugs(_write_bugs(tmp_path, [_bug(i) for i in range(3)]), "m", root=tmp_path)) == 3
    cases = {
        "at least 3": [_bug(0), _bug(1)],
        "occurs 0 times": [_bug(0, find="w = 9"), _bug(1), _bug(2)],
        "occurs 2 times": [_bug(0, find="x"), _bug(1), _bug(2)],
        "replace equals find": [_bug(0, replace="x = 1"), _bug(1), _bug(2)],
        "caught_by is empty": [_bug(0, caught_by=[]), _bug(1), _bug(2)],
        "is not check:<metric>": [_bug(0, caught_by=["assert:x"]), _bug(1), _bug(2)],
        "duplicate bug ids": [_bug(0), _bug(1, id="b0"), _bug(2)],
        "does not exist": [_bug(0, file="nowhere.py"), _bug(1), _bug(2)],
    }
    for message, entries in cases.items():
        with pytest.raises(BugsError, match=message):
            parse_bugs(_write_bugs(tmp_path, entries), "m", root=tmp_path)


def test_the_registry_refuses_a_check_catcher_the_toy_preset_does_not_run(tmp_path, monkeypatch):
    ppo = REGISTRY.get("ppo")
    bugs = [{**_bug(i), "file": b.file, "find": b.find} for i, b in enumerate(ppo.bugs[:3])]
    bugs[0]["caught_by"] = ["check:greedy_return_min"]  # a default-preset-only check
    bugs[1]["caught_by"] = ["check:no_such_metric"]
    (tmp_path / "code.py").write_text("")
    path = tmp_path / "bugs.toml"
    path.write_text(_write_bugs(tmp_path, bugs).read_text())
    errors = _validate_bugs(path, ppo)
    assert len(errors) == 2 and "greedy_return_min" in errors[0] and "no_such_metric" in errors[1]


def test_module_readmes_show_their_planted_bugs():
    proc = subprocess.run([sys.executable, "scripts/build_module_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
