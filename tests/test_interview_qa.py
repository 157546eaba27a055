"""The mock interview: FSRS scheduling against fsrs itself, the SQLite progress store (round trip,
stable ids, mastery from the rating and the grade together, unrated answers, the upgrade of a
version-1 file, streak, foreign files left untouched), interrupt safety, --stats and the
non-interactive --answers-file run; plus the size and level spread of every module's bank. The
prompts themselves are driven through a pseudo-terminal in test_drill_pty.py."""
from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import fsrs
import pytest

from core.contract import LEVELS, Question
from core.registry import discover
from learning import progress_db
from learning.grader import Grade, grade_question, readable_claim, suggested_rating
from learning.progress_db import ProgressDB, ProgressDBError
from learning.questions import all_questions, load_bank
from scripts import interview_qa
from scripts.grade_bank import complete, report

T0 = datetime(2030, 6, 15, 12, 0, tzinfo=timezone.utc)
MODULES = sorted(discover().modules)


@pytest.fixture(scope="module")
def bank(registry) -> dict[str, Question]:
    return {q.id: q for q in all_questions(registry)}


def scheduler() -> fsrs.Scheduler:
    return fsrs.Scheduler(enable_fuzzing=False)


def review(db: ProgressDB, question: Question, rating: fsrs.Rating, when: datetime, answer: str = "an answer",
           session_id: int | None = None, result: Grade | None = None) -> fsrs.Card:
    """Record a review of `answer`, graded by the grader unless `result` is given."""
    result = result or grade_question(answer, question)
    return db.record_review(question, rating, result, answer, session_id, when)


def graded(score: float) -> Grade:
    """A grade with this score, whatever the grader would make of an answer."""
    return Grade(hits=(), misses=(), score=score, suggested=suggested_rating(score))


@pytest.fixture
def cli(workdir, capsys):
    def _cli(*argv: str) -> tuple[int, str]:
        code = interview_qa.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    return _cli


def write_answers(path: Path, entries: dict) -> Path:
    """entries: id -> answer, or id -> (answer, rating); written as TOML (plain keys before tables)."""
    plain = [f"{qid} = {json.dumps(a, ensure_ascii=False)}" for qid, a in entries.items() if isinstance(a, str)]
    tables = [f"[{qid}]\nanswer = {json.dumps(a[0], ensure_ascii=False)}\nrating = {json.dumps(a[1])}"
              for qid, a in entries.items() if not isinstance(a, str)]
    path.write_text("\n".join(plain + tables) + "\n", encoding="utf-8")
    return path


# --- the bank ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODULES)
def test_every_module_bank_has_7_questions_over_all_levels(name, registry):
    questions = load_bank(registry.get(name))
    assert len(questions) >= 7, f"{name}: {len(questions)} questions"   # bcq's 8th merged into cql's (issue 14)
    assert {q.level for q in questions} == set(LEVELS), f"{name}: levels {sorted({q.level for q in questions})}"
    assert all(q.key_points and q.answer.strip() for q in questions)


@pytest.mark.parametrize("name", MODULES)
def test_every_model_answer_makes_its_own_claims_in_both_languages(name, registry):
    """A learner who answers as the bank's model answer does gets full marks, in English and in Chinese
    (scripts/grade_bank.py lists what a failing question misses)."""
    failing = {r["id"]: r for r in map(report, load_bank(registry.get(name))) if not complete(r)}
    assert not failing, f"python scripts/grade_bank.py --module {name}: {sorted(failing)}"


# --- scheduling ----------------------------------------------------------------------------------------

def test_good_moves_due_into_the_future_and_again_keeps_it_sooner(tmp_path, bank):
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        good = review(db, bank["mdp-definition"], fsrs.Rating.Good, T0)
        again = review(db, bank["gae-definition"], fsrs.Rating.Again, T0)
    direct = {r: scheduler().review_card(fsrs.Card(card_id=1, due=T0), r, review_datetime=T0)[0]
              for r in (fsrs.Rating.Good, fsrs.Rating.Again)}
    assert good.due == direct[fsrs.Rating.Good].due > T0
    assert again.due == direct[fsrs.Rating.Again].due
    assert T0 < again.due < good.due


