"""`python run.py --chat`: talk to a model the learner trained, in the terminal, a token at a time.

The conversation is kept in the chat template the models were fine-tuned on (core/data/chat.py), one
turn after the other behind the leading <eos>:

    <eos> <|user|> u1 <|end|> <|assistant|> a1 <|end|> <|user|> u2 <|end|> <|assistant|>  -> the reply

(one user turn is exactly core.data.chat.prompt_ids; sft and grpo only ever saw one turn, so a long
conversation is beyond what they learned, and the base model never saw the template at all). When the
conversation and the reply budget no longer fit the context, the oldest exchanges are dropped, and a dim
line says so. Replies come from the paged engine (engine.py) one step at a time: after each token the
whole reply is decoded again and only the new end of the text is printed, because sentencepiece pieces
do not decode one by one (a byte-fallback character needs all its bytes, "▁" becomes the space before
the next piece). A reply ends at <|end|> (or <eos>: the end of a document) or at --max-tokens.

    /reset    forget the conversation          /exit, Ctrl-D    leave (status 0)
    Ctrl-C    stops a reply that is streaming; at the prompt, leaves (status 130)
    --prompt TEXT    one answer, printed, then exit (no conversation): the scriptable path
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from rich.console import Console

from core.cli import INTERRUPTED, OK
from core.data.chat import prompt_ids
from core.data.tokenizer import Tokenizer
from core.errors import UserError

from .engine import Engine, SamplingParams
from .models import ServableModel, load

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
DEFAULT_TEMPERATURE = 0.7
"""chat's default: below 1 the small models ramble less, above 0 two tries give two answers"""
DEFAULT_MAX_TOKENS = 64
"""chat's default reply budget: a worked word-problem answer of the chain takes about 30-40 tokens"""


# --- the template -----------------------------------------------------------------------------------
def conversation_ids(tok: Tokenizer, turns: Sequence[tuple[str, str]]) -> list[int]:
    """The prompt a reply continues: every (role, text) turn in the template, the last one the user's."""
    if not turns or turns[-1][0] != "user":
        raise ValueError("a conversation ends with a user turn")
    end = tok.special_ids["<|end|>"]
    history = [i for role, text in turns[:-1] for i in (tok.special_ids[ROLE_TOKENS[role]], *tok.encode(text), end)]
    last = prompt_ids(tok, turns[-1][1])  # <eos> <|user|> text <|end|> <|assistant|>
    return [last[0], *history, *last[1:]]


def stop_ids(tok: Tokenizer) -> tuple[int, int]:
    """What ends a reply: the end of a turn, or of a document (a base model's story ends there)."""
    return tok.special_ids["<|end|>"], tok.eos_id


def fit_context(tok: Tokenizer, turns: list[tuple[str, str]], context: int, reply_budget: int) -> tuple[list[int], int]:
    """(prompt ids, oldest exchanges dropped) so that the prompt and `reply_budget` new tokens fit `context`;
    the newest message is never dropped (the caller sees whether any room is left for it)."""
    dropped = 0
    while True:
        ids = conversation_ids(tok, turns[2 * dropped:])
        if len(ids) + reply_budget <= context or 2 * dropped + 1 >= len(turns):
            return ids, dropped
        dropped += 1


