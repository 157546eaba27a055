"""The shared decoder-only transformer family (Llama-style), one readable file.

    h_0     = E[idx]                                   token embedding (no learned positions: RoPE)
    a_l     = h_{l-1} + Attn(RMSNorm(h_{l-1}))          pre-norm residual block (Xiong et al. 2020)
    h_l     = a_l + FFN(RMSNorm(a_l))                   FFN = SwiGLU, or an MoE of SwiGLU experts
    logits  = W_out RMSNorm(h_L)                        W_out = E^T with weight tying (Press & Wolf 2017)

The attention variant (MHA/GQA/MQA, MLA, MoBA, NSA) comes from `core/nn/attention.py`, the FFN from
`core/nn/moe.py`. `NAMED_CONFIGS` holds one small config per architecture (`--set arch=...` in the
modules); `export_hf` writes a Llama-architecture model as safetensors + a Hugging Face config.json.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from core.artifacts import UserError, atomic_write, atomic_write_text
from core.nn.attention import build_attention
from core.nn.loss import linear_cross_entropy
from core.nn.moe import MoE, SwiGLU
from core.nn.norm import RMSNorm


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """number of token ids (the tokenizer's vocabulary, special tokens included)"""
    block_size: int = 256
    """maximum sequence length (RoPE tables and KV caches are sized for it)"""
    n_layer: int = 4
    """number of transformer blocks"""
    n_head: int = 4
    """number of query heads"""
    n_kv_head: int = 4
    """key/value heads: = n_head is MHA, 1 is MQA, in between is GQA (must divide n_head)"""
    n_embd: int = 128
    """model width d_model (head_dim = n_embd / n_head)"""
    ffn_hidden: int = 344
    """SwiGLU hidden width (Llama uses ~8/3 * n_embd so the 3 matrices cost what a 4x GELU MLP does)"""
    rope_theta: float = 10000.0
    """RoPE base: theta_i = rope_theta^(-2i/d)"""
    norm_eps: float = 1e-5
    """epsilon inside RMSNorm's square root"""
    tie_embeddings: bool = True
    """share the token-embedding matrix with the LM head"""
    attention: Literal["gqa", "mla", "moba", "nsa"] = "gqa"
    """attention variant; gqa covers MHA and MQA through n_kv_head"""
    ffn: Literal["dense", "moe"] = "dense"
    """feed-forward: dense SwiGLU or a mixture of SwiGLU experts"""
    # --- MoE (ffn = moe)
    n_experts: int = 8
    """routed experts per MoE layer"""
    moe_top_k: int = 2
    """experts each token is routed to"""
    n_shared_experts: int = 0
    """always-on shared experts (DeepSeekMoE); 0 for Mixtral"""
    moe_hidden: int = 344
    """hidden width of each expert (fine-grained experts divide ffn_hidden)"""
    moe_renormalize: bool = True
    """renormalise the top-k router weights to sum to 1 (Mixtral) or keep raw softmax (DeepSeek-V2)"""
    # --- MLA (attention = mla)
    q_lora_rank: int = 0
    """rank of the query compression c_q; 0 = no query compression (DeepSeek-V2-Lite)"""
    kv_lora_rank: int = 64
    """rank of the joint key/value latent c_kv (what the cache stores per token)"""
    qk_nope_head_dim: int = 32
    """per-head query/key dimension without position (up-projected from c_kv)"""
    qk_rope_head_dim: int = 16
    """dimension of the decoupled RoPE query per head and of the RoPE key shared by all heads"""
    v_head_dim: int = 32
    """per-head value dimension"""
    mla_absorb: bool = True
    """decode MLA with W_UK folded into the query and W_UV applied after attention, straight on the
    cached latents (calls with earlier cached tokens only; False re-expands the cache every step)"""
    # --- MoBA (attention = moba)
    moba_block_size: int = 32
    """keys per MoBA block"""
    moba_top_k: int = 3
    """blocks each query attends to, its own (current) block included"""
    # --- NSA (attention = nsa)
    nsa_block_size: int = 16
    """tokens per compression / selection block"""
    nsa_top_k: int = 4
    """earlier blocks the selection branch picks per query (the current block is always added)"""
    nsa_window: int = 64
    """sliding-window branch: each query sees the last nsa_window tokens, itself included"""

    def __post_init__(self) -> None:
        """Refuse shapes the layers cannot take, with the reason (not an assert deep in a layer)."""
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2 and self.attention != "mla":
            problems.append(f"head_dim = n_embd / n_head = {self.n_embd // self.n_head} is odd: RoPE rotates pairs")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} is odd: RoPE rotates pairs")
        if self.attention == "moba" and self.moba_block_size < 1 or self.attention == "nsa" and self.nsa_block_size < 1:
            problems.append("the sparse-attention block size must be at least 1 (block_size too small?)")
        if self.ffn == "moe" and not 1 <= self.moe_top_k <= self.n_experts:
            problems.append(f"moe_top_k={self.moe_top_k} must be in [1, n_experts={self.n_experts}]")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))


