"""The 14-day roadmap and the level checkpoints: their two data files, the check that every name in
them resolves, the Markdown generated from them, and the learner's progress on them, computed from
evidence (the run index, the progress database, the latest smoke report), never ticked by hand.

learning/roadmap.toml, one table per day (days 1..14, in order):

    [[day]]
    day = 1
    title = "..."
    runs = [{ modules = ["mdp"], preset = "toy" }]              # -> python run.py --module mdp --toy
    read = [{ module = "mdp", sections = ["What it is"] }]      # README headings (number stripped, prefix)
    briefs = ["mdp"]                                            # -> python scripts/interview_brief.py --module mdp
    drills = [{ module = "mdp", level = 1, count = 2 },         # -> interview_qa.py --module mdp --level 1 --count 2
              { scope = "due", count = 15 }]                    # -> interview_qa.py --due --count 15 (or "all")
    tools = ["stats"]                                           # keys of TOOLS
    outcome = "..."
    checkpoint = 1                                              # optional: the level reached by the day's end

learning/levels.toml, one table per level (1..5, in order):

    [[level]]
    level = 1
    title = "..."
    meaning = "..."
    runs = [{ modules = ["mdp"], preset = "toy" }]              # latest run at that preset passed every check
    mastery = [{ modules = ["mdp"], question_level = 1, min = 0.5 }]   # ProgressDB.mastery() >= min
    review_days = 3                                             # optional: drilled on at least 3 distinct days

What counts as done (`evaluate`):
- a run: the run index's latest entry for (module, preset) has status "passed" (overrides allowed);
- a module drill: at least min(count, questions in the bank at that level) of the module's questions
  at that level have been answered at least once;
- a `due` or `all` drill: at least `count` reviews logged on or after that roadmap day's date;
- the smoke tool: the latest smoke report ran every module at the toy preset and is ok;
- a checkpoint: the level reached (the highest level whose criteria, and every lower level's, hold);
- reading, briefs and the other tools leave no trace, so they are listed but not checked.
"""
from __future__ import annotations

import re
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.artifacts import CorruptArtifact, read_json
from core.contract import LEVELS as QUESTION_LEVELS
from core.contract import BankError
from core.errors import UserError
from core.paths import ROOT
from core.registry import Registry, UnknownModule
from core.run_context import read_run_index
from learning import smoke
from learning.briefs import TEMPLATES, run_command
from learning.progress_db import ProgressDB, ProgressDBError, default_path
from learning.questions import all_questions

LEARNING = Path(__file__).resolve().parent
ROADMAP_TOML = LEARNING / "roadmap.toml"
LEVELS_TOML = LEARNING / "levels.toml"
ROADMAP_MD = LEARNING / "ROADMAP_14_DAYS.md"
CHECKPOINTS_MD = LEARNING / "LEVEL_CHECKPOINTS.md"
ROADMAP_DAYS = 14
CHECKPOINT_LEVELS = 5
DRILL_SCOPES = ("due", "all")
SMOKE_PRESET = "toy"
DAILY_REVIEW_COMMAND = "python scripts/interview_qa.py --due"


class RoadmapError(UserError, ValueError):
    """A data file that breaks its format or names something that does not exist."""


PROGRESS_ERRORS = (RoadmapError, ProgressDBError, BankError, CorruptArtifact)
"""what progress_report raises on bad data: reported with exit status 2 (all of them are UserErrors,
which core.cli.guard maps to 2; the tuple stays for callers that catch them by name)"""


@dataclass(frozen=True)
class Tool:
    command: str
    purpose: str


TOOLS = {
    "stats": Tool("python scripts/interview_qa.py --stats", "mastery per module and level, due counts, streak"),
    "progress": Tool("python scripts/progress.py", "your roadmap day, what is done, which checkpoints pass"),
    "export": Tool("python scripts/export_interview_briefs.py --format both",
                   "every module's brief as Markdown plus one offline HTML page (output/briefs/)"),
    "smoke": Tool("python scripts/smoke_test.py",
                  "every module's --help and toy run in its own process; a report that flags regressions"),
}


def brief_command(module: str) -> str:
    return f"python scripts/interview_brief.py --module {module}"


# --- the data files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Runs:
    modules: tuple[str, ...]
    preset: str

    def commands(self) -> list[str]:
        return [run_command(m, self.preset) for m in self.modules]


