"""The scripts under the exit-status contract (core/cli.py), as a new user meets them with bad input:
bad input is exit 2 with one `error:` line, a bug exit 3 with its traceback in
<work dir>/output/crash/<script>.log, Ctrl-C 130. A bad row in the progress database is reported in one
warning line and skipped; --out, --modules, answers files and answer sizes are checked before any work."""
from __future__ import annotations

import errno
import importlib
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import fsrs
import pytest

from core.errors import UserError
from core.paths import ROOT
from core.registry import Registry
from learning import roadmap, smoke
from learning.briefs import BriefError, OutputError
from learning.grader import MAX_ANSWER_CHARS, AnswerTooLong, SynonymError, grade
from learning.progress_db import ProgressDB, ProgressDBError
from learning.questions import all_questions
from learning.roadmap import RoadmapError
from scripts import export_interview_briefs, interview_brief, interview_qa, plant_bugs, progress, record_results
from scripts import smoke_test

SCRIPTS = {  # script -> arguments that get past argument parsing to the script's first real work
    "interview_qa": ["--stats"], "progress": [], "interview_brief": ["--module", "mdp"],
    "export_interview_briefs": [], "smoke_test": ["--modules", "mdp"], "plant_bugs": ["--module", "mdp"],
    "record_results": ["--module", "mdp"], "check_figures": [], "build_learning_docs": ["--check"],
    "build_module_docs": ["--check"],
}
T0 = datetime(2030, 6, 15, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def bank(registry):
    return {q.id: q for q in all_questions(registry)}


@pytest.fixture
def cli(workdir, capsys, registry, monkeypatch):
    """cli(main, *argv) -> (status, stdout, stderr); argparse's exit is a status too. The scripts get
    the session's registry instead of discovering the modules again."""
    for name in SCRIPTS:
        monkeypatch.setattr(importlib.import_module(f"scripts.{name}"), "discover", lambda: registry)

    def _cli(main, *argv) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return _cli


def one_line(err: str, prefix: str = "error: ") -> str:
    """The contract's one line: stderr holds exactly one (non-blank) line, with no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# --- 1. every learning error is a UserError, every script goes through core.cli.guard ------------------

@pytest.mark.parametrize("error", [ProgressDBError, SynonymError, RoadmapError, BriefError, OutputError,
                                   smoke.SmokeError, interview_qa.BadInput, AnswerTooLong])
def test_learning_domain_errors_are_user_errors(error):
    assert issubclass(error, UserError)


FAULTS = {  # what the script's first real work raises -> (exit status, words of the one line)
    "bug": (lambda: RuntimeError("boom"), 3, ["internal error", "RuntimeError: boom"]),
    "environment": (lambda: PermissionError(errno.EACCES, "Permission denied", "/x/locked.json"), 2,
                    ["/x/locked.json", "Permission denied"]),
    "user-error": (lambda: UserError("the thing is wrong"), 2, ["the thing is wrong"]),
    "ctrl-c": (lambda: KeyboardInterrupt(), 130, []),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_maps_what_it_raises_to_the_contract(name, fault, workdir, capsys, monkeypatch):
    make, status, words = FAULTS[fault]
    script = importlib.import_module(f"scripts.{name}")

    def first_work():
        raise make()

    monkeypatch.setattr(script, "discover", first_work)
    assert script.main(SCRIPTS[name]) == status
    err = capsys.readouterr().err
    log = workdir / "output" / "crash" / f"{name}.log"
    if status == 130:
        assert "interrupted" in err and "Traceback" not in err
    else:
        line = one_line(err)
        assert all(w in line for w in words), line
    if status == 3:
        assert f"traceback in {log}" in line
        assert "Traceback" in log.read_text() and "RuntimeError: boom" in log.read_text()
    else:
        assert not log.exists()


# --- 2. bad rows in output/progress.db --------------------------------------------------------------

def progress_db(path: Path, bank) -> Path:
    """Two Good reviews (mdp-definition, gae-definition) at T0."""
    with ProgressDB(path, fsrs.Scheduler(enable_fuzzing=False)) as db:
        for qid in ("mdp-definition", "gae-definition"):
            q = bank[qid]
            db.record_review(q, fsrs.Rating.Good, grade(q.answer, q.key_points), q.answer, None, T0)
    return path


def break_rows(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(sql)
    conn.close()


MDP = "WHERE card_id = 'mdp-definition'"
BAD_ROWS = {  # the SQL that breaks mdp-definition's row, the table, what the warning says
    "fsrs-json": (f"UPDATE cards SET fsrs = '{{not json' {MDP}", "cards", "fsrs is not valid JSON"),
    "fsrs-not-a-card": (f"UPDATE cards SET fsrs = '{{\"card_id\": 1}}' {MDP}", "cards", "not an FSRS card"),
    "fsrs-naive-due": (f"UPDATE cards SET fsrs = json_set(fsrs, '$.due', '2030-01-01T00:00:00') {MDP}", "cards",
                       "has no time zone"),
    "level-not-int": (f"UPDATE cards SET level = 'three' {MDP}", "cards", "level must be a question level"),
    "last-rating-9": (f"UPDATE cards SET last_rating = 9 {MDP}", "cards", "last_rating must be a rating 1..4"),
    "review-rating-7": (f"UPDATE reviews SET rating = 7 {MDP}", "reviews", "rating must be a rating 1..4"),
    "review-time": (f"UPDATE reviews SET reviewed_at = 'yesterday' {MDP}", "reviews", "must be an ISO 8601 time"),
    "review-hits": (f"UPDATE reviews SET hits = 'nope' {MDP}", "reviews", "hits is not valid JSON"),
    "review-score": (f"UPDATE reviews SET score = 'high' {MDP}", "reviews", "score must be a number in [0, 1]"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_reported_once_and_skipped(case, cli, tmp_path, bank):
    sql, table, words = BAD_ROWS[case]
    path = progress_db(tmp_path / "p.db", bank)
    break_rows(path, sql)
    before = path.read_bytes()

    code, out, err = cli(interview_qa.main, "--stats", "--db", path)
    assert code == 0
    warning = one_line(err, "warning: ")
    assert f"table {table}" in warning and "'mdp-definition'" in warning and words in warning
    assert (table == "reviews") == ("row id 1" in warning)
    assert f"reviews: {1 if table == 'reviews' else 2}" in out, "the good rows still count"

    code, out, err = cli(progress.main, "--json", "--db", path)
    # progress reads the reviews only (mastery is evidence from them): a bad card row is not its business
    assert code == 0 and (f"table {table}" in one_line(err, "warning: ") if table == "reviews" else err == "")
    assert json.loads(out)["review_days"] == 1, "the good review still dates the drilling"

    assert path.read_bytes() == before, "reading never modifies the database"


def test_the_library_skips_bad_rows_and_a_new_answer_replaces_a_bad_card(cli, tmp_path, bank):
    path = progress_db(tmp_path / "p.db", bank)
    break_rows(path, f"UPDATE cards SET fsrs = '[1, 2]' {MDP}; UPDATE reviews SET rating = 0 {MDP}")
    heard = []
    with ProgressDB(path, on_bad_row=heard.append) as db:
        assert list(db.cards()) == ["gae-definition"]
        assert db.card("mdp-definition") is None
        assert [r["card_id"] for r in db.reviews()] == ["gae-definition"]
        stats = db.stats()
        assert (stats["cards"], stats["reviews"], stats["reviews_by_rating"]["Good"]) == (1, 1, 1)
        assert db.mastery([bank["mdp-definition"]]) == {"mdp": {1: 0.0}}
        assert db.due_cards(T0) == [] and db.streak(T0.date()) == 1
        assert len(heard) == 2 and sorted(table for table, _ in db.bad_rows) == ["cards", "reviews"]

    answers = tmp_path / "a.toml"
    answers.write_text(f'mdp-definition = {json.dumps(bank["mdp-definition"].answer)}\n')
    code, out, err = cli(interview_qa.main, "--answers-file", answers, "--db", path)
    assert code == 0 and "1 of 1 questions answered" in out
    with ProgressDB(path, on_bad_row=heard.append) as db:
        assert sorted(db.cards()) == ["gae-definition", "mdp-definition"], "answering again replaced the bad card"
        assert [r["card_id"] for r in db.reviews()] == ["gae-definition", "mdp-definition"]
        assert len(heard) == 3 and "rating must be a rating" in heard[-1], "only the old bad review is left"


def test_cards_of_a_module_no_longer_known_are_kept_and_do_not_count(cli, tmp_path, bank):
    path = progress_db(tmp_path / "p.db", bank)
    break_rows(path, f"PRAGMA foreign_keys = OFF; UPDATE cards SET module = 'retired', card_id = 'retired-q' {MDP}; "
                     f"UPDATE reviews SET card_id = 'retired-q' {MDP}")
    code, out, err = cli(interview_qa.main, "--stats", "--db", path)
    assert code == 0 and err == "" and "reviews: 2" in out
    code, out, err = cli(progress.main, "--json", "--db", path)
    assert code == 0 and err == ""


def test_a_database_missing_a_table_is_damaged_and_left_untouched(cli, tmp_path, bank):
    path = progress_db(tmp_path / "p.db", bank)
    break_rows(path, "DROP TABLE reviews")
    before = path.read_bytes()
    for main, argv in ((interview_qa.main, ["--stats"]), (progress.main, [])):
        code, _, err = cli(main, *argv, "--db", path)
        assert code == 2 and "damaged: it lacks table reviews" in one_line(err)
    assert path.read_bytes() == before


def test_a_database_that_refuses_writes_is_bad_input(tmp_path, bank):
    path = progress_db(tmp_path / "p.db", bank)
    with ProgressDB(path) as db:
        db.conn.execute("PRAGMA query_only = ON")  # what a read-only file or a full disk looks like to SQLite
        q = bank["gae-definition"]
        with pytest.raises(ProgressDBError, match="cannot write to it"):
            db.record_review(q, fsrs.Rating.Good, grade("x", q.key_points), "x", None, T0)
        assert db.stats()["reviews"] == 2


# --- 3. interview_brief --out, export_interview_briefs --out ------------------------------------------

def never_rendered(*args, **kwargs):
    pytest.fail("the brief was made before --out was checked")


@pytest.mark.parametrize("case", ["folder", "under-a-file", "not-writable"])
def test_brief_out_that_cannot_be_written_is_exit_2_before_any_work(case, cli, workdir, monkeypatch):
    (workdir / "afile").write_text("mine")
    out = {"folder": workdir, "under-a-file": workdir / "afile" / "mdp.md", "not-writable": workdir / "b.md"}[case]
    if case == "not-writable":
        monkeypatch.setattr("learning.briefs.os.access", lambda path, mode: False)
    monkeypatch.setattr(interview_brief, "brief_for", never_rendered)
    code, _, err = cli(interview_brief.main, "--module", "mdp", "--out", out)
    line = one_line(err)
    assert code == 2 and str(out) in line
    assert {"folder": "is a folder", "under-a-file": "is a file, not a folder",
            "not-writable": "is not writable"}[case] in line
    assert (workdir / "afile").read_text() == "mine"


def test_brief_out_that_fails_while_writing_is_exit_2(cli, workdir, monkeypatch):
    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("learning.briefs.atomic_write_text", disk_full)
    code, _, err = cli(interview_brief.main, "--module", "mdp", "--lang", "en", "--out", workdir / "b.md")
    assert code == 2 and f"{workdir / 'b.md'}: cannot write it: No space left on device" in one_line(err)


def test_export_out_that_is_a_file_is_exit_2_and_keeps_the_file(cli, workdir):
    target = workdir / "briefs"
    target.write_text("mine")
    code, out, err = cli(export_interview_briefs.main, "--out", target)
    assert code == 2 and "is a file; give the path of a folder" in one_line(err) and out == ""
    assert target.read_text() == "mine"


# --- 4. smoke_test with no module ---------------------------------------------------------------------

@pytest.fixture
def baseline(workdir) -> Path:
    folder = workdir / "output" / "smoke_reports"
    folder.mkdir(parents=True)
    (folder / smoke.LATEST).write_text('{"schema_version": 1, "preset": "toy", "note": "the baseline"}')
    return folder / smoke.LATEST


@pytest.mark.parametrize("modules", ["", ",", " , "])
def test_smoke_with_no_module_selected_is_exit_2_and_keeps_the_baseline(modules, cli, baseline):
    before = baseline.read_bytes()
    code, out, err = cli(smoke_test.main, "--modules", modules)
    assert code == 2 and f"--modules {modules!r} names no module" in one_line(err)
    assert [p.name for p in baseline.parent.iterdir()] == [smoke.LATEST] and baseline.read_bytes() == before


def test_a_report_of_zero_modules_is_never_written(baseline):
    before = baseline.read_bytes()
    with pytest.raises(smoke.SmokeError, match="covers no module"):
        smoke.write_report({"schema_version": 1, "created_at": "2030-01-01T00:00:00+00:00", "modules": {}})
    assert [p.name for p in baseline.parent.iterdir()] == [smoke.LATEST] and baseline.read_bytes() == before
    with pytest.raises(smoke.SmokeError, match="every module manifest is broken"):
        smoke_test.select_modules(Registry(modules={}, broken=[]), None, "toy")


@pytest.mark.parametrize("argv", [["--timeout", "nan"], ["--timeout", "inf"], ["--slowdown", "-1"],
                                  ["--metric-rtol", "nan"], ["--metric-atol=-inf"], ["--min-seconds", "-1"]])
def test_smoke_numbers_must_be_finite(argv, cli, baseline):
    code, _, err = cli(smoke_test.main, "--modules", "mdpp", *argv)
    flag = argv[0].split("=")[0]
    assert code == 2 and f"argument {flag}: must be a finite number" in err and "Traceback" not in err


# --- 5. an empty answers file -------------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [("a.toml", ""), ("a.toml", "# nothing yet\n"), ("a.json", "{}")])
def test_an_empty_answers_file_says_so(name, content, cli, tmp_path):
    answers = tmp_path / name
    answers.write_text(content)
    code, out, err = cli(interview_qa.main, "--answers-file", answers, "--db", tmp_path / "p.db")
    line = one_line(err)
    assert code == 2 and f"{answers}: the answers file is empty" in line
    assert "Nothing to ask" not in out and not (tmp_path / "p.db").exists()


# --- 6. the answer size cap ---------------------------------------------------------------------------

def test_answers_up_to_the_cap_are_graded_and_longer_ones_refused(bank):
    q = bank["mdp-definition"]
    longest = ((q.answer + " ") * (MAX_ANSWER_CHARS // len(q.answer) + 1))[:MAX_ANSWER_CHARS]
    result = grade(longest, q.key_points)
    assert result.score == 1.0 and all(hit.span in longest for hit in result.hits)
    with pytest.raises(AnswerTooLong, match=f"{MAX_ANSWER_CHARS + 1:,} characters long; answers are graded up to "
                                            f"{MAX_ANSWER_CHARS:,}"):
        grade(longest + "x", q.key_points)


def test_an_answers_file_with_an_answer_over_the_cap_is_exit_2_and_writes_nothing(cli, tmp_path):
    answers = tmp_path / "a.toml"
    answers.write_text(f'mdp-definition = "short"\ngae-definition = "{"word " * (MAX_ANSWER_CHARS // 5 + 1)}"\n')
    code, _, err = cli(interview_qa.main, "--answers-file", answers, "--db", tmp_path / "p.db")
    line = one_line(err)
    assert code == 2 and "question 'gae-definition'" in line and f"up to {MAX_ANSWER_CHARS:,} characters" in line
    assert not (tmp_path / "p.db").exists()


class FakePrompt:
    def __init__(self, value):
        self.value = value

    def ask(self, **kwargs):
        return self.value


def test_a_typed_answer_over_the_cap_is_asked_again(monkeypatch, capsys, bank):
    typed = iter(["x" * (MAX_ANSWER_CHARS + 1), "The Markov property"])
    monkeypatch.setattr(interview_qa.questionary, "text", lambda *a, **k: FakePrompt(next(typed)))
    assert interview_qa.Interactive().answer(bank["mdp-definition"]) == "The Markov property"
    assert "shorten it and answer again" in capsys.readouterr().err


# --- 7. other bad input a new user types --------------------------------------------------------------

BAD_INPUT = [  # (script, argv, words of the error); {afile} is a regular file in the work dir
    (interview_qa, ["--stats", "--module", ""], "unknown module ''"),
    (interview_qa, ["--answers-file", ""], "--answers-file: expected a path, got an empty string"),
    (interview_qa, ["--stats", "--db", ""], "--db: expected a path, got an empty string"),
    (interview_qa, ["--stats", "--db", "{afile}/p.db"], "cannot create the progress database there"),
    (interview_qa, ["--answers-file", "{workdir}"], "cannot read answers file"),
    (progress, ["--module", ""], "unknown module ''"),
    (progress, ["--db", ""], "--db: expected a path"),
    (interview_brief, ["--module", "mdp", "--out", ""], "--out: expected a path"),
    (export_interview_briefs, ["--out", ""], "--out: expected a path"),
    (smoke_test, ["--modules", "mdp", "--preset", ""], "preset '' does not exist for mdp"),
    (record_results, ["--module", "mdp", "--seeds", "1,a"], "--seeds: 'a' is not an integer"),
    (record_results, ["--module", "mdp", "--seeds", "-1"], "--seeds: seeds must be >= 0"),
    (plant_bugs, ["--module", "mdp", "--jobs", "0"], "--jobs must be at least 1"),
    (plant_bugs, ["--module", ""], "unknown module ''"),
]


@pytest.mark.parametrize("script, argv, words", BAD_INPUT,
                         ids=[f"{s.__name__.split('.')[-1]} {' '.join(a)}" for s, a, _ in BAD_INPUT])
def test_bad_input_is_exit_2_without_a_traceback(script, argv, words, cli, workdir):
    (workdir / "afile").write_text("mine")
    argv = [a.format(afile=workdir / "afile", workdir=workdir) for a in argv]
    code, out, err = cli(script.main, *argv)
    assert code == 2 and words in err and "Traceback" not in err, err
    if err.startswith("error: "):  # not argparse's usage + error
        one_line(err)
    assert sorted(p.name for p in workdir.iterdir()) == ["afile"], "bad input writes nothing"


@pytest.mark.parametrize("latest", ["{broken", None], ids=["corrupt", "a-folder"])
def test_an_unreadable_smoke_report_fails_the_smoke_item_not_the_progress_view(latest, cli, workdir):
    path = workdir / "output" / "smoke_reports" / smoke.LATEST
    path.mkdir(parents=True) if latest is None else (path.parent.mkdir(parents=True), path.write_text(latest))
    code, out, err = cli(progress.main, "--json")
    assert code == 0 and str(path) in one_line(err, "warning: ")
    smoke_command = roadmap.TOOLS["smoke"].command
    items = [i for day in json.loads(out)["days"] for i in day["items"] if i["command"] == smoke_command]
    assert items and all(not i["done"] and "cannot be read" in i["evidence"] for i in items)


# --- the real command line (one process) --------------------------------------------------------------

def test_the_command_as_typed_warns_in_one_line_and_works(tmp_path, bank):
    path = progress_db(tmp_path / "p.db", bank)
    break_rows(path, BAD_ROWS["fsrs-json"][0])
    proc = subprocess.run([sys.executable, "scripts/interview_qa.py", "--stats", "--db", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FINETUNE_WORKDIR": str(tmp_path)})
    assert proc.returncode == 0 and "mastery" in proc.stdout and "reviews: 2" in proc.stdout
    assert "table cards (card_id 'mdp-definition')" in one_line(proc.stderr, "warning: ")
