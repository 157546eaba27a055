"""Memory and communication arithmetic of training and serving a transformer, in one place:
scripts/memcalc.py prints it for any model size, post_train/systems/deepspeed measures it on real
ranks, and the tests compare every formula here with bytes measured from tensors.

Model states under ZeRO (Rajbhandari et al. 2020, Sec. 3-5), Psi parameters, N data-parallel ranks,
mixed-precision Adam: 2 Psi of fp16 weights, 2 Psi of fp16 gradients and K Psi of optimizer states
(an fp32 master copy, momentum and variance: K = 4 + 4 + 4 = 12). Per rank:

    stage 0 (plain data parallel)   (2 + 2 + K) Psi
    stage 1 (optimizer states)      2 Psi + 2 Psi + K Psi / N
    stage 2 (+ gradients)           2 Psi + (2 + K) Psi / N
    stage 3 (+ parameters)          (2 + 2 + K) Psi / N

Training in fp32 changes the byte counts, not the shape: weights 4, gradients 4, and Adam's m and v
8, with no master copy (the weights already are fp32): K = 8 and (4 + 4 + 8) Psi = 16 Psi at stage 0.

The exact count of an implementation adds padding. A flat buffer split into N equal shards is padded
to a multiple of N (`padded_numel`); stages 1-2 flatten all parameters into one buffer, stage 3 keeps
one buffer per unit it gathers (a layer), each padded (`zero_model_states`).

Communication per step and rank, ring algorithms on N ranks for a buffer of B bytes (each rank
sends, and receives, this much; Patarasuk & Yuan 2009):
    all-reduce 2 (N-1)/N B,   reduce-scatter (N-1)/N B (B the full input),   all-gather (N-1)/N B (B the output).
The paper counts in units of Psi with (N-1)/N taken as 1: data parallel 2 Psi (one all-reduce), stages
1-2 2 Psi (a reduce-scatter and an all-gather), stage 3 3 Psi (an all-gather before the forward and
another before the backward of each layer, and the reduce-scatter of its gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""bytes per element of the training dtypes memcalc takes"""
MIXED_PRECISION_K = 12
"""optimizer bytes per parameter of mixed-precision Adam: fp32 master weights, m and v (the paper's K)"""
FP32_ADAM_K = 8
"""optimizer bytes per parameter of fp32 Adam: m and v only, the weights are their own master copy"""
GiB = 2 ** 30


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the memory the tensors hold, each storage counted once: views of one buffer share it,
    and a view keeps its whole storage alive (what an allocator would report, not numel x size)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------ ZeRO
