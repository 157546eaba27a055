"""`python run.py --serve`: an OpenAI-compatible HTTP server over the paged, continuously batched engine.

    GET  /v1/models
    POST /v1/chat/completions   messages in the chat template (chat.py), the reply as chat.completion
    POST /v1/completions        a raw text prompt continued from a document start (<eos> prompt)
    both with "stream": true:   server-sent events of OpenAI's chunk objects, then `data: [DONE]`

The engine is not thread-safe, and the HTTP side is asyncio: one worker thread owns the engine (the
single-writer pattern of vLLM's AsyncLLMEngine). Requests and aborts reach it through a thread-safe
queue; it runs `engine.step()` while anything is unfinished, which is where continuous batching happens
(a request that arrives joins the running batch at the next step), and hands each step's tokens to the
waiting requests' asyncio queues with `loop.call_soon_threadsafe` (the only safe way into a loop from
another thread). The HTTP side never touches the engine.

What each choice of the protocol costs here:
- Backpressure: the engine's waiting queue is bounded (max_waiting); a request that finds it full gets
  HTTP 429 at once, with Retry-After, instead of an ever longer wait that ends in client time-outs (the
  server keeps answering; clients back off and retry).
- A client that goes away has its sequences aborted, streaming or not: their KV blocks return to the
  pool at the next step instead of being filled with tokens nobody reads. (Starlette cancels neither
  kind of handler when the client leaves; a non-streaming one waits for the engine and for the client's
  `http.disconnect` at once, as Starlette's own streaming response does.)
- `stop` strings are matched on the decoded text (they may span tokens); the text is cut before the
  first one, the sequence is aborted, and while streaming a tail that could be the start of a stop
  string is held back until it cannot be (chat.ReplyText).
- usage: prompt_tokens is the prompt in the template (once, also for n > 1); completion_tokens counts
  every choice's generated tokens, without the <|end|> / <eos> that ended it (not part of the text).
- Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, bad
  fields (FastAPI's 422 is mapped to 400), max_tokens out of range and prompts longer than the context,
  404 for a model this server does not serve, 429 when the queue is full.
SSE frames are written by sse-starlette (`EventSourceResponse`), a maintained helper, not by hand: it
also watches for the client's disconnect, which is what cancels the stream. The FastAPI installed here
ships an EventSourceResponse of its own, but it streams path operations that are generators, whose body
runs only once the 200 has gone out; a request refused with 429 must be refused before the stream starts.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import Receive

from core.data.tokenizer import Tokenizer
from core.errors import UserError

from .chat import ReplyText, conversation_ids, stop_ids
from .engine import Engine, PromptTooLong, QueueFull, SamplingParams
from .models import ServableModel, load

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MAX_STOP_STRINGS = 4
"""OpenAI's limit on `stop`"""
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "tools", "functions", "echo", "suffix", "best_of", "logit_bias")
"""OpenAI fields that would change what a response holds: refused when set rather than silently ignored"""
SHUTDOWN_GRACE_S = 2
"""Ctrl-C: how long open streams get to finish before the server closes them"""


# --- requests ---------------------------------------------------------------------------------------
class SamplingFields(BaseModel):
    """The fields both endpoints share (OpenAI's defaults); other fields are accepted and ignored. Strict:
    "max_tokens": "12" or "stream": 1 are refused, as OpenAI refuses them, rather than coerced."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    """None: as many as the context leaves"""
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _supported(self) -> SamplingFields:
        refused = [k for k in UNSUPPORTED_FIELDS if (self.model_extra or {}).get(k)]
        if refused:
            raise ValueError(f"not supported by this server: {', '.join(refused)}")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def reply_budget(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens on this endpoint; wins when both are given"""

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's (the reply continues from it)")
        return messages

    @property
    def reply_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str


# --- errors -----------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _field_path(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'"""
    path = ""
    for part in loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, with the field it is about as `param`."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    param = _field_path(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if param is None and first["type"] in ("missing", "model_attributes_type", "dict_type"):
        message = "the request body must be a JSON object"
    return APIError(400, f"{param}: {message}" if param else message, param=param)


# --- the engine's thread -----------------------------------------------------------------------------
@dataclass(eq=False)
class Submission:
    """One request on its way through the worker: answered on `accepted` (the number of sequences, or the
    exception that refused it), then fed batches of (choice index, token, finish reason) on `events`."""
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False, default_factory=asyncio.Queue)

    def __post_init__(self):
        self.accepted = self.loop.create_future()


