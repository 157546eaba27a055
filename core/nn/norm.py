"""RMSNorm, shared by the transformer blocks (core/nn/model.py) and MLA's low-rank latents
(core/nn/attention.py); it lives apart so that neither file imports the other."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _RMSNormFunction(torch.autograd.Function):
    """Forward and backward written out: autograd through pow/mean/rsqrt/mul keeps two full-size
    temporaries and sums two gradient paths into x, about twice the passes over the activations, and
    nine norms per step of the default model made that a measurable share of a CPU training step.

    With n = x * r, r = 1 / sqrt(mean(x^2) + eps), y = g * n and upstream gradient dy:
        dL/dg = sum over tokens of dy * n
        dL/dx = r * (dy g - n * mean(dy g * n))        (the projection of dy g off n, scaled by r)
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # statistics in float32 at least, so bf16 activations do not lose the mean of squares
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean_square = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x.shape[-1]
        rstd = torch.rsqrt(mean_square + eps)
        normed = x32 * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        normed, rstd, weight = ctx.saved_tensors
        grad32 = grad.to(normed.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad32 * weight.to(normed.dtype)
            mean_dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = torch.addcmul(grad_normed, normed, mean_dot, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad32 * normed).flatten(0, -2).sum(0)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, Eq. 4): y = x / sqrt(mean(x^2) + eps) * g, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)
