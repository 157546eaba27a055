"""LLaVA on the shape world: a frozen vision encoder, a projector, and the shape-world decoder reading the
projected patches as visual tokens placed before the text, trained in LLaVA's two stages. One file.

Liu, Li, Wu & Lee 2023, "Visual Instruction Tuning" (LLaVA), and Liu, Li, Li & Lee 2024, "Improved
Baselines with Visual Instruction Tuning" (LLaVA-1.5):
    features    Z_v = g(X_v): (B, N, d_v), the frozen ViT's patch features (core/nn/vision.py; N = 64, d_v = 64)
    projector   H_v = W Z_v                                    LLaVA: one linear map             (sec. 4.1)
                H_v = W_2 GELU(W_1 Z_v + b_1) + b_2            LLaVA-1.5: a 2-layer MLP ("mlp2x_gelu")
                per patch: patch i becomes visual token i, of the decoder's width d: (B, N, d)
    sequence    [H_v ; E(<bos> question: ... answer:) ; E(" answer" <eos>)]     the visual tokens come first
    loss        -sum_{i in answer} log p(x_i | X_v, x_<i)      answer tokens and <eos> only; the visual tokens
                                                               and the prompt are context, never targets (sec. 4.2)
    stage 1     feature alignment: image-caption pairs, trains W only (encoder and decoder frozen)
    stage 2     end-to-end fine-tuning: questions about images, trains W and the decoder (encoder frozen)

Two additions to stage 2, each measured against its absence (the ablation):
    replay      + lambda * LM loss on the decoder's own pretraining text    LLaVA-1.5 mixes text-only data (config text_mix)
    debiasing   log p(a | X_v, q) = log_softmax(z_llava + w log p_q(a | q))   product of experts (Clark, Yatskar &
                                                                             Zettlemoyer 2019, eq. 1; RUBi, Cadene et al.
                                                                             2019, for VQA), at the answer word
                p_q: the decoder fine-tuned on the same questions without the image, frozen; LLaVA answers alone
    Why: no training image shows a red triangle, so "triangle -> never red" costs LLaVA's plain loss nothing to learn
    and it learns it (held-out colour 0.01 in the recording before these, a prior the image could not overturn);
    with the prior already in p_q, LLaVA gains nothing by learning it and learns to read the colour instead.

Here the "LLM" is core/nn/shape_lm.py's 2-block decoder, pretrained on the shape world's text (every colour-kind
pair's, DECODER below; blip2 and flamingo read the one pretrained on the training pairs' text); without an image it
is the text-only baseline.

Engineering choices, each with its reason:
  - The frozen encoder's features are computed once per image before training: nothing upstream of them
    trains, so recomputing them every step would give the same numbers at 64 tokens' cost per image.
  - The baselines get their own copy of the decoder, read again from the cache: stage 2 changes the one
    LLaVA uses in place.
  - AdamW without weight decay (LLaVA's scripts use none), a linear warmup then a cosine to 10% of the peak
    (core/nn/training.py). Learning rates are far above LLaVA's 2e-5 for stage 2: a 2-block, width-64 decoder
    trained for about a thousand steps, not a 7B model for one epoch of 665k conversations.
  - The text-only fine-tuned baseline draws the same questions in the same order as stage 2, with the same
    learning rate: the one difference is the image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.artifacts import atomic_write_text
from core.config import Range, Seed
from core.data.shapes import COLOURS, KINDS, SIDES, SIZES, Scene, caption, held_out_shape, make_scenes
from core.nn.model import Transformer
from core.nn.shape_lm import (CAPTION_PROMPT, Examples, ShapeLMConfig, VQASet, answer_accuracy, document_loss,
                              encode_examples, exact_match, load_shape_lm, pretraining_text, prior_accuracy,
                              question_prompt, target_loss, vqa_set)
from core.nn.training import cosine_lr
from core.nn.vision import AttributeHeads, VisionConfig, VisionEncoder, attribute_targets, load_vision_encoder

DECODER = ShapeLMConfig(pretrain_split="pretrain")
"""the shared shape-world decoder, pretrained on every colour-kind pair's text (an LLM has read of red triangles);
the held-out pairs stay unseen by every image LLaVA trains on"""
ENCODER = VisionConfig(pretrain_steps=1000)
"""the shared ViT's architecture and objective, pretrained to convergence: at the shared 300 steps it names the kind of a small shape (3 pixels of
radius) right 0.945 of the time, 1.0 at 1000, and a decoder that cannot read the kind learns to guess it from the
colour, which fails on exactly the held-out pairs"""
ANSWER_WORDS = (tuple(COLOURS), KINDS, SIDES, tuple(SIZES), ("one", "two"))
"""the word groups one-word answers come from (core/data/shapes.py qa_pairs): colour, kind, side, size, count"""
CAPTION_METRICS = {"exact_match": "exact", "token_accuracy": "tokens", "word_accuracy": "words"}
"""metric suffix -> CaptionScores field"""
CURVE_SCENES = 60
"""held-out scenes (the first ones) the accuracy curve over stage 2 is measured on"""
QUESTION_KINDS = {"what colour": "colour", "what shape": "shape", "where": "where", "what size": "size",
                  "how many": "count"}
"""the opening words of each question template of the shape world (core/data/shapes.py qa_pairs) -> its short name"""


@dataclass
class Config:
    projector: Literal["mlp", "linear"] = "mlp"
    """LLaVA-1.5's 2-layer GELU MLP, or LLaVA-1's single linear map"""
    ablation: Literal["no_debias", "no_stage1", "linear"] = "no_debias"
    """the second LLaVA trained for comparison: the whole recipe with LLaVA's plain loss (debias 0), stage 2 alone from
    a fresh projector (no alignment stage), or the whole recipe with the other projector"""
    train_scenes: Annotated[int, Range(ge=10, le=100_000)] = 2000
    """training-split scenes: their captions (stage 1) and every question about them (stage 2)"""
    stage1_steps: Annotated[int, Range(ge=1, le=100_000)] = 500
    """AdamW steps of stage 1 (captions, the projector alone)"""
    stage1_lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak learning rate of stage 1"""
    stage2_steps: Annotated[int, Range(ge=1, le=100_000)] = 1200
    """AdamW steps of stage 2 (questions, projector and decoder), and of the text-only fine-tuned baseline"""
    stage2_lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak learning rate of stage 2 for the decoder"""
    stage2_projector_lr: Annotated[float, Range(gt=0, le=1)] = 3e-4
    """peak learning rate of stage 2 for the projector (LLaVA's trainer has mm_projector_lr for this). A tenth of the
    decoder's: the projector mostly keeps its stage-1 map, and an MLP projector moving at the decoder's rate builds
    colour-and-kind features no training pair trains (held-out 0.879 at seed 0, 0.934 at seed 1 at 3e-3)"""
    text_mix: Annotated[float, Range(ge=0, le=10)] = 0.5
    """weight of a text-only loss added at every stage-2 step: a batch of the decoder's own pretraining documents, as
    LLaVA-1.5 mixes text-only conversations into its instruction data so the LLM keeps its language (0: none)"""
    debias: Annotated[float, Range(ge=0, le=10)] = 1.0
    """weight w of the question-only model in stage 2's product of experts (Clark et al. 2019): LLaVA is trained
    through softmax(log p_llava + w log p_q) at the answer word and answers alone; 0: LLaVA's plain loss"""
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 64
    """examples per step (captions in stage 1, questions in stage 2), each with its own image"""
    warmup_steps: Annotated[int, Range(ge=0, le=10_000)] = 50
    """linear warmup of each stage's learning rate"""
    eval_scenes: Annotated[int, Range(ge=10, le=10_000)] = 300
    """how many held-out scenes (5 questions about each) and how many unseen training-split scenes are scored"""
    eval_seed: Seed = 1000
    """draws the scored scenes of both splits; `seed` draws the training scenes, so the two must differ"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 200
    """every this many stage-2 steps, held-out accuracy on the first CURVE_SCENES evaluation scenes (the curve)"""
    log_every: Annotated[int, Range(ge=1, le=100_000)] = 20
    """log the mean training loss every this many steps"""
    n_examples: Annotated[int, Range(ge=1, le=100)] = 6
    """held-out images whose generated caption and answers are written to examples.txt and drawn"""
    seed: Seed = 0
    """seeds the training scenes, the projector's initial weights and the batch order"""

    def problems(self) -> list[str]:
        problems = []
        if self.eval_seed == self.seed:
            problems.append(f"eval_seed and seed are both {self.seed}: LLaVA would be scored on its own training "
                            f"scenes")
        if self.n_examples > self.eval_scenes:
            problems.append(f"n_examples={self.n_examples} is more than the eval_scenes={self.eval_scenes} to draw "
                            f"from")
        return problems


# --- the model: projector, visual tokens, the loss ------------------------------------------------------
def make_projector(kind: str, d_vision: int, d_model: int) -> nn.Module:
    """LLaVA-1.5's mlp2x_gelu (hidden width = the LLM's width, as in its code) or LLaVA-1's linear map."""
    if kind == "linear":
        return nn.Linear(d_vision, d_model)
    return nn.Sequential(nn.Linear(d_vision, d_model), nn.GELU(), nn.Linear(d_model, d_model))


def visual_tokens(projector: nn.Module, features: Tensor) -> Tensor:
    """(B, N, d_v) patch features -> (B, N, d) visual tokens: the projector maps each patch on its own, so
    token i is patch i (row-major), and the decoder's positions 0 .. N - 1 hold the image."""
    return projector(features)


def answer_loss(lm: Transformer, visual: Tensor, batch: Examples, bias: Tensor | None = None) -> Tensor:
    """LLaVA's loss: mean cross-entropy of the answer tokens (and <eos>) given the image and the prompt. The decoder
    runs on [visual tokens; text]; the states of the P visual positions are cut off, so state j of the text
    predicts its token j + 1, and encode_examples' mask keeps the answer's positions only. With `bias` (B, V), the
    product of experts: bias is added to the logits at the position that predicts the answer word."""
    P = visual.shape[1]
    hidden = lm.hidden(batch.ids, prefix=visual)[:, P:]
    if bias is None:
        return target_loss(hidden, lm.lm_head.weight, batch)
    shift = torch.zeros(*hidden.shape[:2], bias.shape[-1])
    shift[torch.arange(len(bias)), first_answer_position(batch)] = bias
    logits = lm.lm_head(hidden) + shift
    return F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])


