"""The interview question banks: every module's questions.toml (format in DESIGN.md).

    [[question]]
    id = "grpo-advantage"          # stable: progress is keyed by it, so editing the text keeps history
    level = 2                      # 1 recall, 2 derive/explain, 3 design/trade-off
    q = "..."
    answer = "..."
    key_points = ["...", "..."]    # what a grader looks for
    follow_ups = ["grpo-kl-estimator"]
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.registry import Module, Registry

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


def load_bank(module: Module) -> list[Question]:
    return parse_bank(module.path / "questions.toml", module.name)


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


def all_questions(registry: Registry) -> list[Question]:
    """Every module's questions; ids are unique across the whole bank."""
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for module in registry.modules.values():
        for q in load_bank(module):
            if q.id in seen:
                raise BankError(f"question id {q.id!r} appears in both {seen[q.id]} and {module.name}")
            seen[q.id] = module.name
            questions.append(q)
    return questions
