from core.checks import Check
from core.registry import Module

from .code.sft import Config, run

MODULE = Module(
    name="sft",
    category="alignment",
    title="Supervised fine-tuning: a chat model for word problems, loss on the response only",
    summary="Full fine-tuning of the pretrained nanogpt model on chat-formatted arithmetic word problems with "
            "worked answers (plus story requests): the loss covers response tokens only; held-out accuracy and "
            "format compliance of the base and the fine-tuned model, measured in the same run.",
    depends=("nanogpt",),
    interview_weight=5,
    interview_outcome="Explain why the loss counts only the response tokens and what the chat template adds; quote "
                      "your run's strict and lenient held-out accuracy and say why they differ.",
    presets={
        "toy": Config(n_problems=1500, n_held_out=90, steps=450, batch_size=32, lr=2e-3, warmup=20, eval_every=150,
                      checkpoint_every=150),
        "default": Config(),
    },
    run=run,
    produces_lm=True,
    metrics={
        "base_accuracy": "held-out accuracy of the pretrained base model: right answer stated as 'The answer is N.' (greedy)",
        "base_lenient": "held-out share of the base model's responses whose last number is the answer (any phrasing)",
        "base_format": "share of the base model's held-out responses that end in 'The answer is N.'",
        "sft_accuracy": "held-out accuracy after SFT: right answer stated as 'The answer is N.' (greedy)",
        "sft_lenient": "held-out share of the fine-tuned model's responses whose last number is the answer",
        "sft_format": "share of the fine-tuned model's held-out responses that end in 'The answer is N.'",
        "train_loss_first_10pct": "mean response-token loss over the first 10% of the steps",
        "train_loss_last_10pct": "mean response-token loss over the last 10% of the steps",
        "response_token_share": "share of the training tokens that carry loss (response + closing <|end|>)",
        "examples": "training conversations that fit the context",
    },
    checks=[
        Check("sft_lenient", ">", ref="base_lenient",
              why="fine-tuning beats the base model it started from on held-out problems (same run, same problems)"),
        Check("sft_lenient", ">", 0.25, presets=("toy",),
              why="a quarter of unseen problems answered right: the worked steps are learned, not only the template"),
        Check("sft_format", ">", ref="base_format", why="the model learned to end in the verifiable answer sentence"),
        Check("train_loss_last_10pct", "<", ref="train_loss_first_10pct", why="the response loss falls"),
    ],
)
