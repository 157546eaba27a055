from core.checks import Check
from core.registry import Module

from .code.flamingo import Config, run

GATED = [f"{kind}_{i}" for i in range(2) for kind in ("attn", "ff")]
"""the gates of the two gated layers, one before each block of the shared 2-block decoder (core/nn/shape_lm.py)"""

MODULE = Module(
    name="flamingo",
    category="vlm",
    title="Flamingo: a perceiver resampler and tanh-gated cross-attention into a frozen LM",
    summary="Alayrac et al.'s Flamingo on the shape world: a perceiver resampler turns the frozen ViT's 64 patch "
            "features into 8 latents, gated cross-attention layers (tanh gates at 0) before each block of the frozen "
            "shape-world decoder read them; at init the model is the frozen LM bit for bit, after training it answers "
            "questions about colour-kind pairs it never saw far above the text-only decoder.",
    interview_weight=3,
    interview_outcome="Draw the perceiver resampler and a GATED XATTN-DENSE layer, say why tanh(0) gates make the "
                      "frozen LM the starting point and what gradient the gates and the weights get at step 0, explain "
                      "Flamingo's per-image masking for interleaved text, and compare it with LLaVA and BLIP-2.",
    presets={
        "toy": Config(train_scenes=1000, steps=300, scenes_per_step=8, eval_scenes=100, eval_every=50),
        "default": Config(),
    },
    run=run,
    threads=1,  # width-64 layers on ~1000 tokens a step: intra-op threads only add synchronisation
    metrics={
        "heldout_accuracy": "exact match on the questions about each held-out scene's shape of an unseen colour-kind "
                            "pair, and its count (heldout split, eval_seed), the image given",
        "train_accuracy": "exact match on the questions of fresh training-split scenes (seen pairs, eval_seed)",
        "text_only_accuracy": "the frozen decoder's exact match on the held-out questions without the image",
        "text_only_train_accuracy": "the same on the fresh training-split questions",
        "prior_accuracy": "answering each held-out question with its most frequent training answer: the best a "
                          "model without the image can do",
        "shuffled_image_accuracy": "exact match on the held-out questions, each asked about the next scene's image "
                                   "(the control: the answers must come from the image)",
        "heldout_over_baseline": "heldout_accuracy minus the larger of text_only_accuracy and prior_accuracy",
        "image_gain": "heldout_accuracy minus shuffled_image_accuracy",
        "init_max_logit_diff": "max |logit difference| between the untrained model and the frozen decoder on the "
                               "held-out questions (exactly 0: tanh(0) gates)",
        "first_gate_grad_min": "at init, the smallest |d loss / d a| over the gates (not 0 although tanh(0) = 0)",
        "first_weight_grad_max": "at init, the largest |d loss / d W| over every other trainable tensor (exactly 0)",
        "frozen_max_change": "largest |change| of any vision-encoder or decoder weight over training (exactly 0)",
        "final_loss": "cross-entropy on the target tokens, mean over the last logging window",
        **{f"gate_{g}": f"tanh(a) of the {g.split('_')[0]} gate of gated layer {g[-1]} at the end of training"
           for g in GATED},
        **{f"share_{g}": f"|tanh(a) branch| / |residual| of gated layer {g[-1]}'s {g.split('_')[0]} branch at the end "
                         f"(target positions of a fixed training batch)" for g in GATED},
    },
    checks=[
        Check("init_max_logit_diff", "==", 0,
              why="with every gate at tanh(0) = 0 the model is the frozen decoder, bit for bit"),
        Check("first_weight_grad_max", "==", 0,
              why="at init every weight behind a gate gets exactly zero gradient: tanh(0) multiplies it"),
        Check("first_gate_grad_min", ">", 0,
              why="at init each gate still gets a gradient (d tanh / d a = 1 at 0), so training can start"),
        Check("frozen_max_change", "==", 0,
              why="only the resampler and the gated layers train: the encoder and the LM stay bit-identical"),
        Check("heldout_over_baseline", ">=", 0.2, presets=("toy",),
              why="held-out questions answered far better than without the image (toy: 300 steps)"),
        Check("heldout_over_baseline", ">=", 0.35, presets=("default",),
              why="held-out questions answered far better than without the image (text only and prior: about 0.35)"),
        Check("image_gain", ">=", 0.15,
              why="the answers come from the image: asked about another scene's image, accuracy falls back"),
    ],
)
