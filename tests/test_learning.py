"""The learning layer: the roadmap and level data resolve against the registry and the banks, the
committed Markdown is exactly what the data generates, and progress is computed from evidence: a
real run in the run index and reviews recorded in a progress db at controlled times."""
from __future__ import annotations

import dataclasses
import json
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fsrs
import pytest

import run
from core.contract import Question
from core.paths import ROOT
from learning import roadmap, smoke
from learning.grader import grade
from learning.progress_db import ProgressDB
from learning.questions import load_bank
from learning.roadmap import Drill, RoadmapError, Runs
from scripts import build_learning_docs, interview_qa, progress, smoke_test

NOW = datetime.now(timezone.utc)  # the run index records real finishing times, so progress is judged now
TODAY = NOW.astimezone().date()


@pytest.fixture(scope="module")
def data():
    return roadmap.load_roadmap(), roadmap.load_levels()


def review(db: ProgressDB, question: Question, rating: fsrs.Rating, when: datetime) -> None:
    db.record_review(question, rating, grade("an answer", question.key_points), "an answer", None, when)


def mdp_questions(registry, level: int) -> list[Question]:
    return [q for q in load_bank(registry.get("mdp")) if q.level == level]


def report_for(registry, db_path: Path | None, start=None) -> dict:
    days, levels = roadmap.load_checked(registry)
    return roadmap.evaluate(days, levels, registry, roadmap.gather_evidence(registry, db_path, NOW), start)


def items(report: dict, day: int, kind: str) -> list[dict]:
    return [i for i in report["days"][day - 1]["items"] if i["kind"] == kind]


# --- the data resolves ----------------------------------------------------------------------------
def test_every_reference_resolves_and_every_category_is_covered(registry, data):
    days, levels = data
    assert len(days) == 14 and [lv.level for lv in levels] == [1, 2, 3, 4, 5]
    assert roadmap.problems(days, levels, registry) == []
    run_categories = {registry.modules[m].category for day in days for r in day.runs for m in r.modules}
    uncovered = {m.category: m.name for m in registry.modules.values() if m.category not in run_categories}
    assert not uncovered, f"categories no roadmap day runs (category: a module): {uncovered}; add a day's " \
                          f"runs to learning/roadmap.toml, then python scripts/build_learning_docs.py"


def test_every_generated_command_parses_with_its_own_cli(registry, data):
    """The commands in the docs are argv for the real parsers: a renamed flag breaks this test."""
    days, levels = data
    commands = [c for day in days for r in day.runs for c in r.commands()]
    commands += [c for lv in levels for r in lv.runs for c in r.commands()]
    commands += [c for lv in levels for m in lv.mastery for c in m.commands()]
    commands += [d.command for day in days for d in day.drills] + [t.command for t in roadmap.TOOLS.values()]
    commands += [roadmap.brief_command(m) for day in days for m in day.briefs] + [roadmap.DAILY_REVIEW_COMMAND]
    parsers = {"run.py": run.parse_args, "scripts/interview_qa.py": interview_qa.parse_args,
               "scripts/smoke_test.py": smoke_test.parse_args, "scripts/progress.py": progress.parse_args}
    for command in commands:
        python, script, *argv = shlex.split(command)
        assert python == "python" and (ROOT / script).is_file(), command
        if script in parsers:
            args = parsers[script](argv)
            if script == "run.py":
                assert args.preset or args.toy, command
                assert registry.get(args.module)


