"""A tiny language model of the shape world (core/data/shapes.py), pretrained on its text alone and
cached: the decoder the vision-language modules (llava, blip2, flamingo) attach images to, and the
text-only baseline they are measured against.

    text     "caption: a small red circle on the left"              (one document per caption)
             "question: what colour is the circle? answer: red"     (one per question), each <bos> .. <eos>
    tokens   a sentencepiece BPE (core/data/tokenizer.py) of 400 pieces trained on that text: every
             word of the shape world is one piece
    model    core/nn/model.py's Transformer (RMSNorm, RoPE, SwiGLU), 2 layers, width 64

It learns the formats and the priors (which words answer which question, how often), never an
image: on a question about a scene it can do no better than the most frequent answer, so its
exact-match accuracy is the text-only baseline a vision-language model must beat.

What it has read is a choice (ShapeLMConfig.pretrain_split): the training split's text alone, so it has
never read of a held-out colour-kind pair (the default, blip2 and flamingo), or every pair's text, as an
LLM pretrained on the web has read of red triangles while no image of one need be in a VLM's own
training data (llava). Either way no image of a held-out pair reaches what a VLM trains.

    tok, lm = load_shape_lm()                       # the shipped copy, or pretrained on first use; then cached
    vqa = vqa_set(500, "heldout", seed=1)           # images, and questions about them
    batch = encode_examples(tok, [question_prompt(q)], [a])
    logits = lm(batch.ids, prefix=image_tokens)     # image_tokens (B, P, 64), or no prefix
    exact_match(logits, batch)                      # (B,) bool: greedy decoding would say the answer
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from core.artifacts import atomic_write, atomic_write_text, copy_shipped, unreadable_pretrained
from core.data.shapes import Scene, Split, caption, held_out_shape, make_scenes, qa_pairs, render_batch
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.nn.loss import linear_cross_entropy
from core.nn.model import ModelConfig, Transformer
from core.paths import pretrained_cache

CAPTION_PROMPT = "caption:"


def question_prompt(question: str) -> str:
    return f"question: {question} answer:"


@dataclass(frozen=True)
class ShapeLMConfig:
    vocab_size: int = 400
    """sentencepiece pieces (256 byte-fallback pieces and the special tokens included)"""
    n_layer: int = 2
    """transformer blocks"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 64
    """model width (the vision encoder's feature width too)"""
    block_size: int = 128
    """longest sequence: 64 image tokens (LLaVA's prefix) + the longest caption fit"""
    pretrain_scenes: int = 2000
    """scenes whose captions and questions make the text corpus"""
    pretrain_split: Split = "train"
    """the scenes' split: "train" (no held-out colour-kind pair in the text) or "pretrain" (every pair)"""
    pretrain_steps: int = 400
    """AdamW steps of pretraining"""
    batch: int = 64
    """documents per step"""
    lr: float = 3e-3
    """AdamW learning rate (constant)"""
    seed: int = 0
    """initial weights, scenes and batch order"""


class Examples(NamedTuple):
    """prompt + target sequences, right-padded: ids (B, T); targets (B, T) the next token at each
    position; loss_mask (B, T) True where that next token belongs to the target (its words and <eos>)."""
    ids: Tensor
    targets: Tensor
    loss_mask: Tensor


def encode_examples(tok: Tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> Examples:
    """<bos> prompt " target" <eos> per row. Only the target's tokens are trained and scored: the model
    is not asked to predict the prompt it is given."""
    rows, starts = [], []
    for prompt, target in zip(prompts, targets):
        head = [tok.bos_id, *tok.encode(prompt)]
        rows.append(head + tok.encode(" " + target) + [tok.eos_id])
        starts.append(len(head))
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, start - 1:len(row) - 1] = True  # position j predicts token j + 1
    next_ids = torch.cat([ids[:, 1:], ids.new_full((len(rows), 1), tok.pad_id)], dim=1)
    return Examples(ids, next_ids, mask)


def target_loss(hidden: Tensor, head_weight: Tensor, batch: Examples) -> Tensor:
    """Mean cross-entropy over the target tokens only. hidden (B, T, d): the states of the batch's T
    token positions (a prefix's states cut off)."""
    return linear_cross_entropy(hidden[batch.loss_mask], head_weight, batch.targets[batch.loss_mask])


def exact_match(logits: Tensor, batch: Examples) -> Tensor:
    """(B,) bool: every target token (and the <eos> after it) is the argmax at its position. Teacher
    forcing with argmax equals greedy decoding here: greedy decoding emits the target iff each of its
    tokens is the argmax given the earlier ones, which is what this tests, in one forward pass."""
    wrong = (logits.argmax(-1) != batch.targets) & batch.loss_mask
    return ~wrong.any(dim=1)


def scene_questions(scenes: Sequence[Scene]) -> list[tuple[str, str]]:
    return [pair for scene in scenes for pair in qa_pairs(scene)]


class VQASet(NamedTuple):
    """Questions about rendered scenes: images (S, 3, 32, 32); image_index (Q,) the image each question
    asks about; questions and answers, Q of each."""
    images: Tensor
    image_index: Tensor
    questions: list[str]
    answers: list[str]

    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.questions, self.answers))


