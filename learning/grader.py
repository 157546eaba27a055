"""Offline grading of a typed interview answer against a question's claims.

A question's `key_points` are the claims a correct answer makes and its `misconceptions` the wrong
claims candidates commonly make (core/contract.py), both in one small syntax:

    key point := part ( " -> " part )*         "critic -> estimates | learns -> V | value"
    part      := phrasing ( " | " phrasing )*

How an answer is read (the rules the tests pin down):

1. Tokens. NFKC, lower case; Latin words are lemmatised (simplemma: "policies" = "policy",
   "estimates" = "estimate"), words of letters and digits stay whole ("a2c", "fp16"), numbers too
   ("0.95"), Greek letters read as their names (γ = gamma; eps = epsilon), "n't" and "cannot" give a
   token "not", a possessive 's is dropped, and > < >= <= are tokens. Chinese is segmented into
   words by jieba, and each word becomes one token per character. Stopwords ("the", "of", "的")
   carry no content and are never required.
2. Clauses. The answer is cut into clauses at . ; ? ! and line breaks (not the dot of "et al.",
   "e.g.", "0.95" or one inside brackets) and at the words that start a new clause ("but",
   "while", "whereas", "although", "however", "so", "because"; 但 而 然而 因为 所以 …, and "and"
   when a new subject follows: "and the actor"). A claim must be made inside one clause. Commas
   (outside brackets) cut a clause into items: a claim may run across them ("the clipping, plus
   early stopping, keeps them close"), but a list of terms is a list of items.
3. A phrasing occurs where all its content words occur in one clause within a short window (twice
   its length plus 2 tokens), in any order. Words compare as lemmas with a small typo tolerance
   that grows with length (words of up to 4 characters and numbers must be equal: "keep" is not
   "deep"; a negating prefix, "unbiased" vs "biased", is never a typo) and through the synonym
   groups of synonyms.toml (cross-language and abbreviations: "advantage" ~ "优势"). A Chinese word
   matches as its characters in a row, so jieba cutting the answer differently ("上自举" vs "自举")
   does not hide it; but a single character only where it is a word of the answer (正 is not in
   修正), and nothing right after a negating character (稳定 is not in 不稳定).
4. A key point is made where its parts occur in its order in one clause (either order when the
   clause is passive: "by", 被, 由). It is *contradicted* where the match, from the start of the item
   it begins in to its end, holds an odd number of negations (not, never, neither, nor; 不 没 未 非 …) beyond the ones
   the key point itself says: "GAE does not reduce variance" contradicts "GAE -> reduces -> variance",
   and "truncation is not terminal" makes "truncation -> not -> terminal". A key point made
   somewhere in the answer is hit, even if contradicted elsewhere; a contradiction counts only when
   the key point is nowhere made.
5. A misconception is stated where it is made inside one item and not contradicted (rule 4); a key
   point is contradicted only by a negation inside one item. What costs a point must be unmistakable.

score = prose x max(0, hits - stated misconceptions - contradicted key points) / key points, where
prose separates sentences from a pasted list of terms: a spoken answer is about a third function words
("is", "the", "of", "because", "的", "是") and most of it in items of 5 or more tokens; a keyword list
has almost none, in items of 2-4 tokens (PROSE_SHARE, LIST_ITEM, PROSE_ITEM). A Chinese answer is graded against the question's Chinese key points as
well as the English ones (technical terms are often English in Chinese speech), and gets the better
score. The suggested FSRS rating is Again below 1/3, Hard below 2/3, Good below 0.9 and Easy from 0.9
up (exact thirds, so that 2 of 3 key points is Good). An empty answer scores 0.

How well this ranks acceptable above unacceptable answers is measured on a labelled set of real
answers (learning/grading_set/, scripts/grading_eval.py); the README's table comes from there.

An answer longer than MAX_ANSWER_CHARS is refused (AnswerTooLong): a spoken interview answer is a
few hundred words, and the cap keeps grading well under 50 ms.
"""
from __future__ import annotations

import difflib
import functools
import logging
import re
import tomllib
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import simplemma
from fsrs import Rating

from core.errors import UserError

GRADER_VERSION = 2
SYNONYMS_PATH = Path(__file__).resolve().parent / "synonyms.toml"

MAX_ANSWER_CHARS = 20_000
"""the longest answer graded: about 3 000 words, 20 minutes of speech; a two-minute answer is ~300 words"""

