"""The chat template of every post-trained model here, on the tokenizer's special tokens:

    <eos> <|user|> instruction <|end|> <|assistant|> response <|end|>
    '---------------- prompt ----------------------'  '--- loss ---'

The leading <eos> is the document boundary every pretraining story follows (core/data/corpus.py
packs documents as "... <eos> story <eos> ..."), so a chat starts where a story would. The loss of
supervised fine-tuning covers the response and its closing <|end|>: the model learns to answer and
to stop, never to predict the user's words.

The demonstrations of the chain (`demonstrations`, `chat_examples`) live here too, so that full SFT
(sft) and LoRA / QLoRA SFT (peft) train on the very same conversations.
"""
from __future__ import annotations

from typing import Sequence

import torch

from core.data.tokenizer import Tokenizer
from core.data.word_problems import generate_problems, story_examples
from core.errors import UserError


def prompt_ids(tok: Tokenizer, instruction: str) -> list[int]:
    """The prompt up to and including <|assistant|>: what generation continues from."""
    s = tok.special_ids
    return [tok.eos_id, s["<|user|>"], *tok.encode(instruction), s["<|end|>"], s["<|assistant|>"]]


def chat_example(tok: Tokenizer, instruction: str, response: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): the whole conversation, and 1 on the response tokens and the closing <|end|>."""
    prompt = prompt_ids(tok, instruction)
    answer = [*tok.encode(response), tok.special_ids["<|end|>"]]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def response_text(tok: Tokenizer, generated: Sequence[int]) -> str:
    """Decode generated ids up to (not including) the first <|end|>."""
    end = tok.special_ids["<|end|>"]
    ids = list(generated)
    return tok.decode(ids[:ids.index(end)] if end in ids else ids)


def demonstrations(n_problems: int, tiers: tuple[int, ...], seed: int, verifiable_fraction: float,
                   story_fraction: float) -> list[tuple[str, str]]:
    """(instruction, response) pairs: word problems with a worked answer that ends in "The answer is N."
    for a `verifiable_fraction` of them and in a plain sentence otherwise (drawn with its own seed),
    then round(story_fraction * n_problems) story requests."""
    problems = generate_problems(n_problems, tiers, seed, "train")
    plain = torch.rand(len(problems), generator=torch.Generator().manual_seed(seed + 3)) >= verifiable_fraction
    pairs = [(p.question, p.plain_solution if d else p.solution) for p, d in zip(problems, plain.tolist())]
    return pairs + story_examples(round(story_fraction * n_problems), seed)


def chat_examples(tok: Tokenizer, pairs: list[tuple[str, str]], block_size: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(ids, loss masks, dropped): every conversation of `pairs` that fits the context."""
    ids, masks = [], []
    for instruction, response in pairs:
        seq, mask = chat_example(tok, instruction, response)
        if len(seq) <= block_size:
            ids.append(seq)
            masks.append(mask)
    if not ids:
        raise UserError(f"no training conversation fits block_size {block_size}")
    return ids, masks, len(pairs) - len(ids)
