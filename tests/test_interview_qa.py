"""The mock interview: FSRS scheduling against fsrs itself, the SQLite progress store (round trip,
stable ids, mastery, streak, foreign files left untouched), interrupt safety, --stats and the
non-interactive --answers-file run; plus the size and level spread of every module's bank."""
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
from learning.grader import grade
from learning.progress_db import ProgressDB, ProgressDBError
from learning.questions import all_questions, load_bank
from scripts import interview_qa

T0 = datetime(2030, 6, 15, 12, 0, tzinfo=timezone.utc)
MODULES = sorted(discover().modules)


@pytest.fixture(scope="module")
def bank(registry) -> dict[str, Question]:
    return {q.id: q for q in all_questions(registry)}


def scheduler() -> fsrs.Scheduler:
    return fsrs.Scheduler(enable_fuzzing=False)


def review(db: ProgressDB, question: Question, rating: fsrs.Rating, when: datetime, answer: str = "an answer",
           session_id: int | None = None) -> fsrs.Card:
    return db.record_review(question, rating, grade(answer, question.key_points), answer, session_id, when)


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
def test_every_module_bank_has_8_questions_over_all_levels(name, registry):
    questions = load_bank(registry.get(name))
    assert len(questions) >= 8, f"{name}: {len(questions)} questions"
    assert {q.level for q in questions} == set(LEVELS), f"{name}: levels {sorted({q.level for q in questions})}"
    assert all(q.key_points and q.answer.strip() for q in questions)


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
               "advantage-reward-to-go": fsrs.Rating.Easy}
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


def test_mastery_counts_good_or_easy_cards_in_review_state(tmp_path):
    qs = [Question(f"m-{i}", "m", level, "q?", "a.", ("x",)) for i, level in enumerate((1, 1, 2, 3))]
    with ProgressDB(tmp_path / "p.db", scheduler()) as db:
        assert db.mastery(qs) == {"m": {1: 0.0, 2: 0.0, 3: 0.0}}
        review(db, qs[0], fsrs.Rating.Easy, T0)                 # Easy on a new card: straight to Review
        card = review(db, qs[2], fsrs.Rating.Good, T0)          # Good once: still learning
        assert db.mastery(qs) == {"m": {1: 0.5, 2: 0.0, 3: 0.0}}
        review(db, qs[2], fsrs.Rating.Good, card.due)           # Good again when due: Review
        assert db.mastery(qs)["m"][2] == 1.0
        review(db, qs[0], fsrs.Rating.Again, T0 + timedelta(days=10))   # forgotten: not mastered
        assert db.mastery(qs) == {"m": {1: 0.0, 2: 1.0, 3: 0.0}}


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
    assert "✓ transition probabilities" in out and "✗ certainty equivalence" in out
    assert "model answer" in out
    with ProgressDB(workdir / "output" / "progress.db") as db:   # the default location
        reviews = {r["card_id"]: r for r in db.reviews()}
        assert reviews["mdp-definition"]["rating"] == fsrs.Rating.Easy and reviews["mdp-definition"]["score"] == 1.0
        assert reviews["gae-definition"]["rating"] == fsrs.Rating.Again and reviews["gae-definition"]["score"] == 0.0
        assert reviews["td_learning-td-vs-mc"]["rating"] == fsrs.Rating.Easy, "the file's rating overrides"
        assert reviews["td_learning-td-vs-mc"]["score"] == 0.75
        assert db.sessions()[0]["mode"] == "answers-file all"


def test_answers_file_in_json_with_filters_and_count(cli, tmp_path, bank):
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"mdp-definition": "x", "gae-definition": "y", "mdp-linear-solve": "z",
                                   "mdp-vi-contraction": {"answer": "gamma-contraction in the max norm"}}))
    code, out = cli("--answers-file", answers, "--module", "mdp", "--count", "2", "--db", tmp_path / "p.db")
    assert code == 0 and "2 of 2 questions answered" in out
    with ProgressDB(tmp_path / "p.db") as db:
        assert [r["card_id"] for r in db.reviews()] == ["mdp-definition", "mdp-linear-solve"]


def test_an_interrupt_after_two_answers_keeps_both(cli, tmp_path, bank, monkeypatch):
    ids = ["mdp-definition", "gae-definition", "td_learning-td-error", "advantage-reward-to-go"]
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
        assert chosen[0][1] == grade(only["answer"], bank[only["card_id"]].key_points).suggested.name, \
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
            review(db, q, fsrs.Rating.Easy, T0 - timedelta(days=1))
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
    assert "due now: 1" in out and "Again 1, Hard 1, Good 0, Easy " in out


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
