"""Pieces every language-model training loop here shares: the AdamW parameter groups, the warmup +
cosine learning-rate schedule. (The torchrun process group is the platform's: core/distributed.py.)

    groups = adamw_groups(model, weight_decay=0.1)     # decay matrices, not norms/biases/embeddings
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95))
    lr = cosine_lr(step, peak, warmup, total_steps, min_ratio=0.1)
"""
from __future__ import annotations

import math

from torch import nn


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: the weight matrices of linear layers get decoupled weight decay
    (Loshchilov & Hutter 2019, theta <- theta - lr * wd * theta); everything else gets none: norm
    gains, biases, embedding tables and learned position tables such as NSA's intra-block positions.
    Decaying a norm gain pulls it towards 0 (it should stay near 1), and decaying an embedding or a
    position table shrinks the rows that few gradient updates push back. The rule is "a linear layer's
    weight", not "any 2-D tensor", so a table added later is not decayed by accident.
    A tied embedding is also the LM head: it counts as an embedding (GPT-2/nanoGPT decay it,
    Llama-style recipes do not; we follow the latter)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if id(p) in matrices else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """The learning rate of step `step` in 0 .. total - 1: linear warmup that reaches `peak` at step
    warmup - 1, then a cosine that starts there and reaches min_ratio * peak at the last step:
        lr(s) = peak (s+1)/warmup                                     s < warmup
        lr(s) = peak (m + (1-m) (1 + cos(pi p)) / 2),  p = (s - s_0) / (total - 1 - s_0)   otherwise
    with s_0 = max(warmup - 1, 0) the peak step, so the peak is used once and the last step uses the
    floor exactly (a cosine over total - warmup steps would hold the peak for two steps and stop
    one step short of the floor)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    peak_step = max(warmup - 1, 0)
    progress = min(1.0, (step - peak_step) / max(1, total - 1 - peak_step))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