@dataclass(frozen=True)
class Reading:
    module: str
    sections: tuple[str, ...]


@dataclass(frozen=True)
class Drill:
    count: int
    module: str | None = None
    scope: str | None = None
    """'due' or 'all' when the drill is not about one module"""
    level: int | None = None

    @property
    def command(self) -> str:
        words = ["python scripts/interview_qa.py", f"--module {self.module}" if self.module else f"--{self.scope}"]
        words += [f"--level {self.level}"] if self.level is not None else []
        return " ".join(words + [f"--count {self.count}"])


@dataclass(frozen=True)
class Day:
    day: int
    title: str
    runs: tuple[Runs, ...]
    read: tuple[Reading, ...]
    briefs: tuple[str, ...]
    drills: tuple[Drill, ...]
    tools: tuple[str, ...]
    outcome: str
    checkpoint: int | None

    @property
    def modules(self) -> list[str]:
        """Every module the day names, in first-mention order."""
        names = [m for r in self.runs for m in r.modules] + [r.module for r in self.read] + list(self.briefs)
        names += [d.module for d in self.drills if d.module]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Mastery:
    modules: tuple[str, ...]
    question_level: int
    min: float

    def commands(self) -> list[str]:
        return [f"python scripts/interview_qa.py --module {m} --level {self.question_level}" for m in self.modules]


@dataclass(frozen=True)
class Level:
    level: int
    title: str
    meaning: str
    runs: tuple[Runs, ...]
    mastery: tuple[Mastery, ...]
    review_days: int | None


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; `count = true` is still a mistake
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _fields(raw: Any, where: str, required: dict[str, type], optional: dict[str, type] | None = None) -> dict[str, Any]:
    """The table's values, type-checked; unknown keys are errors, so a typo cannot silently drop a field."""
    if not isinstance(raw, dict):
        raise RoadmapError(f"{where}: expected a table, got {type(raw).__name__}")
    kinds = {**required, **(optional or {})}
    unknown, missing = sorted(set(raw) - set(kinds)), sorted(set(required) - set(raw))
    if unknown or missing:
        raise RoadmapError(f"{where}: " + "; ".join(filter(None, [missing and f"missing {missing}",
                                                               unknown and f"unknown keys {unknown}"])))
    for key, value in raw.items():
        if not _is(value, kinds[key]):
            raise RoadmapError(f"{where}: {key} must be {kinds[key].__name__}, got {value!r}")
    return raw


def _names(raw: list, where: str) -> tuple[str, ...]:
    if not raw or not all(isinstance(n, str) and n for n in raw):
        raise RoadmapError(f"{where}: expected a non-empty list of names, got {raw!r}")
    return tuple(raw)


def _runs(raw: list, where: str) -> tuple[Runs, ...]:
    runs = []
    for i, item in enumerate(raw, 1):
        f = _fields(item, f"{where} runs #{i}", {"modules": list, "preset": str})
        runs.append(Runs(_names(f["modules"], f"{where} runs #{i} modules"), f["preset"]))
    return tuple(runs)


def _drill(raw: Any, where: str) -> Drill:
    f = _fields(raw, where, {"count": int}, {"module": str, "scope": str, "level": int})
    if ("module" in f) == ("scope" in f):
        raise RoadmapError(f"{where}: give exactly one of `module` or `scope` ({' or '.join(DRILL_SCOPES)})")
    if f.get("scope", DRILL_SCOPES[0]) not in DRILL_SCOPES:
        raise RoadmapError(f"{where}: scope must be one of {DRILL_SCOPES}, got {f['scope']!r}")
    if f.get("level", 1) not in QUESTION_LEVELS:
        raise RoadmapError(f"{where}: level must be one of {sorted(QUESTION_LEVELS)}, got {f['level']}")
    if f["count"] < 1:
        raise RoadmapError(f"{where}: count must be at least 1")
    return Drill(f["count"], f.get("module"), f.get("scope"), f.get("level"))


