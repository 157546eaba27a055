"""blip2: the ITC loss against a hand computation, the learnt temperature and its clip, hard negatives
(never the positive, drawn from the similarity distribution), the three attention masks (as matrices and
as what the Q-Former's outputs depend on), the [CLS] text embedding, retrieval scoring with repeated
captions, a short stage 1 that retrieves held-out images, and stage 2 keeping the decoder frozen. The toy
run's checks and determinism are covered by tests/test_modules.py."""
from __future__ import annotations

import math

import pytest
import torch

from core.nn.shape_lm import load_shape_lm
from core.nn.vision import load_vision_encoder
from core.data.shapes import caption, make_scenes, render_batch
from pre_train.vlm.blip2.code.blip2 import (
    MAX_LOGIT_SCALE, Config, QFormer, Stage2Model, TextBatch, attention_mask, chance_recall, distinct_caption_batch,
    encode_text, hard_negatives, image_features, itc_loss, itc_scores, recall_at_1, stage_one, stage_one_losses,
    stage_two,
)

TINY = Config(n_query=3, width=16, n_layer=2, n_head=2, embed_dim=8)
VOCAB = 20


def tiny_qformer(seed: int = 0) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(TINY, VOCAB, image_dim=12).eval()


class Log:
    """The run context's logging, without a run."""

    def __init__(self):
        self.tables = {}

    def log(self, table, **row):
        self.tables.setdefault(table, []).append(row)

    def track(self, iterable, description, total=None):
        return iterable


# --- ITC ------------------------------------------------------------------------------------------------
def test_itc_loss_is_the_symmetric_cross_entropy_of_the_diagonal_by_hand():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.5, 0.4], [0.0, 0.8, 0.6]])
    tau = 0.2
    rows = [-math.log(math.exp(sim[i, i] / tau) / sum(math.exp(sim[i, j] / tau) for j in range(3))) for i in range(3)]
    cols = [-math.log(math.exp(sim[j, j] / tau) / sum(math.exp(sim[i, j] / tau) for i in range(3))) for j in range(3)]
    expected = (sum(rows) / 3 + sum(cols) / 3) / 2
    assert itc_loss(sim, torch.tensor(1 / tau)).item() == pytest.approx(expected, rel=1e-6)
    # a perfect, sharp similarity costs nothing; an uninformative one costs ln B
    assert itc_loss(torch.eye(3), torch.tensor(100.0)).item() < 1e-6
    assert itc_loss(torch.zeros(4, 4), torch.tensor(10.0)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_the_temperature_is_learnt_through_its_log_and_clipped_as_in_clip():
    qformer = QFormer(Config(init_temperature=0.07), VOCAB, image_dim=12)
    assert isinstance(qformer.log_inv_temperature, torch.nn.Parameter) and qformer.log_inv_temperature.requires_grad
    assert 1 / qformer.logit_scale().item() == pytest.approx(0.07)
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.7]])
    itc_loss(sim, qformer.logit_scale()).backward()
    assert qformer.log_inv_temperature.grad.item() < 0, "a right ranking gets sharper when 1/tau grows"
    with torch.no_grad():
        qformer.log_inv_temperature.fill_(7.0)
    qformer.clip_temperature()
    assert qformer.log_inv_temperature.item() == pytest.approx(MAX_LOGIT_SCALE)
    assert 1 / qformer.logit_scale().item() == pytest.approx(0.01)


# --- hard negatives --------------------------------------------------------------------------------------
def test_hard_negatives_are_never_the_positive_and_follow_the_similarity():
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.2, 0.8, 0.6, 0.1], [0.3, 0.3, 0.7, 0.2], [0.1, 0.4, 0.0, 0.9]])
    scale = torch.tensor(5.0)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    text_counts, image_counts = torch.zeros(4, 4), torch.zeros(4, 4)
    for _ in range(draws):
        text_for_image, image_for_text = hard_negatives(sim, scale, gen)
        text_counts[torch.arange(4), text_for_image] += 1
        image_counts[torch.arange(4), image_for_text] += 1
    assert text_counts.diagonal().sum() == 0 and image_counts.diagonal().sum() == 0
    for counts, s in ((text_counts, sim), (image_counts, sim.t())):
        for i in range(4):   # p(j) = exp(5 s_ij) / sum over j' != i, by hand
            weights = [math.exp(5 * s[i, j].item()) if j != i else 0.0 for j in range(4)]
            expected = torch.tensor([w / sum(weights) for w in weights])
            assert torch.allclose(counts[i] / draws, expected, atol=0.03), (i, counts[i] / draws, expected)


