#!/usr/bin/env python
"""Mock interview: questions from every module's bank, graded answers, FSRS-scheduled reviews.

    python scripts/interview_qa.py --all                     # 10 questions: due first, then new ones
    python scripts/interview_qa.py --module gae --count 5 --seed 3
    python scripts/interview_qa.py --due --level 3           # only due level-3 questions
    python scripts/interview_qa.py --answers-file my.toml    # no prompts: answers from a file
    python scripts/interview_qa.py --stats                   # mastery per module and level, due, streak
    python scripts/interview_qa.py --judge http://127.0.0.1:8000/v1   # an LLM judge grades (learning/judge.py)

Each question: type an answer (Esc then Enter submits; an empty one is asked again) -> it is graded
(learning.grader.grade_question): the key points it hit and missed and the wrong claims it made ->
only then the model answer -> confirm or override the suggested grade -> fsrs schedules the next
review and the review is saved at once. Ctrl-C ends the session at either prompt, Ctrl-D on an
empty answer; every answer already given is kept. An answer left at the grade prompt is kept as
graded but unrated (learning/progress_db.py says how the next session treats it); Esc then Enter
there picks no grade, so the prompt is asked again.

With --judge URL an OpenAI-compatible model server you run grades instead (learning/judge.py); when
it does not answer, one line says why and the rest of the session is graded offline.

Mastery (--stats) needs your rating and the grade to agree: your latest review of the question is
rated Good or Easy and its answer was graded Good or Easy (learning/progress_db.py).

Answers file (TOML, or JSON with the same shape when the name ends in .json), in the order to ask:

    mdp-definition = "An MDP is the tuple (S, A, P, R, gamma) ..."   # question id = answer
    [gae-definition]                                                  # or a table, to override
    answer = "delta_t = r_t + gamma V(s_{t+1}) - V(s_t) ..."          # the suggested grade
    rating = "Good"                                                   # Again | Hard | Good | Easy

An answer may be up to 20 000 characters (learning.grader.MAX_ANSWER_CHARS; a spoken answer is a few
hundred words): a longer one in an answers file is bad input, a longer typed one is asked again.

Progress lives in output/progress.db under the work dir (--db PATH to move it). A bad row in it (say,
a card whose FSRS data does not parse) is reported in one warning line and left out; the rest works.
Exit status (core/cli.py): 0 done (an interrupted session included), 2 bad input: unknown module or
question id, an unreadable or empty answers file, an answer over the cap, no terminal without
--answers-file, or a --db file that is not a Finetune progress database (reported, never modified)
or cannot be written; 3 an internal error (traceback in output/crash/interview_qa.log); 130
interrupted outside a session.
"""
from __future__ import annotations

import argparse
import difflib
import json
import random
import sys
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fsrs  # noqa: E402
import questionary  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.panel import Panel  # noqa: E402
from rich.table import Table  # noqa: E402

from core.cli import Console, Parser, crash_log, guard, path_argument  # noqa: E402
from core.contract import LEVELS, Question  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.registry import Registry, discover  # noqa: E402
from learning.grader import MAX_ANSWER_CHARS, AnswerTooLong, Grade, grade_question, readable_claim  # noqa: E402
from learning.judge import Judge, JudgeUnavailable  # noqa: E402
from learning.progress_db import UNRATED, ProgressDB  # noqa: E402
from learning.questions import all_questions  # noqa: E402

INTERACTIVE_COUNT = 10
SPAN_CHARS = 90


console = Console()
err = Console(stderr=True)


class BadInput(UserError):
    """Reported on stderr in one line with exit status 2 (core.cli.guard)."""


