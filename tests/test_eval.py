"""The leaderboard's statistics against independent computations: pass@k by counting subsets, the
Wilson bounds as the roots of the score test they invert, and the story perplexity from per-token
log-probs of the model (core/nn/sequences.token_logprobs) rather than a cross-entropy call."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from core.nn.model import Transformer, scaled_config
from core.nn.sequences import token_logprobs
from post_train.evaluation.eval.code.eval import pass_at_k, story_perplexity, wilson_interval


def test_pass_at_k_is_the_share_of_k_subsets_that_hold_a_right_sample():
    """Chen et al. 2021's estimator is exact for the n samples drawn: of all C(n, k) ways to pick k of
    them, the share with at least one right one. The plug-in 1 - (1 - c/n)^k is not (it draws with
    replacement: 1 - (7/8)^8 = 0.66 for one right sample in eight, where pass@8 of those eight is 1)."""
    for n in range(1, 9):
        for c in range(n + 1):
            right = set(range(c))
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                share = sum(bool(right & set(s)) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("successes, n", [(0, 90), (1, 90), (25, 90), (45, 90), (89, 90), (90, 90), (3, 10)])
def test_wilson_bounds_are_where_the_score_test_turns_significant(successes, n):
    """Wilson's interval is every p0 the score test |p - p0| <= z sqrt(p0 (1 - p0) / n) does not reject:
    both bounds solve n (p - p0)^2 = z^2 p0 (1 - p0). The normal (Wald) interval p +- z sqrt(p(1-p)/n)
    puts sqrt(p(1-p)) at the estimate instead, and collapses to [0, 0] at 0 successes."""
    z = 1.96
    p = successes / n
    low, high = wilson_interval(successes, n, z)
    tol = 1e-12  # the bounds at 0 and n successes are 0 and 1 up to rounding
    assert -tol <= low <= p + tol and p - tol <= high <= 1.0 + tol
    for p0 in (low, high):
        assert n * (p - p0) ** 2 == pytest.approx(z * z * p0 * (1 - p0), abs=1e-12)
    if successes == 0:  # the only root besides p0 = 0: z^2 / (n + z^2)
        assert (low, high) == pytest.approx((0.0, z * z / (n + z * z)))
    else:
        assert low < p < high or p == 1.0


class IdTokenizer:
    """Stories already written as ids: encode returns them, eos is id 0."""
    eos_id = 0

    def encode(self, story: list[int]) -> list[int]:
        return story


def test_story_perplexity_is_exp_of_the_mean_next_token_loss_over_the_predicted_tokens():
    torch.manual_seed(0)
    model = Transformer(scaled_config("llama", vocab_size=20, block_size=16, n_layer=1, n_embd=16, n_head=2)).eval()
    stories = [[3, 7, 1, 9, 4], [5, 5, 2], [8, 6, 11, 12, 13, 2, 1, 7]]
    nll = []
    with torch.no_grad():
        for story in stories:
            ids = torch.tensor([[0, *story, 0]])  # <eos> story <eos>: every token after the first is predicted
            nll += (-token_logprobs(model(ids), ids)[0]).tolist()
    assert len(nll) == sum(len(s) + 1 for s in stories)
    assert story_perplexity(model, IdTokenizer(), stories) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
