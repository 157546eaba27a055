"""mixed_precision: the fp16 / bf16 number limits the module relies on, the dynamic loss scaler on hand-made
gradients (skip and back off on inf/nan, growth after N clean steps, exact unscaling) and against
torch.amp.GradScaler on the same gradients, a scaled step against the fp32 step (with and without clipping),
the fp32 master weights of the mixed-precision arms against bf16 weights, and the measured fp16 underflow.
The GPU tests run only where torch sees a CUDA device. The toy preset's checks and determinism are covered in
tests/test_modules.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from core.nn.model import Transformer, scaled_config
from post_train.systems.mixed_precision.code.mixed_precision import (
    FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, PRECISIONS, Arm, Config, DynamicLossScaler, GradScalerShadow,
    Precision, ScalerAudit, captured_gradients, cast_flush_share, flushed_share, forward_backward, gradient_underflow,
    lost_update_share, make_arm, optimizer_step, unchanged_share,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
NO_LOG = type("NoLog", (), {"log": lambda self, table, **row: None})()
"""a stand-in for the run context where a test does not read the logged rows"""
VOCAB, BLOCK = 64, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, device: str = "cpu", n_embd: int = 32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(scaled_config("llama", vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_embd=n_embd,
                                     n_head=4)).to(device)


def tiny_batch(seed: int = 1, batch: int = 4, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, BLOCK + 1), generator=gen).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def param_with_grad(grad: list[float]) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return p


# --- the number formats -------------------------------------------------------------------------------------
def test_fp16_and_bf16_limits():
    assert FP16_MAX == 65504 and FP16_MIN_NORMAL == 2.0 ** -14
    smallest = torch.nextafter(torch.zeros((), dtype=torch.float16), torch.ones((), dtype=torch.float16))
    assert float(smallest) == FP16_MIN_SUBNORMAL == 2.0 ** -24
    as_fp16 = torch.tensor([2.0 ** -24, 1.01 * 2.0 ** -25, 2.0 ** -25, 2.0 ** -26, 65519.0, 65520.0]).to(torch.float16)
    # round to nearest: above half the smallest subnormal rounds up to it, half of it ties to even (0); the
    # largest value's spacing is 32, so 65519 still rounds down to 65504 and 65520 (half a spacing up) is inf
    assert as_fp16[:5].tolist() == [2.0 ** -24, 2.0 ** -24, 0.0, 0.0, 65504.0] and as_fp16[5].isinf()
    # bf16 keeps fp32's range: 2^-60 and 2^100 survive, where fp16 flushes and overflows
    assert torch.finfo(torch.bfloat16).tiny == torch.finfo(torch.float32).tiny
    wide = torch.tensor([2.0 ** -60, 2.0 ** 100])
    assert torch.equal(wide.to(torch.bfloat16).float(), wide)
    assert wide.to(torch.float16).tolist() == [0.0, math.inf]


def test_cast_flush_share_counts_the_nonzero_gradients_below_half_the_smallest_subnormal():
    grads = [torch.tensor([2.0 ** -24, 2.0 ** -25, 0.0]), torch.tensor([-2.0 ** -26, 1e-3, 0.0])]
    assert cast_flush_share(grads) == pytest.approx(2 / 4)  # 2^-25 and -2^-26 of the four nonzero
    reference = [torch.tensor([1.0, 0.0, 2.0, 3.0])]
    assert flushed_share(reference, [torch.tensor([0.0, 0.0, 0.0, 3.0])]) == pytest.approx(2 / 3)  # zeros of fp32 ignored


def test_a_small_update_vanishes_in_bf16_weights_and_survives_in_fp32():
    w, update = torch.tensor(1.0), 1e-3
    assert (w.to(torch.bfloat16) + update).to(torch.bfloat16) == w.to(torch.bfloat16)   # spacing at 1 is 2^-7
    assert w + update != w                                                              # fp32: 2^-23
    assert torch.tensor(1.0 + 2.0 ** -7).to(torch.bfloat16) == 1.0 + 2.0 ** -7           # the next bf16 after 1
    before = [torch.tensor([1.0, 1.0, 1e-3, 0.5])]
    after = [torch.tensor([1.0 + 1e-3, 1.1, 1e-3 + 1e-6, 0.5])]  # 1e-6 < half the spacing at 1e-3 (2^-17 / 2)
    assert lost_update_share(before, after, torch.bfloat16) == pytest.approx(2 / 3)     # of the three that moved
    assert lost_update_share(before, after, torch.float32) == 0
    assert unchanged_share(before, after) == pytest.approx(1 / 4)


# --- the scaler on hand-made gradients --------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_non_finite_gradient_skips_the_step_and_halves_the_scale(bad):
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, growth_interval=3)
    scaler.clean_steps = 2
    p = param_with_grad([1.0, bad, 3.0])
    optimizer = torch.optim.SGD([p], lr=1.0)
    found_inf = scaler.unscale_([p])
    scaler.step(optimizer, found_inf)
    assert found_inf
    assert torch.equal(p.detach(), torch.zeros(3)), "the optimizer stepped on a non-finite gradient"
    assert scaler.scale == 2.0 ** 15 and scaler.clean_steps == 0


def test_the_scale_grows_after_growth_interval_clean_steps_and_a_skip_restarts_the_count():
    scaler = DynamicLossScaler(init_scale=8.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    scales = []
    for found_inf in (False, False, False, False, True, False, False, False, False, False, False):
        scaler.update(found_inf)
        scales.append(scaler.scale)
    assert scales == [8, 8, 16, 16, 8, 8, 8, 16, 16, 16, 32]


def test_unscale_divides_exactly_and_the_step_uses_the_true_gradient():
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(1000, generator=gen)
    scaler = DynamicLossScaler(init_scale=2.0 ** 13)
    p = param_with_grad((grad * scaler.scale).tolist())
    optimizer = torch.optim.SGD([p], lr=1.0)
    found_inf = scaler.unscale_([p])
    assert not found_inf and torch.equal(p.grad, grad)                   # a power of 2: not a bit changes
    scaler.step(optimizer, found_inf)
    assert torch.equal(p.detach(), -grad) and scaler.clean_steps == 1


def fp16_backward_gradients(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, float]]:
    """(true gradient, magnitude) per step: magnitudes that swing over 2^-30 .. 2^10, so that scaled into fp16
    some steps overflow and the scale has to find its ceiling again."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, generator=gen), 2.0 ** float(torch.randint(-30, 11, (), generator=gen)))
            for _ in range(steps)]


