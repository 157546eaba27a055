"""RMSNorm, shared by the transformer blocks (core/nn/model.py) and MLA's low-rank latents
(core/nn/attention.py); it lives apart so that neither file imports the other."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, Eq. 4): y = x / sqrt(mean(x^2) + eps) * g, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # statistics in float32 at least, so bf16 activations do not lose the mean of squares
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
