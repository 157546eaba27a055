"""core/nn/moe.py against hand computations: 1 expert + top-1 equals the dense SwiGLU, the
load-balancing loss (value 1.0 at perfect balance, and a hand-computed batch), capacity dropping on
a hand-made routing, shared experts, and the router's gradient through the combine weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.nn.moe import MoE, SwiGLU, capacity, load_balancing_loss

D = 8


def routed_by_identity(n_experts: int, top_k: int, scale: float = 10.0, **kwargs) -> MoE:
    """An MoE with d_model = n_experts whose router is `scale * I`: a token's logits are its own
    coordinates, so one-hot-ish inputs pick their experts by hand."""
    moe = MoE(n_experts, 4, n_experts, top_k, **kwargs)
    with torch.no_grad():
        moe.router.weight.copy_(scale * torch.eye(n_experts))
    return moe


def test_swiglu_formula():
    torch.manual_seed(0)
    ffn, x = SwiGLU(D, 16), torch.randn(3, D)
    expected = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("renormalize", [True, False])
def test_one_expert_top1_equals_dense_swiglu(renormalize):
    torch.manual_seed(0)
    dense = SwiGLU(D, 16)
    moe = MoE(D, 16, n_experts=1, top_k=1, renormalize=renormalize)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(moe(x), dense(x))
    assert moe.tokens_per_expert.tolist() == [10]
    assert moe.dropped_fraction == 0.0
    assert moe.aux_loss.item() == pytest.approx(1.0)  # one expert is trivially balanced


def test_output_is_weighted_sum_of_top_k_experts():
    torch.manual_seed(1)
    moe, x = MoE(D, 8, n_experts=4, top_k=2), torch.randn(6, D)
    probs = (x @ moe.router.weight.T).softmax(-1)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        w, idx = probs[t].topk(2)
        w = w / w.sum()                                            # Mixtral renormalisation
        for weight, e in zip(w, idx):
            expected[t] += weight * moe.experts[int(e)](x[t])
    torch.testing.assert_close(moe(x), expected)


def test_deepseek_weights_are_not_renormalised():
    torch.manual_seed(2)
    moe, x = MoE(D, 8, n_experts=4, top_k=2, renormalize=False), torch.randn(5, D)
    _, weights, idx = moe.route(x)
    probs = (x @ moe.router.weight.T).softmax(-1)
    torch.testing.assert_close(weights, probs.gather(1, idx))
    assert (weights.sum(-1) < 1).all()


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (6, 3)])
def test_aux_loss_is_one_at_perfect_balance(n_experts, top_k):
    """Token i is a scaled one-hot on expert i: every expert is some token's first choice, the
    probability rows are permutations of each other, so f_i = P_i = 1/E exactly."""
    moe = routed_by_identity(n_experts, top_k)
    x = torch.eye(n_experts)
    if top_k > 1:  # make the 2nd..k-th choices a cyclic shift so they are balanced too
        x = sum(torch.roll(torch.eye(n_experts), j, dims=1) * (1 - 0.1 * j) for j in range(top_k))
    moe(x)
    assert moe.tokens_per_expert.tolist() == [top_k] * n_experts
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_formula_on_hand_made_f_and_p():
    probs = torch.tensor([[0.7, 0.2, 0.1],
                          [0.6, 0.3, 0.1],
                          [0.1, 0.1, 0.8],
                          [0.5, 0.4, 0.1]])
    chosen = torch.tensor([[0, 1], [0, 1], [2, 0], [0, 1]])      # 8 assignments: 4, 3, 1
    f = [4 / 8, 3 / 8, 1 / 8]
    P = [(0.7 + 0.6 + 0.1 + 0.5) / 4, (0.2 + 0.3 + 0.1 + 0.4) / 4, (0.1 + 0.1 + 0.8 + 0.1) / 4]
    hand = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert load_balancing_loss(probs, chosen, 3).item() == pytest.approx(hand)
    # uniform router probabilities give 1.0 whatever f is (sum_i f_i = 1)
    assert load_balancing_loss(torch.full((4, 3), 1 / 3), chosen, 3).item() == pytest.approx(1.0)


def test_aux_loss_inside_moe_matches_independent_computation():
    torch.manual_seed(3)
    moe, x = MoE(D, 8, n_experts=5, top_k=2), torch.randn(2, 7, D)
    moe(x)
    probs = torch.softmax(x.reshape(-1, D) @ moe.router.weight.T, -1)
    top2 = probs.topk(2, dim=-1).indices
    f = torch.stack([(top2 == e).sum() for e in range(5)]).float() / top2.numel()
    assert moe.aux_loss.item() == pytest.approx(5 * (f * probs.mean(0)).sum().item(), rel=1e-6)
    assert moe.tokens_per_expert.sum().item() == 14 * 2


def test_capacity_drops_later_tokens_top1():
    """4 tokens all choose expert 0 of 2; capacity = ceil(1.0 * 4 * 1 / 2) = 2: tokens 0 and 1
    are served, tokens 2 and 3 are dropped and get a zero output."""
    moe = routed_by_identity(2, top_k=1, capacity_factor=1.0)
    x = torch.tensor([[1.0, 0.0]] * 4) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    out = moe(x)
    assert capacity(1.0, 4, 1, 2) == 2
    assert moe.tokens_per_expert.tolist() == [4, 0]
    assert moe.dropped_fraction == pytest.approx(2 / 4)
    torch.testing.assert_close(out[:2], moe.experts[0](x[:2]))   # weight 1 after renormalisation
    assert (out[2:] == 0).all()


def test_capacity_serves_first_choices_before_second_choices():
    """3 experts, top-2, 3 tokens, capacity = ceil(0.5 * 3 * 2 / 3) = 1 per expert.
    1st choices: t0 -> e0, t1 -> e0, t2 -> e1; 2nd choices: t0 -> e1, t1 -> e2, t2 -> e2.
    Queues in priority order: e0 [t0(1st), t1(1st)], e1 [t2(1st), t0(2nd)], e2 [t1(2nd), t2(2nd)].
    Served: e0 <- t0, e1 <- t2, e2 <- t1; dropped: 3 of 6 assignments. A position-only rule
    would give e1 to t0 instead of t2."""
    moe = routed_by_identity(3, top_k=2, capacity_factor=0.5)
    x = torch.tensor([[0.9, 0.5, 0.0],
                      [0.9, 0.0, 0.5],
                      [0.0, 0.9, 0.5]])
    out = moe(x)
    assert moe.dropped_fraction == pytest.approx(3 / 6)
    _, w, _ = moe.route(x)
    expert = lambda e, t: moe.experts[e](x[t])
    torch.testing.assert_close(out[0], w[0, 0] * expert(0, 0))
    torch.testing.assert_close(out[1], w[1, 1] * expert(2, 1))
    torch.testing.assert_close(out[2], w[2, 0] * expert(1, 2))


def test_large_capacity_drops_nothing():
    torch.manual_seed(4)
    x = torch.randn(16, D)
    free = MoE(D, 8, n_experts=4, top_k=2)
    capped = MoE(D, 8, n_experts=4, top_k=2, capacity_factor=4 / 2)  # capacity = N: never binding
    capped.load_state_dict(free.state_dict())
    torch.testing.assert_close(capped(x), free(x))
    assert capped.dropped_fraction == 0.0


def test_shared_experts_apply_to_every_token():
    """With the router's experts all dropped (capacity 0), the output is exactly the shared
    expert on every token; with routing on, output = routed + shared."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, D)
    moe = MoE(D, 8, n_experts=4, top_k=2, n_shared=2, capacity_factor=0.0)
    torch.testing.assert_close(moe(x), moe.shared(x))
    assert moe.dropped_fraction == 1.0
    assert moe.shared.w1.out_features == 2 * 8                     # two shared experts of width 8
    routed = MoE(D, 8, n_experts=4, top_k=2)
    routed.router.load_state_dict(moe.router.state_dict())
    routed.experts.load_state_dict(moe.experts.state_dict())
    moe.capacity_factor = None
    torch.testing.assert_close(moe(x), routed(x) + moe.shared(x))


