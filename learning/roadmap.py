"""The 14-day roadmap and the level checkpoints: derived from the registry (each module's category,
interview weight and outcome, its README and its questions) by the rules in two data files, checked
so that every name resolves, rendered as Markdown, and the learner's progress on them computed from
evidence (the run index, the progress database, the latest smoke report), never ticked by hand.

learning/roadmap.toml holds rules, not days:

    days = 14                        # the last day is the final mock interview
    final_questions = 30             # that day's drill across every module
    due_questions = 10               # the due review that opens every day after the first
    [[track]]                        # tracks are studied in the order they are listed
    title = "RL foundations"
    categories = ["rl_basics"]       # a module joins the track that names its category
    foundation = true                # optional: studied lightest first (otherwise heaviest first)

The days (`plan`):
- a track's modules in study order: each after the track's modules it depends on; a foundation's
  lightest first, any other track's heaviest first (interview_weight); then the module more modules
  depend on; then the name;
- the study days: tracks in order, each track's modules cut into consecutive days that hold at most
  B of weight (a heavier module has a day of its own), B the smallest budget that fits every module
  into days - 1; days still free become review days before the last;
- a module's day: its toy and default runs, its README (every section), its brief, every level-1
  question and weight/5 of each deeper level's questions (rounded up); title: the heads of the module
  titles; outcome: their interview_outcome;
- every day after the first opens with `due_questions` due questions; the last day briefs every
  module and drills `final_questions` across all of them, then the smoke test, export and progress.

learning/levels.toml, one table per level (1..5, in order):

    [[level]]
    level = 1
    title = "..."
    meaning = "..."
    runs = [{ categories = ["llm"], preset = "toy" }]              # latest run at that preset passed every check
    mastery = [{ min_weight = 4, question_level = 3, min = 0.5 }]  # share of mastered questions >= min
    review_days = 3                                                # optional: drilled on at least 3 distinct days

A criterion selects modules by `categories` (default: every one) and `min_weight` (default 1); a
mastery criterion leaves out modules without questions at its level. A level's checkpoint is the
day by which every module it selects has had its day and its drill days can have passed; the last
level's is the last day; a day shows the highest level due on it.

What counts as done (`evaluate`):
- a run: the run index's latest entry for (module, preset) has status "passed" (overrides allowed);
- a module drill: at least `count` of the module's questions at that level have been answered at
  least once;
- a `due` or `all` drill: at least `count` reviews logged on or after that roadmap day's date;
- the smoke tool: the latest smoke report ran every module at the toy preset and is ok;
- mastery: ProgressDB.mastery_evidence says "mastered" (rated and graded Good or better);
- a checkpoint: the level reached (the highest level whose criteria, and every lower level's, hold);
- reading, briefs and the other tools leave no trace, so they are listed but not checked.
"""
from __future__ import annotations

import dataclasses
import math
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
from core.registry import Module, Registry, UnknownModule
from core.run_context import read_run_index
from learning import smoke
from learning.briefs import TEMPLATES, run_command
from learning.progress_db import MASTERED, NEVER_ANSWERED, ProgressDB, ProgressDBError, default_path
from learning.questions import all_questions

LEARNING = Path(__file__).resolve().parent
ROADMAP_TOML = LEARNING / "roadmap.toml"
LEVELS_TOML = LEARNING / "levels.toml"
ROADMAP_MD = LEARNING / "ROADMAP_14_DAYS.md"
CHECKPOINTS_MD = LEARNING / "LEVEL_CHECKPOINTS.md"
CHECKPOINT_LEVELS = 5
DRILL_SCOPES = ("due", "all")
SMOKE_PRESET = "toy"
STUDY_PRESETS = ("toy", "default")
"""what a module's day runs: the toy preset in seconds, then the default preset's real result"""
FULL_WEIGHT = 5
"""the interview_weight at which a module's day drills every question of its bank"""
FINAL_TOOLS = ("smoke", "export", "progress")
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
    "progress": Tool("python scripts/progress.py", "your roadmap day, what is done, what each level still lacks"),
    "export": Tool("python scripts/export_interview_briefs.py --format both",
                   "every module's brief as Markdown plus one offline HTML page (output/briefs/)"),
    "smoke": Tool("python scripts/smoke_test.py",
                  "every module's --help and toy run in its own process; a report that flags regressions"),
}