def test_a_review_sequence_matches_fsrs_step_by_step(tmp_path, bank):
    question = bank["td_learning-td-error"]
    direct = fsrs.Card(card_id=1, due=T0)
    when = T0
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        for rating in (fsrs.Rating.Good, fsrs.Rating.Good, fsrs.Rating.Again, fsrs.Rating.Good, fsrs.Rating.Easy):
            stored = review(db, question, rating, when)
            direct, _ = scheduler().review_card(direct, rating, review_datetime=when)
            assert (stored.due, stored.state, stored.stability, stored.difficulty) == \
                   (direct.due, direct.state, direct.stability, direct.difficulty)
            when = stored.due
        assert stored.state == fsrs.State.Review and stored.due - T0 > timedelta(days=5)
        assert len(db.reviews(question.id)) == 5


# --- the store -----------------------------------------------------------------------------------------

def test_db_round_trip_keeps_cards_due_dates_and_reviews(tmp_path, bank):
    path = tmp_path / "p.db"
    ratings = {"mdp-definition": fsrs.Rating.Good, "gae-definition": fsrs.Rating.Again,
               "advantage-baseline-unbiased": fsrs.Rating.Easy}
    with ProgressDB(path, scheduler()) as db:
        session = db.start_session("test", T0)
        for i, (qid, rating) in enumerate(ratings.items()):
            review(db, bank[qid], rating, T0 + timedelta(minutes=i), answer=f"答案 {i}", session_id=session)
        db.end_session(session, T0 + timedelta(minutes=5))
        before = ({k: row.card.to_dict() for k, row in db.cards().items()}, db.reviews(), db.sessions(),
                  [db.due_cards(T0 + timedelta(days=d)) for d in (0, 1, 30)])
    with ProgressDB(path, scheduler()) as db:
        after = ({k: row.card.to_dict() for k, row in db.cards().items()}, db.reviews(), db.sessions(),
                 [db.due_cards(T0 + timedelta(days=d)) for d in (0, 1, 30)])
        assert {k: row.last_rating for k, row in db.cards().items()} == ratings
    assert after == before
    cards, reviews, sessions, due = after
    assert [r["answer"] for r in reviews] == ["答案 0", "答案 1", "答案 2"]
    assert sessions[0]["questions_asked"] == 3 and sessions[0]["ended_at"] is not None
    assert due[0] == [] and due[1] == ["gae-definition", "mdp-definition"]   # most overdue first
    assert set(due[2]) == set(ratings)
    with ProgressDB(path, scheduler()) as db:   # without a question list, mastery covers the whole bank
        assert set(db.mastery()) == set(MODULES) and db.mastery()["mdp"][1] == 0.0


def test_editing_a_question_keeps_its_history(tmp_path, bank):
    original = bank["mdp-definition"]
    edited = dataclasses.replace(original, q="Reworded: define an MDP.", answer="A new model answer.",
                                 key_points=("states and actions", "Markov property"))
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        first = review(db, original, fsrs.Rating.Good, T0)
        second = review(db, edited, fsrs.Rating.Good, first.due)
        assert [r["rating"] for r in db.reviews(original.id)] == [fsrs.Rating.Good, fsrs.Rating.Good]
        assert second.state == fsrs.State.Review, "the second Good continued the same card"
        assert db.stats()["cards"] == 1


def test_mastery_needs_a_good_rating_and_a_good_grade_of_the_same_answer(tmp_path):
    qs = [Question(f"m-{i}", "m", level, "q?", "a.", ("x",)) for i, level in enumerate((1, 1, 1, 1, 1, 2, 2, 3))]
    Again, Hard, Good, Easy = fsrs.Rating.Again, fsrs.Rating.Hard, fsrs.Rating.Good, fsrs.Rating.Easy
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        assert set(db.mastery_evidence(qs).values()) == {"never answered"}
        review(db, qs[0], Good, T0, result=graded(1.0))       # a first Good with a good grade is enough
        review(db, qs[1], Easy, T0, result=graded(0.0))       # "idk", rated Easy: the grade disagrees
        review(db, qs[2], Hard, T0, result=graded(1.0))       # the learner's own rating is low
        review(db, qs[3], Good, T0, result=graded(2 / 3))     # the grader's Good starts at exactly 2/3
        review(db, qs[4], Good, T0, result=graded(0.66))
        db.record_unrated(qs[5], graded(1.0), "left before rating", None, T0)
        review(db, qs[6], Easy, T0, result=graded(0.9))
        assert db.mastery_evidence(qs) == {
            "m-0": "mastered", "m-1": "graded low", "m-2": "rated low", "m-3": "mastered", "m-4": "graded low",
            "m-5": "answered, not rated", "m-6": "mastered", "m-7": "never answered"}
        assert db.mastery(qs) == {"m": {1: 2 / 5, 2: 1 / 2, 3: 0.0}}
        assert db.card("m-5") is None, "an unrated answer schedules nothing"

        review(db, qs[0], Again, T0 + timedelta(days=3), result=graded(1.0))   # the latest review decides
        review(db, qs[1], Good, T0 + timedelta(days=3), result=graded(0.8))
        db.record_unrated(qs[6], graded(0.0), "idk", None, T0 + timedelta(days=3))   # not a review: no change
        db.record_unrated(qs[7], graded(0.0), "idk", None, T0 + timedelta(days=3))
        evidence = db.mastery_evidence(qs)
        assert [evidence[f"m-{i}"] for i in (0, 1, 6, 7)] == ["rated low", "mastered", "mastered",
                                                             "answered, not rated"]
        assert db.mastery(qs) == {"m": {1: 2 / 5, 2: 1 / 2, 3: 0.0}}
        assert (db.stats()["reviews"], db.stats()["unrated"]) == (8, 3)