def vqa_set(n_scenes: int, split: Split, seed: int) -> VQASet:
    """Every question of each scene; on the held-out split only those about the held-out shape (and the
    count), so that each one needs a colour-kind pair no training image showed."""
    scenes = make_scenes(n_scenes, split, seed)
    index, questions, answers = [], [], []
    for i, scene in enumerate(scenes):
        for q, a in qa_pairs(scene, about=held_out_shape(scene) if split == "heldout" else None):
            index.append(i)
            questions.append(q)
            answers.append(a)
    return VQASet(render_batch(scenes), torch.tensor(index), questions, answers)


def corpus(scenes: Sequence[Scene]) -> tuple[list[str], list[str]]:
    """(prompts, targets): each scene's caption and every one of its questions."""
    prompts, targets = [], []
    for scene in scenes:
        prompts.append(CAPTION_PROMPT)
        targets.append(caption(scene))
        for q, a in qa_pairs(scene):
            prompts.append(question_prompt(q))
            targets.append(a)
    return prompts, targets


def prior_accuracy(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> float:
    """Chance as a model without the image can best reach it: answer each test question with the answer
    that question most often had in training; a question never seen (one about a held-out pair) with
    the most frequent answer of its kind ("where is the", "what colour is the", ...)."""
    def kind(question: str) -> str:
        return question.split(" the ")[0]

    counts: dict[str, Counter] = {}
    for q, a in train:
        counts.setdefault(q, Counter())[a] += 1
        counts.setdefault(kind(q), Counter())[a] += 1
    return sum(counts.get(q, counts.get(kind(q), Counter([None]))).most_common(1)[0][0] == a
               for q, a in test) / len(test)


def pretraining_text(cfg: ShapeLMConfig) -> tuple[list[str], list[str]]:
    """(prompts, targets): the documents the decoder is pretrained on."""
    return corpus(make_scenes(cfg.pretrain_scenes, cfg.pretrain_split, cfg.seed))


def pretrain(cfg: ShapeLMConfig) -> tuple[Tokenizer, Transformer]:
    prompts, targets = pretraining_text(cfg)
    tok = Tokenizer(train_sentencepiece([f"{p} {t}" for p, t in zip(prompts, targets)], cfg.vocab_size))
    torch.manual_seed(cfg.seed)
    lm = Transformer(model_config(cfg))
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.pretrain_steps):
        pick = torch.randint(0, len(prompts), (cfg.batch,), generator=order).tolist()
        loss = document_loss(tok, lm, [prompts[i] for i in pick], [targets[i] for i in pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tok, lm.eval()


def document_loss(tok: Tokenizer, lm: Transformer, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
    """Language-modelling cross-entropy of whole documents "<bos> prompt target <eos>": every token is a
    target here (the prompt is text to be modelled too), padding not."""
    batch = encode_examples(tok, prompts, targets)
    real = batch.targets != tok.pad_id
    return linear_cross_entropy(lm.hidden(batch.ids)[real], lm.lm_head.weight, batch.targets[real])


def model_config(cfg: ShapeLMConfig) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_kv_head=cfg.n_head, n_embd=cfg.n_embd,
                       ffn_hidden=int(8 / 3 * cfg.n_embd))


@torch.no_grad()
def answer_accuracy(tok: Tokenizer, lm: Transformer, pairs: Sequence[tuple[str, str]]) -> float:
    """Exact-match accuracy of the text-only model on questions (no image)."""
    batch = encode_examples(tok, [question_prompt(q) for q, _ in pairs], [a for _, a in pairs])
    return exact_match(lm(batch.ids), batch).float().mean().item()


def cache_dir(cfg: ShapeLMConfig):
    tag = "_".join(f"{v}" for v in dataclasses.astuple(cfg))
    return pretrained_cache() / f"shape_lm_{tag}"


def load_shape_lm(cfg: ShapeLMConfig = ShapeLMConfig(),
                  say: Callable[[str], None] = print) -> tuple[Tokenizer, Transformer]:
    """The tokenizer and the decoder pretrained with `cfg`, from the cache, filled from the shipped copy if there is
    one (core/paths.py SHIPPED_PRETRAINED), else trained now (and `say` so). The decoder comes back frozen
    (requires_grad off, eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    folder = cache_dir(cfg)
    weights = folder / "decoder.safetensors"
    if not weights.exists() and not copy_shipped(weights):
        say(f"no pretrained shape-world language model for this config; pretraining one on the text of "
            f"{cfg.pretrain_scenes} scenes ({cfg.pretrain_steps} steps) -> {folder}")
        tok, lm = pretrain(cfg)
        tok.save(folder)
        heldout = scene_questions(make_scenes(500, "heldout", cfg.seed + 1))
        report = {"config": dataclasses.asdict(cfg),
                  "heldout_text_only_accuracy": answer_accuracy(tok, lm, heldout)}
        atomic_write_text(folder / "pretraining.json", json.dumps(report, indent=2))
        blob = save({k: v.clone() for k, v in lm.state_dict().items()})  # the tied head: a copy, not a view
        atomic_write(weights, lambda f: f.write(blob))
    tok = Tokenizer.load(folder)
    lm = Transformer(model_config(cfg))
    try:
        lm.load_state_dict(load_file(str(weights)))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise unreadable_pretrained(weights, "shape-world language model", exc) from None
    for p in lm.parameters():
        p.requires_grad_(False)
    return tok, lm.eval()