def brief_command(module: str) -> str:
    return f"python scripts/interview_brief.py --module {module}"


# --- what a day and a level hold ------------------------------------------------------------------
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
    """the one number behind both the command's --count and every sentence that says how many"""
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
    track: str | None
    """the track whose modules the day studies; None for a review day and the final day"""
    runs: tuple[Runs, ...]
    read: tuple[Reading, ...]
    briefs: tuple[str, ...]
    drills: tuple[Drill, ...]
    tools: tuple[str, ...]
    outcome: str
    checkpoint: int | None = None

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


@dataclass(frozen=True)
class Track:
    title: str
    categories: tuple[str, ...]
    foundation: bool


@dataclass(frozen=True)
class Rules:
    days: int
    final_questions: int
    due_questions: int
    tracks: tuple[Track, ...]


# --- reading the data files -----------------------------------------------------------------------
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


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RoadmapError(f"{path}: {exc}") from None


def load_rules(path: Path = ROADMAP_TOML) -> Rules:
    raw = _fields(_read_toml(path), str(path), {"days": int, "final_questions": int, "due_questions": int,
                                                "track": list})
    for key, least in (("days", 2), ("final_questions", 1), ("due_questions", 1)):
        if raw[key] < least:
            raise RoadmapError(f"{path}: {key} must be at least {least}, got {raw[key]}")
    tracks = []
    for i, item in enumerate(raw["track"], 1):
        f = _fields(item, f"{path}: track #{i}", {"title": str, "categories": list}, {"foundation": bool})
        tracks.append(Track(f["title"], _names(f["categories"], f"{path}: track #{i} categories"),
                            f.get("foundation", False)))
    named = [c for t in tracks for c in t.categories]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise RoadmapError(f"{path}: categories named by more than one track: {twice}")
    return Rules(raw["days"], raw["final_questions"], raw["due_questions"], tuple(tracks))


def _selected(raw: dict, where: str, registry: Registry, rules: Rules) -> list[str]:
    """The modules a criterion's `categories` and `min_weight` select, in registry order."""
    known = {c for t in rules.tracks for c in t.categories}
    categories = _names(raw["categories"], f"{where} categories") if "categories" in raw else None
    unknown = sorted(set(categories or ()) - known)
    if unknown:
        raise RoadmapError(f"{where}: categories {unknown} are in no track of learning/roadmap.toml")
    if not 1 <= raw.get("min_weight", 1) <= FULL_WEIGHT:
        raise RoadmapError(f"{where}: min_weight must be in 1..{FULL_WEIGHT}, got {raw['min_weight']}")
    return [m.name for m in registry.modules.values()
            if (categories is None or m.category in categories) and m.interview_weight >= raw.get("min_weight", 1)]


def _level(raw: Any, where: str, registry: Registry, rules: Rules, bank: Counter) -> Level:
    f = _fields(raw, where, {"level": int, "title": str, "meaning": str},
                {"runs": list, "mastery": list, "review_days": int})
    selection = {"categories": list, "min_weight": int}
    runs = []
    for i, item in enumerate(f.get("runs", []), 1):
        r = _fields(item, f"{where} runs #{i}", {"preset": str}, selection)
        if names := _selected(r, f"{where} runs #{i}", registry, rules):
            runs.append(Runs(tuple(names), r["preset"]))
    mastery = []
    for i, item in enumerate(f.get("mastery", []), 1):
        m = _fields(item, f"{where} mastery #{i}", {"question_level": int, "min": float}, selection)
        if m["question_level"] not in QUESTION_LEVELS or not 0 < m["min"] <= 1:
            raise RoadmapError(f"{where} mastery #{i}: question_level must be one of {sorted(QUESTION_LEVELS)} "
                               f"and min in (0, 1], got {m['question_level']} and {m['min']}")
        names = [n for n in _selected(m, f"{where} mastery #{i}", registry, rules) if bank[n, m["question_level"]]]
        if names:
            mastery.append(Mastery(tuple(names), m["question_level"], float(m["min"])))
    if f.get("review_days", 1) < 1:
        raise RoadmapError(f"{where}: review_days must be at least 1")
    level = Level(f["level"], f["title"], f["meaning"], tuple(runs), tuple(mastery), f.get("review_days"))
    if not (level.runs or level.mastery or level.review_days):
        raise RoadmapError(f"{where}: a level needs at least one criterion that selects a module")
    return level


