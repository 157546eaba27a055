"""ORPO's loss against independent computations: the log odds against a naive float64 P / (1 - P), the
whole loss on hand-made pairs of different lengths, lambda = 0 as sft's loss on the chosen replies, the
gradient factor 1 / (1 - P), and what the per-token mean changes."""
from __future__ import annotations

import math

import pytest
import torch

from core.data.chat import chat_example
from core.data.corpus import generate_stories
from core.data.preferences import generate_pairs
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.nn.model import Transformer, scaled_config
from core.nn.sequences import right_pad, sft_loss
from core.rl.preference import PairLogps, pair_batch, pair_logps
from post_train.alignment.orpo.code.orpo import Config, log_odds, odds_rewards, orpo_loss


def naive_log_odds(mean_logp: float) -> float:
    """log(P / (1 - P)) in float64, straight from the definition"""
    p = math.exp(mean_logp)
    return math.log(p / (1 - p))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


MEANS = [-30.0, -5.0, -1.0, -0.7, -0.69, -0.5, -0.01, -1e-4, -1e-6, -1e-7, -1e-8]
"""mean per-token log-probs from an unlikely reply to a near-certain one, on both sides of -ln 2"""


def test_log_odds_match_a_naive_float64_computation_even_in_float32():
    got = log_odds(torch.tensor(MEANS, dtype=torch.float32))
    for m, value in zip(MEANS, got.tolist()):
        assert value == pytest.approx(naive_log_odds(m), rel=1e-6, abs=1e-5), m
    # TRL's log1p(-exp(m)) alone is exact far from 0 but loses every digit near it in float32
    trl = (lambda m: m - torch.log1p(-torch.exp(m)))(torch.tensor([-1e-6, -1e-8]))
    assert trl[0].item() != pytest.approx(naive_log_odds(-1e-6), abs=1e-3) and trl[1].item() == math.inf


def test_orpo_loss_on_pairs_of_different_lengths_against_an_independent_computation():
    # pair 1: chosen 3 tokens summing to -3 (mean -1), rejected 4 tokens summing to -8 (mean -2)
    # pair 2: chosen 5 tokens summing to -2 (mean -0.4), rejected 2 tokens summing to -0.5 (mean -0.25)
    policy = PairLogps(chosen=torch.tensor([-3.0, -2.0]), rejected=torch.tensor([-8.0, -0.5]),
                       chosen_tokens=torch.tensor([3.0, 5.0]), rejected_tokens=torch.tensor([4.0, 2.0]))
    lam = 0.3
    loss, stats = orpo_loss(policy, None, Config(lam=lam))
    nll = (3 + 2) / (3 + 5)  # sft's loss: the mean over all chosen tokens of the batch
    ratios = [naive_log_odds(-1.0) - naive_log_odds(-2.0), naive_log_odds(-0.4) - naive_log_odds(-0.25)]
    odds_ratio_loss = sum(softplus(-r) for r in ratios) / 2
    assert stats["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert stats["log_odds_ratio"].item() == pytest.approx(sum(ratios) / 2, rel=1e-6)
    assert stats["odds_ratio_loss"].item() == pytest.approx(odds_ratio_loss, rel=1e-6)
    assert loss.item() == pytest.approx(nll + lam * odds_ratio_loss, rel=1e-6)
    r_w, r_l = odds_rewards(policy, None, Config())
    assert (r_w > r_l).tolist() == [True, False]  # the second pair's rejected reply is the likelier per token


def test_the_log_odds_gradient_is_one_over_one_minus_p():
    m = torch.tensor([-3.0, -0.7, -0.01], dtype=torch.float64, requires_grad=True)
    log_odds(m).sum().backward()
    assert m.grad.tolist() == pytest.approx([1 / (1 - math.exp(v)) for v in (-3.0, -0.7, -0.01)], rel=1e-12)


def test_with_summed_log_probs_the_odds_ratio_degenerates_to_the_likelihood_ratio():
    """Summed over a 15-token reply, P ~ e^-30: 1 - P is 1 to 13 digits and the log-odds ratio is just
    log P_w - log P_l. With the per-token means (-2 and -2.67 here) 1 - P matters, and the odds
    ratio is larger than the probability ratio it would otherwise be."""
    summed = log_odds(torch.tensor([-30.0, -40.0], dtype=torch.float64))
    assert (summed[0] - summed[1]).item() == pytest.approx(10.0, abs=1e-12)
    mean = log_odds(torch.tensor([-30.0 / 15, -40.0 / 15], dtype=torch.float64))
    assert (mean[0] - mean[1]).item() == pytest.approx(naive_log_odds(-2.0) - naive_log_odds(-40 / 15), rel=1e-12)
    assert (mean[0] - mean[1]).item() > 40 / 15 - 2 + 0.05


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece(generate_stories(300, seed=0), 512))


def test_with_lambda_zero_orpo_is_sfts_loss_on_the_chosen_replies(tok):
    torch.manual_seed(0)
    model = Transformer(scaled_config("llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_embd=32,
                                      n_head=4)).eval()
    pairs = generate_pairs(6, (1, 2, 3), seed=0, split="train")
    batch = pair_batch(tok, pairs)
    chosen = [chat_example(tok, p.prompt, p.chosen) for p in pairs]  # sft's own rows and loss masks
    with torch.no_grad():
        loss, _ = orpo_loss(pair_logps(model, batch), None, Config(lam=0.0))
        sft = sft_loss(model, right_pad([ids for ids, _ in chosen], tok.pad_id), right_pad([m for _, m in chosen], 0))
    assert loss.item() == pytest.approx(sft.item(), rel=1e-5)
