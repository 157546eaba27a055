"""LoRA and QLoRA for the core transformer: low-rank adapters on frozen (optionally NF4) weights.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), for a frozen W0 (d x k):
    h   = W0 x + (alpha / r) B A x            A (r x k), B (d x r), r << min(d, k)      (eq. 3, §4.1)
    A ~ Kaiming-uniform(a = sqrt(5)), B = 0   so (alpha / r) B A = 0 and training starts at W0
    W'  = W0 + (alpha / r) B A                merged for inference: no extra latency    (§4.1)
Only A and B train: r (d + k) values per adapted matrix instead of d k. The alpha / r factor makes a
change of r need no new learning rate (§4.1: tuning alpha acts much like tuning the learning rate).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3) stores W0 in 4 bits:
    c_b     = absmax(W0 in block b)                       one fp32 scale per block of 64 values
    q_i     = argmin_j | w_i / c_b - NF4_j |              the nearest of the 16 NF4 levels, 4 bits
    W0     ~= NF4[q] * doubleDequant(c)                    dequantised on the fly, at every forward
    Y       = X doubleDequant(c1, c2, W_NF4) + X L1 L2     LoRA (L1 L2 = (alpha / r) A^T B^T) on top
NF4 puts its levels at quantiles of N(0, 1), so normally distributed weights use each about equally
often, and keeps an exact 0 (asymmetric halves: 8 positive and 7 negative levels besides 0).
Double quantisation (§3) quantises the fp32 scales c themselves: 32 / 64 = 0.5 bits per parameter
become 8 / 64 + 32 / (64 * 256) = 0.127, so NF4 + DQ costs 4.127 bits per parameter.

Engineering choices:
- Targets are the attribute names of core/nn/model.py's projections: attention wq, wk, wv, wo
  (GQA/MHA/MQA and MoBA; MLA has wq, wkv_down, wk_up, wv_up, wo; NSA keeps its per-branch wk/wv in
  ModuleDicts, under the branch names) and the SwiGLU FFN w1 (gate), w3 (up), w2 (down), also inside
  every MoE expert. The default adapts all seven, as QLoRA does (§4: adapting every linear layer is
  what matches full fine-tuning; the LoRA paper's GPT-3 runs adapted only Wq and Wv). The tied
  LM head / embedding and the MoE router are never adapted.
- Double quantisation: the paper uses 8-bit floats with blocks of 256 for the scales; bitsandbytes
  uses its dynamic 8-bit code after subtracting the scales' mean. We subtract the mean too (as both
  do: the scales are all positive, so an unshifted symmetric code would waste its sign bit) and then
  use plain int8 absmax in blocks of 256 (one fp32 step per block): the shifted scales fill a narrow
  range evenly, where 255 linear levels are finer than FP8's 3 mantissa bits. Measured on the
  absmax scales of 2^20 N(0, 1) weights (seed 0): relative scale error at most 0.46% (mean 0.12%)
  with int8, 3.5% (mean 0.29%) with float8_e4m3 on the same mean-shifted blocks; the weights' MSE
  moves from 0.008458 (fp32 scales, 4.5 bits per parameter) to 0.008459 (4.127 bits).
- Rounding to the nearest level is `bucketize` on the midpoints between levels: one pass, no
  (n x 16) distance matrix.
- The quantised layer computes in fp32 (the paper: bf16 on a GPU); this code targets CPUs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.artifacts import atomic_write
from core.errors import CorruptArtifact, UserError

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
FFN_TARGETS = ("w1", "w2", "w3")
ADAPTER_NAMES = ("lora_A", "lora_B")

# The 16 NF4 levels: QLoRA (Dettmers et al. 2023), Appendix E, as bitsandbytes ships them
# (bitsandbytes/functional.py, get_4bit_type("nf4"); bitsandbytes-foundation/bitsandbytes @ 01327aa0).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# The comparison: uniform symmetric int4, the levels k / 7 for k = -7..7 (15 of the 16 codes, so that
# 0 is exact and the range is symmetric, as in bitsandbytes' "int4")
INT4_CODE = torch.arange(-7, 8, dtype=torch.float32) / 7
BLOCK = 64
"""weights per absmax block (QLoRA's choice)"""
SCALE_BLOCK = 256
"""absmax scales per block of the double quantisation (QLoRA's choice)"""


# ------------------------------------------------------------------------------ quantisation

def _blocks(flat: Tensor, size: int) -> Tensor:
    """flat (n,) -> (ceil(n / size), size), the last block padded with zeros (they change no absmax)."""
    return F.pad(flat, (0, -flat.numel() % size)).view(-1, size)


def _pack(codes: Tensor) -> Tensor:
    """uint8 codes < 16 -> two per byte, the first in the low nibble."""
    codes = F.pad(codes, (0, codes.numel() % 2))
    return codes[0::2] | (codes[1::2] << 4)


def _unpack(packed: Tensor, n: int) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten()[:n]


@dataclass
class QuantizedScales:
    """The fp32 absmax scales c, double-quantised: c ~= codes * step[block] + mean."""
    codes: Tensor  # int8 (n_scales,)
    step: Tensor  # fp32 (ceil(n_scales / SCALE_BLOCK),)
    mean: Tensor  # fp32 ()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.step.nbytes + self.mean.nbytes

    def dequantize(self) -> Tensor:
        shifted = _blocks(self.codes.float(), SCALE_BLOCK) * self.step[:, None]
        return shifted.flatten()[:self.codes.numel()] + self.mean


def quantize_scales(scales: Tensor) -> QuantizedScales:
    """Symmetric int8 absmax quantisation of scales - mean(scales), in blocks of SCALE_BLOCK."""
    mean = scales.mean()
    blocks = _blocks(scales - mean, SCALE_BLOCK)
    step = blocks.abs().amax(dim=1) / 127
    codes = torch.round(blocks / torch.where(step > 0, step, 1.0)[:, None]).to(torch.int8)
    return QuantizedScales(codes.flatten()[:scales.numel()], step, mean)


@dataclass
class Quantized4Bit:
    """A tensor in 4-bit codes: per block of BLOCK values an absmax scale (fp32, or double-quantised),
    per value the index of the nearest level of `code_book` (NF4_CODE or INT4_CODE), two per byte."""
    codes: Tensor  # uint8 (ceil(n / 2),)
    absmax: Tensor | QuantizedScales  # (ceil(n / BLOCK),)
    code_book: Tensor  # the shared table of levels, not stored per tensor (so not in nbytes)
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: the packed codes and the (double-quantised) scales."""
        return self.codes.nbytes + self.absmax.nbytes

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def dequantize(self) -> Tensor:
        n = self.shape.numel()
        absmax = self.absmax.dequantize() if isinstance(self.absmax, QuantizedScales) else self.absmax
        values = self.code_book.to(self.codes.device)[_unpack(self.codes, n).long()]
        return (_blocks(values, BLOCK) * absmax[:, None]).flatten()[:n].view(self.shape)


def _quantize(w: Tensor, code_book: Tensor, double_quant: bool) -> Quantized4Bit:
    blocks = _blocks(w.detach().float().flatten(), BLOCK)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]; a zero block stays 0
    code_book = code_book.to(w.device)
    midpoints = (code_book[1:] + code_book[:-1]) / 2
    codes = torch.bucketize(normed, midpoints).to(torch.uint8).flatten()[:w.numel()]
    return Quantized4Bit(_pack(codes), quantize_scales(absmax) if double_quant else absmax, code_book, w.shape)


def quantize_nf4(w: Tensor, double_quant: bool = True) -> Quantized4Bit:
    """QLoRA's NF4: block-wise absmax (64), nearest NF4 level, scales double-quantised by default."""
    return _quantize(w, NF4_CODE, double_quant)


def quantize_int4(w: Tensor) -> Quantized4Bit:
    """Uniform symmetric int4 with the same blocks and fp32 scales: NF4's baseline."""
    return _quantize(w, INT4_CODE, double_quant=False)


# --------------------------------------------------------------------------------- the layers

class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is kept in NF4 with double-quantised scales (as buffers,
    so .to(device) and state_dict carry them) and dequantised at every forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight)
        self.shape = q.shape
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax_codes", q.absmax.codes)
        self.register_buffer("absmax_step", q.absmax.step)
        self.register_buffer("absmax_mean", q.absmax.mean)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> Quantized4Bit:
        scales = QuantizedScales(self.absmax_codes, self.absmax_step, self.absmax_mean)
        return Quantized4Bit(self.codes, scales, NF4_CODE, self.shape)

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (out, in), a new fp32 tensor at every access."""
        return self.quantized.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) B A dropout(x), the base frozen (an nn.Linear, or an NF4Linear for QLoRA)."""

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be at least 1")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        ref = base.weight  # for the device and dtype (fp32 for a quantised base)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=ref.device, dtype=ref.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=ref.device, dtype=ref.dtype))
        # the reference implementation's init (microsoft/LoRA loralib; the paper says "random
        # Gaussian" for A): nn.Linear's own default, bound 1 / sqrt(in_features)
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:  # the adapter is inside base.weight already
            return y
        # B A x as two thin matmuls, never the (out x in) product; with B = 0 this adds exact zeros
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A, in place; the forward then skips the adapter."""
        if isinstance(self.base, NF4Linear):
            raise TypeError("an NF4 weight cannot absorb the adapter without requantising; "
                            "merge_lora(model) writes dequantised + adapter weights instead")
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A: W as before merge() up to the rounding of W + dW (one ulp at most)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


# ------------------------------------------------------------------------- the whole model

def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = ATTENTION_TARGETS + FFN_TARGETS, quantize: bool = False) -> nn.Module:
    """Wrap every nn.Linear whose attribute name is in `targets` in a LoRALinear (on an NF4 copy of
    its weight with quantize=True: QLoRA) and freeze every other parameter. In place; returns model."""
    matched = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]
    if not matched:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} in the model")
    model.requires_grad_(False)
    for name in matched:
        parent, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        base = NF4Linear(linear) if quantize else linear
        setattr(model.get_submodule(parent), attr, LoRALinear(base, r, alpha, dropout))
    return model


def trainable_share(model: nn.Module) -> float:
    """Trainable parameters / all parameters, an NF4 weight counted by its number of values."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.shape.numel() for m in model.modules() if isinstance(m, NF4Linear))
    return trainable / total


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + (alpha / r) B A (an NF4 weight
    dequantised first), frozen like the rest: the architecture is the base's again, and its
    state_dict loads into a fresh model of the same config. In place; returns model."""
    for name, layer in lora_layers(model).items():
        weight = layer.base.weight if layer.merged else layer.base.weight + layer.delta_weight()
        bias = layer.base.bias
        linear = nn.Linear(layer.base.in_features, layer.base.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, linear.requires_grad_(False))
    return model


def _adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.rpartition(".")[2] in ADAPTER_NAMES}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (lora_A, lora_B of every LoRALinear), under their model names."""
    return {name: p.detach() for name, p in _adapter_params(model).items()}