def load_levels(registry: Registry, rules: Rules, path: Path = LEVELS_TOML) -> list[Level]:
    raw = _fields(_read_toml(path), str(path), {"level": list})
    bank = Counter((q.module, q.level) for q in all_questions(registry))
    levels = [_level(lv, f"{path}: level #{i}", registry, rules, bank) for i, lv in enumerate(raw["level"], 1)]
    numbers = [lv.level for lv in levels]
    if numbers != list(range(1, CHECKPOINT_LEVELS + 1)):
        raise RoadmapError(f"{path}: levels must be 1..{CHECKPOINT_LEVELS} in order, got {numbers}")
    return levels


# --- the plan -------------------------------------------------------------------------------------
def readme_sections(readme: Path) -> list[str]:
    """The sections (## headings) of a README without their marks and leading numbers ("## 2. The
    equations" -> "The equations"); lines inside code fences are not headings."""
    headings, in_fence = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            headings.append(re.sub(r"^\d+(\.\d+)*\.?\s+", "", line[3:].strip()))
    return headings


def find_section(headings: list[str], wanted: str) -> str | None:
    """The first heading that starts with `wanted` (case-insensitive): a section is named by its
    stable beginning, so a heading that gains a suffix like "(`code/x.py`)" still matches."""
    return next((h for h in headings if h.lower().startswith(wanted.lower())), None)


def study_order(modules: list[Module], foundation: bool, registry: Registry) -> list[Module]:
    """A track's modules in the order they are studied (module docstring)."""
    dependents = Counter(d for m in registry.modules.values() for d in m.depends)
    weight = (lambda m: m.interview_weight) if foundation else (lambda m: -m.interview_weight)
    left = sorted(modules, key=lambda m: (weight(m), -dependents[m.name], m.name))
    order = []
    while left:
        waiting = {m.name for m in left}
        # left[0] when every one waits: a dependency cycle, which the registry does not forbid
        ready = next((m for m in left if not waiting & set(m.depends)), left[0])
        order.append(ready)
        left.remove(ready)
    return order


def _cut(modules: list[Module], budget: int, focused: bool) -> list[list[Module]]:
    """The modules in order, a new day whenever the next one would take the day past `budget`; with
    `focused`, also whenever it would put two most-asked topics on one day or a second companion on a
    most-asked topic's day (a most-asked topic then shares its day with at most one lighter one), and a
    lighter module first joins the earliest most-asked day still alone that comes no earlier than the
    days of its dependencies, so the track's companions spread over its most-asked days."""
    def fits(day: list[Module], m: Module) -> bool:
        heavy = [x for x in (*day, m) if x.interview_weight == FULL_WEIGHT]
        return (sum(x.interview_weight for x in day) + m.interview_weight <= budget
                and (not focused or not heavy or (len(heavy) == 1 and len(day) == 1)))

    days: list[list[Module]] = []
    for m in modules:
        if focused and m.interview_weight < FULL_WEIGHT:
            after = max((i for i, day in enumerate(days) for x in day if x.name in m.depends), default=0)
            host = next((day for day in days[after:] if len(day) == 1 and fits(day, m)), None)
            if host is not None:
                host.append(m)
                continue
        if days and fits(days[-1], m):
            days[-1].append(m)
        else:
            days.append([m])
    return days


def study_days(tracks: list[tuple[Track, list[Module]]], available: int) -> list[tuple[Track, list[Module]]]:
    """Each track's modules cut into days under the smallest weight budget that fits `available` days,
    the most-asked topics kept focused (`_cut`) if any budget allows it, else not; then the days a
    budget step leaves free go to the most-asked topics (`_split_days`)."""
    total = sum(m.interview_weight for _, modules in tracks for m in modules)
    for focused in (True, False):
        for budget in range(1, max(total, 1) + 1):  # at `total` each track is one day (unfocused); no module: no day
            days = [(track, day) for track, modules in tracks for day in _cut(modules, budget, focused)]
            if len(days) <= available:
                return _split_days(days, available)
    raise RoadmapError(f"learning/roadmap.toml: {sum(bool(m) for _, m in tracks)} tracks with modules do not fit "
                       f"in {available} study days (each starts a day of its own); raise `days`")


