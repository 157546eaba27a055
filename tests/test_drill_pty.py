"""The drill's two prompts driven as a learner drives them, through a pseudo-terminal (pexpect): a
normal answer and rating, Ctrl-C, Esc then Enter and Ctrl-D at the answer prompt and at the grade
prompt. Each test runs one `interview_qa.py` process on a fresh --db with a fixed --seed, then checks
what the database holds (the answer text, its grade, the rating or none) and the exit status. Plus
the commands' output through a real pipe whose reader has gone, as `| head` leaves it."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import fsrs
import pexpect
import pytest

from core.contract import Question
from core.paths import ROOT
from learning.grader import grade_question
from learning.progress_db import ProgressDB
from learning.questions import all_questions
from scripts import interview_qa

ANSWER = "The Markov property: the next state depends only on the current state and the action taken."
ESC_ENTER = "\x1b\r"   # sent in one write: prompt_toolkit reads it as Esc then Enter, not as two lone keys
CTRL_C, CTRL_D, DOWN = "\x03", "\x04", "\x1b[B"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Drill:
    """interview_qa.py --module mdp --level 1 --seed 0 --count N on a pseudo-terminal (TERM=xterm, 50 x 200)."""

    def __init__(self, tmp_path: Path, registry, count: int):
        self.db = tmp_path / "p.db"
        argv = ["--module", "mdp", "--level", "1", "--count", str(count), "--seed", "0", "--db", str(self.db)]
        with ProgressDB(tmp_path / "plan.db") as plan:   # the same seed on an empty db: the order it will ask
            self.questions: list[Question] = interview_qa.session_questions(
                all_questions(registry), interview_qa.parse_args(argv), plan, interview_qa.Interactive(),
                interview_qa.utcnow())
        self.transcript = io.StringIO()
        self.child = pexpect.spawn(sys.executable, [str(ROOT / "scripts" / "interview_qa.py"), *argv], cwd=str(ROOT),
                                   # COLUMNS/LINES too: rich prefers them to the pty's size, and a
                                   # parent (an xdist worker) may carry other values
                                   env={**os.environ, "TERM": "xterm", "COLUMNS": "200", "LINES": "50",
                                        "FINETUNE_WORKDIR": str(tmp_path)},
                                   dimensions=(50, 200), encoding="utf-8", timeout=60)
        self.child.logfile_read = self.transcript

    def expect(self, text: str) -> str:
        """Wait for `text` on the screen; the screen text (ANSI codes dropped) before it."""
        self.child.expect_exact(text)
        return ANSI.sub("", self.child.before)

    def question(self, i: int) -> str:
        """Wait for question i's answer prompt; what was shown since the previous wait."""
        shown = self.expect(f"{i}/{len(self.questions)} · ")
        return shown + self.expect("Your answer")

    def answer(self, text: str = ANSWER) -> None:
        self.child.send(text)
        self.child.send(ESC_ENTER)
        self.expect("suggested grade")
        self.expect("Your grade")

    def finish(self) -> tuple[int, str]:
        """The exit status and everything the drill showed."""
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus, ANSI.sub("", self.transcript.getvalue())

    def saved(self) -> tuple[list[dict], list[dict]]:
        """(reviews, unrated answers) in the database"""
        with ProgressDB(self.db) as db:
            return db.reviews(), db.unrated()


def moves_to(rating: fsrs.Rating, start: fsrs.Rating) -> str:
    """The Down presses that take the grade prompt from `start` (its default) to `rating`; it wraps around."""
    return DOWN * ((rating - start) % len(fsrs.Rating))


def test_an_answer_and_the_rating_chosen_are_saved(tmp_path, registry):
    drill = Drill(tmp_path, registry, count=1)
    (question,) = drill.questions
    expected = grade_question(ANSWER, question)
    before_answering = drill.question(1)
    assert question.q.split()[0] in before_answering
    assert "model answer" not in before_answering and "✓" not in before_answering and "✗" not in before_answering, \
        "neither the key points nor the model answer before the learner answers"
    drill.answer()
    chosen = fsrs.Rating.Easy if expected.suggested != fsrs.Rating.Easy else fsrs.Rating.Hard
    drill.child.send(moves_to(chosen, expected.suggested) + "\r")
    status, shown = drill.finish()

    assert status == 0
    assert shown.index("suggested grade") < shown.index("model answer") < shown.rindex("Your grade")
    assert f"graded {chosen.name}" in shown and "1 of 1 questions answered" in shown
    (review,), unrated = drill.saved()
    assert unrated == []
    assert (review["card_id"], review["answer"], review["score"], review["rating"], review["graded_by"]) == \
           (question.id, ANSWER, expected.score, chosen, "offline")


