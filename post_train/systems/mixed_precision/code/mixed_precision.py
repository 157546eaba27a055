"""Mixed-precision training: fp32 vs bf16 autocast vs fp16 with a dynamic loss scaler, in one file.

The number formats (IEEE 754 binary16 and binary32; bfloat16 is binary32 with 16 mantissa bits cut):

    format  exponent bits  significant bits  largest   smallest normal  smallest subnormal  spacing just above 1
    fp32    8              24                3.4e38    2^-126           2^-149              2^-23
    bf16    8              8                 3.4e38    2^-126           2^-133              2^-7
    fp16    5              11                65504     2^-14            2^-24               2^-10

Round to nearest turns a magnitude of at most half the smallest subnormal (2^-25 in fp16) into 0
(underflow) and one of half a spacing beyond the largest finite value or more (65520 in fp16) into inf (overflow). bf16 has fp32's range and 2-3 significant
digits; fp16 has 3-4 digits and a narrow range, in which the small gradients of a network flush to 0.

Mixed-precision training (Micikevicius et al. 2018, "Mixed Precision Training", section 3):
  1. an fp32 master copy of the weights: the matmuls of the forward and backward passes run in 16 bits
     (here torch.autocast casts each op's inputs; the parameters stay fp32, so the gradients arrive in
     fp32 and the optimizer state and step are fp32). Why: a 16-bit weight cannot take an update below
     half its spacing, 16-bit(w + dw) == w once |dw| < 2^-9 |w| in bf16 (2^-12 |w| in fp16), and the
     late, small updates of a decayed learning rate (and the weight decay lr * wd * w) are of that size;
  2. loss scaling for fp16 (section 3.2): backpropagate S * L, so that the gradients, all multiplied
     by S, are lifted above fp16's underflow threshold, then divide by S in fp32 before anything reads
     them (the clipping norm, the optimizer);
  3. products accumulated in fp32 (the matmul kernels do it; the loss and the norms are fp32 here).

Dynamic loss scaling (ibid.; torch.amp.GradScaler implements the same rule), written out in
`DynamicLossScaler`:

    after backward of S * L:    g = grad / S                      (exact: S is a power of 2)
    if any g is inf or nan:     skip the optimizer step;  S <- S * backoff (0.5);  clean <- 0
    else:                       step;  clean <- clean + 1;  if clean == growth_interval: S <- S * growth (2), clean <- 0

It looks for the largest S that does not overflow: too large and a step is lost, too small and small
gradients underflow. bf16 needs no scaler: its exponent range is fp32's.

The run trains the same small Llama-style transformer (core/nn/model.py, the same initial weights) on
the same batches of generated stories (core/data/corpus.py) in four precisions, one step of each in
turn so that they share the machine's state when they are timed:

    fp32        everything in fp32 (the reference)
    bf16        torch.autocast bf16, fp32 weights and optimizer
    fp16        torch.autocast fp16, fp32 weights and optimizer, our dynamic loss scaler; a
                torch.amp.GradScaler is fed a copy of the same scaled gradients every step and must
                make the same skip decisions with the same scale sequence and gradient norms, and an
                overflow probe (an inf written into a gradient) must be skipped with S halved
    bf16_pure   the weights themselves in bf16, AdamW updating them in place (no fp32 master copy)

and measures the underflow directly: the gradients of one batch, computed in fp32, and in fp16
autocast without and with the loss scale, element by element (`gradient_underflow`).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

from core.config import Range, Seed
from core.data.corpus import TokenBins, generate_stories, split_documents, unigram_entropy, write_token_bins
from core.data.tokenizer import load_tokenizer
from core.nn.model import Transformer, scaled_config
from core.nn.training import adamw_groups, cosine_lr

FP16_MAX = float(torch.finfo(torch.float16).max)                 # 65504
FP16_MIN_NORMAL = float(torch.finfo(torch.float16).tiny)         # 2^-14
FP16_MIN_SUBNORMAL = 2.0 ** -24
"""the smallest positive fp16 number; a magnitude at or below half of it rounds to 0"""


@dataclass
class Config:
    n_stories: Annotated[int, Range(ge=20, le=100_000)] = 1000
    """generated stories in the corpus (~620 bytes each)"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.05
    """fraction of whole stories held out for the val loss"""
    vocab_size: Annotated[int, Range(ge=384, le=8192)] = 512
    """sentencepiece vocabulary (the tokenizer module's model, or one trained on demand)"""
    n_layer: Annotated[int, Range(ge=1, le=48)] = 2
    """transformer blocks"""
    n_embd: Annotated[int, Range(ge=8, le=4096)] = 64
    """model width d_model"""
    n_head: Annotated[int, Range(ge=1, le=64)] = 4
    """attention heads (head_dim = n_embd / n_head)"""
    block_size: Annotated[int, Range(ge=8, le=2048)] = 64
    """context length of the training windows"""
    batch_size: Annotated[int, Range(ge=1, le=1024)] = 16
    """windows per step; the loss is their mean over batch_size x block_size tokens, which is what makes the
    per-token gradients small (each is divided by that count)"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 600
    """optimizer steps of every precision (the same batches for all)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak AdamW learning rate (linear warmup, cosine decay to min_lr_ratio of it)"""
    warmup: Annotated[int, Range(ge=0, le=100_000)] = 20
    """linear warmup steps"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.05
    """the cosine ends at min_lr_ratio * lr: the small late updates that a bf16 weight cannot take"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.1
    """AdamW decoupled weight decay on the weight matrices (lr * wd * w per step: far below bf16's spacing)"""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW first-moment decay"""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW second-moment decay"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the global norm of the (unscaled) gradient to this"""
    init_scale: Annotated[float, Range(ge=1, le=2.0 ** 40)] = 2.0 ** 16
    """the loss scaler's first S (GradScaler's default: large, so that the first steps find the ceiling by
    overflowing and backing off)"""
    growth_factor: Annotated[float, Range(gt=1, le=16)] = 2.0
    """S is multiplied by this after growth_interval steps without an overflow"""
    backoff_factor: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """S is multiplied by this on an overflow (the step is skipped)"""
    growth_interval: Annotated[int, Range(ge=1, le=100_000)] = 100
    """clean steps before S grows (GradScaler's default 2000 is longer than this whole run)"""
    inject_inf_step: Annotated[int, Range(ge=0, le=100_000)] = 300
    """before this step the fp16 arm runs an overflow probe: an extra backward of the step's batch with one
    gradient element set to inf, as an overflow leaves it; the scaler must skip it and halve S (and GradScaler
    must agree), then the step runs as usual"""
    eval_batches: Annotated[int, Range(ge=1, le=1000)] = 8
    """val batches of the val loss (the same windows for every precision)"""
    accum_micro_batches: Annotated[int, Range(ge=1, le=2 ** 20)] = 512
    """the underflow measurement also treats its batch as one of this many micro-batches of a gradient-accumulated
    global batch (the loss divided by it before backward, as accumulation does): 512 x 1024 tokens is GPT-3
    Small's 0.5M-token batch, where the per-token gradients are that much smaller"""
    log_every: Annotated[int, Range(ge=1, le=100_000)] = 20
    """steps between logged rows and measurements of the lost bf16 updates"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the comparison trains: auto takes CUDA when a GPU is present (torch.autocast("cuda") and
    GradScaler("cuda")), else the CPU"""
    gpu_bench_steps: Annotated[int, Range(ge=0, le=10_000)] = 30
    """on a GPU only: timed steps per precision of a larger model (the GPU speed-up table); 0 skips it"""
    seed: Seed = 0
    """seeds the corpus, the split, the initial weights (shared by every precision) and the batches"""

    def problems(self) -> list[str]:
        found = []
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            found.append(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size (RoPE)")
        if self.inject_inf_step >= self.steps:
            found.append(f"inject_inf_step={self.inject_inf_step} must be below steps={self.steps}")
        if self.device == "cuda" and not torch.cuda.is_available():
            found.append("device=cuda, but torch sees no CUDA device (use auto or cpu)")
        return found


# --- the loss scaler ---------------------------------------------------------------------------------
class DynamicLossScaler:
    """Dynamic loss scaling (Micikevicius et al. 2018, section 3.2), the rule torch.amp.GradScaler follows:

        backward(S * L);  g = grad / S;  any g inf/nan -> skip the step, S *= backoff, clean = 0;
        else step, clean += 1, and every growth_interval clean steps S *= growth.

    The scale stays a power of 2 (from a power-of-2 start, with the default factors), so scaling and
    unscaling change no bit of a gradient that neither underflows nor overflows."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean_steps = 0
        """steps since the last overflow (GradScaler's growth tracker)"""

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self.scale

    def unscale_(self, params: list[Tensor]) -> bool:
        """Divide every gradient by S in place (in fp32: the parameters are the fp32 master weights);
        True when one of them holds an inf or nan, i.e. the backward pass overflowed."""
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.mul_(1.0 / self.scale)
        return not bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def step(self, optimizer: torch.optim.Optimizer, found_inf: bool) -> None:
        """The optimizer steps only on finite gradients; then S moves."""
        if not found_inf:
            optimizer.step()
        self.update(found_inf)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0


class GradScalerShadow:
    """torch.amp.GradScaler beside our scaler, on the same scaled gradients: each step it is handed a copy
    of the gradients of S * L, unscales them with its own scale, clips them, decides whether its optimizer
    steps and moves its scale, with the calls of torch's own recipe (unscale_, clip, step, update). Its
    optimizer is SGD with lr = 0 over copies of the parameters: only the decision is wanted from it."""

    def __init__(self, params: list[Tensor], cfg: Config, device: torch.device):
        self.params = [nn.Parameter(torch.zeros_like(p)) for p in params]
        self.optimizer = torch.optim.SGD(self.params, lr=0.0)
        self.stepped = False
        self.optimizer.register_step_post_hook(lambda *_: setattr(self, "stepped", True))
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                                           backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval)
        self.scaler.scale(torch.ones((), device=device))  # GradScaler creates its scale tensor on the first scale()

    def observe(self, params: list[Tensor], max_norm: float) -> tuple[float, bool, float]:
        """(its scale for this step, whether its optimizer stepped, the unscaled gradient norm it clipped)."""
        scale = self.scaler.get_scale()
        for shadow, p in zip(self.params, params):
            shadow.grad = p.grad.detach().clone()
        self.stepped = False
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return scale, self.stepped, norm


# --- the four precisions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None
    """the dtype torch.autocast runs the matmuls in (None: no autocast)"""
    weights: torch.dtype
    """the dtype of the parameters, hence of the gradients, the AdamW state and the update"""
    loss_scaling: bool
    """backpropagate S * L with the dynamic loss scaler"""


PRECISIONS = {
    "fp32": Precision(autocast=None, weights=torch.float32, loss_scaling=False),
    "bf16": Precision(autocast=torch.bfloat16, weights=torch.float32, loss_scaling=False),
    "fp16": Precision(autocast=torch.float16, weights=torch.float32, loss_scaling=True),
    "bf16_pure": Precision(autocast=None, weights=torch.bfloat16, loss_scaling=False),
}
LABELS = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaler",
          "bf16_pure": "bf16 weights, no fp32 master"}


@dataclass
class Arm:
    """One precision's model, optimizer and (fp16) loss scaler."""
    name: str
    precision: Precision
    model: Transformer
    optimizer: torch.optim.Optimizer
    scaler: DynamicLossScaler | None = None
    params: list[Tensor] = field(default_factory=list)


def make_arm(name: str, init_model: Transformer, cfg: Config) -> Arm:
    """A copy of the shared initial model in `name`'s precision, with its own AdamW (and scaler)."""
    precision = PRECISIONS[name]
    model = copy.deepcopy(init_model).to(precision.weights)  # deepcopy keeps the tied embedding / LM head
    optimizer = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = DynamicLossScaler(cfg.init_scale, cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval) \
        if precision.loss_scaling else None
    return Arm(name, precision, model, optimizer, scaler, [p for g in optimizer.param_groups for p in g["params"]])


def autocast(arm: Arm, device: torch.device):
    return torch.autocast(device.type, dtype=arm.precision.autocast or torch.float32,
                          enabled=arm.precision.autocast is not None)


def forward_backward(arm: Arm, x: Tensor, y: Tensor) -> float:
    """The mean next-token cross-entropy of the batch; its gradient (of S * L with a scaler) is left in .grad."""
    with autocast(arm, x.device):
        loss = arm.model(x, targets=y)  # fp32: the fused loss accumulates in fp32 whatever the matmul dtype
    (arm.scaler.scale_loss(loss) if arm.scaler else loss).backward()
    return loss.item()


def optimizer_step(arm: Arm, max_norm: float) -> tuple[bool, float]:
    """Unscale (fp16), clip the true gradient's norm, step unless it overflowed -> (stepped, norm before clipping)."""
    found_inf = arm.scaler.unscale_(arm.params) if arm.scaler else False
    norm = float(torch.nn.utils.clip_grad_norm_(arm.params, max_norm))  # the norm of g, not of S g
    if arm.scaler:
        arm.scaler.step(arm.optimizer, found_inf)
    else:
        arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    return not found_inf, norm


@torch.no_grad()
def val_loss(arm: Arm, bins: TokenBins, cfg: Config, device: torch.device) -> float:
    """Mean cross-entropy on eval_batches fixed val batches, in the arm's own precision."""
    windows = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = (t.to(device) for t in bins.get_batch("val", cfg.batch_size, cfg.block_size, windows))
        with autocast(arm, device):
            losses.append(arm.model(x, targets=y).item())
    return float(np.mean(losses))


def lost_update_share(before: list[Tensor], after: list[Tensor], dtype: torch.dtype) -> float:
    """Of the elements an fp32 step changed, the share whose update would vanish if the weights were kept
    in `dtype`: dtype(dtype(w) + dw) == dtype(w), the update below half the spacing of the stored weight."""
    lost = changed = 0
    for w, w_new in zip(before, after):
        update = w_new.float() - w.float()
        stored = w.to(dtype)
        moved = update != 0
        lost += int(((stored.float() + update).to(dtype) == stored)[moved].sum())
        changed += int(moved.sum())
    return lost / max(changed, 1)


def unchanged_share(before: list[Tensor], after: list[Tensor]) -> float:
    """Share of the elements a step left exactly as they were."""
    same = sum(int((w == w_new).sum()) for w, w_new in zip(before, after))
    return same / sum(w.numel() for w in before)


# --- underflow, measured ------------------------------------------------------------------------------------
def captured_gradients(model: Transformer, x: Tensor, y: Tensor, dtype: torch.dtype | None,
                       scale: float) -> tuple[list[Tensor], list[Tensor]]:
    """Backward of scale * loss with the matmuls in `dtype` (None: fp32) -> (activation gradients, parameter
    gradients). The activation gradients are those of every attention and FFN output, the tensors the
    backward pass carries through the 16-bit matmuls (in fp16 under fp16 autocast); the parameter gradients
    are the fp32 .grad of the master weights. None is unscaled: what is 0 stays 0."""
    modules = [module for block in model.blocks for module in (block.attn, block.ffn)]
    activation_grads: dict[int, Tensor] = {}

    def keep_gradient(index: int):
        def on_forward(_module, _inputs, out: Tensor) -> None:  # a forward hook that returns None keeps the output
            out.register_hook(lambda grad: activation_grads.__setitem__(index, grad.detach()))
        return on_forward

    hooks = [module.register_forward_hook(keep_gradient(i)) for i, module in enumerate(modules)]
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x, targets=y)
        (loss * scale).backward()
    finally:
        for hook in hooks:
            hook.remove()
    param_grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return [activation_grads[i] for i in range(len(modules))], param_grads