def _split_days(days: list[tuple[Track, list[Module]]], available: int) -> list[tuple[Track, list[Module]]]:
    """While study days are free, split a shared day in two, where its weights balance best: first the
    day with the most-asked module (then the heaviest day, then the earliest). One budget step can free
    several days at once (a weight-5 module needs a budget of 5 to sit beside a weight-4 one), and a day
    of its own for a most-asked topic is worth more than a review day."""
    def weight(modules: list[Module]) -> int:
        return sum(m.interview_weight for m in modules)

    days = list(days)
    while len(days) < available:
        shared = [i for i, (_, modules) in enumerate(days) if len(modules) > 1]
        if not shared:
            break
        i = max(shared, key=lambda i: (max(m.interview_weight for m in days[i][1]), weight(days[i][1]), -i))
        track, modules = days[i]
        cut = min(range(1, len(modules)), key=lambda k: abs(weight(modules[:k]) - weight(modules[k:])))
        days[i:i + 1] = [(track, modules[:cut]), (track, modules[cut:])]
    return days


def drill_count(questions: int, level: int, weight: int) -> int:
    """Questions a module's day drills at one level: every recall question, and weight/5 of the deeper
    ones (rounded up), so the most-asked topics are drilled through."""
    return questions if level == 1 else math.ceil(questions * weight / FULL_WEIGHT)


def _module_day(number: int, track: Track, modules: list[Module], bank: Counter, rules: Rules) -> Day:
    names = tuple(m.name for m in modules)
    drills = [Drill(drill_count(bank[m.name, level], level, m.interview_weight), module=m.name, level=level)
              for m in modules for level in QUESTION_LEVELS if bank[m.name, level]]
    return Day(day=number, title="; ".join(m.title.split(":")[0] for m in modules), track=track.title,
               runs=tuple(Runs(names, preset) for preset in STUDY_PRESETS),
               read=tuple(Reading(m.name, tuple(readme_sections(m.path / "README.md"))) for m in modules),
               briefs=names, drills=(*_due(number, rules), *drills), tools=(),
               outcome=" ".join(m.interview_outcome or m.summary for m in modules))


def _due(number: int, rules: Rules) -> tuple[Drill, ...]:
    return (Drill(rules.due_questions, scope="due"),) if number > 1 else ()


def _review_day(number: int, rules: Rules) -> Day:
    n = rules.due_questions
    return Day(day=number, title="Review: what is due, and questions from every module", track=None, runs=(),
               read=(), briefs=(), drills=(*_due(number, rules), Drill(n, scope="all")), tools=("stats",),
               outcome=f"Answer {n} due questions and {n} drawn from every module without notes; the stats name "
                       f"the weakest modules and levels: rerun and reread those.")


def _final_day(number: int, modules: list[str], rules: Rules) -> Day:
    n = rules.final_questions
    return Day(day=number, title="Final mock interview", track=None, runs=(), read=(), briefs=tuple(modules),
               drills=(*_due(number, rules), Drill(n, scope="all")), tools=FINAL_TOOLS,
               outcome=f"Each module's brief aloud in under four minutes from your own numbers, then {n} questions "
                       f"across every module, answered aloud and graded; the smoke report shows every module PASS "
                       f"and the progress report every day done and the level you reached.")


def plan(registry: Registry, rules: Rules) -> list[Day]:
    """The days (module docstring), without checkpoints (`place_checkpoints`)."""
    bank = Counter((q.module, q.level) for q in all_questions(registry))
    tracks = [(t, study_order([m for m in registry.modules.values() if m.category in t.categories], t.foundation,
                              registry)) for t in rules.tracks]
    days = [_module_day(i, track, modules, bank, rules)
            for i, (track, modules) in enumerate(study_days(tracks, rules.days - 1), 1)]
    days += [_review_day(i, rules) for i in range(len(days) + 1, rules.days)]
    return days + [_final_day(rules.days, [name for d in days for name in d.briefs], rules)]


def place_checkpoints(days: list[Day], levels: list[Level]) -> list[Day]:
    """Each level on the day by which every module it selects has had its day and its drill days can
    have passed, the last level on the last day; a day shows the highest level due on it."""
    last = days[-1].day
    studied = {name: d.day for d in days if d.track for name in d.modules}
    due: dict[int, int] = {}
    for level in levels:
        names = {m for r in level.runs for m in r.modules} | {m for c in level.mastery for m in c.modules}
        day = max([studied.get(name, last) for name in names] + [level.review_days or 1])
        due[last if level is levels[-1] else min(day, last)] = level.level
    return [dataclasses.replace(d, checkpoint=due.get(d.day)) for d in days]


