"""inference's OpenAI-compatible server, on a free loopback port, talked to by the real openai client and by
httpx: both endpoints streamed and not (each text, finish reason and usage equal to Transformer.generate's
greedy continuation, tokens counted independently), n samples against single requests with their seeds,
stop strings, the raw SSE frames, OpenAI-style 4xx bodies, 16 concurrent streams, a client that leaves
mid-stream (its sequence aborted and its KV blocks back in the pool), a flood past the queue limit (429,
then the server still answers), a port in use. Tiny random models (tests/test_chat.py); the last test
serves the toy chain's grpo model with `python run.py --serve` and streams one chat completion from it."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch

from core.data.tokenizer import Tokenizer
from core.errors import UserError
from core.nn.model import load_model
from core.paths import ROOT
from core.registry import discover
from core.run_context import MODEL_DIR, output_link
from post_train.systems.inference.code.chat import conversation_ids
from post_train.systems.inference.code.engine import Engine
from post_train.systems.inference.code.serve import bind, build_app, is_loopback, serving_in_thread
from test_chat import greedy_reply, one_thread_for_the_module, tiny_chat_model, tiny_tokenizer  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread", "one_thread_for_the_module")

WAIT_S = 20
"""the longest any wait here may take (a server starting, a gate, the engine settling)"""


class Server:
    """A running server (serve.serving_in_thread), with a client and a look into its engine."""

    def __init__(self, url: str, app):
        self.url, self.worker = url, app.state.worker

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0)

    def engine(self, read):
        """`read(engine)` in the engine's own thread, between steps."""
        return self.worker.inspect(read).result(WAIT_S)

    def settled(self) -> tuple[int, int, dict[str, int]]:
        """Once nothing runs: (free KV blocks, all blocks, how the sequences ended)."""
        wait_until(lambda: not self.engine(lambda e: e.has_unfinished()), "the engine to finish")
        return self.engine(lambda e: (e.free_blocks, e.num_kv_blocks, dict(self.worker.ended)))


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_S} s for {what}")
        time.sleep(0.005)


@contextmanager
def serving(engine: Engine, tok: Tokenizer):
    app = build_app(engine, tok, ("tiny", "tiny:toy"))
    with serving_in_thread(app) as url:
        yield Server(url, app)


