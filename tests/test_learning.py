"""The learning layer: the roadmap is derived from the registry by the rules of roadmap.toml (weights
place the days, a new module takes its place without an edit), every name it and the levels use
resolves, the committed Markdown is exactly what they generate, and progress is computed from
evidence: a real run in the run index and answers recorded in a progress db at controlled times."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import fsrs
import pytest

import run
from core.contract import Question
from core.paths import ROOT
from core.registry import Registry, validate
from learning import roadmap, smoke
from learning.grader import Grade
from learning.progress_db import ProgressDB
from learning.questions import load_bank
from learning.roadmap import Drill, RoadmapError, Runs
from scripts import build_learning_docs, interview_qa, progress, smoke_test

NOW = datetime.now(timezone.utc)  # the run index records real finishing times, so progress is judged now
TODAY = NOW.astimezone().date()
GOOD, LOW = 1.0, 0.0
"""grader scores: Good or better, and below Hard"""


@pytest.fixture(scope="module")
def data(registry):
    return roadmap.load_checked(registry)


def review(db: ProgressDB, question: Question, rating: fsrs.Rating, when: datetime, score: float = GOOD) -> None:
    grade = Grade(hits=(), misses=(), score=score, suggested=fsrs.Rating.Good)
    db.record_review(question, rating, grade, "an answer", None, when)


def questions_of(registry, module: str, level: int) -> list[Question]:
    return [q for q in load_bank(registry.get(module)) if q.level == level]


def report_for(registry, db_path: Path | None, start=None) -> dict:
    days, levels = roadmap.load_checked(registry)
    return roadmap.evaluate(days, levels, registry, roadmap.gather_evidence(registry, db_path, NOW), start)


def items(report: dict, day: int, kind: str) -> list[dict]:
    return [i for i in report["days"][day - 1]["items"] if i["kind"] == kind]


def run_item(report: dict, day: int, module: str, preset: str) -> dict:
    [item] = [i for i in items(report, day, "run") if (i["module"], i["preset"]) == (module, preset)]
    return item


def listed(ids: list[str]) -> str:
    """How a report sentence names questions: the first three, then "…"."""
    return ", ".join(ids[:3]) + (", …" if len(ids) > 3 else "")


def studied_on(days) -> dict[str, int]:
    return {name: d.day for d in days if d.track for name in d.modules}


# --- the plan: derived from the registry ----------------------------------------------------------
def test_every_module_is_on_the_plan_and_every_reference_resolves(registry, data):
    days, levels = data
    assert len(days) == 14 and [lv.level for lv in levels] == [1, 2, 3, 4, 5]
    assert roadmap.problems(days, levels, registry) == []
    assert roadmap.not_on_roadmap(days, registry) == [], "name the category in a track of learning/roadmap.toml"
    assert sorted(studied_on(days)) == sorted(registry.modules), "every module has a study day"
    assert list(days[-1].briefs) == list(studied_on(days)), "the last day briefs every module, in study order"


def test_the_days_lean_on_what_interviewers_ask(registry, data):
    days, _ = data
    day_of = studied_on(days)
    category = {name: registry.modules[name].category for name in day_of}
    foundation = [day_of[m] for m in day_of if category[m] == "rl_basics"]
    assert max(foundation) < min(d for m, d in day_of.items() if category[m] != "rl_basics"), "foundation first"
    assert max(foundation) <= 2, "RL basics are compressed into the first days"
    most_asked = {m for m in day_of if registry.modules[m].interview_weight == roadmap.FULL_WEIGHT}
    for name in most_asked:
        shared = days[day_of[name] - 1].modules
        assert len(shared) <= 2 and most_asked & set(shared) == {name}, \
            f"{name} is most asked: at most one lighter topic shares its day ({shared})"
        assert shared[0] == name, f"{name} leads its day, its lighter companion follows ({shared})"
    assert not [d for d in days if d.title.startswith("Review")], "no day is left free while study days are shared"
    llm_and_post_training = {day_of[m] for m in day_of if category[m] in ("llm", "alignment", "evaluation")}
    assert len(llm_and_post_training) >= 9
    assert max(day_of[m] for m in day_of if category[m] == "offline_rl") == 13, "offline RL, weighted low, comes last"
    mdp_day = days[day_of["mdp"] - 1]
    recall = len(questions_of(registry, "mdp", 1))
    assert Drill(recall, module="mdp", level=1) in mdp_day.drills, "every recall question"
    grpo_l2 = len(questions_of(registry, "grpo", 2))
    assert Drill(grpo_l2, module="grpo", level=2) in days[day_of["grpo"] - 1].drills, "weight 5: every question"


def test_study_order_and_the_day_budget():
    def fake(name: str, weight: int, depends: tuple[str, ...] = ()) -> SimpleNamespace:
        return SimpleNamespace(name=name, interview_weight=weight, depends=depends)
    a, b, c, d, e = fake("a", 2), fake("b", 5), fake("c", 5, ("d",)), fake("d", 3), fake("e", 1)
    registry = SimpleNamespace(modules={m.name: m for m in (a, b, c, d, e)})
    names = lambda modules: [m.name for m in modules]  # noqa: E731
    assert names(roadmap.study_order([a, b, c, d, e], False, registry)) == ["b", "d", "c", "a", "e"], \
        "heaviest first, but c waits for d, which it depends on"
    assert names(roadmap.study_order([a, b, c, d, e], True, registry)) == ["e", "a", "d", "b", "c"], "lightest first"

    one, two = roadmap.Track("one", ("x",), True), roadmap.Track("two", ("y",), False)
    tracks = [(one, [e, a, d]), (two, [b, c])]
    assert [names(ms) for _, ms in roadmap.study_days(tracks, 3)] == [["e", "a", "d"], ["b"], ["c"]], "budget 6"
    assert [names(ms) for _, ms in roadmap.study_days(tracks, 2)] == [["e", "a", "d"], ["b", "c"]], "budget 10"
    assert [names(ms) for _, ms in roadmap.study_days(tracks + [(two, [fake("f", 4)])], 4)] == \
        [["e", "a", "d"], ["b"], ["c"], ["f"]], "budget 10 leaves a day free: the shared day of the weight-5 modules splits"
    assert [names(ms) for _, ms in roadmap.study_days(tracks, 4)] == [["e", "a"], ["d"], ["b"], ["c"]], \
        "budget 6 fits in 3; the fourth day splits e a d where its weights (1 2 3) balance"
    g = fake("g", 4)
    assert [names(ms) for _, ms in roadmap.study_days([(two, [b, c, g, a, e])], 3)] == [["b", "e"], ["c"], ["g", "a"]], \
        "focused: the most-asked b and c never share a day, and e joins the first most-asked day still alone (budget 6)"
    assert [names(ms) for _, ms in roadmap.study_days([(two, [b, c, g, a, e])], 2)] == [["b", "c"], ["g", "a", "e"]], \
        "no focused plan fits in 2 days: the plain budget (10) decides"
    with pytest.raises(RoadmapError, match="2 tracks with modules do not fit in 1 study days"):
        roadmap.study_days(tracks, 1)


def _module_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "README.md").write_text(f"# {name}\n\n## 1. What it is\n\n## 2. Pitfalls\n")
    (folder / "questions.toml").write_text("".join(
        f'[[question]]\nid = "{name}-{i}"\nlevel = {level}\nq = "?"\nanswer = "!"\nkey_points = ["x"]\n'
        for i, level in enumerate((1, 2, 2, 3))))
    return folder


def test_a_new_module_takes_its_place_without_an_edit(registry, tmp_path):
    moe = registry.get("moe")
    new = {
        "kv_cache": dataclasses.replace(moe, name="kv_cache", title="KV cache: paging", interview_weight=5),
        "zero": dataclasses.replace(moe, name="zero", category="systems", interview_weight=4),
        "walker": dataclasses.replace(moe, name="walker", category="robotics", interview_weight=3),
    }
    for name, module in new.items():
        module.path = _module_folder(tmp_path, name)
    grown = Registry(dict(sorted({**registry.modules, **new}.items())), [])
    rules = roadmap.load_rules()
    days = roadmap.place_checkpoints(roadmap.plan(grown, rules), roadmap.load_levels(grown, rules))

    found = roadmap.problems(days, roadmap.load_levels(grown, rules), grown)
    assert len(days) == 14 and found and all("'walker'" in p or "walker's" in p for p in found), found
    kv_day = days[studied_on(days)["kv_cache"] - 1]
    assert kv_day.track == "LLM architecture and pretraining"
    assert "KV cache" in kv_day.title.split("; "), "the title's head"
    assert {Drill(1, module="kv_cache", level=1), Drill(2, module="kv_cache", level=2)} <= set(kv_day.drills)
    assert days[studied_on(days)["zero"] - 1].track == "Training and serving systems"
    assert roadmap.not_on_roadmap(days, grown) == ["walker"], "a category no track names is reported, not guessed"
    assert {"kv_cache", "zero"} <= set(days[-1].briefs) and "walker" not in days[-1].briefs
    assert [d.day for d in days if d.checkpoint] == sorted(d.day for d in days if d.checkpoint)


def test_free_days_become_review_days_before_the_final_one(registry):
    total = len(registry.modules) + 5
    rules = dataclasses.replace(roadmap.load_rules(), days=total)
    days = roadmap.plan(registry, rules)
    studied = [d for d in days if d.track]
    assert len(studied) == len(registry.modules), "budget 1: every module a day of its own"
    reviews = days[len(studied):-1]
    assert [d.day for d in reviews] == list(range(len(studied) + 1, total))
    assert all(d.title.startswith("Review") and d.tools == ("stats",) for d in reviews)
    assert days[-1].day == total and days[-1].title == "Final mock interview"


def test_checkpoints_fall_on_the_day_everything_they_select_is_studied(data):
    days, levels = data
    day_of = studied_on(days)
    placed = {d.checkpoint: d.day for d in days if d.checkpoint}
    assert placed[5] == 14 and list(placed) == sorted(placed)
    for level, day in placed.items():
        selected = {m for r in levels[level - 1].runs for m in r.modules}
        selected |= {m for c in levels[level - 1].mastery for m in c.modules}
        assert all(day_of[m] <= day for m in selected), level
    assert placed[1] == max(day_of[m] for m in levels[0].runs[0].modules)


def test_counts_in_words_are_the_counts_of_the_commands(registry, data):
    """One number makes both: the item a learner reads and the command they type."""
    days, _ = data
    evidence = roadmap.gather_evidence(registry, None, NOW)
    for day in days:
        for drill in day.drills:
            item = roadmap.drill_item(drill, TODAY, evidence)
            said = int(re.search(r"(?:answer|review) (\d+)", item["label"])[1])
            assert said == drill.count == int(item["command"].rsplit("--count ", 1)[1]), item
    final = days[-1]
    assert f"then {roadmap.load_rules().final_questions} questions" in final.outcome
    assert final.drills[-1].command.endswith(f"--all --count {roadmap.load_rules().final_questions}")


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
    greedy = dataclasses.replace(levels[0], runs=(Runs(("mdp",), "huge"),),
                                 mastery=(roadmap.Mastery(("moe",), 2, 1.0),), review_days=15)
    found = "\n".join(roadmap.problems([broken_day, *days[1:]], [greedy, *levels[1:]], registry))
    assert "unknown module 'mpd'. Did you mean: mdp?" in found
    assert "module 'gae' has no preset 'huge'" in found
    assert "no section starting with 'Nonexistent section'" in found and "What it is'" not in found
    assert "unknown module 'gea'" in found
    assert "checkpoint 9 is not a level" in found
    assert "level 1: asks for a huge run of 'mdp', which no roadmap day runs" in found
    moe_l2 = len(questions_of(registry, "moe", 2))
    assert (f"level 1: asks for 100% mastery of moe's level-2 questions, but the roadmap drills "
            f"{roadmap.drill_count(moe_l2, 2, 4)} of {moe_l2}") in found
    assert "level 1: asks for 15 drill days; the roadmap has 14" in found


def test_a_module_declares_a_valid_interview_weight(registry):
    mdp = registry.get("mdp")
    for bad in (0, 6, True, 2.5):
        errors = validate(dataclasses.replace(mdp, interview_weight=bad), mdp.path / "module.py")
        assert f"interview_weight must be an int in 1..5, got {bad!r}" in errors
    assert validate(dataclasses.replace(mdp, interview_weight=5), mdp.path / "module.py") == []
    assert {m.name for m in registry.modules.values() if m.interview_weight == 5} == \
        {"nanogpt", "attention", "tokenizer", "sft", "grpo", "ppo", "dpo", "peft", "rlhf"}


@pytest.mark.parametrize("file, edit, message", [
    ("roadmap", lambda t: t.replace('title = "RL foundations"', 'titel = "x"', 1),
     "missing ['title']; unknown keys ['titel']"),
    ("roadmap", lambda t: t.replace("days = 14", "days = 1"), "days must be at least 2"),
    ("roadmap", lambda t: t.replace('["offline_rl"]', '["llm"]'), "categories named by more than one track: ['llm']"),
    ("roadmap", lambda t: t.replace("foundation = true", 'foundation = "yes"'), "foundation must be bool"),
    ("levels", lambda t: t.replace('categories = ["rl_basics"], preset', 'categories = ["rl_basic"], preset', 1),
     "categories ['rl_basic'] are in no track"),
    ("levels", lambda t: t.replace("min_weight = 3", "min_weight = 6"), "min_weight must be in 1..5"),
    ("levels", lambda t: t.replace("level = 5", "level = 6"), "levels must be 1..5 in order"),
    ("levels", lambda t: t.replace("question_level = 1, min = 0.5 }]", "question_level = 1, min = true }]", 1),
     "min must be float"),
])
def test_format_errors_are_reported_with_their_place(registry, tmp_path, file, edit, message):
    source = roadmap.ROADMAP_TOML if file == "roadmap" else roadmap.LEVELS_TOML
    path = tmp_path / source.name
    path.write_text(edit(source.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(RoadmapError, match=re.escape(message)):
        if file == "roadmap":
            roadmap.load_rules(path)
        else:
            roadmap.load_levels(registry, roadmap.load_rules(), path)


def test_committed_docs_are_exactly_what_the_data_generates(registry):
    for path, text in roadmap.rendered_docs(registry).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} is stale: run python scripts/build_learning_docs.py")
    assert build_learning_docs.main(["--check"]) == 0


def test_roadmap_doc_shows_generated_commands_and_the_honest_header(registry, data):
    days, _ = data
    text = roadmap.ROADMAP_MD.read_text(encoding="utf-8")
    assert "No day is written by hand" in text and "grows as modules are added" in text
    for day in days:
        assert f"## Day {day.day} — {day.title}" in text
        for drill in day.drills:
            assert drill.command in text
    assert "python run.py --module mdp --toy\n" in text and "python scripts/smoke_test.py" in text
    llm_row = next(line for line in text.splitlines() if line.startswith("| LLM architecture and pretraining | "))
    assert all(f"`{name}` ({weight})" in llm_row for name, weight in (("nanogpt", 5), ("attention", 5), ("moe", 4))), llm_row
    assert "`post_train/rl_basics/mdp/README.md`: *What it is*; *The equations" in text


# --- progress from evidence -----------------------------------------------------------------------
def test_fresh_work_dir_is_day_one_today_and_writes_nothing(registry, workdir):
    report = report_for(registry, None)
    assert (report["day"], report["start"], report["level"]) == (1, TODAY.isoformat(), 0)
    assert report["start_source"].startswith("today")
    assert not (workdir / "output" / "progress.db").exists(), "looking at progress must not create the db"
    assert all(i["done"] is False for d in report["days"] for i in d["items"] if i["kind"] == "run")
    assert report["levels"][0]["lacking"][0] == "not run yet at toy: advantage, gae, mdp, td_learning"


def test_run_and_reviews_make_day_three_and_say_what_level_one_lacks(registry, run_module, workdir):
    run_module("mdp", "toy", ["eval_episodes=200"])
    mdp_recall = questions_of(registry, "mdp", 1)
    db_path = workdir / "progress.db"
    with ProgressDB(db_path, fsrs.Scheduler(enable_fuzzing=False)) as db:
        for q in mdp_recall:
            review(db, q, fsrs.Rating.Good, NOW - timedelta(days=2))
    report = report_for(registry, db_path)

    assert report["day"] == 3 and report["phase"] == "during"
    assert report["start"] == (TODAY - timedelta(days=2)).isoformat()
    assert report["start_source"] == "the first drill review in the progress db"
    mdp_toy = run_item(report, 1, "mdp", "toy")
    n_checks = len(registry.get("mdp").checks)
    assert mdp_toy["done"] and mdp_toy["evidence"].startswith(f"{n_checks}/{n_checks} checks passed")
    [drill] = [i for i in items(report, 1, "drill") if "mdp level-1" in i["label"]]
    n = len(mdp_recall)
    assert drill["done"] and drill["evidence"] == f"{n} of the {n} level-1 questions answered at least once"
    assert not report["days"][0]["done"], "td_learning and the default runs are still to do"
    assert [i["done"] for i in items(report, 1, "read")] == [None] * len(report["days"][0]["modules"]), \
        "reading leaves no trace to check"

    level1 = report["levels"][0]
    mastery = {c["module"]: c for c in level1["criteria"] if c["kind"] == "mastery"}
    assert (mastery["mdp"]["done"], mastery["mdp"]["evidence"]) == (True, f"mastery 100% ({n} of {n})")
    never = [q.id for m in ("advantage", "gae", "td_learning") for q in questions_of(registry, m, 1)]
    assert level1["lacking"] == [
        "not run yet at toy: advantage, gae, td_learning",
        f"level-1 mastery under 50% in 3 modules (advantage, gae, td_learning): {len(never)} never answered "
        f"({listed(never)})",
    ]
    assert not level1["passed"] and report["level"] == 0
    assert report["review_days"] == 1 and report["streak"] == 0, "reviewed two days ago only"


def test_a_failed_check_fails_the_run_item_and_says_where_to_look(registry, run_module, workdir):
    result = run_module("mdp", "toy", ["eval_episodes=200", "max_sweeps=3"])  # value iteration stops far from V*
    report = report_for(registry, None)
    mdp_toy = run_item(report, 1, "mdp", "toy")
    n_checks = len(registry.get("mdp").checks)  # v_start_z fails too: V after 3 sweeps is not what the env pays
    assert not mdp_toy["done"] and mdp_toy["evidence"].startswith(f"1/{n_checks} checks passed")
    assert mdp_toy["evidence"].endswith(f"{result.out_dir.relative_to(workdir)}/run.json names the failing ones")
    assert f"checks failing: mdp toy (1/{n_checks} checks passed)" in report["levels"][0]["lacking"]


def test_mastery_says_why_each_question_falls_short(registry, workdir):
    """Mastery needs the learner's rating and the grade both Good or better; the report counts the
    questions short of it by reason and names them."""
    questions = questions_of(registry, "mdp", 2)
    assert len(questions) >= 5
    mastered, graded_low, rated_low, unrated, *never = questions
    db_path = workdir / "progress.db"
    with ProgressDB(db_path) as db:
        review(db, mastered, fsrs.Rating.Good, NOW)
        review(db, graded_low, fsrs.Rating.Easy, NOW, score=LOW)
        review(db, rated_low, fsrs.Rating.Hard, NOW)
        db.record_unrated(unrated, Grade(hits=(), misses=(), score=GOOD, suggested=fsrs.Rating.Good), "x", None, NOW)
    evidence = roadmap.gather_evidence(registry, db_path, NOW)
    [item] = roadmap.mastery_items(roadmap.Mastery(("mdp",), 2, 0.5), evidence)
    assert item["questions"] == {"graded low": [graded_low.id], "rated low": [rated_low.id],
                                 "answered, not rated": [unrated.id], "never answered": [q.id for q in never]}
    assert not item["done"] and item["evidence"] == (
        f"mastery {1 / len(questions):.0%} (1 of {len(questions)}); 1 graded low ({graded_low.id}), "
        f"1 rated low ({rated_low.id}), 1 answered, not rated ({unrated.id}), "
        f"{len(never)} never answered ({listed([q.id for q in never])})")
    drill = roadmap.drill_item(Drill(4, module="mdp", level=2), TODAY, evidence)
    assert drill["done"] and drill["evidence"].startswith("4 of the"), "an unrated answer is an answer"


def test_review_drills_count_reviews_since_their_day(registry, workdir):
    questions = questions_of(registry, "mdp", 2)
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
    assert code == 0 and report["day"] == 1 and run_item(report, 1, "mdp", "toy")["done"]
    assert report["levels"][0]["lacking"][0] == "not run yet at toy: advantage, gae, td_learning"
    code, out = cli(progress.main, "--day", "1", "--module", "td_learning")
    assert code == 0 and "day 1 ·" in out and "python run.py --module td_learning --toy" in out
    assert "to reach level 1" in out and "level 1 (RL foundations) still lacks:" in out
    assert "  - not run yet at toy: advantage, gae, td_learning" in out
    code, out = cli(run.main, "--progress")
    assert code == 0 and "is day 1 of 14" in out and "level checkpoints" in out and "still lacks" in out


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