def _day(raw: Any, where: str) -> Day:
    f = _fields(raw, where, {"day": int, "title": str, "outcome": str},
                {"runs": list, "read": list, "briefs": list, "drills": list, "tools": list, "checkpoint": int})
    read = []
    for i, item in enumerate(f.get("read", []), 1):
        r = _fields(item, f"{where} read #{i}", {"module": str, "sections": list})
        read.append(Reading(r["module"], _names(r["sections"], f"{where} read #{i} sections")))
    tools = tuple(f.get("tools", []))
    unknown_tools = [t for t in tools if t not in TOOLS]
    if unknown_tools:
        raise RoadmapError(f"{where}: unknown tools {unknown_tools}; known: {', '.join(TOOLS)}")
    return Day(day=f["day"], title=f["title"], runs=_runs(f.get("runs", []), where), read=tuple(read),
               briefs=_names(f["briefs"], f"{where} briefs") if "briefs" in f else (),
               drills=tuple(_drill(d, f"{where} drill #{i}") for i, d in enumerate(f.get("drills", []), 1)),
               tools=tools, outcome=f["outcome"], checkpoint=f.get("checkpoint"))


def _level(raw: Any, where: str) -> Level:
    f = _fields(raw, where, {"level": int, "title": str, "meaning": str},
                {"runs": list, "mastery": list, "review_days": int})
    mastery = []
    for i, item in enumerate(f.get("mastery", []), 1):
        m = _fields(item, f"{where} mastery #{i}", {"modules": list, "question_level": int, "min": float})
        if m["question_level"] not in QUESTION_LEVELS or not 0 < m["min"] <= 1:
            raise RoadmapError(f"{where} mastery #{i}: question_level must be one of {sorted(QUESTION_LEVELS)} "
                               f"and min in (0, 1], got {m['question_level']} and {m['min']}")
        mastery.append(Mastery(_names(m["modules"], f"{where} mastery #{i} modules"), m["question_level"],
                               float(m["min"])))
    if f.get("review_days", 1) < 1:
        raise RoadmapError(f"{where}: review_days must be at least 1")
    level = Level(f["level"], f["title"], f["meaning"], _runs(f.get("runs", []), where), tuple(mastery),
                  f.get("review_days"))
    if not (level.runs or level.mastery or level.review_days):
        raise RoadmapError(f"{where}: a level needs at least one criterion")
    return level


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RoadmapError(f"{path}: {exc}") from None


def _numbered(items: list, key: str, expected: int, path: Path) -> None:
    numbers = [getattr(item, key) for item in items]
    if numbers != list(range(1, expected + 1)):
        raise RoadmapError(f"{path}: {key}s must be 1..{expected} in order, got {numbers}")


def load_roadmap(path: Path = ROADMAP_TOML) -> list[Day]:
    raw = _read_toml(path)
    _fields(raw, str(path), {"day": list})
    days = [_day(d, f"{path}: day #{i}") for i, d in enumerate(raw["day"], 1)]
    _numbered(days, "day", ROADMAP_DAYS, path)
    return days


def load_levels(path: Path = LEVELS_TOML) -> list[Level]:
    raw = _read_toml(path)
    _fields(raw, str(path), {"level": list})
    levels = [_level(lv, f"{path}: level #{i}") for i, lv in enumerate(raw["level"], 1)]
    _numbered(levels, "level", CHECKPOINT_LEVELS, path)
    return levels


# --- does every name resolve? ---------------------------------------------------------------------
def readme_sections(readme: Path) -> list[str]:
    """The headings of a README without their '#' marks and leading numbers ("2. The equations" ->
    "The equations"); lines inside code fences are not headings."""
    headings, in_fence = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            headings.append(re.sub(r"^\d+(\.\d+)*\.?\s+", "", line.lstrip("#").strip()))
    return headings


def find_section(headings: list[str], wanted: str) -> str | None:
    """The first heading that starts with `wanted` (case-insensitive): the data names a section by
    its stable beginning, so a heading that gains a suffix like "(`code/x.py`)" still matches."""
    return next((h for h in headings if h.lower().startswith(wanted.lower())), None)


