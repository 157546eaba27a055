from core.checks import Check
from core.registry import Module

from .code.blip2 import Config, run

MODULE = Module(
    name="blip2",
    category="vlm",
    title="BLIP-2's Q-Former: ITC + ITM + ITG between a frozen ViT and a frozen decoder",
    summary="Learned queries in a small BERT-like Q-Former read a frozen ViT's patch features; stage 1 trains them "
            "with image-text contrastive (learnt temperature), matching (hard negatives) and image-grounded "
            "generation, each with its attention mask; stage 2 feeds the query outputs as a soft prompt to the frozen "
            "shape-world decoder. Held-out retrieval recall@1 against chance, VQA against the text-only decoder.",
    interview_weight=3,
    interview_outcome="Draw the Q-Former and its three masks, write the ITC loss with its temperature and say how ITM "
                      "mines hard negatives, explain why BLIP-2 keeps both the image encoder and the LLM frozen and what "
                      "the queries buy, and quote your run's held-out recall@1 against chance.",
    presets={
        "toy": Config(train_scenes=1000, stage1_steps=200, stage2_steps=150, batch=32, eval_scenes=120, eval_every=40,
                      ablation=False),
        "default": Config(),
    },
    run=run,
    threads=1,  # a 236k-parameter Q-Former on 64-wide features: intra-op threads only add synchronisation
    metrics={
        "heldout_recall_i2t": "recall@1 image -> text on held-out images (ITC similarity): the retrieved caption's text "
                              "equals the image's own",
        "heldout_recall_t2i": "recall@1 text -> image on the same gallery: the retrieved image's caption equals the query",
        "recall_chance": "recall@1 of a uniformly random pick on that gallery (either direction): the share of the "
                         "gallery that carries one's own caption, from its repeats",
        "recall_over_chance": "the lower of the two held-out recalls divided by chance",
        "heldout_recall_i2t_itm": "held-out recall@1 image -> text with each image's ITC top-k re-ranked by ITM + ITC",
        "heldout_recall_t2i_itm": "held-out recall@1 text -> image, ITC top-k re-ranked by ITM + ITC",
        "seen_recall_i2t": "recall@1 image -> text on fresh training-split images (colour-kind pairs seen in training)",
        "seen_recall_t2i": "recall@1 text -> image on fresh training-split images",
        "heldout_itm_accuracy": "ITM head on held-out images: right on each image's own caption and on its most "
                                "ITC-similar wrong caption, balanced (0.5 for a head blind to the pair)",
        "caption_accuracy": "share of fresh training-split images whose greedy ITG caption (stage 1, the Q-Former's own "
                            "decoder head) is exactly the true caption",
        "heldout_caption_accuracy": "the same on held-out images (every one has a colour-kind pair no caption showed)",
        "temperature": "the learnt ITC temperature tau at the end of stage 1 (starts at 0.07, kept >= 0.01)",
        "final_itc_loss": "ITC loss over the last logging window of stage 1",
        "final_itm_loss": "ITM loss over the last logging window (predicting 'no match' for all: 0.64)",
        "final_itg_loss": "ITG loss (nats per caption piece) over the last logging window",
        "heldout_accuracy": "VQA exact match on held-out scenes' questions (each needs a held-out colour-kind pair), "
                            "the image as the soft prompt of the frozen decoder",
        "train_accuracy": "VQA exact match on fresh training-split scenes (seen pairs)",
        "text_only_accuracy": "the frozen decoder's exact match on the held-out questions without an image",
        "prior_accuracy": "each held-out question answered with its most frequent training answer (the best "
                          "without the image)",
        "heldout_gain": "heldout_accuracy minus the better of text_only_accuracy and prior_accuracy",
        "heldout_accuracy_no_stage1": "held-out VQA exact match after stage 2 alone, from an untrained Q-Former with "
                                      "the same steps and batches (empty when ablation is off)",
        "final_stage2_loss": "stage-2 target-token loss over the last logging window",
        "decoder_drift": "largest |change| of any decoder weight over stage 2 (0: frozen)",
    },
    checks=[
        Check("recall_over_chance", ">=", 10.0,
              why="held-out images retrieve their caption and captions their image far above chance in both directions "
                  "(an untrained Q-Former: about chance)"),
        Check("heldout_recall_i2t", ">=", 0.2, presets=("toy",),
              why="200 steps already put a held-out image's own description first for many images"),
        Check("heldout_recall_i2t", ">=", 0.75, presets=("default",),
              why="most held-out images retrieve a caption with their exact description"),
        Check("heldout_recall_t2i", ">=", 0.75, presets=("default",),
              why="most held-out captions retrieve an image of their exact description"),
        Check("caption_accuracy", ">=", 0.5, presets=("default",),
              why="greedy ITG decoding writes the exact caption of most seen-pair images: it learnt to caption from "
                  "the queries, not to copy the text it must predict"),
        Check("heldout_itm_accuracy", ">=", 0.7, presets=("default",),
              why="ITM tells an image's caption from its hardest wrong caption (blind: 0.5)"),
        Check("heldout_gain", ">=", 0.05, presets=("default",),
              why="the soft prompt carries the image: held-out answers beat the frozen decoder without it and the prior"),
        Check("decoder_drift", "==", 0.0,
              why="stage 2 trains the Q-Former and the projection only; the decoder stays bit-exact"),
    ],
)
