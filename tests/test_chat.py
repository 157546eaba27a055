"""inference's chat side: the multi-turn template against core's one-turn template, the streamed text
against one decode of the whole reply (byte-fallback characters, stop strings held back), the dropping of
old exchanges, the choice of the learner's model from the run index, and `run.py --chat` itself: one
answer with --prompt and a conversation through a pseudo-terminal (pexpect), each reply equal to
Transformer.generate's greedy continuation of the conversation so far. The last test chats with the toy
chain's grpo model. Tiny random models stand in for trained ones everywhere else (tiny_chat_model)."""
from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pexpect
import pytest
import torch

import run
from core.data.chat import prompt_ids
from core.data.corpus import generate_stories
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.errors import UserError
from core.nn.model import Transformer, load_model, save_model, scaled_config
from core.paths import ROOT
from core.registry import discover
from core.run_context import MODEL_DIR, output_link
from post_train.systems.inference.code.chat import ReplyText, conversation_ids, fit_context, stop_ids
from post_train.systems.inference.code.models import choose_model, servable_models

pytestmark = pytest.mark.usefixtures("one_thread", "one_thread_for_the_module")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- shared with tests/test_serve.py ------------------------------------------------------------------
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(train_sentencepiece(generate_stories(300, seed=0), 512))


def tiny_chat_model(tok: Tokenizer, block_size: int = 96, seed: int = 0) -> Transformer:
    """Random weights that still answer like a model: the projections scaled x10, so that attention (and
    so the prompt) changes the greedy reply; the LM head's rows of byte-fallback, control and role tokens
    zeroed, so greedy text is printable (the other logits' maximum is positive); the stop tokens' rows
    x1.5, so some greedy replies end with a stop token within a few tokens and others run to max_tokens."""
    torch.manual_seed(seed)
    model = Transformer(scaled_config("gqa", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_embd=32,
                                      n_head=4, tie_embeddings=False))
    ends, specials = list(stop_ids(tok)), set(tok.special_ids.values())
    unprintable = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i) or tok.sp.is_control(i)
                   or tok.sp.is_unknown(i) or (i in specials and i not in ends)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(10)
        model.lm_head.weight[unprintable] = 0
        model.lm_head.weight[ends] *= 1.5
    return model.eval()


def greedy_reply(model: Transformer, tok: Tokenizer, prompt: list[int], max_tokens: int) -> tuple[str, int, str]:
    """The independent reference: (text, completion tokens, finish reason) of Transformer.generate's greedy
    continuation, cut before the first stop token (which is not counted)."""
    out = model.generate(torch.tensor([prompt]), max_tokens, temperature=0)[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop_ids(tok)), None)
    return (tok.decode(out), len(out), "length") if cut is None else (tok.decode(out[:cut]), cut, "stop")


