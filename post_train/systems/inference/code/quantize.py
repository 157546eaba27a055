"""int8 weight-only quantisation with one absmax scale per output channel (LLM.int8's vector-wise scale,
Dettmers et al. 2022, without its fp16 outlier columns; the weight-only int8 of TensorRT-LLM and llama.cpp's Q8):

    s_j   = max_i |W_ji| / 127                     one fp32 scale per output row j
    Q_ji  = round(W_ji / s_j)  in [-127, 127]      stored as int8: 1 byte per weight instead of 4
    y     = x (Q * s)^T                            dequantised in the matmul (activations stay fp32)

|W_ji - s_j Q_ji| <= s_j / 2: a row's error is bounded by its OWN largest weight. One scale for the whole
tensor would bound every row's error by the largest weight of the tensor, and rows of small weights
would keep only a few of their 255 levels.

The tied embedding is the LM head's matrix: its rows are the head's output channels and the embedding's
token vectors at once, so one int8 tensor with its row scales serves both. RMSNorm gains stay fp32 (a few
hundred numbers). A GPU kernel reads the int8 weights and dequantises in registers: decoding reads every
weight once per token, so 4x fewer bytes is up to 4x faster where memory bandwidth bounds the step. On
this CPU the dequantisation is a separate pass, so here the gain is memory only.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.nn.model import Transformer

INT8_MAX = 127


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 Q, fp32 scales (rows, 1)) with W ~ Q * scales, one absmax scale per row (output channel)."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    return torch.round(weight / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale.float()


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is stored as int8 rows and fp32 row scales."""

    def __init__(self, weight: Tensor):
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)

    def dequantized(self) -> Tensor:
        return self.weight_int8.float() * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized().to(x.dtype))


class Int8Embedding(nn.Module):
    """Token lookup in the LM head's int8 rows (tied embeddings): row t dequantised with its own scale."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = head

    def forward(self, idx: Tensor) -> Tensor:
        return self.head.weight_int8[idx].float() * self.head.scale[idx]


def quantize_model(model: Transformer) -> Transformer:
    """A copy of the model with every linear layer int8 (attention, FFN, LM head; the tied embedding
    with the head). The original is left as it was."""
    quantized = copy.deepcopy(model)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child.weight))
    if model.cfg.tie_embeddings:
        quantized.tok_emb = Int8Embedding(quantized.lm_head)
    else:
        quantized.tok_emb = Int8Embedding(Int8Linear(model.tok_emb.weight))
    return quantized


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of the model holds (parameters and persistent buffers, a shared
    tensor once; RoPE tables are derived from the config and not stored)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