def test_two_shared_experts_equal_one_double_width_swiglu():
    torch.manual_seed(6)
    a, b, x = SwiGLU(D, 4), SwiGLU(D, 4), torch.randn(3, D)
    merged = SwiGLU(D, 8)
    with torch.no_grad():
        merged.w1.weight.copy_(torch.cat([a.w1.weight, b.w1.weight]))
        merged.w3.weight.copy_(torch.cat([a.w3.weight, b.w3.weight]))
        merged.w2.weight.copy_(torch.cat([a.w2.weight, b.w2.weight], dim=1))
    torch.testing.assert_close(merged(x), a(x) + b(x))


def test_router_gets_gradient_through_combine_weights():
    torch.manual_seed(7)
    moe, x = MoE(D, 8, n_experts=4, top_k=2), torch.randn(10, D)
    moe(x).square().sum().backward()                              # task loss only, no aux loss
    assert moe.router.weight.grad is not None
    assert moe.router.weight.grad.abs().sum() > 0


def test_top1_with_renormalisation_gives_router_no_task_gradient():
    """A pitfall worth pinning: renormalised top-1 weights are identically 1, so only the aux
    loss trains the router (Switch keeps the raw probability for this reason)."""
    torch.manual_seed(8)
    x = torch.randn(10, D)
    renorm = MoE(D, 8, n_experts=4, top_k=1)
    renorm(x).square().sum().backward()
    assert renorm.router.weight.grad.abs().max() < 1e-7             # zero up to rounding of w / w
    raw = MoE(D, 8, n_experts=4, top_k=1, renormalize=False)
    raw(x).square().sum().backward()
    assert raw.router.weight.grad.abs().max() > 1e-3