def index_runs(workdir: Path, runs: dict[tuple[str, str], tuple[Transformer, Tokenizer, datetime]]) -> None:
    """A run index whose (module, preset) entries left these models, as the modules' runs leave them."""
    registry = discover()
    index: dict = {}
    for (name, preset), (model, tok, finished) in runs.items():
        folder = output_link(registry.get(name), preset)
        save_model(model, folder / MODEL_DIR)
        tok.save(folder / MODEL_DIR)
        index.setdefault(name, {})[preset] = {
            "run_id": f"{name}-{preset}", "finished_at": finished.isoformat(), "wall_time_s": 1.0, "status": "passed",
            "checks_passed": 1, "checks_total": 1, "out_dir": str(folder.relative_to(workdir))}
    (workdir / "output").mkdir(exist_ok=True)
    (workdir / "output" / "run_index.json").write_text(json.dumps(index))


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread_for_the_module():
    """conftest's one_thread for the module-scoped fixtures too (tiny models, and the server's engine thread,
    which runs under the process-wide torch thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return tiny_chat_model(tok)


NOW = datetime(2026, 1, 2, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def trained(workdir, tok, model):
    """A work dir with a base (nanogpt, the newest run) and two aligned models (sft, and grpo at two presets)."""
    other = tiny_chat_model(tok, seed=1)
    index_runs(workdir, {("nanogpt", "toy"): (other, tok, NOW), ("sft", "toy"): (other, tok, NOW - timedelta(hours=3)),
                         ("grpo", "toy"): (model, tok, NOW - timedelta(hours=1)),
                         ("grpo", "default"): (other, tok, NOW - timedelta(hours=2))})
    return workdir


# --- the template and the streamed text ------------------------------------------------------------------
def test_one_turn_is_cores_template_and_more_turns_follow_it(tok):
    assert conversation_ids(tok, [("user", "How many apples?")]) == prompt_ids(tok, "How many apples?")
    s, end = tok.special_ids, tok.special_ids["<|end|>"]
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Count to 3.")]
    assert conversation_ids(tok, turns) == [
        tok.eos_id, s["<|system|>"], *tok.encode("Be brief."), end, s["<|user|>"], *tok.encode("Hi"), end,
        s["<|assistant|>"], *tok.encode("Hello."), end, s["<|user|>"], *tok.encode("Count to 3."), end, s["<|assistant|>"]]
    with pytest.raises(ValueError):
        conversation_ids(tok, turns[:3])


TEXTS = ["Once upon a time, a fox named Tom found 12 red apples.", "naïve café, 你好 ☃ — ok", "a\nb  c"]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "byte-fallback", "whitespace"])
def test_streamed_pieces_add_up_to_one_decode_and_never_show_half_a_character(tok, text):
    ids = tok.encode(text)
    assert text != TEXTS[1] or sum(tok.sp.is_byte(i) for i in ids) > 10, "multi-byte characters as fallback bytes"
    reply = ReplyText(tok)
    pieces = [reply.add(i) for i in ids] + [reply.finish()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_stop_string_is_cut_and_its_start_never_shown(tok):
    text = "The fox ran to the river. The answer is 7. Then it slept."
    ids = tok.encode(text)
    reply = ReplyText(tok, stop=["The answer", "zzz"])
    shown = ""
    for i in ids:
        shown += reply.add(i)
        assert "The a" not in shown and not shown.endswith(" The"), "a possible stop string is held back"
        if reply.stopped:
            break
    assert reply.stopped and shown + reply.finish() == "The fox ran to the river. "
    assert reply.add(ids[-1]) == "", "nothing after the stop"
    held = ReplyText(tok, stop=["The answer"])
    assert "".join(held.add(i) for i in tok.encode("He went. The")) == "He went. " and held.finish() == "The", \
        "at the end, a tail that only began the stop string is shown"


def test_the_oldest_exchanges_go_first_when_the_context_is_full(tok):
    turns = [("user", f"question number {k} about the fox") if j == 0 else ("assistant", f"answer number {k}")
             for k in range(4) for j in range(2)] + [("user", "and the last one?")]
    full = len(conversation_ids(tok, turns))
    budget = 10
    for context in (full + budget, full + budget - 1, len(conversation_ids(tok, turns[-1:])) + budget):
        ids, dropped = fit_context(tok, turns, context, budget)
        assert ids == conversation_ids(tok, turns[2 * dropped:]) and len(ids) + budget <= context
        one_fewer = conversation_ids(tok, turns[2 * dropped - 2:])
        assert dropped == 0 or len(one_fewer) + budget > context, "dropped no more than needed"
    assert fit_context(tok, turns, full + budget - 1, budget)[1] == 1
    assert fit_context(tok, turns, 5, budget) == (conversation_ids(tok, turns[-1:]), 4), "the newest message stays"


# --- which model -------------------------------------------------------------------------------------------
def test_the_newest_aligned_model_is_the_default_and_a_name_picks_its_newest_preset(trained):
    models = servable_models()
    assert [(s.name, s.preset, s.aligned) for s in models] == [
        ("nanogpt", "toy", False), ("grpo", "toy", True), ("grpo", "default", True), ("sft", "toy", True)]
    assert (choose_model(None).name, choose_model(None).preset) == ("grpo", "toy"), "the newer base is not aligned"
    assert choose_model("grpo:default").preset == "default" and choose_model("sft").model_id == "sft:toy"
    with pytest.raises(UserError, match=r"no trained model 'grpp'\. Did you mean: grpo.*Available: grpo, grpo:default"):
        choose_model("grpp")


def test_only_the_base_is_served_with_a_note_and_nothing_trained_is_one_line(workdir, tok, model, capsys):
    assert run.main(["--chat", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == ("error: no trained language model in the run index yet: train one "
                                               "first (python run.py --module sft --toy)")
    index_runs(workdir, {("nanogpt", "toy"): (model, tok, NOW)})
    said = []
    assert choose_model(None, say=said.append).name == "nanogpt"
    assert len(said) == 1 and "only the pretrained base nanogpt" in said[0] and "python run.py --module sft --toy" in said[0]


# --- run.py --chat ---------------------------------------------------------------------------------------
def test_prompt_prints_the_greedy_answer_of_the_default_model(trained, tok, model, capsys):
    assert run.main(["--chat", "--prompt", "Tell me about the fox.", "--temperature", "0", "--max-tokens", "20"]) == 0
    expected, _, _ = greedy_reply(model, tok, conversation_ids(tok, [("user", "Tell me about the fox.")]), 20)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("argv, words", [
    (["--chat", "--port", "9000"], "--chat runs alone"),
    (["--serve", "--prompt", "hi"], "--serve runs alone"),
    (["--chat", "--module", "sft"], "--chat runs alone"),
    (["--chat", "--temperature", "3"], "expected a value in [0, 2]"),
    (["--chat", "--model", "nope", "--prompt", "hi"], "no trained model 'nope'"),
], ids=["serve-flag", "chat-flag", "with-module", "temperature", "unknown-model"])
def test_bad_chat_and_serve_flags_are_one_line_and_exit_2(trained, capsys, argv, words):
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_a_conversation_through_a_terminal(trained, tok, model):
    """Each reply continues the whole conversation so far; /reset forgets it; when the 96-token context
    fills, the oldest exchange is dropped (and the reply continues what is left); Ctrl-D leaves with 0."""
    child = pexpect.spawn(sys.executable, [str(ROOT / "run.py"), "--chat", "--temperature", "0", "--max-tokens", "12"],
                          cwd=str(ROOT), env={**os.environ, "TERM": "dumb", "FINETUNE_WORKDIR": str(trained)},
                          dimensions=(50, 400), encoding="utf-8", timeout=60)
    turns: list[tuple[str, str]] = []
    replies: list[str] = []

    def say(message: str) -> str:
        child.expect_exact("you> ")
        child.sendline(message)
        child.expect_exact("grpo> ")
        shown = ANSI.sub("", child.before)
        child.expect_exact("\r\n")
        return shown, child.before

    def check_reply(message: str) -> str:
        turns.append(("user", message))
        shown, reply = say(message)
        ids, dropped = fit_context(tok, turns, model.cfg.block_size, 12)
        del turns[:2 * dropped]
        expected, _, _ = greedy_reply(model, tok, ids, min(12, model.cfg.block_size - len(ids)))
        assert reply == expected
        turns.append(("assistant", reply))
        replies.append(reply)
        return shown

    check_reply("Tell me about the fox.")
    check_reply("And the river?")
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    turns.clear()
    notes = [check_reply(f"Question {k}: what did the fox find?") for k in range(6)]
    assert not any("dropped" in n for n in notes[:2]) and any("dropped the oldest 1 exchange" in n for n in notes)
    assert sum(bool(r) for r in replies) >= 4, "most replies say something (a reply may also stop at once)"
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.toy_chain
def test_run_py_chat_answers_with_the_chains_grpo_model(request, workdir):
    request.getfixturevalue("toy_chain").copy_to(workdir)
    question = "Tom had 3 apples. He found 4 more. How many apples did he have?"
    result = pexpect.run(f"{sys.executable} run.py --chat --temperature 0 --prompt {json.dumps(question)}", cwd=str(ROOT),
                         env={**os.environ, "FINETUNE_WORKDIR": str(workdir)}, withexitstatus=True, timeout=120,
                         encoding="utf-8")
    output, status = result
    served = choose_model(None)
    folder = output_link(discover().get("grpo"), "toy") / MODEL_DIR
    assert (served.name, served.folder) == ("grpo", folder)
    model, tok = load_model(folder).eval(), Tokenizer.load(folder)
    expected, _, reason = greedy_reply(model, tok, conversation_ids(tok, [("user", question)]), 64)
    assert status == 0 and output.replace("\r\n", "\n") == expected + "\n"
    assert reason == "stop" and "7" in expected, "the chain's chat model answers and closes its turn"
