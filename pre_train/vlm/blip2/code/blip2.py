"""BLIP-2's Q-Former on the shape world, in one file.

Li, Li, Savarese & Hoi 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models". Both the image encoder and the language model stay frozen; a small
transformer between them, the Q-Former, is the only thing trained (plus one linear projection):

    queries   Q in R^{N_q x d}: learned vectors, the same for every image (here 8 of width 64)
    layer     [Q; T] <- [Q; T] + SelfAttn([Q; T], mask)       queries and text tokens share the layer,
              Q      <- Q + CrossAttn(Q, image features)      the mask decides who sees whom; only the
              Q, T   <- Q + FFN_q(Q),  T + FFN_t(T)           queries read the image (§3.1)

Stage 1, representation learning (§3.2): three objectives on (image, caption) pairs, one mask each.

    ITC  uni-modal mask (queries and text do not see each other). z_q = proj(query outputs), t = proj([CLS]
         output), both L2-normalised; s(I, T) = max_q cos(z_q, t). With the learnt temperature tau (its log
         ln(1/tau) is the parameter, clipped after each step so that tau >= 0.01, as in CLIP, Radford et al. 2021):
             L_itc = 1/2 [ CE(S / tau, diag) + CE(S^T / tau, diag) ],   S_ij = s(I_i, T_j) in a batch
    ITM  bi-directional mask (everyone sees everyone). A 2-way linear head on every query output, logits
         averaged over the queries: match or not. Negatives are hard: for each image one text of the batch
         drawn with p(j) proportional to exp(S_ij / tau) over j != i, for each text one image likewise
         (ALBEF's hard-negative mining, Li et al. 2021)
             L_itm = CE over B positives, B (image, hard text) and B (hard image, text) negatives
    ITG  multimodal causal mask: the queries see only queries; each text token sees every query and the
         text up to itself. [DEC] starts the text; the text is generated from what the queries extracted:
             L_itg = - sum_t log p(w_t | w_<t, Q(image))

Stage 2, generative learning (§3.3): the queries read the image; their outputs Z go through a linear layer
into the frozen decoder's input space and are put before its tokens as a soft prompt:
    prefix = W Z + b,   L = - sum log p_LLM(target | prefix, prompt)   (the decoder's weights frozen)
Trained on the shape world's captions and questions, scored by the shared VQA protocol (core/nn/shape_lm.py).
The prompt ("caption:" or the question) also enters the Q-Former, as in BLIP-2's VQA fine-tuning (§4.3)
and InstructBLIP, so that the queries can extract what the question asks for.

Retrieval (held-out images): image -> text and text -> image recall@1 with the ITC similarity, and with
the ITC top-k re-ranked by ITM as BLIP-2 does. Captions repeat (the same description, other jitter): a
retrieved caption is right when its text equals the true caption, and chance is computed the same way.

Engineering choices, each for a reason given where it is made: pre-LN layers (trained from scratch, not
from BERT), cross-attention in every other layer as in BLIP-2, batches of distinct captions (the ITC
diagonal), the frozen encoder's features computed once, the global gradient norm clipped (without it an
early step now and then collapsed the contrastive space of the toy for good).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import Range, Seed
from core.data.shapes import Scene, caption, make_scenes, qa_pairs, render_batch
from core.data.tokenizer import Tokenizer
from core.nn.loss import linear_cross_entropy
from core.nn.model import Transformer
from core.nn.shape_lm import (CAPTION_PROMPT, answer_accuracy, encode_examples, exact_match, load_shape_lm,
                              prior_accuracy, question_prompt, scene_questions, target_loss, vqa_set)
from core.nn.training import adamw_groups, cosine_lr
from core.nn.vision import VisionEncoder, load_vision_encoder

Mode = Literal["itc", "itm", "itg"]
MAX_TEXT = 24
"""text positions of the Q-Former ([CLS] or [DEC], the longest caption's 15 pieces, <eos>)"""
MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clips the log of 1/tau at ln 100: the temperature never falls below 0.01"""
EVAL_SEED_OFFSET = 1
"""evaluation scenes use seed + 1: other scenes than the training ones, the same for every run of a seed"""


@dataclass
class Config:
    train_scenes: Annotated[int, Range(ge=64, le=100_000)] = 3000
    """training-split scenes: their images, captions (stage 1 and 2) and questions (stage 2)"""
    n_query: Annotated[int, Range(ge=1, le=64)] = 8
    """learned query tokens (BLIP-2: 32): the number of soft-prompt vectors the decoder receives"""
    width: Annotated[int, Range(ge=8, le=512)] = 64
    """Q-Former width (the vision features and the decoder are 64 wide: a linear map bridges any width)"""
    n_layer: Annotated[int, Range(ge=1, le=12)] = 2
    """Q-Former layers, each: self-attention over [queries; text], cross-attention of the queries, FFNs"""
    n_head: Annotated[int, Range(ge=1, le=16)] = 4
    """attention heads (must divide width)"""
    cross_every: Annotated[int, Range(ge=1, le=12)] = 2
    """the queries cross-attend to the image in every cross_every-th layer, from the first (BLIP-2: 2)"""
    embed_dim: Annotated[int, Range(ge=4, le=512)] = 64
    """ITC embedding size: the query outputs and the [CLS] output are projected to it and normalised"""
    init_temperature: Annotated[float, Range(ge=0.01, le=1)] = 0.07
    """ITC temperature at the start (CLIP's and BLIP-2's 0.07); it is learnt, kept >= 0.01"""
    stage1_steps: Annotated[int, Range(ge=1, le=100_000)] = 1000
    """AdamW steps of stage 1 (ITC + ITM + ITG on image-caption pairs)"""
    stage2_steps: Annotated[int, Range(ge=1, le=100_000)] = 1500
    """AdamW steps of stage 2 (Q-Former + projection into the frozen decoder, captions and questions)"""
    stage2_lr: Annotated[float, Range(gt=0, le=1)] = 5e-3
    """peak learning rate of stage 2 (the gradient reaches the soft prompt through the frozen decoder, weakly)"""
    ablation: bool = True
    """also train stage 2 from an untrained Q-Former (same initial weights and batches): what stage 1 brings"""
    batch: Annotated[int, Range(ge=4, le=512)] = 64
    """pairs per stage-1 step (all captions distinct) and examples per stage-2 step"""
    lr: Annotated[float, Range(gt=0, le=1)] = 2e-3
    """peak learning rate of stage 1 (both stages: linear warmup over 5% of the steps, cosine to 10%)"""
    grad_clip: Annotated[float, Range(gt=0, le=1e6)] = 1.0
    """clip the global gradient norm of each step to this (both stages)"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.05
    """AdamW decoupled weight decay of the linear weights (BLIP-2's 0.05)"""
    eval_scenes: Annotated[int, Range(ge=16, le=10_000)] = 300
    """held-out scenes of the retrieval gallery and of the VQA evaluation (and as many fresh training-split ones)"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """stage-1 steps between two measurements of held-out recall@1 (the recall curve)"""
    rerank_k: Annotated[int, Range(ge=1, le=128)] = 8
    """ITC candidates re-ranked by ITM per query (image or text)"""
    seed: Seed = 0
    """training scenes, initial weights, batch order and hard negatives; evaluation scenes use seed + 1"""

    def problems(self) -> list[str]:
        problems = []
        if self.width % self.n_head:
            problems.append(f"width={self.width} is not a multiple of n_head={self.n_head}")
        if self.rerank_k > self.eval_scenes:
            problems.append(f"rerank_k={self.rerank_k} exceeds the gallery of eval_scenes={self.eval_scenes}")
        return problems


# --- the Q-Former -------------------------------------------------------------------------------------------
def attention_mask(mode: Mode, n_query: int, text_real: Tensor) -> Tensor:
    """(B, L, L) bool, True where row i may attend to key j, over the sequence [queries (n_query); text (T)],
    L = n_query + T; text_real (B, T) False on padding, which no row attends to.
        itc  uni-modal: queries <-> queries, text <-> text, nothing across
        itm  bi-directional: everyone <-> everyone
        itg  multimodal causal: queries -> queries only; text -> every query and the text up to itself"""
    B, T = text_real.shape
    L = n_query + T
    position = torch.arange(L)
    row_is_query, col_is_query = (position < n_query)[:, None], (position < n_query)[None, :]
    causal = position[None, :] <= position[:, None]  # as a text row: every query and the text up to itself
    if mode == "itc":
        allowed = row_is_query == col_is_query
    elif mode == "itm":
        allowed = torch.ones(L, L, dtype=torch.bool)
    elif mode == "itg":
        allowed = torch.where(row_is_query, col_is_query, causal)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    key_real = torch.cat([text_real.new_ones(B, n_query), text_real], dim=1)
    return allowed[None] & key_real[:, None, :]


class Attention(nn.Module):
    """Multi-head attention of x (B, L, d) over a context (B, S, d_ctx): self-attention when the context is x."""

    def __init__(self, d: int, n_head: int, context_dim: int):
        super().__init__()
        self.n_head = n_head
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(context_dim, 2 * d), nn.Linear(d, d)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, L, d = x.shape
        q = self.q(x).view(B, L, self.n_head, d // self.n_head).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.out(y.transpose(1, 2).reshape(B, L, d))


def feed_forward(d: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class QFormerLayer(nn.Module):
    """Pre-LN (BLIP-2 keeps BERT's post-LN; pre-LN trains from scratch without warm-up tricks). The text and
    the queries share the self-attention and have FFNs of their own, as in BLIP-2's Q-Former."""

    def __init__(self, d: int, n_head: int, image_dim: int, cross: bool):
        super().__init__()
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, n_head, d)
        self.cross_norm = nn.LayerNorm(d) if cross else None
        self.cross_attn = Attention(d, n_head, image_dim) if cross else None
        self.query_ffn, self.text_ffn = feed_forward(d), feed_forward(d)

    def forward(self, x: Tensor, n_query: int, image: Tensor | None, mask: Tensor | None) -> Tensor:
        h = self.self_norm(x)
        x = x + self.self_attn(h, h, mask)
        queries, text = x[:, :n_query], x[:, n_query:]
        if n_query:
            if self.cross_attn is not None:
                queries = queries + self.cross_attn(self.cross_norm(queries), image)
            queries = queries + self.query_ffn(queries)
        if text.shape[1]:
            text = text + self.text_ffn(text)
        return torch.cat([queries, text], dim=1)


class QFormer(nn.Module):
    """Learned queries + a small BERT-like stack over [queries; text], with BLIP-2's three heads: ITC
    projections and the learnt temperature, the ITM classifier, and (tied to the word embedding) the ITG
    language-model head. Text ids are the shape decoder's tokenizer ids; two more rows are [CLS] and [DEC]."""

    def __init__(self, cfg: Config, vocab_size: int, image_dim: int):
        super().__init__()
        self.n_query, self.vocab_size = cfg.n_query, vocab_size
        self.cls_id, self.dec_id = vocab_size, vocab_size + 1
        d = cfg.width
        self.queries = nn.Parameter(torch.randn(cfg.n_query, d) * 0.02)
        self.word_emb = nn.Embedding(vocab_size + 2, d)
        self.pos_emb = nn.Embedding(MAX_TEXT, d)
        self.layers = nn.ModuleList(QFormerLayer(d, cfg.n_head, image_dim, cross=i % cfg.cross_every == 0)
                                    for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(d)
        self.vision_proj, self.text_proj = nn.Linear(d, cfg.embed_dim), nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, image: Tensor | None, text_ids: Tensor | None = None, text_real: Tensor | None = None,
                mode: Mode = "itc") -> tuple[Tensor, Tensor]:
        """image (B, P, image_dim) frozen patch features, or None for text alone; text_ids (B, T) or None for
        the queries alone (stage 2, image embeddings). -> (query outputs (B, n_query, d), text outputs (B, T, d)),
        after the final LayerNorm."""
        parts = []
        B = (image if image is not None else text_ids).shape[0]
        n_query = self.n_query if image is not None else 0
        if n_query:
            parts.append(self.queries.expand(B, -1, -1))
        T = 0 if text_ids is None else text_ids.shape[1]
        if T:
            parts.append(self.word_emb(text_ids) + self.pos_emb(torch.arange(T)))
        x = torch.cat(parts, dim=1)
        mask = None
        if T:
            real = text_real if text_real is not None else torch.ones_like(text_ids, dtype=torch.bool)
            mask = attention_mask(mode, n_query, real)
        for layer in self.layers:
            x = layer(x, n_query, image, mask)
        x = self.norm(x)
        return x[:, :n_query], x[:, n_query:]

    # --- the heads
    def image_embeddings(self, query_out: Tensor) -> Tensor:
        """(B, n_query, embed_dim), each query's output projected and normalised: ITC's image side."""
        return F.normalize(self.vision_proj(query_out), dim=-1)

    def text_embedding(self, text_out: Tensor) -> Tensor:
        """(B, embed_dim): the [CLS] output (text position 0) projected and normalised: ITC's text side."""
        return F.normalize(self.text_proj(text_out[:, 0]), dim=-1)

    def logit_scale(self) -> Tensor:
        """1 / tau, learnt through its log (a positive scale, relative steps)."""
        return self.log_inv_temperature.exp()

    @torch.no_grad()
    def clip_temperature(self) -> None:
        """After each optimiser step, as CLIP does: ln(1/tau) in [0, ln 100], so 0.01 <= tau <= 1."""
        self.log_inv_temperature.clamp_(0.0, MAX_LOGIT_SCALE)

    def itm_logits(self, query_out: Tensor) -> Tensor:
        """(B, 2) [no match, match]: the 2-way head on every query output, averaged over the queries."""
        return self.itm_head(query_out).mean(dim=1)

    def lm_weight(self) -> Tensor:
        """The ITG head: the word embedding of the tokenizer's ids (not [CLS]/[DEC]), tied as in BERT."""
        return self.word_emb.weight[:self.vocab_size]


# --- the stage-1 losses -------------------------------------------------------------------------------------
def itc_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """S (B_image, B_text): S_ij = max over the queries q of cos(z_iq, t_j) (inputs already normalised)."""
    return torch.einsum("iqe,te->itq", image_emb, text_emb).amax(dim=-1)


def itc_loss(sim: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: pair i's image and text are each other's only positives (the diagonal)."""
    logits = sim * logit_scale
    targets = torch.arange(sim.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


@torch.no_grad()
def hard_negatives(sim: Tensor, logit_scale: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(negative text of each image, negative image of each text), each drawn from the softmax of the
    scaled similarities over the batch with the positive itself excluded: the more similar a wrong pair,
    the more often it is trained on as a negative."""
    logits = (sim * logit_scale).masked_fill(torch.eye(len(sim), dtype=torch.bool), float("-inf"))
    text_for_image = torch.multinomial(logits.softmax(dim=1), 1, generator=gen).squeeze(1)
    image_for_text = torch.multinomial(logits.t().softmax(dim=1), 1, generator=gen).squeeze(1)
    return text_for_image, image_for_text


class TextBatch(NamedTuple):
    """Text as Q-Former input: ids (B, T) = [CLS] pieces <eos> <pad>...; real (B, T) False on padding."""
    ids: Tensor
    real: Tensor

    def for_generation(self, dec_id: int) -> TextBatch:
        """The same text starting with [DEC] instead of [CLS] (BLIP-2 swaps the first token for ITG)."""
        ids = self.ids.clone()
        ids[:, 0] = dec_id
        return TextBatch(ids, self.real)


def encode_text(tok: Tokenizer, texts: Sequence[str], cls_id: int) -> TextBatch:
    """Captions (stage 1) or prompts (stage 2) in the decoder's pieces, " " first as the decoder reads them."""
    rows = [[cls_id, *tok.encode(" " + t), tok.eos_id] for t in texts]
    T = max(map(len, rows))
    if T > MAX_TEXT:
        raise ValueError(f"a text of {T} tokens exceeds the Q-Former's {MAX_TEXT} text positions")
    ids = torch.full((len(rows), T), tok.pad_id)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return TextBatch(ids, ids != tok.pad_id)


class StageOneLosses(NamedTuple):
    itc: Tensor
    itm: Tensor
    itg: Tensor
    sim: Tensor


def stage_one_losses(qformer: QFormer, image: Tensor, text: TextBatch, gen: torch.Generator) -> StageOneLosses:
    """The three objectives on a batch of B matching (image, caption) pairs, all captions distinct."""
    B = len(image)
    scale = qformer.logit_scale()
    # ITC: one pass under the uni-modal mask gives both sides, neither seeing the other
    query_out, text_out = qformer(image, text.ids, text.real, "itc")
    sim = itc_similarity(qformer.image_embeddings(query_out), qformer.text_embedding(text_out))
    itc = itc_loss(sim, scale)

    # ITM: B positives, then each image with a hard negative text and each text with a hard negative image
    text_for_image, image_for_text = hard_negatives(sim, scale, gen)
    pair_image = torch.cat([image, image, image[image_for_text]])
    pair_ids = torch.cat([text.ids, text.ids[text_for_image], text.ids])
    pair_real = torch.cat([text.real, text.real[text_for_image], text.real])
    match_out, _ = qformer(pair_image, pair_ids, pair_real, "itm")
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    itm = F.cross_entropy(qformer.itm_logits(match_out), labels)

    # ITG: [DEC] caption, each position predicts the next piece from the queries and the text before it
    gen_text = text.for_generation(qformer.dec_id)
    _, dec_out = qformer(image, gen_text.ids, gen_text.real, "itg")
    predicts = gen_text.real[:, 1:]  # position t predicts piece t + 1 where that piece is real
    itg = linear_cross_entropy(dec_out[:, :-1][predicts], qformer.lm_weight(), gen_text.ids[:, 1:][predicts])
    return StageOneLosses(itc, itm, itg, sim.detach())


# --- data ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def image_features(encoder: VisionEncoder, images: Tensor, chunk: int = 500) -> Tensor:
    """The frozen encoder's patch features, computed once: stage 1 and 2 never change them."""
    return torch.cat([encoder(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def distinct_caption_batch(caption_ids: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Indices of `size` scenes in random order whose captions all differ. ITC's targets are the diagonal:
    a second image of the same description in the batch would be a positive scored as a negative."""
    taken, picked = set(), []
    for i in torch.randperm(len(caption_ids), generator=gen).tolist():
        if caption_ids[i].item() not in taken:
            taken.add(caption_ids[i].item())
            picked.append(i)
            if len(picked) == size:
                break
    return torch.tensor(picked)


def stage_two_examples(scenes: Sequence[Scene]) -> tuple[list[int], list[str], list[str]]:
    """(scene index, prompt, target) of every caption and question of the training scenes."""
    index, prompts, targets = [], [], []
    for i, scene in enumerate(scenes):
        for prompt, target in [(CAPTION_PROMPT, caption(scene))] + [(question_prompt(q), a) for q, a in qa_pairs(scene)]:
            index.append(i)
            prompts.append(prompt)
            targets.append(target)
    return index, prompts, targets


# --- evaluation ---------------------------------------------------------------------------------------------
def recall_at_1(scores: Tensor, captions: Sequence[str]) -> tuple[float, float]:
    """(image -> text, text -> image) recall@1 over a gallery where image i's true caption is captions[i]:
    a retrieval is right when the retrieved caption (or the retrieved image's caption) is the same text."""
    labels = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    i2t = (labels[scores.argmax(dim=1)] == labels).float().mean().item()
    t2i = (labels[scores.argmax(dim=0)] == labels).float().mean().item()
    return i2t, t2i


def chance_recall(captions: Sequence[str]) -> float:
    """Recall@1 of a uniformly random pick, either direction: the share of the gallery with one's own caption."""
    counts = Counter(captions)
    return sum(counts[c] for c in captions) / len(captions) ** 2


@torch.no_grad()
def itc_scores(qformer: QFormer, image: Tensor, text: TextBatch) -> Tensor:
    """The gallery's (N_image, N_text) ITC similarity; each side computed alone, never seeing the other."""
    query_out, _ = qformer(image)
    _, text_out = qformer(None, text.ids, text.real, "itc")
    return itc_similarity(qformer.image_embeddings(query_out), qformer.text_embedding(text_out))


@torch.no_grad()
def itm_rerank(qformer: QFormer, image: Tensor, text: TextBatch, itc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BLIP-2's retrieval: each image's top-k texts by ITC (and each text's top-k images) scored again by
    the ITM head; the score of a candidate is its ITM match logit plus its ITC similarity, others -inf.
    Returns (i2t scores, t2i scores), both (N_image, N_text)."""
    out = []
    for sims in (itc, itc.t()):  # rows: the queries (images, then texts)
        top = sims.topk(k, dim=1).indices
        rows = torch.arange(len(sims))[:, None].expand(-1, k).flatten()
        cand = top.flatten()
        img, txt = (rows, cand) if sims is itc else (cand, rows)
        match_logits = []
        for start in range(0, len(rows), 1024):
            part = slice(start, start + 1024)
            query_out, _ = qformer(image[img[part]], text.ids[txt[part]], text.real[txt[part]], "itm")
            match_logits.append(qformer.itm_logits(query_out)[:, 1])
        score = torch.full_like(sims, float("-inf"))
        score[rows, cand] = torch.cat(match_logits) + sims[rows, cand]
        out.append(score)
    return out[0], out[1].t()


@torch.no_grad()
def itm_accuracy(qformer: QFormer, image: Tensor, text: TextBatch, itc: Tensor, captions: Sequence[str]) -> float:
    """Balanced ITM accuracy: every image with its own caption and with its most ITC-similar wrong caption
    (the hardest negative of the gallery); 0.5 for a head that says the same for both."""
    same = torch.tensor([[a == b for b in captions] for a in captions])
    hardest = itc.masked_fill(same, float("-inf")).argmax(dim=1)
    right = []
    for texts, label in ((torch.arange(len(image)), 1), (hardest, 0)):
        query_out, _ = qformer(image, text.ids[texts], text.real[texts], "itm")
        right.append(qformer.itm_logits(query_out).argmax(dim=1) == label)
    return torch.cat(right).float().mean().item()


@torch.no_grad()
def generate_captions(qformer: QFormer, tok: Tokenizer, image: Tensor, max_len: int = MAX_TEXT - 1) -> list[str]:
    """Greedy captions from the Q-Former's own ITG head (stage 1): [DEC], then the argmax piece each step,
    to <eos>. Every step reruns the whole causal pass (captions are short; no cache needed)."""
    ids = torch.full((len(image), 1), qformer.dec_id)
    for _ in range(max_len):
        _, text_out = qformer(image, ids, None, "itg")
        next_id = (text_out[:, -1] @ qformer.lm_weight().t()).argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if (ids == tok.eos_id).any(dim=1).all():
            break
    said = []
    for row in ids[:, 1:].tolist():
        said.append(tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row).strip())
    return said


class Stage2Model(nn.Module):
    """Image (+ the prompt, read by the Q-Former too) -> query outputs -> linear projection -> soft prompt of
    the frozen decoder. The prompt reaches the queries through the bi-directional self-attention, as in
    BLIP-2's VQA fine-tuning (§4.3) and InstructBLIP: the queries extract what the question asks for."""

    def __init__(self, qformer: QFormer, decoder: Transformer):
        super().__init__()
        self.qformer, self.decoder = qformer, decoder
        self.proj = nn.Linear(qformer.queries.shape[1], decoder.cfg.n_embd)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def prefix(self, image: Tensor, prompt: TextBatch) -> Tensor:
        query_out, _ = self.qformer(image, prompt.ids, prompt.real, "itm")
        return self.proj(query_out)

    def loss(self, tok: Tokenizer, image: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
        """Cross-entropy of the target tokens given the soft prompt and the text prompt (decoder frozen)."""
        batch = encode_examples(tok, prompts, targets)
        prefix = self.prefix(image, encode_text(tok, prompts, self.qformer.cls_id))
        hidden = self.decoder.hidden(batch.ids, prefix=prefix)[:, prefix.shape[1]:]
        return target_loss(hidden, self.decoder.lm_head.weight, batch)


QUESTION_KINDS = {"what colour is": "colour", "what shape is": "shape", "where is": "where", "what size is": "size",
                  "how many": "count"}


def question_kind(question: str) -> str:
    return next(kind for start, kind in QUESTION_KINDS.items() if question.startswith(start))


@torch.no_grad()
def answers_right(tok: Tokenizer, decoder: Transformer, vqa, model: Stage2Model | None = None,
                  features: Tensor | None = None, chunk: int = 512) -> Tensor:
    """(Q,) bool: greedy decoding would give each question's answer (exact_match), with the question's image
    as model's soft prompt, or from the frozen decoder alone when model is None (the text-only baseline)."""
    right = []
    for start in range(0, len(vqa.questions), chunk):
        part = slice(start, start + chunk)
        prompts = [question_prompt(q) for q in vqa.questions[part]]
        batch = encode_examples(tok, prompts, vqa.answers[part])
        prefix = None if model is None else model.prefix(features[vqa.image_index[part]],
                                                          encode_text(tok, prompts, model.qformer.cls_id))
        right.append(exact_match(decoder(batch.ids, prefix=prefix), batch))
    return torch.cat(right)


# --- training -----------------------------------------------------------------------------------------------
def stage_one(cfg: Config, qformer: QFormer, tok: Tokenizer, features: Tensor, captions: list[str],
              gallery: tuple[Tensor, TextBatch, list[str]], batch_gen: torch.Generator,
              negative_gen: torch.Generator, ctx) -> None:
    caption_ids = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    text = encode_text(tok, captions, qformer.cls_id)
    opt = torch.optim.AdamW(adamw_groups(qformer, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    warmup = max(1, cfg.stage1_steps // 20)
    window = {"itc": [], "itm": [], "itg": []}
    qformer.train()
    for step in ctx.track(range(cfg.stage1_steps), "stage 1 (ITC + ITM + ITG)", total=cfg.stage1_steps):
        if step % cfg.eval_every == 0:
            log_recall(qformer, gallery, step, ctx)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, warmup, cfg.stage1_steps)
        idx = distinct_caption_batch(caption_ids, cfg.batch, batch_gen)
        losses = stage_one_losses(qformer, features[idx], TextBatch(text.ids[idx], text.real[idx]), negative_gen)
        opt.zero_grad(set_to_none=True)
        (losses.itc + losses.itm + losses.itg).backward()  # BLIP-2 weighs the three equally
        # one large step early (sharp softmax, random embeddings) can collapse the contrastive space for good
        torch.nn.utils.clip_grad_norm_(qformer.parameters(), cfg.grad_clip)
        opt.step()
        qformer.clip_temperature()
        for name in window:
            window[name].append(getattr(losses, name).item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.stage1_steps:
            ctx.log("stage1", step=step + 1, **{f"{k}_loss": float(np.mean(v)) for k, v in window.items()},
                    temperature=1 / qformer.logit_scale().item())
            window = {k: [] for k in window}
    log_recall(qformer, gallery, cfg.stage1_steps, ctx)
    qformer.eval()


def log_recall(qformer: QFormer, gallery: tuple[Tensor, TextBatch, list[str]], step: int, ctx) -> None:
    image, text, captions = gallery
    was_training = qformer.training
    i2t, t2i = recall_at_1(itc_scores(qformer.eval(), image, text), captions)
    qformer.train(was_training)
    ctx.log("recall", step=step, heldout_recall_i2t=i2t, heldout_recall_t2i=t2i)


def stage_two(cfg: Config, model: Stage2Model, tok: Tokenizer, features: Tensor, scenes: Sequence[Scene],
              gen: torch.Generator, ctx, table: str = "stage2") -> None:
    """Train the Q-Former and the projection through the frozen decoder on captions and questions."""
    model.decoder.requires_grad_(False)  # the LLM stays frozen: only the Q-Former and the projection learn
    index, prompts, targets = stage_two_examples(scenes)
    opt = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.stage2_lr, betas=(0.9, 0.98))
    warmup = max(1, cfg.stage2_steps // 20)
    window = []
    model.train()
    for step in ctx.track(range(cfg.stage2_steps), f"stage 2 ({table})", total=cfg.stage2_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.stage2_lr, warmup, cfg.stage2_steps)
        pick = torch.randint(0, len(index), (cfg.batch,), generator=gen).tolist()
        loss = model.loss(tok, features[[index[i] for i in pick]], [prompts[i] for i in pick], [targets[i] for i in pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.stage2_steps:
            ctx.log(table, step=step + 1, loss=float(np.mean(window)))
            window = []
    model.eval()


# --- plots --------------------------------------------------------------------------------------------------
def plot_stage_one(rows: list[dict], recall: list[dict], chance: float):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = [r["step"] for r in rows]
    for name in ("itc", "itm", "itg"):
        axes[0].plot(steps, [r[f"{name}_loss"] for r in rows], label=name.upper())
    axes[0].set(xlabel="stage-1 step", ylabel="loss (mean over the log window)", title="stage 1: the three objectives",
                yscale="log")
    axes[0].legend()
    axes[1].plot(steps, [r["temperature"] for r in rows])
    axes[1].set(xlabel="stage-1 step", ylabel="tau", title="learnt ITC temperature (start 0.07)")
    r_steps = [r["step"] for r in recall]
    axes[2].plot(r_steps, [r["heldout_recall_i2t"] for r in recall], label="image -> text")
    axes[2].plot(r_steps, [r["heldout_recall_t2i"] for r in recall], label="text -> image")
    axes[2].axhline(chance, color="grey", ls="--", label="chance")
    axes[2].set(xlabel="stage-1 step", ylabel="recall@1 (ITC)", title="held-out retrieval", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    return fig


def plot_stage_two(tables: dict[str, list[dict]], by_kind: list[dict]):
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for table, label in (("stage2", "after stage 1"), ("stage2_no_stage1", "untrained Q-Former (ablation)")):
        if table in tables:
            axes[0].plot([r["step"] for r in tables[table]], [r["loss"] for r in tables[table]], label=label)
    axes[0].set(xlabel="stage-2 step", ylabel="target-token loss (nats)", yscale="log",
                title="stage 2: soft prompt of the frozen decoder")
    axes[0].legend()
    kinds = list(dict.fromkeys(r["kind"] for r in by_kind))
    x = np.arange(len(kinds))
    bars = [("heldout", "blip2", "held-out images"), ("train", "blip2", "seen pairs"),
            ("heldout", "text_only", "text only, held-out")]
    for k, (split, who, label) in enumerate(bars):
        values = [next(r[who] for r in by_kind if r["split"] == split and r["kind"] == kind) for kind in kinds]
        axes[1].bar(x + (k - 1) * 0.27, values, width=0.27, label=label)
    axes[1].set(xticks=x, xticklabels=kinds, ylabel="exact match", ylim=(0, 1), title="VQA accuracy by question kind")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- the run ------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float | None]:
    cpu_start = time.process_time()
    init_seed, batch_seed, negative_seed, stage2_seed = (int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(4))
    encoder = load_vision_encoder(say=ctx.say)
    tok, decoder = load_shape_lm(say=ctx.say)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET

    scenes = make_scenes(cfg.train_scenes, "train", cfg.seed)
    captions = [caption(s) for s in scenes]
    features = image_features(encoder, render_batch(scenes))
    heldout, seen = vqa_set(cfg.eval_scenes, "heldout", eval_seed), vqa_set(cfg.eval_scenes, "train", eval_seed)
    heldout_captions = [caption(s) for s in make_scenes(cfg.eval_scenes, "heldout", eval_seed)]
    seen_captions = [caption(s) for s in make_scenes(cfg.eval_scenes, "train", eval_seed)]
    heldout_features, seen_features = image_features(encoder, heldout.images), image_features(encoder, seen.images)

    torch.manual_seed(init_seed)
    qformer = QFormer(cfg, tok.vocab_size, encoder.cfg.d)
    untrained = {k: v.clone() for k, v in qformer.state_dict().items()}
    ctx.say(f"Q-Former: {sum(p.numel() for p in qformer.parameters()):,} parameters, {cfg.n_query} queries; frozen "
            f"ViT {sum(p.numel() for p in encoder.parameters()):,} and decoder {decoder.num_params():,} parameters")

    # stage 1: ITC + ITM + ITG on image-caption pairs
    heldout_text, seen_text = (encode_text(tok, c, qformer.cls_id) for c in (heldout_captions, seen_captions))
    stage_one(cfg, qformer, tok, features, captions, (heldout_features, heldout_text, heldout_captions),
              torch.Generator().manual_seed(batch_seed), torch.Generator().manual_seed(negative_seed), ctx)

    chance = chance_recall(heldout_captions)
    itc = itc_scores(qformer, heldout_features, heldout_text)
    recall_i2t, recall_t2i = recall_at_1(itc, heldout_captions)
    i2t_scores, t2i_scores = itm_rerank(qformer, heldout_features, heldout_text, itc, cfg.rerank_k)
    rerank_i2t, rerank_t2i = recall_at_1(i2t_scores, heldout_captions)[0], recall_at_1(t2i_scores, heldout_captions)[1]
    seen_i2t, seen_t2i = recall_at_1(itc_scores(qformer, seen_features, seen_text), seen_captions)
    itm_acc = itm_accuracy(qformer, heldout_features, heldout_text, itc, heldout_captions)
    said_seen = generate_captions(qformer, tok, seen_features)
    said_heldout = generate_captions(qformer, tok, heldout_features)
    caption_acc = float(np.mean([s == c for s, c in zip(said_seen, seen_captions)]))
    heldout_caption_acc = float(np.mean([s == c for s, c in zip(said_heldout, heldout_captions)]))
    ctx.say(f"held-out retrieval recall@1, ITC: image->text {recall_i2t:.3f}, text->image {recall_t2i:.3f} (chance "
            f"{chance:.3f}); ITC top-{cfg.rerank_k} re-ranked by ITM: {rerank_i2t:.3f} / {rerank_t2i:.3f}; seen pairs "
            f"(ITC) {seen_i2t:.3f} / {seen_t2i:.3f}")
    ctx.say(f"ITM on held-out images vs their hardest wrong caption: {itm_acc:.3f} (0.5 = blind); ITG greedy captions "
            f"exactly right: seen pairs {caption_acc:.3f}, held-out pairs {heldout_caption_acc:.3f}")
    for i in range(3):
        ctx.say(f"  held-out image {i}: true '{heldout_captions[i]}' / ITG '{said_heldout[i]}'")

    # stage 2: the queries become the frozen decoder's soft prompt
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    model = Stage2Model(qformer, decoder)
    stage_two(cfg, model, tok, features, scenes, torch.Generator().manual_seed(stage2_seed), ctx)
    drift = max((decoder.state_dict()[k] - v).abs().max().item() for k, v in decoder_before.items())
    right = {"heldout": answers_right(tok, decoder, heldout, model, heldout_features),
             "train": answers_right(tok, decoder, seen, model, seen_features)}
    text_right = {"heldout": answers_right(tok, decoder, heldout), "train": answers_right(tok, decoder, seen)}
    for split, vqa in (("heldout", heldout), ("train", seen)):
        kinds = [question_kind(q) for q in vqa.questions]
        for kind in QUESTION_KINDS.values():
            rows = torch.tensor([k == kind for k in kinds])
            ctx.log("vqa_by_kind", split=split, kind=kind, questions=int(rows.sum()),
                    blip2=right[split][rows].float().mean().item(), text_only=text_right[split][rows].float().mean().item())
    heldout_acc, train_acc = right["heldout"].float().mean().item(), right["train"].float().mean().item()
    text_only = answer_accuracy(tok, decoder, heldout.pairs())
    prior = prior_accuracy(scene_questions(scenes), heldout.pairs())
    ctx.say(f"VQA exact match: held-out {heldout_acc:.3f}, seen pairs {train_acc:.3f}; text-only decoder "
            f"{text_only:.3f}, prior {prior:.3f}; the decoder's weights moved by at most {drift:g}")

    no_stage1 = None
    if cfg.ablation:
        fresh = QFormer(cfg, tok.vocab_size, encoder.cfg.d)
        fresh.load_state_dict(untrained)
        ablated = Stage2Model(fresh, decoder)
        stage_two(cfg, ablated, tok, features, scenes, torch.Generator().manual_seed(stage2_seed), ctx, "stage2_no_stage1")
        no_stage1 = answers_right(tok, decoder, heldout, ablated, heldout_features).float().mean().item()
        ctx.say(f"stage 2 from an untrained Q-Former (no stage 1), same steps: held-out {no_stage1:.3f}")

    # this process's CPU seconds: on a shared machine the wall time says more about the neighbours
    ctx.measure(cpu_time_s=time.process_time() - cpu_start)
    ctx.save_figure(plot_stage_one(ctx.tables["stage1"], ctx.tables["recall"], chance), "stage1.png")
    ctx.save_figure(plot_stage_two(ctx.tables, ctx.tables["vqa_by_kind"]), "stage2.png")
    last = ctx.tables["stage1"][-1]
    return {
        "heldout_recall_i2t": recall_i2t,
        "heldout_recall_t2i": recall_t2i,
        "recall_chance": chance,
        "recall_over_chance": min(recall_i2t, recall_t2i) / chance,
        "heldout_recall_i2t_itm": rerank_i2t,
        "heldout_recall_t2i_itm": rerank_t2i,
        "seen_recall_i2t": seen_i2t,
        "seen_recall_t2i": seen_t2i,
        "heldout_itm_accuracy": itm_acc,
        "caption_accuracy": caption_acc,
        "heldout_caption_accuracy": heldout_caption_acc,
        "temperature": 1 / qformer.logit_scale().item(),
        "final_itc_loss": last["itc_loss"],
        "final_itm_loss": last["itm_loss"],
        "final_itg_loss": last["itg_loss"],
        "heldout_accuracy": heldout_acc,
        "train_accuracy": train_acc,
        "text_only_accuracy": text_only,
        "prior_accuracy": prior,
        "heldout_gain": heldout_acc - max(text_only, prior),
        "heldout_accuracy_no_stage1": no_stage1,
        "final_stage2_loss": ctx.tables["stage2"][-1]["loss"],
        "decoder_drift": drift,
    }