def first_answer_position(batch: Examples) -> Tensor:
    """(B,) the position whose state predicts the answer's first token (the prompt's last, ":")."""
    return batch.loss_mask.int().argmax(dim=1)


def answer_groups(tok) -> Tensor:
    """(V,) for each token, the ANSWER_WORDS group its word belongs to, -1 for every other token."""
    group = torch.full((tok.vocab_size,), -1)
    for g, words in enumerate(ANSWER_WORDS):
        for word in words:
            piece = tok.encode(" " + word)
            assert len(piece) == 1, f"the answer word {word!r} is not one token"
            group[piece[0]] = g
    return group


@torch.no_grad()
def question_only_bias(text_lm: Transformer, batch: Examples, groups: Tensor, weight: float) -> Tensor:
    """(B, V) the product of experts' second term: w log p_q(word | question) at the answer position, where p_q is the
    question-only model (the decoder fine-tuned on the same questions without the image) renormalised over the
    answer's word group, and 0 for every other token.
        training   log p(a | image, q) = log_softmax(z_llava + w log p_q)       (Clark et al. 2019, eq. 1)
        answering  z_llava alone
    The question's prior (a triangle is never red in training) is already in p_q, so lowering log p(red) for a
    triangle lowers no loss: LLaVA has nothing to gain from learning it. Over the group alone, because p_q is
    near-certain of the format too (the answer is a colour word, then <eos>): a bias on every token leaves those
    logits untrained in LLaVA, which then answers with any word when it answers alone."""
    rows = torch.arange(len(batch.ids))
    first = first_answer_position(batch)
    logits = text_lm(batch.ids)[rows, first]
    same_group = groups[None, :] == groups[batch.targets[rows, first]][:, None]
    log_q = logits.masked_fill(~same_group, float("-inf")).log_softmax(dim=-1)
    return torch.where(same_group, weight * log_q, 0.0)