# --- does every name resolve, and does each level ask only for what the days schedule? ------------
def problems(days: list[Day], levels: list[Level], registry: Registry) -> list[str]:
    """Every reference that does not resolve against the registry, the READMEs and the banks, and every
    level criterion the days do not make reachable."""
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

    scheduled = {(m, r.preset) for day in days for r in day.runs for m in r.modules}
    drilled = Counter({(d.module, d.level): d.count for day in days for d in day.drills if d.module})
    for level in levels:
        where = f"level {level.level}"
        runs_ok(level.runs, where)
        found += [f"{where}: asks for a {r.preset} run of {name!r}, which no roadmap day runs"
                  for r in level.runs for name in r.modules if (name, r.preset) not in scheduled]
        for c in level.mastery:
            for name in c.modules:
                if module_ok(name, where):
                    questions_ok(name, c.question_level, where)
                    if drilled[name, c.question_level] < c.min * bank[name, c.question_level]:
                        found.append(f"{where}: asks for {c.min:.0%} mastery of {name}'s level-{c.question_level} "
                                     f"questions, but the roadmap drills {drilled[name, c.question_level]} of "
                                     f"{bank[name, c.question_level]}")
        if (level.review_days or 0) > len(days):
            found.append(f"{where}: asks for {level.review_days} drill days; the roadmap has {len(days)}")
    return found


def not_on_roadmap(days: list[Day], registry: Registry) -> list[str]:
    """Registered modules that no roadmap day runs: those whose category no track of roadmap.toml names."""
    run = {m for day in days for r in day.runs for m in r.modules}
    return [name for name in registry.modules if name not in run]


def load_checked(registry: Registry) -> tuple[list[Day], list[Level]]:
    """The days and the levels, every reference resolved; RoadmapError listing what does not."""
    rules = load_rules()
    levels = load_levels(registry, rules)
    days = place_checkpoints(plan(registry, rules), levels)
    found = problems(days, levels, registry)
    if found:
        raise RoadmapError("the roadmap derived from learning/roadmap.toml or the levels of learning/levels.toml "
                           "name something that does not resolve:\n  " + "\n  ".join(found))
    return days, levels


# --- the generated Markdown -----------------------------------------------------------------------
_env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
                   trim_blocks=True, lstrip_blocks=True)


def render_roadmap(days: list[Day], registry: Registry) -> str:
    """ROADMAP_14_DAYS.md."""
    named = list(dict.fromkeys(m for day in days for m in day.modules))
    tracks: dict[str, list[Day]] = {}
    for d in days:
        if d.track:
            tracks.setdefault(d.track, []).append(d)
    return _env.get_template("roadmap.md.j2").render(
        days=days, tracks=tracks, modules=registry.modules, tools=TOOLS,
        readmes={name: (registry.modules[name].rel_path / "README.md").as_posix() for name in named},
        brief_command=brief_command, full_weight=FULL_WEIGHT, presets=STUDY_PRESETS)


def render_checkpoints(levels: list[Level], days: list[Day]) -> str:
    """LEVEL_CHECKPOINTS.md."""
    return _env.get_template("checkpoints.md.j2").render(
        levels=levels, question_levels=QUESTION_LEVELS, daily_review=DAILY_REVIEW_COMMAND,
        checkpoint_day={d.checkpoint: d.day for d in days if d.checkpoint is not None})


def rendered_docs(registry: Registry) -> dict[Path, str]:
    days, levels = load_checked(registry)
    return {ROADMAP_MD: render_roadmap(days, registry), CHECKPOINTS_MD: render_checkpoints(levels, days)}