# lower score bound of each suggested rating, checked from the top
RATING_THRESHOLDS = ((0.9, Rating.Easy), (2 / 3, Rating.Good), (1 / 3, Rating.Hard), (0.0, Rating.Again))

PROSE_SHARE, PROSE_SHARE_ZH = 0.2, 0.12
"""share of function words from which an answer counts as prose, in English and in Chinese (which
drops more of them); below it the score shrinks in proportion"""
LIST_ITEM, PROSE_ITEM = 3.0, 5.0
"""mean tokens per item (rule 2) of a list of terms, and from which an answer of three or more items
counts as prose; in between the score shrinks in proportion. On the tuning part of the grading set
(learning/grading_set/) correct answers have 5-12 tokens per item and 0.11-0.45 function words
(Chinese the least), keyword lists 2-6 and 0-0.15; the longest pasted key-point list 8.5 and 0.47."""

# Function words: never required by a key point, and their share tells prose from a list of terms.
# Negations are not among them: they are content (rule 4); nor is "on" (on-policy is not off-policy).
STOPWORDS = frozenset("""a an the of to be by for in at and or with its it as that this these those
from vs versus into than then when if have do can will would should may might must which who whose what
where how why so because but while whereas also just very there their they them we our you your i he
she his her any some such per via about through again thus hence therefore since whether""".split())
"""kept as content: quantities and directions ("only", "both", "every", "one", "more", "less", "over",
"under", "before", "after", "between", "all", "each", "same", "other", "until", "once") change what a
claim says"""
CJK_STOPWORDS = frozenset("的 了 是 和 在 与 及 也 就 都 把 被 对 而 让 这 那 这个 那个 它 它们 我们 你 "
                          "我 他 会 要 能 可以 一个 因为 所以 如果 但 但是 并 并且 而且 或 或者 着 得 地 还 "
                          "又 再 则 即 就是 这样 那么".split())
"""whole jieba words only: 上 and 下 stay content (上界 is not 下界)"""
NEGATIONS = frozenset("not never cannot neither nor 没 没有 未 非 并非 无法 别".split())
NEGATING_CHARACTERS = frozenset("不没非无未")
NOT_NEGATING = (("not", "only"), ("not", "just"))
"""'not only X but Y' asserts X"""
CJK_NOT_NEGATING = frozenset("不同 不断 不仅 不但 不少 不错 不过 不久 不管 不论 不得不 不如 不稳定 不确定 不可预测 "
                             "不可微 不一致 不平衡 不均衡 不对称 不连续 不完整 不完全 不充分".split())
"""Chinese words with 不 that do not negate what follows: 不同 'different', 不仅 'not only', and
adjectives that describe (不稳定 'unstable', as English "unstable" is no negation either); a word
never matches inside a longer one (rule 3), so 稳定 is not found in 不稳定"""
CLAUSE_WORDS = frozenset("but while whereas although though however so because yet unlike "
                         "但 但是 而 然而 不过 因为 所以 而且 并且 因此 虽然 尽管".split())
SUBJECT_WORDS = frozenset("the a an it its they their this that these those we you i he she there".split())
"""after "and", one of these starts a new clause ("... and the actor estimates V"); otherwise "and"
joins words ("bias and variance") or verbs of one subject ("picks actions and estimates V")"""
PASSIVE_WORDS = frozenset(("by", "被", "由"))
NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "non", "dis", "a")
"""prefixes that make an opposite ("unbiased", "asynchronous"): never a typo"""

GREEK_NAMES = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "θ": "theta",
               "λ": "lambda", "μ": "mu", "π": "pi", "ρ": "rho", "σ": "sigma", "τ": "tau", "φ": "phi"}
ALIASES = {"eps": "epsilon", "cannot": "not", "≥": ">=", "≤": "<=", "done": "done"}
"""spellings read as another; "done" (an episode's flag) is kept from its lemma "do", a stopword"""

_CJK, _GREEK = "\u3400-\u9fff\uf900-\ufaff", "\u0370-\u03ff"
# "n't" first (so "don't" gives "do" + "not"), a possessive 's (dropped), a decimal, a run of CJK, a
# Greek letter, a word of letters and digits ("a2c", "fp16", "k3"), a word, a comparison, a number
_LETTERS = rf"[^\W\d_{_CJK}{_GREEK}]"
_TOKEN = re.compile(rf"n['’]t\b|['’]s\b|\d+(?:\.\d+)+|[{_CJK}]+|[{_GREEK}]|{_LETTERS}+?(?=n['’]t\b)"
                    rf"|{_LETTERS}+\d[^\W_]*|{_LETTERS}+|>=|<=|[<>≤≥]|\d+|[^\W_]")