@pytest.mark.parametrize("growth_interval", [1, 3, 10])
def test_the_scaler_matches_torch_gradscaler_step_by_step(growth_interval):
    """Both scalers see the same fp16 'backward' (the true gradient times their scale, rounded to fp16, inf
    where it overflows): same scale at every step, same skips, same unscaled gradients."""
    cfg = Config(init_scale=2.0 ** 16, growth_interval=growth_interval)
    ours = DynamicLossScaler(cfg.init_scale, cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval)
    p = torch.nn.Parameter(torch.zeros(64))
    optimizer = torch.optim.SGD([p], lr=0.0)
    shadow = GradScalerShadow([p], cfg, torch.device("cpu"))
    skips = 0
    for grad, magnitude in fp16_backward_gradients(300):
        p.grad = (grad * magnitude * ours.scale).to(torch.float16).float()
        their_scale, their_step, their_norm = shadow.observe([p], max_norm=1e30)
        found_inf = ours.unscale_([p])
        assert their_scale == ours.scale and their_step == (not found_inf)
        if not found_inf:
            assert torch.equal(p.grad, shadow.params[0].grad) and their_norm == pytest.approx(float(p.grad.norm()), rel=1e-6)
        ours.step(optimizer, found_inf)
        skips += found_inf
    assert shadow.scaler.get_scale() == ours.scale
    assert 10 < skips < 200, "the sequence must exercise both overflow and growth"


