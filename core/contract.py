"""The module contract's data files: the formats of `questions.toml` and `brief.toml`, the two files
every module folder holds beside `module.py` (DESIGN.md). The registry refuses a module whose files
break these formats, so the parsers live in the platform; the learning layer (learning/) reads the
parsed questions and brief texts through here.

questions.toml, one table per question:

    [[question]]
    id = "grpo-advantage"          # stable: progress is keyed by it, so editing the text keeps history
    level = 2                      # 1 recall, 2 derive/explain, 3 design/trade-off
    q = "..."
    answer = "..."
    key_points = ["...", "..."]    # the claims a correct answer makes (learning/grader.py: "a -> b | c -> d")
    misconceptions = ["..."]       # common wrong claims, same syntax; stating one costs a key point
    follow_ups = ["grpo-kl-estimator"]
    q_zh = "..."                   # the same question, model answer, key points and misconceptions in
    answer_zh = "..."              # Chinese (technical terms may stay in English); key points need not
    key_points_zh = ["..."]        # map one to one: a Chinese answer is graded against the Chinese ones
    misconceptions_zh = ["..."]

brief.toml, the spoken part of a module's interview brief, one table per language with the same keys:

    [en]
    definition = "..."          # said in 30 s: what it is and why it matters
    how_it_works = "..."        # 60 s: the key formula, in words
    pitfalls = ["...", "..."]   # 30 s: engineering pitfalls
    comparison_q = "How is X different from Y and Z?"
    comparison = "..."          # 60 s: the answer to comparison_q
    ran_aloud = "Accuracy rose from {sft_accuracy:.1%} to {accuracy:.1%}. ..."
                                # two sentences on the learner's latest run: the headline result and what
                                # it is compared against; {metric:format spec} (str.format) quotes a metric
    [zh]
    definition = "..."          # the same keys in Chinese (technical terms may stay in English)
    title = "..."               # module.py is written in English (MANIFEST_LANG); every other language
    [zh.metrics]                # translates its title, each metric's meaning, keyed by the metric's name,
    val_loss = "..."            # and each check's `why`, keyed by the check as the brief shows it
    [zh.checks]                 # (Check.describe(): "metric op threshold-or-metric")
    "val_loss < unigram_entropy" = "..."

The learner's own numbers and the follow-up questions are added by learning/briefs.py at render time.

bugs.toml, the plausible bugs an interviewer asks about, each planted by core/planted_bugs.py in a
scratch copy of the repository, where every catcher it names must catch it (at least three a module):

    [[bug]]
    id = "gae-no-done-mask"         # unique in the module
    title = "GAE bootstraps across the end of an episode"
    file = "post_train/alignment/ppo/code/ppo.py"      # relative to the repository root
    find = "next_values * (1.0 - dones)"               # exact text, found exactly once in `file`
    replace = "next_values"                            # the wrong version
    symptom = "..."                 # what goes wrong and how you would see it (rendered into the README)
    caught_by = ["check:final_over_random", "test:tests/test_ppo.py::test_gae_matches_reference"]

A catcher is `check:<metric>` (that check fails in the module's toy run) or `test:<pytest node id>`
(that test fails).
"""
from __future__ import annotations

import os
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.errors import UserError
from core.paths import ROOT

# ------------------------------------------------------------------------------ questions.toml
LEVELS = {1: "recall", 2: "derive / explain", 3: "design / trade-off"}


@dataclass(frozen=True)
class Question:
    id: str
    module: str
    level: int
    q: str
    answer: str
    key_points: tuple[str, ...]
    follow_ups: tuple[str, ...] = field(default=())
    misconceptions: tuple[str, ...] = field(default=())
    q_zh: str = ""
    answer_zh: str = ""
    key_points_zh: tuple[str, ...] = field(default=())
    misconceptions_zh: tuple[str, ...] = field(default=())

    def text(self, lang: str) -> tuple[str, str]:
        """(question, model answer) in `lang`, English where the Chinese is missing."""
        if lang == "zh" and self.q_zh:
            return self.q_zh, self.answer_zh or self.answer
        return self.q, self.answer


class BankError(UserError, ValueError):
    """A question bank that breaks the format; the message names the file and the question."""