class EndSession(Exception):
    """The learner cancelled a prompt with Ctrl-C (questionary answers None)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description="Mock interview with graded answers and spaced repetition.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--module", metavar="NAME", help="questions of one module")
    scope.add_argument("--all", action="store_true", help="questions of every module (the default)")
    p.add_argument("--due", action="store_true", help="only questions whose review is due now")
    p.add_argument("--level", type=int, choices=sorted(LEVELS), help="only questions of this level")
    p.add_argument("--count", type=int, metavar="K",
                   help=f"ask at most K questions (default {INTERACTIVE_COUNT}; every question of an answers file)")
    p.add_argument("--answers-file", type=path_argument, metavar="FILE",
                   help="non-interactive: question id -> answer (TOML, or .json); see the docstring")
    p.add_argument("--stats", action="store_true", help="mastery per module and level, due counts, streak")
    p.add_argument("--db", type=path_argument, metavar="PATH", help="progress database (default: output/progress.db)")
    p.add_argument("--seed", type=int, help="seed for the question order (default: a fresh order each time)")
    p.add_argument("--judge", metavar="URL", help="grade with the LLM at this OpenAI-compatible base URL, e.g. "
                                                  "http://127.0.0.1:8000/v1 (offline when it does not answer)")
    p.add_argument("--judge-model", metavar="NAME", help="the judge's model (default: the first the server lists)")
    args = p.parse_args(argv)
    if args.judge_model and not args.judge:
        p.error("--judge-model names the judge's model: give the judge's --judge URL too")
    if args.count is not None and args.count < 1:
        p.error("--count must be at least 1")
    return args


# --- where answers come from ------------------------------------------------------------------------

class AnswerSource(Protocol):
    kind: str

    def answer(self, question: Question) -> str: ...

    def rating(self, question: Question, result: Grade) -> fsrs.Rating: ...


class Interactive:
    kind = "interactive"

    def answer(self, question: Question) -> str:
        """The typed answer; an empty one (Esc then Enter before typing) or one over MAX_ANSWER_CHARS is
        refused and asked again. Ctrl-C raises EndSession, Ctrl-D (on an empty answer) EOFError."""
        while True:
            text = questionary.text("Your answer", multiline=True,
                                    instruction="(Esc then Enter submits; Ctrl-C ends the session)").ask(kbi_msg="")
            if text is None:
                raise EndSession
            if not text.strip():
                err.print("[yellow]The answer is empty[/]: say what you would say (\"I don't know\" is an answer), "
                          "or Ctrl-C to end the session.")
            elif len(text) > MAX_ANSWER_CHARS:
                err.print(f"[yellow]{escape(str(AnswerTooLong(len(text))))}[/]: shorten it and answer again.")
            else:
                return text

    def rating(self, question: Question, result: Grade) -> fsrs.Rating:
        """The chosen rating. Esc then Enter makes questionary answer '' (no choice): asked again."""
        names = [r.name for r in fsrs.Rating]
        while True:
            choice = questionary.select("Your grade", choices=names, default=result.suggested.name).ask(kbi_msg="")
            if choice is None:
                raise EndSession
            if choice in names:
                return fsrs.Rating[choice]
            err.print("[yellow]No grade chosen[/]: pick one with the arrow keys and Enter, or Ctrl-C to leave "
                      "(your answer is kept, unrated).")


@dataclass
class AnswersFile:
    """Answers and optional rating overrides read from a file, keyed by question id in file order."""
    answers: dict[str, str]
    ratings: dict[str, fsrs.Rating]
    kind = "answers-file"

    @classmethod
    def read(cls, path: Path) -> AnswersFile:
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BadInput(f"cannot read answers file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise BadInput(f"{path}: expected a mapping of question id -> answer")
        answers, ratings = {}, {}
        for qid, entry in raw.items():
            if isinstance(entry, dict) and isinstance(entry.get("answer"), str):
                answers[qid] = entry["answer"]
                if "rating" in entry:
                    ratings[qid] = parse_rating(entry["rating"], f"{path}: question {qid!r}")
            elif isinstance(entry, str):
                answers[qid] = entry
            else:
                raise BadInput(f"{path}: question {qid!r} needs a string answer or a table with `answer`")
            if len(answers[qid]) > MAX_ANSWER_CHARS:
                raise BadInput(f"{path}: question {qid!r}: {AnswerTooLong(len(answers[qid]))}")
        if not answers:
            raise BadInput(f"{path}: the answers file is empty: it names no question. Write one line per "
                           f"question, e.g. mdp-definition = \"An MDP is ...\" (see --help)")
        return cls(answers, ratings)

    def answer(self, question: Question) -> str:
        return self.answers[question.id]

    def rating(self, question: Question, result: Grade) -> fsrs.Rating:
        return self.ratings.get(question.id, result.suggested)


def parse_rating(value: object, where: str) -> fsrs.Rating:
    names = {r.name.lower(): r for r in fsrs.Rating}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    raise BadInput(f"{where}: rating {value!r} is not one of {', '.join(r.name for r in fsrs.Rating)}")


# --- choosing the questions -------------------------------------------------------------------------

def in_scope(questions: list[Question], args: argparse.Namespace, due: set[str]) -> list[Question]:
    return [q for q in questions
            if (not args.module or q.module == args.module)
            and (args.level is None or q.level == args.level)
            and (not args.due or q.id in due)]


def session_questions(bank: list[Question], args: argparse.Namespace, db: ProgressDB,
                      source: AnswerSource, now: datetime) -> list[Question]:
    """Interactive: due questions first, then never-drilled ones, then the rest, shuffled by --seed
    within each group. Answers file: the file's questions in its order. Filters apply to both."""
    due = set(db.due_cards(now))
    if isinstance(source, AnswersFile):
        by_id = {q.id: q for q in bank}
        unknown = [qid for qid in source.answers if qid not in by_id]
        if unknown:
            close = {qid: difflib.get_close_matches(qid, list(by_id), n=2) for qid in unknown}
            raise BadInput("answers file names unknown question ids: "
                           + "; ".join(f"{qid!r}" + (f" (did you mean {', '.join(c)}?)" if c else "")
                                       for qid, c in close.items()))
        chosen = in_scope([by_id[qid] for qid in source.answers], args, due)
        return chosen[:args.count] if args.count else chosen
    drilled = set(db.cards())
    chosen = in_scope(bank, args, due)
    random.Random(args.seed).shuffle(chosen)
    chosen.sort(key=lambda q: 0 if q.id in due else 1 if q.id not in drilled else 2)
    return chosen[:args.count or INTERACTIVE_COUNT]


