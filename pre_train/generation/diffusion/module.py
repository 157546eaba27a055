from core.checks import Check
from core.registry import Module

from .code.diffusion import Config, run

MODULE = Module(
    name="diffusion",
    category="generation",
    title="DDPM on 2-D toy data: forward noising, eps-prediction, ancestral sampling",
    summary="Ho et al.'s DDPM with a linear or cosine beta schedule and an eps-predicting MLP with a sinusoidal "
            "time embedding, trained on two moons and 8 Gaussians; samples scored by their closed-form distance "
            "to the data manifold against pure noise, the closed-form q(x_t|x_0) checked against the iterated chain.",
    interview_weight=3,
    interview_outcome="Derive q(x_t|x_0) and the eps-prediction loss from the forward chain, write the ancestral "
                      "sampling step, say what the beta schedule and sigma_t choose, and quote your run's share of "
                      "samples on the manifold against pure noise.",
    presets={
        "toy": Config(steps=3000, batch_size=128, n_samples=1000, n_forward=20_000),
        "default": Config(),
    },
    run=run,
    threads=1,  # a 2-D MLP: intra-op threads only add synchronisation
    metrics={
        "share": "share of generated samples within 0.1 of the data manifold, the worse of the two datasets",
        "share_moons": "the same for two moons (distance to the two half-circle arcs)",
        "share_gaussians": "the same for 8 Gaussians (distance to the nearest of the 8 centres)",
        "noise_share": "share of N(0, I) samples (the sampler's start x_T) within 0.1 of the manifold, the higher "
                       "of the two datasets: the baseline",
        "data_share": "share of fresh true data points within 0.1 of the manifold, the lower of the two (the ceiling)",
        "coverage": "share of fresh true data points with a generated sample within 0.1, the worse dataset (recall)",
        "balance_tv": "total variation between the samples' shares of equal-probability parts of the manifold (6 slices "
                      "of each moon arc, the 8 centres) and the data's uniform shares, the worse dataset",
        "data_balance_tv": "the same for fresh true data points (the sampling noise of the measure), the higher of the two",
        "std_ratio_min": "std of the samples / std of the data (mean over coordinates), the lower of the two datasets",
        "std_ratio_max": "the same, the higher of the two datasets",
        "forward_max_dev": "largest |difference| of the per-coordinate mean or std between closed-form draws of "
                           "q(x_t|x_0) and the forward chain iterated t steps, over the compared t",
        "alpha_bar_T": "abar_T, the signal left at the last step (about 0: x_T is pure noise)",
        "final_loss_moons": "L_simple over the last logging window, two moons",
        "final_loss_gaussians": "L_simple over the last logging window, 8 Gaussians",
    },
    checks=[
        Check("share", ">=", 0.7, presets=("toy",),
              why="most toy samples land within 0.1 of the manifold on both datasets (pure noise: about 0.13)"),
        Check("share", ">=", 0.95, presets=("default",),
              why="nearly every sample lands within 0.1 of the manifold on both datasets (true data: about 0.995)"),
        Check("coverage", ">=", 0.9,
              why="the samples cover the whole manifold: a sampler that collapses onto a few points fails"),
        Check("balance_tv", "<", 0.12,
              why="the mass is spread over the manifold as in the data (1000 true points: about 0.05), not only on it"),
        Check("noise_share", "<", 0.25,
              why="the metric is strict: pure N(0, I) noise scores low, so a high share is not the band's width"),
        Check("forward_max_dev", "<", 0.05,
              why="closed-form q(x_t|x_0) has the mean and std of the iterated chain (sampling noise: about 0.02)"),
    ],
)
