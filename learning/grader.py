"""Offline grading of a typed interview answer against a question's key points.

How a key point is matched (the rule the tests pin down):

1. Normalise and tokenise answer and key point alike: NFKC, lower case, punctuation and whitespace
   dropped; Latin words and numbers are tokens ("0.95" stays one token), every Chinese character is
   its own token (so a Chinese term matches as a substring, whatever spaces surround it), Greek
   letters are read as their names (γ -> gamma). Words equal but for a plural "s" are equal.
2. Split the key point into *units*. Where a spelling from `data/synonyms.toml` occurs (longest
   first), the unit is that whole synonym group, so "bias vs variance" is hit by "偏差和方差".
   Other Latin words are single-word units (a few filler words are skipped), leftover Chinese text
   becomes overlapping character pairs.
3. A unit occurs in the answer where one of its spellings appears as consecutive tokens. Latin words
   compare fuzzily with difflib's ratio, tolerant in proportion to their length: words of up to 3
   characters and anything with a digit must be equal, 4-5 characters need ratio >= 0.75 (one typo:
   "bais" ~ "bias"), 6+ characters need >= 0.8 ("varience" ~ "variance"), and the lengths may differ
   by 1 (by 2 from 9 characters up), so "median" is not a typo of "mean". Chinese compares exactly.
4. The key point is hit when enough distinct units (all of 1-2, otherwise at least two thirds,
   rounded up, and every number in it) occur in any order inside one window of the answer no
   longer than twice the key point's length plus 4 tokens. The matched text is the hit's span.

score = hits / key points; the suggested FSRS rating is Again below 1/3, Hard below 2/3, Good below 0.9
and Easy from 0.9 up. The cut points are exact thirds, not 0.34/0.67, so that 2 of 3 key points is Good
(with 0.67 a three-point question could never be Good). An empty answer scores 0.

An answer longer than MAX_ANSWER_CHARS is refused (AnswerTooLong): a spoken interview answer is a
few hundred words, and the cap keeps grading well under a second. Grading time is linear in the
answer's length: each unit's spellings are compared with the answer's distinct words once, and
only the places where a spelling's first word matches are looked at further.
"""
from __future__ import annotations

import difflib
import functools
import math
import re
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from fsrs import Rating

from core.errors import UserError

SYNONYMS_PATH = Path(__file__).resolve().parent / "synonyms.toml"

MAX_ANSWER_CHARS = 20_000
"""the longest answer graded: about 3 000 words, 20 minutes of speech; a two-minute answer is ~300 words"""

# lower score bound of each suggested rating, checked from the top
RATING_THRESHOLDS = ((0.9, Rating.Easy), (2 / 3, Rating.Good), (1 / 3, Rating.Hard), (0.0, Rating.Again))

# words that carry no content in a key point; they are skipped there, never required in the answer
STOPWORDS = frozenset("a an the of to is are be by for in on at and or with its it as that this "
                      "from vs versus into than then when if has have does do can".split())
CJK_STOPWORDS = frozenset("的了是和在与及也就都把被对")

GREEK_NAMES = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "θ": "theta",
               "λ": "lambda", "μ": "mu", "π": "pi", "ρ": "rho", "σ": "sigma", "τ": "tau", "φ": "phi"}

# a decimal number, or a run of letters/digits of one script (Chinese characters taken one by one)
_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W\d_]+|\d+|[^\W_]")
_CJK, _GREEK = "\u3400-\u9fff\uf900-\ufaff", "\u0370-\u03ff"
_SCRIPT_RUN = re.compile(rf"[{_CJK}{_GREEK}]|[^\W_{_CJK}{_GREEK}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")


class SynonymError(UserError, ValueError):
    """The synonyms file breaks its format; the message names the file and the spelling."""


class AnswerTooLong(UserError, ValueError):
    """An answer longer than MAX_ANSWER_CHARS."""

    def __init__(self, length: int):
        self.length = length
        super().__init__(f"the answer is {length:,} characters long; answers are graded up to "
                         f"{MAX_ANSWER_CHARS:,} characters (a spoken interview answer is far shorter)")


@dataclass(frozen=True, slots=True)  # slots: a long answer makes many of them
class Token:
    text: str
    start: int
    end: int
    """character offsets of the token in the original answer"""


@dataclass(frozen=True)
class Hit:
    key_point: str
    span: str
    """the answer text that matched it"""


@dataclass(frozen=True)
class Grade:
    hits: tuple[Hit, ...]
    misses: tuple[str, ...]
    score: float
    suggested: Rating


@dataclass(frozen=True)
class Unit:
    """One thing a key point needs: its alternative spellings, each a tuple of normalised tokens."""
    spellings: frozenset[tuple[str, ...]]

    @property
    def length(self) -> int:
        return max(len(s) for s in self.spellings)

    @property
    def is_number(self) -> bool:
        """Numbers are facts ("lambda = 0" is not "lambda = 1"), so a key point's numbers are all required."""
        return all(any(c.isdigit() for c in word) for spelling in self.spellings for word in spelling)