class EngineStopped(Exception):
    """The engine raised (a bug): every request in flight, and every later one, gets HTTP 500."""


class ClientLeft(Exception):
    """The client of a non-streaming request disconnected before its reply was ready."""


def _settle(future: asyncio.Future, outcome: Any) -> None:
    if not future.done():  # the request may have been cancelled meanwhile
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class EngineWorker:
    """The one thread that calls the engine: messages in through `inbox`, tokens out to each request's loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.owners: dict[int, tuple[Submission, int]] = {}
        """seq_id -> (its request, its choice index), while the sequence runs"""
        self.ended: Counter[str] = Counter()
        """how sequences ended: stop, length, or why they were aborted (disconnected, stop string)"""
        self.failure: str | None = None
        self.lock = threading.Lock()  # between a new message and the worker failing: none is left unanswered
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._send(("stop",))
        self.thread.join()

    def submit(self, submission: Submission) -> None:
        self._send(("add", submission))

    def abort(self, submission: Submission, index: int | None, why: str) -> None:
        """Abort one choice of a request, or all of them (index None)."""
        self._send(("abort", submission, index, why))

    def inspect(self, read: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """`read(engine)` run in the engine's thread, between steps (for tests and monitoring)."""
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("inspect", read, answer))
        return answer

    def _send(self, message: tuple) -> None:
        with self.lock:
            if self.failure is not None and message[0] != "stop":
                raise EngineStopped(self.failure)
            self.inbox.put(message)

    def _run(self) -> None:
        while True:
            try:
                message = self.inbox.get(block=not self.engine.has_unfinished())
            except queue.Empty:
                message = None
            try:
                while message is not None:
                    if message[0] == "stop":
                        return
                    self._handle(message)
                    message = None if self.inbox.empty() else self.inbox.get()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
            except Exception:  # noqa: BLE001 - a bug in the engine: answer everyone rather than hang them
                self._fail(traceback.format_exc(), message)
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            submission = message[1]
            try:
                sequences = self.engine.add_request(submission.prompt_ids, submission.params, submission.n)
            except (QueueFull, ValueError) as exc:  # PromptTooLong is a ValueError
                self._call(submission.loop, _settle, submission.accepted, exc)
                return
            for index, seq in enumerate(sequences):
                self.owners[seq.seq_id] = (submission, index)
            self._call(submission.loop, _settle, submission.accepted, len(sequences))
        elif kind == "abort":
            _, submission, index, why = message
            for seq_id, (owner, i) in list(self.owners.items()):
                if owner is submission and index in (None, i):
                    self.engine.abort(seq_id)
                    del self.owners[seq_id]
                    self.ended[why] += 1
        elif kind == "inspect":
            _, read, answer = message
            try:
                answer.set_result(read(self.engine))
            except Exception as exc:  # noqa: BLE001 - the reader's mistake goes back to the reader, the engine goes on
                answer.set_exception(exc)

    def _deliver(self, made: list) -> None:
        batches: dict[Submission, list[tuple[int, int, str | None]]] = {}
        for seq, token in made:
            if seq.seq_id not in self.owners:
                continue
            submission, index = self.owners[seq.seq_id]
            batches.setdefault(submission, []).append((index, token, seq.finish_reason))
            if seq.finished:
                del self.owners[seq.seq_id]
                self.ended[seq.finish_reason] += 1
        for submission, events in batches.items():
            self._call(submission.loop, submission.events.put_nowait, events)

    def _fail(self, trace: str, handling: tuple | None) -> None:
        """Answer every request the worker knows of with EngineStopped: those running, the one whose message
        it was handling, those still in the inbox; later ones are refused by `_send`."""
        print(f"error: the engine raised; the server answers 500 from now on:\n{trace}", file=sys.stderr, flush=True)
        with self.lock:
            self.failure = trace.strip().splitlines()[-1]
            failed = EngineStopped(self.failure)
            pending = [handling] if handling is not None else []
            while not self.inbox.empty():
                pending.append(self.inbox.get())
        for submission in {s for s, _ in self.owners.values()} | {m[1] for m in pending if m[0] == "add"}:
            self._call(submission.loop, _settle, submission.accepted, failed)
            self._call(submission.loop, submission.events.put_nowait, failed)
        for message in pending:
            if message[0] == "inspect" and not message[2].done():
                message[2].set_exception(failed)
        self.owners.clear()

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed (the server is shutting down): nobody is waiting any more
            pass