def stage_parameters(stage: int, projector: nn.Module, lm: Transformer) -> list[nn.Parameter]:
    """What each stage trains: stage 1 the projector alone, the decoder frozen (requires_grad off, so no
    gradient is even computed for it); stage 2 the projector and the decoder. The encoder never trains."""
    llm_trains = stage == 2
    lm.requires_grad_(llm_trains)
    return [*projector.parameters(), *lm.parameters()] if llm_trains else list(projector.parameters())


# --- data -------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(encoder: VisionEncoder, images: Tensor, chunk: int = 500) -> Tensor:
    return torch.cat([encoder(images[i:i + chunk]) for i in range(0, len(images), chunk)])


class Split(NamedTuple):
    """Scenes with their features, captions and questions: vqa.image_index[q] is the scene question q asks about."""
    scenes: list[Scene]
    features: Tensor
    """(S, N, d_v) the frozen encoder's patch features of each scene's image"""
    vqa: VQASet

    def captions(self) -> list[str]:
        return [caption(s) for s in self.scenes]


def load_split(encoder: VisionEncoder, n_scenes: int, split: str, seed: int) -> Split:
    vqa = vqa_set(n_scenes, split, seed)  # the scenes of make_scenes(n_scenes, split, seed), rendered
    return Split(make_scenes(n_scenes, split, seed), encode_images(encoder, vqa.images), vqa)