def parse_bank(path: Path, module_name: str) -> list[Question]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")).get("question", [])
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BankError(f"{path}: {exc}") from None
    questions = []
    for i, item in enumerate(raw, 1):
        try:
            level = int(item["level"])
            if level not in LEVELS:
                raise ValueError(f"level must be 1, 2 or 3, got {level}")
            if not item["key_points"]:
                raise ValueError("key_points is empty: the grader needs something to look for")
            questions.append(Question(id=str(item["id"]), module=module_name, level=level, q=item["q"],
                                      answer=item["answer"], key_points=tuple(item["key_points"]),
                                      follow_ups=tuple(item.get("follow_ups", ())),
                                      misconceptions=tuple(item.get("misconceptions", ())),
                                      q_zh=item.get("q_zh", ""), answer_zh=item.get("answer_zh", ""),
                                      key_points_zh=tuple(item.get("key_points_zh", ())),
                                      misconceptions_zh=tuple(item.get("misconceptions_zh", ()))))
        except (KeyError, TypeError, ValueError) as exc:
            raise BankError(f"{path}: question #{i} ({item.get('id', '?')}): {exc!r}") from None
    if not questions:
        raise BankError(f"{path}: no [[question]] entries")
    ids = [q.id for q in questions]
    for q in questions:
        unknown = [f for f in q.follow_ups if f not in ids]
        if unknown:
            raise BankError(f"{path}: question {q.id!r} has follow-ups not in this bank: {unknown}")
    return questions


# ---------------------------------------------------------------------------------- brief.toml
LANGS = ("zh", "en")
MANIFEST_LANG = "en"
"""the language of module.py's title, metric meanings and check whys; brief.toml translates them into the others"""
TEXT_KEYS = ("definition", "how_it_works", "comparison_q", "comparison", "ran_aloud")
LIST_KEYS = ("pitfalls",)
TRANSLATION_KEYS = ("title", "metrics", "checks")
"""what every language but MANIFEST_LANG translates from module.py: a text and two tables of texts"""
SECTION_SECONDS = {"definition": 30, "how_it_works": 60, "pitfalls": 30, "comparison": 60}
"""speaking time each section of brief.toml is written for"""

class BriefTextError(UserError, ValueError):
    """A brief.toml that breaks the format; the message lists every problem."""