def padded_numel(numel: int, world_size: int) -> int:
    """numel rounded up to a multiple of world_size, so that every rank owns an equal contiguous shard."""
    return -(-numel // world_size) * world_size


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of the three model states."""
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def paper_model_states(psi: float, world_size: int, stage: int, k: float = MIXED_PRECISION_K,
                       param_bytes: float = 2, grad_bytes: float = 2) -> ModelStates:
    """The paper's per-rank formulas (Sec. 5, Fig. 1), no padding: each state is replicated or divided by N."""
    n = world_size
    return ModelStates(params=param_bytes * psi / (n if stage >= 3 else 1),
                       grads=grad_bytes * psi / (n if stage >= 2 else 1),
                       optimizer=k * psi / (n if stage >= 1 else 1))


def zero_model_states(unit_numels: list[int], world_size: int, stage: int, param_bytes: int = 4,
                      grad_bytes: int = 4, optimizer_bytes: int = FP32_ADAM_K) -> ModelStates:
    """Exact per-rank bytes of a flat-buffer ZeRO implementation (every rank holds the same; the last
    rank's shard ends in the padding). `unit_numels`: the parameters of each unit stage 3 gathers as
    one (the numbers of elements, in the order of the units). Stage 0 holds the parameters as they are,
    unpadded; stages 1-2 flatten all of them into one buffer padded to a multiple of N and keep the whole
    buffer of parameters (and at stage 1 of gradients); stage 3 pads each unit's buffer."""
    total, n = sum(unit_numels), world_size
    if stage == 0:
        return ModelStates(param_bytes * total, grad_bytes * total, optimizer_bytes * total)
    full = padded_numel(total, n)
    shard = (full if stage < 3 else sum(padded_numel(u, n) for u in unit_numels)) // n
    return ModelStates(params=param_bytes * (shard if stage >= 3 else full),
                       grads=grad_bytes * (shard if stage >= 2 else full),
                       optimizer=optimizer_bytes * shard)


def zero3_peak_param_bytes(unit_numels: list[int], world_size: int, element_bytes: int = 4) -> int:
    """The most parameter bytes a stage-3 rank holds at once when one unit is gathered at a time besides
    the root (the first unit, kept from the start of the forward to the end of the backward): its shards,
    the root's whole buffer and the largest other unit's."""
    padded = [padded_numel(u, world_size) for u in unit_numels]
    return element_bytes * (sum(padded) // world_size + padded[0] + max(padded[1:], default=0))


Collective = Literal["all_reduce", "reduce_scatter", "all_gather"]


def collective_bytes(op: Collective, nbytes: float, world_size: int) -> float:
    """Bytes one rank sends in a ring collective on a buffer of `nbytes` (the full input of a
    reduce-scatter, the full output of an all-gather)."""
    share = (world_size - 1) / world_size
    return {"all_reduce": 2 * share, "reduce_scatter": share, "all_gather": share}[op] * nbytes


def zero_comm_bytes(stage: int, unit_numels: list[int], world_size: int, element_bytes: int = 4) -> float:
    """Per-rank bytes sent per training step (ring collectives) by data parallelism (stage 0) and by the
    flat-buffer ZeRO stages, the way post_train/systems/deepspeed builds them:
      stage 0  all-reduce of the gradients (torch's DDP, unpadded buckets)
      stage 1  all-reduce of the padded flat gradient, then all-gather of the updated parameters: the
               paper's P_os would reduce-scatter instead (2 Psi); an all-reduce keeps the whole
               gradient on every rank and costs 3 Psi
      stage 2  reduce-scatter of the gradient, all-gather of the parameters (2 Psi)
      stage 3  per unit: all-gather before its forward, again before its backward, reduce-scatter of its
               gradient (3 Psi); the first unit (the root: embedding, final norm, tied LM head) is
               gathered once and kept from the start of the forward to the end of the backward, which
               uses it first and last (FSDP does the same), so it costs 2 of its Psi
    Stages 2 and 3 add the all-reduce of one fp32 number, the squared gradient norm for clipping: no
    rank holds the whole gradient there."""
    n = world_size
    flat = padded_numel(sum(unit_numels), n) * element_bytes
    if stage == 0:
        return collective_bytes("all_reduce", sum(unit_numels) * element_bytes, n)
    if stage == 1:
        return collective_bytes("all_reduce", flat, n) + collective_bytes("all_gather", flat, n)
    norm = collective_bytes("all_reduce", 4, n)
    if stage == 2:
        return collective_bytes("reduce_scatter", flat, n) + collective_bytes("all_gather", flat, n) + norm
    units = [padded_numel(u, n) * element_bytes for u in unit_numels]
    gathered = 2 * sum(units) - units[0]  # every unit before its forward, all but the root again before the backward
    return (collective_bytes("all_gather", gathered, n) + collective_bytes("reduce_scatter", sum(units), n)
            + norm)


# --------------------------------------------------------------------- the transformer's shapes
@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of a Llama-style decoder (core/nn/model.py's Transformer, dense SwiGLU)."""
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool = True
    attention: Literal["gqa", "mla"] = "gqa"
    """gqa covers MHA (kv_heads = heads) and MQA (kv_heads = 1); mla caches a latent (KV cache only)"""
    kv_lora_rank: int = 0
    """MLA: width of the cached joint key/value latent"""
    rope_dim: int = 0
    """MLA: width of the cached decoupled RoPE key"""
    params: int | None = None
    """a parameter count given outright (an MoE, or a model this shape does not describe)"""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def param_count(self) -> int:
        """The given count, else the Llama count: embedding V d; per layer two norm gains 2 d, q and o
        projections 2 d H hd, k and v 2 d H_kv hd, SwiGLU 3 d F; a final norm d; an untied LM head V d."""
        if self.params is not None:
            return self.params
        d, hd = self.d_model, self.head_dim
        layer = 2 * d + 2 * d * self.heads * hd + 2 * d * self.kv_heads * hd + 3 * d * self.ffn
        return self.vocab * d * (1 if self.tied else 2) + self.layers * layer + d


def kv_cache_bytes_per_token(shape: ModelShape, element_bytes: int) -> int:
    """KV-cache bytes one token costs over all layers: K and V of every kv head for MHA / GQA / MQA,
    2 L H_kv hd; the latent and the RoPE key for MLA, L (d_c + d_R) (DeepSeek-V2, Table 1)."""
    if shape.attention == "mla":
        return shape.layers * (shape.kv_lora_rank + shape.rope_dim) * element_bytes
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * element_bytes


def layer_activation_bytes(shape: ModelShape, batch: int, seq: int, element_bytes: int, tp: int = 1) -> int:
    """Bytes one block of core/nn/model.py keeps for its backward that grow with the tokens (dense SwiGLU,
    GQA attention with the fused CPU kernel), counted tensor by tensor as its autograd functions save
    them (Korthikanti et al. 2022 count a GPT block the same way). Per token, in the training dtype unless
    said:
        norm inputs x and a                          2 d   (fp32: the norms keep an fp32 copy)
        their 1/rms                                  2     (fp32)
        normalised inputs of the q/k/v and gate/up   2 d
        fused q/k/v output (v is a view of it)       (H + 2 H_kv) hd
        rotated q and k                              (H + H_kv) hd
        attention output                             H hd
        its log-sum-exp per head                     H     (fp32)
        gate/up output, silu(gate), the product      4 F
    plus RoPE's cos and sin for the sequence, 2 T hd. No T x T scores: the fused attention kernel
    recomputes them (Korthikanti's 5 a s / h term is gone). With tensor parallelism of degree tp
    (Megatron, no sequence parallelism: a formula, not measured here) the per-head and per-hidden-unit
    parts are divided by tp, the norm inputs stay replicated."""
    b, d, hd, h, hkv, f = element_bytes, shape.d_model, shape.head_dim, shape.heads, shape.kv_heads, shape.ffn
    tokens = batch * seq
    replicated = tokens * (2 * d * max(b, 4) + 2 * 4 + 2 * d * b) + 2 * seq * hd * b
    split = tokens * ((h + 2 * hkv) * hd * b + (h + hkv) * hd * b + h * hd * b + h * 4 + 4 * f * b)
    return replicated + split // tp


def layer_weight_copy_bytes(shape: ModelShape, element_bytes: int, tp: int = 1) -> int:
    """Weight-sized tensors one block keeps: the concatenated q/k/v and gate/up weights its fused matmuls
    (core/nn/fused.py) save, (H + 2 H_kv) hd d + 2 F d, two thirds of the block's weights. An
    implementation with separate matmuls saves the parameters themselves and keeps no copy."""
    d, hd = shape.d_model, shape.head_dim
    return ((shape.heads + 2 * shape.kv_heads) * hd * d + 2 * shape.ffn * d) * element_bytes // tp


def head_activation_bytes(shape: ModelShape, batch: int, seq: int, element_bytes: int) -> int:
    """Bytes the rest of the model keeps that grow with the tokens: the token ids (int64), the final
    norm's input and 1/rms (fp32), and the gradient of the hidden states that the fused LM-head loss
    (core/nn/loss.py) computes in its forward (T d)."""
    tokens, d, b = batch * seq, shape.d_model, element_bytes
    return tokens * 8 + tokens * (d * max(b, 4) + 4) + tokens * d * b


@dataclass(frozen=True)
class Activations:
    kept: int
    """bytes saved for the backward once the forward has run"""
    peak: int
    """the most held during the backward (with checkpointing: kept + one block recomputed)"""
    weight_copies: int
    """the part of `kept` that is weight-sized, not activation: the fused matmuls' concatenated weights
    and the fused loss's LM-head gradient (V d), computed in the forward"""


def activation_bytes(shape: ModelShape, batch: int, seq: int, element_bytes: int, checkpointing: bool = False,
                     tp: int = 1) -> Activations:
    """What the model keeps for its backward. Without checkpointing every block keeps its activations
    until its backward. With full activation checkpointing a block keeps only its input (T d) and
    recomputes the rest in the backward, one block at a time: the peak adds one block's activations."""
    layer = layer_activation_bytes(shape, batch, seq, element_bytes, tp)
    copies = layer_weight_copy_bytes(shape, element_bytes, tp)
    head = head_activation_bytes(shape, batch, seq, element_bytes) + shape.vocab * shape.d_model * element_bytes
    if not checkpointing:
        kept = shape.layers * (layer + copies) + head
        return Activations(kept, kept, shape.layers * copies + shape.vocab * shape.d_model * element_bytes)
    kept = shape.layers * batch * seq * shape.d_model * element_bytes + head
    return Activations(kept, kept + layer + copies, shape.vocab * shape.d_model * element_bytes)


def training_model_states(psi: float, dtype: str, zero_stage: int, dp: int, tp: int = 1) -> ModelStates:
    """Per-GPU model states: mixed-precision Adam for 16-bit dtypes (2 + 2 + 12 bytes a parameter), fp32
    Adam otherwise (4 + 4 + 8); tensor parallelism divides the model by tp first, ZeRO shards it over the
    dp data-parallel ranks (the paper's formulas, no padding: at this scale it is a few bytes)."""
    b = DTYPE_BYTES[dtype]
    k = FP32_ADAM_K if b == 4 else MIXED_PRECISION_K
    return paper_model_states(psi / tp, dp, zero_stage, k=k, param_bytes=b, grad_bytes=b)


def paper_comm_bytes(stage: int, model_bytes: float, world_size: int) -> float:
    """Per-rank bytes sent per step as the paper counts them (Sec. 7), for gradients and weights of
    `model_bytes` in all: an all-reduce of the gradients (stage 0, 2 Psi), a reduce-scatter of the gradients
    and an all-gather of the weights (stages 1-2, 2 Psi), and stage 3's second all-gather (3 Psi)."""
    if stage == 0:
        return collective_bytes("all_reduce", model_bytes, world_size)
    return (collective_bytes("reduce_scatter", model_bytes, world_size)
            + (2 if stage == 3 else 1) * collective_bytes("all_gather", model_bytes, world_size))


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, three significant decimals."""
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B" if float(n).is_integer() else f"{n:.1f} B"



PRESETS: dict[str, ModelShape] = {
    # Touvron et al. 2023 (LLaMA), Table 2: 6.74B parameters, untied head, MHA
    "llama-7b": ModelShape(vocab=32_000, d_model=4096, layers=32, heads=32, kv_heads=32, ffn=11_008, tied=False),
    # Touvron et al. 2023 (Llama 2): 13B MHA, 70B with GQA (8 kv heads)
    "llama2-13b": ModelShape(vocab=32_000, d_model=5120, layers=40, heads=40, kv_heads=40, ffn=13_824, tied=False),
    "llama2-70b": ModelShape(vocab=32_000, d_model=8192, layers=80, heads=64, kv_heads=8, ffn=28_672, tied=False),
    # Meta's Llama 3 8B config: GQA with 8 kv heads, a 128k vocabulary
    "llama3-8b": ModelShape(vocab=128_256, d_model=4096, layers=32, heads=32, kv_heads=8, ffn=14_336, tied=False),
    # Jiang et al. 2023 (Mistral 7B), Table 1
    "mistral-7b": ModelShape(vocab=32_000, d_model=4096, layers=32, heads=32, kv_heads=8, ffn=14_336, tied=False),
    # DeepSeek-AI 2024 (DeepSeek-V2), the Lite model: MLA with a 512 latent and a 64-wide RoPE key; an MoE,
    # so its 15.7B parameters are given, not derived from the dense shape
    "deepseek-v2-lite": ModelShape(vocab=102_400, d_model=2048, layers=27, heads=16, kv_heads=16, ffn=10_944,
                                   tied=False, attention="mla", kv_lora_rank=512, rope_dim=64,
                                   params=15_700_000_000),
}
"""named model shapes for scripts/memcalc.py (--preset); each flag given beside a preset overrides its field"""
