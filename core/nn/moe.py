"""Mixture-of-experts feed-forward layers: the dense SwiGLU FFN and its sparse replacement `MoE`.

`MoE` is a drop-in replacement for `SwiGLU` in a transformer block, (B, T, C) -> (B, T, C):

    router:    p = softmax(x W_r)                       (N tokens x E experts)
    top-k:     (w_1..w_k, e_1..e_k) = topk(p, k)
               Mixtral (renormalize=True):       w_j <- w_j / sum_j' w_j'     (top-k weights sum to 1;
                                                  equal to Mixtral's softmax over the top-k logits)
               DeepSeek-V2 (renormalize=False):  w_j kept as the full-softmax probability
    output:    y = sum_j w_j * Expert_{e_j}(x)  +  sum_s Shared_s(x)         (DeepSeekMoE, Dai et al. 2024)

Load-balancing auxiliary loss (Switch Transformer, Fedus et al. 2021, eq. 4; DeepSeekMoE's
expert-level balance loss has the same normalisation):

    f_i = (#token-assignments routed to expert i) / (N * k)      # every token counts its k assignments,
                                                                  # so sum_i f_i = 1
    P_i = (1/N) sum_t p_{t,i}                                     # mean router probability, sum_i P_i = 1
    aux = E * sum_i f_i * P_i

At perfect balance f_i = P_i = 1/E, so aux = E * E * (1/E^2) = 1.0 exactly, for any E and k.
(Hugging Face's Mixtral `load_balancing_loss_func` lets f sum to k instead, so its value at
balance is k; it equals k * ours.) f comes from argmax counts and has no gradient: the loss pushes
on P, i.e. on the router.

Capacity factor (Switch / GShard): each expert processes at most
    capacity = ceil(capacity_factor * N * k / E)
assignments per forward. Priority rule: every token's 1st choice is served before any token's 2nd
choice, and within a choice rank earlier tokens (in flattened batch order b*T + t) come first.
An assignment over capacity is dropped: that expert contributes nothing to that token (the other
choices and the shared experts still do; in a transformer the residual stream carries the token on).
The priority makes a token's fate depend on every other token of the batch, later ones included
(a 1st choice at position t + 1 goes before a 2nd choice at t): fine for independent tokens, a leak
of the future in a causal LM, which is why core/nn/model.py builds its MoE layers without capacity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.nn.fused import fused_linear


class _GatedSiLU(torch.autograd.Function):
    """silu(g) * u of the fused projection's output [g | u], with a backward that writes both
    gradients into one [dg | du] buffer, the layout the fused matmul's backward reads. Autograd would
    compute dg and du apart and then concatenate them (split's backward): one more pass over the
    widest activation of the block.
        du = dy * silu(g),   dg = dy * u * silu'(g),   silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)"""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(gate_up, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        gate_up, silu_gate = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)  # dy u silu'(g)
        torch.mul(grad, silu_gate, out=grad_up)
        return grad_gate_up


class SwiGLU(nn.Module):
    """The dense Llama FFN (Shazeer 2020): y = w2( silu(w1 x) * w3 x ); w1 gate, w3 up, w2 down."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(_GatedSiLU.apply(fused_linear(x, self.w1, self.w3)))


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """aux = E * sum_i f_i P_i with f counting all k assignments of each token (sum_i f_i = 1).

    router_probs (N, E): full softmax of the router; expert_index (N, k): the chosen experts.
    Equals 1.0 at perfect balance."""
    n_assignments = expert_index.numel()                                   # N * k
    counts = torch.bincount(expert_index.flatten(), minlength=n_experts)
    f = counts.to(router_probs.dtype) / n_assignments                      # f_i, no gradient (counts)
    P = router_probs.mean(dim=0)                                           # P_i = mean_t p_{t,i}
    return n_experts * (f * P).sum()                                       # aux = E * sum_i f_i P_i


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE (Zoph et al. 2022) z-loss: mean_t (logsumexp_i logit_{t,i})^2; keeps logits small
    so the router softmax stays numerically stable (reported, not used by `MoE` itself)."""
    return torch.logsumexp(router_logits, dim=-1).square().mean()


def capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (+ optional always-on shared experts), (B, T, C) -> (B, T, C).

    Mixtral 8x7B: n_experts=8, top_k=2, renormalize=True (the default here).
    DeepSeekMoE / DeepSeek-V2: many small routed experts (fine-grained: d_hidden divided by the
    split factor, n_experts and top_k multiplied by it), n_shared >= 1, renormalize=False.

    After each forward:
      aux_loss           the load-balancing loss above (not multiplied by a coefficient)
      z_loss             the router z-loss (for logging or an optional extra penalty)
      tokens_per_expert  LongTensor (E,): assignments the router sent to each expert, before
                         capacity dropping (sums to N * k)
      dropped_fraction   dropped assignments / (N * k); 0.0 without a capacity factor
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int, n_shared: int = 0,
                 capacity_factor: float | None = None, renormalize: bool = True):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.n_shared = n_experts, top_k, n_shared
        self.capacity_factor, self.renormalize = capacity_factor, renormalize
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_hidden) for _ in range(n_experts))
        # n_shared experts of width d_hidden, summed, are exactly one SwiGLU of width n_shared * d_hidden
        # (the hidden units just concatenate); DeepSeek-V2 implements them the same way.
        self.shared = SwiGLU(d_model, n_shared * d_hidden) if n_shared else None
        self.aux_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.tokens_per_expert = torch.zeros(n_experts, dtype=torch.long)
        self.dropped_fraction = 0.0

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, C) -> router logits (N, E), combine weights (N, k), chosen experts (N, k)."""
        logits = self.router(x)
        probs = logits.float().softmax(dim=-1)                 # p = softmax(x W_r), fp32 for stability
        weights, expert_index = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # Mixtral: top-k weights sum to 1
        self.aux_loss = load_balancing_loss(probs, expert_index, self.n_experts)
        self.z_loss = router_z_loss(logits.float())
        self.tokens_per_expert = torch.bincount(expert_index.flatten(), minlength=self.n_experts)
        return logits, weights.to(x.dtype), expert_index

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                            # (N, C), token t = b * T + t_in_seq
        n_tokens = x.shape[0]
        _, weights, expert_index = self.route(x)

        # Assignments in priority order: rank-major (all 1st choices, then all 2nd choices, ...),
        # token order within a rank. Shapes (k * N,).
        assigned_expert = expert_index.T.reshape(-1)
        assigned_token = torch.arange(n_tokens, device=x.device).repeat(self.top_k)
        assigned_weight = weights.T.reshape(-1)
        limit = (capacity(self.capacity_factor, n_tokens, self.top_k, self.n_experts)
                 if self.capacity_factor is not None else n_tokens)

        out = torch.zeros_like(x)
        dropped = 0
        for e, expert in enumerate(self.experts):
            slots = torch.nonzero(assigned_expert == e).flatten()   # this expert's queue, in priority order
            dropped += max(len(slots) - limit, 0)
            slots = slots[:limit]                                   # over capacity: dropped for this expert
            if len(slots) == 0:
                continue
            tokens = assigned_token[slots]
            # gather this expert's tokens, run it once, scatter-add the weighted result back
            out.index_add_(0, tokens, assigned_weight[slots, None] * expert(x[tokens]))
        self.dropped_fraction = dropped / assigned_expert.numel()

        if self.shared is not None:
            out = out + self.shared(x)                              # shared experts see every token
        return out.reshape(shape)
