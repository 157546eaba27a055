"""DPO's losses against independent computations: hand-worked values, the loss from per-token log-probs
read one prefix at a time, ln 2 when the policy is the reference, the gradient weight, the optimum
of IPO and of conservative DPO, and the prompt's log-prob cancelling out of h."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from core.config import ConfigError, validate
from core.data.chat import chat_example
from core.data.corpus import generate_stories
from core.data.preferences import generate_pairs
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.nn.model import Transformer, scaled_config
from core.nn.sequences import sequence_logprobs
from core.rl.preference import PairLogps, frozen_reference, pair_batch, pair_logps
from post_train.alignment.dpo.code.dpo import Config, dpo_loss, implicit_rewards, loss_at_zero


def logps(chosen, rejected) -> PairLogps:
    chosen, rejected = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    return PairLogps(chosen, rejected, torch.ones_like(chosen), torch.ones_like(rejected))


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), written out"""
    return math.log1p(math.exp(x))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece(generate_stories(300, seed=0), 512))


def tiny(tok: Tokenizer, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(scaled_config("llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_embd=32,
                                     n_head=4)).eval()


def test_dpo_loss_on_hand_worked_values():
    # chosen: policy -3 vs reference -4 (log-ratio +1); rejected: -6 vs -5 (log-ratio -1); h = 2
    policy, reference = logps([-3.0, -2.0], [-6.0, -2.0]), logps([-4.0, -1.0], [-5.0, -2.5])
    h = [(-3 + 4) - (-6 + 5), (-2 + 1) - (-2 + 2.5)]                           # [2, -1.5]
    cfg = Config(beta=0.5)
    loss, stats = dpo_loss(policy, reference, cfg)
    assert loss.item() == pytest.approx((softplus(-0.5 * 2) + softplus(-0.5 * -1.5)) / 2, abs=1e-12)
    assert stats["h"].item() == pytest.approx(0.25)
    r_w, r_l = implicit_rewards(policy, reference, cfg)
    assert r_w.tolist() == pytest.approx([0.5, -0.5]) and r_l.tolist() == pytest.approx([-0.5, 0.25])
    assert (r_w - r_l).tolist() == pytest.approx([0.5 * x for x in h])


def test_dpo_loss_equals_an_independent_computation_from_per_token_log_probs(tok):
    """Policy and reference are two different tiny models. Every token's log-prob is read from the
    model run on the prefix that ends before it, in float64, summed over the reply, and put into
    -log sigma(beta h) by hand."""
    policy, reference = tiny(tok, 0), tiny(tok, 1)
    pairs = generate_pairs(4, (1, 2), seed=0, split="train")
    cfg = Config(beta=0.7)
    batch = pair_batch(tok, pairs)
    with torch.no_grad():
        loss, _ = dpo_loss(pair_logps(policy, batch), pair_logps(reference, batch), cfg)

    def reply_logp(model, prompt, reply):
        ids, mask = chat_example(tok, prompt, reply)
        return sum(model(torch.tensor([ids[:t]]))[0, -1].double().log_softmax(-1)[ids[t]].item()
                   for t in range(len(ids) - sum(mask), len(ids)))

    with torch.no_grad():
        losses = []
        for p in pairs:
            h = ((reply_logp(policy, p.prompt, p.chosen) - reply_logp(reference, p.prompt, p.chosen))
                 - (reply_logp(policy, p.prompt, p.rejected) - reply_logp(reference, p.prompt, p.rejected)))
            losses.append(softplus(-cfg.beta * h))
    assert loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-5)


@pytest.mark.parametrize("changes", [{}, {"beta": 0.05}, {"label_smoothing": 0.2}, {"loss_type": "ipo", "beta": 0.3}])
def test_the_first_loss_is_its_closed_form_when_the_policy_is_the_reference(tok, changes):
    """h = 0 exactly, so the loss is ln 2 for DPO and conservative DPO whatever beta and eps, and
    1/(4 beta^2) for IPO; float32 leaves ln 2 within 2e-9."""
    cfg = dataclasses.replace(Config(), **changes)
    policy = tiny(tok, 0)
    batch = pair_batch(tok, generate_pairs(6, (1, 2, 3), seed=1, split="train"))
    with torch.no_grad():
        loss, stats = dpo_loss(pair_logps(policy, batch), pair_logps(frozen_reference(policy), batch), cfg)
    assert stats["h"].item() == 0.0
    expected = 1 / (4 * cfg.beta ** 2) if cfg.loss_type == "ipo" else math.log(2)
    assert loss_at_zero(cfg) == pytest.approx(expected, rel=1e-15)
    assert loss.item() == pytest.approx(expected, rel=1e-7)


