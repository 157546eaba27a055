from core.checks import Check
from core.registry import Module
from core.rl.group_policy import GROUP_POLICY_METRICS, LEARNING_CHECKS, TOY_PRESET

from .code.gspo import Config, run

MODULE = Module(
    name="gspo",
    category="alignment",
    title="GSPO: one length-normalised importance ratio and one clip per response",
    summary="GRPO's groups and advantages with the sequence-level ratio (geometric mean of the token ratios) "
            "and the paper's tiny clip range, on the same task from the same sft model; ratio spread, clip "
            "fraction and held-out accuracy plotted against the grpo run of the same preset.",
    depends=("sft", "grpo"),
    interview_weight=4,
    interview_outcome="Contrast GSPO's length-normalised sequence ratio and its clip with GRPO's token ratios, and "
                      "quote the clipped share of each from your runs.",
    presets={"toy": Config(**TOY_PRESET), "default": Config()},
    run=run,
    produces_lm=True,
    threads=1,  # a tiny model: more threads only add synchronisation, and slow down badly when cores are shared
    metrics=GROUP_POLICY_METRICS,
    checks=[
        *LEARNING_CHECKS,
        Check("clip_fraction_mean", ">", 0.0,
              why="some responses leave the +-4e-4 band after the first minibatch: the sequence ratio does move"),
    ],
)
