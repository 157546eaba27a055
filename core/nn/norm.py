"""RMSNorm, shared by the transformer blocks (core/nn/model.py) and MLA's low-rank latents
(core/nn/attention.py); it lives apart so that neither file imports the other."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class _RMSNormFunction(torch.autograd.Function):
    """Forward and backward written out: autograd through pow/mean/rsqrt/mul keeps two full-size
    temporaries and sums two gradient paths into x, about twice the passes over the activations, and
    nine norms per step of the default model made that a measurable share of a CPU training step.

    With r = 1 / sqrt(mean(x^2) + eps), y = g * x * r and upstream gradient dy:
        dL/dg = sum over tokens of dy * x * r          (a (1, N) x (N, d) product over the tokens)
        dL/dx = r * dy g - x * r^3 * <dy g, x> / d     (the projection of dy g off x, scaled by r)
    Only x and r are kept (not the normalised x: one full-size tensor less), and the two reductions
    run as a dot product per token and a matrix product, not as separate multiply-then-sum passes."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # statistics in float32 at least, so bf16 activations do not lose the mean of squares
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean_square = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        rstd = mean_square.add_(eps).rsqrt_()
        ctx.save_for_backward(x32, rstd, weight)
        return (x32 * rstd).mul_(weight.to(x32.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight.to(x.dtype)
            coef = torch.linalg.vecdot(grad_normed, x).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = grad_normed.mul_(rstd).addcmul_(x, coef, value=-1)
        if ctx.needs_input_grad[1]:
            grad_weight = (rstd.flatten().unsqueeze(0) @ (grad * x).flatten(0, -2)).squeeze(0).to(weight.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, Eq. 4): y = x / sqrt(mean(x^2) + eps) * g, no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)
