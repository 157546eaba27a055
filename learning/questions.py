"""The interview question banks of every module, read through the registry (the format and its
parser are the platform's: core/contract.py)."""
from __future__ import annotations

from core.contract import BankError, Question, parse_bank
from core.registry import Module, Registry


def load_bank(module: Module) -> list[Question]:
    return parse_bank(module.path / "questions.toml", module.name)


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