# --- the session ------------------------------------------------------------------------------------

@dataclass
class Answered:
    question: Question
    result: Grade
    rating: fsrs.Rating | None = None
    """None: left before rating (kept unrated, nothing scheduled)"""
    card: fsrs.Card | None = None


class Grader:
    """The offline grader, or the LLM judge until it fails once: then one line says why and the rest
    of the session is graded offline (a judge that timed out once would make every question wait)."""

    def __init__(self, judge: Judge | None = None):
        self.judge = judge

    def __call__(self, answer: str, question: Question) -> Grade:
        if self.judge is not None:
            try:
                return self.judge.grade(answer, question)
            except JudgeUnavailable as exc:
                console.print(f"[yellow]The judge did not grade:[/] {escape(str(exc))}. "
                              "Grading offline from here on.", soft_wrap=True)
                self.judge = None
        return grade_question(answer, question)


def run_session(questions: list[Question], db: ProgressDB, source: AnswerSource, mode: str,
                clock=utcnow, grader: Callable[[str, Question], Grade] = grade_question) -> list[Answered]:
    session_id = db.start_session(mode, clock())
    answered: list[Answered] = []
    try:
        for i, question in enumerate(questions, 1):
            show_question(question, i, len(questions))
            answer = source.answer(question)
            result = grader(answer, question)
            try:
                show_grade(question, result)
                rating = source.rating(question, result)
            except (EndSession, KeyboardInterrupt, EOFError):
                db.record_unrated(question, result, answer, session_id, clock())  # graded: keep it
                answered.append(Answered(question, result))
                raise
            now = clock()
            card = db.record_review(question, rating, result, answer, session_id, now)
            show_scheduled(rating, card, now)
            answered.append(Answered(question, result, rating, card))
    except (EndSession, KeyboardInterrupt, EOFError):
        console.print("\n[yellow]Session ended early.[/] Every answer given so far is saved.")
    finally:
        db.end_session(session_id, clock())
    show_summary(answered, len(questions), db)
    return answered


def show_question(question: Question, i: int, n: int) -> None:
    title = f"{i}/{n} · {question.module} · level {question.level} ({LEVELS[question.level]}) · {question.id}"
    console.print(Panel(escape(question.q), title=escape(title), title_align="left", border_style="cyan"))


def show_grade(question: Question, result: Grade) -> None:
    """What the grade found, then the model answer: only after the learner has answered."""
    for hit in result.hits:
        console.print(f"  [green]✓[/] {escape(readable_claim(hit.key_point))}  [dim]← “{escape(short(hit.span))}”[/]")
    for miss in result.misses:
        console.print(f"  [red]✗[/] {escape(readable_claim(miss))}")
    for negated in result.contradicted:
        console.print(f"  [red]negated:[/] {escape(readable_claim(negated.key_point))}  "
                      f"[dim]← “{escape(short(negated.span))}”[/]")
    for wrong in result.misconceptions:
        console.print(f"  [red]wrong:[/] {escape(readable_claim(wrong.key_point))}  [dim]← “{escape(short(wrong.span))}”[/]")
    if result.prose < 1:
        console.print(f"  [yellow]reads as a list of terms, not sentences:[/] the score is scaled by {result.prose:.2f}")
    if result.feedback:
        console.print(f"  [dim]{result.grader}:[/] {escape(result.feedback)}")
    claims = f", {len(result.misconceptions)} wrong claim(s)" if result.misconceptions else ""
    console.print(f"  {len(result.hits)} of {len(result.hits) + len(result.misses)} key points{claims}: "
                  f"score {result.score:.2f}  → suggested grade [bold]{result.suggested.name}[/]")
    console.print(Panel(escape(question.answer), title="model answer", title_align="left", border_style="dim"))


def short(span: str) -> str:
    span = " ".join(span.split())
    return span if len(span) <= SPAN_CHARS else span[:SPAN_CHARS - 1] + "…"


def until(due: datetime, now: datetime) -> str:
    seconds = (due - now).total_seconds()
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return "now"


