"""A tiny vision encoder for the shape world (core/data/shapes.py): a ViT (Dosovitskiy et al. 2021),
pretrained once on the shapes' attributes and cached, that the vision-language modules read frozen.

    patches    x (B, 3, 32, 32) -> 8 x 8 grid of 4 x 4 patches, each a linear map of its 48 pixels
    tokens     z_0 = patches W_p + E_pos                       (learned positions; no class token)
    blocks     z' = z + MSA(LN(z)),  z = z' + MLP(LN(z'))       (pre-LN, bidirectional, GELU MLP of 4 d)
    features   LN(z_L): (B, 64, d), one vector per patch       (what a projector, a Q-Former or a
                                                                 perceiver resampler reads)

Pretraining objective, chosen to be cheap and to leave every attribute in the features: from the mean
feature of each image half, predict that half's shape kind, colour and size (or "none"): three
softmax heads per half, their cross-entropies summed. It sees every colour-kind pair (the "pretrain"
split), as a CLIP-style encoder has seen every common object: pretrained on the training pairs alone
(300 steps, seed 0), its kind head read colour as a cue and named the kind of a held-out pair right
only about half the time (0.51; colour 0.99, size 0.98). The held-out pairs stay unseen by what the
vision-language modules train (projector, Q-Former, cross-attention, decoder), so their held-out
questions still measure composition on the language side.

    encoder = load_vision_encoder()     # the shipped copy, or trained on first use (seconds); then the cache
    feats = encoder(images)             # (B, 64, d)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.artifacts import atomic_write, atomic_write_text, copy_shipped, unreadable_pretrained
from core.data.shapes import COLOURS, IMAGE_SIZE, KINDS, SIDES, SIZES, Scene, make_scenes, render_batch
from core.paths import pretrained_cache

NONE = "none"
ATTRIBUTES = {"kind": (*KINDS, NONE), "colour": (*COLOURS, NONE), "size": (*SIZES, NONE)}
"""attribute -> its classes; NONE for an empty image half"""


@dataclass(frozen=True)
class VisionConfig:
    patch: int = 4
    """patch side in pixels (IMAGE_SIZE / patch patches per side)"""
    d: int = 64
    """feature width"""
    n_layer: int = 2
    """transformer blocks"""
    n_head: int = 4
    """attention heads"""
    pretrain_scenes: int = 3000
    """training scenes the attribute objective sees"""
    pretrain_steps: int = 300
    """AdamW steps of pretraining"""
    batch: int = 64
    """scenes per pretraining step"""
    lr: float = 2e-3
    """AdamW learning rate (constant)"""
    seed: int = 0
    """initial weights, scenes and batch order"""


class EncoderBlock(nn.Module):
    """A pre-LN ViT block: bidirectional multi-head self-attention, then a GELU MLP of width 4 d."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.attn_norm, self.mlp_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, z: Tensor) -> Tensor:
        B, N, d = z.shape
        q, k, v = self.qkv(self.attn_norm(z)).view(B, N, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        z = z + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d))
        return z + self.mlp(self.mlp_norm(z))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = IMAGE_SIZE // cfg.patch
        self.patch_embed = nn.Linear(3 * cfg.patch * cfg.patch, cfg.d)
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, cfg.d) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.d, cfg.n_head) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d)

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def patchify(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, grid * grid, 3 p p), patches in row-major order."""
        p = self.cfg.patch
        B = images.shape[0]
        x = images.unfold(2, p, p).unfold(3, p, p)  # (B, 3, grid, grid, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(B, self.grid * self.grid, 3 * p * p)

    def forward(self, images: Tensor) -> Tensor:
        z = self.patch_embed(self.patchify(images)) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.norm(z)


class AttributeHeads(nn.Module):
    """The pretraining heads: per image half, one linear classifier per attribute on the half's mean
    patch feature (left half: the patch columns 0 .. grid/2 - 1)."""

    def __init__(self, d: int, grid: int):
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({a: nn.Linear(d, len(classes)) for a, classes in ATTRIBUTES.items()})

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """features (B, grid * grid, d) -> attribute -> logits (B, 2 sides, classes)."""
        B, _, d = features.shape
        halves = features.view(B, self.grid, 2, self.grid // 2, d).mean(dim=(1, 3))  # (B, 2, d): left, right
        return {a: head(halves) for a, head in self.heads.items()}


def attribute_targets(scenes: list[Scene]) -> dict[str, Tensor]:
    """attribute -> class index (N, 2 sides), NONE where the half is empty."""
    out = {a: torch.full((len(scenes), len(SIDES)), classes.index(NONE)) for a, classes in ATTRIBUTES.items()}
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            side = SIDES.index(shape.side)
            for a, classes in ATTRIBUTES.items():
                out[a][i, side] = classes.index(getattr(shape, a))
    return out


def pretrain(cfg: VisionConfig) -> tuple[VisionEncoder, AttributeHeads]:
    torch.manual_seed(cfg.seed)
    encoder = VisionEncoder(cfg)
    heads = AttributeHeads(cfg.d, encoder.grid)
    scenes = make_scenes(cfg.pretrain_scenes, "pretrain", cfg.seed)
    images, targets = render_batch(scenes), attribute_targets(scenes)
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=cfg.lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=order)
        logits = heads(encoder(images[idx]))
        loss = sum(F.cross_entropy(logits[a].flatten(0, 1), targets[a][idx].flatten()) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return encoder.eval(), heads.eval()


@torch.no_grad()
def attribute_accuracy(encoder: VisionEncoder, heads: AttributeHeads, scenes: list[Scene]) -> dict[str, float]:
    """Share of image halves whose kind / colour / size (or emptiness) the heads get right."""
    logits, targets = heads(encoder(render_batch(scenes))), attribute_targets(scenes)
    return {a: (logits[a].argmax(-1) == targets[a]).float().mean().item() for a in ATTRIBUTES}


def cache_dir(cfg: VisionConfig):
    tag = "_".join(f"{v}" for v in dataclasses.astuple(cfg))
    return pretrained_cache() / f"vit_{tag}"


def load_vision_encoder(cfg: VisionConfig = VisionConfig(), say: Callable[[str], None] = print) -> VisionEncoder:
    """The encoder pretrained with `cfg`, from the cache, filled from the shipped copy if there is one (core/paths.py
    SHIPPED_PRETRAINED), else trained now (and `say` so). It comes back frozen (requires_grad off, eval mode):
    the modules that read it train around it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    folder = cache_dir(cfg)
    weights = folder / "encoder.safetensors"
    if not weights.exists() and not copy_shipped(weights):
        say(f"no pretrained vision encoder for this config; pretraining one on {cfg.pretrain_scenes} shape "
            f"scenes ({cfg.pretrain_steps} steps) -> {folder}")
        encoder, heads = pretrain(cfg)
        accuracy = attribute_accuracy(encoder, heads, make_scenes(500, "pretrain", cfg.seed + 1))
        atomic_write_text(folder / "pretraining.json", json.dumps({"config": dataclasses.asdict(cfg),
                                                                   "attribute_accuracy": accuracy}, indent=2))
        blob = save({k: v.contiguous() for k, v in encoder.state_dict().items()})
        atomic_write(weights, lambda f: f.write(blob))
    encoder = VisionEncoder(cfg)
    try:
        encoder.load_state_dict(load_file(str(weights)))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise unreadable_pretrained(weights, "vision encoder", exc) from None
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()