# --- the evidence ---------------------------------------------------------------------------------
@dataclass
class Evidence:
    now: datetime
    runs: dict[str, dict[str, Any]]
    """the run index: module -> preset -> latest entry"""
    bank: dict[tuple[str, int], list[str]]
    """(module, level) -> the ids of the current bank's questions"""
    answers: dict[str, str]
    """question id -> ProgressDB.mastery_evidence ("mastered", "never answered", ...) for the current bank"""
    reviews: list[tuple[date, int]]
    """(local date, question level) of every review of a question in the current bank"""
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

    def answered(self, module: str, level: int) -> int:
        """Questions of the current bank at that level answered at least once (rated or not)."""
        return sum(self.answers[q] != NEVER_ANSWERED for q in self.bank.get((module, level), []))


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
    bank: dict[tuple[str, int], list[str]] = {}
    for q in questions:
        bank.setdefault((q.module, q.level), []).append(q.id)
    path = Path(db_path) if db_path is not None else default_path()
    answers = dict.fromkeys(place, NEVER_ANSWERED)
    reviews: list[tuple[date, int]] = []
    streak = 0
    if path.exists():
        with ProgressDB(path) as db:
            answers = db.mastery_evidence(questions)
            reviews = [(_local_date(r["reviewed_at"]), place[r["card_id"]][1]) for r in db.reviews()
                       if r["card_id"] in place]
            streak = db.streak(now.astimezone().date())
    return Evidence(now=now, runs=read_run_index(), bank=bank, answers=answers, reviews=reviews, streak=streak,
                    smoke=read_latest_smoke())


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
NOT_RUN = "not run yet"
SHOWN_IDS = 3
"""question ids a sentence lists before it says "…" (the JSON report has them all)"""


def _item(kind: str, label: str, command: str | None, done: bool | None, evidence: str, **about: Any) -> dict[str, Any]:
    """done: True / False, or None for what leaves no trace to check; `about`: what the item is about
    (module, preset, question_level, min, questions), for a reader that summarises items."""
    return {"kind": kind, "label": label, "command": command, "done": done, "evidence": evidence, **about}


def run_items(runs: tuple[Runs, ...], evidence: Evidence) -> list[dict[str, Any]]:
    items = []
    for r in runs:
        for name, command in zip(r.modules, r.commands()):
            entry = evidence.runs.get(name, {}).get(r.preset)
            if entry is None:
                done, said = False, NOT_RUN
            else:
                done = entry["status"] == "passed"
                said = (f"{entry['checks_passed']}/{entry['checks_total']} checks passed, "
                        f"finished {_local_date(entry['finished_at'])}"
                        + ("" if done else f"; {entry['out_dir']}/run.json names the failing ones"))
            items.append(_item("run", f"{name} at preset {r.preset}, every check passing", command, done, said,
                               module=name, preset=r.preset))
    return items


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:SHOWN_IDS]) + (", …" if len(ids) > SHOWN_IDS else "")


def _reasons(lacking: dict[str, list[str]]) -> str:
    """"2 never answered (a, b), 1 graded low (c)": how many questions lack mastery, and why."""
    return ", ".join(f"{len(ids)} {reason} ({_ids(ids)})" for reason, ids in lacking.items())


def mastery_items(c: Mastery, evidence: Evidence) -> list[dict[str, Any]]:
    items = []
    for name, command in zip(c.modules, c.commands()):
        ids = evidence.bank[name, c.question_level]  # a criterion names only modules with questions at its level
        lacking: dict[str, list[str]] = {}
        for q in ids:
            if evidence.answers[q] != MASTERED:
                lacking.setdefault(evidence.answers[q], []).append(q)
        mastered = len(ids) - sum(map(len, lacking.values()))
        done = mastered >= c.min * len(ids)
        said = f"mastery {mastered / len(ids):.0%} ({mastered} of {len(ids)})"
        said += "" if done else f"; {_reasons(lacking)}"
        items.append(_item("mastery", f"{name} level-{c.question_level} mastery >= {c.min:.0%}", command, done, said,
                           module=name, question_level=c.question_level, min=c.min, questions=lacking))
    return items


