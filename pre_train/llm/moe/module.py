from core.checks import Check
from core.registry import Module

from .code.moe import Config, run

MODULE = Module(
    name="moe",
    category="llm",
    title="Mixture of experts: router load, the balancing loss, capacity and shared experts",
    summary="Train a tiny MoE next-token model on a synthetic Markov source three ways (no aux loss, "
            "Switch/Mixtral aux loss, DeepSeekMoE shared + fine-grained experts) and watch the expert "
            "load: imbalance over training, load histograms, capacity factor vs dropped tokens.",
    interview_weight=4,
    interview_outcome="Explain why a router collapses without a balancing loss and what capacity and shared experts "
                      "change; quote your run's expert imbalance and dropped-token share with and without the loss.",
    presets={
        "toy": Config(train_tokens=40_000, val_tokens=8_000, steps=300, log_every=20),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny matmuls: intra-op threads only add synchronisation
    metrics={
        "aux_at_perfect_balance": "aux loss of a real MoE forward with perfectly balanced routing (documented: 1.0)",
        "imbalance_no_aux": "max/mean routed assignments per expert on the val set, trained without the aux loss",
        "imbalance_aux": "the same, trained with the load-balancing loss",
        "imbalance_deepseek": "the same for DeepSeekMoE (shared + fine-grained experts, aux loss)",
        "imbalance_ratio": "imbalance_aux / imbalance_no_aux",
        "aux_loss_no_aux": "final aux loss value of the model trained without it (1.0 = balanced)",
        "aux_loss_aux": "final aux loss value of the model trained with it",
        "val_loss_no_aux": "val cross-entropy (nats), no aux loss",
        "val_loss_aux": "val cross-entropy (nats), with the aux loss",
        "val_loss_deepseek": "val cross-entropy (nats), DeepSeekMoE",
        "unigram_entropy": "entropy of the token frequencies (nats): the loss of a context-blind model",
        "conditional_entropy": "true H(next | two previous tokens) on the val set: the best reachable loss",
        "dropped_cf1_no_aux": "fraction of assignments dropped at capacity factor 1.0, no aux loss",
        "dropped_cf1_aux": "fraction of assignments dropped at capacity factor 1.0, with the aux loss",
    },
    checks=[
        Check("aux_at_perfect_balance", ">=", 1.0 - 1e-6, why="E * sum_i f_i P_i is exactly 1 at perfect balance"),
        Check("aux_at_perfect_balance", "<=", 1.0 + 1e-6, why="E * sum_i f_i P_i is exactly 1 at perfect balance"),
        Check("imbalance_aux", "<", ref="imbalance_no_aux", why="the balancing loss ends with a more even load"),
        Check("imbalance_ratio", "<", 0.8, why="and by a clear margin, not by noise"),
        Check("dropped_cf1_aux", "<", ref="dropped_cf1_no_aux",
              why="a balanced router loses fewer tokens at the same capacity"),
        Check("val_loss_aux", "<", ref="unigram_entropy", why="the model uses the context (learns, not just balances)"),
        Check("val_loss_deepseek", "<", ref="unigram_entropy", why="DeepSeekMoE learns too"),
    ],
)
