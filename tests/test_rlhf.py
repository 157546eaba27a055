"""The formulas of PPO-RLHF (post_train/alignment/rlhf) on hand-made tensors: the KL-shaped reward,
GAE over a masked response, the whitening, the clipped policy and value losses, the RM score read
at the last real token, and the memory counted from the tensors. The toy run itself is in
tests/test_modules.py. Tensors use the shifted layout: column j is token j + 1."""
from __future__ import annotations

import pytest
import torch

from core.nn.heads import ScalarHeadModel
from core.nn.model import Transformer, scaled_config
from core.nn.sequences import right_pad, token_logprobs
from core.rl.group_policy import Rollout
from post_train.alignment.rlhf.code.rlhf import (Models, optimizer_state_bytes, policy_loss, response_gae,
                                                 score_rollout, shaped_rewards, tensor_bytes, value_loss, whiten)

# two rows: row 0 has 2 prompt columns, 3 response columns and 1 padding column; row 1 ends at the last column
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -2.0, -3.0], [-0.2, -0.4, -0.6, -0.8, -1.0, -1.2]])
REF_LOGP = torch.tensor([[-1.5, -1.0, -1.0, -0.5, -2.5, -1.0], [-0.2, -0.2, -0.8, -0.8, -0.5, -1.7]])
SCORES = torch.tensor([2.0, -1.0])
# -0.1 (logp - ref) on the response, + the score on its last token
REWARDS = torch.tensor([[0.0, 0.0, -0.05, 0.05, -0.05 + 2.0, 0.0], [0.0, 0.02, -0.02, 0.0, 0.05, -0.05 - 1.0]])


def test_shaped_rewards_put_the_kl_on_every_response_token_and_the_score_on_the_last_one_only():
    rewards = shaped_rewards(LOGP, REF_LOGP, SCORES, MASK, kl_coef=0.1)
    torch.testing.assert_close(rewards, REWARDS)
    # their sum is the RM score minus beta times the k1 KL estimate of the response
    kl = ((LOGP - REF_LOGP) * MASK).sum(1)
    torch.testing.assert_close(rewards.sum(1), SCORES - 0.1 * kl)


def test_without_the_kl_coefficient_the_reward_is_the_score_at_the_last_response_token():
    rewards = shaped_rewards(LOGP, REF_LOGP, SCORES, MASK, kl_coef=0.0)
    expected = torch.zeros_like(MASK)
    expected[0, 4], expected[1, 5] = 2.0, -1.0
    torch.testing.assert_close(rewards, expected)


def test_gae_over_a_masked_response_equals_the_recursion_over_its_tokens_alone():
    # the critic has a value at every position, prompt and padding included: 9 and 7 must not leak in
    values = torch.tensor([[9.0, 9.0, 1.0, 0.5, 0.2, 7.0], [9.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    advantages, returns = response_gae(REWARDS, values, MASK, gamma=0.9, lam=0.5)
    # by hand, row 0: delta_4 = 1.95 - 0.2 = 1.75 (the episode ends: no bootstrap);
    # delta_3 = 0.05 + 0.9 * 0.2 - 0.5 = -0.27, A_3 = -0.27 + 0.45 * 1.75 = 0.5175;
    # delta_2 = -0.05 + 0.9 * 0.5 - 1.0 = -0.6, A_2 = -0.6 + 0.45 * 0.5175 = -0.367125
    expected = torch.tensor([[0.0, 0.0, -0.367125, 0.5175, 1.75, 0.0],
                             [0.0, 0.0802028125, -0.04399375, -0.208875, -0.5975, -1.55]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * MASK)


def test_at_lambda_one_and_gamma_one_the_return_is_the_score_minus_the_kl_still_to_come():
    values = torch.rand(MASK.shape, generator=torch.Generator().manual_seed(0))
    _, returns = response_gae(REWARDS, values, MASK, gamma=1.0, lam=1.0)
    to_go = REWARDS.flip(1).cumsum(1).flip(1) * MASK  # sum of the shaped rewards from t to the end
    torch.testing.assert_close(returns, to_go)


def test_whitening_uses_the_response_tokens_only():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    s = (2 / 3) ** 0.5  # population std of 1, 2, 3
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[0.0, -1 / s, 0.0, 1 / s, 0.0]]))


def test_clipped_policy_loss_against_a_hand_computation():
    # column 0 is the prompt: its huge ratio and advantage must not count
    ratio = torch.tensor([[5.0, 1.5, 0.5, 1.1, 0.7]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.3, -1.2, -0.9]])
    logp = (old_logp + ratio.log()).requires_grad_(True)
    advantages = torch.tensor([[100.0, 1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    loss, clipped = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): 1.5 with A > 0 -> -1.2 (clipped); 0.5 with A > 0 -> -0.5 (the worse side is
    # unclipped); 1.1 inside -> 2.2; 0.7 with A < 0 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.8) / 4)
    assert clipped == pytest.approx(0.5)
    loss.backward()
    # d(-A r)/d logp = -A r where the unclipped term is taken, 0 where the clip is
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.5 / 4, 2.2 / 4, 0.0]]))