# -------------------------------------------------------------------------------------- layers

def build_ffn(cfg: ModelConfig) -> nn.Module:
    if cfg.ffn == "dense":
        return SwiGLU(cfg.n_embd, cfg.ffn_hidden)
    # No capacity factor here, on purpose. Capacity queues fill in the order of the flattened batch,
    # so whether a token's expert serves it depends on tokens after it (its own sequence's future)
    # and on the other sequences of the batch; and a cached decoding step, one token, is never over
    # capacity, so training and inference would disagree. A causal LM routes without dropping;
    # capacity and dropping are studied on independent tokens in pre_train/llm/moe.
    return MoE(cfg.n_embd, cfg.moe_hidden, cfg.n_experts, cfg.moe_top_k, cfg.n_shared_experts,
               renormalize=cfg.moe_renormalize)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = build_ffn(cfg)

    def forward(self, x: Tensor, cache: dict | None, pos: int, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cache, pos, key_mask)  # a = h + Attn(RMSNorm(h))
        return x + self.ffn(self.ffn_norm(x))  # h' = a + FFN(RMSNorm(a))


# --------------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, two uses
        self.aux_loss = torch.zeros(())
        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019): scale the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() lists a tied tensor once

    def init_cache(self, batch: int, max_len: int | None = None) -> list[dict[str, Tensor]]:
        """One cache dict per layer, sized for max_len positions (default block_size)."""
        return [b.attn.init_cache(batch, max_len or self.cfg.block_size) for b in self.blocks]

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), PaLM (Chowdhery et al. 2022,
        App. B), nanoGPT's estimate_mfu:
            6 N  +  6 L T n_head (d_qk + d_v)
        N = matmul weights one token passes through (the LM head included, the embedding lookup not;
        for an MoE only the router, the shared experts and top_k of the routed experts), and the
        second term is the attention scores QK^T and the weighted sum AV over a context of T =
        block_size. MoBA and NSA count as one dense attention: an upper bound (they compute their selected
        blocks only; how much less depends on the context, see benchmarks/sparse_attention.py)."""
        cfg = self.cfg
        active = 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                active += m.weight.numel()
            elif isinstance(m, MoE):  # its routed experts were counted in full above: keep top_k
                per_expert = sum(p.numel() for p in m.experts[0].parameters())
                active -= per_expert * (m.n_experts - m.top_k)
        if cfg.attention == "mla":
            d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            d_qk = d_v = cfg.n_embd // cfg.n_head
        return 6 * active + 6 * cfg.n_layer * cfg.block_size * cfg.n_head * (d_qk + d_v)

    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token costs over all layers (closed form, each variant's formula)."""
        return sum(b.attn.cache_bytes_per_token() for b in self.blocks)

    def forward(self, idx: Tensor, caches: list[dict] | None = None, pos: int = 0,
                key_mask: Tensor | None = None, targets: Tensor | None = None,
                prefix: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids at positions pos .. pos + T - 1 -> logits (B, T, vocab_size), or with
        `targets` (B, T) the mean next-token cross-entropy, a float32 scalar, computed with the LM head
        chunk by chunk so that the batch's logits are never built (core/nn/loss.py; nanoGPT's
        model(idx, targets) also returns the loss, after building the logits).

        `prefix` (B, P, n_embd): embeddings placed before the tokens (a vision-language model's image
        tokens, LLaVA's projected patches, BLIP-2's query outputs); they take positions pos .. pos + P - 1
        and the tokens follow. Logits and targets cover the tokens only.

        With `caches`, keys/values of these tokens are stored and earlier cached ones are attended.
        `key_mask` (B, pos + T) bool marks the real tokens of a left-padded batch (False = padding,
        never attended); None for a batch without padding.
        Sets `self.aux_loss` to the sum of the MoE load-balancing losses (0 for dense FFNs)."""
        hidden = self.hidden(idx, caches, pos, key_mask, prefix)
        if prefix is not None:
            hidden = hidden[:, prefix.shape[1]:]
        if targets is not None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets)
        return self.lm_head(hidden)

    def hidden(self, idx: Tensor, caches: list[dict] | None = None, pos: int = 0,
               key_mask: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, n_embd) that the LM head reads: what a scalar head
        (reward model, critic: core/nn/heads.py) reads instead. Arguments as for forward; with a
        `prefix` the states of its P positions come first: (B, P + T, n_embd)."""
        x = self.tok_emb(idx)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if pos + x.shape[1] > self.cfg.block_size:
            raise ValueError(f"positions up to {pos + x.shape[1]} exceed block_size {self.cfg.block_size}")
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], pos, key_mask)
        aux = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        self.aux_loss = torch.stack(aux).sum() if aux else torch.zeros((), device=x.device)
        return self.norm(x)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, prompt_mask: Tensor | None = None,
                 stop_token: int | None = None, prefix: Tensor | None = None) -> Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T0); temperature 0 = greedy.

        The prompt is run once (prefill) into a KV cache; then each step feeds only the newest token.
        T0 + max_new_tokens must fit in block_size (RoPE tables and caches are sized for it).
        Prompts of different lengths go in one call left-padded, with `prompt_mask` (B, T0) False on
        the padding. With `stop_token`, generation ends early once every row has produced it (the
        tokens a row samples after its stop token are left for the caller to cut). A `prefix` (B, P,
        n_embd) of embeddings goes before the prompt, as in forward; the result holds the tokens only."""
        B = idx.shape[0]
        T0 = idx.shape[1] + (0 if prefix is None else prefix.shape[1])  # positions before the first new token
        caches = self.init_cache(B, T0 + max_new_tokens)
        key_mask = None
        if prompt_mask is not None:
            prefix_mask = prompt_mask.new_ones(B, T0 - idx.shape[1], dtype=torch.bool)
            key_mask = torch.cat([prefix_mask, prompt_mask.bool(), prompt_mask.new_ones(B, max_new_tokens, dtype=torch.bool)], 1)
        logits = self(idx, caches, pos=0, key_mask=key_mask, prefix=prefix)[:, -1]
        out = [idx]
        stopped = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(next_token)
            if stop_token is not None:
                stopped |= next_token[:, 0] == stop_token
                if bool(stopped.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = self(next_token, caches, pos=T0 + step, key_mask=key_mask)[:, -1]
        return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------- sampling

def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (Fan et al. 2018)."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to >= p, set the rest to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # drop a token when the tokens ranked above it already reach p (the top token always stays)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature  # p_i ~ exp(z_i / T)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


# ----------------------------------------------------------------------------- named configs

_BASE = ModelConfig()
NAMED_CONFIGS: dict[str, ModelConfig] = {
    "llama": _BASE,  # MHA
    "gqa": dataclasses.replace(_BASE, n_kv_head=2),
    "mqa": dataclasses.replace(_BASE, n_kv_head=1),
    "mla": dataclasses.replace(_BASE, attention="mla"),
    "moba": dataclasses.replace(_BASE, attention="moba"),
    "nsa": dataclasses.replace(_BASE, attention="nsa"),
    # Mixtral: 8 experts of full FFN width, top-2, renormalised router weights
    "moe": dataclasses.replace(_BASE, ffn="moe", n_experts=8, moe_top_k=2, moe_hidden=344),
    # DeepSeek-V2: MLA + DeepSeekMoE. Mixtral's experts split in two (fine-grained: 16 of half width),
    # one of the 4 active slots made an always-on shared expert: same routed parameters and the same
    # active FFN width per token as `moe` (3 routed + 1 shared) * 172 = 2 * 344; raw softmax weights
    "deepseek_v2": dataclasses.replace(_BASE, attention="mla", ffn="moe", n_experts=16, moe_top_k=3,
                                       n_shared_experts=1, moe_hidden=172, moe_renormalize=False),
}


def named_config(arch: str, **overrides) -> ModelConfig:
    if arch not in NAMED_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(NAMED_CONFIGS)}")
    return dataclasses.replace(NAMED_CONFIGS[arch], **overrides)


def scaled_config(arch: str, *, vocab_size: int, block_size: int, n_layer: int, n_embd: int, n_head: int,
                  **overrides) -> ModelConfig:
    """The named config of `arch` at another size, its own dimensions scaled with the model:
    head_dim = n_embd / n_head; GQA keeps n_head / 2 kv heads, MQA one; MLA a latent of n_embd / 2,
    per-head nope/value dims of head_dim and a RoPE key of head_dim / 2; MoBA/NSA blocks of
    block_size / 8 with top-2 selection and an NSA window of block_size / 4; SwiGLU width 8/3 n_embd,
    Mixtral experts of that width, DeepSeek's fine-grained ones of half of it."""
    head_dim = n_embd // n_head
    ffn_hidden = round(8 / 3 * n_embd)
    sizes = dict(
        vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_kv_head={"gqa": max(1, n_head // 2), "mqa": 1}.get(arch, n_head), ffn_hidden=ffn_hidden,
        moe_hidden=ffn_hidden // 2 if arch == "deepseek_v2" else ffn_hidden,
        kv_lora_rank=n_embd // 2, qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim,
        moba_block_size=block_size // 8, moba_top_k=2, nsa_block_size=block_size // 8, nsa_top_k=2,
        nsa_window=block_size // 4)
    return named_config(arch, **{**sizes, **overrides})


# ------------------------------------------------------------------------------- save / load

MODEL_WEIGHTS, MODEL_CONFIG = "model.safetensors", "model_config.json"


def save_model(model: Transformer, directory: str | Path) -> Path:
    """Weights (safetensors; a tied LM head stored once) + our ModelConfig as JSON, atomically."""
    from safetensors.torch import save

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as tok_emb.weight
    weights = save(state, metadata={"format": "pt"})
    atomic_write(directory / MODEL_WEIGHTS, lambda f: f.write(weights))
    atomic_write_text(directory / MODEL_CONFIG, json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    return directory


def load_model(directory: str | Path) -> Transformer:
    """The model `save_model` wrote; a missing or corrupt file is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
    try:
        cfg = ModelConfig(**json.loads(config_path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{config_path}: not a readable model config ({exc})") from None
    model = Transformer(cfg)
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights_path}: weights do not match {config_path} ({exc})") from None
    return model


# ------------------------------------------------------------------------------------ export

def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our tensors under Hugging Face LlamaForCausalLM names. Our RoPE already rotates the pairs
    (x_i, x_{i+d/2}) like HF's rotate_half, so q/k weights need none of the row permutation that
    HF's convert_llama_weights_to_hf applies to Meta's interleaved-pair checkpoints."""
    cfg = model.cfg
    if cfg.attention != "gqa" or cfg.ffn != "dense":
        raise ValueError("only the Llama architecture (attention=gqa, ffn=dense) exports to "
                         "LlamaForCausalLM")
    ours_to_hf = {"attn_norm.weight": "input_layernorm.weight",
                  "ffn_norm.weight": "post_attention_layernorm.weight",
                  "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
                  "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
                  "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight",
                  "ffn.w2.weight": "mlp.down_proj.weight"}
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:  # tied: HF re-ties lm_head to embed_tokens itself
        out["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        for name, tensor in block.state_dict().items():
            out[f"model.layers.{i}.{ours_to_hf[name]}"] = tensor
    return {name: t.detach().cpu().contiguous().clone() for name, t in out.items()}


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.n_embd // cfg.n_head,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(model: Transformer, directory: str | Path) -> Path:
    """Write model.safetensors + config.json that `LlamaForCausalLM.from_pretrained(directory)` loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    dtype = next(iter(tensors.values())).dtype
    (directory / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype), indent=2) + "\n")
    return directory