def question_kind(question: str) -> str:
    return next(short for opening, short in QUESTION_KINDS.items() if question.startswith(opening))


# --- training ------------------------------------------------------------------------------------------------
def train_stage(stage: int, tok, lm: Transformer, projector: nn.Module | None, data: Split, cfg: Config, ctx,
                name: str, evaluate=None, text_lm: Transformer | None = None, replay=None) -> None:
    """Stage 1 (captions, projector only) or stage 2 (questions, projector and decoder) of LLaVA; with
    projector None, the text-only baseline: stage 2's questions and batches, no image. In stage 2, `text_lm` (the
    question-only model) debiases the loss with weight cfg.debias, and `replay` (prompts, targets: text documents)
    adds cfg.text_mix times their language-modelling loss. `evaluate(step)` is called at the start and every
    cfg.eval_every steps (the held-out curve)."""
    if projector is None:
        lm.requires_grad_(True)
        params = list(lm.parameters())
    else:
        params = stage_parameters(stage, projector, lm)
    steps, peak = (cfg.stage1_steps, cfg.stage1_lr) if stage == 1 else (cfg.stage2_steps, cfg.stage2_lr)
    projector_peak = cfg.stage1_lr if stage == 1 else cfg.stage2_projector_lr
    in_projector = set() if projector is None else {id(p) for p in projector.parameters()}
    param_groups = [{"params": [p for p in params if (id(p) in in_projector) == is_projector], "peak": group_peak}
                    for is_projector, group_peak in ((True, projector_peak), (False, peak))]
    opt = torch.optim.AdamW([g for g in param_groups if g["params"]], lr=peak, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.seed + stage)  # every stage-2 run draws the same batches
    replay_order = torch.Generator().manual_seed(cfg.seed + 10)
    groups = answer_groups(tok) if text_lm is not None else None
    captions = data.captions()
    running = []
    if evaluate is not None:
        evaluate(0)
    for step in ctx.track(range(steps), name, total=steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, group["peak"], cfg.warmup_steps, steps)
        if stage == 1:
            images = torch.randint(0, len(captions), (cfg.batch_size,), generator=order)
            batch = encode_examples(tok, [CAPTION_PROMPT] * cfg.batch_size, [captions[i] for i in images])
        else:
            pick = torch.randint(0, len(data.vqa.questions), (cfg.batch_size,), generator=order)
            images = data.vqa.image_index[pick]
            batch = encode_examples(tok, [question_prompt(data.vqa.questions[i]) for i in pick],
                                    [data.vqa.answers[i] for i in pick])
        if projector is None:
            loss = target_loss(lm.hidden(batch.ids), lm.lm_head.weight, batch)
        else:
            bias = None if text_lm is None else question_only_bias(text_lm, batch, groups, cfg.debias)
            loss = answer_loss(lm, visual_tokens(projector, data.features[images]), batch, bias)
        if replay is not None:
            pick = torch.randint(0, len(replay[0]), (cfg.batch_size,), generator=replay_order).tolist()
            loss = loss + cfg.text_mix * document_loss(tok, lm, [replay[0][i] for i in pick],
                                                       [replay[1][i] for i in pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            ctx.log("history", run=name, step=step + 1, loss=sum(running) / len(running), lr=opt.param_groups[-1]["lr"])
            running = []
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            evaluate(step + 1)
    lm.requires_grad_(False)


# --- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def answers_right(tok, lm: Transformer, projector: nn.Module | None, data: Split, image_index: Tensor | None = None,
                  limit: int | None = None, chunk: int = 1000) -> Tensor:
    """(Q,) bool for the first `limit` questions: greedy decoding gives the answer (shape_lm.exact_match).
    `image_index` shows each question another scene's image (the control); projector None: no image."""
    image_index = data.vqa.image_index if image_index is None else image_index
    n = len(data.vqa.questions) if limit is None else min(limit, len(data.vqa.questions))
    right = []
    for start in range(0, n, chunk):
        rows = range(start, min(n, start + chunk))
        batch = encode_examples(tok, [question_prompt(data.vqa.questions[i]) for i in rows],
                                [data.vqa.answers[i] for i in rows])
        prefix = None if projector is None else visual_tokens(projector, data.features[image_index[list(rows)]])
        right.append(exact_match(lm(batch.ids, prefix=prefix), batch))
    return torch.cat(right)


class CaptionScores(NamedTuple):
    """Teacher-forced caption scores: exact (greedy decoding reproduces the caption word for word), tokens (share
    of caption tokens and <eos> that are the argmax given the true words before them), words (the same share over
    the attribute words alone: size, colour, kind, side, the words only the image can tell)."""
    exact: float
    tokens: float
    words: float


def attribute_token_ids(tok) -> Tensor:
    """The token ids of the caption words that describe the image (each word of the shape world is one piece)."""
    ids = [tok.encode(" " + word) for word in (*SIZES, *COLOURS, *KINDS, *SIDES)]
    assert all(len(piece) == 1 for piece in ids), "an attribute word is not one token"
    return torch.tensor([piece[0] for piece in ids])


@torch.no_grad()
def caption_scores(tok, lm: Transformer, projector: nn.Module | None, data: Split) -> CaptionScores:
    """Projector None: the frozen decoder without the image (its text prior)."""
    batch = encode_examples(tok, [CAPTION_PROMPT] * len(data.scenes), data.captions())
    prefix = None if projector is None else visual_tokens(projector, data.features)
    logits = lm(batch.ids, prefix=prefix)
    right = (logits.argmax(-1) == batch.targets) & batch.loss_mask
    words = torch.isin(batch.targets, attribute_token_ids(tok)) & batch.loss_mask
    return CaptionScores(exact_match(logits, batch).float().mean().item(),
                         (right.sum() / batch.loss_mask.sum()).item(), ((right & words).sum() / words.sum()).item())


@torch.no_grad()
def say_about(tok, lm: Transformer, projector: nn.Module, features: Tensor, prompt: str, max_new: int = 24) -> str:
    """What the model generates (greedy, lm.generate with the visual tokens as its prefix) after `prompt`
    about the image whose features are `features` (N, d_v)."""
    ids = torch.tensor([[tok.bos_id, *tok.encode(prompt)]])
    new = lm.generate(ids, max_new, temperature=0, prefix=visual_tokens(projector, features[None]),
                      stop_token=tok.eos_id)[0, ids.shape[1]:].tolist()
    return tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new).strip()


