"""llava: the projector (LLaVA-1.5's MLP, LLaVA-1's linear map, patch i -> visual token i), the visual tokens
before the text, the loss on the answer tokens only (against a hand computation), what each stage trains (stage
1 leaves the encoder and the decoder bit-identical), a short stage 2 that learns to read the image, and exact
match against what greedy generation with the image says. The toy run is tests/test_modules.py's."""
from __future__ import annotations

import math

import pytest
import torch

from core.nn.shape_lm import answer_accuracy, encode_examples, load_shape_lm, question_prompt
from core.nn.vision import load_vision_encoder
from core.data.shapes import COLOURS, SIDES
from pre_train.vlm.llava.code.llava import (CAPTION_PROMPT, Config, answer_groups, answer_loss, answers_right,
                                            by_kind, colour_by_shape_count, colour_ranks, load_split, make_projector,
                                            max_changes, probe_heldout_shapes, question_kind, question_only_bias,
                                            say_about, snapshot, stage_parameters, train_stage, visual_tokens)

N, D = 64, 64  # patches of the shared encoder, width of the encoder and the decoder


class Ctx:
    """What train_stage needs of a run context."""

    def __init__(self):
        self.tables = {}

    def log(self, table, **row):
        self.tables.setdefault(table, []).append(row)

    def track(self, iterable, *_, **__):
        return iterable


@pytest.fixture
def parts(workdir):
    torch.manual_seed(0)
    tok, lm = load_shape_lm(say=lambda _: None)
    encoder = load_vision_encoder(say=lambda _: None)
    return tok, lm, encoder


def test_the_projector_is_llava15s_gelu_mlp_or_llava1s_linear_map():
    torch.manual_seed(0)
    x = torch.randn(3, N, D)
    mlp = make_projector("mlp", D, D)
    first, second = mlp[0], mlp[2]
    h = x @ first.weight.T + first.bias
    gelu = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))               # GELU, exact (erf) form
    torch.testing.assert_close(mlp(x), gelu @ second.weight.T + second.bias)
    linear = make_projector("linear", D, D)
    torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias)
    assert sum(p.numel() for p in mlp.parameters()) == 2 * (D * D + D)  # hidden width = the LLM's width


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_each_patch_becomes_its_own_visual_token_in_patch_order(kind):
    torch.manual_seed(0)
    projector = make_projector(kind, D, D)
    features = torch.randn(2, N, D)
    tokens = visual_tokens(projector, features)
    assert tokens.shape == (2, N, D)
    moved = features.clone()
    moved[0, 5] += 1.0                                                 # change patch 5 of image 0 only
    changed = (visual_tokens(projector, moved) - tokens).abs().amax(-1) > 0
    assert changed[0, 5] and changed.sum() == 1                        # token 5 of image 0, and nothing else


def test_the_visual_tokens_come_before_the_text_and_the_answer_reads_them(parts):
    tok, lm, _ = parts
    batch = encode_examples(tok, [question_prompt("what colour is the circle?")] * 2, ["red", "red"])
    image, other = torch.randn(2, N, D), torch.randn(2, N, D)
    hidden = lm.hidden(batch.ids, prefix=image)
    assert hidden.shape == (2, N + batch.ids.shape[1], D)              # 64 visual positions, then the text
    other_text = encode_examples(tok, [question_prompt("what size is the square?")] * 2, ["small", "small"])
    # causal: the image's positions come first, so the text cannot change their states ...
    torch.testing.assert_close(lm.hidden(other_text.ids, prefix=image)[:, :N], hidden[:, :N], rtol=0, atol=0)
    # ... while every text position, the one that predicts the answer included, sees the image
    assert (lm(batch.ids, prefix=other) - lm(batch.ids, prefix=image)).abs().amax(-1).min() > 0


def test_the_loss_counts_the_answer_tokens_and_eos_only(parts):
    tok, lm, _ = parts
    batch = encode_examples(tok, [question_prompt("where is the red square?"), CAPTION_PROMPT],
                            ["left", "a small red square on the left"])
    visual = torch.randn(2, N, D)
    logp = torch.log_softmax(lm(batch.ids, prefix=visual), dim=-1)    # logits of the text positions only
    picked = [logp[r, j, batch.targets[r, j]] for r in range(2) for j in range(batch.ids.shape[1])
              if batch.loss_mask[r, j]]
    assert len(picked) == 2 + 8                                       # "left" <eos>; 7 caption words <eos>
    by_hand = -torch.stack(picked).mean()
    torch.testing.assert_close(answer_loss(lm, visual, batch), by_hand, rtol=1e-5, atol=1e-5)


