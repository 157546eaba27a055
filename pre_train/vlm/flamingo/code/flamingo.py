"""Flamingo on the shape world: a perceiver resampler and tanh-gated cross-attention layers inserted
into a frozen decoder, in one file.

Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning":
    features    X_f = ViT(image): (B, N, d), the frozen vision encoder's patch features (core/nn/vision.py)
    resampler   R learned latents X (R, d); per layer                                   (sec. 2.1, Fig. 4)
                    X = X + Attn(q = LN(X), k = v = [LN(X_f); LN(X)])      keys from the features AND the latents
                    X = X + FFW(X)
                output LN(X): (B, R, d), R tokens whatever N is
    gated xattn before each frozen LM block                                              (sec. 2.2, Fig. 4)
                    y = x + tanh(a_attn) * XAttn(q = LN(x), k = v = latents)
                    y = y + tanh(a_ff)   * FFW(y)                           FFW: LayerNorm, GELU MLP
                a_attn = a_ff = 0 at init, so at init every gated layer is the identity and the model IS
                the frozen LM, bit for bit; training opens the gates as far as the image helps
    loss        -log p(answer | question, image), the frozen LM's head on the last block's output;
                only the resampler and the gated layers train (the vision encoder and the LM stay frozen)

Masking. In Flamingo's interleaved sequences (<image> text <image> text ...) each text token cross-attends
only to the visual tokens of the image that immediately precedes it, and a token before any image to
none (its cross-attention output is zeroed); which images came earlier reaches it only through the
LM's own causal self-attention. Here every example has one image before its text, so every text token
attends to all R latents of that image and no cross-attention mask is needed. The text stays causal:
the keys of the cross-attention are the image's latents, never other text tokens.

The gradient at init (a Flamingo subtlety, tested): tanh(0) = 0 blocks the gradient of every weight
behind a gate (d loss / d W = tanh(a) * ... = 0), while d loss / d a = (1 - tanh^2 a) <dL/dy, XAttn> =
<dL/dy, XAttn> is not 0. So the first optimizer step moves only the gates; from then on the weights get
gradients scaled by tanh(a), which Adam's normalisation makes irrelevant to the step size.

The frozen encoder's features are computed once per image before training (nothing upstream of them
trains, so recomputing them every step would give the same numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import Range, Seed
from core.data.shapes import make_scenes, render_batch
from core.nn.model import Transformer
from core.nn.shape_lm import (Examples, VQASet, answer_accuracy, corpus, encode_examples, exact_match, load_shape_lm,
                              prior_accuracy, question_prompt, scene_questions, target_loss, vqa_set)
from core.nn.training import adamw_groups, cosine_lr
from core.nn.vision import load_vision_encoder

QUESTION_KINDS = ("what colour", "what shape", "where", "what size", "how many")
"""the five question templates of the shape world (core/data/shapes.py qa_pairs), by their opening words"""


@dataclass
class Config:
    train_scenes: Annotated[int, Range(ge=10, le=100_000)] = 3000
    """training-split scenes; each gives its caption and every question about it as training examples"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 3000
    """AdamW steps"""
    scenes_per_step: Annotated[int, Range(ge=1, le=1024)] = 16
    """training scenes per step, each with its caption and every question about it (8 examples on average,
    so about 128 examples a step): the resampler runs once per image, not once per example"""
    lr: Annotated[float, Range(gt=0, le=1)] = 5e-3
    """peak AdamW learning rate (linear warmup over the first 5% of the steps, cosine decay to 10%)"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.01
    """decoupled weight decay of the linear layers' weights only (never the gates: decay would pull them
    back to the frozen LM; nor norms or the latents)"""
    n_latents: Annotated[int, Range(ge=1, le=256)] = 8
    """R, the resampler's learned latents: the image reaches the LM as R tokens (Flamingo: 64)"""
    resampler_layers: Annotated[int, Range(ge=1, le=12)] = 2
    """perceiver resampler layers (Flamingo: 6)"""
    n_head: Annotated[int, Range(ge=1, le=16)] = 4
    """attention heads of the resampler and of the gated cross-attention (must divide the width 64)"""
    ff_mult: Annotated[int, Range(ge=1, le=8)] = 4
    """hidden width of the resampler's and the gated layers' feed-forward blocks, in multiples of 64"""
    eval_scenes: Annotated[int, Range(ge=10, le=10_000)] = 300
    """scenes of each evaluation split: held-out (5 questions each) and fresh training-split ones"""
    eval_seed: Seed = 1000
    """seed of the evaluation scenes (the training scenes use `seed`)"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """every this many steps: held-out accuracy on the first 100 evaluation scenes and the branch shares (plots)"""
    log_every: Annotated[int, Range(ge=1, le=100_000)] = 10
    """log the mean training loss and the gates every this many steps"""
    seed: Seed = 0
    """seeds the training scenes, the initial weights and the batch order"""

    def problems(self) -> list[str]:
        problems = []
        if 64 % self.n_head:
            problems.append(f"n_head={self.n_head} does not divide the width 64 of the encoder and the LM")
        if self.eval_seed == self.seed:
            problems.append(f"eval_seed={self.eval_seed} equals seed: the fresh training-split scenes would be "
                            f"the training scenes")
        return problems


# --- the layers --------------------------------------------------------------------------------------
def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, n_head: int) -> Tensor:
    """softmax(q k^T / sqrt(d_h)) v per head, no mask: q (B, Tq, d), k and v (B, Tk, d) -> (B, Tq, d)."""
    B, Tq, d = q.shape

    def heads(t: Tensor) -> Tensor:  # (B, T, d) -> (B, n_head, T, d / n_head)
        return t.view(B, t.shape[1], n_head, d // n_head).transpose(1, 2)

    return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(B, Tq, d)


def feed_forward(d: int, mult: int) -> nn.Sequential:
    """Flamingo's FFW: LayerNorm, then a GELU MLP of width mult * d."""
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d))


