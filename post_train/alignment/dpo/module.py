from core.checks import Check
from core.registry import Module
from core.rl.preference import LEARNING_CHECKS, PREFERENCE_METRICS

from .code.dpo import Config, run

MODULE = Module(
    name="dpo",
    category="alignment",
    title="DPO: preference optimisation without a reward model, against a frozen reference",
    summary="Direct Preference Optimization of the sft model on (prompt, chosen, rejected) pairs whose chosen reply "
            "is right by construction: sequence log-probs over the reply, a frozen reference, beta, IPO and "
            "conservative variants; held-out implicit-reward accuracy, margins, log-probs of both replies, answer "
            "accuracy and the KL to the sft model before and after, and a beta sweep.",
    depends=("sft",),
    interview_weight=5,
    interview_outcome="Derive the DPO loss from the KL-regularised RLHF objective in five lines, say why the "
                      "first step's loss is ln 2, and explain from your beta sweep what beta trades.",
    presets={
        "toy": Config(n_pairs=600, n_held_out_pairs=90, n_held_out=90, steps=40, lr=3e-5, eval_every=20, betas=()),
        "default": Config(),
    },
    run=run,
    produces_lm=True,
    threads=1,  # a tiny model: more threads only add synchronisation, and slow down badly when cores are shared
    metrics={
        **PREFERENCE_METRICS,
        "step0_loss_closed_form": "the loss at h = 0 (policy = reference) in closed form: ln 2 for the sigmoid loss, "
                                  "1/(4 beta^2) for IPO",
        "step0_loss_error": "|step0_loss - step0_loss_closed_form|",
        "kl": "KL(pi || pi_ref) after training, nats per response: mean log-ratio of one sampled response per held-out "
              "problem",
        "reference_drift": "largest change of the reference's held-out log-probs between the start and the end",
        "kl_smallest_beta": "the KL to the sft model at the smallest beta of the sweep",
        "kl_largest_beta": "the KL to the sft model at the largest beta of the sweep",
    },
    checks=[
        *LEARNING_CHECKS,
        Check("step0_loss_error", "<", 1e-6,
              why="at step 0 the policy is the reference, h = 0, and the loss is ln 2 (float32 rounding apart)"),
        Check("reference_drift", "==", 0.0,
              why="the reference is frozen and shares no tensor with the policy: its log-probs end where they began"),
        Check("kl_smallest_beta", ">", ref="kl_largest_beta", when=lambda c: len(set(c.betas) | {c.beta}) > 1,
              why="a smaller beta prices the KL lower, and the policy moves further from the sft model"),
    ],
)