def test_an_unrated_answer_is_stored_with_its_grade_and_counts_in_its_session(tmp_path, bank):
    question = bank["gae-definition"]
    result = dataclasses.replace(grade_question(question.answer, question), grader="judge:tiny")
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        session = db.start_session("test", T0)
        db.record_unrated(question, result, question.answer, session, T0)
        (row,) = db.unrated()
        assert row == {"card_id": "gae-definition", "session_id": session, "score": result.score,
                       "hits": [{"key_point": h.key_point, "span": h.span} for h in result.hits],
                       "misses": list(result.misses), "answer": question.answer, "graded_by": "judge:tiny",
                       "answered_at": T0}
        assert db.reviews() == [] and db.cards() == {} and db.due_cards(T0 + timedelta(days=1)) == []
        assert db.sessions()[0]["questions_asked"] == 1
        review(db, question, fsrs.Rating.Good, T0)
        assert db.reviews()[0]["graded_by"] == "offline"


def version_1_db(path: Path, bank) -> None:
    """A database exactly as the schema-1 code made it: two Good reviews of model answers."""
    conn = sqlite3.connect(path)
    conn.executescript(progress_db.SCHEMA)
    with conn:
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [("app", progress_db.APP_MARKER), ("schema_version", "1")])
        for qid in ("mdp-definition", "gae-definition"):
            card, _ = scheduler().review_card(fsrs.Card(card_id=1, due=T0), fsrs.Rating.Good, review_datetime=T0)
            conn.execute("INSERT INTO cards VALUES (?, ?, ?, ?, ?)",
                         (qid, bank[qid].module, bank[qid].level, json.dumps(card.to_dict()), 3))
            conn.execute("INSERT INTO reviews (card_id, session_id, reviewed_at, rating, score, hits, misses, "
                         "answer) VALUES (?, NULL, ?, 3, ?, '[]', '[]', ?)",
                         (qid, T0.isoformat(), 1.0 if qid == "mdp-definition" else 0.5, bank[qid].answer))
    conn.close()


def test_a_version_1_db_is_read_as_it_is_and_upgraded_on_the_first_write(tmp_path, bank, cli):
    path = tmp_path / "p.db"
    version_1_db(path, bank)
    before = path.read_bytes()
    code, out = cli("--stats", "--db", path)
    assert code == 0 and "reviews: 2" in out and "answered, not rated: 0" in out
    with ProgressDB(path, scheduler()) as db:
        assert db.version == 1 and [r["graded_by"] for r in db.reviews()] == ["offline", "offline"]
        assert db.unrated() == []
        assert db.mastery_evidence([bank["mdp-definition"], bank["gae-definition"]]) == {
            "mdp-definition": "mastered", "gae-definition": "graded low"}
    assert path.read_bytes() == before, "reading never modifies the file"

    with ProgressDB(path, scheduler()) as db:
        db.record_unrated(bank["td_learning-td-error"], graded(0.5), "half of it", None, T0)
        assert db.version == 2
    with ProgressDB(path, scheduler()) as db, sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        assert [r["answer"] for r in db.reviews()] == [bank["mdp-definition"].answer, bank["gae-definition"].answer]
        assert [r["graded_by"] for r in db.reviews()] == ["offline", "offline"]
        assert [r["answer"] for r in db.unrated()] == ["half of it"]
        assert db.card("mdp-definition").last_rating == fsrs.Rating.Good
    conn.close()