class PerceiverAttention(nn.Module):
    """The latents' queries attend to the image features and to the latents themselves."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.feature_norm, self.latent_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        x, lat = self.feature_norm(features), self.latent_norm(latents)
        # Flamingo's keys and values: the features AND the latents, so a latent can keep what it holds
        k, v = self.kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        return self.out(multi_head_attention(self.q(lat), k, v, self.n_head))


class PerceiverResampler(nn.Module):
    """Any number N of image features -> R latent tokens: (B, N, d) -> (B, R, d)."""

    def __init__(self, d: int, n_latents: int, layers: int, n_head: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d) * 0.02)
        self.attn = nn.ModuleList(PerceiverAttention(d, n_head) for _ in range(layers))
        self.ff = nn.ModuleList(feed_forward(d, ff_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, features: Tensor) -> Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        for attn, ff in zip(self.attn, self.ff):
            latents = latents + attn(features, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


class CrossAttention(nn.Module):
    """Text queries, image-latent keys and values: a text token never sees another text token here."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        k, v = self.kv(latents).chunk(2, dim=-1)
        return self.out(multi_head_attention(self.q(x), k, v, self.n_head))


class GatedCrossAttentionDense(nn.Module):
    """GATED XATTN-DENSE: y = x + tanh(a_attn) XAttn(LN(x), latents); y = y + tanh(a_ff) FFW(y)."""

    def __init__(self, d: int, n_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attn = CrossAttention(d, n_head)
        self.ff = feed_forward(d, ff_mult)
        # scalar gates at 0: tanh(0) = 0, the layer starts as the identity
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x = x + self.attn_gate.tanh() * self.attn(self.attn_norm(x), latents)
        return x + self.ff_gate.tanh() * self.ff(x)


class Flamingo(nn.Module):
    """A frozen decoder-only LM with a resampler and one gated cross-attention layer before each block."""

    def __init__(self, lm: Transformer, n_latents: int, resampler_layers: int, n_head: int, ff_mult: int):
        super().__init__()
        d = lm.cfg.n_embd
        self.lm = lm.requires_grad_(False).eval()  # frozen whatever the caller handed over
        self.resampler = PerceiverResampler(d, n_latents, resampler_layers, n_head, ff_mult)
        self.xattn = nn.ModuleList(GatedCrossAttentionDense(d, n_head, ff_mult) for _ in lm.blocks)

    def hidden(self, ids: Tensor, features: Tensor, image_index: Tensor | None = None) -> Tensor:
        """ids (B, T) and the features (S, N, d) of S images -> the final normalised states (B, T, d). Row b
        shows image image_index[b] (default: image b), so several texts about one image share its latents."""
        latents = self.resampler(features)
        if image_index is not None:
            latents = latents[image_index]
        x = self.lm.tok_emb(ids)
        for xattn, block in zip(self.xattn, self.lm.blocks):
            x = xattn(x, latents)
            x = block(x, None, 0)  # the frozen block, causal self-attention over the text only
        return self.lm.norm(x)

    def forward(self, ids: Tensor, features: Tensor, image_index: Tensor | None = None) -> Tensor:
        return self.lm.lm_head(self.hidden(ids, features, image_index))

    def gates(self) -> dict[str, float]:
        """tanh(a) of every gate: attn_0, ff_0, attn_1, ..."""
        return {f"{kind}_{i}": float(getattr(layer, f"{kind}_gate").detach().tanh())
                for i, layer in enumerate(self.xattn) for kind in ("attn", "ff")}


@torch.no_grad()
def branch_shares(model: Flamingo, batch: Examples, features: Tensor, image_index: Tensor) -> dict[str, float]:
    """What each gated branch adds to the residual stream, relative to it, at the target positions: the mean
    of |tanh(a_attn) XAttn| / |x| and |tanh(a_ff) FFW| / |y| per layer (attn_0, ff_0, ...). A gate's value
    alone does not say how much of the image flows: the weights behind it can grow while it stays small."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.xattn):  # forward hooks: the branches as the forward pass computes them
        hooks += [layer.register_forward_pre_hook(lambda m, args, i=i: seen.update({f"x_{i}": args[0]})),
                  layer.attn.register_forward_hook(lambda m, args, out, i=i: seen.update({f"attn_{i}": out})),
                  layer.ff.register_forward_hook(
                      lambda m, args, out, i=i: seen.update({f"y_{i}": args[0], f"ff_{i}": out}))]
    try:
        model.hidden(batch.ids, features, image_index)
    finally:
        for hook in hooks:
            hook.remove()
    mask = batch.loss_mask

    def share(branch: Tensor, gate: Tensor, residual: Tensor) -> float:
        return ((gate.tanh() * branch[mask]).norm(dim=-1) / residual[mask].norm(dim=-1)).mean().item()

    return {name: value for i, layer in enumerate(model.xattn)
            for name, value in ((f"attn_{i}", share(seen[f"attn_{i}"], layer.attn_gate, seen[f"x_{i}"])),
                                (f"ff_{i}", share(seen[f"ff_{i}"], layer.ff_gate, seen[f"y_{i}"])))}


def make_optimizer(model: Flamingo, cfg: Config) -> torch.optim.AdamW:
    """AdamW over what requires a gradient: the resampler and the gated layers (the LM is frozen)."""
    return torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr)


def training_step(model: Flamingo, opt: torch.optim.Optimizer, batch: Examples, features: Tensor,
                  image_index: Tensor | None = None) -> float:
    loss = target_loss(model.hidden(batch.ids, features, image_index), model.lm.lm_head.weight, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def first_step_gradients(model: Flamingo, batch: Examples, features: Tensor,
                         image_index: Tensor | None = None) -> tuple[float, float]:
    """At init: (smallest |d loss / d a| over the gates, largest |d loss / d W| over every other trainable
    tensor). The first is not 0 although tanh(0) = 0; the second is exactly 0. Leaves no gradient behind."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    gates = {id(layer.attn_gate) for layer in model.xattn} | {id(layer.ff_gate) for layer in model.xattn}
    loss = target_loss(model.hidden(batch.ids, features, image_index), model.lm.lm_head.weight, batch)
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    per_tensor = [(id(p), 0.0 if g is None else float(g.abs().max())) for p, g in zip(trainable, grads)]
    gate_grads = [g for pid, g in per_tensor if pid in gates]
    return (min(gate_grads) if len(gate_grads) == len(gates) else 0.0,  # a gate that is no parameter gets none
            max(g for pid, g in per_tensor if pid not in gates))


# --- data and evaluation -----------------------------------------------------------------------------
class TrainingSet(NamedTuple):
    """Every caption and question of the training scenes, scene by scene: examples (padded to one length),
    how many examples each scene has, the frozen encoder's features of every scene, the QA pairs (the prior's)."""
    examples: Examples
    per_scene: Tensor
    features: Tensor
    pairs: list[tuple[str, str]]

    def scene_batch(self, scenes: Tensor) -> tuple[Examples, Tensor, Tensor]:
        """Every example of `scenes`: (examples, the scenes' features (S, N, d), each row's index into them)."""
        starts = self.per_scene.cumsum(0) - self.per_scene
        rows = torch.cat([torch.arange(starts[s], starts[s] + self.per_scene[s]) for s in scenes.tolist()])
        image_index = torch.repeat_interleave(torch.arange(len(scenes)), self.per_scene[scenes])
        return batch_rows(self.examples, rows), self.features[scenes], image_index


@torch.no_grad()
def encode_images(encoder: nn.Module, images: Tensor, chunk: int = 500) -> Tensor:
    return torch.cat([encoder(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def training_set(tok, encoder: nn.Module, cfg: Config) -> TrainingSet:
    scenes = make_scenes(cfg.train_scenes, "train", cfg.seed)
    prompts, targets, per_scene = [], [], []
    for scene in scenes:
        p, t = corpus([scene])  # the caption, then every question about the scene
        prompts += p
        targets += t
        per_scene.append(len(p))
    return TrainingSet(encode_examples(tok, prompts, targets), torch.tensor(per_scene),
                       encode_images(encoder, render_batch(scenes)), scene_questions(scenes))


def batch_rows(examples: Examples, rows: Tensor) -> Examples:
    return Examples(examples.ids[rows], examples.targets[rows], examples.loss_mask[rows])


class EvalSet(NamedTuple):
    vqa: VQASet
    batch: Examples
    features: Tensor
    """(S, N, d): the image features of the S scenes the questions ask about (vqa.image_index)"""


def eval_set(tok, encoder: nn.Module, n_scenes: int, split: str, seed: int) -> EvalSet:
    vqa = vqa_set(n_scenes, split, seed)
    batch = encode_examples(tok, [question_prompt(q) for q in vqa.questions], vqa.answers)
    return EvalSet(vqa, batch, encode_images(encoder, vqa.images))


@torch.no_grad()
def answers_right(model: Flamingo, data: EvalSet, image_index: Tensor | None = None, limit: int | None = None,
                  chunk: int = 1000) -> Tensor:
    """(Q,) bool: greedy decoding would give the answer (shape_lm.exact_match), for the first `limit`
    questions. `image_index` shows each question another scene's image (the control); default its own."""
    image_index = data.vqa.image_index if image_index is None else image_index
    n = len(data.vqa.questions) if limit is None else limit
    right = []
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(n, s + chunk))
        batch = batch_rows(data.batch, rows)
        right.append(exact_match(model(batch.ids, data.features, image_index[rows]), batch))
    return torch.cat(right)


def question_kind(question: str) -> str:
    return next(kind for kind in QUESTION_KINDS if question.startswith(kind))


def by_kind(questions: list[str], right: Tensor) -> dict[str, float]:
    kinds = [question_kind(q) for q in questions]
    return {k: right[[i for i, x in enumerate(kinds) if x == k]].float().mean().item() for k in QUESTION_KINDS}


# --- plots ------------------------------------------------------------------------------------------
def plot_gates(history: list[dict], curve: list[dict], gate_names: list[str]):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name in gate_names:
        style = "-" if name.startswith("attn") else "--"
        left.plot([0] + [r["step"] for r in history], [0.0] + [r[f"gate_{name}"] for r in history], style, label=name)
        right.plot([r["step"] for r in curve], [r[f"share_{name}"] for r in curve], style, marker=".", label=name)
    left.axhline(0, color="grey", lw=0.6)
    left.set(xlabel="step", ylabel="tanh(a)", title="gate values (0 at init: the frozen LM)")
    right.set(xlabel="step", ylabel="|tanh(a) branch| / |residual|", title="what each gated branch adds")
    right.set_yscale("symlog", linthresh=1e-3)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training(history: list[dict], curve: list[dict], text_only: float, prior: float):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in history], [r["loss"] for r in history])
    left.set(xlabel="step", ylabel="loss on the target tokens", yscale="log", title="training loss")
    right.plot([r["step"] for r in curve], [r["heldout_accuracy"] for r in curve], marker="o", label="flamingo")
    right.axhline(text_only, color="tab:red", ls="--", label="frozen LM, no image")
    right.axhline(prior, color="grey", ls=":", label="prior (most frequent answer)")
    right.set(xlabel="step", ylabel="exact match", ylim=(0, 1.02), title="held-out accuracy (first 100 scenes)")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kinds(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    width = 0.2
    for j, (col, label) in enumerate((("heldout", "held-out"), ("train", "train split"),
                                      ("shuffled_image", "held-out, another scene's image"),
                                      ("text_only", "frozen LM, no image"))):
        ax.bar([i + (j - 1.5) * width for i in range(len(rows))], [r[col] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["kind"] for r in rows])
    ax.set(ylabel="exact match", ylim=(0, 1.05), title="accuracy by question kind")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


# --- the run ----------------------------------------------------------------------------------------
def frozen_state(encoder: nn.Module, lm: Transformer) -> dict[str, Tensor]:
    """A copy of every frozen tensor, to compare after training."""
    return {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()} | \
           {f"lm.{k}": v.clone() for k, v in lm.state_dict().items()}


def log_examples(ctx, tok, model: Flamingo, lm: Transformer, heldout: EvalSet, scenes: int = 5) -> None:
    """Every question of the first held-out scenes with the answer word each model puts first."""
    rows = torch.arange(5 * scenes)  # 5 questions per held-out scene
    batch = batch_rows(heldout.batch, rows)
    with torch.no_grad():
        said = model(batch.ids, heldout.features, heldout.vqa.image_index[rows]).argmax(-1)
        said_text_only = lm(batch.ids).argmax(-1)
    for j in rows.tolist():
        first = int(batch.loss_mask[j].nonzero()[0])  # the position that predicts the answer word
        ctx.log("examples", scene=j // 5, question=heldout.vqa.questions[j], answer=heldout.vqa.answers[j],
                flamingo=tok.decode([int(said[j, first])]).strip(),
                text_only=tok.decode([int(said_text_only[j, first])]).strip())


def run(cfg: Config, ctx) -> dict[str, float]:
    say = ctx.say
    encoder = load_vision_encoder(say=say)
    tok, lm = load_shape_lm(say=say)
    frozen_before = frozen_state(encoder, lm)

    data = training_set(tok, encoder, cfg)
    heldout = eval_set(tok, encoder, cfg.eval_scenes, "heldout", cfg.eval_seed)
    fresh = eval_set(tok, encoder, cfg.eval_scenes, "train", cfg.eval_seed)
    curve_questions = min(len(heldout.vqa.questions), 100 * 5)  # the first 100 held-out scenes, 5 questions each

    torch.manual_seed(cfg.seed)
    model = Flamingo(lm, cfg.n_latents, cfg.resampler_layers, cfg.n_head, cfg.ff_mult)
    opt = make_optimizer(model, cfg)
    order = torch.Generator().manual_seed(cfg.seed)

    # at init: the frozen LM, bit for bit, and only the gates get a gradient
    with torch.no_grad():
        untrained = model(heldout.batch.ids, heldout.features, heldout.vqa.image_index)
        init_diff = (untrained - lm(heldout.batch.ids)).abs().max().item()
    probe = data.scene_batch(torch.randint(0, cfg.train_scenes, (cfg.scenes_per_step,),
                                           generator=torch.Generator().manual_seed(cfg.seed)))
    gate_grad_min, weight_grad_max = first_step_gradients(model, *probe)  # probe: also the branch shares' batch
    say(f"at init: max |logit difference| to the frozen LM {init_diff:g}; first-step |d loss / d a| >= "
        f"{gate_grad_min:.3g} for every gate, max |d loss / d W| of every other weight {weight_grad_max:g}")

    warmup = max(1, cfg.steps // 20)
    running, curve = [], []
    for step in ctx.track(range(cfg.steps), "flamingo", total=cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, warmup, cfg.steps)
        scenes = torch.randint(0, cfg.train_scenes, (cfg.scenes_per_step,), generator=order)
        running.append(training_step(model, opt, *data.scene_batch(scenes)))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            ctx.log("history", step=step + 1, loss=sum(running) / len(running), lr=opt.param_groups[0]["lr"],
                    **{f"gate_{k}": v for k, v in model.gates().items()})
            running = []
        if step == 0 or (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            accuracy = answers_right(model, heldout, limit=curve_questions).float().mean().item()
            shares = {f"share_{k}": v for k, v in branch_shares(model, *probe).items()}
            curve.append({"step": step + 1, "heldout_accuracy": accuracy, **shares})
            ctx.log("heldout_curve", **curve[-1])

    frozen_after = frozen_state(encoder, lm)
    frozen_change = max((frozen_after[k] - v).abs().max().item() for k, v in frozen_before.items())

    right_heldout, right_fresh = answers_right(model, heldout), answers_right(model, fresh)
    # the control: every held-out question asked about the next scene's image
    right_shuffled = answers_right(model, heldout, (heldout.vqa.image_index + 1) % cfg.eval_scenes)
    text_only = answer_accuracy(tok, lm, heldout.vqa.pairs())
    text_only_fresh = answer_accuracy(tok, lm, fresh.vqa.pairs())
    prior = prior_accuracy(data.pairs, heldout.vqa.pairs())

    with torch.no_grad():  # the text-only decoder's answers one by one, for the table by question kind
        text_only_right = exact_match(lm(heldout.batch.ids), heldout.batch)
    kinds = {"heldout": by_kind(heldout.vqa.questions, right_heldout),
             "train": by_kind(fresh.vqa.questions, right_fresh),
             "shuffled_image": by_kind(heldout.vqa.questions, right_shuffled),
             "text_only": by_kind(heldout.vqa.questions, text_only_right)}
    kind_rows = [{"kind": k, **{name: kinds[name][k] for name in kinds}} for k in QUESTION_KINDS]
    for row in kind_rows:
        ctx.log("accuracy_by_kind", **row)
    log_examples(ctx, tok, model, lm, heldout)

    gates = model.gates()
    metrics = {
        "heldout_accuracy": right_heldout.float().mean().item(),
        "train_accuracy": right_fresh.float().mean().item(),
        "text_only_accuracy": text_only,
        "text_only_train_accuracy": text_only_fresh,
        "prior_accuracy": prior,
        "shuffled_image_accuracy": right_shuffled.float().mean().item(),
        "init_max_logit_diff": init_diff,
        "first_gate_grad_min": gate_grad_min,
        "first_weight_grad_max": weight_grad_max,
        "frozen_max_change": frozen_change,
        "final_loss": ctx.tables["history"][-1]["loss"],
        **{f"gate_{k}": v for k, v in gates.items()},
        **{k: v for k, v in curve[-1].items() if k.startswith("share_")},
    }
    metrics["heldout_over_baseline"] = metrics["heldout_accuracy"] - max(text_only, prior)
    metrics["image_gain"] = metrics["heldout_accuracy"] - metrics["shuffled_image_accuracy"]
    say(f"held-out accuracy {metrics['heldout_accuracy']:.3f} (frozen LM without the image {text_only:.3f}, prior "
        f"{prior:.3f}, the same questions about another scene's image {metrics['shuffled_image_accuracy']:.3f}); "
        f"fresh training-split scenes {metrics['train_accuracy']:.3f} (text only {text_only_fresh:.3f})")
    say("final gates tanh(a): " + ", ".join(f"{k} {v:+.3f}" for k, v in gates.items()) + "; what each gated branch "
        "adds, |tanh(a) branch| / |residual|: " + ", ".join(f"{k[6:]} {v:.3f}" for k, v in curve[-1].items()
                                                         if k.startswith("share_")))
    say(f"encoder and LM unchanged by training: max |change| {frozen_change:g}")

    ctx.save_figure(plot_gates(ctx.tables["history"], curve, list(gates)), "gates.png")
    ctx.save_figure(plot_training(ctx.tables["history"], curve, text_only, prior), "training.png")
    ctx.save_figure(plot_kinds(kind_rows), "accuracy_by_kind.png")
    return metrics