def _alphas(model: nn.Module) -> dict[str, float]:
    return {name: layer.alpha for name, layer in lora_layers(model).items()}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """The adapter alone as safetensors (alpha of each layer in the metadata: r is in the shapes,
    but the same A and B under another alpha would compute something else). Atomic."""
    from safetensors.torch import save

    tensors = {name: t.cpu().contiguous() for name, t in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    data = save(tensors, metadata={"format": "pt", "lora_alpha": json.dumps(_alphas(model), sort_keys=True)})
    return atomic_write(path, lambda f: f.write(data))


def _first(items, n: int = 3) -> str:
    """The first n of `items` (sorted) and how many more: an error message stays one readable line."""
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the adapter `save_adapter` wrote into a model that has the same LoRA layers (add_lora
    with the same targets and r); a file that does not fit is refused, naming it. Returns model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        alphas = json.loads(metadata.get("lora_alpha", "null"))
    except (OSError, SafetensorError, ValueError) as exc:
        raise CorruptArtifact(f"{path}: not a readable adapter file ({exc})") from None
    params = _adapter_params(model)
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    reshaped = [f"{name} is {tuple(t.shape)}, the model's {tuple(params[name].shape)}"
                for name, t in tensors.items() if name in params and t.shape != params[name].shape]
    problems = [f"{what} {_first(names)}" for what, names in
                (("missing", missing), ("unexpected", unexpected), ("shapes differ:", reshaped)) if names]
    if not problems and alphas != _alphas(model):
        problems.append(f"lora_alpha {alphas} differs from the model's {_alphas(model)}")
    if problems:
        raise UserError(f"{path}: the adapter does not fit this model: {'; '.join(problems)}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("unmerge the LoRA layers before loading another adapter into them")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return model
