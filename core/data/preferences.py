"""Preference pairs on the word problems (core/data/word_problems.py): the data of reward modelling,
DPO, ORPO and RLHF, generated offline and deterministically.

A pair is (prompt, chosen, rejected) where chosen is better by a rule a program can check, so every
preference accuracy here is measurable rather than a matter of taste. The prompt is the question
alone, as the sft model was trained on it. Three kinds:

    correct   "7 + 5 = 12. The answer is 12."  vs  "7 + 5 = 13. The answer is 13."
              Teaches the arithmetic. The rejected reply is the same template with one slipped step
              (off by 1 or 2; a slip in the first step of a two-step problem is carried into the
              second), so form, length and wording are shared and only the numbers can decide.
              Checked by `correct`: 1 for chosen, 0 for rejected; both `well_formed`.
    format    "7 + 5 = 12. The answer is 12."  vs  "7 + 5 = 12. So Mia had 12 shells."  or  "7 + 5 = 12."
              Teaches the answer sentence the verifier reads. Both replies carry the right number last
              (`lenient_correct` is 1 for both); `well_formed` (and so `correct`) is 1 only for chosen.
    on_topic  "7 + 5 = 12. The answer is 12."  vs  one sentence of a generated story
              Teaches answering the question at all. The story sentence has no digit, so no grader,
              however lenient, reads an answer in it.

What a reward model could exploit instead of the lesson, measured on 2000 training pairs of each kind
(seed 0, tiers 1-3; tests/test_preferences.py asserts these bounds): len(chosen) - len(rejected) in
characters, and the pairwise accuracy of a reward that prefers the longer reply (a tie counts one half):

    kind       mean length difference   "longer wins" accuracy
    correct    -0.00                    0.50   the replies differ in digits only
    format     +6.7                     0.50   half the rejected replies are longer, half shorter
    on_topic   -0.47                    0.43   the story sentence closest in length to the solution

So length is close to no clue. The one left is in on_topic: story sentences run longer than the
solutions (half of these are under 30 characters), so the closest one is more often the longer, and "shorter wins"
would score 0.57 there. What does separate the replies of format and on_topic is the answer sentence
itself, which is what those kinds teach; in correct only the arithmetic does. One cue remains in
correct: a slip never makes the answer negative, so when the answer is 0 or 1 the wrong one is larger.

The train and held-out pairs are built on word_problems' own split (a hash of the question), so they
share no prompt. One pair per problem, so no prompt repeats within a split either. Each pair's random
choices are seeded by (seed, its question), so a pair depends on nothing else and a longer list
starts with a shorter one.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from core.data.corpus import generate_story
from core.data.word_problems import Problem, generate_problems

KINDS = ("correct", "format", "on_topic")
SLIPS = (-2, -1, 1, 2)
STEP = re.compile(r"(\d+) ([+-]) (\d+) = \d+\.")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    kind: str
    """one of KINDS: which rule makes chosen the better reply"""
    answer: int


def slipped_solution(problem: Problem, rng: np.random.Generator) -> str:
    """The worked solution with one step's result off by a small amount, every later step computed from
    the wrong value, in the same template: a wrong answer that a careless solver would write."""
    steps = STEP.findall(problem.solution)
    at = int(rng.integers(len(steps)))
    slip = int(rng.choice([s for s in SLIPS if problem.answer + s >= 0]))  # a count is never negative
    text, carried = [], None
    for i, (left, op, right) in enumerate(steps):
        left = int(left) if carried is None else carried  # word_problems chains each step on the last result
        carried = (left + int(right) if op == "+" else left - int(right)) + (slip if i == at else 0)
        text.append(f"{left} {op} {right} = {carried}.")
    return " ".join(text) + f" The answer is {carried}."


def off_topic_reply(rng: np.random.Generator, length: int) -> str:
    """The sentence of a generated story closest to `length` characters, among those without a digit
    (so that not even the last-number grader reads an answer in it)."""
    sentences = [s for s in SENTENCE_END.split(generate_story(rng)) if not re.search(r"\d", s)]
    return min(sentences, key=lambda s: abs(len(s) - length))


def make_pair(problem: Problem, kind: str, rng: np.random.Generator) -> PreferencePair:
    if kind == "correct":
        rejected = slipped_solution(problem, rng)
    elif kind == "format":
        # the plain sentence is a little longer than "The answer is N.", the bare step much shorter:
        # taking each half the time leaves length no clue to which reply is chosen
        steps = problem.solution[:problem.solution.rindex(" The answer is")]
        rejected = problem.plain_solution if rng.random() < 0.5 else steps
    elif kind == "on_topic":
        rejected = off_topic_reply(rng, len(problem.solution))
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")
    return PreferencePair(problem.question, problem.solution, rejected, kind, problem.answer)


def generate_pairs(n: int, tiers: tuple[int, ...], seed: int, split: str,
                   weights: Mapping[str, float] | None = None, held_out_fraction: float = 0.2) -> list[PreferencePair]:
    """One pair for each of `n` distinct problems of `split` (generate_problems' arguments), its kind
    drawn with probability proportional to `weights` (kind -> weight; absent kinds weigh 0; default:
    equal thirds). A pure function of the arguments."""
    weights = dict.fromkeys(KINDS, 1.0) if weights is None else dict(weights)
    if set(weights) - set(KINDS):
        raise ValueError(f"unknown kinds {sorted(set(weights) - set(KINDS))}; kinds are {KINDS}")
    share = np.array([float(weights.get(k, 0.0)) for k in KINDS])
    if not (np.isfinite(share).all() and (share >= 0).all() and share.sum() > 0):
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    pairs = []
    for problem in generate_problems(n, tiers, seed, split, held_out_fraction):
        rng = np.random.default_rng([seed, 13, zlib.crc32(problem.question.encode())])
        kind = KINDS[int(rng.choice(len(KINDS), p=share / share.sum()))]
        pairs.append(make_pair(problem, kind, rng))
    return pairs
