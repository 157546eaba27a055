from core.checks import Check
from core.registry import Module

from .code.advantage import ESTIMATORS, Config, run

MODULE = Module(
    name="advantage",
    category="rl_basics",
    title="Advantage estimators: REINFORCE, baseline, TD(0), n-step and GAE on CartPole",
    summary="Train a policy-gradient learner on CartPole-v1 with five advantage estimators and measure, "
            "on a fixed policy, how much each one cuts the variance of the gradient and what bias it pays.",
    interview_weight=3,
    interview_outcome="Show why a state-dependent baseline leaves the policy gradient unbiased, and quote the "
                      "variance reduction your run measured.",
    presets={
        # 1000 variance episodes: with 500 a baseline read one step late (V(s_{t+1}), action-dependent)
        # reached only |z| = 4.4 at seed 0; with 1000 it gives 12-16 over seeds 0-2
        "toy": Config(updates=30, n_seeds=1, value_fit_episodes=200, variance_episodes=1000),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny MLPs: intra-op threads only add synchronisation (10x slower on a busy 2-core box)
    metrics={
        **{f"{est}_final_return": f"{est}: mean episode return over the last final_window updates (mean over seeds)"
           for est in ESTIMATORS},
        **{f"{est}_mean_return": f"{est}: mean episode return over all updates and seeds (area under the curve)"
           for est in ESTIMATORS},
        "random_return": "mean episode return of a uniformly random policy (baseline, ~22)",
        "best_over_random": "best estimator's final return / random_return",
        "fixed_policy_return": "mean return of the fixed policy of the gradient-variance experiment",
        "value_explained_variance": "1 - Var(G_t - V(s_t)) / Var(G_t) of the fixed V on the measured episodes",
        "mc_grad_total_variance": "tr Cov(g_mc): total variance of the per-episode REINFORCE gradient",
        **{f"{est}_variance_ratio": f"tr Cov(g_{est}) / tr Cov(g_mc) on the same episodes"
           for est in ESTIMATORS if est != "mc"},
        **{f"{est}_bias_z": f"|z| of the mean of (g_{est} - g_mc) projected on a fixed direction (0 if unbiased)"
           for est in ESTIMATORS if est != "mc"},
    },
    checks=[
        Check("best_over_random", ">", 3.0, why="the best learner clearly beats a random policy (it learned)"),
        Check("baseline_variance_ratio", "<", 0.8, why="a state-value baseline reduces the gradient variance"),
        Check("baseline_bias_z", "<", 4.0, why="...and keeps the gradient unbiased (paired mean difference is 0)"),
        Check("baseline_mean_return", ">", ref="mc_mean_return", presets=("default",),
              why="with the lower-variance gradient the baseline learner improves faster than REINFORCE"),
    ],
)