def _is_cjk(text: str) -> bool:
    return len(text) == 1 and _CJK_CHAR.match(text) is not None


def _stem(word: str) -> str:
    """Drop a plural 's' so "rewards" meets "reward"; applied to both sides, so "bias" -> "bia" is harmless."""
    return word[:-1] if len(word) >= 4 and word.endswith("s") and not word.endswith("ss") else word


def _scan(text: str) -> Iterator[tuple[str, int, int]]:
    """(normalised token, start, end) of each token of `text` (see the module docstring, step 1)."""
    for match in _TOKEN.finditer(text):
        word = unicodedata.normalize("NFKC", match.group()).lower()
        if "." in word or len(word) != len(match.group()):  # a decimal, or NFKC expanded a ligature
            yield word, match.start(), match.end()
            continue
        for piece in _SCRIPT_RUN.finditer(word):
            norm = GREEK_NAMES.get(piece.group(), piece.group())
            yield norm, match.start() + piece.start(), match.start() + piece.end()


def tokenize(text: str) -> list[Token]:
    """Normalised tokens with their offsets in `text` (see the module docstring, step 1)."""
    return [Token(*found) for found in _scan(text)]


def _spelling(text: str) -> tuple[str, ...]:
    return tuple(t.text for t in tokenize(text))


@functools.lru_cache(maxsize=200_000)
def words_match(expected: str, typed: str) -> bool:
    """Fuzzy equality of two normalised tokens; tolerance grows with the word's length (step 3)."""
    if _stem(expected) == _stem(typed):
        return True
    if len(expected) <= 3 or abs(len(expected) - len(typed)) > (1 if len(expected) < 9 else 2):
        return False  # the length test first: it is O(1), the digit scan below is not
    if any(map(str.isdigit, expected + typed)):
        return False
    threshold = 0.75 if len(expected) <= 5 else 0.8
    # difflib's ratio is 2.0 * matched / total, and it never matches more characters than the two words
    # share: a pair whose shared characters cannot reach the threshold skips the (costly) matcher
    shared = sum(min(expected.count(c), typed.count(c)) for c in set(expected))
    if 2.0 * shared / (len(expected) + len(typed)) < threshold:
        return False
    return difflib.SequenceMatcher(None, expected, typed).ratio() >= threshold