def test_aux_loss_gradient_reaches_router():
    torch.manual_seed(9)
    moe = MoE(D, 8, n_experts=4, top_k=2)
    moe(torch.randn(10, D))
    assert moe.aux_loss.requires_grad, "f has no gradient (counts): the loss must push on P, the router probabilities"
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert math.isfinite(moe.z_loss.item())


# --- the `moe` module's helpers (tests/test_modules.py runs its toy preset and checks) -----------

def test_module_perfect_balance_aux_is_one_and_imbalance_metric():
    import numpy as np
    from pre_train.llm.moe.code.moe import load_imbalance, perfect_balance_aux
    for n_experts, top_k in [(8, 1), (8, 2), (5, 3)]:
        assert perfect_balance_aux(n_experts, top_k, np.random.default_rng(0)) == pytest.approx(1.0, abs=1e-6)
    assert load_imbalance(torch.tensor([5, 5, 5, 5])) == 1.0
    assert load_imbalance(torch.tensor([8, 0, 0, 0])) == 4.0          # all on one expert: = n_experts


def test_module_markov_source_and_conditional_entropy():
    import numpy as np
    from pre_train.llm.moe.code.moe import Config, conditional_entropy, markov_source
    cfg = Config(vocab_size=4)
    table = markov_source(cfg, np.random.default_rng(0))
    assert table.shape == (4, 4, 4)
    np.testing.assert_allclose(table.sum(-1), 1.0)
    contexts = torch.tensor([[0, 1], [2, 3], [0, 1]])
    hand = np.mean([-(table[a, b] * np.log(table[a, b])).sum() for a, b in contexts.tolist()])
    assert conditional_entropy(table, contexts) == pytest.approx(hand)


def test_capacity_lets_a_later_token_change_an_earlier_ones_output():
    """Why the causal Transformer builds its MoE without capacity: token 0's 2nd choice waits behind
    token 1's 1st choice, so changing token 1 alone drops (or serves) token 0's second expert."""
    torch.manual_seed(0)
    moe = MoE(D, 8, n_experts=2, top_k=2, capacity_factor=0.5)  # capacity = ceil(0.5 * 2 * 2 / 2) = 1
    x = torch.randn(2, D)
    first = int(moe.router(x[:1]).argmax())
    with torch.no_grad():  # make token 1 prefer the expert token 0 ranks second, then the other one
        later = [x[1] + 10 * moe.router.weight[1 - first] - 10 * moe.router.weight[first],
                 x[1] + 10 * moe.router.weight[first] - 10 * moe.router.weight[1 - first]]
        outputs = [moe(torch.stack([x[0], x1]))[0] for x1 in later]
    assert not torch.allclose(outputs[0], outputs[1])