def test_streak_counts_consecutive_days_with_a_review(tmp_path, bank):
    question = bank["mdp-definition"]
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        assert db.streak(date(2030, 6, 15)) == 0
        for days_ago in (4, 2, 1, 0):                           # a gap on day -3
            review(db, question, fsrs.Rating.Good, T0 - timedelta(days=days_ago))
        today = T0.astimezone().date()
        assert db.streak(today) == 3
        assert db.streak(today + timedelta(days=1)) == 3, "no review yet today does not break the streak"
        assert db.streak(today + timedelta(days=2)) == 0


def test_an_existing_progress_db_is_reopened_not_recreated(tmp_path, bank):
    path = tmp_path / "nested" / "dir" / "p.db"
    with ProgressDB(path, scheduler()) as db:
        review(db, bank["mdp-definition"], fsrs.Rating.Good, T0)
    with ProgressDB(path, scheduler()) as db:
        assert db.stats()["reviews"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["p.db"], "no temporary files left behind"


def foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('my own data')")
    conn.close()


def newer_progress_db(path: Path) -> None:
    ProgressDB(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()


def damaged_progress_db(path: Path) -> None:
    with ProgressDB(path, scheduler()) as db:
        for i in range(200):   # enough rows to span several pages
            db.start_session(f"session {i} " + "x" * 200, T0)
    data = bytearray(path.read_bytes())
    data[4096 + 10:4096 + 4000] = b"\xff" * 3990   # scribble over the second page
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make, words", [
    (foreign_sqlite, ["not a Finetune progress database", "notes"]),
    (lambda p: p.write_bytes(b"name,score\nalice,3\n" * 50), ["not an SQLite database"]),
    (lambda p: p.write_bytes(b""), ["not an SQLite database"]),
    (newer_progress_db, ["schema version 99"]),
    (damaged_progress_db, ["left untouched"]),
], ids=["foreign-sqlite", "csv", "empty", "newer-schema", "damaged"])
def test_a_foreign_or_corrupt_db_is_reported_and_left_byte_identical(make, words, tmp_path, cli, bank):
    path = tmp_path / "progress.db"
    make(path)
    original = path.read_bytes()
    with pytest.raises(ProgressDBError) as exc:
        ProgressDB(path)
    assert str(path) in str(exc.value)
    answers = write_answers(tmp_path / "a.toml", {"mdp-definition": "An MDP has states and actions."})
    for argv in (["--stats"], ["--answers-file", answers]):
        code, out = cli("--db", path, *argv)
        assert code == 2
        assert path.name in out and all(w in out for w in words), out
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml", "progress.db"], "no journal or temp files"


# --- the script ------------------------------------------------------------------------------------

def test_answers_file_session_end_to_end(cli, workdir, bank, tmp_path):
    answers = write_answers(tmp_path / "answers.toml", {
        "mdp-definition": bank["mdp-definition"].answer,
        "gae-definition": "I am not sure.",
        "td_learning-td-vs-mc": ("MC 无偏但方差高；TD 有偏但方差低 (low variance)，可以在线学习不完整的回合。", "Easy"),
    })
    code, out = cli("--answers-file", answers)
    assert code == 0
    assert "3 of 3 questions answered" in out
    mdp = grade_question(bank["mdp-definition"].answer, bank["mdp-definition"])
    assert all(f"✓ {readable_claim(hit.key_point)}" in out for hit in mdp.hits)
    assert all(f"✗ {readable_claim(m)}" in out for m in mdp.misses)
    assert out.index("suggested grade") < out.index("model answer"), "the model answer comes after the grade"
    with ProgressDB(workdir / "output" / "progress.db") as db:   # the default location
        reviews = {r["card_id"]: r for r in db.reviews()}
        for qid, stored in reviews.items():
            assert stored["score"] == grade_question(stored["answer"], bank[qid]).score
            assert stored["graded_by"] == "offline"
        assert reviews["mdp-definition"]["rating"] == mdp.suggested, "no rating in the file: the suggested one"
        assert reviews["gae-definition"]["score"] == 0.0 and reviews["gae-definition"]["rating"] == fsrs.Rating.Again
        assert reviews["td_learning-td-vs-mc"]["rating"] == fsrs.Rating.Easy, "the file's rating overrides"
        assert db.sessions()[0]["mode"] == "answers-file all"
        assert db.mastery_evidence([bank["gae-definition"]]) == {"gae-definition": "rated low"}


