"""Batches of variable-length token sequences for a causal LM, and their per-token log-probs.

Two layouts, for two jobs:
    left-padded    [pad pad p1 p2 p3]       prompts for batched generation: every row's next token
                                             goes in the same column; the pads are masked as keys
    right-padded   [p1 p2 p3 r1 r2 pad]     training and scoring: a causal model never looks right,
                                             so trailing pads change no real token's logits

Log-probs come from shifted logits. The logits at position t predict token t + 1, so

    log pi(x_t | x_<t) = log_softmax(logits[:, t - 1])[x_t]         t = 1 .. T - 1

`token_logprobs` returns (B, T - 1) with column j holding the log-prob of token j + 1; a mask over
tokens is shifted the same way (`mask[:, 1:]`). `sequence_logprobs` sums them over a response mask:
log pi(y | x) = sum_t log pi(y_t | x, y_<t), the quantity DPO, ORPO and the reward model compare. Reading the log-prob of x_t from logits[:, t] (the
position that has already seen x_t) is the off-by-one bug this function exists to rule out.

`sft_loss` is the supervised fine-tuning loss on a right-padded batch, shared by full SFT (sft) and
LoRA / QLoRA SFT (peft).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids (B, T), mask (B, T) bool, True on real tokens), each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = True
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_value: int) -> Tensor:
    """(B, T) long, each row left-aligned and filled with pad_value on the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """logits (B, T, V) of the model run on ids (B, T) -> (B, T - 1): log pi(ids[:, t] | ids[:, <t])
    for t = 1 .. T - 1, taken from the logits at t - 1."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or over everything); 0 where nothing is masked in."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logprobs(logits: Tensor, ids: Tensor, response_mask: Tensor, mean: bool = False) -> Tensor:
    """(B,): log pi(response | prompt) summed over the tokens where `response_mask` (B, T) is true,
    or averaged over them with `mean` (ORPO's length-normalised log-prob). The mask is over tokens of
    `ids` and is shifted here with the log-probs, so the caller marks response tokens where they sit."""
    mask = response_mask[:, 1:].to(torch.float32)
    total = (token_logprobs(logits, ids) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


def sft_loss(model: nn.Module, ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the masked-in target tokens of a right-padded batch.
    Inputs are ids[:, :-1], targets ids[:, 1:], so the mask is shifted the same way."""
    logits = model(ids[:, :-1])
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view_as(ids[:, 1:])
    mask = loss_mask[:, 1:].to(ce.dtype)
    return (ce * mask).sum() / mask.sum()
