"""The spoken part of a module's interview brief: `brief.toml` in the module's folder, one table per
language with the same keys.

    [en]
    definition = "..."          # said in 30 s: what it is and why it matters
    how_it_works = "..."        # 60 s: the key formula, in words
    pitfalls = ["...", "..."]   # 30 s: engineering pitfalls
    comparison_q = "How is X different from Y and Z?"
    comparison = "..."          # 60 s: the answer to comparison_q
    [zh]
    definition = "..."          # the same keys in Chinese (technical terms may stay in English)

The learner's own numbers and the follow-up questions are added by core.briefs at render time.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

LANGS = ("zh", "en")
TEXT_KEYS = ("definition", "how_it_works", "comparison_q", "comparison")
LIST_KEYS = ("pitfalls",)
SECTION_SECONDS = {"definition": 30, "how_it_works": 60, "pitfalls": 30, "comparison": 60}
"""speaking time each section of brief.toml is written for"""

# Typical interview pace: ~150 English words or ~240 Chinese characters a minute.
WORDS_PER_SECOND = 2.5
HANZI_PER_SECOND = 4.0
_HANZI = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['.-][A-Za-z0-9]+)*")


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


def speaking_seconds(text: str) -> float:
    """Rough time to say `text` aloud; Chinese characters and Latin words are counted separately,
    so Chinese text with English terms in it is estimated too."""
    return len(_HANZI.findall(text)) / HANZI_PER_SECOND + len(_WORD.findall(text)) / WORDS_PER_SECOND
