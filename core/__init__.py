"""The platform every module runs on: the registry and the module contract, typed configs, checks,
the run context (seeding, artifacts, run index, checkpoints), atomic files, paths, plots and the
torchrun process group. It imports nothing from the layers above it.

The ML building blocks live in its sub-packages and import the platform, never the other way round:
    core/nn/    the transformer family, attention variants, MoE, optimiser groups and schedule
    core/data/  the generated corpus and the tokenizer
    core/rl/    episode collection, returns and advantages, offline datasets
The learning layer (question banks, grader, briefs, progress, roadmap, smoke) is `learning/`.
tests/test_layers.py holds these arrows.
"""
