from core.checks import Check
from core.registry import Module

from .code.rm import Config, run

MODULE = Module(
    name="rm",
    category="alignment",
    title="Reward model: the sft model with a scalar head, trained with the Bradley-Terry loss",
    summary="The sft model's unembedding replaced by a linear head read at the last real token, trained on "
            "preference pairs (right vs wrong answer, verifiable vs plain format, answer vs off-topic) with "
            "-log sigma(r_w - r_l) and a reward-centring term; held-out pairwise accuracy per kind against the sft "
            "model's own likelihood, reward statistics, padding invariance; the centred model is what rlhf optimises.",
    depends=("sft",),
    interview_weight=4,
    interview_outcome="Write the Bradley-Terry loss and say why the reward is read at the last real token; explain "
                      "why rewards are only defined up to a constant and how you centre them before PPO; quote your "
                      "run's held-out accuracy per kind and say which kind is hard and why.",
    presets={
        "toy": Config(n_pairs=600, n_held_out=60, steps=60, batch_size=16, lr=1e-3, warmup=5, eval_every=20),
        "default": Config(),
    },
    run=run,
    threads=1,  # a tiny model: more threads only add synchronisation
    metrics={
        "held_out_accuracy": "share of held-out pairs (every kind on every held-out prompt) with r(chosen) > r(rejected)",
        "accuracy_correct": "held-out pairwise accuracy on right vs slipped answers (only the digits differ)",
        "accuracy_format": "held-out pairwise accuracy on 'The answer is N.' vs a plain sentence or bare step",
        "accuracy_on_topic": "held-out pairwise accuracy on the worked answer vs an off-topic story sentence",
        "baseline_accuracy": "the same accuracy with the sft model's log-likelihood of the reply as the reward",
        "baseline_accuracy_correct": "that baseline on the right vs slipped answers",
        "correct_reward_gap": "mean reward of the right answers minus that of the slipped ones, held-out prompts",
        "chosen_reward_mean": "mean reward of the held-out chosen replies (after centring)",
        "chosen_reward_std": "std of the held-out chosen rewards",
        "rejected_reward_mean": "mean reward of the held-out rejected replies (after centring)",
        "rejected_reward_std": "std of the held-out rejected rewards",
        "margin_mean": "mean of r(chosen) - r(rejected) over the held-out pairs",
        "held_out_reward_mean": "mean reward of all held-out replies after centring (near 0 when the offset transfers)",
        "reward_offset": "mean training reward subtracted in the head's bias after training (0 with normalize=false)",
        "padding_max_abs_diff": "largest |reward in a batch padded to the full context - reward of the reply alone|",
        "train_loss_first_10pct": "mean loss over the first 10% of the steps",
        "train_loss_last_10pct": "mean loss over the last 10% of the steps",
        "initial_loss": "loss of the first batch: ln 2 = 0.6931 when the head starts at zero",
        "train_pairs": "training pairs whose two conversations fit the context",
        "trainable_share": "share of the parameters that are trained (1 unless freeze_layers > 0)",
    },
    checks=[
        Check("held_out_accuracy", ">", 0.75,
              why="far above chance (0.5, the zero head's score) on prompts never trained on"),
        Check("accuracy_format", ">", 0.9,
              why="the answer sentence the verifier reads is preferred to a plain or missing one on held-out prompts"),
        Check("accuracy_on_topic", ">", 0.9, why="an answer is preferred to an off-topic story sentence"),
        Check("correct_reward_gap", ">", 0.0, presets=("default",),
              why="on held-out prompts a right answer is rewarded above a wrong one in the same words"),
        Check("padding_max_abs_diff", "<", 1e-4,
              why="padding a batch to the full context changes no reward: the score is read at the last real token"),
        Check("train_loss_last_10pct", "<", ref="train_loss_first_10pct", why="the Bradley-Terry loss falls"),
    ],
)