def test_the_gradient_weighs_each_pair_by_sigma_of_minus_beta_h():
    """d L / d log pi(y_w|x) = -beta sigma(-beta h) / B and the opposite for y_l: pairs the policy
    already ranks right by a wide margin hardly move it."""
    beta = 0.5
    policy, reference = logps([-3.0, -2.0], [-6.0, -2.0]), logps([-4.0, -1.0], [-5.0, -2.5])
    policy.chosen.requires_grad_(True)
    policy.rejected.requires_grad_(True)
    loss, _ = dpo_loss(policy, reference, Config(beta=beta))
    loss.backward()
    h = torch.tensor([2.0, -1.5], dtype=torch.float64)
    weight = beta * torch.sigmoid(-beta * h) / 2
    assert policy.chosen.grad.tolist() == pytest.approx((-weight).tolist(), abs=1e-12)
    assert policy.rejected.grad.tolist() == pytest.approx(weight.tolist(), abs=1e-12)


def test_ipo_and_conservative_dpo_against_their_formulas_and_their_finite_optima():
    policy, reference = logps([-3.0], [-6.0]), logps([-4.0], [-5.0])  # h = 2
    ipo, _ = dpo_loss(policy, reference, Config(loss_type="ipo", beta=0.5))
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    eps, beta = 0.1, 0.5
    cdpo, _ = dpo_loss(policy, reference, Config(beta=beta, label_smoothing=eps))
    assert cdpo.item() == pytest.approx((1 - eps) * softplus(-beta * 2) + eps * softplus(beta * 2), abs=1e-12)

    def gradient_at(h: float, cfg: Config) -> float:
        chosen = torch.tensor([h], dtype=torch.float64, requires_grad=True)  # the reference is all zeros: h = chosen
        policy = PairLogps(chosen, torch.zeros(1, dtype=torch.float64), torch.ones(1), torch.ones(1))
        loss, _ = dpo_loss(policy, logps([0.0], [0.0]), cfg)
        loss.backward()
        return chosen.grad.item()

    # IPO pulls h to 1/(2 beta); conservative DPO to log((1 - eps)/eps) / beta; plain DPO never stops pushing
    assert gradient_at(1 / (2 * beta), Config(loss_type="ipo", beta=beta)) == pytest.approx(0.0, abs=1e-12)
    assert gradient_at(math.log((1 - eps) / eps) / beta, Config(beta=beta, label_smoothing=eps)) == pytest.approx(0.0, abs=1e-12)
    assert gradient_at(50.0, Config(beta=beta)) < 0


def test_the_prompt_cancels_out_of_h(tok):
    """Chosen and rejected share the prompt, and a causal model scores the prompt before it sees the
    reply: summing over the prompt as well adds the same number to both log-ratios, so DPO's h (and its
    loss) do not change. ORPO's per-token means are another matter (tests/test_orpo.py)."""
    policy, reference = tiny(tok, 0), tiny(tok, 1)
    batch = pair_batch(tok, generate_pairs(4, (1, 2, 3), seed=2, split="train"))
    real = (batch.ids != tok.pad_id) | (batch.reply_mask == 1)
    real[:, 0] = True

    def h_with(mask):
        with torch.no_grad():
            total = sequence_logprobs(policy(batch.ids), batch.ids, mask) - sequence_logprobs(reference(batch.ids), batch.ids, mask)
        return total[:4] - total[4:]
    with_prompt, reply_only = h_with(real.long()), h_with(batch.reply_mask)
    assert with_prompt.tolist() == pytest.approx(reply_only.tolist(), abs=1e-4)


def test_label_smoothing_with_ipo_is_refused():
    with pytest.raises(ConfigError, match="sigmoid loss only"):
        validate(Config(loss_type="ipo", label_smoothing=0.1))
