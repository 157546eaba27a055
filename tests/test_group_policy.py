"""GRPO, GSPO and SFT formulas against independent computations on hand-made tensors, and the chain's
refusal to go on from a broken upstream model."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.artifacts import UserError
from core.config import ConfigError, validate
from core.rl.group_policy import aggregate, group_advantages, k3_kl, kl_to_reference
from post_train.alignment.grpo.code.grpo import Config as GRPOConfig
from post_train.alignment.grpo.code.grpo import grpo_objective
from post_train.alignment.gspo.code.gspo import Config as GSPOConfig
from post_train.alignment.gspo.code.gspo import gspo_objective, sequence_ratio
from post_train.alignment.sft.code.sft import sft_loss


# --- advantages ----------------------------------------------------------------------------------
def test_group_advantages_normalise_within_each_group_with_the_sample_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    adv = group_advantages(rewards, scale=True, eps=1e-4)
    for g, row in enumerate(rewards.tolist()):
        mean = sum(row) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / 3)  # ddof = 1
        assert adv[g].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in row], abs=1e-6)
    assert group_advantages(rewards, scale=False).flatten().tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25])


def test_a_group_of_equal_rewards_has_zero_advantage_and_gives_zero_gradient():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))
    logp = torch.randn(6, 5, requires_grad=True)
    cfg = GRPOConfig(beta=0.0)
    loss, _ = grpo_objective(logp, logp.detach(), logp.detach(), adv.reshape(-1), torch.ones(6, 5), cfg)
    loss.backward()
    assert torch.count_nonzero(logp.grad) == 0


# --- KL ------------------------------------------------------------------------------------------
def test_k3_is_nonnegative_zero_at_the_reference_and_unbiased_for_kl():
    logp, ref = torch.randn(1000), torch.randn(1000)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()                              # KL(p || q)
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[x], q.log()[x]).mean().item()                # samples of p, as in a rollout
    assert estimate == pytest.approx(exact, rel=0.02)


def test_kl_to_reference_weights_k3_by_pi_over_pi_old_when_the_samples_are_old():
    # After an optimizer step the tokens are pi_old's: pi has since made token 0 unlikely, pi_ref still likes it.
    old = torch.tensor([0.50, 0.30, 0.15, 0.05])
    pi = torch.tensor([0.001, 0.60, 0.30, 0.099])
    ref = torch.tensor([0.75, 0.10, 0.10, 0.05])
    exact = (pi * (pi / ref).log()).sum().item()                          # KL(pi || pi_ref) = 1.47
    x = torch.multinomial(old, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, old_logp, ref_logp = pi.log()[x][None], old.log()[x][None], ref.log()[x][None]
    estimate = kl_to_reference(logp, old_logp, ref_logp, torch.ones_like(logp))
    assert estimate == pytest.approx(exact, rel=0.02)
    unweighted = k3_kl(logp, ref_logp).mean().item()                    # half the samples score 750 - log 750 - 1 = 742
    assert unweighted > 100 * exact
    # on pi's own samples (pi_old = pi) it is plain k3, and the mask keeps padding out
    logp, ref_logp = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert kl_to_reference(logp, logp, ref_logp, mask) == pytest.approx(k3_kl(logp, ref_logp)[:, :2].mean().item())


# --- loss aggregation ------------------------------------------------------------------------------
def test_each_loss_aggregation_against_its_formula():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "sequence", 10).item() == pytest.approx((2.0 + 4.0) / 2)   # GRPO
    assert aggregate(per_token, mask, "token", 10).item() == pytest.approx(10.0 / 4)            # DAPO
    assert aggregate(per_token, mask, "constant", 10).item() == pytest.approx(10.0 / (2 * 10))  # Dr. GRPO
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "mean", 10)


# --- the clipped objective ---------------------------------------------------------------------------
@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.1, 1.0, False), (1.5, 1.0, True),     # A > 0: flat above 1 + eps
    (0.5, 1.0, False),                        # A > 0 below 1 - eps: the unclipped term, still a gradient
    (0.9, -1.0, False), (0.5, -1.0, True),   # A < 0: flat below 1 - eps
    (1.5, -1.0, False),                       # A < 0 above 1 + eps: still pulled down
])
def test_grpo_clip_inside_and_outside_the_range(ratio, advantage, clipped):
    cfg = GRPOConfig(clip_eps=0.2, beta=0.0, loss_agg="token")
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(ratio), requires_grad=True)
    loss, stats = grpo_objective(logp, old, old, torch.tensor([advantage]), torch.ones(1, 1), cfg)
    expected = min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    assert loss.item() == pytest.approx(-expected)
    loss.backward()
    assert (logp.grad.item() == 0.0) == clipped
    assert stats["clip_fraction"] == float(clipped)
    if not clipped:  # d(-r A)/d log r = -r A
        assert logp.grad.item() == pytest.approx(-ratio * advantage)


def test_grpo_kl_term_adds_beta_times_k3():
    cfg = GRPOConfig(beta=0.5, loss_agg="token")
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    loss, stats = grpo_objective(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 2), cfg)
    assert loss.item() == pytest.approx(0.5 * k3_kl(logp, ref).mean().item())
    assert stats["kl"] == pytest.approx(k3_kl(logp, ref).mean().item())


# --- GSPO ------------------------------------------------------------------------------------------
def test_gspo_sequence_ratio_is_the_geometric_mean_of_the_token_ratios():
    logp = torch.tensor([[-1.0, -0.5, -2.0, -7.0], [-0.2, -0.1, -3.0, -3.0]])
    old = torch.tensor([[-1.2, -0.4, -2.5, -1.0], [-0.3, -0.3, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    token_ratios = (logp - old).exp()
    for i, length in enumerate((3, 2)):
        product = math.prod(token_ratios[i, :length].tolist())
        assert sequence_ratio(logp, old, mask)[i].item() == pytest.approx(product ** (1 / length))


def test_gspo_clips_whole_sequences_in_its_narrow_band():
    cfg = GSPOConfig(clip_low=3e-4, clip_high=4e-4, beta=0.0)
    old = torch.zeros(2, 3)
    logp = torch.full((2, 3), math.log(1.01), requires_grad=True)   # s = 1.01 for both responses
    loss, stats = gspo_objective(logp, old, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3), cfg)
    # A > 0: clipped to 1.0004 (flat); A < 0: unclipped 1.01 is the smaller term (keeps its gradient)
    assert loss.item() == pytest.approx(-(1.0004 * 1.0 + 1.01 * -1.0) / 2, rel=1e-4)
    assert stats["clip_fraction"] == 0.5
    loss.backward()
    assert torch.count_nonzero(logp.grad[0]) == 0 and torch.count_nonzero(logp.grad[1]) == 3


# --- SFT -------------------------------------------------------------------------------------------
class Logits(torch.nn.Module):
    """A 'model' that returns fixed logits for positions 0..T-1, whatever the ids."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits[:, :ids.shape[1]]