_CJK_RUN = re.compile(rf"[{_CJK}]")
_CLAUSE_PUNCT = re.compile(r"[.;?!\n。；？！→]")
_ABBREVIATION = re.compile(r"(?:\bal|\be\.g|\bi\.e|\betc|\bvs|\bcf|\beq|\bfig|\bapprox|\.)$", re.IGNORECASE)
"""what before a "." makes it no sentence end: "et al.", "e.g.", "vs.", "r_0..r_t"""
_BRACKETS = {"(": 1, "[": 1, "{": 1, "（": 1, ")": -1, "]": -1, "}": -1, "）": -1}
_BOUNDARY = re.compile(r"[()\[\]{}（）.;?!\n。；？！→,，、]")
"""a bracket, a clause end or an item end (a comma)"""
_CLAIM_SEPARATOR = re.compile(r"->|\s\|\s")
"""the claim syntax's own separators ("a -> b | c"; shown as "a → b / c", and → is a clause end too)"""
_DECIMAL_DOT = re.compile(r"\d\.\d")


class SynonymError(UserError, ValueError):
    """The synonyms file breaks its format; the message names the file and the spelling."""


class AnswerTooLong(UserError, ValueError):
    """An answer longer than MAX_ANSWER_CHARS."""

    def __init__(self, length: int):
        self.length = length
        super().__init__(f"the answer is {length:,} characters long; answers are graded up to "
                         f"{MAX_ANSWER_CHARS:,} characters (a spoken interview answer is far shorter)")


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    """normalised: lemma, Greek name, alias"""
    start: int
    end: int
    """character offsets of the token in the original text"""
    clause: int
    item: int
    """numbers of the clause and of the item (rule 2) the token is in, counted from 0"""
    stop: bool = False
    """a function word (STOPWORDS; a Chinese token is a character of a jieba word)"""
    negation: bool = False
    word: bool = True
    """the first token of a word: a Chinese word gives one token per character (rule 1)"""


@dataclass(frozen=True)
class Hit:
    key_point: str
    span: str
    """the answer text that made it"""


@dataclass(frozen=True)
class Grade:
    hits: tuple[Hit, ...]
    misses: tuple[str, ...]
    score: float
    suggested: Rating
    misconceptions: tuple[Hit, ...] = ()
    """the wrong claims the answer states, with the text that states them"""
    contradicted: tuple[Hit, ...] = ()
    """key points the answer negates (and makes nowhere)"""
    prose: float = 1.0
    """the prose factor of the score (1 for sentences, toward 0 for a pasted list of terms)"""
    lang: str = "en"
    """which key points graded it: en or zh"""
    grader: str = "offline"
    """offline (this module) or judge:<model> (learning/judge.py)"""
    feedback: str = ""
    """the judge's one sentence; empty offline"""


# ------------------------------------------------------------------------------ tokens and clauses
@functools.lru_cache(maxsize=100_000)
def _lemma(word: str) -> str:
    """simplemma's lemma, applied until it stops changing ("lowers" -> "lower" -> "low"), and an -ing
    it leaves on a long word dropped ("clipping" -> "clip", as "clipped" -> "clip")."""
    if word in ALIASES:
        return ALIASES[word]
    lemma = simplemma.lemmatize(word, lang="en").lower()
    for _ in range(2):
        lemma, previous = simplemma.lemmatize(lemma, lang="en").lower(), lemma
        if lemma == previous:
            break
    if lemma == word and len(word) >= 7 and word.endswith("ing"):
        stem = word[:-3]
        lemma = stem[:-1] if len(stem) >= 4 and stem[-1] == stem[-2] else stem
    return lemma


@functools.lru_cache(maxsize=1)
def _jieba():
    import jieba  # ~1 s to load its dictionary: only when Chinese text is graded
    jieba.setLogLevel(logging.WARNING)
    return jieba


@functools.lru_cache(maxsize=20_000)
def _cjk_words(run: str) -> tuple[str, ...]:
    return tuple(_jieba().lcut(run))