# --- a scaled step against the fp32 step -----------------------------------------------------------------------
def sgd_arm(model: Transformer, scaled: bool) -> Arm:
    """An fp32 model with plain SGD (lr 1): its update is minus the gradient the optimizer saw, exactly."""
    precision = Precision(autocast=None, weights=torch.float32, loss_scaling=scaled)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = DynamicLossScaler(init_scale=2.0 ** 16) if scaled else None
    return Arm("test", precision, model, optimizer, scaler, list(model.parameters()))


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipping", "no-clipping"])
def test_a_scaled_step_equals_the_fp32_step(max_norm):
    """In fp32 a power-of-two loss scale changes no bit: backward of S * L, unscaling, clipping and the step
    must give the update and the norm of the unscaled step, whether the clip binds or not."""
    x, y = tiny_batch()
    plain, scaled = sgd_arm(tiny_model(), scaled=False), sgd_arm(tiny_model(), scaled=True)
    loss_plain, loss_scaled = forward_backward(plain, x, y), forward_backward(scaled, x, y)
    (_, norm_plain), (stepped, norm_scaled) = optimizer_step(plain, max_norm), optimizer_step(scaled, max_norm)
    assert loss_plain == loss_scaled and stepped
    assert norm_scaled == pytest.approx(norm_plain, rel=1e-6)
    assert (norm_plain > max_norm) == (max_norm == 1e-3), "the parametrisation must clip in one case only"
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-7), (a - b).abs().max()


def test_the_audit_skips_and_halves_on_the_overflow_probe_and_agrees_with_gradscaler():
    cfg = Config(init_scale=2.0 ** 10, growth_interval=2)
    arm = make_arm("fp16", tiny_model(), cfg)
    audit = ScalerAudit(arm, cfg, torch.device("cpu"))
    logged = []
    ctx = type("Recorder", (), {"log": lambda self, table, **row: logged.append(row)})()
    for step in range(5):
        x, y = tiny_batch(seed=step)
        if step == 3:
            audit.probe_overflow(step, x, y, ctx)
        forward_backward(arm, x, y)
        audit.before_update()
        stepped, norm = optimizer_step(arm, cfg.grad_clip)
        audit.after_update(step, stepped, norm, norm, ctx)
    assert audit.injected == {"injected_inf_skipped": 1.0, "injected_inf_scale_ratio": 0.5}
    assert [row["scale"] for row in logged] == [2 ** 10, 2 ** 10, 2 ** 11, 2 ** 11, 2 ** 10, 2 ** 10]
    assert [row["stepped"] for row in logged] == [1, 1, 1, 0, 1, 1] and audit.skipped == 1 and audit.growths == 2
    assert audit.scale_mismatches == audit.skip_mismatches == 0 and audit.norm_rel_diff == 0


# --- master weights --------------------------------------------------------------------------------------------
def test_the_mixed_precision_arms_keep_fp32_master_weights():
    """A step of lr 1e-5 moves nearly every weight of the autocast arms (fp32 weights) and almost none of the
    bf16-weights arm: the update is far below half the bf16 spacing of weights of size ~0.02."""
    x, y = tiny_batch()
    init = tiny_model()
    unchanged = {}
    for name in PRECISIONS:
        arm = make_arm(name, init, dataclasses.replace(Config(), lr=1e-5, weight_decay=0.0))
        before = [p.detach().clone() for p in arm.params]
        forward_backward(arm, x, y)
        optimizer_step(arm, max_norm=1e9)
        unchanged[name] = unchanged_share(before, arm.params)
        dtypes = {p.dtype for p in arm.params} | {s["exp_avg"].dtype for s in arm.optimizer.state.values()}
        assert dtypes == {PRECISIONS[name].weights}, name
    assert {PRECISIONS[n].weights for n in ("fp32", "bf16", "fp16")} == {torch.float32}
    for name in ("fp32", "bf16", "fp16"):
        assert unchanged[name] < 0.05, (name, unchanged[name])
    assert unchanged["bf16_pure"] > 0.8


