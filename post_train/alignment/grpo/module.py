from core.checks import Check
from core.registry import Module
from core.rl.group_policy import GROUP_POLICY_METRICS, LEARNING_CHECKS, TOY_PRESET

from .code.grpo import Config, run

MODULE = Module(
    name="grpo",
    category="alignment",
    title="GRPO: group-relative policy optimisation with a verifiable reward",
    summary="Sample G answers per word problem in one KV-cached batch, reward exact matches, normalise within "
            "each group (no critic), optimise the clipped token ratio with a k3 KL penalty to the sft model; "
            "held-out accuracy before and after, reward, KL, clipping, length and zero-variance groups.",
    depends=("sft",),
    interview_weight=5,
    interview_outcome="Write the GRPO objective from memory and say what the group mean replaces; explain why a "
                      "group of equal rewards teaches nothing and why the ratio is 1 on the first step.",
    presets={"toy": Config(**TOY_PRESET), "default": Config()},
    run=run,
    produces_lm=True,
    threads=1,  # a tiny model: more threads only add synchronisation, and slow down badly when cores are shared
    metrics=GROUP_POLICY_METRICS,
    checks=[
        *LEARNING_CHECKS,
        Check("kl_max", "<", 0.5, why="the policy stays near the sft model: the KL penalty bounds the drift"),
        Check("clip_fraction_mean", ">", 0.0,
              why="the ratio leaves [1 - eps, 1 + eps] on later minibatches: pi_old is the sampling policy, not the current one"),
    ],
)
