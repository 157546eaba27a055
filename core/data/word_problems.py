"""Grade-school arithmetic word problems with verifiable answers: the task of the post-training
modules (sft, grpo, gspo, eval), generated offline and deterministically.

    question  "Mia had 7 shells. She found 5 more. How many shells did she have?"
    solution  "7 + 5 = 12. The answer is 12."           a worked step, then a parseable final answer

Tiers of difficulty (chosen so that a tiny model after SFT gets some but not all of them right, which
is what GRPO needs: a group whose samples all score the same has zero advantage and teaches nothing):
    1  a + b                 one digit each (sums up to 18)
    2  a - b                 a two-digit number minus one digit
    3  a + b - c             two steps, each written out

A problem is its question text: the train and held-out splits share no question (split by a hash of
the text, so a problem's split does not depend on how many were generated). The same arithmetic fact
can appear in both splits in different words, as in grade-school practice; what the held-out split
measures is carrying out the worked step on problems the model has not seen.

Rewards are programmatic: `correct` is exact match of the final answer (1 / 0), `well_formed` whether
the response ends in the answer sentence; both are reported separately.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from core.data.corpus import BOYS, GIRLS, generate_story

ITEMS = ("apples", "cookies", "berries", "balls", "kites", "books", "stones", "shells", "flowers", "hats")
TIERS = (1, 2, 3)
ANSWER = re.compile(r"The answer is (-?\d+)\.")
FINAL = re.compile(r"The answer is (-?\d+)\.\s*$")
NUMBER = re.compile(r"-?\d+")
STORY_ASKS = ("Tell me a story.", "Write the start of a story.", "Can you tell me a story?", "Begin a story for me.")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    solution: str
    """the worked response: each step written out, then "The answer is N." """
    tier: int
    plain_ending: str = ""
    """the same answer said in a plain sentence ("So Mia had 12 shells."), which the verifier does not read"""

    @property
    def plain_solution(self) -> str:
        """The worked steps ending in the plain sentence instead of the verifiable one."""
        return self.solution[:self.solution.rindex("The answer is")] + self.plain_ending


def make_problem(rng: np.random.Generator, tier: int) -> Problem:
    """One problem of `tier`, worded with the stories' vocabulary (had, found, gave, lost) so that the
    pretrained tokenizer and model already know most of the words."""
    girl = rng.random() < 0.5
    name = str(rng.choice(GIRLS if girl else BOYS))
    she, item = ("she" if girl else "he"), str(rng.choice(ITEMS))
    if tier == 1:
        a, b = (int(x) for x in rng.integers(1, 10, size=2))
        return Problem(f"{name} had {a} {item}. {she.capitalize()} found {b} more. How many {item} did {she} have?",
                       a + b, f"{a} + {b} = {a + b}. The answer is {a + b}.", tier, f"So {name} had {a + b} {item}.")
    if tier == 2:
        a, b = int(rng.integers(10, 20)), int(rng.integers(1, 10))
        return Problem(f"{name} had {a} {item}. {she.capitalize()} gave {b} away. How many {item} did {she} have then?",
                       a - b, f"{a} - {b} = {a - b}. The answer is {a - b}.", tier, f"So {name} had {a - b} {item}.")
    if tier == 3:
        a, b, c = (int(x) for x in rng.integers(1, 10, size=3))
        c = min(c, a + b)
        return Problem(f"{name} had {a} {item}, found {b} more and lost {c}. How many {item} did {she} have?",
                       a + b - c, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.",
                       tier, f"So {name} had {a + b - c} {item}.")
    raise ValueError(f"unknown tier {tier}; tiers are {TIERS}")


def is_held_out(question: str, held_out_fraction: float) -> bool:
    """The split of a problem: a hash of its text, so it never depends on the other problems."""
    return zlib.crc32(question.encode()) % 10_000 < held_out_fraction * 10_000


def generate_problems(n: int, tiers: tuple[int, ...], seed: int, split: str,
                      held_out_fraction: float = 0.2) -> list[Problem]:
    """`n` distinct problems of `split` ("train" or "held_out"), tiers in turn; a pure function of
    the arguments. Problems are drawn until n of the split are found."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be train or held_out, got {split!r}")
    rng = np.random.default_rng([seed, 7])
    found: dict[str, Problem] = {}
    draws = 0
    while len(found) < n:
        draws += 1
        if draws > 200 * n + 1000:
            raise ValueError(f"could not find {n} distinct {split} problems of tiers {tiers}")
        problem = make_problem(rng, tiers[draws % len(tiers)])
        if is_held_out(problem.question, held_out_fraction) == (split == "held_out"):
            found.setdefault(problem.question, problem)
    return list(found.values())


def story_examples(n: int, seed: int, sentences: int = 2) -> list[tuple[str, str]]:
    """(instruction, response) pairs that keep the language: the first `sentences` sentences of a
    generated story (core/data/corpus.py) as the answer to a request for one."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 11, i])
        story = generate_story(rng).split("\n")[0]
        parts = re.split(r"(?<=[.!?]) ", story)
        out.append((STORY_ASKS[i % len(STORY_ASKS)], " ".join(parts[:sentences])))
    return out


# --- rewards -----------------------------------------------------------------------------------
def extract_answer(response: str) -> int | None:
    """The number of the first "The answer is N." in the response (None when there is none)."""
    match = ANSWER.search(response)
    return int(match.group(1)) if match else None


def correct(response: str, answer: int) -> float:
    """Exact match of the final answer: 1.0 or 0.0."""
    return float(extract_answer(response) == answer)


def well_formed(response: str) -> float:
    """1.0 when the response ends in the answer sentence (nothing after it), else 0.0."""
    return float(FINAL.search(response) is not None)


def lenient_correct(response: str, answer: int) -> float:
    """1.0 when the last number in the response is the answer, however it is phrased: what a human
    grader would accept. The gap to `correct` is the answer said in a form the verifier does not read."""
    numbers = NUMBER.findall(response)
    return float(bool(numbers) and int(numbers[-1]) == answer)


def score(responses: list[str], problems: list[Problem]) -> dict[str, float]:
    """Means over one response per problem: `accuracy` (exact match in the verifiable form, the reward),
    `lenient` (the last number is right, however phrased) and `format` (ends in "The answer is N.")."""
    pairs = list(zip(responses, problems, strict=True))
    return {"accuracy": float(np.mean([correct(r, p.answer) for r, p in pairs])),
            "lenient": float(np.mean([lenient_correct(r, p.answer) for r, p in pairs])),
            "format": float(np.mean([well_formed(r) for r, _ in pairs]))}