class Synonyms:
    """Spelling -> group lookup built from the equivalence groups."""

    def __init__(self, groups: Sequence[Sequence[str]], source: str = "<groups>"):
        self.group_of: dict[tuple[str, ...], frozenset[tuple[str, ...]]] = {}
        for group in groups:
            spellings = frozenset(_spelling(s) for s in group)
            if len(group) < 2 or () in spellings:
                raise SynonymError(f"{source}: group {list(group)} needs two or more non-empty spellings")
            for spelling in spellings:
                key = tuple(map(_stem, spelling))
                if key in self.group_of:
                    raise SynonymError(f"{source}: {' '.join(spelling)!r} appears in two groups")
                self.group_of[key] = spellings
        self.longest = max((len(s) for s in self.group_of), default=0)

    @classmethod
    def load(cls, path: Path = SYNONYMS_PATH) -> Synonyms:
        try:
            groups = tomllib.loads(path.read_text(encoding="utf-8"))["groups"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise SynonymError(f"{path}: {exc!r}") from None
        return cls(groups, str(path))

    def group_at(self, words: Sequence[str], i: int) -> tuple[int, frozenset[tuple[str, ...]]] | None:
        """The longest spelling starting at words[i], as (its length, its group)."""
        for n in range(min(self.longest, len(words) - i), 0, -1):
            group = self.group_of.get(tuple(map(_stem, words[i:i + n])))
            if group:
                return n, group
        return None


@functools.lru_cache(maxsize=1)
def default_synonyms() -> Synonyms:
    return Synonyms.load()


def key_point_units(key_point: str, synonyms: Synonyms) -> list[Unit]:
    """Split a key point into the units an answer must contain (step 2); duplicates dropped."""
    words = [t.text for t in tokenize(key_point)]
    units: list[Unit] = []
    cjk_run: list[str] = []

    def flush_cjk() -> None:
        # leftover Chinese text: overlapping character pairs, the usual stand-in for word boundaries
        if len(cjk_run) == 1:
            units.append(Unit(frozenset([tuple(cjk_run)])))
        units.extend(Unit(frozenset([pair])) for pair in zip(cjk_run, cjk_run[1:]))
        cjk_run.clear()

    i = 0
    while i < len(words):
        found = synonyms.group_at(words, i)
        if found:
            flush_cjk()
            n, group = found
            units.append(Unit(group))
            i += n
            continue
        word = words[i]
        if _is_cjk(word) and word not in CJK_STOPWORDS:
            cjk_run.append(word)
        else:
            flush_cjk()
            if not _is_cjk(word) and word not in STOPWORDS:
                units.append(Unit(frozenset([(word,)])))
        i += 1
    flush_cjk()
    return list(dict.fromkeys(units))


MAX_LENGTH_GAP = 2
"""words_match never pairs words whose lengths differ by more (a plural 's' is 1, a typo up to 2)"""


class AnswerIndex:
    """An answer's tokens, indexed once per graded answer: each distinct word with its places, the
    distinct words by length. A spelling's first word is compared with each distinct word of about
    its length once (not with every token), so grading time grows with the answer's length, not with
    length x spellings x the cost of a fuzzy match. Tokens are kept as plain lists, not Token objects:
    a long answer would otherwise make the garbage collector's passes grow with it."""

    def __init__(self, tokens: Iterable[tuple[str, int, int]]):
        """tokens: (normalised token, start, end), as _scan gives them; see of_text and of_tokens."""
        self.words: list[str] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.places: dict[str, list[int]] = {}
        for i, (word, start, end) in enumerate(tokens):
            self.words.append(word)
            self.starts.append(start)
            self.ends.append(end)
            self.places.setdefault(word, []).append(i)
        self.by_length: dict[int, list[str]] = {}
        for word in self.places:
            self.by_length.setdefault(len(word), []).append(word)

    @classmethod
    def of_text(cls, text: str) -> AnswerIndex:
        return cls(_scan(text))

    @classmethod
    def of_tokens(cls, tokens: Sequence[Token]) -> AnswerIndex:
        return cls((t.text, t.start, t.end) for t in tokens)

    def __len__(self) -> int:
        return len(self.words)

    def candidates(self, word: str) -> Iterator[str]:
        """The distinct words that words_match(word, ...) could accept, judged by length alone (a
        word of up to 3 characters matches only itself and its plural)."""
        if len(word) <= 3:
            yield from (w for w in (word, word + "s") if w in self.places)
            return
        for n in range(len(word) - MAX_LENGTH_GAP, len(word) + MAX_LENGTH_GAP + 1):
            yield from self.by_length.get(n, ())


def _occurrences(unit: Unit, answer: AnswerIndex) -> list[tuple[int, int]]:
    """(first, last) token indices of every place the unit occurs in the answer."""
    found = []
    words = answer.words
    for spelling in unit.spellings:
        n, rest = len(spelling), list(enumerate(spelling[1:], 1))
        for typed in answer.candidates(spelling[0]):
            if not words_match(spelling[0], typed):
                continue
            found += [(i, i + n - 1) for i in answer.places[typed]
                      if i + n <= len(words) and all(words_match(w, words[i + k]) for k, w in rest)]
    return found


def required_units(n: int) -> int:
    return n if n <= 2 else math.ceil(2 * n / 3)


def match_key_point(key_point: str, answer: Sequence[Token] | AnswerIndex,
                    synonyms: Synonyms) -> tuple[int, int] | None:
    """Token span (first, last) of the answer that covers the key point, or None (step 4)."""
    answer = answer if isinstance(answer, AnswerIndex) else AnswerIndex.of_tokens(answer)
    units = key_point_units(key_point, synonyms)
    if not units:
        return None
    need = required_units(len(units))
    numbers = {u for u, unit in enumerate(units) if unit.is_number}
    window = 2 * sum(u.length for u in units) + 4
    # in answer order, the longer of two occurrences at one place first ("terminal state" before "terminal")
    places = sorted(((first, last, u) for u, unit in enumerate(units) for first, last in _occurrences(unit, answer)),
                    key=lambda place: (place[0], -place[1]))
    # slide over the occurrences in answer order; a window holding enough distinct units is a hit
    for i, (first, _, _) in enumerate(places):
        seen: set[int] = set()
        last_end = first
        for other_first, other_last, u in places[i:]:
            if other_first - first >= window:
                break
            if other_last - first >= window:
                continue
            seen.add(u)
            last_end = max(last_end, other_last)
            if len(seen) >= need and numbers <= seen:
                return first, last_end
    return None


def suggested_rating(score: float) -> Rating:
    return next(rating for bound, rating in RATING_THRESHOLDS if score >= bound)


def check_length(answer: str) -> None:
    """Raise AnswerTooLong for an answer over MAX_ANSWER_CHARS."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise AnswerTooLong(len(answer))


def grade(answer: str, key_points: Sequence[str], synonyms: Synonyms | None = None) -> Grade:
    """Grade `answer` against `key_points`; AnswerTooLong beyond MAX_ANSWER_CHARS."""
    check_length(answer)
    synonyms = synonyms or default_synonyms()
    index = AnswerIndex.of_text(answer)
    hits, misses = [], []
    for key_point in key_points:
        span = match_key_point(key_point, index, synonyms) if len(index) else None
        if span is None:
            misses.append(key_point)
        else:
            hits.append(Hit(key_point, answer[index.starts[span[0]]:index.ends[span[1]]]))
    score = len(hits) / len(key_points) if key_points else 0.0
    return Grade(tuple(hits), tuple(misses), score, suggested_rating(score))
