"""The smoke report: real runs of two fast modules, the report schema, statuses, and every kind of
regression against a previous report (planted in latest.json, or in hand-built reports)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from learning import smoke
from scripts.smoke_test import main

FAST = ["mdp", "gae"]


def read_latest(work: Path) -> dict:
    return json.loads((work / "output" / "smoke_reports" / smoke.LATEST).read_text())


def plant(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One real smoke session over FAST (in parallel), shared by the tests that read its report."""
    work = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_WORKDIR", str(work))
        code = main(["--modules", ",".join(FAST), "--jobs", "2"])
    return work, code, read_latest(work)


def test_fast_modules_pass_and_the_report_matches_its_schema(first_run, registry):
    work, code, report = first_run
    assert code == 0
    assert smoke.validate_report(report) == []
    assert json.loads((work / "output" / "smoke_reports" / report["file"]).read_text()) == report
    assert report["preset"] == "toy" and report["options"]["jobs"] == 2
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"].startswith("2.")
    assert list(report["modules"]) == FAST
    for name, entry in report["modules"].items():
        assert entry["status"] == "PASS" and entry["reason"] is None
        assert entry["help"]["exit_code"] == 0 and entry["help"]["files_created"] == []
        assert "config fields" in entry["help"]["stdout_tail"], "the help phase printed the config table"
        assert entry["run"]["command"] == f"python run.py --module {name} --preset toy"
        assert set(entry["metrics"]) == set(registry.get(name).metrics)
        assert entry["checks"] and all(c["passed"] for c in entry["checks"])
        for check in entry["checks"]:
            assert isinstance(check["actual"], (int, float)) and isinstance(check["target"], (int, float))
    assert report["modules"]["mdp"]["metrics"]["random_success_rate"] < 0.1
    assert report["summary"] == {"modules": 2, "PASS": 2, "CHECK_FAILED": 0, "FAIL": 0, "TIMEOUT": 0,
                                 "broken_manifests": 0, "regressions": 0, "ok": True}
    assert report["comparison"]["previous"] is None and report["comparison"]["regressions"] == []