def flushed_share(reference: list[Tensor], low: list[Tensor]) -> float:
    """Of the elements nonzero in the fp32 gradients, the share that is exactly 0 in the low-precision ones."""
    nonzero = flushed = 0
    for ref, g in zip(reference, low):
        mask = ref != 0
        nonzero += int(mask.sum())
        flushed += int((g[mask] == 0).sum())
    return flushed / max(nonzero, 1)


def cast_flush_share(grads: list[Tensor]) -> float:
    """Share of the nonzero fp32 gradients that a plain cast to fp16 turns into 0 (|g| <= 2^-25)."""
    flat = torch.cat([g.flatten() for g in grads])
    flat = flat[flat != 0]
    return float((flat.to(torch.float16) == 0).double().mean())


def log2_magnitudes(grads: list[Tensor]) -> Tensor:
    flat = torch.cat([g.flatten() for g in grads]).abs()
    return flat[flat > 0].double().log2()


def gradient_underflow(model: Transformer, x: Tensor, y: Tensor, accum: int, scale: float) -> dict:
    """One batch's gradients in fp32 and in fp16 autocast, compared element by element (fp32 weights, the fp16
    arm's recipe): once as the training's own batch, and once as one of `accum` micro-batches of a gradient-
    accumulated global batch, whose loss is divided by `accum` before backward as accumulation does, without
    and with the loss scale `scale`."""
    micro32, _ = captured_gradients(model, x, y, None, 1.0)
    micro16, _ = captured_gradients(model, x, y, torch.float16, 1.0)
    acts32, params32 = captured_gradients(model, x, y, None, 1.0 / accum)
    acts16, params16 = captured_gradients(model, x, y, torch.float16, 1.0 / accum)
    acts16s, params16s = captured_gradients(model, x, y, torch.float16, scale / accum)
    return {
        "underflow_micro": flushed_share(micro32, micro16),
        "underflow": flushed_share(acts32, acts16),
        "underflow_scaled": flushed_share(acts32, acts16s),
        "underflow_params": flushed_share(params32, params16),
        "underflow_params_scaled": flushed_share(params32, params16s),
        "cast_underflow": cast_flush_share(acts32),
        "scaled_nonfinite": sum(int((~g.isfinite()).sum()) for g in acts16s + params16s),
        "log2_activations": log2_magnitudes(acts32),
        "log2_params": log2_magnitudes(params32),
    }


