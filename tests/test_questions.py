"""The question banks as a whole: every question is gradable in both languages (claims, misconceptions,
Chinese), its claims parse, and no two modules ask the same question."""
from __future__ import annotations

import itertools
import re

import pytest

from learning.grader import parse_claim
from learning.questions import all_questions

DUPLICATE_SIMILARITY = 0.4
"""Jaccard similarity of two questions' words (question and key points) from which they count as the
same question asked twice; after the merges of issue 14 the closest pair across modules is below it"""
_WORD = re.compile(r"[a-z]+")
_IGNORED = frozenset("the a an of to is and or in on for what why how does do it with its be are that this as by "
                     "you your when which".split())


@pytest.fixture(scope="module")
def questions(registry):
    return all_questions(registry)


def test_every_question_has_claims_misconceptions_and_chinese(questions):
    missing = [(q.id, field) for q in questions
               for field in ("misconceptions", "q_zh", "answer_zh", "key_points_zh", "misconceptions_zh")
               if not getattr(q, field)]
    assert not missing, missing


def test_every_claim_parses_into_non_empty_parts(questions):
    for q in questions:
        for claim in (*q.key_points, *q.misconceptions, *q.key_points_zh, *q.misconceptions_zh):
            parsed = parse_claim(claim)
            written = [p for p in claim.split("->")]
            assert len(parsed.parts) == len(written), f"{q.id}: {claim!r} has a part with no content word"


def _words(q) -> set[str]:
    return set(_WORD.findall((q.q + " " + " ".join(q.key_points)).lower())) - _IGNORED


def test_no_two_modules_ask_the_same_question(questions):
    pairs = [(len(_words(a) & _words(b)) / len(_words(a) | _words(b)), a.id, b.id)
             for a, b in itertools.combinations(questions, 2) if a.module != b.module]
    closest = max(pairs)
    assert closest[0] < DUPLICATE_SIMILARITY, f"near-duplicate questions: {closest}"