def problems(days: list[Day], levels: list[Level], registry: Registry) -> list[str]:
    """Every reference in the two files that does not resolve against the registry and the banks."""
    found: list[str] = []
    bank = Counter((q.module, q.level) for q in all_questions(registry))

    def module_ok(name: str, where: str) -> bool:
        try:
            registry.get(name)
            return True
        except UnknownModule as exc:
            found.append(f"{where}: {exc}")
            return False

    def runs_ok(runs: tuple[Runs, ...], where: str) -> None:
        for r in runs:
            for name in r.modules:
                if module_ok(name, where) and r.preset not in registry.modules[name].presets:
                    found.append(f"{where}: module {name!r} has no preset {r.preset!r} "
                                 f"(presets: {', '.join(registry.modules[name].presets)})")

    def questions_ok(name: str, level: int | None, where: str) -> None:
        count = sum(n for (m, lvl), n in bank.items() if m == name and level in (None, lvl))
        if count == 0:
            found.append(f"{where}: module {name!r} has no questions" + (f" at level {level}" if level else ""))

    for day in days:
        where = f"roadmap day {day.day}"
        runs_ok(day.runs, where)
        for reading in day.read:
            if module_ok(reading.module, where):
                readme = registry.modules[reading.module].path / "README.md"
                headings = readme_sections(readme)
                for section in reading.sections:
                    if find_section(headings, section) is None:
                        found.append(f"{where}: {readme.relative_to(ROOT)} has no section starting with "
                                     f"{section!r} (sections: {'; '.join(headings)})")
        for name in day.briefs:
            module_ok(name, where)
        for drill in day.drills:
            if drill.module and module_ok(drill.module, where):
                questions_ok(drill.module, drill.level, where)
        if day.checkpoint is not None and day.checkpoint not in {lv.level for lv in levels}:
            found.append(f"{where}: checkpoint {day.checkpoint} is not a level in levels.toml")
    for level in levels:
        where = f"level {level.level}"
        runs_ok(level.runs, where)
        for criterion in level.mastery:
            for name in criterion.modules:
                if module_ok(name, where):
                    questions_ok(name, criterion.question_level, where)
    return found


def not_on_roadmap(days: list[Day], registry: Registry) -> list[str]:
    """Registered modules that no roadmap day runs (the roadmap grows as modules are added)."""
    run = {m for day in days for r in day.runs for m in r.modules}
    return [name for name in registry.modules if name not in run]


def load_checked(registry: Registry) -> tuple[list[Day], list[Level]]:
    """Both data files, with every reference resolved; RoadmapError listing what does not."""
    days, levels = load_roadmap(), load_levels()
    found = problems(days, levels, registry)
    if found:
        raise RoadmapError("learning/roadmap.toml or learning/levels.toml names something that does not exist:\n  "
                           + "\n  ".join(found))
    return days, levels


# --- the generated Markdown -----------------------------------------------------------------------
_env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
                   trim_blocks=True, lstrip_blocks=True)


def _modules_by_category(names: list[str], registry: Registry) -> dict[str, list[str]]:
    by_category: dict[str, list[str]] = {}
    for name in names:
        by_category.setdefault(registry.modules[name].category, []).append(name)
    return by_category


def render_roadmap(days: list[Day], registry: Registry) -> str:
    """ROADMAP_14_DAYS.md. It depends on the registry only through the categories and README paths of
    the modules it names, so registering a new module does not change it until a day names it."""
    named = list(dict.fromkeys(m for day in days for m in day.modules))
    readmes = {name: (registry.modules[name].rel_path / "README.md").as_posix() for name in named}
    return _env.get_template("roadmap.md.j2").render(
        days=days, covered=_modules_by_category(named, registry), readmes=readmes, tools=TOOLS,
        brief_command=brief_command)


def render_checkpoints(levels: list[Level]) -> str:
    """LEVEL_CHECKPOINTS.md."""
    return _env.get_template("checkpoints.md.j2").render(levels=levels, question_levels=QUESTION_LEVELS,
                                                         daily_review=DAILY_REVIEW_COMMAND)


def rendered_docs(registry: Registry) -> dict[Path, str]:
    days, levels = load_checked(registry)
    return {ROADMAP_MD: render_roadmap(days, registry), CHECKPOINTS_MD: render_checkpoints(levels)}


# --- the evidence ---------------------------------------------------------------------------------
@dataclass
class Evidence:
    now: datetime
    runs: dict[str, dict[str, Any]]
    """the run index: module -> preset -> latest entry"""
    drilled: Counter
    """(module, level) -> questions of the current bank answered at least once"""
    bank: Counter
    """(module, level) -> questions in the current bank"""
    reviews: list[tuple[date, int]]
    """(local date, question level) of every review of a question in the current bank"""
    mastery: dict[str, dict[int, float]]
    streak: int
    smoke: Any
    """the latest smoke report (as read: smoke_item checks it against the schema), None if there is
    none, or SmokeUnreadable when latest.json cannot be read"""

    @property
    def today(self) -> date:
        return self.now.astimezone().date()

    @property
    def review_days(self) -> set[date]:
        return {day for day, _ in self.reviews}