class ReplyText:
    """A reply's text as its tokens arrive: `add` returns the text that became safe to show. The whole
    reply is decoded every time and the new end of it is what is shown; held back are a trailing U+FFFD
    (a byte-fallback character still missing bytes) and a tail that could start one of the `stop`
    strings. The first stop string cuts the text there for good (`stopped`); `finish` shows the rest."""

    def __init__(self, tok: Tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, self.stopped, final = text[:min(cuts)], True, True
        if not final:
            text = text.rstrip("\ufffd")
            text = text[:len(text) - self._stop_prefix_at_end(text)]
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += new
        return new

    def _stop_prefix_at_end(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with (0: none)."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
                   default=0)


# --- the terminal ---------------------------------------------------------------------------------
@dataclass
class ChatSettings:
    temperature: float = DEFAULT_TEMPERATURE
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None
    """seed of the first reply's sampler (reply k: seed + k); None = different every time"""


class Stopper:
    """Ctrl-C while a reply streams: a flag the generation loop reads between engine steps (an exception
    in the middle of a step could leave the engine's block tables half updated)."""

    def __init__(self):
        self.pressed = False

    @contextmanager
    def armed(self) -> Iterator[None]:
        self.pressed = False
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "pressed", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def stream_reply(engine: Engine, tok: Tokenizer, prompt: list[int], params: SamplingParams,
                 stopper: Stopper | None = None) -> Iterator[str]:
    """The reply's text, piece by piece as the engine makes its tokens (stop tokens are not text)."""
    (seq,) = engine.add_request(prompt, params)
    reply = ReplyText(tok)
    while not seq.finished:
        if stopper is not None and stopper.pressed:
            engine.abort(seq.seq_id)
            break
        for _, token in engine.step():
            if token not in params.stop_token_ids:
                yield reply.add(token)
    yield reply.finish()


def reply_params(tok: Tokenizer, settings: ChatSettings, budget: int, turn: int) -> SamplingParams:
    seed = None if settings.seed is None else settings.seed + turn
    return SamplingParams(max_tokens=budget, temperature=settings.temperature, stop_token_ids=stop_ids(tok), seed=seed)


def answer_once(servable: ServableModel, text: str, settings: ChatSettings) -> int:
    """--prompt: the reply to one message on stdout, streamed."""
    model, tok = load(servable)
    engine = Engine(model, max_running=1)
    ids = conversation_ids(tok, [("user", text)])
    budget = min(settings.max_tokens, model.cfg.block_size - len(ids))
    if budget < 1:
        raise UserError(f"the prompt is {len(ids)} tokens in the chat template; {servable.name}'s context is "
                        f"{model.cfg.block_size} tokens, with no room left for a reply")
    for piece in stream_reply(engine, tok, ids, reply_params(tok, settings, budget, 0)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return OK


def chat(servable: ServableModel, settings: ChatSettings, console: Console) -> int:
    """The interactive loop; notes go to `console` (stderr), the conversation to stdout."""
    model, tok = load(servable)
    engine, context = Engine(model, max_running=1), model.cfg.block_size
    console.print(f"[bold]chatting with {servable.name}[/] [dim]({servable.preset} run of "
                  f"{servable.finished_at:%Y-%m-%d %H:%M} UTC, context {context} tokens, temperature "
                  f"{settings.temperature:g}, replies up to {settings.max_tokens} tokens)[/]\n"
                  "[dim]/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply[/]")
    turns: list[tuple[str, str]] = []
    stopper = Stopper()
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return OK
        except KeyboardInterrupt:
            print()
            return INTERRUPTED
        if line in ("/exit", "/quit"):
            return OK
        if line == "/reset":
            turns.clear()
            console.print("[dim](conversation cleared)[/]")
            continue
        if not line or line.startswith("/"):
            if line:
                console.print(f"[dim]unknown command {line}: /reset or /exit[/]")
            continue
        turns.append(("user", line))
        ids, dropped = fit_context(tok, turns, context, settings.max_tokens)
        budget = min(settings.max_tokens, context - len(ids))
        if budget < 1:
            turns.pop()
            console.print(f"[dim](that message takes {len(ids)} tokens in the template: no room for a reply in "
                          f"the {context}-token context; say it shorter)[/]")
            continue
        if dropped:
            del turns[:2 * dropped]
            console.print(f"[dim](the conversation outgrew the {context}-token context: dropped the oldest "
                          f"{dropped} exchange{'s' if dropped > 1 else ''})[/]")
        sys.stdout.write(f"{servable.name}> ")
        reply = ""
        with stopper.armed():
            for piece in stream_reply(engine, tok, ids, reply_params(tok, settings, budget, len(turns) // 2), stopper):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply += piece
        sys.stdout.write(" [stopped]\n" if stopper.pressed else "\n")
        turns.append(("assistant", reply))