@torch.no_grad()
def colour_ranks(tok, lm: Transformer, projector: nn.Module, data: Split) -> Tensor:
    """For each "what colour" question, the rank (1 = first) the model gives the true colour among the five
    colour words at the position that predicts the answer."""
    rows = [i for i, q in enumerate(data.vqa.questions) if question_kind(q) == "colour"]
    batch = encode_examples(tok, [question_prompt(data.vqa.questions[i]) for i in rows],
                            [data.vqa.answers[i] for i in rows])
    logits = lm(batch.ids, prefix=visual_tokens(projector, data.features[data.vqa.image_index[rows]]))
    first = first_answer_position(batch)
    colour_ids = torch.tensor([tok.encode(" " + c)[0] for c in COLOURS])
    scores = logits[torch.arange(len(rows)), first][:, colour_ids]
    true = torch.tensor([list(COLOURS).index(data.vqa.answers[i]) for i in rows])
    return 1 + (scores > scores.gather(1, true[:, None])).sum(dim=1)


def probe_heldout_shapes(train: Split, heldout: Split, seed: int, steps: int = 300) -> dict[str, float]:
    """Does the frozen encoder's output still tell a held-out pair's attributes? A linear probe, the encoder's
    own pretraining heads (core/nn/vision.py AttributeHeads: per image half, linear maps of the half's mean
    patch feature), trained on the training split's features, then scored on the held-out shape of each
    held-out scene."""
    torch.manual_seed(seed)
    d, grid = train.features.shape[-1], int(train.features.shape[1] ** 0.5)
    probe = AttributeHeads(d, grid)

    def half_means(features: Tensor) -> Tensor:  # AttributeHeads' pooling, done once: the features are frozen
        return features.view(len(features), grid, 2, grid // 2, d).mean(dim=(1, 3))

    inputs, targets = half_means(train.features), attribute_targets(train.scenes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(F.cross_entropy(head(inputs).flatten(0, 1), targets[a].flatten()) for a, head in probe.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = {a: head(half_means(heldout.features)) for a, head in probe.heads.items()}
    truth = attribute_targets(heldout.scenes)
    rows = torch.arange(len(heldout.scenes))
    sides = torch.tensor([SIDES.index(held_out_shape(scene).side) for scene in heldout.scenes])
    return {a: (logits[a][rows, sides].argmax(-1) == truth[a][rows, sides]).float().mean().item()
            for a in ("colour", "kind")}


def by_kind(questions: list[str], right: Tensor) -> dict[str, float]:
    kinds = [question_kind(q) for q in questions]
    return {k: right[[i for i, x in enumerate(kinds) if x == k]].float().mean().item() for k in QUESTION_KINDS.values()}


def colour_by_shape_count(data: Split, right: Tensor) -> dict[int, float]:
    """Exact match of the "what colour" questions, by how many shapes their scene has (1 or 2). With one shape,
    any colour the image shows is the answer; with two, the model must tell which shape the question names."""
    rows = {n: [i for i, q in enumerate(data.vqa.questions) if question_kind(q) == "colour"
                and len(data.scenes[data.vqa.image_index[i]].shapes) == n] for n in (1, 2)}
    return {n: right[r].float().mean().item() for n, r in rows.items()}


def snapshot(*modules: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


def max_changes(before: list[Tensor], *modules: nn.Module) -> list[float]:
    """Per tensor, the largest |change| since `before` (0.0 exactly when it is bit for bit the same)."""
    return [(now - then).abs().max().item() for now, then in zip(snapshot(*modules), before)]


# --- plots --------------------------------------------------------------------------------------------------
def plot_training(history: list[dict], curve: list[dict], prior: float):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, stage_runs, title in ((axes[0], ("stage 1",), "stage 1: captions, projector only"),
                                  (axes[1], None, "stage 2: questions (and baselines)")):
        names = stage_runs or sorted({r["run"] for r in history if not r["run"].startswith("stage 1")})
        for name in names:
            rows = [r for r in history if r["run"] == name]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        ax.set(xlabel="step", ylabel="cross-entropy of the target tokens", yscale="log", title=title)
        ax.legend(fontsize=8)
    for name in sorted({r["run"] for r in curve}):
        rows = [r for r in curve if r["run"] == name]
        axes[2].plot([r["step"] for r in rows], [r["heldout_accuracy"] for r in rows], marker=".", label=name)
    axes[2].axhline(prior, color="grey", ls=":", label="prior (most frequent answer)")
    axes[2].set(xlabel="stage-2 step", ylabel="exact match", ylim=(0, 1.02),
                title=f"held-out accuracy (first {CURVE_SCENES} scenes)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kinds(rows: list[dict], columns: dict[str, str]):
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(columns)
    for j, (column, label) in enumerate(columns.items()):
        ax.bar([i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))], [r[column] for r in rows],
               width, label=label)
    ax.set_xticks(range(len(rows)), [r["kind"] for r in rows])
    ax.set(ylabel="exact match", ylim=(0, 1.05), title="accuracy by question kind")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


def plot_examples(images: Tensor, texts: list[str]):
    cols = min(3, len(texts))
    rows = -(-len(texts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, texts):
        picture = ax.inset_axes((0.0, 0.5, 0.45, 0.5))  # a square image above its text
        picture.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        picture.set(xticks=[], yticks=[])
        ax.text(0, 0.46, text, fontsize=6.5, va="top", family="monospace", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# --- the run --------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    say = ctx.say
    encoder = load_vision_encoder(ENCODER, say=say)
    tok, lm = load_shape_lm(DECODER, say=say)
    train = load_split(encoder, cfg.train_scenes, "train", cfg.seed)
    heldout = load_split(encoder, cfg.eval_scenes, "heldout", cfg.eval_seed)
    fresh = load_split(encoder, cfg.eval_scenes, "train", cfg.eval_seed)
    d_vision, d_model = train.features.shape[-1], lm.cfg.n_embd

    # what a model without the image can do: the frozen decoder, and the most frequent training answer
    text_only = answer_accuracy(tok, lm, heldout.vqa.pairs())
    text_only_train = answer_accuracy(tok, lm, fresh.vqa.pairs())
    prior = prior_accuracy(train.vqa.pairs(), heldout.vqa.pairs())
    text_only_captions = caption_scores(tok, lm, None, fresh)
    text_only_right = answers_right(tok, lm, None, heldout)  # answer_accuracy's numbers, one by one

    curve: list[dict] = []

    def heldout_curve(name: str, model_lm: Transformer, projector: nn.Module | None):
        def evaluate(step: int) -> None:
            right = answers_right(tok, model_lm, projector, heldout, limit=5 * CURVE_SCENES)  # 5 questions a scene
            curve.append({"run": name, "step": step, "heldout_accuracy": right.float().mean().item()})
            ctx.log("heldout_curve", **curve[-1])
        return evaluate

    # stage 1: feature alignment on captions, the projector alone
    torch.manual_seed(cfg.seed)
    projector = make_projector(cfg.projector, d_vision, d_model)
    frozen_before, projector_before = snapshot(encoder, lm), snapshot(projector)
    train_stage(1, tok, lm, projector, train, cfg, ctx, "stage 1")
    frozen_change = max(max_changes(frozen_before, encoder, lm))
    projector_change = min(max_changes(projector_before, projector))
    aligned = copy.deepcopy(projector)  # the no-debiasing ablation starts stage 2 from this same stage 1
    captions, heldout_captions = caption_scores(tok, lm, projector, fresh), caption_scores(tok, lm, projector, heldout)
    shown = range(cfg.n_examples)
    stage1_captions = [say_about(tok, lm, projector, heldout.features[i], CAPTION_PROMPT) for i in shown]
    say(f"stage 1 (projector only, {cfg.stage1_steps} steps on captions): encoder and decoder max |change| "
        f"{frozen_change:g}, every projector tensor moved (smallest max |change| {projector_change:.3g}); captions "
        f"of fresh training-split images: attribute words right {captions.words:.3f}, all tokens {captions.tokens:.3f}"
        f" (the frozen decoder without the image {text_only_captions.words:.3f} / {text_only_captions.tokens:.3f}), "
        f"word for word {captions.exact:.3f}; held-out images {heldout_captions.words:.3f} / "
        f"{heldout_captions.tokens:.3f} / {heldout_captions.exact:.3f}")

    # the strong baseline, and the question-only model of stage 2's product of experts: the decoder fine-tuned on
    # the same questions and batches, without the image
    _, text_lm = load_shape_lm(DECODER, say=say)
    train_stage(2, tok, text_lm, None, train, cfg, ctx, "text only", heldout_curve("text only", text_lm, None))
    text_right_heldout = answers_right(tok, text_lm, None, heldout)
    text_right_fresh = answers_right(tok, text_lm, None, fresh)
    replay = pretraining_text(DECODER) if cfg.text_mix > 0 else None

    def stage2(model_lm: Transformer, model_projector: nn.Module, name: str, debias: bool) -> None:
        train_stage(2, tok, model_lm, model_projector, train, cfg, ctx, name,
                    heldout_curve(name, model_lm, model_projector),
                    text_lm=text_lm if debias and cfg.debias > 0 else None, replay=replay)

    # stage 2: end-to-end fine-tuning on questions, projector and decoder
    stage2(lm, projector, "stage 2", debias=True)
    right_heldout, right_fresh = answers_right(tok, lm, projector, heldout), answers_right(tok, lm, projector, fresh)
    # the control: every held-out question asked about the next scene's image
    right_shuffled = answers_right(tok, lm, projector, heldout, (heldout.vqa.image_index + 1) % cfg.eval_scenes)
    # why the colour of a held-out pair fails: is the true colour the runner-up, and do the features hold it?
    colour_top2 = (colour_ranks(tok, lm, projector, heldout) <= 2).float().mean().item()
    probe = probe_heldout_shapes(train, heldout, cfg.seed)
    colour_by_count = colour_by_shape_count(heldout, right_heldout)

    # the ablation: LLaVA's plain loss, stage 2 without stage 1, or the whole recipe with the other projector
    _, ablation_lm = load_shape_lm(DECODER, say=say)
    torch.manual_seed(cfg.seed)
    other = {"mlp": "linear", "linear": "mlp"}[cfg.projector] if cfg.ablation == "linear" else cfg.projector
    ablation_projector = aligned if cfg.ablation == "no_debias" else make_projector(other, d_vision, d_model)
    ablation_name = {"no_debias": "no debiasing", "no_stage1": "no stage 1", "linear": f"{other} projector"}[cfg.ablation]
    if cfg.ablation == "linear":
        train_stage(1, tok, ablation_lm, ablation_projector, train, cfg, ctx, f"stage 1, {ablation_name}")
    stage2(ablation_lm, ablation_projector, ablation_name, debias=cfg.ablation != "no_debias")
    ablation_heldout = answers_right(tok, ablation_lm, ablation_projector, heldout).float().mean().item()
    ablation_train = answers_right(tok, ablation_lm, ablation_projector, fresh).float().mean().item()

    kinds = {"heldout": by_kind(heldout.vqa.questions, right_heldout),
             "train": by_kind(fresh.vqa.questions, right_fresh),
             "text_only_finetuned": by_kind(heldout.vqa.questions, text_right_heldout),
             "text_only_finetuned_train": by_kind(fresh.vqa.questions, text_right_fresh),
             "shuffled_image": by_kind(heldout.vqa.questions, right_shuffled),
             "text_only": by_kind(heldout.vqa.questions, text_only_right)}
    kind_rows = [{"kind": k, **{column: kinds[column][k] for column in kinds}} for k in QUESTION_KINDS.values()]
    for row in kind_rows:
        ctx.log("accuracy_by_kind", **row)

    # decoded examples: the caption after stage 1, each question's answer after stage 2
    texts = []
    for i, stage1_caption in zip(shown, stage1_captions):
        lines = [f"true:    {heldout.captions()[i]}", f"stage 1: {stage1_caption}"]
        for j in (heldout.vqa.image_index == i).nonzero().flatten().tolist():
            q, answer = heldout.vqa.questions[j], heldout.vqa.answers[j]
            said = say_about(tok, lm, projector, heldout.features[i], question_prompt(q))
            lines.append(f"{q} -> {said}" + ("" if said == answer else f"  (true: {answer})"))
        texts.append("\n".join(lines))
    atomic_write_text(ctx.path("examples.txt"), "held-out images: the true caption, the caption generated after "
                      "stage 1, and the answers generated after stage 2\n\n" + "\n\n".join(texts) + "\n")
    say("two held-out examples (all in examples.txt):\n" + "\n\n".join(texts[:2]))

    metrics = {
        "heldout_accuracy": right_heldout.float().mean().item(),
        "train_accuracy": right_fresh.float().mean().item(),
        "text_only_accuracy": text_only,
        "text_only_train_accuracy": text_only_train,
        "prior_accuracy": prior,
        "text_only_finetuned_accuracy": text_right_heldout.float().mean().item(),
        "text_only_finetuned_train_accuracy": text_right_fresh.float().mean().item(),
        "shuffled_image_accuracy": right_shuffled.float().mean().item(),
        **{f"heldout_{k}": v for k, v in kinds["heldout"].items()},
        "heldout_colour_top2": colour_top2,
        "heldout_colour_one_shape": colour_by_count[1],
        "heldout_colour_two_shapes": colour_by_count[2],
        "probe_heldout_colour": probe["colour"],
        "probe_heldout_kind": probe["kind"],
        **{f"caption_{name}": getattr(captions, field) for name, field in CAPTION_METRICS.items()},
        **{f"heldout_caption_{name}": getattr(heldout_captions, field) for name, field in CAPTION_METRICS.items()},
        "text_only_caption_token_accuracy": text_only_captions.tokens,
        "text_only_caption_word_accuracy": text_only_captions.words,
        "stage1_frozen_max_change": frozen_change,
        "stage1_projector_min_change": projector_change,
        "ablation_heldout_accuracy": ablation_heldout,
        "ablation_train_accuracy": ablation_train,
        **{f"{name}_final_loss": next(r["loss"] for r in reversed(ctx.tables["history"]) if r["run"] == run_name)
           for name, run_name in (("stage1", "stage 1"), ("stage2", "stage 2"), ("text_only", "text only"))},
    }
    metrics["heldout_over_baseline"] = metrics["heldout_accuracy"] - max(metrics["text_only_finetuned_accuracy"], prior)
    metrics["text_only_finetuned_over_prior"] = metrics["text_only_finetuned_accuracy"] - prior
    metrics["image_gain"] = metrics["heldout_accuracy"] - metrics["shuffled_image_accuracy"]
    metrics["caption_word_gain"] = captions.words - text_only_captions.words
    say(f"held-out accuracy {metrics['heldout_accuracy']:.3f} ("
        + ", ".join(f"{k} {v:.2f}" for k, v in kinds["heldout"].items())
        + f"); the decoder fine-tuned the same way without the image {metrics['text_only_finetuned_accuracy']:.3f}, "
        f"the frozen decoder {text_only:.3f}, prior {prior:.3f}, the same questions about another scene's image "
        f"{metrics['shuffled_image_accuracy']:.3f}; fresh training-split scenes {metrics['train_accuracy']:.3f} "
        f"(text only, fine-tuned {metrics['text_only_finetuned_train_accuracy']:.3f})")
    say(f"held-out colour questions: {colour_by_count[1]:.3f} right in one-shape scenes, {colour_by_count[2]:.3f} in "
        f"two-shape scenes; the true colour is among the model's two likeliest colours in {colour_top2:.3f} "
        f"of them; a linear probe of the frozen features names the held-out shape's colour {probe['colour']:.3f}, its "
        f"kind {probe['kind']:.3f}")
    say(f"ablation, {ablation_name}: held-out accuracy {ablation_heldout:.3f}, training split {ablation_train:.3f}")

    ctx.save_figure(plot_training(ctx.tables["history"], curve, prior), "training.png")
    ctx.save_figure(plot_kinds(kind_rows, {"heldout": "LLaVA, held-out", "train": "LLaVA, training split",
                                           "text_only_finetuned": "text only, fine-tuned (held-out)",
                                           "text_only": "frozen decoder, no image (held-out)",
                                           "shuffled_image": "LLaVA, another scene's image (held-out)"}),
                    "accuracy_by_kind.png")
    ctx.save_figure(plot_examples(heldout.vqa.images[list(shown)], texts), "examples.png")
    return metrics