def test_clipped_value_loss_against_a_hand_computation():
    returns = torch.tensor([[50.0, 1.0, 1.0, 0.0]])
    old_values = torch.tensor([[0.0, 0.0, 0.8, 0.5]])
    values = torch.tensor([[-50.0, 0.5, 1.1, 0.1]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    loss = value_loss(values, old_values, returns, mask, clip=0.2)
    # column 1: V = 0.5 is kept at 0.2: max(0.25, 0.64) = 0.64; column 2: kept at 1.0: max(0.01, 0) = 0.01;
    # column 3: kept at 0.3: max(0.01, 0.09) = 0.09; the prompt column 0 does not count
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 0.09) / 3)
    loss.backward()
    # only column 2 takes the unclipped error: d/dV 1/2 (V - R)^2 / 3 = 0.1 / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, 0.1 / 3, 0.0]]))


def tiny_transformer(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(scaled_config("llama", vocab_size=50, block_size=32, n_layer=1, n_embd=16, n_head=2)).eval()


def test_score_rollout_reads_the_reward_at_each_rows_last_real_token_and_the_kl_over_the_response():
    rows, prompt_lengths = [[1, 5, 9, 4, 7], [7, 3, 2, 8, 8, 6, 1, 3]], [2, 4]
    reward_model = ScalarHeadModel(tiny_transformer(1)).eval()
    torch.nn.init.normal_(reward_model.head.weight)
    models = Models(actor=tiny_transformer(2), critic=ScalarHeadModel(tiny_transformer(3)),
                    reference=tiny_transformer(4), reward_model=reward_model)
    ids = right_pad(rows, 0)
    masks = right_pad([[0] * p + [1] * (len(r) - p) for r, p in zip(rows, prompt_lengths)], 0)[:, 1:].float()
    flags = torch.zeros(2, 1)
    scored = score_rollout(models, Rollout(ids, masks, flags, flags, flags, flags), temperature=1.0)
    with torch.no_grad():
        alone = torch.stack([reward_model.values(torch.tensor([r]))[0, -1] for r in rows])
        kl = [(token_logprobs(models.actor(torch.tensor([r])), torch.tensor([r]))
               - token_logprobs(models.reference(torch.tensor([r])), torch.tensor([r])))[0, p - 1:].sum()
              for r, p in zip(rows, prompt_lengths)]
    torch.testing.assert_close(scored["scores"], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(scored["kl"], torch.stack(kl), rtol=0, atol=1e-5)


def test_memory_is_counted_from_the_tensors_once_per_tied_weight():
    model = tiny_transformer(0).train()
    n = model.num_params()
    assert tensor_bytes(model.parameters()) == 4 * n  # fp32; the tied LM head is the embedding, counted once
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(50, (2, 6))).sum().backward()
    assert tensor_bytes(p.grad for p in model.parameters()) == 4 * n
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 4 * n  # exp_avg and exp_avg_sq, the step counters left out