# --- masks -------------------------------------------------------------------------------------------------
EXPECTED = {  # 2 queries (q), 3 text positions (t), the last one padding; rows attend to columns
    "itc": ["11000", "11000", "00110", "00110", "00110"],
    "itm": ["11110", "11110", "11110", "11110", "11110"],
    "itg": ["11000", "11000", "11100", "11110", "11110"],
}


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_attention_masks_by_hand(mode):
    real = torch.tensor([[True, True, False]])
    mask = attention_mask(mode, 2, real)
    assert mask.shape == (1, 5, 5)
    assert ["".join(str(int(v)) for v in row) for row in mask[0].tolist()] == EXPECTED[mode]


def outputs(qformer: QFormer, image: torch.Tensor, ids: torch.Tensor, mode: str):
    with torch.no_grad():
        return qformer(image, ids, torch.ones_like(ids, dtype=torch.bool), mode)


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_what_each_mask_lets_the_queries_and_the_text_see(mode):
    qformer = tiny_qformer()
    gen = torch.Generator().manual_seed(1)
    image, other_image = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 12, generator=gen)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    later_changed = ids.clone()
    later_changed[:, 4:] = (ids[:, 4:] + 1) % VOCAB
    q, t = outputs(qformer, image, ids, mode)
    q_text, t_text = outputs(qformer, image, later_changed, mode)
    q_image, t_image = outputs(qformer, other_image, ids, mode)
    queries_see_text = not torch.allclose(q, q_text, atol=1e-6)
    text_sees_image = not torch.allclose(t, t_image, atol=1e-6)
    early_text_sees_later_text = not torch.allclose(t[:, :4], t_text[:, :4], atol=1e-6)
    assert not torch.allclose(q, q_image, atol=1e-6), "the queries always read the image"
    assert (queries_see_text, text_sees_image, early_text_sees_later_text) == {
        "itc": (False, False, True),   # uni-modal: two separate encoders sharing weights
        "itm": (True, True, True),     # bi-directional: everything mixes
        "itg": (False, True, False),   # multimodal causal: text reads the queries and its past only
    }[mode]


def test_the_text_embedding_is_the_cls_output_of_the_text_alone():
    """ITC's text side read from the joint uni-modal pass equals a pass over the text alone, and moves
    with the text: it is the [CLS] position, not a query's."""
    qformer = tiny_qformer()
    gen = torch.Generator().manual_seed(2)
    image, ids = torch.randn(3, 5, 12, generator=gen), torch.randint(0, VOCAB, (3, 4), generator=gen)
    ids[:, 0] = qformer.cls_id
    text = TextBatch(ids, torch.ones_like(ids, dtype=torch.bool))
    query_out, text_out = outputs(qformer, image, ids, "itc")
    joint = qformer.text_embedding(text_out)
    alone = qformer.text_embedding(qformer(None, ids, text.real, "itc")[1])
    torch.testing.assert_close(joint, alone)
    changed = ids.clone()
    changed[:, 2] = (ids[:, 2] + 1) % VOCAB
    assert not torch.allclose(qformer.text_embedding(outputs(qformer, image, changed, "itc")[1]), joint)
    scores = itc_scores(qformer, image, text)  # the retrieval path: each side alone
    embeddings = qformer.image_embeddings(query_out)
    torch.testing.assert_close(scores, torch.einsum("iqe,te->itq", embeddings, joint).amax(-1))