# --- one request's choices as they arrive -------------------------------------------------------------
@dataclass
class Choice:
    text: ReplyText
    tokens: int = 0
    finish_reason: str | None = None


class Replies:
    """The n choices of one admitted request: `next()` waits for the engine's next tokens and returns
    (choice index, new text, finish reason or None) for each choice that moved; `close()` aborts what is
    still running (a client that went away)."""

    def __init__(self, worker: EngineWorker, submission: Submission, tok: Tokenizer, stop_strings: list[str]):
        self.worker, self.submission = worker, submission
        self.stop_ids = set(submission.params.stop_token_ids)
        self.choices = [Choice(ReplyText(tok, stop_strings)) for _ in range(submission.n)]

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def next(self) -> list[tuple[int, str, str | None]]:
        events = await self.submission.events.get()
        if isinstance(events, EngineStopped):
            raise events
        moved = []
        for index, token, reason in events:
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # a token made before the abort of a stop string reached the engine
            text = ""
            if token not in self.stop_ids:
                choice.tokens += 1
                text = choice.text.add(token)
            if choice.text.stopped:
                choice.finish_reason = "stop"
                self.worker.abort(self.submission, index, "stop string")
            elif reason is not None:
                choice.finish_reason = reason
                text += choice.text.finish()
            moved.append((index, text, choice.finish_reason))
        return moved

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.submission.prompt_ids), sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        if not self.done:
            self.worker.abort(self.submission, None, "disconnected")