class GatedEngine(Engine):
    """The engine with a gate before every step: it waits (at most WAIT_S) until `opens(engine)`, so that a
    test decides what happens between two steps, whatever the machine's speed. It counts add_request calls."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.opens = lambda engine: True
        self.requests = 0

    def add_request(self, *args, **kwargs):
        self.requests += 1
        return super().add_request(*args, **kwargs)

    def step(self):
        deadline = time.monotonic() + WAIT_S
        while not self.opens(self) and time.monotonic() < deadline:
            time.sleep(0.001)
        return super().step()


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_chat_model(tok)


@pytest.fixture(scope="module")
def server(model, tok):
    with serving(Engine(model, max_running=16), tok) as s:
        yield s


MAX_TOKENS = 16


@pytest.fixture(scope="module")
def questions(model, tok) -> dict[str, list[str]]:
    """User messages whose greedy reply ends with a stop token after a few tokens, and ones that run to
    max_tokens: the two ends a test must see."""
    found: dict[str, list[str]] = {"stop": [], "length": []}
    for i in range(200):
        question = f"Tell me about the {i} cats."
        _, tokens, reason = greedy_reply(model, tok, conversation_ids(tok, [("user", question)]), MAX_TOKENS)
        if reason == "length" or tokens >= 3:
            found[reason].append(question)
        if min(len(v) for v in found.values()) >= 8:
            return found
    pytest.fail(f"the tiny model gave too few replies of each kind: {found}")


def chat_body(question: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": MAX_TOKENS, **fields}


def expected_chat(model, tok, turns, max_tokens: int = MAX_TOKENS) -> tuple[str, int, str, int]:
    """(text, completion tokens, finish reason, prompt tokens) of the greedy reply to `turns`."""
    prompt = conversation_ids(tok, turns)
    return (*greedy_reply(model, tok, prompt, max_tokens), len(prompt))


# --- the endpoints -------------------------------------------------------------------------------------
def test_models_lists_the_served_model(server):
    (listed,) = server.client().models.list().data
    assert (listed.id, listed.object, listed.owned_by) == ("tiny", "model", "finetune")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("reason", ["stop", "length"])
def test_chat_completion_is_the_greedy_reply(server, model, tok, questions, stream, reason):
    turns = [("user", questions[reason][0])]
    text, tokens, finish, prompt = expected_chat(model, tok, turns)
    args = dict(model="tiny:toy", messages=[{"role": "user", "content": turns[0][1]}], temperature=0, max_tokens=MAX_TOKENS)
    if stream:
        chunks = list(server.client().chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        *deltas, last = chunks
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert deltas[0].choices[0].delta.role == "assistant" and [c.choices[0].finish_reason for c in deltas][-1] == finish
        assert "".join(c.choices[0].delta.content or "" for c in deltas) == text
        assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, tokens)
    else:
        reply = server.client().chat.completions.create(**args)
        assert reply.object == "chat.completion" and reply.model == "tiny:toy"
        (choice,) = reply.choices
        assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
               (prompt, tokens, prompt + tokens)
    assert finish == reason and (reason == "length") == (tokens == MAX_TOKENS)


def test_a_conversation_is_continued_in_the_chat_template(server, model, tok, questions):
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", questions["length"][0])]
    messages = [{"role": "developer" if role == "system" else role, "content": text} for role, text in turns]
    messages[1]["content"] = [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]  # content parts
    text, tokens, finish, prompt = expected_chat(model, tok, turns)
    reply = server.client().chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (text, finish)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, tokens)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completion_continues_the_text_from_a_document_start(server, model, tok, stream):
    prompt = "Once upon a time, a little fox"
    ids = [tok.eos_id, *tok.encode(prompt)]
    text, tokens, finish = greedy_reply(model, tok, ids, 24)
    client = server.client()
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert all(c.object == "text_completion" for c in chunks)
        assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == finish
    else:
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert (reply.object, reply.choices[0].text, reply.choices[0].finish_reason) == ("text_completion", text, finish)
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), tokens)


def test_the_raw_stream_is_sse_frames_of_chunks_ending_with_done(server, questions):
    with httpx.stream("POST", f"{server.url}/chat/completions", json=chat_body(questions["length"][0], stream=True),
                      timeout=WAIT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().replace("\r\n", "\n").split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_n_samples_share_a_prompt_and_equal_single_requests_with_their_seeds(server, questions):
    client, question = server.client(), questions["length"][1]
    args = dict(model="tiny", messages=[{"role": "user", "content": question}], temperature=1.0, max_tokens=MAX_TOKENS)
    together = client.chat.completions.create(**args, n=3, seed=11)
    alone = [client.chat.completions.create(**args, seed=11 + j).choices[0].message.content for j in range(3)]
    assert [c.message.content for c in sorted(together.choices, key=lambda c: c.index)] == alone
    assert len(set(alone)) > 1, "three different samples at temperature 1"
    single = client.chat.completions.create(**args, seed=11)
    assert together.usage.prompt_tokens == single.usage.prompt_tokens, "the prompt is counted once"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_stop_string_cuts_the_text_and_ends_the_choice(server, model, tok, questions, stream):
    question = questions["length"][2]
    full, _, _, _ = expected_chat(model, tok, [("user", question)])
    stop = full[len(full) // 2:len(full) // 2 + 3]
    client = server.client()
    args = dict(model="tiny", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS,
                stop=["\u2603 never", stop])
    if stream:
        chunks = list(client.chat.completions.create(**args, stream=True))
        text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**args).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert (text, finish) == (full[:full.index(stop)], "stop")


# --- errors ----------------------------------------------------------------------------------------------
ERRORS = {
    "malformed-json": ('{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    "unknown-model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    "max-tokens-zero": ({**chat_body("hi"), "max_tokens": 0}, 400, "max_tokens", None),
    "max-tokens-past-context": ({**chat_body("hi"), "max_tokens": 95}, 400, "max_tokens", "context_length_exceeded"),
    "prompt-past-context": (chat_body("the fox " * 60), 400, "messages", "context_length_exceeded"),
    "max-tokens-a-string": ({**chat_body("hi"), "max_tokens": "12"}, 400, "max_tokens", None),
    "no-messages": ({"model": "tiny", "messages": []}, 400, "messages", None),
    "n-past-the-batch": ({**chat_body("hi"), "n": 17}, 400, "n", None),
}


@pytest.mark.parametrize("body, status, param, code", ERRORS.values(), ids=ERRORS)
def test_bad_requests_get_openai_error_bodies(server, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_the_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="the fox " * 60)


# --- load --------------------------------------------------------------------------------------------------
def test_sixteen_concurrent_streams_each_get_their_own_greedy_reply(server, model, tok, questions):
    asked = questions["stop"][:8] + questions["length"][:8]
    expected = [expected_chat(model, tok, [("user", q)]) for q in asked]
    assert {e[2] for e in expected} == {"stop", "length"}
    steps_before = server.engine(lambda e: e.decode_steps)
    results: list = [None] * len(asked)

    def stream(i: int) -> None:
        chunks = list(server.client().chat.completions.create(**chat_body(asked[i]), stream=True,
                                                               stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                      usage.completion_tokens, chunks[-2].choices[0].finish_reason, usage.prompt_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(asked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert results == expected
    free, total, _ = server.settled()
    decode_steps = server.engine(lambda e: e.decode_steps) - steps_before
    assert free == total, "every block back in the pool"
    assert decode_steps < sum(e[1] for e in expected), "the streams were decoded in shared batches"


def test_a_client_that_leaves_mid_stream_has_its_sequence_aborted(model, tok, questions):
    """The gate holds the engine after its second decode step until a message arrives: the only one that
    can come is the abort of the client that left (without it the sequence would run to max_tokens)."""
    engine = GatedEngine(model, max_running=4)
    with serving(engine, tok) as server:
        engine.opens = lambda e: e.decode_steps < 2 or not server.worker.inbox.empty()
        body = {**chat_body(questions["length"][3], stream=True), "max_tokens": 60}
        with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=WAIT_S) as response:
            tokens_seen = 0
            for line in response.iter_lines():
                tokens_seen += '"delta": {"content": ' in line
                if tokens_seen == 2:
                    break  # and the connection closes
        wait_until(lambda: sum(server.worker.ended.values()) == 1, "the sequence to end")  # not polling the engine:
        free, total, ended = server.settled()                                              # that would open the gate
    assert ended == {"disconnected": 1} and free == total


def test_a_client_that_leaves_before_a_non_streaming_reply_has_its_sequence_aborted(model, tok, questions):
    """The same gate; the client gives up waiting for the whole reply (a read time-out closes the connection).
    Starlette does not cancel the handler, so only the server's watch for http.disconnect can abort it."""
    engine = GatedEngine(model, max_running=4)
    with serving(engine, tok) as server:
        engine.opens = lambda e: e.decode_steps < 2 or not server.worker.inbox.empty()
        body = {**chat_body(questions["length"][3]), "max_tokens": 60}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/chat/completions", json=body, timeout=httpx.Timeout(WAIT_S, read=1.0))
        wait_until(lambda: sum(server.worker.ended.values()) == 1, "the sequence to end")
        free, total, ended = server.settled()
    assert ended == {"disconnected": 1} and free == total


