from core.checks import Check
from core.registry import Module

from .code.td_learning import Config, run

MODULE = Module(
    name="td_learning",
    category="rl_basics",
    title="TD learning: TD(λ) prediction on the random walk, SARSA vs Q-learning on the cliff",
    summary="Sweep online TD(λ) (accumulating traces) over λ and α on the 19-state random walk "
            "against its closed-form values, then train SARSA and Q-learning on gymnasium's "
            "CliffWalking-v1: the on-policy learner earns more while exploring, the off-policy one "
            "learns the optimal cliff-edge path. The control loop checkpoints and resumes.",
    interview_weight=2,
    interview_outcome="Explain bootstrapping and the λ-return as a mix of n-step returns; say which of SARSA and "
                      "Q-learning walks the cliff edge and why the other earns more while it learns.",
    presets={
        "toy": Config(prediction_runs=30, control_runs=8, checkpoint_every=100),
        "default": Config(),
    },
    run=run,
    metrics={
        "rms_initial": "RMS error of the all-zero initial estimate against v(i) = (i - 10)/10",
        "rms_best_lambda0": "lowest (over α) RMS error of TD(0), first episodes, mean over runs",
        "rms_ratio_lambda0": "rms_best_lambda0 / rms_initial: the share of the initial error TD(0) leaves",
        "rms_best_lambda1": "lowest (over α) RMS error of TD(1) (accumulating traces)",
        "rms_best_intermediate": "lowest RMS error over all α and all 0 < λ < 1",
        "best_intermediate_lambda": "the 0 < λ < 1 reaching rms_best_intermediate",
        "best_intermediate_alpha": "the α reaching rms_best_intermediate",
        "settings_worse_than_initial": "(λ, α) settings whose mean RMS error exceeds rms_initial "
                                       "(too large a step with long traces: unstable or diverged)",
        "sarsa_online_return": "SARSA's mean return per episode while learning (ε-greedy), after skip_episodes",
        "qlearning_online_return": "Q-learning's mean return per episode while learning, after skip_episodes",
        "online_return_gap_z": "mean over runs of (SARSA - Q-learning) online return, in standard errors of that mean",
        "sarsa_greedy_return": "return of SARSA's final greedy policy from the start, mean over runs",
        "sarsa_greedy_edge_fraction": "fraction of runs whose SARSA greedy policy walks the 13-step cliff-edge path",
        "qlearning_greedy_return": "return of Q-learning's final greedy policy, mean over runs (optimal: -13)",
    },
    checks=[
        Check("rms_ratio_lambda0", "<", 0.9,
              why="TD(0) learns: its best step size clearly beats the untouched all-zero guess (a no-op scores 1)"),
        Check("rms_best_intermediate", "<", ref="rms_best_lambda0",
              why="an intermediate λ beats one-step TD: traces pass the exit reward back faster"),
        Check("rms_best_intermediate", "<", ref="rms_best_lambda1",
              why="an intermediate λ beats TD(1)'s Monte-Carlo-like high-variance updates"),
        Check("qlearning_greedy_return", ">=", -13,
              why="Q-learning's greedy policy walks the optimal cliff-edge path (13 steps) in every run"),
        Check("sarsa_online_return", ">", ref="qlearning_online_return",
              why="while exploring, on-policy SARSA keeps off the cliff edge and earns more than Q-learning"),
        Check("online_return_gap_z", ">", 4.0, when=lambda c: c.control_runs > 1,
              why="...by far more than run-to-run noise (a SARSA that bootstraps on the max is Q-learning: z ~ 0)"),
        Check("sarsa_greedy_edge_fraction", "<", 0.5,
              why="SARSA values its ε-greedy behaviour, for which the edge is dangerous: its greedy path detours"),
    ],
)
