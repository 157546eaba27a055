"""The text every LLM module trains on, offline first.

Default source: a deterministic generator of TinyStories-like stories (Eldan & Li 2023 wrote theirs
with GPT-3.5/4 from a ~1500-word vocabulary of a 3-4 year old). Ours are built from templates over a
small controlled vocabulary, with the regularities a tiny LM can learn:
  - a hero and a friend whose names stay the same through the story (in-context copying); a third of
    the names are made of random syllables, so they cannot be memorised, only copied;
  - pronouns that agree with each character (she / he / it);
  - cause -> effect sentences ("The wind was strong, so the kite flew into a tree.") and a problem
    that the friend solves with a matching action;
  - dialogue lines in quotes and a closing moral.
Same (n_stories, seed) -> the same stories, byte for byte.

Optional source: the real TinyStories text, downloaded (resumable, verified) and cached; never used by
tests or presets, so nothing here needs the network unless a user asks for it.

Token storage: documents are packed into one flat uint16 file per split, each document followed by
the eos id, and read back memory-mapped as random windows of `block_size + 1` tokens (nanoGPT style).
"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from core.artifacts import UserError, atomic_write

# --- the controlled vocabulary ---------------------------------------------------------------------
GIRLS = ("Lily", "Mia", "Emma", "Sara", "Anna", "Zoe", "Ruby", "Ella", "Lucy", "Amy", "Sue", "Kim")
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Tim", "Jack", "Finn", "Noah", "Dan", "Bob", "Joe")
PET_NAMES = ("Spot", "Kitty", "Fluffy", "Buddy", "Coco", "Pip", "Sunny", "Bella", "Rex", "Tweety")
ANIMALS = ("dog", "cat", "bunny", "bird", "bear", "frog", "duck", "mouse", "fox", "owl", "pig", "lion")
ADJECTIVES = ("little", "happy", "brave", "kind", "shy", "curious", "small", "silly", "clever", "gentle")
PLACES = ("the park", "the forest", "the beach", "the garden", "the farm", "the lake", "the big hill",
          "the town", "the school", "the zoo", "the river", "the meadow")
OBJECTS = ("ball", "kite", "hat", "toy car", "book", "balloon", "stone", "cup", "teddy bear", "drum",
           "boat", "flower", "shell", "crayon", "blanket", "apple")
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "shiny", "striped")
NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven")
FOODS = ("cookies", "apples", "cake", "soup", "bread", "berries", "pie", "candy")
SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
FEELINGS = ("happy", "proud", "glad", "thankful")

# (problem caused by an event, what the friend does about it): cause -> effect, then a fix that fits it
PROBLEMS = (
    ("The wind was very strong, so the {obj} flew up into a tall tree.",
     "{F} found a long stick and pushed the {obj} down from the tree."),
    ("{H} ran too fast, so {hs} tripped and the {obj} rolled into the river.",
     "{F} held a net and caught the {obj} before it went away."),
    ("It started to rain, so the {obj} got very wet and dirty.",
     "{F} brought a soft towel, and together they dried the {obj}."),
    ("A big dog barked loudly, so {H} got scared and dropped the {obj} in the mud.",
     "{F} picked up the {obj} and washed it in the water."),
    ("{H} forgot the {obj} under a bench, so it was lost when {hs} came back.",
     "{F} looked under every bench and found the {obj}."),
    ("The {obj} was too high on the shelf, so {H} could not reach it.",
     "{F} brought a little chair, and {H} climbed up and got the {obj}."),
    ("{H} stepped on the {obj} by mistake, so it broke into two pieces.",
     "{F} found some glue and fixed the {obj}."),
)
MORALS = (
    "From that day on, {H} and {F} were best friends.",
    "{H} learned that it is good to ask for help.",
    "{H} learned to be more careful with {hp} things.",
    "{H} and {F} learned that sharing makes everyone happy.",
    "{H} learned that a good friend is the best gift.",
)
OPENINGS = ("Once upon a time, there was", "One day, there was", "Long ago, there was", "There was once")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _syllable_name(rng: np.random.Generator) -> str:
    return "".join(_pick(rng, SYLLABLES) for _ in range(int(rng.integers(2, 4)))).capitalize()


def _character(rng: np.random.Generator) -> dict[str, str]:
    """A name with its noun and pronouns; a third of the names are new syllable names (only copyable)."""
    kind = int(rng.integers(3))
    noun, (subject, obj, possessive), names = (("girl", ("she", "her", "her"), GIRLS),
                                               ("boy", ("he", "him", "his"), BOYS),
                                               (_pick(rng, ANIMALS), ("it", "it", "its"), PET_NAMES))[kind]
    name = _syllable_name(rng) if rng.random() < 1 / 3 else _pick(rng, names)
    return {"name": name, "noun": noun, "s": subject, "o": obj, "p": possessive}


def generate_story(rng: np.random.Generator) -> str:
    hero, friend = _character(rng), _character(rng)
    while friend["name"] == hero["name"]:
        friend = _character(rng)
    obj = f"{_pick(rng, COLORS)} {_pick(rng, OBJECTS)}"
    place = _pick(rng, PLACES)
    problem, fix = PROBLEMS[int(rng.integers(len(PROBLEMS)))]
    slots = {"H": hero["name"], "hs": hero["s"], "hp": hero["p"], "F": friend["name"], "obj": obj}
    age = int(rng.integers(3, 10))
    count = _pick(rng, NUMBER_WORDS)
    intro = [f"{_pick(rng, OPENINGS)} a {_pick(rng, ADJECTIVES)} {hero['noun']} named {hero['name']}."]
    if hero["noun"] in ("girl", "boy"):
        intro.append(f"{hero['s'].capitalize()} was {age} years old.")
    intro.append(f"{hero['name']} loved to play with {hero['p']} {obj} at {place}.")
    intro.append(f"One {_pick(rng, ('sunny', 'windy', 'cold', 'warm', 'cloudy'))} day, {hero['name']} "
                 f"went to {place} with {hero['p']} friend {friend['name']}, a {_pick(rng, ADJECTIVES)} "
                 f"{friend['noun']}.")
    middle = [problem.format(**slots),
              f"{hero['name']} felt very sad and began to cry.",
              f"\"{friend['name']}, can you help me?\" asked {hero['name']}.",
              f"\"Yes, I will help you!\" said {friend['name']}.",
              fix.format(**slots)]
    feeling = _pick(rng, FEELINGS)
    end = [f"{hero['name']} was so {feeling} that {hero['s']} gave {friend['name']} a big hug.",
           f"\"Thank you, {friend['name']}!\" said {hero['name']}.",
           f"Then they ate {count} {_pick(rng, FOODS)} and played until the sun went down.",
           _pick(rng, MORALS).format(**slots)]
    return "\n".join(" ".join(paragraph) for paragraph in (intro, middle, end))


def generate_stories(n_stories: int, seed: int) -> list[str]:
    """`n_stories` stories, a pure function of (n_stories, seed): story i depends only on (seed, i)."""
    return [generate_story(np.random.default_rng([seed, i])) for i in range(n_stories)]


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by whole document (no story is in both splits), with a seeded permutation."""
    order = np.random.default_rng([seed, 1]).permutation(len(docs))
    n_val = max(1, round(val_fraction * len(docs)))
    val_idx = set(order[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])


