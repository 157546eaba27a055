#!/usr/bin/env python
"""Measure the offline grader on the labelled grading set (learning/grading_set/): how well it ranks
acceptable answers above unacceptable ones (AUC), the mean score of each kind of answer, and the time
per answer. The README's grading table is this script's --markdown output (a test keeps them equal).

    python scripts/grading_eval.py                # the table, and the worst-ranked answers of each kind
    python scripts/grading_eval.py --markdown     # only the table, as the README shows it
    python scripts/grading_eval.py --json
    python scripts/grading_eval.py --judge http://127.0.0.1:8000/v1    # measure an LLM judge instead

Exit status (core/cli.py): 0 measured, 2 a grading-set file that breaks its format or a judge that
does not answer (the message says which answer and why), 3 an internal error.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Parser, crash_log, guard  # noqa: E402
from core.registry import discover  # noqa: E402
from learning import grading_set  # noqa: E402
from learning.grader import MAX_ANSWER_CHARS, grade_question  # noqa: E402
from learning.judge import Judge  # noqa: E402
from learning.questions import all_questions  # noqa: E402

KIND_ORDER = ("model", "paraphrase", "chinese", "partial", "wrong", "wrong_zh", "keywords", "pasted key points")
KIND_MEANING = {
    "model": "the bank's own model answer",
    "paraphrase": "a correct answer in other words",
    "chinese": "a correct answer in Chinese",
    "partial": "about half of what is asked",
    "wrong": "wrong claims in the key words (negated, roles swapped, direction flipped)",
    "wrong_zh": "the same, in Chinese",
    "keywords": "the key terms pasted, no sentences",
    "pasted key points": "the question's key points pasted",
}


def evaluate(judge: Judge | None = None) -> tuple[grading_set.Measurement, dict]:
    """The measurement of the offline grader (or of `judge`) and the rest: {answers, mean_ms, max_ms,
    cap_ms (the offline grader on an answer of MAX_ANSWER_CHARS), length_auc (the AUC of scoring by
    length alone, a baseline any grader must beat), items}."""
    bank = {q.id: q for q in all_questions(discover())}
    items = grading_set.load(bank)
    grader = judge.grade if judge else grade_question
    times: list[float] = []

    def score(item: grading_set.Labelled) -> float:
        start = time.perf_counter()
        result = grader(item.text, item.question).score
        times.append(time.perf_counter() - start)
        return result

    grade_question("warm up: load the lemmatiser and jieba 的词典", items[0].question)
    measurement = grading_set.measure(items, score)
    longest = (items[0].text + " ") * (MAX_ANSWER_CHARS // len(items[0].text) + 1)
    start = time.perf_counter()
    grade_question(longest[:MAX_ANSWER_CHARS], items[0].question)
    timing = {"answers": len(times), "mean_ms": 1000 * sum(times) / len(times), "max_ms": 1000 * max(times),
              "cap_ms": 1000 * (time.perf_counter() - start),
              "length_auc": grading_set.measure(items, lambda item: len(item.text)).auc}
    return measurement, timing | {"items": items}


def markdown(m: grading_set.Measurement, timing: dict) -> str:
    lines = ["| answer kind | label | answers | mean score: tuning set | held out | all |",
             "|---|---|---|---|---|---|"]
    for kind in KIND_ORDER:
        if kind not in m.mean:
            continue
        means = m.mean[kind]
        cells = [f"{means[s]:.2f}" if s in means else "–" for s in ("tune", "holdout", "all")]
        lines.append(f"| {kind}: {KIND_MEANING[kind]} | {grading_set.KINDS[kind]:g} | {m.count[kind]} | "
                     + " | ".join(cells) + " |")
    lines.append(f"| **AUC** (acceptable above not; partial left out) | | | **{m.auc['tune']:.3f}** | "
                 f"**{m.auc['holdout']:.3f}** | **{m.auc['all']:.3f}** |")
    base = timing["length_auc"]
    lines.append(f"| AUC of a baseline that scores an answer by its length | | | {base['tune']:.3f} | "
                 f"{base['holdout']:.3f} | {base['all']:.3f} |")
    lines.append("")
    lines.append(f"{m.questions['all']} questions ({m.questions['holdout']} held out, one per module), "
                 f"{sum(m.count.values())} answers; grading takes {timing['mean_ms']:.1f} ms per answer on "
                 f"average, {timing['max_ms']:.0f} ms at most, and {timing['cap_ms']:.0f} ms for an answer "
                 f"of the longest length graded ({MAX_ANSWER_CHARS:,} characters; one core).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return guard(lambda: show(sys.argv[1:] if argv is None else argv), crash_log=crash_log("grading_eval"))


def show(argv: list[str]) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="only the table, as the README shows it")
    p.add_argument("--json", action="store_true", help="the measurement as JSON")
    p.add_argument("--worst", type=int, default=3, metavar="N", help="list the N worst-ranked answers of each kind")
    p.add_argument("--judge", metavar="URL", help="measure the LLM judge at this OpenAI-compatible base URL")
    p.add_argument("--judge-model", metavar="NAME", help="the judge's model (default: the first the server lists)")
    args = p.parse_args(argv)
    if args.judge_model and not args.judge:
        p.error("--judge-model names the judge's model: give the judge's --judge URL too")
    judge = Judge(args.judge, args.judge_model) if args.judge else None
    m, timing = evaluate(judge)
    items = timing.pop("items")
    if args.json:
        print(json.dumps(asdict(m) | {"timing": timing}, indent=2))
        return 0
    print(markdown(m, timing))
    if args.markdown:
        return 0
    for kind in KIND_ORDER:
        chosen = [i for i in items if i.kind == kind and i.split == "tune"]
        scored = sorted((((judge.grade if judge else grade_question)(i.text, i.question).score, i) for i in chosen),
                        key=lambda p: p[0], reverse=grading_set.KINDS[kind] < 0.5)
        for score, item in scored[:args.worst]:
            print(f"\n{kind} {item.question.id}: {score:.2f}\n  {item.text[:300]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
