"""The learner's drill progress in SQLite: one FSRS card per question, every review, every session.

Tables (schema version 2):

    meta      key, value             app marker + schema version: how a foreign file is recognised
    cards     card_id (the question id), module, level, fsrs (Card.to_dict() as JSON), last_rating
    reviews   card_id, session_id, reviewed_at, rating, score, hits, misses (JSON lists), answer, graded_by
    unrated   card_id, session_id, answered_at, score, hits, misses, answer, graded_by
    sessions  id, started_at, ended_at, mode, questions_asked

`graded_by` says which grader scored the answer: "offline" (learning/grader.py) or "judge:<model>".
An `unrated` row is an answer that was graded but never rated, because the learner left the drill at
the rating prompt: it is kept, but it schedules nothing, so the next session treats that question as
it was before: a question never rated is still new, a rated one keeps its FSRS due date; answering
it again is what rates it. Version 1 (no graded_by, no unrated table: everything was "offline") is
read as it is and upgraded in one transaction before the first write, so looking at progress never
modifies the file.

Card ids are the question ids, which are stable by contract (DESIGN.md), so rewording a question
keeps its history. Every review is committed on its own, so an interrupted session keeps every answer
already given. A file that is not this app's database (another SQLite file, a corrupt or non-SQLite
file) raises `ProgressDBError` naming it, and is opened read-only until then so it is never modified.
A database that cannot be written (a read-only file or folder, a full disk) raises it too, on the
first write.

Rows are validated as they are read: a card or review whose values break the schema above (FSRS
JSON that does not parse, a level that is not a question level, a rating outside 1..4, a time that
is not a timezone-aware ISO 8601 string, ...) is reported once, in one warning line naming the
table and the card id or row id, and left out; everything else still works. Answering that question
again replaces its bad card row. Cards of questions no longer in the bank (a renamed or removed
question or module) are not bad rows: they are kept, and simply no longer count.

Mastery needs the learner and the grader to agree: a question is mastered when its latest review
is rated Good or Easy by the learner AND its answer was graded Good or Easy (score >= 2/3, the
grader's own threshold, whether the offline grader or the judge scored it). `mastery_evidence` names
what each question lacks otherwise; mastery of (module, level) is the fraction of the bank's
questions at that level that are mastered. The FSRS state plays no part: a first well-graded Good is
evidence enough, and how soon to see the question again is the scheduler's business. An unrated
answer is not a review, so it neither makes nor breaks mastery.

Times are timezone-aware UTC datetimes (fsrs requires UTC); every method that depends on the clock
takes `now`, so tests control time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import sys
import uuid
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import fsrs

from core.contract import LEVELS, Question
from core.errors import UserError
from core.paths import workdir
from learning.grader import Grade, suggested_rating

APP_MARKER = "finetune-progress"
SCHEMA_VERSION = 2
SQLITE_HEADER = b"SQLite format 3\x00"
MASTERED_RATINGS = (fsrs.Rating.Good, fsrs.Rating.Easy)
OFFLINE = "offline"
"""graded_by of learning/grader.py; an LLM judge's answers carry "judge:<model>" instead"""