def _clause_ends(text: str) -> list[tuple[int, bool]]:
    """(character offset, whether a clause ends there or only an item) of every end (rule 2): sentence
    punctuation and the separators of the claim syntax end clauses (a learner who pastes the key
    points pastes a list), commas outside brackets end items."""
    depth, ends = 0, [(m.start(), True) for m in _CLAIM_SEPARATOR.finditer(text)]
    for match in _BOUNDARY.finditer(text):
        ch, i = match.group(), match.start()
        if ch in _BRACKETS:
            depth = max(0, depth + _BRACKETS[ch])
        elif _CLAUSE_PUNCT.match(ch):
            if ch != "." or not (depth or _DECIMAL_DOT.match(text, max(0, i - 1)) or text[i + 1:i + 2] == "."
                                 or _ABBREVIATION.search(text, max(0, i - 7), i)):
                ends.append((i, True))
        elif depth == 0:
            ends.append((i, False))
    return sorted(ends)


def _negates(word: str) -> bool:
    """A negating word: English or Chinese, including Chinese words built on 不 (不会, 看不到, 不准)."""
    return word in NEGATIONS or ("不" in word and word not in CJK_NOT_NEGATING)


def tokenize(text: str) -> list[Token]:
    """Normalised tokens with their offsets, clause and item numbers and flags (rules 1 and 2)."""
    ends, e, clause, item = _clause_ends(text), 0, 0, 0
    tokens: list[Token] = []

    def add(word: str, start: int, end: int, starts_clause: bool = False) -> None:
        nonlocal clause, item
        if starts_clause and tokens:
            clause, item = clause + 1, item + 1
        tokens.append(Token(word, start, end, clause, item, word in STOPWORDS, word in NEGATIONS))

    for match in _TOKEN.finditer(text):
        while e < len(ends) and ends[e][0] < match.start():
            clause, item, e = clause + ends[e][1], item + 1, e + 1
        raw = match.group()
        raw = (raw if raw.isascii() else unicodedata.normalize("NFKC", raw)).lower()
        if _CJK_RUN.match(raw):
            offset = match.start()
            for word in _cjk_words(raw):
                add(word[0], offset, offset + 1, word in CLAUSE_WORDS)
                tokens[-1] = replace(tokens[-1], stop=word in CJK_STOPWORDS, negation=_negates(word))
                tokens.extend(Token(ch, offset + k, offset + k + 1, clause, item, tokens[-1].stop, False, False)
                              for k, ch in enumerate(word[1:], 1))
                offset += len(word)
            continue
        if raw in ("n't", "n’t"):
            add("not", match.start(), match.end())
        elif raw not in ("'s", "’s"):
            new_subject = raw in SUBJECT_WORDS and tokens and tokens[-1].text == "and" and tokens[-1].clause == clause
            word = GREEK_NAMES.get(raw) or (_lemma(raw) if raw.isalpha() else ALIASES.get(raw, raw))
            add(word, match.start(), match.end(), new_subject or word in CLAUSE_WORDS)
    return tokens


# ------------------------------------------------------------------------------ matching words
@functools.lru_cache(maxsize=200_000)
def words_match(expected: str, typed: str) -> bool:
    """Equality of two normalised tokens with a typo tolerance that grows with length (rule 3)."""
    if expected == typed:
        return True
    if len(expected) <= 4 or abs(len(expected) - len(typed)) > (1 if len(expected) < 9 else 2):
        return False
    if any(map(str.isdigit, expected + typed)) or _CJK_RUN.search(expected + typed):
        return False
    short, long_ = sorted((expected, typed), key=len)
    if any(long_ == p + short or long_[len(p):] == short for p in NEGATING_PREFIXES if long_.startswith(p)):
        return False  # "unbiased" is the opposite of "biased", not a typo of it
    if {expected[:4], typed[:4]} == {"over", "unde"}:
        return False  # "overestimate" is the opposite of "underestimate"
    threshold = 0.75 if len(expected) <= 5 else 0.8
    # difflib's ratio never exceeds 2 * shared characters / total: most pairs are refused here cheaply
    shared = sum(min(expected.count(c), typed.count(c)) for c in set(expected))
    if 2.0 * shared / (len(expected) + len(typed)) < threshold:
        return False
    return difflib.SequenceMatcher(None, expected, typed).ratio() >= threshold


def _content_words(text: str) -> list[tuple[str, ...]]:
    """The content words of a key point or synonym, each as its tokens: a Chinese word is its characters
    (matched consecutively, so that jieba splitting a word differently in the answer does not matter)."""
    words: list[tuple[str, ...]] = []
    for t in tokenize(text):
        if t.stop:
            continue
        if t.word:
            words.append((t.text,))
        else:
            words[-1] += (t.text,)
    return words


