"""The chat template of every post-trained model here, on the tokenizer's special tokens:

    <eos> <|user|> instruction <|end|> <|assistant|> response <|end|>
    '---------------- prompt ----------------------'  '--- loss ---'

The leading <eos> is the document boundary every pretraining story follows (core/data/corpus.py
packs documents as "... <eos> story <eos> ..."), so a chat starts where a story would. The loss of
supervised fine-tuning covers the response and its closing <|end|>: the model learns to answer and
to stop, never to predict the user's words.
"""
from __future__ import annotations

from typing import Sequence

from core.data.tokenizer import Tokenizer


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