def test_a_flood_past_the_queue_limit_gets_429_and_the_server_keeps_answering(model, tok, questions):
    """One running and one waiting sequence fit; the gate holds the first step until all requests arrived."""
    flood = 12
    engine = GatedEngine(model, max_running=1, max_waiting=1)
    with serving(engine, tok) as server:
        engine.opens = lambda e: e.prefills > 0 or e.requests + server.worker.inbox.qsize() >= flood

        async def send_all():
            async with httpx.AsyncClient(timeout=WAIT_S) as client:
                return await asyncio.gather(*(client.post(f"{server.url}/chat/completions",
                                                          json=chat_body(questions["length"][i % 8]))
                                              for i in range(flood)))
        responses = asyncio.run(send_all())
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) == {200, 429} and 1 <= statuses[200] <= 2
        for i, r in enumerate(responses):
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
            else:
                expected = expected_chat(model, tok, [("user", questions["length"][i % 8])])[0]
                assert r.json()["choices"][0]["message"]["content"] == expected
        after = server.client().chat.completions.create(**chat_body(questions["stop"][0]))
        assert after.choices[0].message.content == expected_chat(model, tok, [("user", questions["stop"][0])])[0]
        free, total, ended = server.settled()
    assert free == total and ended == {"length": statuses[200], "stop": 1}


class BrokenEngine(Engine):
    def step(self):
        raise RuntimeError("a bug in the engine")


def test_an_engine_that_raises_answers_500_and_never_leaves_a_request_waiting(model, tok, questions):
    with serving(BrokenEngine(model), tok) as server:
        for _ in range(2):  # the request in flight, then one after the engine stopped
            response = httpx.post(f"{server.url}/chat/completions", json=chat_body(questions["length"][0]),
                                  timeout=WAIT_S)
            assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
            assert "a bug in the engine" in response.json()["error"]["message"]


def test_a_port_in_use_is_one_line_and_only_loopback_is_quiet():
    sock = bind("127.0.0.1", 0)
    sock.listen()  # as uvicorn does with it
    try:
        with pytest.raises(UserError, match=rf"cannot listen on 127\.0\.0\.1:{sock.getsockname()[1]} .*--port"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "192.168.1.2")] == \
           [True, True, True, False, False]


# --- the learner's model -------------------------------------------------------------------------------------
@pytest.mark.toy_chain
def test_run_py_serve_streams_a_chat_completion_of_the_chains_grpo_model(request, workdir):
    request.getfixturevalue("toy_chain").copy_to(workdir)
    # started with SIGINT ignored, as a shell without job control starts a background job (and as CI may start
    # this suite): uvicorn still stops on it, and the server must still say so and exit 130
    proc = subprocess.Popen([sys.executable, "run.py", "--serve", "--port", "0"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FINETUNE_WORKDIR": str(workdir)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        banner = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/v1)$", banner.strip()).group(1)
        assert banner.startswith("serving grpo (toy run of")
        question = "Tom had 3 apples. He found 4 more. How many apples did he have?"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        deadline = time.monotonic() + WAIT_S
        while True:  # the banner comes once the port is bound; uvicorn accepts a moment later
            try:
                chunks = list(client.chat.completions.create(model="grpo", messages=[{"role": "user", "content": question}],
                                                             temperature=0, stream=True))
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        folder = output_link(discover().get("grpo"), "toy") / MODEL_DIR
        model, tok = load_model(folder).eval(), Tokenizer.load(folder)
        prompt = conversation_ids(tok, [("user", question)])
        text, _, finish = greedy_reply(model, tok, prompt, model.cfg.block_size - len(prompt))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text and finish == "stop"
        assert chunks[-1].choices[0].finish_reason == "stop" and "7" in text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130 and err.strip().endswith("server stopped")
