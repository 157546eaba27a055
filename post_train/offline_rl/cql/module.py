from core.checks import Check
from core.registry import Module
from core.rl.offline import QUALITIES

from .code.cql import METHODS, Config, run

MODULE = Module(
    name="cql",
    category="offline_rl",
    title="Conservative Q-Learning vs offline DQN vs behaviour cloning on CartPole datasets",
    summary="Train discrete CQL, naive offline DQN and behaviour cloning on the same fixed CartPole-v1 "
            "datasets (expert, noisy, random behaviour) for the same number of updates: DQN's values explode "
            "on actions the data never took and its policy collapses, CQL's conservative term keeps the "
            "values below 1/(1-gamma) and the policy at or above the behaviour's.",
    interview_weight=2,
    interview_outcome="Explain why naive offline DQN overestimates actions the data never took and how CQL's "
                      "penalty makes the learned Q a lower bound.",
    presets={
        "toy": Config(dataset_size=5_000, updates=1_000, batch_size=256, lr=3e-3, eval_every=500, eval_episodes=5,
                      final_eval_episodes=10),
        "default": Config(),
    },
    run=run,
    threads=1,  # tiny MLPs: intra-op threads only add synchronisation
    metrics={
        "value_upper_bound": "1/(1-gamma): the discounted return of a reward of 1 at every step, forever",
        **{f"behaviour_return_{q}": f"mean episode return of the policy that collected the {q} data"
           for q in QUALITIES},
        **{f"mc_start_{q}": f"mean discounted Monte-Carlo return of the {q} data from its episode starts"
           for q in QUALITIES},
        **{f"{m}_return_{q}": f"{m}: greedy policy's mean return in the real env after training on {q} data"
           for q in QUALITIES for m in METHODS},
        **{f"{m}_v_start_{q}": f"{m}: mean max_a Q(s_0, a) over the {q} data's episode starts after training"
           for q in QUALITIES for m in ("cql", "dqn")},
        "reachable_start_expert": "mean sum_{t<K} gamma^t r_t from the expert data's episode starts, "
                                  "K = updates / target_update_every: the value K Bellman backups reach",
        "cql_v_start_to_reachable_expert": "cql_v_start_expert / reachable_start_expert",
        "dqn_to_cql_return_expert": "dqn_return_expert / cql_return_expert",
        "cql_to_behaviour_return_random": "cql_return_random / behaviour_return_random",
    },
    checks=[
        Check("cql_return_expert", ">=", 450,
              why="CQL on expert-only data keeps the expert's behaviour (the expert scores 500)"),
        Check("dqn_to_cql_return_expert", "<", 0.5,
              why="naive offline DQN on the same data and updates collapses: its max picks actions the data "
                  "never shows"),
        Check("cql_v_start_expert", "<=", ref="value_upper_bound",
              why="CQL's values stay below what any policy can earn (conservative); alpha = 0 fails it at default"),
        Check("cql_v_start_to_reachable_expert", ">=", 0.8,
              why="a lower bound that is not absurdly low: the TD backups carry the data's rewards about as far as "
                  "K target copies allow (measured 1.0); the penalty alone leaves Q at the scale of BC logits"),
        Check("dqn_v_start_expert", ">", ref="value_upper_bound", presets=("default",),
              why="DQN's values exceed what any policy can earn: over-estimation by extrapolation"),
        Check("cql_to_behaviour_return_random", ">", 2.0,
              why="from random-behaviour data CQL learns a policy far better than the one that collected it; "
                  "cloning that data cannot (BC scores 0.5-1.2 times the behaviour at toy seeds 0-4)"),
    ],
)
