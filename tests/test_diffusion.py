"""diffusion: the schedules, the closed-form forward process against the iterated chain (exactly, by the
moment recursion, and statistically, by sampling), one ancestral step against the posterior q(x_{t-1}|x_t, x_0),
the time embedding, the closed-form manifold distance, and the toy run's checks. The toy preset's
determinism is covered in tests/test_modules.py."""
from __future__ import annotations

import math

import pytest
import torch

from core.nn.ddpm import Schedule, betas_for, p_sample_step, time_embedding
from pre_train.generation.diffusion.code.diffusion import (
    DATA_NOISE, MOONS_SHIFT, NEAR, RADIUS_8G, EpsMLP, balance_tv, coverage, forward_comparison, gaussian_centres,
    make_data, manifold_distance, share_near,
)

T = 1000


@pytest.fixture(params=["linear", "cosine"])
def sched(request) -> Schedule:
    return Schedule(betas_for(request.param, T))


def test_schedule_properties(sched):
    betas, abar = sched.betas, sched.alpha_bar
    assert betas.shape == abar.shape == (T,)
    assert (betas > 0).all() and (betas < 1).all()
    assert (abar[1:] < abar[:-1]).all(), "abar_t must fall strictly: every step adds noise"
    assert 0.999 < abar[0] < 1 and abar[-1] < 1e-4, "t = 1 keeps nearly all the signal, t = T nearly none"
    assert sched.alpha_bar_prev[0] == 1 and torch.equal(sched.alpha_bar_prev[1:], abar[:-1])
    assert (sched.beta_tilde <= betas + 1e-15).all() and sched.beta_tilde[0] == 0


