"""One matmul for several projections of the same input (q, k and v; SwiGLU's gate and up).

The weights stay separate parameters, under their own names, so that LoRA targets (core/nn/lora.py),
the Hugging Face export and the tests see each projection as it is; only the product is fused:
    [y_1 | y_2 | ...] = x [W_1; W_2; ...]^T
One (N, d) x (d, d_1 + d_2 + ...) matmul reads x once and runs at the larger shape's efficiency, and
its backward is one matmul for dL/dx instead of several plus their sum. Stacking the weights copies
them each call: d (d_1 + d_2 + ...) numbers, negligible beside the N-row product in training; in
one-token decoding it is a fixed small cost per layer (benchmarks/attention_decode.py times decoding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fused_linear(x: Tensor, *layers: nn.Module) -> Tensor:
    """The outputs of `layers` (bias-free linears) on x, concatenated on the last dimension."""
    if all(type(layer) is nn.Linear and layer.bias is None for layer in layers):
        return F.linear(x, torch.cat([layer.weight for layer in layers]))
    return torch.cat([layer(x) for layer in layers], dim=-1)  # wrapped layers (LoRA, NF4) run their own forward
