from core.checks import Check
from core.registry import Module
from core.rl.preference import LEARNING_CHECKS, PREFERENCE_METRICS

from .code.orpo import CONTROL_COLUMNS, Config, run

MODULE = Module(
    name="orpo",
    category="alignment",
    title="ORPO: SFT and preference alignment in one loss, no reference model",
    summary="Odds Ratio Preference Optimization from the pretrained base model: the sft loss on the chosen reply "
            "plus lambda times -log sigma of the log-odds ratio of length-normalised likelihoods; held-out "
            "log-odds accuracy, margins, log-probs of both replies and answer accuracy before and after, against "
            "the same run with lambda = 0 (SFT on the chosen replies alone).",
    depends=("nanogpt",),
    interview_weight=4,
    interview_outcome="Write the ORPO loss, say why it needs no reference model and why P is the per-token mean, "
                      "and show from your run what the odds-ratio term adds to SFT on the chosen replies.",
    presets={
        "toy": Config(n_pairs=600, n_held_out_pairs=90, n_held_out=90, steps=60, batch_size=12, lr=2e-3, eval_every=20),
        "default": Config(),
    },
    run=run,
    produces_lm=True,
    threads=1,  # a tiny model: more threads only add synchronisation, and slow down badly when cores are shared
    metrics={
        **PREFERENCE_METRICS,
        **{f"nll_only_{k}": f"{k} after the same steps with lambda = 0 (SFT on the chosen replies alone)"
           for k in CONTROL_COLUMNS},
    },
    checks=[
        *LEARNING_CHECKS,
        Check("reward_margin", ">", ref="nll_only_reward_margin",
              why="the odds-ratio term widens the held-out log-odds margin beyond what SFT on the chosen replies gives"),
        Check("logp_rejected", "<", ref="nll_only_logp_rejected",
              why="SFT on the chosen replies also raises the rejected ones; the odds-ratio term holds them lower"),
    ],
)
