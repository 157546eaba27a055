from core.checks import Check
from core.registry import Module

from .code.actor_critic import Config, run

MODULE = Module(
    name="actor_critic",
    category="alignment",
    title="A2C: synchronous advantage actor-critic with GAE on vectorised CartPole",
    summary="Step 8 CartPole envs a fixed number of steps, estimate advantages with GAE (bootstrapping "
            "time-limit truncations), take one step on policy loss + value loss - entropy bonus.",
    interview_weight=3,
    interview_outcome="Explain what the critic replaces in REINFORCE, what the value loss and the entropy bonus do, "
                      "and why a time-limit truncation is bootstrapped while a termination is not.",
    presets={
        "toy": Config(total_steps=50_000, n_seeds=2, max_episode_steps=200),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny MLPs: intra-op threads only add synchronisation
    metrics={
        "random_return": "mean episode return of a uniformly random policy, same run (~22)",
        "final_return": "mean over seeds of each learner's last-final_episodes-training-episode mean return",
        "worst_final_return": "the lowest of those per-seed means",
        "final_over_random": "final_return / random_return",
        "greedy_return": "mean over seeds of the greedy (argmax) final policy's return over eval_episodes",
        "seeds_solved": "fraction of seeds whose trailing final_episodes mean reached solved_return",
        "steps_to_solve": "mean over the solved seeds of the env steps until then (null: none)",
        "explained_variance_peak": "highest mean over 20 consecutive updates of 1 - Var(R - V)/Var(R), each rollout's "
                                   "targets R against V before the update (mean over learners): the critic does fit "
                                   "the returns while they vary",
        "cut_advantage_mean": "mean GAE advantage of the steps a time limit cut, all learners and updates: an "
                              "ordinary TD error r + gamma V(s_final) - V(s) when the cut is bootstrapped",
    },
    checks=[
        Check("final_over_random", ">", 3.0,
              why="A2C clearly beats a random policy measured in the same run (an untrained one stays ~1x)"),
        Check("explained_variance_peak", ">", 0.3,
              why="the critic explains most of the variance of its targets while they vary (toy seeds 0-4: 0.79-0.97); "
                  "a critic that does not learn stays at ~0"),
        Check("cut_advantage_mean", ">", -10.0,
              why="a time-limit cut is bootstrapped with gamma V(s_final), so its advantage is an ordinary TD error "
                  "(toy seeds 0-4: +0.4 to +0.5); treated as an end it is ~1 - V(s), about -40"),
        Check("cut_advantage_mean", "<", 10.0,
              why="...and bootstrapped once, not twice: |mean| within 10% of the return scale 1/(1 - gamma) = 100"),
        Check("worst_final_return", ">=", 475.0, presets=("default",),
              why="every seed solves CartPole-v1: its last 20 training episodes average >= 475"),
        Check("greedy_return", ">=", 475.0, presets=("default",),
              why="the final policies, played greedily on fresh episodes, balance the pole to the limit too"),
    ],
)