def show_scheduled(rating: fsrs.Rating, card: fsrs.Card, now: datetime) -> None:
    console.print(f"  graded [bold]{rating.name}[/] → next review in {until(card.due, now)} "
                  f"({card.due:%Y-%m-%d %H:%M} UTC)\n")


def show_summary(answered: list[Answered], planned: int, db: ProgressDB) -> None:
    if not answered:
        console.print(f"No question answered (0 of {planned}).")
        return
    table = Table(title=f"session: {len(answered)} of {planned} questions answered")
    for col, justify in (("question", "left"), ("module", "left"), ("level", "right"), ("score", "right"),
                         ("grade", "left"), ("next review (UTC)", "left"), ("mastery evidence", "left")):
        table.add_column(col, justify=justify)
    evidence = db.mastery_evidence(a.question for a in answered)
    for a in answered:
        rated = a.rating is not None
        table.add_row(a.question.id, a.question.module, str(a.question.level), f"{a.result.score:.2f}",
                      a.rating.name if rated else UNRATED, f"{a.card.due:%Y-%m-%d %H:%M}" if rated else "—",
                      evidence[a.question.id])
    console.print(table)
    mean = sum(a.result.score for a in answered) / len(answered)
    console.print(f"mean score {mean:.2f}; progress saved to {db.path}")


# --- stats ------------------------------------------------------------------------------------------

def show_stats(bank: list[Question], db: ProgressDB, module: str | None, now: datetime) -> None:
    """The table covers the chosen module(s); the footer lines cover the learner's whole history."""
    shown = [q for q in bank if not module or q.module == module]
    mastery = db.mastery(shown)
    due = set(db.due_cards(now))
    drilled = set(db.cards())
    table = Table(title="mastery: share of questions whose latest review you rated Good/Easy and whose answer "
                        "was graded Good/Easy")
    for col in ("module", "questions", "drilled", "due now", *(f"level {lvl}" for lvl in LEVELS), "all levels"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for name in sorted({q.module for q in shown}):
        questions = [q for q in shown if q.module == name]
        per_level = {lvl: [q for q in questions if q.level == lvl] for lvl in LEVELS}
        cells = [f"{mastery[name][lvl]:.0%} of {len(qs)}" if qs else "—" for lvl, qs in per_level.items()]
        overall = sum(mastery[name][lvl] * len(qs) for lvl, qs in per_level.items() if qs) / len(questions)
        table.add_row(name, str(len(questions)), str(sum(q.id in drilled for q in questions)),
                      str(sum(q.id in due for q in questions)), *cells, f"{overall:.0%}")
    console.print(table)
    stats = db.stats()
    mean = f"{stats['mean_score']:.2f}" if stats["mean_score"] is not None else "—"
    streak = db.streak(now.astimezone().date())
    console.print(f"all modules — streak: {streak} day{'' if streak == 1 else 's'}   reviews: {stats['reviews']}   "
                  f"sessions: {stats['sessions']}   mean score: {mean}   "
                  f"due now: {len(due & {q.id for q in bank})}")
    console.print("ratings: " + ", ".join(f"{k} {v}" for k, v in stats["reviews_by_rating"].items())
                  + f"; {UNRATED}: {stats['unrated']}")


# --- entry point ------------------------------------------------------------------------------------

def describe_mode(args: argparse.Namespace, source: AnswerSource) -> str:
    filters = [f"module={args.module}" if args.module else "all",
               *([f"level={args.level}"] if args.level is not None else []), *(["due"] if args.due else [])]
    return f"{source.kind} " + " ".join(filters)


def load_bank(registry: Registry, module: str | None) -> list[Question]:
    if module is not None:
        registry.get(module)  # raises UnknownModule with close matches (an empty name included)
    for broken in registry.broken:
        err.print(f"[yellow]skipping broken module manifest[/] {broken.path}: {escape(broken.error)}")
    return all_questions(registry)


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: interview(sys.argv[1:] if argv is None else argv),
                 crash_log=crash_log("interview_qa"))


def interview(argv: list[str]) -> int:
    args = parse_args(argv)
    bank = load_bank(discover(), args.module)
    source: AnswerSource = AnswersFile.read(args.answers_file) if args.answers_file else Interactive()
    if not args.stats and isinstance(source, Interactive) and not sys.stdin.isatty():
        raise BadInput("the interview needs a terminal; without one, pass --answers-file FILE")
    with ProgressDB(args.db) as db:
        now = utcnow()
        if args.stats:
            show_stats(bank, db, args.module, now)
            return 0
        questions = session_questions(bank, args, db, source, now)
        if not questions:
            console.print("Nothing to ask with these filters" + (": no question is due now." if args.due else "."))
            return 0
        judge = Judge(args.judge, args.judge_model) if args.judge else None
        run_session(questions, db, source, describe_mode(args, source), clock=utcnow, grader=Grader(judge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