def test_idk_rated_easy_is_graded_low_and_no_mastery(cli, tmp_path, bank):
    """The issue's case: the learner's Easy alone no longer makes a question mastered."""
    answers = write_answers(tmp_path / "a.toml", {"mdp-definition": ("idk", "Easy")})
    code, out = cli("--answers-file", answers, "--db", tmp_path / "p.db")
    row = next(line for line in out.splitlines() if "mdp-definition" in line and "│" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert code == 0 and (cells[0], cells[4], cells[-1]) == ("mdp-definition", "Easy", "graded low")
    code, out = cli("--stats", "--module", "mdp", "--db", tmp_path / "p.db")
    mdp_row = next(line for line in out.splitlines() if re.match(r"[│|]\s*mdp\s", line))
    n = sum(q.module == "mdp" and q.level == bank["mdp-definition"].level for q in bank.values())
    assert f"0% of {n}" in mdp_row and "Easy 1" in out


def test_answers_file_in_json_with_filters_and_count(cli, tmp_path, bank):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"mdp-definition": "x", "gae-definition": "y", "mdp-linear-solve": "z",
                                   "mdp-vi-contraction": {"answer": "gamma-contraction in the max norm"}}))
    code, out = cli("--answers-file", answers, "--module", "mdp", "--count", "2", "--db", tmp_path / "p.db")
    assert code == 0 and "2 of 2 questions answered" in out
    with ProgressDB(tmp_path / "p.db") as db:
        assert [r["card_id"] for r in db.reviews()] == ["mdp-definition", "mdp-linear-solve"]