@dataclass(frozen=True)
class SmokeUnreadable:
    reason: str


def read_latest_smoke() -> Any:
    """The latest smoke report, None without one, SmokeUnreadable (reported on stderr in one line)
    when latest.json cannot be read: a corrupt report fails the smoke item, not the whole report."""
    path = smoke.reports_dir() / smoke.LATEST
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (CorruptArtifact, OSError) as exc:
        reason = str(exc) if isinstance(exc, CorruptArtifact) else f"{path}: {exc.strerror or exc}"
        print(f"warning: {' '.join(reason.split())}; the smoke item counts as not done", file=sys.stderr, flush=True)
        return SmokeUnreadable(reason)


def _local_date(iso_or_dt: str | datetime) -> date:
    moment = datetime.fromisoformat(iso_or_dt) if isinstance(iso_or_dt, str) else iso_or_dt
    return moment.astimezone().date()


def gather_evidence(registry: Registry, db_path: Path | None, now: datetime) -> Evidence:
    """Everything progress is computed from. A progress db that does not exist yet counts as empty
    and is not created (looking at progress writes nothing)."""
    questions = all_questions(registry)
    place = {q.id: (q.module, q.level) for q in questions}  # reviews of removed questions no longer count
    bank = Counter(place.values())
    path = Path(db_path) if db_path is not None else default_path()
    drilled: Counter = Counter()
    reviews: list[tuple[date, int]] = []
    mastery = {m: {lvl: 0.0 for (m2, lvl) in bank if m2 == m} for m in registry.modules}
    streak = 0
    if path.exists():
        with ProgressDB(path) as db:
            drilled = Counter(place[cid] for cid in db.cards() if cid in place)
            reviews = [(_local_date(r["reviewed_at"]), place[r["card_id"]][1]) for r in db.reviews()
                       if r["card_id"] in place]
            mastery = db.mastery(questions)
            streak = db.streak(now.astimezone().date())
    return Evidence(now=now, runs=read_run_index(), drilled=drilled, bank=bank, reviews=reviews, mastery=mastery,
                    streak=streak, smoke=read_latest_smoke())


def roadmap_start(evidence: Evidence, start: date | None) -> tuple[date, str]:
    """Day 1 and why: --start if given, else the earliest of the first review in the progress db
    and the earliest run still in the run index (which keeps only each module's latest run per preset,
    so the reviews are the lasting anchor), else today."""
    if start is not None:
        return start, "--start"
    candidates = [(_local_date(entry["finished_at"]), f"the earliest run in the run index, {module} {preset}")
                  for module, presets in evidence.runs.items() for preset, entry in presets.items()]
    if evidence.reviews:
        candidates.append((min(evidence.review_days), "the first drill review in the progress db"))
    if not candidates:
        return evidence.today, "today: no run or review recorded yet"
    return min(candidates, key=lambda c: c[0])


# --- evaluating items, days and levels ------------------------------------------------------------
def _item(kind: str, label: str, command: str | None, done: bool | None, evidence: str) -> dict[str, Any]:
    """done: True / False, or None for what leaves no trace to check."""
    return {"kind": kind, "label": label, "command": command, "done": done, "evidence": evidence}


def run_items(runs: tuple[Runs, ...], evidence: Evidence) -> list[dict[str, Any]]:
    items = []
    for r in runs:
        for name, command in zip(r.modules, r.commands()):
            entry = evidence.runs.get(name, {}).get(r.preset)
            if entry is None:
                done, said = False, "not run yet"
            else:
                done = entry["status"] == "passed"
                said = (f"{entry['checks_passed']}/{entry['checks_total']} checks passed, "
                        f"finished {_local_date(entry['finished_at'])}")
            items.append(_item("run", f"{name} at preset {r.preset}, every check passing", command, done, said))
    return items