def drill_item(drill: Drill, day_date: date, evidence: Evidence) -> dict[str, Any]:
    at_level = f" level-{drill.level}" if drill.level else ""
    if drill.module:
        levels = [drill.level] if drill.level else list(QUESTION_LEVELS)
        available = sum(len(evidence.bank.get((drill.module, lvl), [])) for lvl in levels)
        answered = sum(evidence.answered(drill.module, lvl) for lvl in levels)
        return _item("drill", f"answer {drill.count} {drill.module}{at_level} question{'s' * (drill.count != 1)}",
                     drill.command, answered >= drill.count,
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


def lacking(criteria: list[dict[str, Any]]) -> list[str]:
    """What a level still lacks, in a few sentences: the runs not made and those failing, for each
    mastery bar the questions short of it by reason, the drill days."""
    open_ = [c for c in criteria if not c["done"]]
    lines = []
    missing: dict[str, list[str]] = {}
    for c in open_:
        if c["kind"] == "run" and c["evidence"] == NOT_RUN:
            missing.setdefault(c["preset"], []).append(c["module"])
    if missing:
        lines.append("not run yet " + "; ".join(f"at {preset}: {', '.join(names)}"
                                                for preset, names in missing.items()))
    failing = [f"{c['module']} {c['preset']} ({c['evidence'].split(',')[0]})" for c in open_
               if c["kind"] == "run" and c["evidence"] != NOT_RUN]
    if failing:
        lines.append(f"checks failing: {', '.join(failing)}")
    bars: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for c in open_:
        if c["kind"] == "mastery":
            bars.setdefault((c["question_level"], c["min"]), []).append(c)
    for (question_level, bar), items in bars.items():
        reasons: dict[str, list[str]] = {}
        for c in items:
            for reason, ids in c["questions"].items():
                reasons.setdefault(reason, []).extend(ids)
        lines.append(f"level-{question_level} mastery under {bar:.0%} in {len(items)} module{'s' * (len(items) != 1)} "
                     f"({', '.join(c['module'] for c in items)}): {_reasons(reasons)}")
    lines += [f"drill days: {c['evidence']}" for c in open_ if c["kind"] == "review_days"]
    return lines


def evaluate_levels(levels: list[Level], evidence: Evidence) -> list[dict[str, Any]]:
    review_days = len(evidence.review_days)
    result = []
    for level in levels:
        criteria = run_items(level.runs, evidence)
        for c in level.mastery:
            criteria += mastery_items(c, evidence)
        if level.review_days:
            criteria.append(_item("review_days", f"drilled on at least {level.review_days} different days",
                                  DAILY_REVIEW_COMMAND, review_days >= level.review_days,
                                  f"drilled on {review_days} of the {level.review_days} days needed"))
        result.append({"level": level.level, "title": level.title, "passed": all(c["done"] for c in criteria),
                       "criteria": criteria, "lacking": lacking(criteria)})
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
    return {"day": day.day, "date": day_date.isoformat(), "title": day.title, "track": day.track,
            "modules": day.modules, "outcome": day.outcome, "done": all(i["done"] for i in checked),
            "checked_done": sum(bool(i["done"]) for i in checked), "checked_total": len(checked), "items": items}


def evaluate(days: list[Day], levels: list[Level], registry: Registry, evidence: Evidence,
             start: date | None = None) -> dict[str, Any]:
    """The progress report (JSON-able): today's day, every day's items with done / not done / not
    checked and the evidence, every level's criteria and what it still lacks, the level reached."""
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
    (default: today's, else the first unfinished one), the levels, the criteria of the next one and
    what every level not reached still lacks."""
    console.print(_headline(report))
    days = [d for d in report["days"] if module is None or module in d["modules"]]
    overview = Table(title=f"the {report['days_total']}-day roadmap" + (f" (days with {module})" if module else ""))
    for col, justify in (("day", "right"), ("date", "left"), ("focus", "left"), ("modules", "left"),
                         ("checked items done", "right"), ("", "left")):
        overview.add_column(col, justify=justify)
    for d in days:
        status = ("[green]done[/]" if d["done"] else "[bold cyan]today[/]" if d["day"] == report["day"]
                  else "[yellow]behind[/]" if d["date"] < report["today"] else "")
        names = (", ".join(d["modules"]) if d["track"] else
                 f"every module ({len(d['modules'])})" if d["modules"] else "review")
        overview.add_row(str(d["day"]), d["date"], escape(d["title"]), names,
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
    for lv in upcoming:
        console.print(f"[bold]level {lv['level']} ({escape(lv['title'])}) still lacks:[/]")
        for line in lv["lacking"]:
            console.print(f"  - {escape(line)}", soft_wrap=True)
    if report["not_on_roadmap"]:
        console.print(f"[dim]not on the roadmap yet: {', '.join(report['not_on_roadmap'])}[/]")
