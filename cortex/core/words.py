"""Words of byte ids: sentence word bags, and the sentence words memory keys can carry.

Byte ids are UTF-8 (the byte tokenizer). A word is a run of letters, digits and non-ASCII
bytes, lower-cased; a Korean word also gives its stem without the last syllable (민아는 ->
민아, its particle cut). ``.``, ``!``, a newline and any non-byte token end a sentence; ``?``
does not, so an answer shares its question's words.

[`SentenceWords`][cortex.core.words.SentenceWords] turns each position's sentence words
into a direction of the key space, weighted by how rare each word is among the sentences
memory has counted: with ``memory_system.key_words`` the memory keys carry it, so that a
question finds the statements that share its rare words (a name), whatever their wording.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch.nn import functional as F

#: hashed word bins whose sentence counts give a word's rarity
WORD_BINS = 1 << 16
#: coordinates of the key space a word's direction has (each +-1, from the word's hash)
SKETCH = 8
#: a word in more than this share of the counted sentences weighs nothing (template words)
COMMON_SHARE = 1 / 16
#: a word of UTF-8 bytes
WORD_RUN = re.compile(rb"[0-9A-Za-z\x80-\xff]+")


def is_word_byte(b: int) -> bool:
    """Whether byte ``b`` is part of a word: a letter, a digit, any byte of a non-ASCII character."""
    return b >= 0x80 or 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122


def closes_sentence(t: int) -> bool:
    """Whether token ``t`` ends a sentence: ``.``, ``!``, a newline or a non-byte token (not ``?``)."""
    return t in (46, 33, 10) or not 0 <= t < 256


def word_forms(word: bytes) -> list[bytes]:
    """A word and, for a Korean word, the word without its last syllable (its particle)."""
    word = word.lower()
    if len(word) == 1:  # a lone letter (the s of "Mina's") says nothing
        return []
    forms = [word]
    if word[0] >= 0xE0 and len(word) >= 6:
        forms.append(word[:-3])
    return forms


def word_spans(ids: list[int]) -> list[tuple[bytes, int, int]]:
    """The words of each position's sentence so far, as spans ``(word, first, end)``: the word
    is in the bag of positions ``first`` to ``end - 1``. A told word counts from the token
    after it to its sentence's end, once per sentence; the word being typed counts as far as
    it goes, at each of its positions, unless told before in its sentence."""
    spans: list[list] = []
    told: dict[bytes, int] = {}  # the told words of the current sentence -> their span
    start = None  # where the word being typed began
    for t, token in enumerate(ids):
        if 0 <= token < 256 and is_word_byte(token):
            start = t if start is None else start
            spans += [[f, t, t + 1] for f in word_forms(bytes(ids[start:t + 1])) if f not in told]
            continue
        if start is not None:
            for f in word_forms(bytes(ids[start:t])):
                if f not in told:
                    told[f] = len(spans)
                    spans.append([f, t, len(ids)])
            start = None
        if closes_sentence(token):
            for i in told.values():
                spans[i][2] = t  # the closing token's bag is empty
            told = {}
    return [tuple(span) for span in spans]


def sentence_words(ids: list[int]) -> list[set[bytes]]:
    """The set of words (``word_forms``) of each sentence of byte ids ``ids``."""
    sentences: list[set[bytes]] = [set()]
    start = 0
    for t, token in enumerate([*ids, 10]):
        if closes_sentence(token):
            text = bytes(i for i in ids[start:t] if 0 <= i < 256)
            sentences[-1].update(f for w in WORD_RUN.findall(text) for f in word_forms(w))
            sentences.append(set())
            start = t + 1
    return [s for s in sentences if s]


def sentence_start(row: list[int], t: int) -> int:
    """The first position of the sentence that holds position ``t`` of byte ids ``row``."""
    while t > 0 and not closes_sentence(row[t - 1]):
        t -= 1
    return t


def _bin(word: bytes, salt: int = 0) -> int:
    return zlib.crc32(word + bytes([salt]))


class SentenceWords:
    """Each position's sentence words as a unit direction of a ``dim``-wide key space.

    A word's direction is a sketch: ``SKETCH`` coordinates, each +-1 / sqrt(SKETCH), picked
    by hashes of the word (two different words share a coordinate by chance only, so their
    directions are nearly orthogonal). A position's direction is the sum of its sentence
    words' (``word_spans``), each weighted by its rarity, normalised: two positions in
    sentences sharing a rare word point alike, sentences sharing only template words do not.

    Rarity is counted, not given: ``count`` adds the sentences memory writes, per hashed
    word bin, and a word's weight is ``log((N + 1) / (n + 0.5)) - log(1 / COMMON_SHARE)``
    (0 at least) for a word in ``n`` of ``N`` sentences."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.counts = torch.zeros(WORD_BINS, dtype=torch.int64)  # sentences holding a word of each bin
        self.sentences = 0
        self._sketches: dict[bytes, tuple[list[int], list[float]]] = {}

    def count(self, rows: list[list[int]]) -> None:
        """Count the sentences of byte-id ``rows`` and the words each holds."""
        bins = []
        for row in rows:
            for words in sentence_words(row):
                bins.extend(_bin(w) % WORD_BINS for w in words)
                self.sentences += 1
        if bins:
            self.counts += torch.bincount(torch.tensor(bins), minlength=WORD_BINS)

    def rarity(self, words: list[bytes]) -> torch.Tensor:
        """The weight of each word (see the class)."""
        n = self.counts[torch.tensor([_bin(w) % WORD_BINS for w in words], dtype=torch.long)].double()
        return (torch.log((self.sentences + 1) / (n + 0.5)) + math.log(COMMON_SHARE)).clamp_min(0).float()

    def _sketch(self, word: bytes) -> tuple[list[int], list[float]]:
        if word not in self._sketches:
            hashes = [_bin(word, i + 1) for i in range(SKETCH)]
            self._sketches[word] = ([h % self.dim for h in hashes],
                                    [(1.0 if h >> 31 else -1.0) / math.sqrt(SKETCH) for h in hashes])
        return self._sketches[word]

    def directions(self, ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """(B, T, dim) the direction of each position of byte ids (B, T), or of the last
        ``last`` positions only; zero where a sentence has no rare word yet."""
        B, T = ids.shape
        n = T if last is None else last
        spans = []
        for b, row in enumerate(ids.tolist()):
            opens = sentence_start(row, T - n)  # read from the sentence holding the first position asked for
            spans += [(b, word, max(lo + opens, T - n), hi + opens) for word, lo, hi in word_spans(row[opens:])
                      if hi + opens > max(lo + opens, T - n)]
        out = torch.zeros(B * n * self.dim)
        if spans:
            weight = self.rarity([word for _, word, _, _ in spans])
            first, length, coords, signs = [], [], [], []
            for b, word, lo, hi in spans:
                c, s = self._sketch(word)
                first.append(b * n + lo - (T - n))
                length.append(hi - lo)
                coords.append(c)
                signs.append(s)
            length_ = torch.tensor(length)
            # every position of each span, then each of the word's coordinates
            span_of = torch.repeat_interleave(torch.arange(len(spans)), length_)
            offset = torch.arange(int(length_.sum())) - torch.repeat_interleave(length_.cumsum(0) - length_, length_)
            position = torch.tensor(first)[span_of] + offset
            index = position[:, None] * self.dim + torch.tensor(coords)[span_of]
            value = (weight[:, None] * torch.tensor(signs))[span_of]
            out.index_put_((index.flatten(),), value.flatten(), accumulate=True)
        return F.normalize(out.view(B, n, self.dim), dim=-1).to(ids.device)
