"""Byte-level BPE from scratch (Sennrich et al. 2016 on bytes, as in GPT-2, Radford et al. 2019).

Training starts from the 256 single bytes, so every string is representable (no <unk>), and
repeatedly merges the most frequent adjacent pair of tokens into a new token:
    (a, b)* = argmax_{(a,b)} sum_w count(w) * #{i : w_i = a, w_{i+1} = b}      ties -> smallest (a, b)
Text is first cut into pre-tokens (a word with its leading space, a digit, a run of punctuation or of
spaces), and merges never cross a pre-token boundary, so training works on the *distinct* pre-tokens
with their counts: its cost grows with the vocabulary of the corpus, not with its length.
Encoding applies the learned merges in the order they were learned (lowest rank first), which
reproduces the training segmentation of every pre-token.
Special tokens get their own ids after the bytes; they are cut out of the text before pre-tokenizing,
so no merge can produce or split one.
"""
from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from core.artifacts import atomic_write_text
from core.data.tokenizer import SPECIAL_TOKENS

Pair = tuple[int, int]

# GPT-2's split, written with `re` (no \p{L}): contractions, letters with one leading space, single
# digits (so numbers are never merged into arbitrary chunks), punctuation runs, then whitespace, where
# a run of spaces leaves its last space to the next word. Every character matches some branch.
PRETOKENIZE = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def pretokenize(text: str) -> list[bytes]:
    return [piece.encode("utf-8") for piece in PRETOKENIZE.findall(text)]


def merge(tokens: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return out


def learn_merges(word_counts: dict[bytes, int], n_merges: int, first_id: int) -> list[Pair]:
    """Up to `n_merges` merges (fewer if every word has become one token); merge k creates id first_id + k.
    Pair counts are updated only for the words that contain the merged pair, and the best pair comes
    from a max-heap whose stale entries (a count that has changed since) are skipped when popped."""
    words = [list(w) for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter[Pair] = Counter()
    containing: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> indices of words with it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            containing[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while len(merges) < n_merges and heap:
        neg_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -neg_count:
            continue  # stale entry
        new_id = first_id + len(merges)
        merges.append(best)
        changed = set()
        for i in sorted(containing.pop(best)):
            old, new = words[i], merge(words[i], best, new_id)
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freqs[i]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freqs[i]
                containing[pair].add(i)
                changed.add(pair)
            words[i] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    return merges


class ByteBPE:
    """ids 0-255: bytes; then the special tokens; then one id per merge, in the order learned."""

    def __init__(self, merges: list[Pair], special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        self.merges, self.special_tokens = merges, special_tokens
        self.special_ids = {tok: 256 + k for k, tok in enumerate(special_tokens)}
        self.first_merge_id = 256 + len(special_tokens)
        self.rank = {pair: k for k, pair in enumerate(merges)}
        self.vocab = [bytes([b]) for b in range(256)] + [tok.encode() for tok in special_tokens]
        for a, b in merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._special_split = re.compile("(" + "|".join(map(re.escape, special_tokens)) + ")")
        self._cache: dict[bytes, list[int]] = {}  # pre-token -> ids; a story corpus repeats its words

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int,
              special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> "ByteBPE":
        specials = re.compile("|".join(map(re.escape, special_tokens)))
        counts = Counter(p for doc in docs for part in specials.split(doc) for p in pretokenize(part))
        first_id = 256 + len(special_tokens)
        return cls(learn_merges(counts, vocab_size - first_id, first_id), special_tokens)

    def _encode_pretoken(self, piece: bytes) -> list[int]:
        if piece not in self._cache:
            tokens = list(piece)
            while len(tokens) > 1:
                # the earliest-learned merge present in the sequence is applied next
                rank, pair = min((self.rank.get(p, len(self.rank)), p) for p in zip(tokens, tokens[1:]))
                if rank == len(self.rank):
                    break
                tokens = merge(tokens, pair, self.first_merge_id + rank)
            self._cache[piece] = tokens
        return self._cache[piece]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._special_split.split(text):  # the capture group keeps the specials in the list
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            else:
                for piece in pretokenize(part):
                    ids.extend(self._encode_pretoken(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # a prefix of a sampled sequence may end inside a UTF-8 character: show U+FFFD, do not crash
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def pieces(self, text: str) -> list[bytes]:
        return [self.vocab[i] for i in self.encode(text)]

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps({"special_tokens": list(self.special_tokens),
                                                   "merges": self.merges}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ByteBPE":
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls([tuple(pair) for pair in saved["merges"]], tuple(saved["special_tokens"]))
