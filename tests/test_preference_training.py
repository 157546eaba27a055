"""core/rl/preference.py, the machinery DPO and ORPO share, against independent computations: the pair
batch layout, reply log-probs summed over the reply tokens only (read token by token from prefixes of
the unpadded rows), a reference that is a frozen copy, ties in the reward accuracy, the KL estimate."""
from __future__ import annotations

import math

import pytest
import torch

from core.data.chat import chat_example
from core.data.corpus import generate_stories
from core.data.preferences import PreferencePair, generate_pairs
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.data.word_problems import generate_problems
from core.nn.model import Transformer, scaled_config
from core.rl.preference import (Objective, PairLogps, PreferenceConfig, frozen_reference, pair_batch, pair_logps,
                                preference_stats, sampled_kl)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece(generate_stories(300, seed=0), 512))


def tiny(tok: Tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(scaled_config("llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_embd=32,
                                     n_head=4)).eval()


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    by_kind = {}
    for p in generate_pairs(30, (1, 2, 3), seed=0, split="train"):
        by_kind.setdefault(p.kind, p)
    return list(by_kind.values())  # one of each kind: replies of different lengths, so the rows are padded


def test_a_pair_batch_puts_the_chosen_rows_first_and_masks_only_the_reply_and_its_end(tok, pairs):
    batch = pair_batch(tok, pairs)
    n = len(pairs)
    rows = [chat_example(tok, p.prompt, p.chosen) for p in pairs] + [chat_example(tok, p.prompt, p.rejected) for p in pairs]
    assert batch.ids.shape == (2 * n, max(len(ids) for ids, _ in rows))
    for i, (ids, mask) in enumerate(rows):
        assert batch.ids[i, :len(ids)].tolist() == ids
        assert (batch.ids[i, len(ids):] == tok.pad_id).all()
        assert batch.reply_mask[i, :len(ids)].tolist() == mask
        assert batch.reply_mask[i, len(ids):].sum() == 0
        assert ids[len(ids) - sum(mask):][-1] == tok.special_ids["<|end|>"]  # the closing <|end|> is in the reply


def test_reply_log_probs_are_summed_over_the_reply_tokens_only(tok, pairs):
    """Each row alone, unpadded: log pi(y_t | x, y_<t) read from the model run on the prefix that ends
    just before y_t. The batched, padded, shifted computation must give the same sums."""
    model = tiny(tok)
    with torch.no_grad():
        got = pair_logps(model, pair_batch(tok, pairs))
    for i, p in enumerate(pairs):
        for reply, total, tokens in ((p.chosen, got.chosen[i], got.chosen_tokens[i]),
                                     (p.rejected, got.rejected[i], got.rejected_tokens[i])):
            ids, mask = chat_example(tok, p.prompt, reply)
            start = len(ids) - sum(mask)
            with torch.no_grad():
                by_hand = sum(model(torch.tensor([ids[:t]]))[0, -1].double().log_softmax(-1)[ids[t]].item()
                              for t in range(start, len(ids)))
            assert total.item() == pytest.approx(by_hand, abs=1e-4)
            assert tokens.item() == len(ids) - start


def test_the_reference_is_a_frozen_copy_that_does_not_move_when_the_policy_trains(tok, pairs):
    policy = tiny(tok)
    reference = frozen_reference(policy)
    policy_storage = {p.data_ptr() for p in policy.parameters()}
    assert not any(p.data_ptr() in policy_storage for p in reference.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    batch = pair_batch(tok, pairs)
    with torch.no_grad():
        before = pair_logps(reference, batch).chosen.clone()
    pair_logps(policy, batch).chosen.sum().backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.1 * p.grad  # one gradient step on the policy
        assert torch.equal(pair_logps(reference, batch).chosen, before)
        assert not torch.equal(pair_logps(policy, batch).chosen, before)


def test_reward_accuracy_counts_a_tie_as_one_half_and_the_margin_is_the_mean_gap():
    logps = PairLogps(chosen=torch.tensor([-1.0, -2.0, -3.0, -4.0]), rejected=torch.tensor([-2.0, -2.0, -1.0, -9.0]),
                      chosen_tokens=torch.ones(4), rejected_tokens=torch.ones(4))
    by_logp = Objective(loss=None, rewards=lambda p, r, cfg: (p.chosen, p.rejected), uses_reference=False)
    stats = preference_stats(by_logp, logps, None, None)
    assert stats["reward_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert stats["reward_margin"] == pytest.approx((1 + 0 - 2 + 5) / 4)
    assert stats["logp_chosen"] == pytest.approx(-2.5) and stats["logp_rejected"] == pytest.approx(-3.5)


def test_the_sampled_kl_is_exactly_zero_against_an_identical_model_and_grows_as_the_policy_sharpens(tok):
    cfg = PreferenceConfig(max_new_tokens=12)
    problems = generate_problems(8, (1,), seed=0, split="held_out")
    reference = tiny(tok)
    assert sampled_kl(reference, frozen_reference(reference), tok, problems, cfg) == 0.0
    kls = []
    for scale in (2.0, 8.0):  # logits x scale: a sharper policy, further from the reference
        policy = frozen_reference(reference)
        policy.lm_head.weight.mul_(scale)
        kls.append(sampled_kl(policy, reference, tok, problems, cfg))
    assert 0 < kls[0] < kls[1]


def test_pair_logps_of_a_row_do_not_depend_on_the_other_rows_of_the_batch(tok, pairs):
    """Right padding: a causal model never attends to the pads after a token, so a pair scores the same
    alone as in a batch padded to a longer row."""
    model = tiny(tok)
    with torch.no_grad():
        together = pair_logps(model, pair_batch(tok, pairs))
        for i, p in enumerate(pairs):
            alone = pair_logps(model, pair_batch(tok, [p]))
            assert alone.chosen.item() == pytest.approx(together.chosen[i].item(), abs=1e-5)
            assert alone.rejected.item() == pytest.approx(together.rejected[i].item(), abs=1e-5)
    assert math.isfinite(together.rejected.sum().item())
