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
    key_points = ["...", "..."]    # what a grader looks for
    follow_ups = ["grpo-kl-estimator"]

brief.toml, the spoken part of a module's interview brief, one table per language with the same keys:

    [en]
    definition = "..."          # said in 30 s: what it is and why it matters
    how_it_works = "..."        # 60 s: the key formula, in words
    pitfalls = ["...", "..."]   # 30 s: engineering pitfalls
    comparison_q = "How is X different from Y and Z?"
    comparison = "..."          # 60 s: the answer to comparison_q
    [zh]
    definition = "..."          # the same keys in Chinese (technical terms may stay in English)

The learner's own numbers and the follow-up questions are added by learning/briefs.py at render time.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class BankError(ValueError):
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
                                      follow_ups=tuple(item.get("follow_ups", ()))))
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
TEXT_KEYS = ("definition", "how_it_works", "comparison_q", "comparison")
LIST_KEYS = ("pitfalls",)
SECTION_SECONDS = {"definition": 30, "how_it_works": 60, "pitfalls": 30, "comparison": 60}
"""speaking time each section of brief.toml is written for"""

class BriefTextError(ValueError):
    """A brief.toml that breaks the format; the message lists every problem."""


def parse_brief_text(path: Path) -> dict[str, dict[str, Any]]:
    """{lang: {key: text or list of texts}}; raises BriefTextError naming every missing or
    malformed key in every language."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BriefTextError(f"{path}: {exc}") from None
    problems = [p for lang in LANGS for p in _section_problems(raw.get(lang), lang)]
    if problems:
        raise BriefTextError(f"{path}: {'; '.join(problems)}")
    return {lang: raw[lang] for lang in LANGS}


def _section_problems(section: Any, lang: str) -> list[str]:
    if not isinstance(section, dict):
        return [f"no [{lang}] table"]
    missing = [k for k in (*TEXT_KEYS, *LIST_KEYS) if k not in section]
    problems = [f"[{lang}] lacks {', '.join(missing)}"] if missing else []
    problems += [f"[{lang}] {k} must be a non-empty string" for k in TEXT_KEYS
                 if k in section and not _is_text(section[k])]
    problems += [f"[{lang}] {k} must be a non-empty list of non-empty strings" for k in LIST_KEYS
                 if k in section and not (isinstance(section[k], list) and section[k]
                                          and all(map(_is_text, section[k])))]
    return problems


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