# --- the real TinyStories, on request --------------------------------------------------------------
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
"""the validation file (~19 MB, ~22k stories) is plenty for the models here; the train file is 1.9 GB"""
TINYSTORIES_SEPARATOR = "<|endoftext|>"
MIN_TINYSTORIES = 1000
"""a downloaded file that splits into fewer stories than this is not the dataset"""
CHUNK_BYTES = 1 << 20


class DownloadError(UserError):
    """The dataset could not be fetched or failed verification; the message says what to do."""


def download_tinystories(cache_dir: str | Path, url: str = TINYSTORIES_URL, timeout: float = 30.0) -> Path:
    """Fetch `url` into `cache_dir` once. A partial download (`<name>.part`) is resumed with an HTTP
    Range request; the finished file is checked (size against Content-Length, UTF-8, enough stories)
    before it is renamed into place, so a cached file is always a verified one."""
    cache_dir = Path(cache_dir)
    target = cache_dir / url.rsplit("/", 1)[-1]
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = response.status == 206  # 200 means the server ignored Range: start over
            length = response.headers.get("Content-Length")
            expected = int(length) + (have if resumed else 0) if length is not None else None
            with open(partial, "ab" if resumed else "wb") as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
    except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        resume = f" The partial download {partial} is resumed on the next try." if partial.exists() else ""
        raise DownloadError(f"could not download {url} ({reason}). This needs the internet; without it use "
                            f"the built-in generator (source=generated, the default).{resume}") from None
    size = partial.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(f"{partial}: got {size} bytes, expected {expected}; run again to resume")
    _verify_stories(partial)
    partial.replace(target)
    return target


