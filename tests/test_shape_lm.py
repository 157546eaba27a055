"""The shape world's text-only decoder (core/nn/shape_lm.py) and the image prefix of core's Transformer
that the vision-language modules feed it through."""
from __future__ import annotations

import pytest
import torch

from core.artifacts import UserError
from core.data.shapes import HELD_OUT, make_scenes
from core.nn.model import ModelConfig, Transformer
from core.nn.shape_lm import (ShapeLMConfig, answer_accuracy, cache_dir, encode_examples, exact_match, load_shape_lm,
                              pretrain, prior_accuracy, question_prompt, scene_questions, vqa_set)

TINY = ModelConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32)


def test_a_prefix_of_token_embeddings_is_the_same_as_those_tokens():
    torch.manual_seed(0)
    lm = Transformer(TINY).eval()
    head, tail = torch.randint(0, 50, (3, 5)), torch.randint(0, 50, (3, 7))
    whole = lm(torch.cat([head, tail], 1))
    torch.testing.assert_close(lm(tail, prefix=lm.tok_emb(head)), whole[:, 5:])
    assert lm.hidden(tail, prefix=lm.tok_emb(head)).shape == (3, 12, 16)
    targets = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(lm(tail, prefix=lm.tok_emb(head), targets=targets),
                               torch.nn.functional.cross_entropy(whole[:, 5:].flatten(0, 1), targets.flatten()))
    with torch.no_grad():
        generated = lm.generate(tail, 6, temperature=0, prefix=lm.tok_emb(head))
        assert torch.equal(generated, lm.generate(torch.cat([head, tail], 1), 6, temperature=0)[:, 5:])
    with pytest.raises(ValueError, match="exceed block_size"):
        lm(tail, prefix=torch.zeros(3, 26, 16))  # 26 + 7 > 32 positions


def test_examples_train_and_score_the_target_tokens_and_eos_only(workdir):
    tok, _ = load_shape_lm(say=lambda _: None)
    batch = encode_examples(tok, [question_prompt("what colour is the circle?"), "caption:"],
                            ["red", "a small red circle on the left"])
    first = batch.targets[0][batch.loss_mask[0]].tolist()
    assert first == [*tok.encode(" red"), tok.eos_id] and len(first) == 2  # one piece per word
    assert tok.decode(batch.targets[1][batch.loss_mask[1]].tolist()[:-1]) == " a small red circle on the left"
    # the position before the target predicts its first token: it holds the prompt's last token (":")
    start = int(batch.loss_mask[0].nonzero()[0])
    assert tok.decode([int(batch.ids[0, start])]) == ":" and batch.ids[0, 0] == tok.bos_id


def test_exact_match_is_what_greedy_decoding_says(workdir):
    tok, lm = load_shape_lm(say=lambda _: None)
    pairs = scene_questions(make_scenes(12, "train", seed=3))
    batch = encode_examples(tok, [question_prompt(q) for q, _ in pairs], [a for _, a in pairs])
    with torch.no_grad():
        matched = exact_match(lm(batch.ids), batch)
    for i, (q, a) in enumerate(pairs):
        prompt = torch.tensor([[tok.bos_id, *tok.encode(question_prompt(q))]])
        with torch.no_grad():
            said = lm.generate(prompt, 4, temperature=0, stop_token=tok.eos_id)[0, prompt.shape[1]:].tolist()
        said = said[:said.index(tok.eos_id)] if tok.eos_id in said else None
        assert bool(matched[i]) == (said is not None and tok.decode(said) == " " + a), (q, a, said)
    assert 0 < matched.float().mean() < 1  # both outcomes occur, so the equality above is tested both ways


def test_prior_accuracy_takes_each_questions_most_frequent_training_answer():
    train = [("what colour is the circle?", "red")] * 2 + [("what colour is the circle?", "blue"),
                                                          ("where is the red square?", "left")]
    test = [("what colour is the circle?", "red"), ("what colour is the circle?", "blue"),
            ("where is the red triangle?", "left"), ("how many shapes are there?", "one")]
    assert prior_accuracy(train, test) == 2 / 4  # unseen "where is" -> its kind's answer; unseen kind -> wrong


def test_the_text_only_decoder_answers_no_better_than_the_prior(workdir):
    tok, lm = load_shape_lm(say=lambda _: None)  # the configuration the vision-language modules load
    train = scene_questions(make_scenes(ShapeLMConfig().pretrain_scenes, "train", 0))
    for split in ("train", "heldout"):
        test = scene_questions(make_scenes(300, split, seed=7))
        text_only, prior = answer_accuracy(tok, lm, test), prior_accuracy(train, test)
        assert abs(text_only - prior) < 0.06 and text_only < 0.5, (split, text_only, prior)


def test_the_decoder_is_pretrained_once_then_read_frozen_from_the_cache(workdir):
    cfg = ShapeLMConfig(pretrain_steps=2, pretrain_scenes=200, batch=4)
    said = []
    first_tok, first = load_shape_lm(cfg, say=said.append)
    second_tok, second = load_shape_lm(cfg, say=said.append)
    assert len(said) == 1 and "pretraining" in said[0]
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
    ids = torch.tensor([first_tok.encode("question: what size is the square? answer:")])
    assert first_tok.encode("caption:") == second_tok.encode("caption:")
    torch.testing.assert_close(first(ids), second(ids), rtol=0, atol=0)
    assert second.lm_head.weight is second.tok_emb.weight  # the tie survives the round trip
    (cache_dir(cfg) / "decoder.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="decoder.safetensors"):
        load_shape_lm(cfg, say=said.append)


def test_pretraining_is_seeded():
    cfg = ShapeLMConfig(pretrain_steps=3, pretrain_scenes=100, batch=4)
    (_, a), (_, b) = pretrain(cfg), pretrain(cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_heldout_questions_ask_about_the_heldout_shape():
    vqa = vqa_set(40, "heldout", seed=2)
    assert vqa.images.shape == (40, 3, 32, 32) and len(vqa.questions) == len(vqa.answers) == len(vqa.image_index)
    assert len(vqa.questions) == 40 * 5 and vqa.image_index.tolist() == [i for i in range(40) for _ in range(5)]
    held_out_words = {f"{c} {k}" for c, k in HELD_OUT}
    wheres = [q for q in vqa.questions if q.startswith("where is the ")]
    assert len(wheres) == 40 and all(q[len("where is the "):-1] in held_out_words for q in wheres)
    train = vqa_set(40, "train", seed=2)
    assert not any(q[len("where is the "):-1] in held_out_words for q in train.questions if q.startswith("where"))