def test_problems_name_what_does_not_resolve(registry, data):
    days, levels = data
    broken_day = dataclasses.replace(
        days[0], runs=(Runs(("mpd",), "toy"), Runs(("gae",), "huge")),
        read=(roadmap.Reading("mdp", ("What it is", "Nonexistent section")),),
        drills=(Drill(count=3, module="td_learning", level=3), Drill(count=3, module="gea")), checkpoint=9)
    found = "\n".join(roadmap.problems([broken_day, *days[1:]], levels, registry))
    assert "unknown module 'mpd'. Did you mean: mdp?" in found
    assert "module 'gae' has no preset 'huge'" in found
    assert "no section starting with 'Nonexistent section'" in found and "What it is'" not in found
    assert "unknown module 'gea'" in found
    assert "checkpoint 9 is not a level" in found


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('title = "MDPs', 'titel = "x"\ntitle = "MDPs', 1), "unknown keys ['titel']"),
    (lambda t: t.replace("day = 14", "day = 15"), "days must be 1..14 in order"),
    (lambda t: t.replace('{ scope = "due", count = 15 }', '{ scope = "overdue", count = 15 }', 1), "scope must be"),
    (lambda t: t.replace('tools = ["stats"]', 'tools = ["stat"]', 1), "unknown tools ['stat']"),
    (lambda t: t.replace("count = 3 }", "count = true }", 1), "count must be int"),
])
def test_format_errors_are_reported_with_their_place(tmp_path, edit, message):
    path = tmp_path / "roadmap.toml"
    path.write_text(edit(roadmap.ROADMAP_TOML.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(RoadmapError, match=message.replace("[", r"\[").replace("]", r"\]")):
        roadmap.load_roadmap(path)


def test_committed_docs_are_exactly_what_the_data_generates(registry):
    for path, text in roadmap.rendered_docs(registry).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run python scripts/build_learning_docs.py")
    assert build_learning_docs.main(["--check"]) == 0


def test_roadmap_doc_shows_generated_commands_and_the_honest_header(registry, data):
    days, _ = data
    text = roadmap.ROADMAP_MD.read_text(encoding="utf-8")
    assert "covers the modules that exist today" in text and "grows as modules are added" in text
    for day in days:
        assert f"## Day {day.day} — {day.title}" in text
        for drill in day.drills:
            assert drill.command in text
    assert "python run.py --module mdp --toy\n" in text and "python scripts/smoke_test.py" in text
    assert "`post_train/rl_basics/mdp/README.md`: *What it is*; *The equations*" in text


# --- progress from evidence -----------------------------------------------------------------------
def test_fresh_work_dir_is_day_one_today_and_writes_nothing(registry, workdir):
    report = report_for(registry, None)
    assert (report["day"], report["start"], report["level"]) == (1, TODAY.isoformat(), 0)
    assert report["start_source"].startswith("today")
    assert not (workdir / "output" / "progress.db").exists(), "looking at progress must not create the db"
    assert all(i["done"] is False for d in report["days"] for i in d["items"] if i["kind"] == "run")


def test_run_and_reviews_make_day_three_with_day_one_done_and_level_one_passed(registry, run_module, workdir):
    run_module("mdp", "toy", ["eval_episodes=200"])
    db_path = workdir / "progress.db"
    with ProgressDB(db_path, fsrs.Scheduler(enable_fuzzing=False)) as db:
        for q in mdp_questions(registry, 1):
            review(db, q, fsrs.Rating.Easy, NOW - timedelta(days=2))  # Easy: straight to the Review state
    report = report_for(registry, db_path)

    assert report["day"] == 3 and report["phase"] == "during"
    assert report["start"] == (TODAY - timedelta(days=2)).isoformat()
    assert report["start_source"] == "the first drill review in the progress db"
    [mdp_run] = items(report, 1, "run")
    n_checks = len(registry.get("mdp").checks)
    assert mdp_run["done"] and mdp_run["evidence"].startswith(f"{n_checks}/{n_checks} checks passed")
    [drill] = items(report, 1, "drill")
    n = len(mdp_questions(registry, 1))
    assert drill["done"] and drill["evidence"] == f"{n} of the {n} level-1 questions answered at least once"
    assert report["days"][0]["done"] and not report["days"][1]["done"]
    assert [i["done"] for i in items(report, 1, "read")] == [None], "reading leaves no trace to check"

    level1, level2 = report["levels"][:2]
    assert level1["passed"] and [c["evidence"] for c in level1["criteria"]][1] == "mastery 100%"
    assert not level2["passed"] and report["level"] == 1
    assert items(report, 2, "checkpoint")[0]["done"], "day 2's checkpoint is level 1"
    assert report["review_days"] == 1 and report["streak"] == 0, "reviewed two days ago only"


def test_a_failed_check_fails_the_run_item_and_the_level(registry, run_module, workdir):
    run_module("mdp", "toy", ["eval_episodes=200", "max_sweeps=3"])  # value iteration stops far from V*
    db_path = workdir / "progress.db"
    with ProgressDB(db_path) as db:
        for q in mdp_questions(registry, 1):
            review(db, q, fsrs.Rating.Easy, NOW)
    report = report_for(registry, db_path)
    [mdp_run] = items(report, 1, "run")
    n_checks = len(registry.get("mdp").checks)  # the v_start_z check fails too: V after 3 sweeps is not what the env pays
    assert not mdp_run["done"] and mdp_run["evidence"].startswith(f"1/{n_checks} checks passed")
    assert report["levels"][0]["criteria"][1]["done"], "mastery holds; only the run fails"
    assert not report["levels"][0]["passed"] and report["level"] == 0


def test_low_mastery_fails_the_level_though_every_question_was_answered(registry, run_module, workdir):
    run_module("mdp", "toy", ["eval_episodes=200"])
    first, second = mdp_questions(registry, 1)[:2]
    db_path = workdir / "progress.db"
    with ProgressDB(db_path) as db:
        review(db, first, fsrs.Rating.Good, NOW)   # one Good: still in the learning steps
        review(db, second, fsrs.Rating.Again, NOW)
    report = report_for(registry, db_path)
    assert items(report, 1, "drill")[0]["done"], "both questions were answered"
    mastery = report["levels"][0]["criteria"][1]
    assert (mastery["done"], mastery["evidence"]) == (False, "mastery 0%")
    assert not report["levels"][0]["passed"]
    with ProgressDB(db_path) as db:
        review(db, first, fsrs.Rating.Good, NOW + timedelta(minutes=11))  # Good again after the step
    after = report_for(registry, db_path)["levels"][0]
    assert after["criteria"][1]["evidence"] == f"mastery {1 / len(mdp_questions(registry, 1)):.0%}"
    assert after["passed"] == (len(mdp_questions(registry, 1)) <= 2), "level 1 asks for half of them"


def test_review_drills_count_reviews_since_their_day(registry, workdir):
    questions = mdp_questions(registry, 2)
    db_path = workdir / "progress.db"
    with ProgressDB(db_path) as db:
        review(db, questions[0], fsrs.Rating.Good, NOW - timedelta(days=1))
        review(db, questions[1], fsrs.Rating.Good, NOW)
    evidence = roadmap.gather_evidence(registry, db_path, NOW)
    due_two = Drill(count=2, scope="due")
    assert not roadmap.drill_item(due_two, TODAY, evidence)["done"]
    assert roadmap.drill_item(due_two, TODAY - timedelta(days=1), evidence)["done"]
    assert roadmap.drill_item(Drill(count=1, scope="all", level=2), TODAY, evidence)["evidence"] == \
        f"1 level-2 reviews since {TODAY}"
    assert not roadmap.drill_item(Drill(count=1, scope="all", level=3), TODAY, evidence)["done"]


def test_start_option_and_the_days_outside_the_roadmap(registry, workdir):
    assert report_for(registry, None, start=TODAY - timedelta(days=4))["day"] == 5
    before = report_for(registry, None, start=TODAY + timedelta(days=3))
    assert (before["day"], before["phase"], before["start_source"]) == (None, "before", "--start")
    after = report_for(registry, None, start=TODAY - timedelta(days=14))
    assert (after["day"], after["phase"]) == (None, "after")
    assert after["days"][13]["date"] == (TODAY - timedelta(days=1)).isoformat()


def test_smoke_item_needs_a_valid_whole_report(registry, workdir):
    evidence = roadmap.gather_evidence(registry, None, NOW)
    assert roadmap.smoke_item(evidence) == (False, "no smoke report yet")
    (smoke.reports_dir()).mkdir(parents=True)
    (smoke.reports_dir() / smoke.LATEST).write_text('{"schema_version": 1}')
    done, said = roadmap.smoke_item(roadmap.gather_evidence(registry, None, NOW))
    assert not done and "does not match the report schema" in said


# --- the command lines ----------------------------------------------------------------------------
@pytest.fixture
def cli(workdir, capsys):
    def _cli(main, *argv: str) -> tuple[int, str]:
        capsys.readouterr()  # drop what fixture runs printed before
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return _cli


def test_progress_json_and_the_rich_view(cli, run_module):
    run_module("mdp", "toy", ["eval_episodes=200"])
    code, out = cli(progress.main, "--json")
    report = json.loads(out)
    assert code == 0 and report["day"] == 1 and items(report, 1, "run")[0]["done"]
    code, out = cli(progress.main, "--day", "2", "--module", "td_learning")
    assert code == 0 and "day 2 ·" in out and "python run.py --module td_learning --toy" in out
    assert "to reach level 1" in out
    code, out = cli(run.main, "--progress")
    assert code == 0 and "is day 1 of 14" in out and "level checkpoints" in out


@pytest.mark.parametrize("argv, message", [
    (["--day", "15"], "unknown day 15: the roadmap has days 1-14"),
    (["--day", "0"], "unknown day 0"),
    (["--module", "mpd"], "Did you mean: mdp?"),
    (["--start", "2026-02-30"], "invalid fromisoformat value"),
])
def test_bad_input_exits_2(cli, argv, message):
    code, out = cli(progress.main, *argv)
    assert code == 2 and message in out


def test_a_foreign_db_is_reported_and_left_untouched(cli, workdir):
    foreign = workdir / "notes.db"
    foreign.write_bytes(b"not a database")
    code, out = cli(progress.main, "--db", foreign)
    assert code == 2 and "not an SQLite database" in out
    assert foreign.read_bytes() == b"not a database"
