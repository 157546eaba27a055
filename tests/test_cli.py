"""run.py as a user meets it: list, info, module help, runs, and every kind of bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

import run
from core.paths import ROOT


@pytest.fixture
def cli(workdir, capsys):
    def _cli(*argv: str) -> tuple[int, str]:
        code = run.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return _cli


def test_list_shows_every_module_with_its_last_runs(cli, registry):
    code, out = cli("--list")
    assert code == 0
    for name in registry.modules:
        assert name in out
    assert "never" in out, "a fresh work dir has no runs yet"
    cli("--module", "mdp", "--toy", "--set", "eval_episodes=200")
    code, out = cli("--list")
    n = len(registry.get("mdp").checks)  # all apply at the toy preset's gamma = 0.99
    assert f"{n}/{n} checks" in out


def test_info_names_metrics_checks_and_presets(cli):
    code, out = cli("--info", "mdp")
    assert code == 0
    for word in ("vi_pi_max_abs_diff", "success_rate >= 0.7", "toy, default", "README.md"):
        assert word in out


def test_module_help_lists_fields_and_runs_nothing(cli, workdir):
    code, out = cli("--module", "mdp", "--help")
    assert code == 0
    for word in ("gamma", "discount factor", "eval_episodes", "20000"):
        assert word in out
    assert not any(workdir.rglob("run.json")), "--help must not run the module"


def test_unknown_module_suggests_the_closest_names(cli):
    code, out = cli("--module", "mpd", "--toy")
    assert code == 2
    assert "Did you mean: mdp" in out


@pytest.mark.parametrize("override, words", [
    ("gama=0.9", ["unknown key 'gama'", "allowed keys", "gamma"]),
    ("gamma=high", ["'gamma'", "expected float"]),
    ("map_name=5x5", ["expected one of 4x4|8x8"]),
])
def test_bad_set_exits_2_and_says_which_key(cli, override, words):
    code, out = cli("--module", "mdp", "--toy", "--set", override)
    assert code == 2
    for word in words:
        assert word in out


def test_unknown_preset_exits_2(cli):
    code, out = cli("--module", "mdp", "--preset", "huge")
    assert code == 2 and "presets: toy, default" in out


def test_failing_checks_exit_1(cli):
    # stopping value iteration at a loose residual leaves V far from V*: the exact checks must fail
    code, out = cli("--module", "mdp", "--toy", "--set", "theta=0.01", "--set", "eval_episodes=100")
    assert code == 1
    assert "FAIL" in out


def test_seed_flag_reaches_the_config(cli, workdir):
    code, _ = cli("--module", "mdp", "--toy", "--seed", "7", "--set", "eval_episodes=100")
    assert code == 0
    run_json = next(workdir.rglob("run.json")).read_text()
    assert '"seed": 7' in run_json


def test_run_py_is_a_script_with_exit_codes(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--module", "nope"], cwd=ROOT, capture_output=True,
                            text=True, env={"FINETUNE_WORKDIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "unknown module 'nope'" in result.stderr