# --- data -------------------------------------------------------------------------------------------------
def token_bins(cfg: Config, ctx) -> tuple[TokenBins, int]:
    """Generated stories -> sentencepiece ids -> train.bin / val.bin in the run's folder, as the LLM modules do."""
    tok = load_tokenizer(cfg.vocab_size, say=ctx.say)
    train_docs, val_docs = split_documents(generate_stories(cfg.n_stories, cfg.seed), cfg.val_fraction, cfg.seed)
    folder = ctx.path("data/train.bin").parent
    ctx.path("data/val.bin")
    bins = write_token_bins(folder, {"train": train_docs, "val": val_docs}, tok.encode, tok.eos_id)
    return bins, tok.vocab_size


def pick_device(cfg: Config, ctx) -> torch.device:
    if cfg.device == "cpu" or not torch.cuda.is_available():
        if cfg.device == "auto":
            ctx.say("GPU path skipped: no CUDA device; the comparison runs on the CPU")
        return torch.device("cpu")
    ctx.say(f"GPU path: {torch.cuda.get_device_name()} (torch.autocast('cuda'), GradScaler('cuda'))")
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the run ------------------------------------------------------------------------------------------------
class ScalerAudit:
    """Our loss scaler against torch.amp.GradScaler on the fp16 arm's gradients, step by step, and an overflow probe."""

    def __init__(self, arm: Arm, cfg: Config, device: torch.device):
        self.arm, self.cfg = arm, cfg
        self.shadow = GradScalerShadow(arm.params, cfg, device)
        self.scale_mismatches = self.skip_mismatches = self.growths = self.skipped = 0
        self.norm_rel_diff = 0.0
        self.norm_ratios: list[float] = []
        self.injected: dict[str, float] = {}

    def before_update(self) -> None:
        """Between the fp16 arm's backward and its update: GradScaler decides on a copy of the same gradients."""
        self.scale_before = self.arm.scaler.scale
        self.shadow_scale, self.shadow_stepped, self.shadow_norm = self.shadow.observe(self.arm.params, self.cfg.grad_clip)

    def after_update(self, step: int, stepped: bool, norm: float, fp32_norm: float, ctx, probe: bool = False) -> None:
        self.growths += self.arm.scaler.scale > self.scale_before
        self.skipped += not stepped
        self.scale_mismatches += self.shadow_scale != self.scale_before
        self.skip_mismatches += self.shadow_stepped != stepped
        if stepped and self.shadow_stepped and not probe:
            self.norm_rel_diff = max(self.norm_rel_diff, abs(self.shadow_norm - norm) / norm)
            self.norm_ratios.append(norm / fp32_norm)
        ctx.log("scaler", step=step, scale=self.scale_before, stepped=int(stepped), gradscaler_scale=self.shadow_scale,
                gradscaler_stepped=int(self.shadow_stepped), overflow_probe=int(probe))

    def probe_overflow(self, step: int, x: Tensor, y: Tensor, ctx) -> None:
        """An extra backward of this step's batch with an inf written into one gradient element, as an overflow in
        the backward pass leaves it: the scaler must skip the update (no weight moves) and halve S, and GradScaler
        must decide the same. The step itself then runs as usual, at the halved scale, so that the fp16 arm does
        not lose a batch the other precisions train on."""
        forward_backward(self.arm, x, y)
        next(p for p in self.arm.params if p.grad is not None).grad.view(-1)[0] = float("inf")
        weights = [p.detach().clone() for p in self.arm.params]
        self.before_update()
        stepped, norm = optimizer_step(self.arm, self.cfg.grad_clip)
        self.after_update(step, stepped, norm, float("nan"), ctx, probe=True)
        unchanged = all(torch.equal(a, b) for a, b in zip(weights, self.arm.params))
        self.injected = {"injected_inf_skipped": float(not stepped and unchanged),
                         "injected_inf_scale_ratio": self.arm.scaler.scale / self.scale_before}

    def metrics(self) -> dict[str, float]:
        return {"fp16_grad_norm_ratio": statistics.median(self.norm_ratios), "skipped_steps": self.skipped,
                "scale_growths": self.growths, "final_log2_scale": math.log2(self.arm.scaler.scale), **self.injected,
                "gradscaler_scale_mismatches": self.scale_mismatches, "gradscaler_skip_mismatches": self.skip_mismatches,
                "gradscaler_norm_max_rel_diff": self.norm_rel_diff}