def test_ctrl_c_at_the_answer_prompt_ends_the_session_and_keeps_the_rated_answers(tmp_path, registry):
    drill = Drill(tmp_path, registry, count=2)
    first = drill.questions[0]
    drill.question(1)
    drill.answer()
    drill.child.send("\r")                     # the suggested grade
    drill.question(2)
    drill.child.send(CTRL_C)
    status, shown = drill.finish()

    assert_only_the_first_was_rated(drill, first, status, shown)
    with ProgressDB(drill.db) as db:
        (session,) = db.sessions()
        assert session["questions_asked"] == 1 and session["ended_at"] is not None


def test_ctrl_c_at_the_grade_prompt_keeps_the_answer_graded_but_unrated(tmp_path, registry):
    drill = Drill(tmp_path, registry, count=2)
    first = drill.questions[0]
    drill.question(1)
    drill.answer()
    drill.child.send(CTRL_C)
    status, shown = drill.finish()

    assert status == 0 and "Session ended early" in shown
    assert "1 of 2 questions answered" in shown and "answered, not rated" in shown
    assert "No question answered" not in shown and "2/2 · " not in shown
    reviews, (unrated,) = drill.saved()
    assert reviews == []
    assert (unrated["card_id"], unrated["answer"], unrated["score"]) == \
           (first.id, ANSWER, grade_question(ANSWER, first).score)
    with ProgressDB(drill.db) as db:
        assert db.cards() == {}, "an unrated answer schedules nothing"
        assert db.mastery_evidence([first]) == {first.id: "answered, not rated"}


def test_esc_then_enter_at_either_prompt_asks_again(tmp_path, registry):
    drill = Drill(tmp_path, registry, count=1)
    (question,) = drill.questions
    drill.question(1)
    drill.child.send(ESC_ENTER)                # submits an empty answer: asked again
    drill.expect("The answer is empty")
    drill.expect("Your answer")
    drill.answer()
    drill.child.send(ESC_ENTER)                # at the grade prompt questionary answers '' (no choice): asked again
    drill.expect("No grade chosen")
    drill.expect("Your grade")
    drill.child.send("\r")
    status, shown = drill.finish()

    assert status == 0 and "1 of 1 questions answered" in shown and "Traceback" not in shown
    (review,), unrated = drill.saved()
    assert unrated == []
    expected = grade_question(ANSWER, question)
    assert (review["answer"], review["score"], review["rating"]) == (ANSWER, expected.score, expected.suggested)


def test_ctrl_d_ends_the_session_at_the_answer_prompt_and_is_ignored_at_the_grade_prompt(tmp_path, registry):
    drill = Drill(tmp_path, registry, count=2)
    first = drill.questions[0]
    drill.question(1)
    drill.answer()
    drill.child.send(CTRL_D)                   # the grade prompt has no use for it
    drill.child.send("\r")
    drill.question(2)
    drill.child.send(CTRL_D)                   # on an empty answer: end of input
    status, shown = drill.finish()

    assert_only_the_first_was_rated(drill, first, status, shown)


def assert_only_the_first_was_rated(drill: Drill, first, status: int, shown: str) -> None:
    """The session ended at question 2 of 2: question 1 is saved with the suggested rating, nothing else."""
    assert status == 0 and "Session ended early" in shown and "1 of 2 questions answered" in shown
    (review,), unrated = drill.saved()
    assert unrated == []
    assert (review["card_id"], review["answer"], review["rating"]) == \
           (first.id, ANSWER, grade_question(ANSWER, first).suggested)

# --- a closed pipe -----------------------------------------------------------------------------------

@pytest.mark.parametrize("script, argv", [("progress.py", ["--json"]), ("progress.py", []),
                                          ("interview_qa.py", ["--stats"])])
def test_output_into_a_pipe_whose_reader_is_gone_stops_quietly(script, argv, tmp_path):
    """As `... | head` leaves it once head has its lines. The reader closes before the command writes
    (it takes seconds to start), so the test does not depend on the output outgrowing the pipe buffer."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FINETUNE_WORKDIR": str(tmp_path)})
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""
