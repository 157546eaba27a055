"""The language-modelling loss fused with the LM head: mean cross-entropy of next tokens computed
chunk by chunk, without the (N, V) logits of the whole batch ever existing.

    loss = mean_i [ logsumexp_v (h_i . w_v) - h_i . w_{y_i} ]          (h_i hidden state, W the LM head)
    dL/dz_i = (softmax(z_i) - onehot(y_i)) / N,   z_i = W h_i
    dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T

Why: with the plain `F.cross_entropy(lm_head(h))` a training step writes and reads the logits of
every token several times (the product, log-softmax, its backward, the zero-filled target gradient):
at nanogpt's default (4,096 tokens x 4,096 vocabulary) each is a fresh 64 MB buffer, more than a CPU's
caches, and every fresh buffer is paid again in page faults. Here a chunk of rows (4 MB of
logits) goes through product, softmax and both gradient products while it sits in cache, and the
gradients are computed during the forward pass (Liger Kernel's fused linear cross-entropy, Hsu et al.
2024; Apple's Cut Cross-Entropy, Wijmans et al. 2024, does the same without storing them): backward
then only scales them by the upstream gradient. benchmarks/transformer_vs_gpt2.py measures the gain.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_NUMBERS = 2 ** 20
"""logits per chunk (4 MB in fp32): small enough to stay in a CPU's L2/L3 cache between the passes"""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, with_grad: bool) -> Tensor:
        n = hidden.shape[0]
        rows = max(1, CHUNK_NUMBERS // weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        # logits and the head's gradient sum in float32 at least (bf16 under autocast)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros_like(weight, dtype=dtype) if with_grad else None
        for start in range(0, n, rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.t()).to(dtype)                                 # z = W h
            target_logit = logits.gather(1, y[:, None]).squeeze(1)             # z_y
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()                                    # exp(z - max z), in place
            mass = probs.sum(dim=-1, keepdim=True)
            total += (top + mass.log()).sum() - target_logit.sum()            # logsumexp z - z_y
            if with_grad:
                # dL/dz = softmax(z) - onehot(y) = (exp(z - max z) - mass onehot(y)) / mass: the division
                # by the row's mass is applied to the (rows x d) products, not to the (rows x V) logits
                probs[torch.arange(len(y), device=y.device), y] -= mass.squeeze(1)
                grad_hidden[start:start + rows] = ((probs.to(weight.dtype) @ weight) / mass).to(hidden.dtype)
                grad_weight.addmm_(probs.t(), h.to(dtype) / mass)
        if with_grad:  # the 1/N of the mean, applied once to the small results instead of every logit
            ctx.save_for_backward(grad_hidden.div_(n), grad_weight.div_(n).to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), grad_weight * grad.to(grad_weight.dtype), None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of F.linear(hidden, weight) against targets, the logits never built whole.
    hidden (..., d), weight (V, d), targets (...) int -> a scalar in float32 at least; equal to
    F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten()) up to rounding
    (tests/test_model.py). The gradients are computed with the loss when autograd needs them."""
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), with_grad)