def timed_step(arm: Arm, x: Tensor, y: Tensor, max_norm: float, device: torch.device,
               between: Callable[[], None] | None = None) -> tuple[float, bool, float, float]:
    """One training step of `arm` -> (loss, stepped, gradient norm, seconds); `between()` runs after the backward
    pass and before the update, outside the timing."""
    synchronize(device)
    start = time.perf_counter()
    loss = forward_backward(arm, x, y)
    paused = 0.0
    if between is not None:
        synchronize(device)
        pause = time.perf_counter()
        between()
        paused = time.perf_counter() - pause
    stepped, norm = optimizer_step(arm, max_norm)
    synchronize(device)
    return loss, stepped, norm, time.perf_counter() - start - paused


def train_all(arms: dict[str, Arm], bins: TokenBins, cfg: Config, ctx, device: torch.device) -> tuple[dict, ScalerAudit, dict]:
    """Every precision takes step s on the same batch before any takes step s + 1 -> (seconds per step of each
    arm, the scaler audit, the bf16 rounding measurements)."""
    batches = torch.Generator().manual_seed(cfg.seed)
    audit = ScalerAudit(arms["fp16"], cfg, device)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    rounding: dict[str, list[float]] = {"lost": [], "unchanged": []}
    for step in ctx.track(range(cfg.steps), "mixed precision", total=cfg.steps):
        x, y = (t.to(device) for t in bins.get_batch("train", cfg.batch_size, cfg.block_size, batches))
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        measure = step % cfg.log_every == 0 or step == cfg.steps - 1
        row = {"step": step, "lr": lr}
        for name, arm in arms.items():
            for group in arm.optimizer.param_groups:
                group["lr"] = lr
            before = [p.detach().clone() for p in arm.params] if measure and name.startswith("bf16") else None
            if name == "fp16" and step == cfg.inject_inf_step:
                audit.probe_overflow(step, x, y, ctx)
            between = audit.before_update if name == "fp16" else None
            loss, stepped, norm, secs = timed_step(arm, x, y, cfg.grad_clip, device, between)
            seconds[name].append(secs)
            row[f"loss_{name}"], row[f"grad_norm_{name}"] = loss, norm
            if name == "fp16":
                audit.after_update(step, stepped, norm, row["grad_norm_fp32"], ctx)
            elif name == "bf16" and before is not None:   # fp32 master weights: would the update survive bf16?
                rounding["lost"].append(lost_update_share(before, arm.params, torch.bfloat16))
            elif name == "bf16_pure" and before is not None:
                rounding["unchanged"].append(unchanged_share(before, arm.params))
        if measure:
            ctx.log("history", **row)
    return seconds, audit, rounding


