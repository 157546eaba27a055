from core.checks import Check
from core.registry import Module

from .code.attention import ARCHS, LABELS, Config, run

MODULE = Module(
    name="attention",
    category="llm",
    title="Attention variants: MHA vs GQA vs MQA vs MLA vs sparse (MoBA, NSA)",
    summary="The same tiny Llama-style model with six attention variants: KV-cache bytes per token "
            "measured from the allocated cache next to each closed form, parameters, cached decode "
            "speed, and val loss after the same short pretraining on generated stories.",
    interview_weight=5,
    interview_outcome="Write scaled dot-product attention with its causal mask; say how MQA, GQA and MLA shrink the "
                      "KV cache and what sparse attention saves instead, quoting your run's cache bytes per token.",
    presets={
        "toy": Config(n_stories=200, n_embd=64, n_head=4, kv_lora_rank=32, block_size=64, sparse_block=8,
                      nsa_window=16, steps=40, warmup=5, batch_size=8, eval_batches=4, decode_tokens=48),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny matmuls: intra-op threads only add synchronisation
    metrics={
        "cache_formula_max_rel_diff": "max over archs of |measured - formula| / formula, KV-cache bytes per token",
        "mla_cache_from_config": "(kv_lora_rank + qk_rope_head_dim) * 4 bytes * n_layer, from the config alone",
        "unigram_entropy": "entropy of the training-token frequencies (nats): the loss of a context-blind model",
        "future_leak_max": "max over archs: largest logit change before position T/2 when every later token changes",
        **{f"cache_bytes_{a}": f"{LABELS[a]}: KV-cache bytes per token, all layers, from the allocated tensors"
           for a in ARCHS},
        **{f"params_{a}": f"{LABELS[a]}: parameter count" for a in ARCHS},
        **{f"val_loss_{a}": f"{LABELS[a]}: val cross-entropy (nats) after the shared pretraining budget"
           for a in ARCHS},
    },
    checks=[
        Check("cache_formula_max_rel_diff", "<", 1e-12,
              why="every variant's closed-form cache size equals the bytes it really allocates"),
        Check("cache_bytes_mqa", "<", ref="cache_bytes_gqa", why="MQA keeps 1 kv head, GQA several"),
        Check("cache_bytes_gqa", "<", ref="cache_bytes_llama", why="GQA keeps fewer kv heads than MHA"),
        Check("cache_bytes_mla", "==", ref="mla_cache_from_config",
              why="MLA caches only the latent c_kv and the shared RoPE key, and nothing less"),
        Check("future_leak_max", "<", 1e-5,
              why="causal: no prediction depends on a later token (a leak makes the val loss a lie)"),
        *[Check(f"val_loss_{a}", "<", ref="unigram_entropy",
                why=f"{LABELS[a]} uses the context: a model that learned nothing cannot beat the unigram loss")
          for a in ARCHS],
    ],
)