def parse_brief_text(path: Path, metrics: Iterable[str] | None = None,
                     checks: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """{lang: {key: text, list of texts or {name: translation}}}; raises BriefTextError naming every
    missing or malformed key in every language. Given the module's metric names and its checks
    (Check.describe()), also every one of them has a translation and every translation and every
    ran_aloud placeholder names one of them, so a renamed or added metric or check fails here."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BriefTextError(f"{path}: {exc}") from None
    known = {"metrics": None if metrics is None else list(metrics), "checks": None if checks is None else list(checks)}
    problems = [p for lang in LANGS for p in _section_problems(raw.get(lang), lang, known)]
    if problems:
        raise BriefTextError(f"{path}: {'; '.join(problems)}")
    return {lang: raw[lang] for lang in LANGS}


def aloud_metrics(template: str) -> list[str]:
    """The metrics a ran_aloud text quotes, in order; ValueError for a malformed placeholder."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _section_problems(section: Any, lang: str, known: dict[str, list[str] | None]) -> list[str]:
    if not isinstance(section, dict):
        return [f"no [{lang}] table"]
    required = (*TEXT_KEYS, *LIST_KEYS, *(TRANSLATION_KEYS if lang != MANIFEST_LANG else ()))
    missing = [k for k in required if k not in section]
    problems = [f"[{lang}] lacks {', '.join(missing)}"] if missing else []
    problems += [f"[{lang}] {k} must be a non-empty string" for k in TEXT_KEYS
                 if k in section and not _is_text(section[k])]
    problems += [f"[{lang}] {k} must be a non-empty list of non-empty strings" for k in LIST_KEYS
                 if k in section and not (isinstance(section[k], list) and section[k]
                                          and all(map(_is_text, section[k])))]
    if _is_text(section.get("ran_aloud")):
        problems += _aloud_problems(section["ran_aloud"], lang, known["metrics"])
    if lang != MANIFEST_LANG:
        if "title" in section and not _is_text(section["title"]):
            problems.append(f"[{lang}] title must be a non-empty string")
        problems += [p for k in ("metrics", "checks") if k in section
                     for p in _translation_problems(section[k], f"[{lang}.{k}]", known[k])]
    return problems


def _aloud_problems(template: str, lang: str, metrics: list[str] | None) -> list[str]:
    try:
        fields = aloud_metrics(template)
    except ValueError as exc:
        return [f"[{lang}] ran_aloud: {exc}"]
    if not fields:
        return [f"[{lang}] ran_aloud quotes no metric: it is said from the run's numbers ({{metric:.3f}})"]
    problems = []
    if not_names := [f"{{{f}}}" for f in fields if not f.isidentifier()]:
        problems.append(f"[{lang}] ran_aloud placeholders must be metric names: {', '.join(not_names)}")
    if unknown := [f for f in fields if f.isidentifier() and metrics is not None and f not in metrics]:
        problems.append(f"[{lang}] ran_aloud quotes {', '.join(unknown)}, which the module does not report")
    return problems


def _translation_problems(table: Any, where: str, names: list[str] | None) -> list[str]:
    if not (isinstance(table, dict) and all(map(_is_text, table.values()))):
        return [f"{where} must map each name to a non-empty string"]
    if names is None:
        return []
    problems = []
    if untranslated := [n for n in names if n not in table]:
        problems.append(f"{where} lacks {', '.join(untranslated)}")
    if unknown := [k for k in table if k not in names]:
        problems.append(f"{where} translates {', '.join(unknown)}, which the module does not have")
    return problems


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# ----------------------------------------------------------------------------------- bugs.toml
MIN_PLANTED_BUGS = 3
PLANTED_ENV = "FINETUNE_PLANTED_BUG"
"""set to "<module>/<bug id>" in the processes that run a scratch copy with that bug planted"""
CATCHER_KINDS = ("check", "test")


@dataclass(frozen=True)
class PlantedBug:
    id: str
    module: str
    title: str
    file: str
    find: str
    replace: str
    symptom: str
    caught_by: tuple[str, ...]

    def catchers(self) -> list[tuple[str, str]]:
        """[(kind, target)]: ("check", metric) or ("test", pytest node id)."""
        return [tuple(c.split(":", 1)) for c in self.caught_by]  # type: ignore[misc]


class BugsError(UserError, ValueError):
    """A bugs.toml that breaks the format or no longer matches the code; the message names the bug."""


def parse_bugs(path: Path, module_name: str, root: Path = ROOT) -> list[PlantedBug]:
    """The module's planted bugs. Each `find` must occur exactly once in its file, so a refactor that
    moves the line breaks the contract loudly instead of leaving a bug that plants nowhere."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")).get("bug", [])
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BugsError(f"{path}: {exc}") from None
    bugs = []
    for i, item in enumerate(raw, 1):
        where = f"{path}: bug #{i} ({item.get('id', '?')})"
        try:
            bug = PlantedBug(id=str(item["id"]), module=module_name, title=item["title"], file=item["file"],
                             find=item["find"], replace=item["replace"], symptom=item["symptom"],
                             caught_by=tuple(item["caught_by"]))
        except (KeyError, TypeError) as exc:
            raise BugsError(f"{where}: {exc!r}") from None
        problems = _bug_problems(bug, root)
        if problems:
            raise BugsError(f"{where}: {'; '.join(problems)}")
        bugs.append(bug)
    if len(bugs) < MIN_PLANTED_BUGS:
        raise BugsError(f"{path}: {len(bugs)} planted bugs; a module lists at least {MIN_PLANTED_BUGS}")
    ids = [b.id for b in bugs]
    if len(set(ids)) != len(ids):
        raise BugsError(f"{path}: duplicate bug ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return bugs


def _bug_problems(bug: PlantedBug, root: Path) -> list[str]:
    problems = [f"{key} must be a non-empty string" for key in ("title", "symptom", "find")
                if not _is_text(getattr(bug, key))]
    if bug.find == bug.replace:
        problems.append("replace equals find: nothing would be planted")
    if not bug.caught_by:
        problems.append("caught_by is empty: say which check or test must catch it")
    for catcher in bug.caught_by:
        kind, _, target = str(catcher).partition(":")
        if kind not in CATCHER_KINDS or not target:
            problems.append(f"catcher {catcher!r} is not check:<metric> or test:<pytest node id>")
    target = root / bug.file
    if not target.is_file():
        problems.append(f"file {bug.file!r} does not exist")
    elif os.environ.get(PLANTED_ENV):
        pass  # a scratch copy with one bug planted (core/planted_bugs.py): its `find` texts may be gone
    elif (count := target.read_text(encoding="utf-8").count(bug.find)) != 1:
        problems.append(f"`find` occurs {count} times in {bug.file} (it must occur exactly once)")
    return problems
