"""Sampling many responses from a causal LM at once: prompts of different lengths, left-padded into one
KV-cached `generate` call (core/nn/model.py), each response cut after its stop token.

    responses = sample_responses(model, prompts, n=8, max_new_tokens=40, temperature=1.0,
                                 stop_token=end_id, pad_id=pad_id, generator=g)
    responses[i * n + j]   the j-th sample of prompt i: token ids, ending in stop_token unless cut

`answer` does the same for chat questions: the chat template around each question, responses
decoded up to <|end|>.

Rows are processed `batch_rows` at a time: one generate call per chunk (a GRPO step with 8 prompts
and G = 8 is one call of 64 rows), so memory stays bounded at evaluation sizes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from core.data.chat import prompt_ids, response_text
from core.data.tokenizer import Tokenizer
from core.nn.model import Transformer
from core.nn.sequences import left_pad


@torch.no_grad()
def sample_responses(model: Transformer, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                     temperature: float, stop_token: int, pad_id: int, generator: torch.Generator | None = None,
                     top_k: int | None = None, batch_rows: int = 256) -> list[list[int]]:
    """n responses per prompt (prompt-major order); temperature 0 is greedy (then n > 1 repeats)."""
    rows = [list(p) for p in prompts for _ in range(n)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        ids, mask = left_pad(chunk, pad_id)
        budget = min(max_new_tokens, model.cfg.block_size - ids.shape[1])
        if budget < 1:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens leaves no room in block_size {model.cfg.block_size}")
        full = model.generate(ids.to(device), budget, temperature=temperature, top_k=top_k, generator=generator,
                              prompt_mask=mask.to(device), stop_token=stop_token)
        for row in full[:, ids.shape[1]:].tolist():
            out.append(row[:row.index(stop_token) + 1] if stop_token in row else row)
    model.train(was_training)
    return out


def answer(model: Transformer, tok: Tokenizer, questions: Sequence[str], max_new_tokens: int, n: int = 1,
           temperature: float = 0.0, generator: torch.Generator | None = None) -> list[str]:
    """n decoded responses per question (question-major), greedy by default."""
    prompts = [prompt_ids(tok, q) for q in questions]
    ids = sample_responses(model, prompts, n, max_new_tokens, temperature, stop_token=tok.special_ids["<|end|>"],
                           pad_id=tok.pad_id, generator=generator)
    return [response_text(tok, r) for r in ids]