def drill_item(drill: Drill, day_date: date, evidence: Evidence) -> dict[str, Any]:
    at_level = f" level-{drill.level}" if drill.level else ""
    if drill.module:
        levels = [drill.level] if drill.level else list(QUESTION_LEVELS)
        available = sum(evidence.bank[drill.module, lvl] for lvl in levels)
        answered = sum(evidence.drilled[drill.module, lvl] for lvl in levels)
        needed = min(drill.count, available)
        return _item("drill", f"answer {needed} {drill.module}{at_level} question{'s' * (needed != 1)}",
                     drill.command, answered >= needed,
                     f"{answered} of the {available}{at_level} questions answered at least once")
    reviews = sum(day >= day_date and drill.level in (None, level) for day, level in evidence.reviews)
    what = "due questions" if drill.scope == "due" else "questions from every module"
    return _item("drill", f"review {drill.count}{at_level} {what}", drill.command, reviews >= drill.count,
                 f"{reviews}{at_level} reviews since {day_date}")


def smoke_item(evidence: Evidence) -> tuple[bool, str]:
    report = evidence.smoke
    if report is None:
        return False, "no smoke report yet"
    if isinstance(report, SmokeUnreadable):
        return False, f"the latest smoke report cannot be read ({report.reason}); run the smoke test again"
    if smoke.validate_report(report):
        return False, "the latest smoke report does not match the report schema; run the smoke test again"
    summary = report["summary"]
    whole = report["options"]["modules"] is None and report["preset"] == SMOKE_PRESET
    said = (f"{report['file']}: {summary['PASS']}/{summary['modules']} PASS, {summary['regressions']} regressions"
            + ("" if whole else f" (preset {report['preset']}, modules {report['options']['modules']}: "
                                f"not the whole {SMOKE_PRESET} run)"))
    return whole and summary["ok"], said


def evaluate_levels(levels: list[Level], evidence: Evidence) -> list[dict[str, Any]]:
    review_days = len(evidence.review_days)
    result = []
    for level in levels:
        criteria = run_items(level.runs, evidence)
        for c in level.mastery:
            for name, command in zip(c.modules, c.commands()):
                value = evidence.mastery.get(name, {}).get(c.question_level, 0.0)
                criteria.append(_item("mastery", f"{name} level-{c.question_level} mastery >= {c.min:.0%}", command,
                                      value >= c.min, f"mastery {value:.0%}"))
        if level.review_days:
            criteria.append(_item("review_days", f"drilled on at least {level.review_days} different days",
                                  DAILY_REVIEW_COMMAND, review_days >= level.review_days,
                                  f"drilled on {review_days} day{'s' * (review_days != 1)}"))
        result.append({"level": level.level, "title": level.title, "passed": all(c["done"] for c in criteria),
                       "criteria": criteria})
    return result


def level_reached(levels: list[dict[str, Any]]) -> int:
    """The highest level whose criteria, and those of every level below it, hold (0: none)."""
    reached = 0
    for level in levels:
        if not level["passed"]:
            break
        reached = level["level"]
    return reached


def evaluate_day(day: Day, day_date: date, evidence: Evidence, reached: int) -> dict[str, Any]:
    items = run_items(day.runs, evidence)
    items += [_item("read", f"{r.module} README: {'; '.join(r.sections)}", None, None, "not checked")
              for r in day.read]
    items += [_item("brief", f"{name} interview brief, spoken aloud", brief_command(name), None, "not checked")
              for name in day.briefs]
    items += [drill_item(d, day_date, evidence) for d in day.drills]
    for key in day.tools:
        done, said = smoke_item(evidence) if key == "smoke" else (None, "not checked")
        items.append(_item("tool", TOOLS[key].purpose, TOOLS[key].command, done, said))
    if day.checkpoint is not None:
        items.append(_item("checkpoint", f"level {day.checkpoint} checkpoint passes", "python scripts/progress.py",
                           reached >= day.checkpoint, f"level reached: {reached}"))
    checked = [i for i in items if i["done"] is not None]
    return {"day": day.day, "date": day_date.isoformat(), "title": day.title, "modules": day.modules,
            "outcome": day.outcome, "done": all(i["done"] for i in checked),
            "checked_done": sum(bool(i["done"]) for i in checked), "checked_total": len(checked), "items": items}