def _content(text: str) -> tuple[str, ...]:
    return tuple(token for word in _content_words(text) for token in word)


class Synonyms:
    """Spelling -> group lookup built from the equivalence groups; spellings are content-word tuples."""

    def __init__(self, groups: Sequence[Sequence[str]], source: str = "<groups>"):
        self.group_of: dict[tuple[str, ...], frozenset[tuple[str, ...]]] = {}
        for group in groups:
            spellings = frozenset(_content(s) for s in group)
            if len(group) < 2 or () in spellings:
                raise SynonymError(f"{source}: group {list(group)} needs two or more non-empty spellings")
            for spelling in spellings:
                if len(spelling) == 1 and len(spelling[0]) == 1 and spelling[0].isascii():
                    raise SynonymError(f"{source}: a spelling in {list(group)} reads as the single letter "
                                       f"{spelling[0]!r} (stopwords dropped), which any formula would match")
            for spelling in spellings:
                if spelling in self.group_of and self.group_of[spelling] != spellings:
                    raise SynonymError(f"{source}: {' '.join(spelling)!r} appears in two groups")
                self.group_of[spelling] = spellings
        self.longest = max((len(s) for s in self.group_of), default=0)

    @classmethod
    def load(cls, path: Path = SYNONYMS_PATH) -> Synonyms:
        try:
            groups = tomllib.loads(path.read_text(encoding="utf-8"))["groups"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise SynonymError(f"{path}: {exc!r}") from None
        return cls(groups, str(path))

    def units(self, words: Sequence[tuple[str, ...]]) -> list[frozenset[tuple[str, ...]]]:
        """Split content words into units: the longest synonym spelling at each place, else one word."""
        units, i = [], 0
        while i < len(words):
            for n in range(len(words) - i, 0, -1):
                spelling = tuple(token for word in words[i:i + n] for token in word)
                group = self.group_of.get(spelling) if len(spelling) <= self.longest else None
                if group:
                    units.append(group)
                    i += n
                    break
            else:
                units.append(frozenset([words[i]]))
                i += 1
        return list(dict.fromkeys(units))


@functools.lru_cache(maxsize=1)
def default_synonyms() -> Synonyms:
    return Synonyms.load()


class AnswerIndex:
    """An answer's content tokens, indexed once: each distinct word with its places, the distinct
    words by length (a spelling's first word is compared with the distinct words of about its length
    only, so grading time grows with the answer's length)."""

    def __init__(self, text: str):
        self.text = text
        all_tokens = tokenize(text)
        self.tokens = [t for t in all_tokens if not t.stop]
        self.words = [t for t in all_tokens if t.word]
        """a Chinese word counts once, like an English one, in the prose factor and the language share"""
        self.function_words = sum(t.stop for t in self.words)
        self.negations = [t.negation and not self._not_only(all_tokens, i) for i, t in enumerate(all_tokens)]
        self.all_tokens = all_tokens
        self.places: dict[str, list[int]] = {}
        for i, t in enumerate(self.tokens):
            self.places.setdefault(t.text, []).append(i)
        self.by_length: dict[int, list[str]] = {}
        for word in self.places:
            self.by_length.setdefault(len(word), []).append(word)
        self.passive = {t.clause for t in all_tokens if t.text in PASSIVE_WORDS}
        self.cjk = sum(1 for t in self.words if _CJK_RUN.match(t.text))

    @staticmethod
    def _not_only(tokens: list[Token], i: int) -> bool:
        words = tuple(t.text for t in tokens[i:i + 2])
        return any(words[:len(p)] == p for p in NOT_NEGATING)

    def candidates(self, word: str) -> Iterator[str]:
        if len(word) <= 4 or _CJK_RUN.match(word):
            if word in self.places:
                yield word
            return
        for n in range(len(word) - 2, len(word) + 3):
            yield from self.by_length.get(n, ())

    def negations_in(self, first: int, last: int) -> int:
        """Negations from the start of the item of content token `first` to the end of `last` (rule 4)."""
        begin, end = self.tokens[first], self.tokens[last]
        return sum(1 for t, neg in zip(self.all_tokens, self.negations)
                   if neg and t.clause == begin.clause and t.item >= begin.item and t.start < end.end)

    @property
    def prose(self) -> float:
        """How much the answer reads as sentences rather than a list of terms (module docstring)."""
        n = len(self.words)
        if not n:
            return 0.0
        chinese = self.cjk / n
        share = PROSE_SHARE * (1 - chinese) + PROSE_SHARE_ZH * chinese
        items = len({t.item for t in self.words})
        if items < 3:  # one or two short items are a short answer, not a list
            return min(1.0, self.function_words / n / share)
        return (min(1.0, self.function_words / n / share)
                * min(1.0, max(0.0, n / items - LIST_ITEM) / (PROSE_ITEM - LIST_ITEM)))


# ------------------------------------------------------------------------------ claims
@dataclass(frozen=True)
class Phrasing:
    units: tuple[frozenset[tuple[str, ...]], ...]
    negations: int
    """negation words the phrasing itself says (they occur in the answer when it matches)"""


@dataclass(frozen=True)
class Claim:
    text: str
    parts: tuple[tuple[Phrasing, ...], ...]


@functools.lru_cache(maxsize=20_000)
def parse_claim(text: str, synonyms: Synonyms | None = None) -> Claim:
    synonyms = synonyms or default_synonyms()
    parts = []
    for part in text.split("->"):
        phrasings = []
        for phrasing in part.split("|"):
            words = _content_words(phrasing)
            if words:
                negations = sum(t.negation for t in tokenize(phrasing))
                phrasings.append(Phrasing(tuple(synonyms.units(words)), negations))
        if phrasings:
            parts.append(tuple(phrasings))
    return Claim(text, tuple(parts))


@dataclass(frozen=True)
class _Span:
    clause: int
    first: int
    last: int
    negations: int


def _unit_places(unit: frozenset[tuple[str, ...]], answer: AnswerIndex) -> list[tuple[int, int]]:
    """(first, last) content-token indices of every place one of the unit's spellings occurs."""
    found, tokens = [], answer.tokens
    for spelling in unit:
        n = len(spelling)
        for typed in answer.candidates(spelling[0]):
            if words_match(spelling[0], typed):
                found += [(i, i + n - 1) for i in answer.places[typed]
                          if i + n <= len(tokens) and tokens[i + n - 1].clause == tokens[i].clause
                          and (tokens[i].word or not _CJK_RUN.match(typed) or _may_start_inside(tokens, i, n))
                          and all(words_match(w, tokens[i + k].text) for k, w in enumerate(spelling[1:], 1))]
    return sorted(found, key=lambda place: (place[0], -place[1]))  # the longest spelling at a place first


def _may_start_inside(tokens: list[Token], i: int, n: int) -> bool:
    """Whether a Chinese word of n characters may match from inside an answer's word at token i:
    a word of two or more characters may (jieba cuts "对下一个" as 对下/一个, hiding 下一个), a single
    character may not (正 inside 修正), nor a word after a negating character (稳定 inside 不稳定)."""
    return n >= 2 and tokens[i - 1].text not in NEGATING_CHARACTERS


def _phrasing_spans(phrasing: Phrasing, answer: AnswerIndex) -> list[_Span]:
    places = [_unit_places(u, answer) for u in phrasing.units]
    if not all(places):
        return []
    window = 2 * sum(max(len(s) for s in u) for u in phrasing.units) + 2
    by_clause: list[dict[int, list[tuple[int, int]]]] = []
    for options in places:
        grouped: dict[int, list[tuple[int, int]]] = {}
        for place in options:
            grouped.setdefault(answer.tokens[place[0]].clause, []).append(place)
        by_clause.append(grouped)
    anchor = min(range(len(places)), key=lambda u: len(places[u]))
    spans = []
    for first, last in places[anchor]:
        clause, lo, hi = answer.tokens[first].clause, first, last
        for u, grouped in enumerate(by_clause):
            if u == anchor:
                continue
            near = [(f, l) for f, l in grouped.get(clause, ()) if max(l, last) - min(f, first) < window]
            if not near:
                break
            f, l = min(near, key=lambda p: abs(p[0] - first))
            lo, hi = min(lo, f), max(hi, l)
        else:
            spans.append(_Span(clause, lo, hi, phrasing.negations))
    return spans


def _chains(parts: list[list[_Span]], passive: set[int]) -> Iterator[tuple[int, int, int, int]]:
    """(clause, first, last, negations said by the matched phrasings) of every place the parts occur
    in order inside one clause, or in reverse order inside a passive clause (rule 4)."""
    for ordered, reverse in ((parts, False), (parts[::-1], True)):
        if reverse and (len(parts) < 2 or not passive):
            continue
        for start in ordered[0]:
            if reverse and start.clause not in passive:
                continue
            end, negations = start.last, start.negations
            for spans in ordered[1:]:
                after = [s for s in spans if s.clause == start.clause and s.first > end]
                if not after:
                    break
                step = min(after, key=lambda s: s.first)
                end, negations = step.last, negations + step.negations
            else:
                yield start.clause, start.first, end, negations


def find_claim(claim: Claim, answer: AnswerIndex,
               strict: bool = False) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(made, contradicted): the content-token span where the claim is made, else None and the span
    where it is negated inside one item, else None (rule 4). `strict`: made inside one item too (a
    misconception costs a point only when stated unmistakably: "lambda = 1 gives X, lambda = 0 Y"
    does not say "lambda = 1 gives Y")."""
    parts = [[s for p in phrasings for s in _phrasing_spans(p, answer)] for phrasings in claim.parts]
    if not claim.parts or not all(parts):
        return None, None
    contradicted = None
    for clause, first, last, own in _chains(parts, answer.passive):
        in_one_item = answer.tokens[first].item == answer.tokens[last].item
        if (answer.negations_in(first, last) - own) % 2 == 0:
            if in_one_item or not strict:
                return (first, last), None
        elif in_one_item:
            contradicted = contradicted or (first, last)
    return None, contradicted


def readable_claim(key_point: str) -> str:
    """A claim as a learner reads it: "critic -> estimates | learns -> V" is "critic → estimates / learns → V"."""
    return key_point.replace(" -> ", " → ").replace(" | ", " / ")


def suggested_rating(score: float) -> Rating:
    return next(rating for bound, rating in RATING_THRESHOLDS if score >= bound)


def check_length(answer: str) -> None:
    """Raise AnswerTooLong for an answer over MAX_ANSWER_CHARS."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise AnswerTooLong(len(answer))


def _text_of(answer: AnswerIndex, span: tuple[int, int]) -> str:
    return answer.text[answer.tokens[span[0]].start:answer.tokens[span[1]].end]


def grade(answer: str, key_points: Sequence[str], synonyms: Synonyms | None = None,
          misconceptions: Sequence[str] = (), lang: str = "en") -> Grade:
    """Grade `answer` against `key_points` and `misconceptions`; AnswerTooLong beyond MAX_ANSWER_CHARS."""
    check_length(answer)
    return _grade(AnswerIndex(answer), key_points, misconceptions, synonyms or default_synonyms(), lang)


def _grade(index: AnswerIndex, key_points: Sequence[str], misconceptions: Sequence[str],
           synonyms: Synonyms, lang: str) -> Grade:
    hits, misses, contradicted, stated = [], [], [], []
    for key_point in key_points:
        made, negated = find_claim(parse_claim(key_point, synonyms), index) if index.tokens else (None, None)
        if made:
            hits.append(Hit(key_point, _text_of(index, made)))
        else:
            misses.append(key_point)
            if negated:
                contradicted.append(Hit(key_point, _text_of(index, negated)))
    for wrong in misconceptions:
        made, _ = find_claim(parse_claim(wrong, synonyms), index, strict=True) if index.tokens else (None, None)
        if made:
            stated.append(Hit(wrong, _text_of(index, made)))
    prose = index.prose
    net = max(0, len(hits) - len(stated) - len(contradicted))
    score = prose * net / len(key_points) if key_points else 0.0
    return Grade(tuple(hits), tuple(misses), score, suggested_rating(score), tuple(stated),
                 tuple(contradicted), prose, lang)


def grade_question(answer: str, question) -> Grade:
    """Grade `answer` against a bank question: its English claims, and for an answer with Chinese in
    it also its Chinese claims; the better grade counts (module docstring)."""
    check_length(answer)
    index, synonyms = AnswerIndex(answer), default_synonyms()
    result = _grade(index, question.key_points, question.misconceptions, synonyms, "en")
    if index.cjk and question.key_points_zh:
        in_chinese = _grade(index, question.key_points_zh, question.misconceptions_zh, synonyms, "zh")
        mostly_chinese = 2 * index.cjk > len(index.words)
        if (in_chinese.score, mostly_chinese) > (result.score, not mostly_chinese):
            return in_chinese
    return result
