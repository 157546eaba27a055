from core.checks import Check
from core.registry import Module

from .code.mdp import Config, run

MODULE = Module(
    name="mdp",
    category="rl_basics",
    title="MDPs: value iteration and policy iteration on FrozenLake",
    summary="Solve FrozenLake-v1 from its own transition model with value iteration and policy "
            "iteration, check both against a closed-form linear solve, then play the greedy policy "
            "in the real environment.",
    interview_weight=2,
    interview_outcome="Write the Bellman optimality equation from memory and say why value iteration and policy "
                      "iteration must reach the same V*; quote your run's greedy success rate against the model's "
                      "exact value and the random policy.",
    presets={
        "toy": Config(eval_episodes=2000),
        "default": Config(eval_episodes=20000),
    },
    run=run,
    metrics={
        "vi_sweeps": "value-iteration sweeps until the Bellman residual < theta",
        "pi_iterations": "policy-iteration improvement steps until the policy is stable",
        "v_start": "V*(start state)",
        "v_start_mc": "mean discounted return gamma^(T-1) 1{goal} of the greedy policy in the real env, no time limit",
        "v_start_z": "|v_start - v_start_mc| in standard errors",
        "vi_pi_max_abs_diff": "max_s |V_VI(s) - V_PI(s)|",
        "bellman_solve_max_abs_diff": "max_s |V_VI(s) - solve((I - gamma P_pi) V = r_pi)(s)|",
        "success_rate": "fraction of real-env episodes the greedy policy reaches the goal",
        "success_rate_model": "exact probability of reaching the goal within the time limit, from the model",
        "success_z": "|success_rate - success_rate_model| in binomial standard errors",
        "random_success_rate": "success rate of a uniformly random policy (baseline)",
    },
    checks=[
        Check("vi_pi_max_abs_diff", "<", 1e-6, why="two different algorithms reach the same V*"),
        Check("bellman_solve_max_abs_diff", "<", 1e-6, why="V* solves the linear Bellman system of its greedy policy"),
        Check("v_start_z", "<", 4.0,
              why="the real env pays the greedy policy V*(start) on average: the model P, R that both solvers share is right"),
        Check("success_rate", ">=", 0.70,
              why="at gamma >= 0.99 on the slippery 4x4 map the greedy policy wins in the real env (random: ~1.5%)",
              when=lambda c: c.gamma >= 0.99 and c.map_name == "4x4" and c.is_slippery),
        Check("success_z", "<", 4.0, why="the real env agrees with the model's exact success probability"),
    ],
)