def run(cfg: Config, ctx) -> dict[str, float]:
    device = pick_device(cfg, ctx)
    bins, vocab = token_bins(cfg, ctx)
    entropy = unigram_entropy(np.asarray(bins.splits["train"]), vocab)
    torch.manual_seed(cfg.seed)
    init_model = Transformer(scaled_config("llama", vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                           n_embd=cfg.n_embd, n_head=cfg.n_head)).to(device)
    arms = {name: make_arm(name, init_model, cfg) for name in PRECISIONS}
    initial = val_loss(arms["fp32"], bins, cfg, device)
    ctx.say(f"{init_model.num_params():,} parameters, {len(bins.splits['train']):,} train tokens; unigram entropy "
            f"{entropy:.3f} nats, untrained val loss {initial:.3f}")

    seconds, audit, rounding = train_all(arms, bins, cfg, ctx, device)
    losses = {name: val_loss(arm, bins, cfg, device) for name, arm in arms.items()}
    ms = {name: 1000 * statistics.median(s[min(3, len(s) - 1):]) for name, s in seconds.items()}  # after warm-up
    for name in arms:
        ctx.log("precisions", precision=name, label=LABELS[name], val_loss=losses[name],
                rel_diff_to_fp32=(losses[name] - losses["fp32"]) / losses["fp32"])
        ctx.say(f"{LABELS[name]:>30}: val loss {losses[name]:.4f} ({(losses[name] / losses['fp32'] - 1):+.2%} vs fp32), "
                f"{ms[name]:.1f} ms/step")
    ctx.measure(**{f"ms_per_step_{n}": v for n, v in ms.items()},
                **{f"speed_vs_fp32_{n}": ms["fp32"] / v for n, v in ms.items() if n != "fp32"})

    final_scale = arms["fp16"].scaler.scale
    x, y = (t.to(device) for t in bins.get_batch("val", cfg.batch_size, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 2)))
    under = gradient_underflow(arms["fp32"].model, x, y, cfg.accum_micro_batches, cfg.init_scale)
    ctx.say(f"fp16 underflow (gradient elements nonzero in fp32 and 0 in an fp16-autocast backward): activations "
            f"{under['underflow_micro']:.3%} for the training batch; as 1 of {cfg.accum_micro_batches} accumulated "
            f"micro-batches {under['underflow']:.2%} unscaled -> {under['underflow_scaled']:.4%} with S = 2^"
            f"{math.log2(cfg.init_scale):g} (parameters {under['underflow_params']:.2%} -> {under['underflow_params_scaled']:.4%})")
    ctx.say(f"loss scaler: {audit.skipped} skipped steps, {audit.growths} growths, final S = 2^{math.log2(final_scale):g}; "
            f"GradScaler disagreed on the scale {audit.scale_mismatches} and on skipping {audit.skip_mismatches} times "
            f"in {cfg.steps} steps")

    plot_losses(ctx.tables["history"], losses, ctx)
    plot_underflow(under, cfg, ctx)
    plot_scale(ctx.tables["scaler"], ctx)
    plot_speed(ms, device, ctx)
    if device.type == "cuda" and cfg.gpu_bench_steps:
        gpu_benchmark(cfg, vocab, ctx)

    return {
        "unigram_entropy": entropy,
        "initial_val_loss": initial,
        **{f"val_loss_{name}": losses[name] for name in PRECISIONS},
        "bf16_rel_diff": abs(losses["bf16"] - losses["fp32"]) / losses["fp32"],
        "fp16_rel_diff": abs(losses["fp16"] - losses["fp32"]) / losses["fp32"],
        "bf16_pure_rel_diff": (losses["bf16_pure"] - losses["fp32"]) / losses["fp32"],
        **audit.metrics(),
        **{k: v for k, v in under.items() if not k.startswith("log2")},
        "bf16_lost_update_share": float(np.mean(rounding["lost"])),
        "bf16_lost_update_share_last": rounding["lost"][-1],
        "bf16_pure_unchanged_share": float(np.mean(rounding["unchanged"])),
    }


