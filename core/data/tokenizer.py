"""The tokenizer every LLM module uses: a sentencepiece BPE model (Kudo & Richardson 2018) with byte
fallback and our special tokens, trained by the `tokenizer` module (pre_train/llm/tokenizer).

    tok = load_tokenizer()            # the latest passing tokenizer run, else one trained on demand
    ids = tok.encode("Once upon a time")
    tok.decode(ids), tok.eos_id, tok.special_ids["<|user|>"], tok.vocab_size

Special tokens are sentencepiece "user defined symbols": each is one id, matched in raw text before
anything else, and never split or produced by a merge. Settings chosen for exact round trips:
identity normalisation (no NFKC), whitespace kept as is, no dummy space prefix, and byte fallback
(a character outside the vocabulary becomes its UTF-8 bytes, never <unk>).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterable, Sequence

import sentencepiece as spm

from core.artifacts import UserError, atomic_write
from core.data.corpus import generate_stories
from core.paths import workdir
from core.run_context import MODEL_DIR, latest_run, read_run_index

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
"""document boundaries, padding, and the chat-template role markers SFT needs"""
MODULE = "tokenizer"
MODEL_FILE = "spm.model"
SAVED_FILE = "tokenizer.model"
DEFAULT_VOCAB = 4096
ON_DEMAND_STORIES = 3000
"""generated stories a tokenizer trained on demand sees (~2 MB, a second or two)"""


def train_sentencepiece(docs: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE sentencepiece model on `docs` (each line of a document is one sentence) and return
    the serialised model (write it with core.artifacts.atomic_write, load it with Tokenizer)."""
    lines = (line for doc in docs for line in doc.split("\n") if line)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
        user_defined_symbols=list(SPECIAL_TOKENS), byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,  # ours are the user symbols
        num_threads=1, minloglevel=2)
    return model.getvalue()


class Tokenizer:
    """A thin wrapper over a sentencepiece model: encode / decode and the special ids."""

    def __init__(self, model: str | Path | bytes):
        """`model`: a .model file or the serialised model itself."""
        self.sp = (spm.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
                   else spm.SentencePieceProcessor(model_file=str(model)))
        self.special_ids = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = (self.special_ids[t] for t in ("<bos>", "<eos>", "<pad>"))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str | Path) -> Path:
        """Write the model as <directory>/tokenizer.model (atomically), beside a model's weights, so a
        model always travels with the tokenizer it was trained with."""
        path = Path(directory) / SAVED_FILE
        proto = self.sp.serialized_model_proto()
        atomic_write(path, lambda f: f.write(proto))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer `save` wrote; a missing or corrupt file is a UserError naming it."""
        path = Path(directory) / SAVED_FILE
        if not path.is_file():
            raise UserError(f"{path}: missing (a model folder holds its tokenizer beside the weights)")
        try:
            return cls(path.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{path}: not a readable sentencepiece model ({exc})") from None

    def pieces(self, text: str) -> list[str]:
        """The pieces as sentencepiece spells them: "\u2581" for a space, "<0xNN>" for a fallback byte."""
        return self.sp.encode(text, out_type=str)


def trained_model_path(preset: str, vocab_size: int | None = None) -> Path | None:
    """The sentencepiece model of the latest passing tokenizer run at `preset` (with `vocab_size`
    if given); it lives in the run's folder, output/<preset>/model/."""
    run = latest_run(MODULE, preset)
    if run is None or run["status"] != "passed":
        return None
    if vocab_size is not None and run["config"]["vocab_size"] != vocab_size:
        return None
    path = workdir() / read_run_index()[MODULE][preset]["out_dir"] / MODEL_DIR / MODEL_FILE
    return path if path.exists() else None


def load_tokenizer(vocab_size: int | None = None, say: Callable[[str], None] = print) -> Tokenizer:
    """The tokenizer module's latest model (default preset first, then toy); if there is none, one
    trained now on the generated corpus and cached under output/tokenizer_cache/ (and `say` so)."""
    for preset in ("default", "toy"):
        path = trained_model_path(preset, vocab_size)
        if path is not None:
            return Tokenizer(path)
    vocab = vocab_size or DEFAULT_VOCAB
    path = workdir() / "output" / "tokenizer_cache" / f"spm_{vocab}.model"
    if not path.exists():
        say(f"no tokenizer run with vocab {vocab} found (python run.py --module tokenizer); training a "
            f"sentencepiece BPE on {ON_DEMAND_STORIES} generated stories -> {path}")
        model = train_sentencepiece(generate_stories(ON_DEMAND_STORIES, seed=0), vocab)
        atomic_write(path, lambda f: f.write(model))
    return Tokenizer(path)