# --- underflow ----------------------------------------------------------------------------------------------------
def test_captured_gradients_are_the_fp16_backward_and_scale_exactly_in_fp32():
    model, (x, y) = tiny_model(), tiny_batch()
    acts, params = captured_gradients(model, x, y, None, 1.0)
    acts_k, params_k = captured_gradients(model, x, y, None, 2.0 ** -10)
    assert len(acts) == 4 and all(a.shape == (4, BLOCK, 32) and a.dtype == torch.float32 for a in acts)  # attn + ffn x 2
    assert len(params) == len(list(model.parameters()))
    for a, b in zip(acts + params, acts_k + params_k):  # backward is linear: a power-of-two loss factor is exact
        assert torch.equal(a * 2.0 ** -10, b)
    acts16, _ = captured_gradients(model, x, y, torch.float16, 1.0)
    assert all(a.dtype == torch.float16 for a in acts16), "the fp16 autocast backward carries fp16 gradients"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_flushes_the_small_gradients_of_an_accumulated_micro_batch_and_the_scale_restores_them(device):
    model, (x, y) = tiny_model(device=device), tiny_batch(batch=8, device=device)
    under = gradient_underflow(model, x, y, accum=2 ** 12, scale=2.0 ** 16)
    assert under["underflow"] > 0.002 and under["underflow_params"] > 0.1   # untrained, on the CPU: 1.3% and 46%
    assert under["underflow_micro"] <= under["underflow"] / 10
    assert under["underflow_scaled"] < 0.001 and under["underflow_params_scaled"] < 0.001
    assert under["scaled_nonfinite"] == 0
    assert under["cast_underflow"] == pytest.approx(under["underflow"], abs=0.1)  # the cast predicts most of it


# --- real fp16 / bf16 training, on the CPU and (where there is one) on the GPU ------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_the_scaler_matches_gradscaler_on_a_real_fp16_run(device):
    """S starts too high (2^24): the first steps overflow and back off, clean runs grow it, an overflow probe halves
    it; GradScaler on the same gradients decides the same at every step."""
    cfg = Config(init_scale=2.0 ** 24, growth_interval=5)
    arm = make_arm("fp16", tiny_model(device=device, n_embd=64), cfg)
    audit = ScalerAudit(arm, cfg, torch.device(device))
    for step in range(40):
        x, y = tiny_batch(seed=step, device=device)
        if step == 20:
            audit.probe_overflow(step, x, y, NO_LOG)
        forward_backward(arm, x, y)
        audit.before_update()
        stepped, norm = optimizer_step(arm, cfg.grad_clip)
        audit.after_update(step, stepped, norm, norm, NO_LOG)
    assert audit.skipped >= 3 and audit.growths >= 2   # on the CPU: 9 skips (the probe's included), 4 growths
    assert audit.scale_mismatches == audit.skip_mismatches == 0 and audit.norm_rel_diff < 1e-6
    assert audit.injected == {"injected_inf_skipped": 1.0, "injected_inf_scale_ratio": 0.5}


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_and_fp16_train_like_fp32(device):
    """A learnable sequence (each token is the previous plus one, mod V): 60 steps in each precision from the
    same initial weights; on the CPU all three end at 0.020 nats."""
    cfg = Config(lr=3e-3)
    init = tiny_model(device=device)
    start = torch.randint(0, VOCAB, (8, 1), generator=torch.Generator().manual_seed(0))
    tokens = ((start + torch.arange(BLOCK + 1)) % VOCAB).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    final = {}
    for name in ("fp32", "bf16", "fp16"):
        arm = make_arm(name, init, cfg)
        for _ in range(60):
            loss = forward_backward(arm, x, y)
            optimizer_step(arm, cfg.grad_clip)
        final[name] = loss
    assert final["fp32"] < 0.1 * math.log(VOCAB)
    for name in ("bf16", "fp16"):
        assert final[name] == pytest.approx(final["fp32"], abs=0.05), final


@CUDA
def test_cuda_toy_run_passes_its_checks(run_module):
    """The module's toy preset on the GPU: every check, and the GPU speed table of the larger model."""
    result = run_module("mixed_precision", "toy", ["device=cuda"])
    assert result.passed, [c for c in result.checks if not c["passed"]]
    assert {"gpu_ms_per_step_fp32", "gpu_ms_per_step_bf16", "gpu_ms_per_step_fp16"} <= set(result.timings)