# --- GPU: the speed of each precision on a model large enough for the tensor cores ----------------------------
GPU_BENCH_MODEL = dict(n_layer=8, n_embd=1024, n_head=16, block_size=512)
GPU_BENCH_BATCH = 16


def gpu_benchmark(cfg: Config, vocab: int, ctx) -> None:
    """ms/step of fp32, bf16 autocast and fp16 autocast + scaler on a model of about 100M parameters (8 blocks of
    width 1024, context 512) and random tokens: the comparison model is too small to keep a GPU's tensor cores
    busy, its steps are bound by kernel launches. fp32 runs at torch's default matmul precision (TF32 off unless
    the user turned it on). Timings only: they go to run.json, not into the metrics."""
    device = torch.device("cuda")
    torch.manual_seed(cfg.seed)
    model_cfg = scaled_config("llama", vocab_size=vocab, **GPU_BENCH_MODEL)
    init_model = Transformer(model_cfg).to(device)
    x = torch.randint(0, vocab, (GPU_BENCH_BATCH, model_cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    ms = {}
    for name in ("fp32", "bf16", "fp16"):
        arm = make_arm(name, init_model, cfg)
        times = [timed_step(arm, x, y, cfg.grad_clip, device)[3] for _ in range(cfg.gpu_bench_steps + 3)]
        ms[name] = 1000 * statistics.median(times[3:])  # the first steps pay for allocation and kernel selection
        del arm
        torch.cuda.empty_cache()
    ctx.measure(**{f"gpu_ms_per_step_{n}": v for n, v in ms.items()},
                **{f"gpu_speed_vs_fp32_{n}": ms["fp32"] / v for n, v in ms.items() if n != "fp32"})
    ctx.say(f"GPU, {init_model.num_params() / 1e6:.0f}M parameters, batch {GPU_BENCH_BATCH} x {model_cfg.block_size}: "
            + ", ".join(f"{n} {v:.1f} ms/step ({ms['fp32'] / v:.2f}x fp32)" for n, v in ms.items()))


# --- plots ----------------------------------------------------------------------------------------------------
COLORS = {"fp32": "black", "bf16": "tab:blue", "fp16": "tab:orange", "bf16_pure": "tab:red"}


def plot_losses(history: list[dict], losses: dict[str, float], ctx) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [r["step"] for r in history]
    for name, color in COLORS.items():
        axes[0].plot(steps, [r[f"loss_{name}"] for r in history], color=color, lw=1, label=LABELS[name])
        axes[1].plot(steps, [r[f"loss_{name}"] - r["loss_fp32"] for r in history], color=color, lw=1)
    axes[0].set(xlabel="step", ylabel="train loss (same batch for all)", title="training loss", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="step", ylabel="loss - fp32 loss", title="difference to fp32 on the same batch")
    fig.suptitle("val loss: " + ", ".join(f"{n} {v:.3f}" for n, v in losses.items()), fontsize=9)
    fig.tight_layout()
    ctx.save_figure(fig, "loss.png")


def plot_underflow(under: dict, cfg: Config, ctx) -> None:
    """Histogram of log2 |g| of the fp32 gradients of an accumulated micro-batch, with fp16's limits; the same
    shifted by log2 S."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    shift = math.log2(cfg.init_scale)
    edges = np.arange(-50, 20, 1.0)
    for ax, offset, title in ((axes[0], 0.0, "fp32 gradients, as they are"),
                              (axes[1], shift, f"the same times S = 2^{shift:g} (loss scaling)")):
        for key, color, label in (("log2_activations", "tab:blue", "activation gradients"),
                                  ("log2_params", "tab:green", "parameter gradients")):
            counts, _ = np.histogram((under[key] + offset).clamp(edges[0], edges[-1]).numpy(), bins=edges)
            ax.stairs(counts, edges, fill=True, color=color, alpha=0.5, label=label)
        ax.axvline(math.log2(FP16_MIN_SUBNORMAL / 2), color="tab:red", ls="--", lw=1, label="rounds to 0 in fp16 (2^-25)")
        ax.axvline(math.log2(FP16_MIN_NORMAL), color="tab:orange", ls="--", lw=1, label="fp16 smallest normal 2^-14")
        ax.axvline(math.log2(FP16_MAX), color="black", ls="--", lw=1, label="fp16 max 65504")
        ax.set(xlabel="log2 |g|", title=title, yscale="log")
    axes[0].set_ylabel("elements")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"1 of {cfg.accum_micro_batches} accumulated micro-batches: activation gradients flushed to 0 in fp16 "
                 f"{under['underflow']:.1%} -> {under['underflow_scaled']:.3%} with scaling; parameter gradients "
                 f"{under['underflow_params']:.2%} -> {under['underflow_params_scaled']:.3%}", fontsize=9)
    fig.tight_layout()
    ctx.save_figure(fig, "underflow.png")


def plot_scale(rows: list[dict], ctx) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.4))
    steps = [r["step"] for r in rows]
    ax.step(steps, [math.log2(r["scale"]) for r in rows], where="post", color="tab:orange", lw=2, label="our scaler")
    ax.step(steps, [math.log2(r["gradscaler_scale"]) for r in rows], where="post", color="black", lw=1, ls="--",
            label="torch.amp.GradScaler (same gradients)")
    skips = [r for r in rows if not r["stepped"]]
    ax.scatter([r["step"] for r in skips], [math.log2(r["scale"]) for r in skips], color="tab:red", zorder=3,
               label="skipped step (inf/nan gradient; the overflow probe)")
    ax.set(xlabel="step", ylabel="log2 S", title="dynamic loss scale")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.save_figure(fig, "scale.png")


def plot_speed(ms: dict[str, float], device: torch.device, ctx) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(ms)
    ax.barh([LABELS[n] for n in names], [ms[n] for n in names], color=[COLORS[n] for n in names])
    for i, n in enumerate(names):
        ax.text(ms[n], i, f" {ms[n]:.1f} ms ({ms['fp32'] / ms[n]:.2f}x)", va="center", fontsize=8)
    ax.set(xlabel="ms per training step (median)", title=f"speed on {device.type} (one measurement, not a check)",
           xlim=(0, 1.5 * max(ms.values())))
    ax.invert_yaxis()
    fig.tight_layout()
    ctx.save_figure(fig, "speed.png")
