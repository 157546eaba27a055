"""Load on the OpenAI-compatible server: N concurrent streaming clients on loopback for S seconds each.

    python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--model grpo | --url URL] [--record]
    python benchmarks/serve_load.py --clients 1,4,16 --seconds 20      # a sweep: throughput vs concurrency

Without --url the server starts in this process (uvicorn and the engine in their own threads, as
`run.py --serve` runs them) on a free port, serving the learner's newest post-trained model or --model.
Each client is an asyncio task with httpx that sends streamed chat completions (held-out word problems,
temperature 0.7, max_tokens 48) one after the other until the S seconds are over; a request under way
then finishes and counts. Per request: latency (request to [DONE]), time to first token (TTFT: request to
the first chunk with text or a finish reason) and time per output token after it (TPOT). A request
errs when its status is not 200, the connection fails or the stream ends without [DONE]; any error makes
the exit status 1. With an in-process server the table also shows the mean decode batch (tokens per
batched decode step: what continuous batching made of the concurrency) and the engine alone on the same
kind of requests with max_running = clients, no HTTP (`Engine.generate`): what the server keeps of the
engine's rate. The load generator shares the process and its 2 cores with the server: on a small CPU the
HTTP side (a JSON chunk and an SSE frame per token, both ends) costs as much as the model. Figures vary with
the machine and its load: compare the rows of one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import cli  # noqa: E402
from core.data.word_problems import TIERS, generate_problems  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.results import record_benchmark  # noqa: E402
from post_train.systems.inference.code.chat import conversation_ids, stop_ids  # noqa: E402
from post_train.systems.inference.code.engine import Engine, SamplingParams  # noqa: E402
from post_train.systems.inference.code.models import choose_model, load  # noqa: E402
from post_train.systems.inference.code.serve import build_app, serving_in_thread  # noqa: E402

TEMPERATURE, MAX_TOKENS = 0.7, 48


@dataclass
class Request:
    start: float
    first: float | None
    end: float
    tokens: int
    error: str | None


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Request:
    start, first, tokens, done, error = time.perf_counter(), None, 0, False, None
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if error or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                choice = chunk["choices"][0] if chunk["choices"] else {}
                if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and not done:
        error = "the stream ended without [DONE]"
    return Request(start, first, time.perf_counter(), tokens, error)


async def drive(url: str, model_id: str, clients: int, seconds: float, questions: list[str]) -> tuple[list[Request], float]:
    """Every request of `clients` looping clients over `seconds`, and the wall time until the last ended."""
    done: list[Request] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = {"model": model_id, "messages": [{"role": "user", "content": questions[i % len(questions)]}],
                    "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "seed": i, "stream": True,
                    "stream_options": {"include_usage": True}}
            done.append(await one_request(client, url, body))
            i += clients

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=max(60.0, seconds), limits=limits) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
    return done, time.perf_counter() - start


def engine_alone(model, tok, questions: list[str], clients: int) -> float:
    """Tokens/s of the engine by itself on the same kind of requests, `clients` sequences at a time
    (max_running): the ceiling the server is read against (stop tokens not counted, as in usage)."""
    engine, stops = Engine(model, max_running=clients), stop_ids(tok)
    prompts = [conversation_ids(tok, [("user", q)]) for q in questions[:max(4 * clients, 32)]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=TEMPERATURE, stop_token_ids=stops, seed=0)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return sum(t not in stops for out in outputs for t in out) / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics; nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if q < 100 else max(values)


def summary(clients: int, requests: list[Request], wall: float, decode_batch: float | None) -> dict:
    ok = [r for r in requests if r.error is None]
    latency = [r.end - r.start for r in ok]
    ttft = [r.first - r.start for r in ok if r.first is not None]
    tpot = [(r.end - r.first) / (r.tokens - 1) for r in ok if r.first is not None and r.tokens > 1]
    return {"clients": clients, "requests": len(requests), "errors": len(requests) - len(ok),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r.tokens for r in ok) / wall,
            "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_ms": 1000 * percentile(tpot, 50), "mean_decode_batch": decode_batch}


def concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not all(1 <= n <= 1024 for n in levels):
        raise argparse.ArgumentTypeError(f"client counts must be in [1, 1024], got {text!r}")
    return levels


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def main() -> int:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=concurrency_list, default=[16],
                        help="concurrent clients; a comma-separated list runs each in turn (default 16)")
    parser.add_argument("--seconds", type=positive, default=20.0, help="how long each level sends requests")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server's base URL (http://HOST:PORT/v1); default: one started here")
    target.add_argument("--model", help="the model an in-process server serves (default: the newest post-trained one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of an in-process engine")
    parser.add_argument("--record", action="store_true",
                        help="also write the table to assets/results/benchmarks/serve_load.json (README figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    questions = [p.question for p in generate_problems(64, TIERS, seed=0, split="held_out")]
    if args.url:
        url, engine_reader = args.url.rstrip("/"), None
        try:
            model_id = httpx.get(f"{url}/models").json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise UserError(f"no OpenAI-compatible server answers GET {url}/models ({exc})") from None
        label = model_id
        server = nullcontext(url)
    else:
        servable = choose_model(args.model)
        model, tok = load(servable)
        app = build_app(Engine(model), tok, (servable.name, servable.model_id))
        worker, model_id, label = app.state.worker, servable.name, servable.model_id
        engine_reader = lambda read: worker.inspect(read).result(60)  # noqa: E731
        server = serving_in_thread(app)
        print(f"serving {servable.name} ({servable.preset} run) in this process, {args.threads} torch thread(s)")
    rows = []
    with server as url:
        asyncio.run(drive(url, model_id, 1, 0.01, questions))  # warm-up: the first request's one-off costs
        for clients in args.clients:
            before = engine_reader((lambda e: (e.decode_steps, e.prefills))) if engine_reader else None
            requests, wall = asyncio.run(drive(url, model_id, clients, args.seconds, questions))
            batch = None
            if engine_reader:
                steps, prefills = (a - b for a, b in zip(engine_reader(lambda e: (e.decode_steps, e.prefills)), before))
                # each request's first token comes from its prefill, the others from batched decode steps
                batch = (sum(r.tokens for r in requests) - prefills) / max(steps, 1)
            rows.append({"model": label, **summary(clients, requests, wall, batch)})
            if engine_reader:
                rows[-1]["engine_alone_tokens_per_s"] = alone = engine_alone(model, tok, questions, clients)
                rows[-1]["server_vs_engine"] = rows[-1]["tokens_per_s"] / alone
            for r in requests:
                if r.error:
                    print(f"error ({clients} clients): {r.error}", file=sys.stderr)
    if rows[0]["clients"] == 1:
        for row in rows:  # what concurrency buys, read against one client alone on the same server
            row["tokens_per_s_vs_1_client"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    print_table(rows, label, args.seconds, url)
    if args.record:
        print("recorded:", record_benchmark("serve_load", " ".join(["python", *sys.argv]), ["inference"], rows))
    return 1 if any(row["errors"] for row in rows) else 0


def print_table(rows: list[dict], label: str, seconds: float, url: str) -> None:
    table = Table(title=f"{label} behind {url}: streamed chat completions, {seconds:g} s per level, "
                        f"max_tokens {MAX_TOKENS}, temperature {TEMPERATURE}")
    columns = ("clients", "requests", "errors", "req/s", "tokens/s", "x 1 client", "latency p50 s", "latency p99 s",
               "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "mean decode batch", "engine alone tok/s", "server / engine")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        def cell(key: str, digits: int) -> str:
            return "-" if r.get(key) is None else f"{r[key]:.{digits}f}"
        table.add_row(str(r["clients"]), str(r["requests"]), str(r["errors"]), cell("requests_per_s", 2),
                      cell("tokens_per_s", 1), cell("tokens_per_s_vs_1_client", 2), cell("latency_p50_s", 3),
                      cell("latency_p99_s", 3), cell("ttft_p50_s", 3), cell("ttft_p99_s", 3), cell("tpot_p50_ms", 1),
                      cell("mean_decode_batch", 1), cell("engine_alone_tokens_per_s", 1), cell("server_vs_engine", 2))
    cli.Console().print(table)


if __name__ == "__main__":
    sys.exit(cli.guard(main, cli.crash_log("serve_load")))
