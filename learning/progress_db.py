"""The learner's drill progress in SQLite: one FSRS card per question, every review, every session.

Tables (schema version 1):

    meta      key, value             app marker + schema version: how a foreign file is recognised
    cards     card_id (the question id), module, level, fsrs (Card.to_dict() as JSON), last_rating
    reviews   card_id, session_id, reviewed_at, rating, score, hits, misses (JSON lists), answer
    sessions  id, started_at, ended_at, mode, questions_asked

Card ids are the question ids, which are stable by contract (DESIGN.md), so rewording a question
keeps its history. Every review is committed on its own, so an interrupted session keeps every answer
already given. A file that is not this app's database (another SQLite file, a corrupt or non-SQLite
file) raises `ProgressDBError` naming it, and is opened read-only until then so it is never modified.

Mastery of (module, level) = the fraction of the bank's questions at that level whose card's last
rating was Good or Easy and whose FSRS state is Review, i.e. recalled well after leaving the
learning steps (with fsrs's default steps: once Easy, or Good on two occasions at least ten
minutes apart). Questions never drilled count as not mastered.

Times are timezone-aware UTC datetimes (fsrs requires UTC); every method that depends on the clock
takes `now`, so tests control time.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

import fsrs

from core.contract import Question
from core.paths import workdir
from learning.grader import Grade

APP_MARKER = "finetune-progress"
SCHEMA_VERSION = 1
SQLITE_HEADER = b"SQLite format 3\x00"
MASTERED_RATINGS = (fsrs.Rating.Good, fsrs.Rating.Easy)

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


class ProgressDBError(RuntimeError):
    """The file is not a readable progress database of this app; the message names the file."""


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

    def __init__(self, path: str | Path | None = None, scheduler: fsrs.Scheduler | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.scheduler = scheduler or fsrs.Scheduler()
        if not self.path.exists():
            _create(self.path)
        _verify(self.path)
        self.conn = sqlite3.connect(self.path)
        self.conn.execute("PRAGMA foreign_keys = ON")

    def __enter__(self) -> ProgressDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # --- sessions and reviews ------------------------------------------------------------------------

    def start_session(self, mode: str, now: datetime) -> int:
        with self.conn:
            cur = self.conn.execute("INSERT INTO sessions (started_at, mode) VALUES (?, ?)", (_iso(now), mode))
        return cur.lastrowid

    def end_session(self, session_id: int, now: datetime) -> None:
        with self.conn:
            self.conn.execute("UPDATE sessions SET ended_at = ? WHERE id = ?", (_iso(now), session_id))

    def card(self, card_id: str) -> CardRow | None:
        row = self.conn.execute("SELECT card_id, module, level, fsrs, last_rating FROM cards WHERE card_id = ?",
                                (card_id,)).fetchone()
        return _card_row(row) if row else None

    def cards(self) -> dict[str, CardRow]:
        rows = self.conn.execute("SELECT card_id, module, level, fsrs, last_rating FROM cards ORDER BY card_id")
        return {row[0]: _card_row(row) for row in rows}

    def record_review(self, question: Question, rating: fsrs.Rating, grade: Grade, answer: str,
                      session_id: int | None, now: datetime) -> fsrs.Card:
        """Schedule the question's card with fsrs and commit the review at once; returns the new card."""
        now = _utc(now)  # fsrs accepts UTC only
        existing = self.card(question.id)
        card = existing.card if existing else fsrs.Card(card_id=_fsrs_card_id(question.id), due=now)
        card, _ = self.scheduler.review_card(card, rating, review_datetime=now)
        hits = [{"key_point": h.key_point, "span": h.span} for h in grade.hits]
        with self.conn:  # one transaction: the card, its review and the session count land together
            self.conn.execute(
                "INSERT INTO cards (card_id, module, level, fsrs, last_rating) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(card_id) DO UPDATE SET module = excluded.module, level = excluded.level, "
                "fsrs = excluded.fsrs, last_rating = excluded.last_rating",
                (question.id, question.module, question.level, json.dumps(card.to_dict()), int(rating)))
            self.conn.execute(
                "INSERT INTO reviews (card_id, session_id, reviewed_at, rating, score, hits, misses, answer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (question.id, session_id, _iso(now), int(rating), grade.score, json.dumps(hits, ensure_ascii=False),
                 json.dumps(list(grade.misses), ensure_ascii=False), answer))
            if session_id is not None:
                self.conn.execute("UPDATE sessions SET questions_asked = questions_asked + 1 WHERE id = ?",
                                  (session_id,))
        return card

    def reviews(self, card_id: str | None = None) -> list[dict]:
        query = "SELECT card_id, session_id, reviewed_at, rating, score, hits, misses, answer FROM reviews"
        rows = self.conn.execute(query + (" WHERE card_id = ?" if card_id else "") + " ORDER BY id",
                                 (card_id,) if card_id else ())
        return [{"card_id": r[0], "session_id": r[1], "reviewed_at": datetime.fromisoformat(r[2]),
                 "rating": fsrs.Rating(r[3]), "score": r[4], "hits": json.loads(r[5]),
                 "misses": json.loads(r[6]), "answer": r[7]} for r in rows]

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

    def mastery(self, questions: Iterable[Question] | None = None) -> dict[str, dict[int, float]]:
        """module -> level -> mastered fraction (module docstring) over the current question bank,
        loaded from the registry unless given; removed questions no longer count."""
        if questions is None:
            from core.registry import discover
            from learning.questions import all_questions  # the registry imports every module: only when needed
            questions = all_questions(discover())
        cards = self.cards()
        total: Counter[tuple[str, int]] = Counter()
        mastered: Counter[tuple[str, int]] = Counter()
        for q in questions:
            total[q.module, q.level] += 1
            row = cards.get(q.id)
            if row and row.last_rating in MASTERED_RATINGS and row.card.state == fsrs.State.Review:
                mastered[q.module, q.level] += 1
        result: dict[str, dict[int, float]] = defaultdict(dict)
        for (module, level), n in sorted(total.items()):
            result[module][level] = mastered[module, level] / n
        return dict(result)

    def streak(self, today: date) -> int:
        """Consecutive days, in local time, with at least one review, ending today, or yesterday while
        today has none yet (the streak is not broken before the day is over)."""
        days = {datetime.fromisoformat(r[0]).astimezone().date()
                for r in self.conn.execute("SELECT reviewed_at FROM reviews")}
        day = today if today in days else today - timedelta(days=1)
        count = 0
        while day in days:
            count += 1
            day -= timedelta(days=1)
        return count

    def stats(self) -> dict:
        """Totals over the whole history: cards, reviews, sessions, ratings, mean score, first/last review."""
        reviews, mean_score, first, last = self.conn.execute(
            "SELECT COUNT(*), AVG(score), MIN(reviewed_at), MAX(reviewed_at) FROM reviews").fetchone()
        ratings = dict(self.conn.execute("SELECT rating, COUNT(*) FROM reviews GROUP BY rating").fetchall())
        states = Counter(row.card.state.name for row in self.cards().values())
        return {
            "cards": sum(states.values()),
            "cards_by_state": dict(states),
            "reviews": reviews,
            "reviews_by_rating": {r.name: ratings.get(int(r), 0) for r in fsrs.Rating},
            "mean_score": mean_score,
            "sessions": self.conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
            "first_review": first,
            "last_review": last,
        }


def _card_row(row: tuple) -> CardRow:
    card_id, module, level, card_json, last_rating = row
    return CardRow(card_id, module, level, fsrs.Card.from_dict(json.loads(card_json)), fsrs.Rating(last_rating))


def _create(path: Path) -> None:
    """Build the empty database beside `path` and link it into place: a crash mid-way leaves no
    half-made file, and a file another process created meanwhile is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(SCHEMA)
            with conn:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                 [("app", APP_MARKER), ("schema_version", str(SCHEMA_VERSION))])
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # created concurrently; _verify judges it
    finally:
        tmp.unlink(missing_ok=True)


def _verify(path: Path) -> None:
    """Raise ProgressDBError unless `path` is this app's database at a schema version we understand.
    Everything here reads only: the file is opened read-only, so a foreign file stays byte-identical."""
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
    if version != str(SCHEMA_VERSION):
        raise ProgressDBError(f"{path}: progress database schema version {version}, this code reads "
                              f"version {SCHEMA_VERSION}; it was left untouched.")