def test_the_product_of_experts_adds_the_question_only_log_probs_over_the_answer_group(parts):
    """Clark et al.'s product of experts, by hand: at the position that predicts the answer word, LLaVA's logits plus
    w log p_q, p_q renormalised over the answer's word group (the five colours, the two sides), 0 for every other
    token and position; the loss is then the cross-entropy of that sum. Weight 0 is LLaVA's plain loss."""
    tok, lm, _ = parts
    torch.manual_seed(1)
    question_only = type(lm)(lm.cfg)                                  # any other decoder will do for the identity
    batch = encode_examples(tok, [question_prompt("what colour is the circle?"), question_prompt("where is the red "
                                                                                                 "square?")],
                            ["red", "left"])
    groups, w = answer_groups(tok), 0.7
    bias = question_only_bias(question_only, batch, groups, w)
    first = [int(batch.loss_mask[r].nonzero()[0]) for r in range(2)]
    for r, words in ((0, COLOURS), (1, SIDES)):
        ids = torch.tensor([tok.encode(" " + word)[0] for word in words])
        with torch.no_grad():
            z = question_only(batch.ids)[r, first[r], ids]
        expected = torch.zeros(lm.cfg.vocab_size)
        expected[ids] = w * (z - torch.logsumexp(z, 0))
        torch.testing.assert_close(bias[r], expected)
    visual = torch.randn(2, N, D)
    with torch.no_grad():
        logits = lm(batch.ids, prefix=visual)
    picked = []
    for r in range(2):
        for j in batch.loss_mask[r].nonzero().flatten().tolist():
            row = logits[r, j] + (bias[r] if j == first[r] else 0)
            picked.append(torch.log_softmax(row, -1)[batch.targets[r, j]])
    torch.testing.assert_close(answer_loss(lm, visual, batch, bias), -torch.stack(picked).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(answer_loss(lm, visual, batch, question_only_bias(question_only, batch, groups, 0.0)),
                               answer_loss(lm, visual, batch), rtol=1e-5, atol=1e-5)


def test_stage_one_trains_the_projector_alone_bit_for_bit(parts):
    tok, lm, encoder = parts
    data = load_split(encoder, 20, "train", seed=0)
    projector = make_projector("mlp", D, D)
    frozen, before = snapshot(encoder, lm), snapshot(projector)
    cfg = Config(stage1_steps=3, batch_size=4, warmup_steps=0, log_every=1)
    train_stage(1, tok, lm, projector, data, cfg, Ctx(), "stage 1")
    assert max(max_changes(frozen, encoder, lm)) == 0.0               # every encoder and decoder tensor identical
    assert min(max_changes(before, projector)) > 0                    # every projector tensor moved
    assert all(p.grad is None for p in lm.parameters())               # no gradient was even computed for the LLM


def test_stage_two_trains_the_projector_and_the_decoder_but_not_the_encoder(parts):
    tok, lm, encoder = parts
    data = load_split(encoder, 20, "train", seed=0)
    projector = make_projector("mlp", D, D)
    assert stage_parameters(1, projector, lm) == list(projector.parameters())
    encoder_before, lm_before, projector_before = snapshot(encoder), snapshot(lm), snapshot(projector)
    train_stage(2, tok, lm, projector, data, Config(stage2_steps=3, batch_size=4, warmup_steps=0), Ctx(), "stage 2")
    assert max(max_changes(encoder_before, encoder)) == 0.0
    assert min(max_changes(projector_before, projector)) > 0
    assert min(max_changes(lm_before, lm)) > 0                        # every decoder tensor trained


def test_stage_two_moves_the_projector_at_its_own_learning_rate(parts):
    """Adam's first step moves each weight by lr * g / (|g| + eps), about lr for any weight with a gradient: after one
    stage-2 step (no warmup) the projector's largest change is stage2_projector_lr, the decoder's stage2_lr."""
    tok, lm, encoder = parts
    data = load_split(encoder, 20, "train", seed=0)
    projector = make_projector("mlp", D, D)
    lm_before, projector_before = snapshot(lm), snapshot(projector)
    cfg = Config(stage2_steps=1, batch_size=8, warmup_steps=0, stage2_lr=2e-3, stage2_projector_lr=1e-5)
    train_stage(2, tok, lm, projector, data, cfg, Ctx(), "stage 2")
    assert max(max_changes(projector_before, projector)) == pytest.approx(1e-5, rel=1e-3)
    assert max(max_changes(lm_before, lm)) == pytest.approx(2e-3, rel=1e-3)


def test_a_short_stage_two_learns_to_read_the_image(parts):
    """After 150 steps on 200 scenes the answers depend on the image: lower loss with each scene's own image
    than with another scene's, and 'how many shapes are there?' (one or two: chance without the image)
    nearly always right. Exact match is what greedy generation with the image says, both ways."""
    tok, lm, encoder = parts
    data, fresh = load_split(encoder, 200, "train", seed=0), load_split(encoder, 40, "train", seed=1)
    batch = encode_examples(tok, [question_prompt(q) for q in fresh.vqa.questions], fresh.vqa.answers)
    torch.manual_seed(0)
    projector = make_projector("mlp", D, D)

    def loss_with(images):
        with torch.no_grad():
            return answer_loss(lm, visual_tokens(projector, fresh.features[images]), batch).item()

    counting = [i for i, q in enumerate(fresh.vqa.questions) if q.startswith("how many")]
    text_only = answers_right(tok, lm, None, fresh)
    assert text_only.float().mean() == answer_accuracy(tok, lm, fresh.vqa.pairs())
    train_stage(2, tok, lm, projector, data, Config(stage2_steps=150, batch_size=32, warmup_steps=5), Ctx(), "stage 2")
    own, other = fresh.vqa.image_index, (fresh.vqa.image_index + 1) % len(fresh.scenes)
    assert loss_with(own) < loss_with(other) - 0.05
    right = answers_right(tok, lm, projector, fresh)
    assert by_kind(fresh.vqa.questions, right)["count"] >= 0.85 > 0.7 >= text_only[counting].float().mean()
    shown = list(range(0, len(fresh.vqa.questions), 3))
    said = [say_about(tok, lm, projector, fresh.features[fresh.vqa.image_index[j]],
                      question_prompt(fresh.vqa.questions[j])) for j in shown]
    agree = [bool(right[j]) == (s == fresh.vqa.answers[j]) for j, s in zip(shown, said)]
    assert all(agree) and 0 < right[shown].float().mean() < 1          # both outcomes occur among those compared
    # a colour answered right is ranked first among the five colour words; one ranked below first is wrong
    colours = [j for j, q in enumerate(fresh.vqa.questions) if question_kind(q) == "colour"]
    ranks = colour_ranks(tok, lm, projector, fresh)
    assert ranks.min() >= 1 and ranks.max() <= 5 and len(ranks) == len(colours)
    assert all(rank == 1 for rank, j in zip(ranks.tolist(), colours) if right[j])
    assert not any(right[j] for rank, j in zip(ranks.tolist(), colours) if rank > 1)


def test_colour_accuracy_is_split_by_how_many_shapes_the_scene_has(parts):
    _, _, encoder = parts
    data = load_split(encoder, 30, "heldout", seed=1)
    shapes = torch.tensor([len(data.scenes[i].shapes) for i in data.vqa.image_index.tolist()])
    assert colour_by_shape_count(data, shapes == 2) == {1: 0.0, 2: 1.0}
    right = torch.rand(len(shapes), generator=torch.Generator().manual_seed(0)) < 0.5
    for n in (1, 2):  # the same share, counted scene by scene
        hits = [bool(right[j]) for i, scene in enumerate(data.scenes) if len(scene.shapes) == n
                for j in (data.vqa.image_index == i).nonzero().flatten().tolist()
                if data.vqa.questions[j].startswith("what colour")]
        assert len(hits) > 3 and colour_by_shape_count(data, right)[n] == pytest.approx(sum(hits) / len(hits))


def test_the_probe_reads_a_held_out_shapes_colour_from_the_frozen_features(parts):
    """The encoder saw every pair in its own pretraining, so a linear probe trained on training scenes names
    the colour and kind of the held-out shapes; probing features of blank images, it can only guess."""
    _, _, encoder = parts
    train, heldout = load_split(encoder, 200, "train", seed=0), load_split(encoder, 40, "heldout", seed=1)
    probe = probe_heldout_shapes(train, heldout, seed=0)
    assert probe["colour"] >= 0.95 and probe["kind"] >= 0.85
    blank = heldout._replace(features=encoder(torch.zeros(40, 3, 32, 32)).detach())
    assert probe_heldout_shapes(train, blank, seed=0)["colour"] <= 0.5


def test_config_refuses_evaluating_on_the_training_scenes():
    assert Config(seed=3, eval_seed=3).problems()
    assert not Config().problems()
