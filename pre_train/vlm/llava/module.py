from core.checks import Check
from core.registry import Module

from .code.llava import QUESTION_KINDS, Config, run

CAPTION_MEANINGS = {
    "exact_match": "share of captions that greedy decoding reproduces word for word (teacher-forced argmax)",
    "token_accuracy": "share of caption tokens (and <eos>) that are the argmax given the image and the true words "
                      "before them",
    "word_accuracy": "the same share over the attribute words alone (size, colour, kind, side)",
}

MODULE = Module(
    name="llava",
    category="vlm",
    title="LLaVA: a projector turns frozen ViT patches into visual tokens before the text, trained in two stages",
    summary="Liu et al.'s LLaVA on the shape world: the frozen ViT's 64 patch features become 64 visual tokens (LLaVA-1.5's "
            "2-layer GELU MLP projector) placed before the text of the shape-world decoder; stage 1 trains the "
            "projector alone on captions (encoder and decoder bit-identical), stage 2 the projector (at a tenth of the "
            "decoder's learning rate) and the decoder on questions, with text-only replay and a product of experts with the "
            "question-only model; measured on colour-kind pairs no training image showed, against the same decoder "
            "fine-tuned on the same questions without the image and against LLaVA's plain loss.",
    interview_weight=4,
    interview_outcome="Draw LLaVA's pipeline (ViT patches -> projector -> visual tokens -> LLM), say what each of the "
                      "two stages trains and why, write the loss on the answer tokens only, and explain from your run "
                      "why a VLM answers with the training prior on a combination it never saw, and how a product of "
                      "experts with a question-only model removes it.",
    presets={
        "toy": Config(train_scenes=1000, stage1_steps=100, stage2_steps=200, batch_size=32, eval_scenes=100,
                      eval_every=100, log_every=10, n_examples=3),
        "default": Config(),
    },
    run=run,
    threads=1,  # width-64 layers: one thread, so the numbers do not depend on the core count
    metrics={
        "heldout_accuracy": "LLaVA's exact match on vqa_set(eval_scenes, 'heldout', eval_seed): every question is "
                            "about a colour-kind pair that no image LLaVA trains on shows (its decoder has read of "
                            "every pair, as an LLM has)",
        "train_accuracy": "LLaVA's exact match on vqa_set(eval_scenes, 'train', eval_seed): unseen scenes of seen "
                          "pairs",
        "text_only_accuracy": "held-out exact match of the frozen pretrained decoder, no image given",
        "text_only_train_accuracy": "exact match of the frozen pretrained decoder on the training-split questions, "
                                    "no image",
        "prior_accuracy": "held-out exact match of answering with the most frequent training answer of the question "
                          "(or of its kind): chance for a model blind to the image",
        "text_only_finetuned_accuracy": "held-out exact match of the decoder fine-tuned like stage 2 (same questions, "
                                        "batches, steps and learning rate) without the image: the strong baseline, and stage 2's question-only model",
        "text_only_finetuned_train_accuracy": "the same on the fresh training-split questions",
        "shuffled_image_accuracy": "LLaVA's exact match on the held-out questions, each asked about the next "
                                   "scene's image (the control: the answers must come from the image)",
        **{f"heldout_{kind}": f"held-out exact match of the '{opening}' questions"
           for opening, kind in QUESTION_KINDS.items()},
        "heldout_colour_top2": "share of the held-out 'what colour' questions whose true colour is among the two "
                               "colour words LLaVA scores highest at the answer position (chance 0.4)",
        "heldout_colour_one_shape": "held-out exact match of the 'what colour' questions about one-shape scenes (the "
                                    "only colour the image shows is the answer)",
        "heldout_colour_two_shapes": "the same about two-shape scenes (the image shows two colours: the answer is the "
                                     "one of the shape the question names)",
        "probe_heldout_colour": "a linear probe of the frozen encoder's features (per image half), trained on the "
                                "training split, naming the colour of each held-out scene's held-out shape",
        "probe_heldout_kind": "the same probe naming the held-out shape's kind",
        **{f"{split}caption_{name}": f"after stage 1, {meaning}, {where}"
           for split, where in (("", "fresh training-split scenes"), ("heldout_", "held-out scenes"))
           for name, meaning in CAPTION_MEANINGS.items()},
        "text_only_caption_token_accuracy": "caption_token_accuracy of the frozen decoder without the image (its text "
                                            "prior), fresh training-split scenes",
        "text_only_caption_word_accuracy": "caption_word_accuracy of the frozen decoder without the image, fresh "
                                           "training-split scenes: what stage 1 must beat",
        "stage1_frozen_max_change": "largest |change| of any encoder or decoder tensor over stage 1 (exactly 0)",
        "stage1_projector_min_change": "over stage 1, the smallest of the projector tensors' largest |change| "
                                       "(above 0: every projector tensor trained)",
        "ablation_heldout_accuracy": "held-out exact match of the ablation (config `ablation`: LLaVA's plain loss "
                                     "without the question-only model, stage 2 without stage 1, or the other "
                                     "projector)",
        "ablation_train_accuracy": "the ablation's exact match on the fresh training-split questions",
        "stage1_final_loss": "stage 1 caption cross-entropy, mean over the last logging window",
        "stage2_final_loss": "stage 2 answer cross-entropy, mean over the last logging window",
        "text_only_final_loss": "the text-only fine-tuned baseline's answer cross-entropy, last logging window",
        "heldout_over_baseline": "heldout_accuracy minus the larger of text_only_finetuned_accuracy and "
                                 "prior_accuracy",
        "text_only_finetuned_over_prior": "text_only_finetuned_accuracy minus prior_accuracy (about 0: the questions "
                                          "alone do not give the answers away)",
        "image_gain": "heldout_accuracy minus shuffled_image_accuracy",
        "caption_word_gain": "caption_word_accuracy minus text_only_caption_word_accuracy: what the projected image "
                             "adds to the frozen decoder's captions after stage 1",
    },
    checks=[
        Check("stage1_frozen_max_change", "==", 0,
              why="stage 1 trains the projector alone: every encoder and decoder weight is bit-identical after it"),
        Check("stage1_projector_min_change", ">", 0,
              why="and every projector tensor did train in stage 1"),
        Check("train_accuracy", ">=", 0.95, presets=("default",),
              why="after stage 2 the questions about seen colour-kind pairs are answered almost always"),
        Check("heldout_accuracy", ">=", 0.95, presets=("default",),
              why="questions about colour-kind pairs no training image showed are answered almost always too"),
        Check("heldout_over_baseline", ">=", 0.08, presets=("toy",),
              why="held-out questions answered better than by the text-only fine-tuned decoder and the prior (toy)"),
        Check("heldout_over_baseline", ">=", 0.25, presets=("default",),
              why="held-out questions answered far better than by the text-only fine-tuned decoder and the prior"),
        Check("image_gain", ">=", 0.08, presets=("toy",),
              why="the answers come from the image: asked about another scene's image, accuracy falls back (toy)"),
        Check("image_gain", ">=", 0.25, presets=("default",),
              why="the answers come from the image: asked about another scene's image, accuracy falls back"),
        Check("text_only_finetuned_over_prior", "<", 0.1,
              why="fine-tuned on the same questions without the image, the decoder stays near the prior: the questions "
                  "do not give the answers away"),
    ],
)