def evaluate(days: list[Day], levels: list[Level], registry: Registry, evidence: Evidence,
             start: date | None = None) -> dict[str, Any]:
    """The progress report (JSON-able): today's day, every day's items with done / not done / not
    checked and the evidence, every level's criteria, the level reached."""
    first, why = roadmap_start(evidence, start)
    offset = (evidence.today - first).days
    level_report = evaluate_levels(levels, evidence)
    reached = level_reached(level_report)
    return {
        "today": evidence.today.isoformat(), "start": first.isoformat(), "start_source": why,
        "day": offset + 1 if 0 <= offset < len(days) else None,
        "phase": "before" if offset < 0 else "after" if offset >= len(days) else "during",
        "days_total": len(days), "streak": evidence.streak, "review_days": len(evidence.review_days),
        "level": reached, "levels": level_report,
        "days": [evaluate_day(d, first + timedelta(days=d.day - 1), evidence, reached) for d in days],
        "not_on_roadmap": not_on_roadmap(days, registry),
    }


def progress_report(registry: Registry, db_path: Path | None, now: datetime,
                    start: date | None = None) -> dict[str, Any]:
    days, levels = load_checked(registry)
    return evaluate(days, levels, registry, gather_evidence(registry, db_path, now), start)


# --- the rich view --------------------------------------------------------------------------------
MARK = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[dim]·[/]"}


def _headline(report: dict[str, Any]) -> str:
    where = {"during": f"day [bold]{report['day']}[/] of {report['days_total']}",
             "before": f"before day 1 (the roadmap starts on {report['start']})",
             "after": f"past day {report['days_total']}: the roadmap is finished"}[report["phase"]]
    return (f"Today {report['today']} is {where}. Day 1 = {report['start']} ({escape(report['start_source'])}).\n"
            f"Level reached: [bold]{report['level']}[/] of {len(report['levels'])}.   "
            f"Streak: {report['streak']} day{'s' * (report['streak'] != 1)}.   "
            f"Drilled on {report['review_days']} day{'s' * (report['review_days'] != 1)}.")


def _items_table(title: str, items: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in ("", "what", "command", "evidence"):
        table.add_column(col)
    for item in items:
        table.add_row(MARK[item["done"]], escape(item["label"]), escape(item["command"] or ""),
                      escape(item["evidence"]))
    return table


def print_progress(report: dict[str, Any], console: Console, day: int | None = None, module: str | None = None) -> None:
    """The overview: headline, the days (only those naming `module` when given), the items of `day`
    (default: today's, else the first unfinished one), the levels and the criteria of the next one."""
    console.print(_headline(report))
    days = [d for d in report["days"] if module is None or module in d["modules"]]
    overview = Table(title="the 14-day roadmap" + (f" (days with {module})" if module else ""))
    for col, justify in (("day", "right"), ("date", "left"), ("focus", "left"), ("modules", "left"),
                         ("checked items done", "right"), ("", "left")):
        overview.add_column(col, justify=justify)
    for d in days:
        status = ("[green]done[/]" if d["done"] else "[bold cyan]today[/]" if d["day"] == report["day"]
                  else "[yellow]behind[/]" if d["date"] < report["today"] else "")
        overview.add_row(str(d["day"]), d["date"], escape(d["title"]), ", ".join(d["modules"]),
                         f"{d['checked_done']}/{d['checked_total']}", status)
    console.print(overview)
    if module and not days:
        console.print(f"[yellow]{module} is on no roadmap day yet.[/]")
    shown = day or report["day"] or next((d["day"] for d in days if not d["done"]), None)
    if shown is not None:
        chosen = report["days"][shown - 1]
        console.print(_items_table(f"day {shown} · {chosen['date']} · {escape(chosen['title'])}", chosen["items"]))
        console.print(f"outcome: {escape(chosen['outcome'])}")
    levels = Table(title="level checkpoints (learning/LEVEL_CHECKPOINTS.md)")
    for col in ("level", "title", "criteria met"):
        levels.add_column(col)
    for lv in report["levels"]:
        met = sum(bool(c["done"]) for c in lv["criteria"])
        levels.add_row(f"{MARK[lv['passed']]} {lv['level']}", escape(lv["title"]), f"{met}/{len(lv['criteria'])}")
    console.print(levels)
    upcoming = [lv for lv in report["levels"] if lv["level"] > report["level"]]
    if upcoming:
        nxt = upcoming[0]
        console.print(_items_table(f"to reach level {nxt['level']} ({escape(nxt['title'])})", nxt["criteria"]))
    if report["not_on_roadmap"]:
        console.print(f"[dim]not on the roadmap yet: {', '.join(report['not_on_roadmap'])}[/]")
