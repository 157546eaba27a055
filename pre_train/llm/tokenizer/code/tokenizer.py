"""Two BPE tokenizers trained on the same corpus: our byte-level BPE from scratch (code/bpe.py) and
sentencepiece's BPE (core/data/tokenizer.py, the tokenizer every later LLM module loads).

Both start from bytes and merge the most frequent adjacent pair (Sennrich et al. 2016):
    (a, b)* = argmax count(a, b);  vocab <- vocab + {ab};  every "a b" in the corpus -> "ab"
and are compared on held-out stories by
    compression   bytes/token = sum_d |utf8(d)| / sum_d |encode(d)|   (1.0 for a byte-level model)
    vocab use     |{ids that occur in encode(val)}| / vocab_size
    round trip    decode(encode(d)) == d for every validation document d
    boundaries    Jaccard(token boundary byte offsets of the two segmentations)
Training time is measured but kept out of metrics.json (it is not reproducible); it goes to
timing.csv, the figure and the README.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Sequence

import matplotlib.pyplot as plt
import numpy as np

from core.artifacts import UserError, atomic_write, atomic_write_text
from core.config import InsideWorkdir, Length, Range, Seed
from core.data.corpus import load_stories, split_documents
from core.data.tokenizer import MODEL_FILE, SPECIAL_TOKENS, Tokenizer, train_sentencepiece
from core.paths import workdir

from .bpe import ByteBPE


@dataclass
class Config:
    source: Literal["generated", "tinystories"] = "generated"
    """corpus: the offline story generator, or the real TinyStories (downloads ~19 MB once)"""
    n_stories: Annotated[int, Range(ge=2, le=100_000)] = 6000
    """stories in the corpus (~620 bytes each for the generator)"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.05
    """fraction of whole stories held out for the measurements"""
    vocab_size: Annotated[int, Range(ge=384, le=65536)] = 4096
    """vocabulary of both tokenizers (bytes, special tokens and merged tokens together)"""
    vocab_sweep: Annotated[tuple[int, ...], Range(ge=384, le=65536), Length(1, 16)] = (512, 1024, 2048)
    """extra vocabulary sizes for the compression-vs-vocabulary curve"""
    n_samples: Annotated[int, Range(ge=0, le=64)] = 4
    """validation sentences shown segmented by both tokenizers"""
    cache_dir: Annotated[str, InsideWorkdir()] = "output/datasets"
    """where a downloaded corpus is cached (relative to the work dir)"""
    seed: Seed = 0
    """seed of the generated corpus and of the train/val split"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        found = []
        if max(1, round(self.val_fraction * self.n_stories)) >= self.n_stories:  # as split_documents counts
            found.append(f"val_fraction={self.val_fraction} of n_stories={self.n_stories} leaves no training story")
        if min(self.vocab_sweep) >= self.vocab_size:
            found.append(f"vocab_sweep={','.join(map(str, self.vocab_sweep))} needs a size below vocab_size="
                         f"{self.vocab_size}: the compression check compares against the smallest")
        return found


TRICKY_SAMPLE = "<|user|>Is café 2024 ok?  Yes!<|end|><eos>"
"""unseen characters, digits, double spaces and special tokens in one line"""


def bytes_per_token(docs: Sequence[str], encode: Callable[[str], list[int]]) -> float:
    return sum(len(d.encode("utf-8")) for d in docs) / sum(len(encode(d)) for d in docs)


def vocab_use(docs: Sequence[str], encode: Callable[[str], list[int]], vocab_size: int) -> float:
    return len({i for d in docs for i in encode(d)}) / vocab_size


def roundtrip_fraction(docs: Sequence[str], tok: ByteBPE | Tokenizer) -> float:
    return float(np.mean([tok.decode(tok.encode(d)) == d for d in docs]))


def special_single_fraction(tok: ByteBPE | Tokenizer) -> float:
    """A special token must be one id alone and inside text, and that id must decode to itself."""
    def single(special: str) -> bool:
        alone = tok.encode(special)
        return (len(alone) == 1 and tok.encode(f"Hi{special}there").count(alone[0]) == 1
                and tok.decode(alone) == special)
    return float(np.mean([single(s) for s in SPECIAL_TOKENS]))


def piece_bytes(tok: ByteBPE | Tokenizer, text: str) -> list[bytes]:
    """Each token as the bytes of `text` it covers (sentencepiece: "\u2581" is a space, <0xNN> a byte)."""
    if isinstance(tok, ByteBPE):
        return tok.pieces(text)
    out = []
    for piece in tok.pieces(text):
        is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        out.append(bytes([int(piece[3:5], 16)]) if is_byte else piece.replace("\u2581", " ").encode("utf-8"))
    return out


def boundaries(pieces: list[bytes]) -> set[int]:
    return set(np.cumsum([len(p) for p in pieces]).tolist())


def show(pieces: list[bytes]) -> str:
    return "|".join(p.decode("utf-8", errors="backslashreplace").replace("\n", "\\n") for p in pieces)


def hardest_sentence(doc: str, bpe: ByteBPE) -> str:
    """The sentence of `doc` (30+ characters) with the fewest bytes per token: where the vocabulary
    runs out (rare names)."""
    sentences = [s for line in doc.split("\n") for s in re.split(r"(?<=[.!?\"]) ", line) if len(s) >= 30] or [doc]
    return min(sentences, key=lambda s: (len(s.encode()) / len(bpe.encode(s)), s))


def train_both(train: list[str], vocab_size: int) -> tuple[ByteBPE, Tokenizer, float, float]:
    t0 = time.perf_counter()
    bpe = ByteBPE.train(train, vocab_size)
    t1 = time.perf_counter()
    try:
        spm = Tokenizer(train_sentencepiece(train, vocab_size))
    except RuntimeError as exc:  # the limits depend on the corpus: sentencepiece finds them as it reads it
        high = re.search(r"value <= (\d+)", str(exc))
        low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if not (high or low):
            raise
        raise UserError(f"sentencepiece can make {f'at most {high[1]}' if high else f'no fewer than {low[1]}'} "
                        f"pieces from {len(train)} training {'story' if len(train) == 1 else 'stories'}, not {vocab_size}: "
                        f"change vocab_size, vocab_sweep or n_stories") from None
    return bpe, spm, t1 - t0, time.perf_counter() - t1


def run(cfg: Config, ctx) -> dict[str, float]:
    docs = load_stories(cfg.source, cfg.n_stories, cfg.seed, workdir() / cfg.cache_dir)
    train, val = split_documents(docs, cfg.val_fraction, cfg.seed)
    ctx.say(f"corpus: {len(train)} train / {len(val)} val stories, "
            f"{sum(len(d.encode()) for d in train) / 1e6:.2f} MB of training text")

    # --- compression vs vocabulary size; the pair at cfg.vocab_size is kept and measured in full ----
    sizes = sorted({*cfg.vocab_sweep, cfg.vocab_size})
    curve: dict[str, list[float]] = {"bpe": [], "spm": []}
    seconds: dict[str, list[float]] = {"bpe": [], "spm": []}
    for size in ctx.track(sizes, "training tokenizers", total=len(sizes)):
        bpe, spm, bpe_s, spm_s = train_both(train, size)
        for name, tok, sec in (("bpe", bpe, bpe_s), ("spm", spm, spm_s)):
            curve[name].append(bytes_per_token(val, tok.encode))
            seconds[name].append(sec)
            ctx.log("compression", tokenizer=name, vocab_size=size, bytes_per_token=curve[name][-1])
            ctx.log("timing", tokenizer=name, vocab_size=size, train_seconds=round(sec, 3))
        if size == cfg.vocab_size:
            kept_bpe, kept_spm = bpe, spm
    bpe, spm = kept_bpe, kept_spm
    bpe.save(ctx.models_dir / "bpe.json")
    atomic_write(ctx.models_dir / MODEL_FILE, lambda f: f.write(spm.sp.serialized_model_proto()))

    # --- side-by-side segmentations ---------------------------------------------------------------
    samples = [hardest_sentence(d, bpe) for d in val[:cfg.n_samples]] + [TRICKY_SAMPLE]
    lines = [f"# Segmentations at vocab {cfg.vocab_size} (validation sentences)\n",
             "`|` separates tokens; `\\n` is a newline. bpe = from scratch, spm = sentencepiece.\n"]
    agreement = []
    for text in samples:
        b, s = piece_bytes(bpe, text), piece_bytes(spm, text)
        lines += ["```", f"text: {text}", f"bpe ({len(b):2d}): {show(b)}", f"spm ({len(s):2d}): {show(s)}", "```\n"]
    atomic_write_text(ctx.path("segmentations.md"), "\n".join(lines))
    for doc in val:
        b, s = boundaries(piece_bytes(bpe, doc)), boundaries(piece_bytes(spm, doc))
        agreement.append(len(b & s) / len(b | s))  # Jaccard of the token boundary offsets

    _plot(ctx, sizes, curve, seconds, cfg.vocab_size, [bpe.encode(d) for d in val], [spm.encode(d) for d in val])
    metrics = {
        "bpe_bytes_per_token": curve["bpe"][sizes.index(cfg.vocab_size)],
        "spm_bytes_per_token": curve["spm"][sizes.index(cfg.vocab_size)],
        "bpe_vocab_use": vocab_use(val, bpe.encode, bpe.vocab_size),
        "spm_vocab_use": vocab_use(val, spm.encode, spm.vocab_size),
        "bpe_vocab_size": bpe.vocab_size,
        "spm_vocab_size": spm.vocab_size,
        "bpe_roundtrip_fraction": roundtrip_fraction(val, bpe),
        "spm_roundtrip_fraction": roundtrip_fraction(val, spm),
        "bpe_special_single_fraction": special_single_fraction(bpe),
        "spm_special_single_fraction": special_single_fraction(spm),
        "boundary_agreement": float(np.mean(agreement)),
        "smallest_vocab_bpe_bytes_per_token": curve["bpe"][0],
    }
    metrics["compression_ratio_bpe_to_spm"] = metrics["bpe_bytes_per_token"] / metrics["spm_bytes_per_token"]
    return metrics


def _plot(ctx, sizes, curve, seconds, vocab_size, bpe_ids, spm_ids) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, label in (("bpe", "from-scratch byte BPE"), ("spm", "sentencepiece BPE")):
        axes[0].plot(sizes, curve[name], marker="o", label=label)
        axes[1].plot(sizes, seconds[name], marker="o", label=label)
    for ids, label in ((bpe_ids, "from-scratch byte BPE"), (spm_ids, "sentencepiece BPE")):
        counts = np.sort(np.bincount(np.concatenate([np.asarray(x) for x in ids])))[::-1]
        counts = counts[counts > 0]
        axes[2].loglog(np.arange(1, len(counts) + 1), counts, label=label)
    axes[0].axhline(1.0, color="gray", ls="--", label="raw bytes")
    axes[0].set(xlabel="vocab size", ylabel="bytes per token (val)", title="compression")
    axes[1].set(xlabel="vocab size", ylabel="seconds", title="training time")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
    axes[2].set(xlabel="rank", ylabel="count on val", title=f"token frequencies at vocab {vocab_size}")
    for ax in axes:
        ax.legend()
    ctx.save_figure(fig, "compression.png")
