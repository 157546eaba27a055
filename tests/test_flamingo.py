"""flamingo: the init identity (the model IS the frozen LM, bit for bit), the gradient at init (the gates
get one although tanh(0) = 0, every weight behind them none), the perceiver resampler and the gated
cross-attention against hand computations, causality and the image's reach once the gates are open,
the frozen LM after training steps, and a tiny run that learns what only the image says. The toy
preset's checks and determinism are covered in tests/test_modules.py."""
from __future__ import annotations

import math

import pytest
import torch

from core.nn.model import ModelConfig, Transformer
from core.nn.shape_lm import Examples, exact_match
from pre_train.vlm.flamingo.code.flamingo import (
    Config, CrossAttention, Flamingo, GatedCrossAttentionDense, PerceiverAttention, PerceiverResampler,
    first_step_gradients, make_optimizer, training_step,
)

D = 16
TINY = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=D, ffn_hidden=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_flamingo(seed: int = 0) -> Flamingo:
    """A freshly initialised (trainable) tiny decoder wrapped with 4 latents, 2 resampler layers."""
    torch.manual_seed(seed)
    return Flamingo(Transformer(TINY), n_latents=4, resampler_layers=2, n_head=2, ff_mult=2)


def tiny_batch(seed: int = 1, B: int = 3, T: int = 7, N: int = 10) -> tuple[Examples, torch.Tensor]:
    """Random ids, the last 3 positions scored, and random image features (B, N, D)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (B, T), generator=gen)
    targets = torch.randint(0, 50, (B, T), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -3:] = True
    return Examples(ids, targets, mask), torch.randn(B, N, D, generator=gen)


def open_gates(model: Flamingo, value: float = 0.5) -> None:
    with torch.no_grad():
        for layer in model.xattn:
            layer.attn_gate.fill_(value)
            layer.ff_gate.fill_(-value)


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_h)) v for each head, one example (Tq, d), (Tk, d) -> (Tq, d), as a loop."""
    d_h = q.shape[-1] // n_head
    out = []
    for h in range(n_head):
        cols = slice(h * d_h, (h + 1) * d_h)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d_h), dim=-1)
        out.append(weights @ v[:, cols])
    return torch.cat(out, dim=-1)


def test_at_init_the_model_is_the_frozen_lm_bit_for_bit():
    model = tiny_flamingo()
    batch, features = tiny_batch()
    with torch.no_grad():
        assert torch.equal(model(batch.ids, features), model.lm(batch.ids))  # not close: equal
        assert torch.equal(model(batch.ids, torch.randn_like(features)), model.lm(batch.ids))  # the image plays no part
    assert set(model.gates().values()) == {0.0}


def test_at_init_only_the_gates_get_a_gradient():
    """d loss / d a = <dL/dy, XAttn(...)> is not 0 although tanh(0) = 0; every weight behind a gate gets
    tanh(0) * ... = 0 exactly, so the first AdamW step moves the gates and nothing else."""
    model = tiny_flamingo()
    batch, features = tiny_batch()
    gate_min, weight_max = first_step_gradients(model, batch, features)
    assert gate_min > 1e-6 and weight_max == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, Config(lr=1e-2, weight_decay=0.0))
    training_step(model, opt, batch, features)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {f"xattn.{i}.{g}_gate" for i in range(2) for g in ("attn", "ff")}


def test_resampler_output_has_r_tokens_whatever_the_number_of_image_tokens():
    torch.manual_seed(0)
    resampler = PerceiverResampler(D, n_latents=5, layers=2, n_head=2, ff_mult=2)
    for n in (1, 10, 64, 100):
        assert resampler(torch.randn(3, n, D)).shape == (3, 5, D)


def test_perceiver_attention_attends_to_the_features_and_the_latents():
    """Queries from LN(latents); keys and values from [LN(features); LN(latents)] (Flamingo, Fig. 4)."""
    torch.manual_seed(0)
    attn = PerceiverAttention(D, n_head=2)
    features, latents = torch.randn(2, 6, D), torch.randn(2, 3, D)
    out = attn(features, latents)
    for b in range(2):
        x, lat = attn.feature_norm(features[b]), attn.latent_norm(latents[b])
        both = torch.cat([x, lat])
        k, v = both @ attn.kv.weight[:D].T, both @ attn.kv.weight[D:].T
        expected = by_hand(lat @ attn.q.weight.T, k, v, 2) @ attn.out.weight.T
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


