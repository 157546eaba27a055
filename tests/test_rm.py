"""The reward model's pieces (post_train/alignment/rm/code/rm.py) on hand-made tensors and a tiny random
model: the Bradley-Terry loss and its centring term against the closed form, chosen and rejected kept
apart in the shared batch, a padded batch scoring each reply as alone, the offset centring the
rewards, and freezing the lower blocks."""
from __future__ import annotations

import math

import pytest
import torch

from core.nn.heads import ScalarHeadModel
from core.nn.model import Transformer, scaled_config
from post_train.alignment.rm.code.rm import (accuracy, bradley_terry_loss, center_head, freeze_lower, padding_gap,
                                             pair_rewards)

PAD = 0


def tiny_rm(seed: int = 0) -> ScalarHeadModel:
    torch.manual_seed(seed)
    model = ScalarHeadModel(Transformer(scaled_config("llama", vocab_size=40, block_size=24, n_layer=2, n_embd=16,
                                                     n_head=2)))
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head.bias)
    return model


PAIRS = [([5, 9, 3, 7, 2], [5, 9, 3, 8]), ([4, 1], [4, 1, 6, 6, 6, 2, 9]), ([8, 3, 3], [8, 3, 3])]


def test_bradley_terry_loss_is_the_mean_softplus_of_the_negative_margin():
    r_chosen, r_rejected = torch.tensor([2.0, -1.0, 0.5, 30.0]), torch.tensor([0.0, 0.0, 1.0, -80.0])
    margins = [2.0, -1.0, -0.5, 110.0]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 4     # -log sigma(m) = log(1 + e^-m)
    assert bradley_terry_loss(r_chosen, r_rejected).item() == pytest.approx(expected, rel=1e-6)
    # one pair is scored on its own: swapping the other pairs' roles changes only their terms
    assert bradley_terry_loss(r_chosen[:1], r_rejected[:1]).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    # a very wrong pair costs its margin, finite (log(sigmoid(-200)) would be -inf in float32)
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_the_centring_term_adds_eta_times_the_squared_pair_sum():
    r_chosen, r_rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, -3.0])
    plain = bradley_terry_loss(r_chosen, r_rejected)
    centred = bradley_terry_loss(r_chosen, r_rejected, center_coef=0.1)
    assert (centred - plain).item() == pytest.approx(0.1 * (3.0 ** 2 + 4.0 ** 2) / 2, rel=1e-6)
    # a pair whose rewards sum to 0 pays nothing, whatever its margin
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([-5.0]), 1.0).item() == pytest.approx(math.log1p(math.exp(-10)))


def test_a_zero_head_scores_every_pair_a_tie_at_ln_2():
    model = ScalarHeadModel(tiny_rm().backbone)   # a fresh head is zero
    r_chosen, r_rejected = pair_rewards(model, PAIRS, PAD)
    assert bradley_terry_loss(r_chosen, r_rejected, center_coef=0.01).item() == pytest.approx(math.log(2), rel=1e-7)
    assert accuracy(r_chosen, r_rejected) == 0.5


def test_pair_rewards_score_each_reply_as_alone_chosen_first():
    model = tiny_rm()
    with torch.no_grad():
        r_chosen, r_rejected = pair_rewards(model, PAIRS, PAD)
        alone = [[model.values(torch.tensor([reply]))[0, -1].item() for reply in pair] for pair in PAIRS]
    torch.testing.assert_close(r_chosen, torch.tensor([a[0] for a in alone]), rtol=0, atol=1e-5)
    torch.testing.assert_close(r_rejected, torch.tensor([a[1] for a in alone]), rtol=0, atol=1e-5)
    assert r_chosen[2] == pytest.approx(r_rejected[2].item(), abs=1e-5)  # the same reply on both sides


def test_padding_to_the_full_context_changes_no_reward():
    model = tiny_rm(1)
    assert padding_gap(model, PAIRS, PAD) < 1e-5
    rows = [reply for pair in PAIRS for reply in pair]
    with torch.no_grad():  # and the rows do differ, so a score read at one shared position would show
        assert len({round(model.score(torch.tensor([r]), torch.tensor([len(r)])).item(), 4) for r in rows}) >= 5


def test_the_offset_centres_the_rewards_it_was_measured_on():
    model = tiny_rm(2)
    with torch.no_grad():
        r_chosen, r_rejected = pair_rewards(model, PAIRS, PAD)
        mean = torch.cat([r_chosen, r_rejected]).mean().item()
        center_head(model, mean)
        c, r = pair_rewards(model, PAIRS, PAD)
    assert abs(mean) > 0.1  # the test has something to remove
    assert torch.cat([c, r]).mean().item() == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(c - r, r_chosen - r_rejected)  # differences, all BT sees, are kept


def test_accuracy_counts_a_tie_as_half():
    assert accuracy(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 5.0, 1.0])) == pytest.approx(0.625)


def test_freezing_keeps_the_embedding_and_the_lowest_blocks_out_of_training():
    model = tiny_rm()
    freeze_lower(model, 1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.tok_emb.weight" in frozen and all(n.startswith(("backbone.tok_emb", "backbone.blocks.0.")) for n in frozen)
    assert model.head.weight.requires_grad and all(p.requires_grad for p in model.backbone.blocks[1].parameters())
