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
    """Two AdamW parameter groups: 2-D+ weights of linear layers get decoupled weight decay
    (Loshchilov & Hutter 2019, theta <- theta - lr * wd * theta); norm gains, biases and embedding
    tables get none. Decaying a norm gain pulls it towards 0 (it should stay near 1), and decaying
    an embedding shrinks the rows of rare tokens, which get few gradient updates to push back.
    A tied embedding is also the LM head: it counts as an embedding (GPT-2/nanoGPT decay it,
    Llama-style recipes do not; we follow the latter)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to min_ratio * peak at `total`:
        lr(s) = peak (s+1)/warmup                                          s < warmup
        lr(s) = peak (m + (1-m) (1 + cos(pi (s-warmup)/(total-warmup))) / 2)   otherwise"""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