# --- the app ------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(engine: Engine, tok: Tokenizer, model_ids: tuple[str, ...], created: int | None = None) -> FastAPI:
    """The HTTP app over `engine` (its worker thread starts and stops with the app). `model_ids`: the names a
    request may give, the first one listed by /v1/models."""
    worker = EngineWorker(engine)
    context = engine.model.cfg.block_size
    created = int(time.time()) if created is None else created
    ends = stop_ids(tok)

    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="finetune inference", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientLeft)
    async def client_left(_, exc: ClientLeft) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, an access log would

    @app.exception_handler(EngineStopped)
    async def engine_stopped(_, exc: EngineStopped) -> JSONResponse:
        return JSONResponse(error_body(f"the engine stopped after an internal error ({exc}); restart the server",
                                       "server_error"), 500)

    def check_model(requested: str) -> None:
        if requested not in model_ids:
            raise APIError(404, f"the model {requested!r} is not served here; this server serves {model_ids[0]!r} "
                                f"(python run.py --serve --model {requested} serves another)",
                           param="model", code="model_not_found")

    def sampling(request: SamplingFields, prompt: list[int], prompt_field: str) -> SamplingParams:
        room = context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens and the model's context {context}: no room "
                                f"for a reply", param=prompt_field, code="context_length_exceeded")
        budget = request.reply_budget
        if budget is not None and budget > room:
            raise APIError(400, f"max_tokens {budget} is out of range: the prompt is {len(prompt)} tokens of the "
                                f"{context}-token context, which leaves at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        if request.n > engine.max_running:
            raise APIError(400, f"n must be at most {engine.max_running} (the sequences one step runs)", param="n")
        return SamplingParams(max_tokens=budget or room, temperature=request.temperature, top_p=request.top_p,
                              stop_token_ids=ends, seed=request.seed)

    async def admit(prompt: list[int], params: SamplingParams, n: int) -> Submission:
        submission = Submission(prompt, params, n, asyncio.get_running_loop())
        worker.submit(submission)
        try:
            await submission.accepted
        except QueueFull:
            raise APIError(429, "the server is at capacity (its queue of waiting requests is full); retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded" if isinstance(exc, PromptTooLong) else None) \
                from None
        except asyncio.CancelledError:
            worker.abort(submission, None, "disconnected")
            raise
        return submission

    async def disconnected(receive: Receive) -> None:
        """Returns when the client has gone (the body was read already, so http.disconnect is all that comes)."""
        while (await receive())["type"] != "http.disconnect":
            pass

    async def respond(request: SamplingFields, prompt: list[int], prompt_field: str, kind: str, receive: Receive):
        params = sampling(request, prompt, prompt_field)
        submission = await admit(prompt, params, request.n)
        replies = Replies(worker, submission, tok, request.stop_strings)
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": request.model}
        if request.stream:
            with_usage = bool((request.stream_options or {}).get("include_usage"))
            # close() also as a background task: it runs even when the client left before the stream started
            return EventSourceResponse(stream(replies, head, kind, with_usage), ping=0,
                                       background=BackgroundTask(replies.close))
        texts = [""] * request.n
        left = asyncio.create_task(disconnected(receive))
        try:
            while not replies.done:
                step = asyncio.create_task(replies.next())
                await asyncio.wait((step, left), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # nobody is left to answer: abort (finally) and send nothing
                    step.cancel()
                    raise ClientLeft
                for index, text, _ in step.result():
                    texts[index] += text
        finally:
            left.cancel()
            replies.close()
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": c.finish_reason} for i, (t, c) in enumerate(zip(texts, replies.choices))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, (t, c) in enumerate(zip(texts, replies.choices))]
        return {**head, "object": "chat.completion" if kind == "chat" else "text_completion", "choices": choices,
                "usage": replies.usage()}

    async def stream(replies: Replies, head: dict, kind: str, with_usage: bool):
        """OpenAI's chunks, one SSE event each (sse-starlette writes the `data:` frames), then [DONE]."""
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                body = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                body = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            return json.dumps({**head, "object": obj, "choices": [body]})

        try:
            if kind == "chat":
                for index in range(len(replies.choices)):
                    yield chunk(index, None, None, role=True)
            while not replies.done:
                for index, text, reason in await replies.next():
                    if text:
                        yield chunk(index, text, None)
                    if reason is not None:
                        yield chunk(index, None, reason)
            if with_usage:
                yield json.dumps({**head, "object": obj, "choices": [], "usage": replies.usage()})
            yield "[DONE]"
        finally:
            replies.close()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_ids[0], "object": "model", "created": created,
                                            "owned_by": "finetune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        check_model(request.model)
        turns = [("system" if m.role == "developer" else m.role, m.text) for m in request.messages]
        return await respond(request, conversation_ids(tok, turns), "messages", "chat", http.receive)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        check_model(request.model)
        return await respond(request, [tok.eos_id, *tok.encode(request.prompt)], "prompt", "text", http.receive)

    return app


# --- the command ----------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed: a port in use is one line, exit 2. Made with
    proto IPPROTO_TCP, as asyncio makes its own: only then does asyncio set TCP_NODELAY on the connections it
    accepts, and without it Nagle's algorithm holds each small SSE frame until the client's delayed ACK
    (up to 40 ms on Linux), so a stream arrives in one burst."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server running? "
                        f"choose another port with --port") from None
    return sock


@contextmanager
def serving_in_thread(app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, start_timeout_s: float = 30) -> Iterator[str]:
    """`app` served by uvicorn from a background thread while the block runs; yields the base URL. For tests
    and benchmarks/serve_load.py (`serve` runs uvicorn in the main thread, where Ctrl-C reaches it)."""
    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {start_timeout_s} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()


def usage_lines(url: str, model_id: str) -> str:
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Tom had 3 apples. He found 4 more. "
                                                                                     "How many apples did he have?"}],
                       "stream": True})
    return (f"  curl -N {url}/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
            f"  python: OpenAI(base_url=\"{url}\", api_key=\"unused\").chat.completions.create(model=\"{model_id}\", "
            f"messages=[...], stream=True)")


def serve(servable: ServableModel, host: str, port: int, say: Callable[[str], None]) -> None:
    """Serve `servable` until Ctrl-C (KeyboardInterrupt reaches the caller after a graceful shutdown)."""
    if not is_loopback(host):
        say(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use the model "
            f"(there is no authentication)")
    model, tok = load(servable)
    try:
        engine = Engine(model)
    except ValueError as exc:
        raise UserError(f"{servable.name} cannot be served by the paged engine: {exc}") from None
    sock = bind(host, port)
    app = build_app(engine, tok, (servable.name, servable.model_id), int(servable.finished_at.timestamp()))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/v1"
    say(f"serving {servable.name} ({servable.preset} run of {servable.finished_at:%Y-%m-%d %H:%M} UTC, context "
        f"{model.cfg.block_size} tokens) at {url}\n{usage_lines(url, servable.name)}\nCtrl-C stops it.")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    # uvicorn stops on SIGINT even where the process started with it ignored (a shell without job control
    # starts background jobs so), then re-raises it into that ignored disposition and returns: the server would
    # end with exit 0 and no word. With Python's own handler the re-raised SIGINT is the KeyboardInterrupt the
    # caller reports ("server stopped", exit 130), however the server was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    uvicorn.Server(config).run(sockets=[sock])