def test_planted_metric_drift_and_slowdown_are_caught(first_run, monkeypatch, capsys):
    work, _, report = first_run
    planted = copy.deepcopy(report)
    gae = planted["modules"]["gae"]
    metric = next(k for k, v in gae["metrics"].items() if isinstance(v, float) and abs(v) > 1e-3)
    gae["metrics"][metric] *= 1.5
    gae["run"]["duration_s"] = 0.2  # any real run (interpreter and torch start included) is > 2x that
    baseline = plant(work / "planted.json", planted)
    monkeypatch.setenv("FINETUNE_WORKDIR", str(work))

    assert main(["--modules", "gae", "--jobs", "2", "--min-seconds", "0.1", "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    regressions = read_latest(work)["comparison"]["regressions"]
    assert {(r["kind"], r["item"]) for r in regressions} == {("metric", metric), ("slowdown", "run")}
    drift = next(r for r in regressions if r["kind"] == "metric")
    assert drift["previous"] == pytest.approx(report["modules"]["gae"]["metrics"][metric] * 1.5)
    assert drift["current"] == report["modules"]["gae"]["metrics"][metric], "same seed, same metric"
    assert f"metric {metric} moved" in out and "NOT OK: 1/1 PASS, 2 regression(s)" in out


def test_a_timeout_is_a_status_regression_and_allow_fail_only_reports(workdir, first_run):
    _, _, report = first_run
    baseline = copy.deepcopy(report)
    baseline["modules"] = {"advantage": baseline["modules"]["mdp"]}  # advantage "was PASS"
    baseline["summary"]["modules"] = baseline["summary"]["PASS"] = 1
    baseline["git"]["dirty"] = False
    baseline["file"] = "smoke_20260101T000000Z.json"
    plant(workdir / "output" / "smoke_reports" / baseline["file"], baseline)  # found, not given

    assert main(["--modules", "advantage", "--timeout", "0.5"]) == 1
    entry = read_latest(workdir)["modules"]["advantage"]
    assert entry["status"] == "TIMEOUT" and "timed out after" in entry["reason"]
    assert entry["help"]["timed_out"] and entry["help"]["duration_s"] < 5, "the process was killed"
    kinds = [r["kind"] for r in read_latest(workdir)["comparison"]["regressions"]]
    assert kinds == ["status"]

    assert main(["--modules", "advantage", "--timeout", "0.5", "--allow-fail"]) == 0
    assert read_latest(workdir)["summary"]["TIMEOUT"] == 1
    assert len(list((workdir / "output" / "smoke_reports").glob("smoke_*.json"))) == 3  # the baseline and two


def test_compare_flags_each_kind_and_tolerates_noise():
    def report(entries: dict, **options) -> dict:
        return {"schema_version": smoke.SCHEMA_VERSION, "preset": "toy", "modules": entries,
                "machine": {"cpu_count": 2, "platform": "x"},
                "options": {**vars(smoke.Options()), **options}}

    def entry(status="PASS", passed=True, metrics=None, run_s=2.0) -> dict:
        return {"status": status, "reason": None if status == "PASS" else "why",
                "checks": [{"check": "loss < 1", "actual": 0.5 if passed else 2.0, "target": 1, "passed": passed}],
                "metrics": metrics or {}, "run": {"timed_out": status == "TIMEOUT", "duration_s": run_s}}

    before = report({"a": entry(metrics={"m": 1.0, "steady": 1.0, "tiny": 1e-12, "gone_nan": 3.0}),
                     "b": entry(run_s=0.2), "c": entry(), "removed": entry()})
    now = report({"a": entry("CHECK_FAILED", passed=False, run_s=5.0,
                             metrics={"m": 1.2, "steady": 1.01, "tiny": 5e-12, "gone_nan": None}),
                  "b": entry(run_s=0.9),       # 4.5x, but under a second: noise
                  "c": entry("TIMEOUT", run_s=600.0), "new": entry()})
    regressions, notes = smoke.compare(before, now)
    found = sorted((r["module"], r["kind"], r["item"]) for r in regressions)
    assert found == [("a", "check", "loss < 1"), ("a", "metric", "gone_nan"), ("a", "metric", "m"),
                     ("a", "slowdown", "run"), ("a", "status", None), ("c", "status", None),
                     ("removed", "missing", None)]
    assert any("new: not in the previous report" in n for n in notes)

    subset = report(now["modules"], modules=["a", "b", "c", "new"])
    assert "missing" not in {r["kind"] for r in smoke.compare(before, subset)[0]}, "a subset run skips no module"
    other_jobs = report(now["modules"], jobs=2)
    assert "slowdown" not in {r["kind"] for r in smoke.compare(before, other_jobs)[0]}
    assert smoke.compare({**before, "schema_version": 0}, now) == ([], [
        f"previous report has schema_version 0, this is {smoke.SCHEMA_VERSION}: not compared"])


def test_the_baseline_is_the_pinned_report_else_the_newest_passing_one_from_a_clean_tree(first_run, workdir):
    _, _, report = first_run
    folder = workdir / "output" / "smoke_reports"

    def session(name: str, dirty: bool, passed: bool, preset: str = "toy") -> dict:
        planted = copy.deepcopy(report)
        planted.update(file=name, preset=preset)
        planted["git"]["dirty"] = dirty
        if not passed:  # a planted bug: one module failed its checks
            planted["modules"]["gae"]["status"] = "CHECK_FAILED"
            planted["summary"].update(PASS=1, CHECK_FAILED=1, ok=False)
        plant(folder / name, planted)
        return planted

    assert smoke.find_previous("toy")[0] is None
    session("smoke_20260101T000000Z.json", dirty=False, passed=True)
    session("smoke_20260102T000000Z.json", dirty=True, passed=False)   # the broken, uncommitted tree
    session("smoke_20260103T000000Z.json", dirty=False, passed=False)
    session("smoke_20260104T000000Z.json", dirty=False, passed=True, preset="default")
    found, notes = smoke.find_previous("toy")
    assert found["file"] == "smoke_20260101T000000Z.json"
    assert "every module passed, from a clean tree (2 newer ones did not qualify)" in notes[-1]

    pinned = smoke.pin_baseline(folder / "smoke_20260102T000000Z.json", "toy")  # --set-baseline
    found, notes = smoke.find_previous("toy")
    assert found["file"] == "smoke_20260102T000000Z.json" and "pinned with --set-baseline" in notes[-1]
    assert smoke.find_previous("toy", folder / "smoke_20260103T000000Z.json")[0]["file"] == "smoke_20260103T000000Z.json"
    with pytest.raises(smoke.SmokeError, match="not a report of preset 'toy'"):
        smoke.find_previous("toy", folder / "smoke_20260104T000000Z.json")
    for typo in (folder / "no-such-report.json", folder):  # a missing file, a folder
        with pytest.raises(smoke.SmokeError, match=f"--baseline {typo}: cannot read it"):
            smoke.find_previous("toy", typo)
    pinned.write_text("{broken")
    found, notes = smoke.find_previous("toy")
    assert found["file"] == "smoke_20260101T000000Z.json" and "skipped the pinned baseline" in notes[0]


def test_set_baseline_pins_the_sessions_report(first_run, workdir, monkeypatch):
    monkeypatch.setattr(smoke, "run_modules", lambda modules, preset, *args, **kwargs: copy.deepcopy(
        {name: first_run[2]["modules"][name] for name in ("mdp",)}))
    assert main(["--modules", "mdp", "--set-baseline"]) == 0
    folder = workdir / "output" / "smoke_reports"
    assert json.loads((folder / "baseline_toy.json").read_text()) == read_latest(workdir)
    assert main(["--modules", "mdp"]) == 0
    pinned = json.loads((folder / "baseline_toy.json").read_text())["file"]
    assert read_latest(workdir)["comparison"]["previous"] == pinned
    assert any(n.startswith(f"baseline: {pinned}, pinned") for n in read_latest(workdir)["comparison"]["notes"])


@pytest.mark.parametrize("help_exit, files, run_exit, checks, timed_out, expected", [
    (0, [], 0, [True, True], False, "PASS"),
    (0, [], 1, [True, False], False, "CHECK_FAILED"),
    (0, [], 1, None, False, "FAIL"),               # exit 1 but no run.json: a crash, not a check
    (0, [], 0, [False], False, "FAIL"),            # exit code and run.json disagree
    (2, [], 0, [True], False, "FAIL"),
    (0, ["post_train/x/output/toy/run.json"], 0, [True], False, "FAIL"),  # --help ran something
    (0, [], -9, None, True, "TIMEOUT"),
])
def test_classify(help_exit, files, run_exit, checks, timed_out, expected):
    help_phase = {"exit_code": help_exit, "files_created": files, "timed_out": False, "duration_s": 1.0}
    run_phase = {"exit_code": run_exit, "timed_out": timed_out, "duration_s": 1.0}
    record = None if checks is None else {"checks": [{"check": f"c{i}", "passed": ok} for i, ok in enumerate(checks)]}
    status, reason = smoke.classify(help_phase, run_phase, record)
    assert status == expected
    assert (reason is None) == (expected == "PASS")


def test_validate_report_names_what_is_wrong(first_run):
    broken = copy.deepcopy(first_run[2])
    broken["modules"]["mdp"]["status"] = "OK"
    del broken["modules"]["gae"]["checks"][0]["actual"]
    broken["options"]["jobs"] = "2"
    assert sorted(smoke.validate_report(broken)) == [
        "report.modules.gae.checks[0]: missing 'actual'",
        "report.modules.mdp.status: 'OK' is not one of ['PASS', 'CHECK_FAILED', 'FAIL', 'TIMEOUT']",
        "report.options.jobs: expected int, got str",
    ]


def test_bad_input_exits_2(workdir, capsys):
    assert main(["--modules", "mdpp"]) == 2
    assert "Did you mean: mdp" in capsys.readouterr().err
    assert main(["--modules", "mdp", "--preset", "huge"]) == 2
    assert "preset 'huge' does not exist for mdp" in capsys.readouterr().err
    assert main(["--jobs", "0"]) == 2
    assert not (workdir / "output" / "smoke_reports").exists(), "bad input writes no report"
