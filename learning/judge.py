"""An optional LLM judge: any OpenAI-compatible chat endpoint the learner runs (a local model server,
for instance) grades an answer against the question's model answer and claims.

    judge = Judge("http://127.0.0.1:8000/v1")            # the base URL, as OpenAI clients take it
    result = judge.grade(answer, question)                # a learning.grader.Grade, grader "judge:<model>"

One fixed prompt (PROMPT below), temperature 0, and a JSON reply of a fixed shape:
{"key_points": [true/false per key point], "misconceptions": [the numbers of the wrong claims the
answer states], "score": 0..1, "feedback": "one sentence"}. Anything else — no server, a timeout, an
HTTP error, a reply that is not that JSON — raises JudgeUnavailable with the reason, and the caller
grades offline instead (scripts/interview_qa.py says so in one line). Only the standard library is
used: the judge is optional, so it adds no dependency.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from core.contract import Question
from core.errors import UserError
from learning.grader import Grade, Hit, check_length, suggested_rating

TIMEOUT_S = 60.0
"""a local 7B model writes the short JSON reply in a few seconds; a minute covers a slow CPU"""

PROMPT = """You are a strict technical interviewer grading a candidate's spoken answer.

Question: {question}

Model answer (what a strong candidate says): {model_answer}

Key points (claims a correct answer makes):
{key_points}

Common wrong claims (misconceptions):
{misconceptions}

Candidate's answer: {answer}

Judge the meaning, not the wording: a key point counts only if the candidate states it as true (not
negated, not with the roles swapped, not just as a listed keyword); a misconception counts if the
candidate states it. An answer in Chinese is judged the same way. Reply with JSON only, exactly:
{{"key_points": [true or false for each key point, in order], "misconceptions": [numbers of the
misconceptions stated], "score": a number from 0 to 1 for the whole answer, "feedback": "one sentence"}}"""


class JudgeUnavailable(UserError):
    """The judge did not give a usable grade; the message says why (the caller grades offline)."""


@dataclass(frozen=True)
class Judge:
    url: str
    """base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"""
    model: str | None = None
    """the model to ask; default: the first one GET {url}/models lists"""
    timeout: float = TIMEOUT_S

    def _request(self, path: str, body: dict | None = None) -> dict:
        url = self.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise JudgeUnavailable(f"{url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise JudgeUnavailable(f"{url} did not answer ({getattr(exc, 'reason', exc)})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise JudgeUnavailable(f"{url} did not answer with JSON") from None
        except ValueError as exc:  # a URL urllib cannot use ("localhost:8000" without http://)
            raise JudgeUnavailable(f"{url}: {exc}") from None

    def model_name(self) -> str:
        if self.model:
            return self.model
        try:
            return str(self._request("/models")["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise JudgeUnavailable(f"{self.url}/models lists no model; name one with --judge-model") from None

    def grade(self, answer: str, question: Question) -> Grade:
        check_length(answer)
        model = self.model_name()
        prompt = PROMPT.format(
            question=question.q, model_answer=question.answer, answer=answer,
            key_points="\n".join(f"{i}. {k}" for i, k in enumerate(question.key_points, 1)),
            misconceptions="\n".join(f"{i}. {m}" for i, m in enumerate(question.misconceptions, 1)) or "(none)")
        reply = self._request("/chat/completions", {
            "model": model, "temperature": 0, "max_tokens": 400,
            "messages": [{"role": "user", "content": prompt}]})
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeUnavailable(f"{self.url}: the reply has no choices[0].message.content") from None
        return parse_verdict(content, question, model)


def parse_verdict(content: str, question: Question, model: str) -> Grade:
    """The judge's JSON reply as a Grade; JudgeUnavailable naming what is wrong with it."""
    found = re.search(r"\{.*\}", content, re.DOTALL)  # models like to wrap JSON in prose or fences
    try:
        verdict = json.loads(found.group()) if found else None
    except json.JSONDecodeError:
        verdict = None
    if not isinstance(verdict, dict):
        raise JudgeUnavailable(f"the judge's reply is not a JSON object: {content[:120]!r}")
    made, wrong, score = verdict.get("key_points"), verdict.get("misconceptions", []), verdict.get("score")
    if (not isinstance(made, list) or len(made) != len(question.key_points)
            or not all(isinstance(m, bool) for m in made)):
        raise JudgeUnavailable(f"the judge's key_points is not {len(question.key_points)} true/false values: {made!r}")
    if not isinstance(wrong, list) or not all(isinstance(w, int) and 1 <= w <= len(question.misconceptions)
                                              for w in wrong):
        raise JudgeUnavailable(f"the judge's misconceptions is not a list of their numbers: {wrong!r}")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise JudgeUnavailable(f"the judge's score is not a number from 0 to 1: {score!r}")
    feedback = str(verdict.get("feedback", ""))
    hits = tuple(Hit(k, "") for k, ok in zip(question.key_points, made) if ok)
    misses = tuple(k for k, ok in zip(question.key_points, made) if not ok)
    stated = tuple(Hit(question.misconceptions[w - 1], "") for w in sorted(set(wrong)))
    return Grade(hits, misses, float(score), suggested_rating(float(score)), stated,
                 grader=f"judge:{model}", feedback=feedback)