def _verify_stories(path: Path) -> None:
    try:
        n = len(split_tinystories(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError as exc:
        path.unlink()
        raise DownloadError(f"{path} is not UTF-8 text ({exc}); deleted it, run again") from None
    if n < MIN_TINYSTORIES:
        path.unlink()
        raise DownloadError(f"{path} holds {n} stories, not the TinyStories file; deleted it, run again")


def split_tinystories(text: str) -> list[str]:
    return [s.strip() for s in text.split(TINYSTORIES_SEPARATOR) if s.strip()]


def load_stories(source: str, n_stories: int, seed: int, cache_dir: str | Path) -> list[str]:
    """`n_stories` documents from "generated" (offline) or "tinystories" (downloaded, first n)."""
    if source == "generated":
        return generate_stories(n_stories, seed)
    if source == "tinystories":
        return split_tinystories(download_tinystories(cache_dir).read_text(encoding="utf-8"))[:n_stories]
    raise ValueError(f"unknown corpus source {source!r}; known: generated, tinystories")


# --- packed token bins -----------------------------------------------------------------------------
TOKEN_DTYPE = np.uint16


def pack_documents(docs_ids: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate tokenised documents, each followed by `eos_id`, so the model sees where stories end."""
    return np.fromiter((t for ids in docs_ids for t in (*ids, eos_id)), dtype=np.int64)


def write_token_bin(ids: Sequence[int] | np.ndarray, path: str | Path) -> Path:
    """Write token ids as raw little-endian uint16 (atomically); ids must fit in 16 bits."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"token ids must be in [0, 65535] to be stored as uint16, got [{ids.min()}, {ids.max()}]")
    data = ids.astype("<u2").tobytes()
    return atomic_write(path, lambda f: f.write(data))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -sum_w p(w) ln p(w) (nats) of the token frequencies: the loss of a model that ignores the
    context, so a language model that learned anything from the context must beat it."""
    p = np.bincount(tokens, minlength=vocab_size) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def write_token_bins(folder: str | Path, splits: dict[str, Sequence[str]], encode: Callable[[str], list[int]],
                     eos_id: int) -> "TokenBins":
    """Tokenise each split's documents into `<split>.bin` in `folder` (eos after every document)."""
    for split, docs in splits.items():
        write_token_bin(pack_documents((encode(d) for d in docs), eos_id), Path(folder) / f"{split}.bin")
    return TokenBins(folder)


class TokenBins:
    """Memory-mapped train/val token files (`<split>.bin` in `folder`); nothing is read into RAM
    until a batch needs it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.splits = {p.stem: np.memmap(p, dtype="<u2", mode="r") for p in sorted(self.folder.glob("*.bin"))}

    def __len__(self) -> int:
        return sum(len(tokens) for tokens in self.splits.values())

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1] (next-token targets), as int64."""
        tokens = self.splits[split]
        if len(tokens) < block_size + 1:
            raise ValueError(f"split {split!r} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
        windows = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in starts]).astype(np.int64))
        return windows[:, :-1], windows[:, 1:]