def test_sft_loss_weighs_response_tokens_only():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 1, 2, 3, 4, 0], [5, 1, 6, 7, 0, 0]])       # prompt 5 1, response, pads 0
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    logits = torch.randn(2, 5, 9)
    by_hand = []
    for b in range(2):
        for t in range(1, 6):
            if loss_mask[b, t]:
                by_hand.append(-logits[b, t - 1].log_softmax(-1)[ids[b, t]].item())
    assert sft_loss(Logits(logits), ids, loss_mask).item() == pytest.approx(sum(by_hand) / len(by_hand))
    # what the prompt and the pads say does not matter
    changed = ids.clone()
    changed[:, :2], changed[0, 5], changed[1, 4:] = 3, 8, 8
    assert sft_loss(Logits(logits), changed, loss_mask).item() != pytest.approx(F.cross_entropy(
        logits.flatten(0, 1), changed[:, 1:].flatten()).item())
    assert sft_loss(Logits(logits), changed, loss_mask).item() == pytest.approx(sum(by_hand) / len(by_hand))


# --- the chain refuses a broken upstream -------------------------------------------------------------
def fake_upstream(workdir, name: str, rel: str, files: dict[str, bytes]) -> None:
    models = workdir / rel / "output" / "toy" / "model"
    models.mkdir(parents=True)
    for file, content in files.items():
        (models / file).write_bytes(content)
    index = {name: {"toy": {"run_id": "x", "finished_at": "2026-01-01T00:00:00+00:00", "wall_time_s": 1.0,
                            "status": "passed", "checks_passed": 1, "checks_total": 1,
                            "out_dir": f"{rel}/output/toy"}}}
    (workdir / "output").mkdir(exist_ok=True)
    (workdir / "output" / "run_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("files, named", [
    ({"model.safetensors": b"not a safetensors file", "model_config.json": b"{}", "tokenizer.model": b"x"},
     "model.safetensors"),
    ({"model.safetensors": b"x", "model_config.json": b"{\"n_layer\": \"two\"", "tokenizer.model": b"x"},
     "model_config.json"),
])
def test_sft_stops_with_the_file_named_when_the_base_model_is_corrupt(files, named, run_module, workdir):
    fake_upstream(workdir, "nanogpt", "pre_train/llm/nanogpt", files)
    with pytest.raises(UserError, match=named):
        run_module("sft", "toy")


def test_grpo_stops_with_the_file_named_when_the_sft_tokenizer_is_missing(run_module, workdir, registry):
    from core.nn.model import Transformer, save_model, scaled_config
    rel = "post_train/alignment/sft"
    fake_upstream(workdir, "sft", rel, {})
    save_model(Transformer(scaled_config("llama", vocab_size=64, block_size=32, n_layer=1, n_embd=16, n_head=2)),
               workdir / rel / "output" / "toy" / "model")
    with pytest.raises(UserError, match="tokenizer.model"):
        run_module("grpo", "toy")


def test_log_probs_are_taken_at_the_rollout_temperature():
    from core.nn.model import Transformer, scaled_config
    from core.rl.group_policy import sequence_logprobs
    torch.manual_seed(0)
    model = Transformer(scaled_config("llama", vocab_size=30, block_size=16, n_layer=1, n_embd=16, n_head=2)).eval()
    ids = torch.randint(30, (2, 8))
    with torch.no_grad():
        logits = model(ids)
        got = sequence_logprobs(model, ids, temperature=0.5)
    expected = (logits[:, :-1] / 0.5).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("field", ["group_size", "steps", "prompts_per_step", "iterations", "minibatches",
                                   "eval_every", "checkpoint_every", "max_new_tokens"])
def test_a_config_that_would_train_nothing_is_refused_naming_the_field(field):
    cfg = dataclasses.replace(GRPOConfig(), **{field: 0})
    with pytest.raises(ConfigError, match=f"{field}=0 is out of range"):
        validate(cfg)
    validate(GRPOConfig())  # the default passes


@pytest.mark.parametrize("changes, named", [
    (dict(prompts_per_step=2, group_size=4, minibatches=9), "minibatches=9 exceeds the 8 rows"),
    (dict(prompts_per_step=64, group_size=8), "512 rows per rollout exceeds 256"),
])
def test_the_rules_between_fields_are_refused_naming_them(changes, named):
    with pytest.raises(ConfigError, match=named):
        validate(dataclasses.replace(GRPOConfig(), **changes))
    validate(dataclasses.replace(GRPOConfig(), prompts_per_step=2, group_size=4, minibatches=8))
