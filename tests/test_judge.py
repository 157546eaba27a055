"""The optional LLM judge against a stub OpenAI-compatible server started here: the request it sends
(fixed prompt, temperature 0), how the JSON verdict becomes a Grade, and that every failure (no
server, HTTP error, timeout, a reply of the wrong shape) is one JudgeUnavailable naming the reason."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fsrs import Rating

from core.contract import Question
from core.registry import discover
from learning.judge import Judge, JudgeUnavailable
from learning.progress_db import ProgressDB
from learning.questions import all_questions
from scripts import grading_eval, interview_qa

QUESTION = Question(id="ac-roles", module="actor_critic", level=1, q="What do the actor and the critic do?",
                    answer="The actor is the policy and picks actions; the critic estimates V(s) for the advantage.",
                    key_points=("actor -> picks -> action", "critic -> estimates -> V", "advantage -> baseline"),
                    misconceptions=("critic -> picks -> action", "actor -> estimates -> V"))


class Stub:
    """A tiny OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions with a set reply."""

    def __init__(self):
        self.reply: str = "{}"
        self.replies: list[str] = []
        """replies to give in turn before `reply`"""
        self.status = 200
        self.delay = 0.0
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send(self, body: dict):
                time.sleep(stub.delay)
                data = json.dumps(body).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (the timeout test)
                    pass

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "stub-7b", "object": "model"}]})

            def do_POST(self):
                stub.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                content = stub.replies.pop(0) if stub.replies else stub.reply
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def verdict(**fields) -> str:
    return json.dumps({"key_points": [True, False, True], "misconceptions": [2], "score": 0.55,
                       "feedback": "The critic's role is missing."} | fields)


def test_the_verdict_becomes_a_grade_and_the_request_is_the_fixed_prompt(stub):
    stub.reply = verdict()
    result = Judge(stub.url).grade("The actor picks actions and estimates V.", QUESTION)
    assert [h.key_point for h in result.hits] == ["actor -> picks -> action", "advantage -> baseline"]
    assert result.misses == ("critic -> estimates -> V",)
    assert [h.key_point for h in result.misconceptions] == ["actor -> estimates -> V"]
    assert result.score == 0.55 and result.suggested == Rating.Hard
    assert result.grader == "judge:stub-7b" and result.feedback == "The critic's role is missing."
    (request,) = stub.requests
    assert request["model"] == "stub-7b" and request["temperature"] == 0
    prompt = request["messages"][0]["content"]
    for text in (QUESTION.q, QUESTION.answer, "1. actor -> picks -> action", "2. actor -> estimates -> V",
                 "The actor picks actions and estimates V."):
        assert text in prompt


def test_a_named_model_is_used_and_json_wrapped_in_prose_is_read(stub):
    stub.reply = "Sure! ```json\n" + verdict(score=1, key_points=[True, True, True], misconceptions=[]) + "\n```"
    result = Judge(stub.url, model="mine").grade("…", QUESTION)
    assert stub.requests[0]["model"] == "mine"
    assert result.score == 1.0 and result.suggested == Rating.Easy and not result.misses


@pytest.mark.parametrize("reply, reason", [
    ("I think it is fine.", "not a JSON object"),
    (verdict(key_points=[True, False]), "3 true/false values"),
    (verdict(key_points=[1, 0, 1]), "3 true/false values"),
    (verdict(misconceptions=[3]), "list of their numbers"),
    (verdict(score=1.5), "from 0 to 1"),
    (verdict(score="high"), "from 0 to 1"),
])
def test_a_reply_of_the_wrong_shape_is_unavailable_with_the_reason(stub, reply, reason):
    stub.reply = reply
    with pytest.raises(JudgeUnavailable, match=reason):
        Judge(stub.url).grade("an answer", QUESTION)


def test_http_errors_timeouts_and_a_closed_port_are_unavailable(stub):
    stub.status = 500
    with pytest.raises(JudgeUnavailable, match="HTTP 500"):
        Judge(stub.url, model="m").grade("an answer", QUESTION)
    stub.status, stub.delay = 200, 1.0
    with pytest.raises(JudgeUnavailable, match="did not answer"):
        Judge(stub.url, model="m", timeout=0.2).grade("an answer", QUESTION)
    closed = stub.url
    stub.server.shutdown()
    stub.server.server_close()
    with pytest.raises(JudgeUnavailable, match="did not answer"):
        Judge(closed, model="m", timeout=2).grade("an answer", QUESTION)
    with pytest.raises(JudgeUnavailable):
        Judge("localhost:1", model="m").grade("an answer", QUESTION)



def test_the_drill_grades_with_the_judge_and_falls_back_offline_with_one_line(stub, workdir, capsys, tmp_path):
    bank = {q.id: q for q in all_questions(discover())}
    answers = tmp_path / "answers.toml"
    answers.write_text('mdp-definition = "An MDP is a tuple of states, actions, transitions, rewards and a discount."\n'
                       'gae-definition = "GAE is an exponentially weighted sum of TD errors."\n', encoding="utf-8")
    n = {qid: len(bank[qid].key_points) for qid in ("mdp-definition", "gae-definition")}
    stub.replies = [json.dumps({"key_points": [True] * n["mdp-definition"], "misconceptions": [], "score": 0.9}),
                    json.dumps({"key_points": [False] * n["gae-definition"], "misconceptions": [], "score": 0.2})]
    assert interview_qa.main(["--answers-file", str(answers), "--db", str(tmp_path / "a.db"), "--judge", stub.url]) == 0
    with ProgressDB(tmp_path / "a.db") as progress:
        assert [(r["card_id"], r["score"], r["graded_by"]) for r in progress.reviews()] == [
            ("mdp-definition", 0.9, "judge:stub-7b"), ("gae-definition", 0.2, "judge:stub-7b")]

    # a verdict of the wrong shape: one line, and the rest of the session is graded offline without asking again
    stub.requests.clear()
    stub.reply = json.dumps({"key_points": [], "misconceptions": [], "score": 0.8})
    capsys.readouterr()
    assert interview_qa.main(["--answers-file", str(answers), "--db", str(tmp_path / "b.db"), "--judge", stub.url]) == 0
    out = capsys.readouterr().out
    assert out.count("The judge did not grade") == 1 and "Grading offline from here on" in out
    assert len(stub.requests) == 1
    with ProgressDB(tmp_path / "b.db") as progress:
        assert [r["graded_by"] for r in progress.reviews()] == ["offline", "offline"]


def test_a_judge_model_without_a_judge_is_bad_input(capsys):
    for main in (interview_qa.main, grading_eval.main):
        assert main(["--judge-model", "m"]) == 2
        assert "give the judge's --judge URL" in capsys.readouterr().err