def test_gated_cross_attention_reads_the_latents_and_no_other_text_token():
    torch.manual_seed(0)
    layer = GatedCrossAttentionDense(D, n_head=2, ff_mult=2)
    with torch.no_grad():
        layer.attn_gate.fill_(0.7)
        layer.ff_gate.fill_(-0.4)
    x, latents = torch.randn(2, 5, D), torch.randn(2, 4, D)
    out = layer(x, latents)
    attn: CrossAttention = layer.attn
    for b in range(2):
        h = layer.attn_norm(x[b])
        k, v = latents[b] @ attn.kv.weight[:D].T, latents[b] @ attn.kv.weight[D:].T
        y = x[b] + math.tanh(0.7) * (by_hand(h @ attn.q.weight.T, k, v, 2) @ attn.out.weight.T)
        expected = y + math.tanh(-0.4) * layer.ff(y)
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)
    # each text position is computed from itself and the latents alone
    changed = x.clone()
    changed[:, 3] += 1.0
    differs = (layer(changed, latents) != out).any(dim=-1)
    assert differs[:, 3].all() and not differs[:, [0, 1, 2, 4]].any()


def test_with_open_gates_the_text_stays_causal_and_the_image_matters():
    model = tiny_flamingo()
    open_gates(model)
    batch, features = tiny_batch()
    with torch.no_grad():
        logits = model(batch.ids, features)
        later = batch.ids.clone()
        later[:, 4:] = (later[:, 4:] + 1) % 50
        assert torch.equal(model(later, features)[:, :4], logits[:, :4])  # no earlier logit moves
        other_image = model(batch.ids, features.roll(1, dims=0))
    assert (other_image - logits).abs().amax(dim=(1, 2)).min() > 1e-4  # every row reads its image


def test_training_steps_change_the_adapter_and_never_the_decoder():
    """The decoder arrives trainable (a fresh Transformer); the wrapper freezes it, bit for bit."""
    model = tiny_flamingo()
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lm.")}
    opt = make_optimizer(model, Config(lr=1e-2))
    for step in range(3):
        training_step(model, opt, *tiny_batch(seed=step))
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    unchanged = [k for k, v in after.items() if torch.equal(v, adapter_before[k])]
    assert not unchanged, unchanged  # every resampler and gated-layer tensor trained


def test_a_tiny_run_learns_what_only_the_image_says():
    """Four image classes, one prompt: the answer token is the image's class. The frozen LM alone gives one
    answer to every row (at most a quarter right); trained gated layers read it from the image."""
    model = tiny_flamingo()
    gen = torch.Generator().manual_seed(0)
    prototypes, answers = torch.randn(4, 10, D, generator=gen), torch.tensor([11, 22, 33, 44])
    prompt = torch.randint(0, 50, (1, 6), generator=gen)

    def batch(n: int) -> tuple[Examples, torch.Tensor]:
        label = torch.randint(0, 4, (n,), generator=gen)
        ids = torch.cat([prompt.expand(n, 6), answers[label, None]], dim=1)
        mask = torch.zeros(n, 7, dtype=torch.bool)
        mask[:, 5] = True  # the prompt's last position predicts the answer
        examples = Examples(ids, torch.cat([ids[:, 1:], ids[:, :1]], dim=1), mask)
        return examples, prototypes[label] + 0.3 * torch.randn(n, 10, D, generator=gen)

    held_out = batch(200)

    def accuracy() -> float:
        with torch.no_grad():
            return exact_match(model(held_out[0].ids, held_out[1]), held_out[0]).float().mean().item()

    before = accuracy()
    opt = make_optimizer(model, Config(lr=1e-2, weight_decay=0.0))
    for _ in range(60):
        training_step(model, opt, *batch(32))
    assert before <= 0.3 and accuracy() >= 0.9, (before, accuracy())
