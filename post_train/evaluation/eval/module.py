from core.checks import Check
from core.registry import Module

from .code.eval import Config, run

MODULE = Module(
    name="eval",
    category="evaluation",
    title="Leaderboard: every model of the chain on held-out problems and stories",
    summary="Base, sft, grpo, gspo and any later stage that produces a model, side by side: held-out exact-match "
            "accuracy with a Wilson interval, pass@1 and pass@8, format compliance, and perplexity on held-out "
            "stories (what alignment costs the language model); a terminal table, CSV and a bar chart.",
    depends=("sft",),
    interview_weight=3,
    interview_outcome="Read your leaderboard's strict and lenient columns with their Wilson intervals, say how much "
                      "of GRPO's gain was the answer's format, and explain pass@k.",
    presets={
        "toy": Config(n_stories=60),
        "default": Config(),
    },
    run=run,
    threads=1,
    metrics={
        "models": "rows on the leaderboard (models present for this preset)",
        "base_accuracy": "held-out accuracy of the pretrained base model (greedy)",
        "best_accuracy": "the highest held-out accuracy on the leaderboard (greedy)",
        "sft_accuracy_reported": "the held-out accuracy the sft run reported for itself",
        "sft_accuracy_measured": "the same accuracy measured here, from the saved sft model",
        "base_perplexity": "perplexity of the base model on held-out stories",
        "worst_perplexity_ratio": "highest story perplexity of a post-trained model / the base model's",
    },
    checks=[
        Check("best_accuracy", ">", ref="base_accuracy",
              why="a post-trained model beats the pretrained base on held-out problems"),
        Check("sft_accuracy_measured", "==", ref="sft_accuracy_reported",
              why="the leaderboard reproduces, from the saved weights, exactly what the sft run measured"),
        Check("models", ">=", 2, why="at least the base and the sft model are on the board"),
    ],
)
