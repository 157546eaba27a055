"""The labelled grading set (learning/grading_set/<module>.toml) and how a grader is measured on it.

Each file holds, for some questions of one module, answers of several kinds with an interviewer's
label: 1 acceptable, 0 not, 0.5 partly. The bank's own model answer (kind "model", label 1) and the
question's key points pasted as a list (kind "pasted key points", label 0: what a learner who copies
the printed key points would type) are added here, so they always follow the bank.

    [[question]]
    id = "ppo-why-clip"
    split = "tune"            # or "holdout": never looked at while the grader was tuned
    [[question.answer]]
    kind = "paraphrase"       # paraphrase | wrong | keywords | partial | chinese | wrong_zh
    label = 1.0
    text = \"\"\"...\"\"\"

The set was written by people who had not seen the grader's rules, from the questions and model
answers alone; the held-out questions (one per module) are reported separately.
"""
from __future__ import annotations

import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from core.contract import Question
from core.errors import UserError

SET_DIR = Path(__file__).resolve().parent / "grading_set"
KINDS = {"model": 1.0, "paraphrase": 1.0, "chinese": 1.0, "partial": 0.5, "wrong": 0.0, "wrong_zh": 0.0,
         "keywords": 0.0, "pasted key points": 0.0}
"""every kind with the label it must carry"""
SPLITS = ("tune", "holdout")


class GradingSetError(UserError, ValueError):
    """A grading-set file that breaks its format; the message names the file and the entry."""


@dataclass(frozen=True)
class Labelled:
    question: Question
    kind: str
    label: float
    split: str
    text: str


def load(bank: dict[str, Question], folder: Path = SET_DIR) -> list[Labelled]:
    """Every labelled answer, with the model answer and the pasted key points of each question added."""
    items: list[Labelled] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            questions = tomllib.loads(path.read_text(encoding="utf-8"))["question"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise GradingSetError(f"{path}: {exc!r}") from None
        for entry in questions:
            where = f"{path}: question {entry.get('id', '?')!r}"
            question = bank.get(entry.get("id"))
            if question is None:
                raise GradingSetError(f"{where}: no such question in the bank")
            if entry.get("split") not in SPLITS:
                raise GradingSetError(f"{where}: split must be one of {SPLITS}")
            split = entry["split"]
            items.append(Labelled(question, "model", 1.0, split, question.answer))
            items.append(Labelled(question, "pasted key points", 0.0, split, ", ".join(question.key_points)))
            for answer in entry.get("answer", []):
                kind, label, text = answer.get("kind"), answer.get("label"), answer.get("text")
                if kind not in KINDS or kind in ("model", "pasted key points") or label != KINDS[kind]:
                    raise GradingSetError(f"{where}: answer kind {kind!r} with label {label!r}; the kinds "
                                          f"and their labels are {KINDS}")
                if not isinstance(text, str) or not text.strip():
                    raise GradingSetError(f"{where}: a {kind} answer without text")
                items.append(Labelled(question, kind, float(label), split, text))
    return items


def auc(scores: Iterable[tuple[float, float]]) -> float:
    """Probability that an acceptable answer (label 1) outscores an unacceptable one (label 0), ties
    counted half: the Mann-Whitney form of the ROC AUC. Partly acceptable answers are left out."""
    pairs = list(scores)
    good = [s for s, label in pairs if label == 1.0]
    bad = [s for s, label in pairs if label == 0.0]
    if not good or not bad:
        return float("nan")
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


@dataclass(frozen=True)
class Measurement:
    auc: dict[str, float]
    """split ("tune", "holdout", "all") -> AUC"""
    mean: dict[str, dict[str, float]]
    """kind -> split -> mean score"""
    count: dict[str, int]
    """kind -> number of answers"""
    questions: dict[str, int]
    """split -> number of questions"""


def measure(items: list[Labelled], score: Callable[[Labelled], float]) -> Measurement:
    scored = [(item, score(item)) for item in items]
    aucs = {split: auc((s, i.label) for i, s in scored if split in (i.split, "all")) for split in (*SPLITS, "all")}
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item, s in scored:
        sums[item.kind][item.split].append(s)
        sums[item.kind]["all"].append(s)
    mean = {kind: {split: sum(v) / len(v) for split, v in by_split.items()} for kind, by_split in sums.items()}
    count = {kind: len(by_split["all"]) for kind, by_split in sums.items()}
    questions = {split: len({i.question.id for i in items if split in (i.split, "all")}) for split in (*SPLITS, "all")}
    return Measurement(aucs, mean, count, questions)