def test_an_interrupt_after_two_answers_keeps_both(cli, tmp_path, bank, monkeypatch):
    ids = ["mdp-definition", "gae-definition", "td_learning-td-error", "advantage-baseline-unbiased"]
    answers = write_answers(tmp_path / "a.toml", {qid: bank[qid].answer for qid in ids})
    real_answer = interview_qa.AnswersFile.answer
    calls = []

    def interrupted_on_third(self, question):
        calls.append(question.id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_answer(self, question)

    monkeypatch.setattr(interview_qa.AnswersFile, "answer", interrupted_on_third)
    code, out = cli("--answers-file", answers, "--db", tmp_path / "p.db")
    assert code == 0
    assert "Session ended early" in out and "2 of 4 questions answered" in out
    with ProgressDB(tmp_path / "p.db") as db:
        assert [r["card_id"] for r in db.reviews()] == ids[:2]
        session = db.sessions()[0]
        assert session["questions_asked"] == 2 and session["ended_at"] is not None


class FakePrompt:
    def __init__(self, value):
        self.value = value

    def ask(self, **kwargs):
        return self.value


def test_interactive_flow_with_cancel_keeps_the_answer_given(cli, tmp_path, monkeypatch, bank):
    """questionary answers None on Ctrl-C: the second question's prompt is cancelled."""
    typed = iter(["The Markov property: the next state depends only on the current state and action.", None])
    monkeypatch.setattr(interview_qa.questionary, "text", lambda *a, **k: FakePrompt(next(typed)))
    chosen = []

    def select(message, choices, default):
        chosen.append((choices, default))
        return FakePrompt("Hard")

    monkeypatch.setattr(interview_qa.questionary, "select", select)
    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    code, out = cli("--module", "mdp", "--level", "1", "--count", "2", "--seed", "0", "--db", tmp_path / "p.db")
    assert code == 0 and "1 of 2 questions answered" in out
    assert chosen[0][0] == ["Again", "Hard", "Good", "Easy"]
    with ProgressDB(tmp_path / "p.db") as db:
        (only,) = db.reviews()
        assert only["rating"] == fsrs.Rating.Hard, "the learner's override is stored"
        assert chosen[0][1] == grade_question(only["answer"], bank[only["card_id"]]).suggested.name, \
            "the select starts on the suggested grade"


def test_interactive_mode_needs_a_terminal(cli, tmp_path):
    code, out = cli("--module", "mdp", "--db", tmp_path / "p.db")   # pytest's stdin is not a TTY
    assert code == 2 and "--answers-file" in out


def test_due_questions_come_first_then_new_ones_then_the_rest(tmp_path, bank):
    mdp = [q for q in bank.values() if q.module == "mdp"]
    due_q, later_q = mdp[0], mdp[1]
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        review(db, due_q, fsrs.Rating.Again, T0 - timedelta(days=1))
        review(db, later_q, fsrs.Rating.Easy, T0)
        args = interview_qa.parse_args(["--module", "mdp", "--count", "50", "--seed", "1"])
        order = interview_qa.session_questions(list(bank.values()), args, db, interview_qa.Interactive(), T0)
        assert [q.id for q in order] == [due_q.id, *[q.id for q in order[1:-1]], later_q.id]
        assert {q.module for q in order} == {"mdp"} and len(order) == len(mdp)
        assert order == interview_qa.session_questions(list(bank.values()), args, db, interview_qa.Interactive(), T0)
        args.due = True
        assert interview_qa.session_questions(list(bank.values()), args, db, interview_qa.Interactive(), T0) == [due_q]
        args.due, args.count = False, None
        assert len(interview_qa.session_questions(list(bank.values()), args, db,
                                                  interview_qa.Interactive(), T0)) == interview_qa.INTERACTIVE_COUNT


def test_stats_show_mastery_due_counts_and_streak(cli, tmp_path, bank, monkeypatch):
    monkeypatch.setattr(interview_qa, "utcnow", lambda: T0)
    mdp_level1 = [q for q in bank.values() if q.module == "mdp" and q.level == 1]
    mdp_total = sum(q.module == "mdp" for q in bank.values())
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        for q in mdp_level1:
            review(db, q, fsrs.Rating.Easy, T0 - timedelta(days=1), result=graded(1.0))
        review(db, bank["gae-definition"], fsrs.Rating.Again, T0 - timedelta(hours=1))
        review(db, bank["gae-definition"], fsrs.Rating.Hard, T0 - timedelta(minutes=50))
    code, out = cli("--stats", "--db", tmp_path / "p.db")
    assert code == 0
    mdp_row = next(line for line in out.splitlines() if re.match(r"[│|]\s*mdp\s", line))
    cells = [c.strip() for c in mdp_row.strip("│| ").split("│")]
    assert cells[:5] == ["mdp", str(mdp_total), str(len(mdp_level1)), "0", f"100% of {len(mdp_level1)}"]
    assert cells[-1] == f"{len(mdp_level1) / mdp_total:.0%}"
    gae_row = next(line for line in out.splitlines() if re.match(r"[│|]\s*gae\s", line))
    assert [c.strip() for c in gae_row.strip("│| ").split("│")][2:4] == ["1", "1"]   # drilled, due now
    assert f"streak: 2 days   reviews: {len(mdp_level1) + 2}   sessions: 0" in out
    assert "due now: 1" in out and "Again 1, Hard 1, Good 0, Easy " in out and "answered, not rated: 0" in out


@pytest.mark.parametrize("argv, words", [
    (["--module", "mpd"], ["Did you mean: mdp"]),
    (["--answers-file", "missing.toml"], ["cannot read answers file"]),
])
def test_bad_input_exits_2(cli, argv, words, tmp_path):
    code, out = cli(*argv, "--db", tmp_path / "p.db")
    assert code == 2 and all(w in out for w in words), out


@pytest.mark.parametrize("content, words", [
    ('mdp-defintion = "x"\n', ["unknown question ids", "did you mean mdp-definition"]),
    ('[mdp-definition]\nanswer = "x"\nrating = "perfect"\n', ["'perfect'", "Again, Hard, Good, Easy"]),
    ('mdp-definition = 3\n', ["needs a string answer"]),
    ('mdp-definition = "unclosed\n', ["cannot read answers file"]),
])
def test_a_bad_answers_file_exits_2_and_writes_no_review(cli, content, words, tmp_path):
    answers = tmp_path / "a.toml"
    answers.write_text(content)
    code, out = cli("--answers-file", answers, "--db", tmp_path / "p.db")
    assert code == 2 and all(w in out for w in words), out
    if (tmp_path / "p.db").exists():
        with ProgressDB(tmp_path / "p.db") as db:
            assert db.stats()["reviews"] == 0


def test_nothing_due_says_so(cli, tmp_path):
    answers = write_answers(tmp_path / "a.toml", {"mdp-definition": "x"})
    code, out = cli("--answers-file", answers, "--due", "--db", tmp_path / "p.db")
    assert code == 0 and "no question is due now" in out
