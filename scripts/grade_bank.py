#!/usr/bin/env python
"""How the offline grader reads each question's own model answer: a bank author's check that the
claims (key points) and misconceptions are written so that a correct answer makes every claim and
states no misconception, in English and in Chinese, and that pasting the key points does not pass.

    python scripts/grade_bank.py --module ppo        # every question of one module, with its misses
    python scripts/grade_bank.py                     # every module: one line per question below full marks
    python scripts/grade_bank.py --json              # the numbers of every question

Exit status (core/cli.py): 0 every model answer makes every claim in both languages and states no
misconception, 1 some do not (listed), 2 bad input (an unknown module), 3 an internal error.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Parser, crash_log, guard  # noqa: E402
from core.contract import Question  # noqa: E402
from core.registry import discover  # noqa: E402
from learning.grader import Grade, grade_question  # noqa: E402
from learning.questions import load_bank  # noqa: E402


def pasted_key_points(question: Question) -> str:
    """What a learner who copies the printed key points would type."""
    return ", ".join(question.key_points)


def report(question: Question) -> dict:
    english = grade_question(question.answer, replace(question, key_points_zh=()))
    chinese = (grade_question(question.answer_zh, replace(question, key_points=question.key_points_zh,
                                                          misconceptions=question.misconceptions_zh))
               if question.answer_zh and question.key_points_zh else None)
    pasted = grade_question(pasted_key_points(question), question)

    def summary(result: Grade | None) -> dict | None:
        return None if result is None else {
            "score": round(result.score, 3), "prose": round(result.prose, 3), "misses": list(result.misses),
            "misconceptions": [f"{h.key_point}  <- {h.span!r}" for h in result.misconceptions],
            "contradicted": [f"{h.key_point}  <- {h.span!r}" for h in result.contradicted]}

    return {"id": question.id, "en": summary(english), "zh": summary(chinese),
            "pasted_key_points": round(pasted.score, 3)}


def complete(entry: dict) -> bool:
    return all(side is not None and side["score"] == 1.0 and not side["misconceptions"]
               for side in (entry["en"], entry["zh"]))


def main(argv: list[str] | None = None) -> int:
    return guard(lambda: check(sys.argv[1:] if argv is None else argv), crash_log=crash_log("grade_bank"))


def check(argv: list[str]) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--module", metavar="NAME", help="one module (default: all)")
    p.add_argument("--json", action="store_true", help="print every question's numbers as JSON")
    args = p.parse_args(argv)
    registry = discover()
    modules = [registry.get(args.module)] if args.module else list(registry.modules.values())
    entries = [report(q) for m in modules for q in load_bank(m)]
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    for entry in entries:
        if args.json or (complete(entry) and not args.module):
            continue
        flag = "ok  " if complete(entry) else "FAIL"
        print(f"{flag} {entry['id']}  pasted key points score {entry['pasted_key_points']:.2f}")
        for lang in ("en", "zh"):
            side = entry[lang]
            if side is None:
                print(f"     {lang}: missing (no answer_zh / key_points_zh)")
                continue
            prose = f" (prose factor {side['prose']:.3f}: too few function words)" if side["prose"] < 1 else ""
            print(f"     {lang}: {side['score']:.3f}{prose}")
            for label in ("misses", "misconceptions", "contradicted"):
                for item in side[label]:
                    print(f"         {label[:-1] if label != 'misses' else 'miss'}: {item}")
    done = sum(map(complete, entries))
    print(f"{done} of {len(entries)} questions: the model answer makes every claim and states no "
          f"misconception in both languages", file=sys.stderr)
    return 0 if done == len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
