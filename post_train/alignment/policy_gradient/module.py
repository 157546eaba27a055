from core.checks import Check
from core.registry import Module

from .code.policy_gradient import VARIANTS, Config, run

MODULE = Module(
    name="policy_gradient",
    category="alignment",
    title="REINFORCE with reward-to-go, with and without a learned baseline, on CartPole",
    summary="The first policy-gradient learner: sample complete episodes, weight each log-probability by "
            "the reward-to-go (minus a learned V(s)), take a gradient step; learning curves over seeds.",
    interview_weight=4,
    interview_outcome="Derive the policy gradient with the log-derivative trick, say why reward-to-go and a learned "
                      "baseline cut variance without adding bias, and compare your learning curves with and without "
                      "the baseline.",
    presets={
        "toy": Config(updates=30, n_seeds=3),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny MLPs: intra-op threads only add synchronisation
    metrics={
        "random_return": "mean episode return of a uniformly random policy, same run (~22)",
        "baseline_explained_variance": "1 - Var(G - V)/Var(G) of each batch's reward-to-go by the baseline V "
                                       "fitted on earlier batches, mean over the second half of the updates and seeds",
        **{m: f"{v}: {d}" for v in VARIANTS for m, d in {
            f"{v}_final_return": "mean over seeds of each learner's last-final_episodes-episode mean return",
            f"{v}_worst_final_return": "the lowest of those per-seed last-final_episodes means",
            f"{v}_final_over_random": "final_return / random_return",
            f"{v}_mean_return": "mean return over all training episodes and seeds (area under the curve)",
            f"{v}_mean_over_random": "mean_return / random_return",
            f"{v}_seeds_solved": "fraction of seeds whose trailing final_episodes mean reached solved_return",
            f"{v}_episodes_to_solve": "mean over the solved seeds of the episodes played until then (null: none)",
            f"{v}_steps_to_solve": "mean over the solved seeds of the env steps played until then (null: none)",
        }.items()},
    },
    checks=[
        Check("baseline_final_over_random", ">", 3.0,
              why="REINFORCE with baseline clearly beats a random policy measured in the same run (untrained: ~1x)"),
        Check("baseline_mean_over_random", ">", 2.5,
              why="...over the whole learning curve, not only at its end: the mean return of all training episodes "
                  "(toy seeds 0-7: 2.9-4.5x random; weighting every action by the whole episode's return: 2.1x)"),
        Check("baseline_mean_return", ">", ref="plain_mean_return", when=lambda cfg: not cfg.normalize,
              why="the learned baseline cuts the gradient variance, so with the same inits and env seeds it learns "
                  "faster than plain REINFORCE (area under the curve; toy seeds 0-7: by 7-42%); not with "
                  "normalize=true, whose centring hands plain REINFORCE a baseline too"),
        Check("baseline_explained_variance", ">", 0.1,
              why="V, fitted on earlier batches, predicts the reward-to-go of a new batch better than a constant "
                  "(toy seeds 0-7: 0.28-0.41); fitted to the wrong target it explains ~0"),
        Check("baseline_seeds_solved", ">=", 1.0, presets=("default",),
              why="every seed's trailing 20-episode mean reaches 475 within the budget (measured: by 550 of 1000 episodes)"),
        Check("baseline_final_return", ">=", 475.0, presets=("default",),
              why="...and stays there: the last 20 training episodes average >= 475 (mean over the seeds)"),
    ],
)