def test_linear_and_cosine_endpoints():
    linear = betas_for("linear", T)
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    cosine = Schedule(betas_for("cosine", T))
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 250, 500, 750, 990):   # abar_t = f(t) / f(0) wherever the 0.999 clip is inactive
        assert cosine.alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert cosine.alpha_bar[T // 2 - 1].item() == pytest.approx(0.5, abs=0.02)   # half the signal at t = T/2
    assert cosine.betas.max().item() == pytest.approx(0.999)                    # the clip binds at t = T
    assert cosine.betas[0] < 1e-4


def test_closed_form_q_equals_the_iterated_moment_recursion(sched):
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps gives mean_t = sqrt(1 - beta_t) mean_{t-1} and
    var_t = (1 - beta_t) var_{t-1} + beta_t from (x_0, 0): q_sample must give exactly these, at every t."""
    x0 = torch.tensor([[1.3, -0.7]], dtype=torch.float64)
    mean, var = x0.clone(), 0.0
    for i in range(T):
        beta = float(sched.betas[i])
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
        t = torch.tensor([i])
        assert torch.allclose(sched.q_sample(x0, t, torch.zeros_like(x0)), mean, rtol=1e-9, atol=1e-12)
        unit = sched.q_sample(x0, t, torch.ones_like(x0)) - sched.q_sample(x0, t, torch.zeros_like(x0))
        assert torch.allclose(unit, torch.full_like(x0, math.sqrt(var)), rtol=1e-9, atol=1e-12)


def test_closed_form_q_matches_sampling_the_chain(sched):
    rows = forward_comparison(sched, 20_000, torch.Generator().manual_seed(0))
    assert [r["t"] for r in rows] == [1, 2, 10, 100, 250, 500, 750, 1000]
    assert max(r["max_dev"] for r in rows) < 0.05
    for r in rows:
        assert r["closed_mean_x"] == pytest.approx(r["expected_mean_x"], abs=0.03)
        assert r["iter_std_x"] == pytest.approx(r["expected_std"], abs=0.03)


class Oracle(torch.nn.Module):
    """An eps_theta that returns the true noise: the sampler's mean must then be the posterior mean."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps


@pytest.mark.parametrize("i", [0, 1, 57, 499, T - 1])
def test_one_ancestral_step_is_the_posterior_mean_plus_sigma_z(sched, i):
    gen = torch.Generator().manual_seed(i)
    x0, eps = torch.randn((64, 2), generator=gen), torch.randn((64, 2), generator=gen)
    xt = sched.q_sample(x0, torch.full((64,), i), eps)
    for kind in ("beta", "beta_tilde"):
        step = p_sample_step(Oracle(eps), sched, xt, i, kind, torch.Generator().manual_seed(7))
        z = torch.randn((64, 2), generator=torch.Generator().manual_seed(7)) if i > 0 else torch.zeros(64, 2)
        sigma = math.sqrt(float(sched.betas[i] if kind == "beta" else sched.beta_tilde[i]))
        expected = sched.posterior_mean(x0, xt, i) + sigma * z            # Ho et al. eq. 7, then + sigma_t z
        assert torch.allclose(step, expected, atol=1e-5), (i, kind, (step - expected).abs().max())


def test_the_sampling_noise_has_variance_sigma_squared(sched):
    zero = Oracle(torch.zeros(200_000, 2))
    xt = torch.zeros(200_000, 2)
    for i in (10, 500):
        step = p_sample_step(zero, sched, xt, i, "beta", torch.Generator().manual_seed(i))
        assert step.std(0) == pytest.approx([math.sqrt(float(sched.betas[i]))] * 2, rel=0.01)


def test_time_embedding_and_model_shapes_and_the_model_sees_t():
    t = torch.tensor([0, 1, 500, 999])
    emb = time_embedding(t, 32)
    assert emb.shape == (4, 32) and emb.abs().max() <= 1
    assert not torch.allclose(emb[0], emb[1])
    torch.manual_seed(0)
    model = EpsMLP(hidden=32, layers=2, time_dim=16)
    x = torch.randn(4, 2)
    out = model(x, t)
    assert out.shape == (4, 2)
    same_x = x[:1].expand(4, 2)
    assert (model(same_x, t) - model(same_x, t)[:1]).abs()[1:].max() > 1e-3, "eps_theta ignores t"
    assert torch.allclose(model(x, torch.tensor([5])), model(x, torch.full((4,), 5)))  # one t broadcasts


def test_manifold_distance_in_closed_form():
    sx, sy = MOONS_SHIFT
    on_upper = torch.tensor([[math.cos(a) + sx, math.sin(a) + sy] for a in (0.0, 0.4, 1.5, math.pi)])
    on_lower = torch.tensor([[1 - math.cos(a) + sx, 0.5 - math.sin(a) + sy] for a in (0.0, 1.0, 2.5)])
    assert manifold_distance("moons", torch.cat([on_upper, on_lower])).max() < 1e-6
    # the upper arc's centre: the lower arc (centre (1, 0.5) before the shift, radius 1) passes sqrt(1.25) - 1 from it
    assert manifold_distance("moons", torch.tensor([[sx, sy]]))[0].item() == pytest.approx(math.sqrt(1.25) - 1, abs=1e-6)
    below_left_end = torch.tensor([[-1.0 + sx, -0.3 + sy]])
    assert manifold_distance("moons", below_left_end)[0].item() == pytest.approx(0.3, abs=1e-6)
    centres = gaussian_centres()
    assert manifold_distance("gaussians", centres).max() < 1e-6
    assert manifold_distance("gaussians", torch.zeros(1, 2))[0].item() == pytest.approx(RADIUS_8G)
    assert manifold_distance("gaussians", centres[:1] + torch.tensor([[0.0, 0.05]]))[0].item() == pytest.approx(0.05, abs=1e-6)


def test_true_data_scores_near_one_and_noise_scores_low():
    gen = torch.Generator().manual_seed(0)
    for name, noise_at_most in (("moons", 0.2), ("gaussians", 0.05)):
        data = make_data(name, 20_000, gen)
        assert share_near(name, data) > 0.99, name                      # DATA_NOISE = 0.03 is 3.3 std inside NEAR
        assert share_near(name, torch.randn((20_000, 2), generator=gen)) < noise_at_most, name
        assert coverage(make_data(name, 2000, gen), make_data(name, 1000, gen)) > 0.99
        assert coverage(torch.zeros(2000, 2), make_data(name, 1000, gen)) == 0.0   # a collapsed sampler covers nothing
    assert NEAR / DATA_NOISE > 3


def test_balance_is_zero_for_the_data_and_large_for_mass_in_the_wrong_places():
    gen = torch.Generator().manual_seed(1)
    for name in ("moons", "gaussians"):
        assert balance_tv(name, make_data(name, 50_000, gen)) < 0.02, name   # equal-probability parts
    assert balance_tv("gaussians", gaussian_centres()[:1].expand(100, 2)) == pytest.approx(7 / 8)  # one mode of 8
    upper_only = make_data("moons", 4000, gen)
    sx, sy = MOONS_SHIFT
    upper_only = upper_only[upper_only[:, 1] > 0.6 + sy]                     # only the top of the upper arc
    assert balance_tv("moons", upper_only) > 0.5


def test_toy_run_passes_its_checks_and_saves_the_reverse_process(run_module):
    result = run_module("diffusion", "toy")
    assert result.passed, [c for c in result.checks if not c["passed"]]
    assert result.metrics["share"] > 3 * result.metrics["noise_share"]
    for png in ("reverse_process.png", "forward_process.png", "schedules.png", "loss.png"):
        assert (result.out_dir / png).stat().st_size > 10_000, png