# mastery_evidence: what a question's answers show, best first
MASTERED, GRADED_LOW, RATED_LOW, UNRATED, NEVER_ANSWERED = (
    "mastered", "graded low", "rated low", "answered, not rated", "never answered")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cards (
    card_id TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    level INTEGER NOT NULL,
    fsrs TEXT NOT NULL,
    last_rating INTEGER NOT NULL
);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    mode TEXT NOT NULL,
    questions_asked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    card_id TEXT NOT NULL REFERENCES cards(card_id),
    session_id INTEGER REFERENCES sessions(id),
    reviewed_at TEXT NOT NULL,
    rating INTEGER NOT NULL,
    score REAL NOT NULL,
    hits TEXT NOT NULL,
    misses TEXT NOT NULL,
    answer TEXT NOT NULL
);
CREATE INDEX reviews_by_card ON reviews(card_id);
"""
"""version 1; a new database is made from it plus every upgrade, so new and upgraded ones are alike"""

UPGRADE_TO_2 = (
    f"ALTER TABLE reviews ADD COLUMN graded_by TEXT NOT NULL DEFAULT '{OFFLINE}'",
    f"""CREATE TABLE unrated (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        card_id TEXT NOT NULL,
        session_id INTEGER REFERENCES sessions(id),
        answered_at TEXT NOT NULL,
        score REAL NOT NULL,
        hits TEXT NOT NULL,
        misses TEXT NOT NULL,
        answer TEXT NOT NULL,
        graded_by TEXT NOT NULL DEFAULT '{OFFLINE}'
    )""",
)


_V1_COLUMNS = {
    "meta": {"key", "value"},
    "cards": {"card_id", "module", "level", "fsrs", "last_rating"},
    "sessions": {"id", "started_at", "ended_at", "mode", "questions_asked"},
    "reviews": {"id", "card_id", "session_id", "reviewed_at", "rating", "score", "hits", "misses", "answer"},
}
TABLE_COLUMNS = {
    1: _V1_COLUMNS,
    2: {**_V1_COLUMNS, "reviews": _V1_COLUMNS["reviews"] | {"graded_by"},
        "unrated": {"id", "card_id", "session_id", "answered_at", "score", "hits", "misses", "answer", "graded_by"}},
}
"""schema version -> what the code reads: a file with the app marker that lacks one of these is damaged"""


class ProgressDBError(UserError):
    """The file is not a readable (or writable) progress database of this app; the message names the file."""


class BadRow(ValueError):
    """A row whose values break the schema; the message says which value and why."""


def warn_on_stderr(message: str) -> None:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def default_path() -> Path:
    return workdir() / "output" / "progress.db"


@dataclass(frozen=True)
class CardRow:
    card_id: str
    module: str
    level: int
    card: fsrs.Card
    last_rating: fsrs.Rating


def _fsrs_card_id(question_id: str) -> int:
    """fsrs wants an integer id; the real key is the question id, this is only a stable stand-in."""
    return int.from_bytes(hashlib.blake2b(question_id.encode(), digest_size=6).digest(), "big")


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment}: pass a timezone-aware time")
    return moment.astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    return _utc(moment).isoformat()


class ProgressDB:
    """`with ProgressDB(path) as db: ...`; `path=None` means the default under the work dir."""

    def __init__(self, path: str | Path | None = None, scheduler: fsrs.Scheduler | None = None,
                 on_bad_row: Callable[[str], None] = warn_on_stderr):
        """`on_bad_row(message)` hears of each bad row once (default: a warning line on stderr)."""
        self.path = Path(path) if path is not None else default_path()
        self.scheduler = scheduler or fsrs.Scheduler()
        self.on_bad_row = on_bad_row
        self.bad_rows: dict[tuple[str, str], str] = {}
        """(table, card id or row id) -> why it was left out, for every bad row met so far"""
        if not self.path.exists():
            _create(self.path)
        self.version = _verify(self.path)
        try:
            self.conn = sqlite3.connect(self.path)
            self.conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise ProgressDBError(f"{self.path}: cannot open it ({exc})") from None

    def __enter__(self) -> ProgressDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction, after the upgrade of an older schema; a database that refuses the write
        (read-only, disk full) is bad input."""
        try:
            if self.version < SCHEMA_VERSION:
                self._upgrade()
            with self.conn:
                yield self.conn
        except sqlite3.OperationalError as exc:
            raise ProgressDBError(f"{self.path}: cannot write to it ({exc}); check that the file and its folder "
                                  f"are writable and the disk has space, or pass --db with another path.") from None

    def _upgrade(self) -> None:
        """Version 1 -> 2 in one transaction. IMMEDIATE takes the write lock before the version is read
        again, so of two processes writing to the same old file only one upgrades it."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1":
                for statement in UPGRADE_TO_2:
                    self.conn.execute(statement)
                self.conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        self.version = 2

    def _bad(self, table: str, key: str, why: str) -> None:
        if (table, key) not in self.bad_rows:
            self.bad_rows[table, key] = why
            self.on_bad_row(f"{self.path}: skipped a bad row of table {table} ({key}): {why}")

    # --- sessions and reviews ------------------------------------------------------------------------

    def start_session(self, mode: str, now: datetime) -> int:
        with self._writing() as conn:
            cur = conn.execute("INSERT INTO sessions (started_at, mode) VALUES (?, ?)", (_iso(now), mode))
        return cur.lastrowid

    def end_session(self, session_id: int, now: datetime) -> None:
        with self._writing() as conn:
            conn.execute("UPDATE sessions SET ended_at = ? WHERE id = ?", (_iso(now), session_id))

    def _valid_cards(self, rows: Iterable[tuple]) -> Iterator[CardRow]:
        for row in rows:
            try:
                yield _card_row(row)
            except BadRow as exc:
                self._bad("cards", f"card_id {row[0]!r}", str(exc))

    def card(self, card_id: str) -> CardRow | None:
        """The card, or None when it was never drilled or its row is bad (reported)."""
        rows = self.conn.execute("SELECT card_id, module, level, fsrs, last_rating FROM cards WHERE card_id = ?",
                                 (card_id,)).fetchall()
        return next(self._valid_cards(rows), None)

    def cards(self) -> dict[str, CardRow]:
        """Every valid card by id; bad rows are reported and left out."""
        rows = self.conn.execute("SELECT card_id, module, level, fsrs, last_rating FROM cards ORDER BY card_id")
        return {row.card_id: row for row in self._valid_cards(rows)}

    def record_review(self, question: Question, rating: fsrs.Rating, grade: Grade, answer: str,
                      session_id: int | None, now: datetime) -> fsrs.Card:
        """Schedule the question's card with fsrs and commit the review at once; returns the new card."""
        now = _utc(now)  # fsrs accepts UTC only
        existing = self.card(question.id)
        card = existing.card if existing else fsrs.Card(card_id=_fsrs_card_id(question.id), due=now)
        card, _ = self.scheduler.review_card(card, rating, review_datetime=now)
        with self._writing():  # one transaction: the card, its review and the session count land together
            self.conn.execute(
                "INSERT INTO cards (card_id, module, level, fsrs, last_rating) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(card_id) DO UPDATE SET module = excluded.module, level = excluded.level, "
                "fsrs = excluded.fsrs, last_rating = excluded.last_rating",
                (question.id, question.module, question.level, json.dumps(card.to_dict()), int(rating)))
            self.conn.execute(
                "INSERT INTO reviews (card_id, session_id, reviewed_at, rating, score, hits, misses, answer, "
                "graded_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (question.id, session_id, _iso(now), int(rating), *_graded(grade), answer, grade.grader))
            self._count_answer(session_id)
        return card

    def record_unrated(self, question: Question, grade: Grade, answer: str, session_id: int | None,
                       now: datetime) -> None:
        """Commit a graded answer the learner left without rating (module docstring): no card changes."""
        with self._writing():
            self.conn.execute(
                "INSERT INTO unrated (card_id, session_id, answered_at, score, hits, misses, answer, graded_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (question.id, session_id, _iso(now), *_graded(grade), answer, grade.grader))
            self._count_answer(session_id)

    def _count_answer(self, session_id: int | None) -> None:
        if session_id is not None:
            self.conn.execute("UPDATE sessions SET questions_asked = questions_asked + 1 WHERE id = ?", (session_id,))

    def reviews(self, card_id: str | None = None) -> list[dict]:
        """Every valid review in the order they were made; bad rows are reported and left out."""
        graded_by = "graded_by" if self.version >= 2 else f"'{OFFLINE}'"
        return self._rows("reviews", f"SELECT id, card_id, session_id, reviewed_at, rating, score, hits, misses, "
                                     f"answer, {graded_by} FROM reviews", card_id, _review_row)

    def unrated(self, card_id: str | None = None) -> list[dict]:
        """Every valid unrated answer in the order they were given (none in a version-1 database)."""
        if self.version < 2:
            return []
        return self._rows("unrated", "SELECT id, card_id, session_id, answered_at, score, hits, misses, answer, "
                                     "graded_by FROM unrated", card_id, _unrated_row)

    def _rows(self, table: str, query: str, card_id: str | None, parse: Callable[[tuple], dict]) -> list[dict]:
        rows = self.conn.execute(query + (" WHERE card_id = ?" if card_id else "") + " ORDER BY id",
                                 (card_id,) if card_id else ())
        parsed = []
        for row in rows:
            try:
                parsed.append(parse(row))
            except BadRow as exc:
                self._bad(table, f"row id {row[0]}, card_id {row[1]!r}", str(exc))
        return parsed

    def sessions(self) -> list[dict]:
        rows = self.conn.execute("SELECT id, started_at, ended_at, mode, questions_asked FROM sessions ORDER BY id")
        return [{"id": r[0], "started_at": r[1], "ended_at": r[2], "mode": r[3], "questions_asked": r[4]}
                for r in rows]

    # --- what the learner sees -----------------------------------------------------------------------

    def due_cards(self, now: datetime) -> list[str]:
        """Ids of drilled questions whose next review is due at `now`, most overdue first. Questions
        never drilled are new, not due."""
        due = [(row.card.due, card_id) for card_id, row in self.cards().items() if row.card.due <= now]
        return [card_id for _, card_id in sorted(due)]

    def mastery_evidence(self, questions: Iterable[Question]) -> dict[str, str]:
        """Question id -> what its answers show (module docstring): "mastered", "graded low" (rated
        Good/Easy, but the grade is below Good), "rated low" (the learner's own rating is below Good),
        "answered, not rated" (answered, never rated) or "never answered". The latest valid review
        decides; bad rows are reported and left out."""
        latest = {review["card_id"]: review for review in self.reviews()}
        unrated = {row["card_id"] for row in self.unrated()}
        evidence = {}
        for q in questions:
            review = latest.get(q.id)
            if review is None:
                evidence[q.id] = UNRATED if q.id in unrated else NEVER_ANSWERED
            elif review["rating"] not in MASTERED_RATINGS:
                evidence[q.id] = RATED_LOW
            elif suggested_rating(review["score"]) not in MASTERED_RATINGS:
                evidence[q.id] = GRADED_LOW
            else:
                evidence[q.id] = MASTERED
        return evidence

    def mastery(self, questions: Iterable[Question] | None = None) -> dict[str, dict[int, float]]:
        """module -> level -> mastered fraction (module docstring) over the current question bank,
        loaded from the registry unless given; removed questions no longer count."""
        if questions is None:
            from core.registry import discover
            from learning.questions import all_questions  # the registry imports every module: only when needed
            questions = all_questions(discover())
        questions = list(questions)
        evidence = self.mastery_evidence(questions)
        total: Counter[tuple[str, int]] = Counter()
        mastered: Counter[tuple[str, int]] = Counter()
        for q in questions:
            total[q.module, q.level] += 1
            mastered[q.module, q.level] += evidence[q.id] == MASTERED
        result: dict[str, dict[int, float]] = defaultdict(dict)
        for (module, level), n in sorted(total.items()):
            result[module][level] = mastered[module, level] / n
        return dict(result)

    def streak(self, today: date) -> int:
        """Consecutive days, in local time, with at least one review, ending today, or yesterday while
        today has none yet (the streak is not broken before the day is over)."""
        days = {r["reviewed_at"].astimezone().date() for r in self.reviews()}
        day = today if today in days else today - timedelta(days=1)
        count = 0
        while day in days:
            count += 1
            day -= timedelta(days=1)
        return count

    def stats(self) -> dict:
        """Totals over the whole history (valid rows only): cards, reviews, unrated answers, sessions,
        ratings, mean score of the reviews, first/last review (ISO 8601, UTC)."""
        reviews = self.reviews()
        times = [r["reviewed_at"] for r in reviews]
        ratings = Counter(r["rating"] for r in reviews)
        states = Counter(row.card.state.name for row in self.cards().values())
        return {
            "cards": sum(states.values()),
            "cards_by_state": dict(states),
            "reviews": len(reviews),
            "reviews_by_rating": {r.name: ratings[r] for r in fsrs.Rating},
            "unrated": len(self.unrated()),
            "mean_score": sum(r["score"] for r in reviews) / len(reviews) if reviews else None,
            "sessions": self.conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
            "first_review": _iso(min(times)) if times else None,
            "last_review": _iso(max(times)) if times else None,
        }


# --- reading rows: each value checked, a bad one named -------------------------------------------------

def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRow(f"{name} must be non-empty text, got {value!r}")
    return value


def _rating(value: Any, name: str) -> fsrs.Rating:
    if type(value) is not int or value not in {int(r) for r in fsrs.Rating}:
        raise BadRow(f"{name} must be a rating 1..4 ({', '.join(r.name for r in fsrs.Rating)}), got {value!r}")
    return fsrs.Rating(value)


def _moment(value: Any, name: str) -> datetime:
    """A timezone-aware ISO 8601 time (fsrs compares them with aware times)."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise BadRow(f"{name} must be an ISO 8601 time, got {value!r}") from None
    if moment.tzinfo is None:
        raise BadRow(f"{name} {value!r} has no time zone")
    return moment


def _json_list(value: Any, name: str) -> list:
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        raise BadRow(f"{name} is not valid JSON: {value!r:.60}") from None
    if not isinstance(parsed, list):
        raise BadRow(f"{name} must be a JSON list, got {type(parsed).__name__}")
    return parsed


def _fsrs_card(value: Any) -> fsrs.Card:
    try:
        raw = json.loads(value)
    except (TypeError, ValueError):
        raise BadRow(f"fsrs is not valid JSON: {value!r:.60}") from None
    if not isinstance(raw, dict):
        raise BadRow(f"fsrs must be a JSON object, got {type(raw).__name__}")
    try:
        card = fsrs.Card.from_dict(raw)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadRow(f"fsrs is not an FSRS card ({type(exc).__name__}: {exc})") from None
    for name in ("due", "last_review"):
        moment = getattr(card, name)
        if moment is not None and moment.tzinfo is None:
            raise BadRow(f"fsrs {name} {moment.isoformat()!r} has no time zone")
    if not all(x is None or math.isfinite(x) for x in (card.stability, card.difficulty)):
        raise BadRow(f"fsrs stability and difficulty must be finite, got {card.stability}, {card.difficulty}")
    if card.step is not None and type(card.step) is not int:
        raise BadRow(f"fsrs step must be an integer or null, got {card.step!r}")
    return card


def _card_row(row: tuple) -> CardRow:
    card_id, module, level, card_json, last_rating = row
    if type(level) is not int or level not in LEVELS:
        raise BadRow(f"level must be a question level ({', '.join(map(str, LEVELS))}), got {level!r}")
    return CardRow(_text(card_id, "card_id"), _text(module, "module"), level, _fsrs_card(card_json),
                   _rating(last_rating, "last_rating"))


def _graded(grade: Grade) -> tuple[float, str, str]:
    """score, hits and misses of a grade as stored"""
    hits = [{"key_point": h.key_point, "span": h.span} for h in grade.hits]
    return grade.score, json.dumps(hits, ensure_ascii=False), json.dumps(list(grade.misses), ensure_ascii=False)


def _graded_answer(card_id: Any, session_id: Any, score: Any, hits: Any, misses: Any, answer: Any,
                   graded_by: Any) -> dict:
    """The fields reviews and unrated answers share, checked."""
    if session_id is not None and type(session_id) is not int:
        raise BadRow(f"session_id must be a session id or null, got {session_id!r}")
    if type(score) not in (int, float) or not 0 <= score <= 1:
        raise BadRow(f"score must be a number in [0, 1], got {score!r}")
    if not isinstance(answer, str):
        raise BadRow(f"answer must be text, got {type(answer).__name__}")
    return {"card_id": _text(card_id, "card_id"), "session_id": session_id, "score": score,
            "hits": _json_list(hits, "hits"), "misses": _json_list(misses, "misses"), "answer": answer,
            "graded_by": _text(graded_by, "graded_by")}


def _review_row(row: tuple) -> dict:
    _, card_id, session_id, reviewed_at, rating, score, hits, misses, answer, graded_by = row
    return {**_graded_answer(card_id, session_id, score, hits, misses, answer, graded_by),
            "reviewed_at": _moment(reviewed_at, "reviewed_at"), "rating": _rating(rating, "rating")}


def _unrated_row(row: tuple) -> dict:
    _, card_id, session_id, answered_at, score, hits, misses, answer, graded_by = row
    return {**_graded_answer(card_id, session_id, score, hits, misses, answer, graded_by),
            "answered_at": _moment(answered_at, "answered_at")}


def _create(path: Path) -> None:
    """Build the empty database beside `path` and link it into place: a crash mid-way leaves no
    half-made file, and a file another process created meanwhile is never replaced. A place where no
    database can be made (a file where a folder should be, a read-only folder, a full disk) raises
    ProgressDBError naming it."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(SCHEMA)
            for statement in UPGRADE_TO_2:
                conn.execute(statement)
            with conn:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                 [("app", APP_MARKER), ("schema_version", str(SCHEMA_VERSION))])
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # created concurrently; _verify judges it
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise ProgressDBError(f"{path}: cannot create the progress database there: {reason}{where}. "
                              f"Pass --db with another path.") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # its folder never existed


def _verify(path: Path) -> int:
    """The schema version of `path`; ProgressDBError unless it is this app's database at a version we
    read. Everything here reads only: the file is opened read-only, so a foreign file stays byte-identical."""
    if not path.is_file():
        raise ProgressDBError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise ProgressDBError(f"{path}: not an SQLite database (empty, corrupt or another kind of file); "
                              f"it was left untouched. Move it away or pass --db with another path.")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
            columns = {table: {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                       for table in TABLE_COLUMNS[SCHEMA_VERSION]}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ProgressDBError(f"{path}: cannot read it as SQLite ({exc}); it was left untouched.") from None
    if integrity != "ok":
        raise ProgressDBError(f"{path}: the database is damaged ({integrity}); it was left untouched.")
    if meta.get("app") != APP_MARKER:
        raise ProgressDBError(f"{path}: an SQLite database, but not a Finetune progress database "
                              f"(tables: {', '.join(sorted(tables)) or 'none'}); it was left untouched. "
                              f"Pass --db with another path.")
    version = meta.get("schema_version", "?")
    if version not in map(str, TABLE_COLUMNS):
        raise ProgressDBError(f"{path}: progress database schema version {version}, this code reads "
                              f"versions {min(TABLE_COLUMNS)} to {SCHEMA_VERSION}; it was left untouched.")
    missing = []
    for table, wanted in TABLE_COLUMNS[int(version)].items():
        missing += [f"table {table}"] if not columns[table] else [f"column {table}.{c}"
                                                                  for c in sorted(wanted - columns[table])]
    if missing:
        raise ProgressDBError(f"{path}: the progress database is damaged: it lacks {', '.join(missing)}; "
                              f"it was left untouched. Move it away or pass --db with another path.")
    return int(version)
