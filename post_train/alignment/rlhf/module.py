from core.checks import Check
from core.registry import Module

from .code.rlhf import Config, run

MODULE = Module(
    name="rlhf",
    category="alignment",
    title="RLHF: PPO with actor, critic, frozen reference and reward model (InstructGPT)",
    summary="The sft model optimised with PPO against the rm module's reward model: per-token KL penalty to the "
            "frozen sft model folded into the reward, the RM score on the last token, GAE with a value-head critic, "
            "clipped policy and value losses, several epochs per rollout; the same run with the KL coefficient 0 "
            "to see whether the policy games the reward model; the four models' memory against the cheat sheet.",
    depends=("sft", "rm"),
    interview_weight=5,
    interview_outcome="Draw the four models of PPO-RLHF and say which are trained; write the shaped per-token reward "
                      "and say where the RM score goes; quote your run's RM score, true accuracy and KL with and "
                      "without the KL penalty, and the memory bill against GRPO's.",
    presets={
        "toy": Config(n_prompts=600, n_held_out=60, steps=10, batch_size=16, epochs=2, minibatches=1, lr=2e-4,
                      critic_lr=5e-4, eval_every=10),
        "default": Config(),
    },
    run=run,
    produces_lm=True,
    threads=1,  # a tiny model: more threads only add synchronisation
    metrics={
        "sft_rm_score": "mean RM score of the sft model's sampled responses to the held-out problems",
        "rm_score": "the same after PPO with the KL penalty",
        "sft_accuracy": "true accuracy of the sft model's sampled held-out responses: the verifier's exact match",
        "accuracy": "the same after PPO with the KL penalty",
        "sft_lenient": "share of the sft model's sampled held-out responses whose last number is right, however phrased",
        "lenient": "the same after PPO with the KL penalty",
        "sft_format": "share of the sft model's sampled held-out responses that end in 'The answer is N.'",
        "format": "the same after PPO with the KL penalty",
        "kl": "KL(pi || pi_sft) of the held-out responses after PPO, nats per response (k1: sum of log-ratios)",
        "kl_max": "largest mean KL per response of any rollout during training",
        "reward_first": "mean RM score of the rollouts over the first 10% of the steps",
        "reward_last": "mean RM score of the rollouts over the last 10% of the steps",
        "clip_fraction_mean": "share of response tokens whose clipped ratio term was taken, mean over rollouts",
        "value_mse_first": "the critic's mean squared error against the Monte-Carlo return on the first rollout, "
                           "before any update (response tokens)",
        "zero_value_mse_first": "the same for a critic whose values are all 0: the sft backbone with a fresh zero head",
        "value_mse_last": "the critic's squared error against the return over the last 10% of the rollouts",
        "response_length": "mean response tokens of the held-out samples after PPO",
        "rm_score_no_kl": "held-out RM score after the same run with kl_coef = 0 (None without compare_without_kl)",
        "accuracy_no_kl": "held-out true accuracy after the kl_coef = 0 run",
        "lenient_no_kl": "held-out lenient accuracy after the kl_coef = 0 run",
        "format_no_kl": "held-out format compliance after the kl_coef = 0 run",
        "kl_no_kl": "held-out KL to the sft model after the kl_coef = 0 run, nats per response",
        "kl_max_no_kl": "largest mean KL per response of any rollout of the kl_coef = 0 run",
        "reward_last_no_kl": "mean RM score of the rollouts over the last 10% of the kl_coef = 0 run",
        "response_length_no_kl": "mean response tokens of the held-out samples after the kl_coef = 0 run",
        "params_actor": "parameters of the actor (the policy), counted from its tensors",
        "params_critic": "parameters of the critic (a backbone and a scalar head)",
        "params_reference": "parameters of the frozen reference (the sft model)",
        "params_reward_model": "parameters of the frozen reward model",
        "actor_weights_mb": "bytes of the actor's weights, MB",
        "actor_grads_mb": "bytes of the actor's gradients after a backward pass, MB",
        "actor_adam_mb": "bytes of the actor's AdamW moments (exp_avg, exp_avg_sq), MB",
        "critic_weights_mb": "bytes of the critic's weights, MB",
        "critic_grads_mb": "bytes of the critic's gradients, MB",
        "critic_adam_mb": "bytes of the critic's AdamW moments, MB",
        "reference_weights_mb": "bytes of the reference's weights, MB",
        "reward_model_weights_mb": "bytes of the reward model's weights, MB",
        "memory_mb": "all of the above: the four models' weights, gradients and optimizer states, MB",
        "cheat_sheet_mb": "the interview figure: 2 x (weights + grads + 2 Adam moments) + 2 frozen weights = 10 W",
        "grpo_mb": "what GRPO would hold here: the actor's weights, grads and moments and the reference (5 W)",
        "memory_over_cheat_sheet": "memory_mb / cheat_sheet_mb",
        "memory_over_grpo": "memory_mb / grpo_mb",
    },
    checks=[
        Check("rm_score", ">", ref="sft_rm_score",
              why="PPO raises the reward model's score of held-out responses over the sft model's, measured in the same run"),
        Check("reward_last", ">", ref="reward_first", why="the RM score of the rollouts rises during training"),
        Check("kl", "<", ref="kl_no_kl", when=lambda cfg: cfg.compare_without_kl and cfg.kl_coef > 0,
              why="the KL penalty is what holds the policy near the sft model: the same run without it drifts further"),
        Check("clip_fraction_mean", ">", 0.0,
              why="the ratio leaves [1 - eps, 1 + eps] after the first update on a rollout: pi_old is the sampling "
                  "policy, not the current one"),
        Check("value_mse_last", "<", ref="value_mse_first",
              why="the critic learns: its squared error against the return falls from the first rollout to the last"),
        Check("memory_over_cheat_sheet", ">", 0.999,
              why="the bytes measured from the four models' tensors match the cheat sheet's 10 W, counted another way..."),
        Check("memory_over_cheat_sheet", "<", 1.001,
              why="...to within the two scalar heads (a tied embedding counted twice, or a missing Adam moment, is far off)"),
    ],
)