def test_training_scores_pairs_as_retrieval_does():
    """The ITC similarity stage 1 trains (one joint pass under the uni-modal mask) is the one retrieval ranks by
    (image and text each in a pass of its own): same text position, nothing seen across."""
    qformer = tiny_qformer()
    gen = torch.Generator().manual_seed(3)
    image, ids = torch.randn(4, 5, 12, generator=gen), torch.randint(0, VOCAB, (4, 6), generator=gen)
    ids[:, 0] = qformer.cls_id
    text = TextBatch(ids, torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        trained = stage_one_losses(qformer, image, text, gen).sim
    torch.testing.assert_close(trained, itc_scores(qformer, image, text))


# --- data and retrieval scoring ------------------------------------------------------------------------------
def test_batches_hold_distinct_captions_and_captions_encode_with_cls_then_dec():
    caption_ids = torch.tensor([0, 1, 0, 2, 1, 3, 3, 4])
    idx = distinct_caption_batch(caption_ids, 5, torch.Generator().manual_seed(0))
    assert len(idx) == 5 and len(set(caption_ids[idx].tolist())) == 5
    assert torch.equal(idx, distinct_caption_batch(caption_ids, 5, torch.Generator().manual_seed(0)))


def test_caption_encoding(workdir):
    tok, _ = load_shape_lm(say=lambda _: None)
    text = encode_text(tok, ["a small red circle on the left", "a large blue square on the right and a small "
                                 "green circle on the left"], cls_id=tok.vocab_size)
    assert text.ids[0, 0] == tok.vocab_size and text.ids[1, 0] == tok.vocab_size
    assert tok.decode(text.ids[0, 1:text.real[0].sum() - 1].tolist()).strip() == "a small red circle on the left"
    assert text.ids[0, text.real[0].sum() - 1] == tok.eos_id and not text.real[0, -1] and text.real[1].all()
    generation = text.for_generation(tok.vocab_size + 1)
    assert (generation.ids[:, 0] == tok.vocab_size + 1).all() and torch.equal(generation.ids[:, 1:], text.ids[:, 1:])


def test_recall_counts_a_duplicate_caption_as_right_and_chance_matches():
    captions = ["a", "a", "b", "c"]
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.0],    # image 0 -> text 1: the same caption, right
                           [0.9, 0.1, 0.0, 0.0],    # right
                           [0.0, 0.0, 0.2, 0.9],    # image 2 -> text 3: wrong
                           [0.0, 0.0, 0.0, 0.5]])   # right
    i2t, t2i = recall_at_1(scores, captions)
    assert i2t == pytest.approx(3 / 4)
    # text 0 -> image 1 (right), text 1 -> image 0 (right), text 2 -> image 2 (right), text 3 -> image 2 (wrong)
    assert t2i == pytest.approx(3 / 4)
    assert chance_recall(captions) == pytest.approx((2 + 2 + 1 + 1) / 16)
    assert chance_recall(["x"] * 5) == 1.0 and chance_recall(list("abcde")) == pytest.approx(1 / 5)


# --- training ------------------------------------------------------------------------------------------------
def test_a_short_stage_one_retrieves_held_out_images(workdir):
    torch.set_num_threads(1)
    encoder = load_vision_encoder(say=lambda _: None)
    tok, _ = load_shape_lm(say=lambda _: None)
    cfg = Config(train_scenes=600, stage1_steps=150, batch=32, eval_every=75)
    scenes = make_scenes(cfg.train_scenes, "train", 0)
    heldout = make_scenes(100, "heldout", 1)
    captions = [caption(s) for s in heldout]
    torch.manual_seed(0)
    qformer = QFormer(cfg, tok.vocab_size, encoder.cfg.d)
    gallery = (image_features(encoder, render_batch(heldout)), encode_text(tok, captions, qformer.cls_id), captions)
    log = Log()
    stage_one(cfg, qformer, tok, image_features(encoder, render_batch(scenes)), [caption(s) for s in scenes], gallery,
              torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), log)
    before, after = log.tables["recall"][0], log.tables["recall"][-1]
    chance = chance_recall(captions)
    assert before["heldout_recall_i2t"] < 3 * chance
    assert after["heldout_recall_i2t"] > 5 * chance and after["heldout_recall_t2i"] > 5 * chance, after
    first, last = log.tables["stage1"][0], log.tables["stage1"][-1]
    assert last["itc_loss"] < first["itc_loss"] and last["itg_loss"] < first["itg_loss"]


def test_stage_two_trains_the_qformer_and_projection_and_leaves_the_decoder_bit_exact(workdir):
    torch.set_num_threads(1)
    encoder = load_vision_encoder(say=lambda _: None)
    tok, decoder = load_shape_lm(say=lambda _: None)
    cfg = Config(stage2_steps=3, batch=8, eval_every=3)
    torch.manual_seed(0)
    model = Stage2Model(QFormer(cfg, tok.vocab_size, encoder.cfg.d), decoder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scenes = make_scenes(20, "train", 0)
    features = image_features(encoder, render_batch(scenes))
    stage_two(cfg, model, tok, features, scenes, torch.Generator().manual_seed(0), Log())
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("decoder.") for k in moved), sorted(k for k in moved if k.startswith("decoder."))
    assert {"proj.weight", "qformer.queries"} <= moved
    assert all(p.grad is None for p in decoder.parameters())
