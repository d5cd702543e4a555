"""The pointer the ``reader`` feature installs after the last block (imported when a model is built).

Byte-level helpers (distance buckets, UTF-8 grammar) live here too, beside the module that
uses them (sentence words are ``cortex.core.words``', which memory keys also read); ``reader.py`` stays free of torch at import.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from cortex.core.words import WORD_RUN, closes_sentence, is_word_byte, sentence_start, word_spans  # noqa: F401 (word_spans: the reader's API)

BUCKETS = 12  # log2 distance buckets: 1, 2-3, 4-7, ... (the last holds everything further)
BINS = 2048  # hashed word bins of the lexical bags
MATCH = 5  # match-length buckets: 0, 1, 2, 3, 4+ equal tokens ending at the key and the query
COPY_LR_SCALE = 10.0  # learning-rate multiplier of the copy share
#: Korean particles and copula endings that close a word after a noun ("부산에", "여울이야",
#: "간호사다"), UTF-8, longest first: a told word ends where one follows
PARTICLES = tuple(sorted({w.encode() for w in (
    "이 가 은 는 을 를 에 의 와 과 도 로 야 다 만 랑 이야 이다 에서 에게 으로 이랑 한테 까지 부터 처럼 "
    "이나 이고 예요 이에요 입니다").split()}, key=len, reverse=True))
WORD_ENDS = b" .,!?\n"  # bytes that end a word in running text
WORD_END = -2  # the value of a key whose told word ends after it (``particle_keys``)


@functools.lru_cache(maxsize=64)
def distance_buckets(T: int, device: torch.device | None = None, last: int | None = None) -> torch.Tensor:
    """(Tq, T) bucket of ``t - j`` (``floor(log2(t - j))``, clamped) for the last ``Tq = last``
    queries ``t`` (all by default), 0 on and above the diagonal (remembered: not to be written to)."""
    pos = torch.arange(T, device=device)
    d = (pos[T - (T if last is None else last):, None] - pos[None, :]).clamp_min(1).float()
    return torch.log2(d).floor().long().clamp(max=BUCKETS - 1)


class _Lookup(torch.autograd.Function):
    """``table[index]`` whose backward counts the gradient into the table's few entries with one
    ``bincount`` (indexing's own backward accumulates element by element: slow on (B, T, T))."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.shape[0]
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        counted = torch.bincount(index.flatten(), weights=grad.flatten().float(), minlength=ctx.size)
        return counted.to(grad.dtype), None


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a small 1-d ``table`` of learned values and a large ``index``."""
    if not (torch.is_grad_enabled() and table.requires_grad):
        return table[index]  # nothing to count backward (reading): no autograd function to enter
    return _Lookup.apply(table, index)


def match_lengths(ids: torch.Tensor, last: int | None = None, fold: bool = False) -> torch.Tensor:
    """(B, Tq, T) how many tokens, up to ``MATCH - 1``, end equally at each key ``j`` and query
    ``t`` (``ids[t - i] == ids[j - i]`` for ``i < n``), for the last ``Tq = last`` queries (all
    by default): 1 where only the current tokens agree, more where what led to them agrees too
    (an induction head's signal). ``fold``: a byte id of an ASCII capital equals its small letter."""
    if fold:
        ids = torch.where((ids >= 65) & (ids <= 90), ids + 32, ids)
    B, T = ids.shape
    Tq = T if last is None else last
    pad = MATCH - 1  # before the start, queries and keys hold different ids: nothing matches there
    queries = F.pad(ids, (pad, 0), value=-2)
    keys = F.pad(ids, (pad, 0), value=-3)
    run = queries[:, pad + T - Tq: pad + T, None] == keys[:, None, pad: pad + T]
    out = run.to(torch.uint8)  # counted in bytes, widened once
    for i in range(1, MATCH - 1):  # the i-th tokens back of query and key agree
        run &= queries[:, pad + T - Tq - i: pad + T - i, None] == keys[:, None, pad - i: pad + T - i]
        out += run
    return out.long()


def continues_character(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 byte grammar of byte ids (B, T): whether each byte is a continuation byte, and
    whether the byte after each position must be one (its character is not complete yet)."""
    T = ids.shape[1]
    cont = (ids >= 0x80) & (ids < 0xC0)
    length = torch.ones_like(ids)  # bytes of the character a lead byte opens
    length[(ids >= 0xC0) & (ids < 0xE0)] = 2
    length[(ids >= 0xE0) & (ids < 0xF0)] = 3
    length[(ids >= 0xF0) & (ids < 0xF8)] = 4
    pos = torch.arange(T, device=ids.device).expand_as(ids)
    lead = torch.where(cont, torch.zeros_like(pos), pos).cummax(dim=1).values  # last non-continuation
    return cont, length.gather(1, lead) - 1 - (pos - lead) > 0


def word_bytes(ids: torch.Tensor) -> torch.Tensor:
    """Whether each byte id is part of a word (a letter, a digit, any byte of a non-ASCII
    character): ``is_word_byte`` on a tensor."""
    return ((ids >= 0x80) & (ids < 256)) | ((ids >= 48) & (ids <= 57)) | ((ids >= 65) & (ids <= 90)) | (
        (ids >= 97) & (ids <= 122))


def particle_keys(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) byte ids: where the rest of a word after a complete Hangul syllable is one of
    ``PARTICLES`` (the longest that fits). The token after such a key is grammar, not the
    told word: an answer ends the word there ("여울이야." answers "내 이름이 뭐야?" with
    "여울."). A word running to the end of ``ids`` may go on and counts nowhere."""
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        text = bytes(t if 0 <= t < 256 else 32 for t in row)
        for word in WORD_RUN.finditer(text):
            if word.end() == len(text):
                continue
            for particle in PARTICLES:
                stem = len(word.group()) - len(particle)
                if stem >= 3 and word.group().endswith(particle) and _is_hangul(word.group()[stem - 3:stem]):
                    out[b, word.start() + stem - 1] = True
                    break
    return out.to(ids.device)


def _is_hangul(char: bytes) -> bool:
    try:
        return "\uac00" <= char.decode("utf-8") <= "\ud7a3"
    except UnicodeDecodeError:
        return False


class ByteGrammar:
    """What the pointer reads of byte ids (B, T) position by position, each computed once per
    sequence (on first use): sentence numbers (``sentence``) and starts (``start``), continuation
    bytes and whether the byte after each position must continue its character (``character``,
    see ``continues_character``), word bytes (``word``). ``extended`` gives the grammar of the
    ids with one more token, from this one's last column, in Python: a decoded token does not
    recompute the whole sequence."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    @functools.cached_property
    def sentence(self) -> torch.Tensor:
        return PointerHead.sentences(self.ids)

    @functools.cached_property
    def start(self) -> torch.Tensor:
        return PointerHead._sentence_start(self.sentence)

    @functools.cached_property
    def character(self) -> tuple[torch.Tensor, torch.Tensor]:
        return continues_character(self.ids)

    @functools.cached_property
    def word(self) -> torch.Tensor:
        return word_bytes(self.ids)

    def extended(self, ids: torch.Tensor) -> ByteGrammar:
        """The grammar of ``ids``: this one's ids and one token more (otherwise computed anew)."""
        T = ids.shape[1]
        if T != self.ids.shape[1] + 1 or T < 2:
            return ByteGrammar(ids)
        rows = ids[:, -2:].tolist()
        sentence, start, (cont, inside), word = self.sentence, self.start, self.character, self.word
        columns: list[list] = [[] for _ in range(5)]
        for b, (before, token) in enumerate(rows):
            number = int(sentence[b, -1]) + closes_sentence(before)
            lead = T - 1
            if 0x80 <= token < 0xC0:  # a continuation byte: its character began at the last lead byte
                lead -= 1
                while lead > 0 and bool(cont[b, lead]):
                    lead -= 1
            first = int(ids[b, lead])
            length = 2 if 0xC0 <= first < 0xE0 else 3 if 0xE0 <= first < 0xF0 else 4 if 0xF0 <= first < 0xF8 else 1
            for column, value in zip(columns, (
                    number, T - 1 if number != int(sentence[b, -1]) else int(start[b, -1]), 0x80 <= token < 0xC0,
                    length - 1 - (T - 1 - lead) > 0, 0 <= token < 256 and is_word_byte(token))):
                column.append(value)
        grown = ByteGrammar(ids)
        new = [torch.tensor(c, device=ids.device)[:, None] for c in columns]
        grown.sentence, grown.start = torch.cat([sentence, new[0]], 1), torch.cat([start, new[1]], 1)
        grown.character = torch.cat([cont, new[2]], 1), torch.cat([inside, new[3]], 1)
        grown.word = torch.cat([word, new[4]], 1)
        return grown


class _Decoding:
    """What cached decoding keeps of the positions the pointer has read (``PointerHead._decoded``):
    their ids, queries (``q``), keys (``k``, and as unit vectors ``unit``), gate logits (``g``), word bags (``bags``) and
    ``key_ahead`` maps (B, T, ...), the key-to-key word overlap (``shared``, B, T, T), the
    summary inputs of the last ``window - 1`` positions, the last query's ``superseded`` row
    with the sentence starts it holds for, and the ``particle_keys`` marks. Rows live in
    buffers that grow by doubling: a token costs its own rows, not a copy of all of them."""

    ROWS = ("q", "k", "unit", "g", "bags", "key_ahead")

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # every id read so far
        self.buffers: dict[str, torch.Tensor] = {}
        self.v = self.a = self.later = self.later_starts = self.marks = None
        self.grammar: ByteGrammar | None = None  # of ``ids``
        self.marked = 0  # ids the marks were computed for

    @property
    def length(self) -> int:
        """Positions read so far."""
        return 0 if self.ids is None else self.ids.shape[1]

    def __getattr__(self, name: str) -> torch.Tensor | None:
        if name not in _Decoding.ROWS and name != "shared":
            raise AttributeError(name)
        buffer = self.__dict__["buffers"].get(name)
        if buffer is None:
            return None
        return buffer[:, :self.length, :self.length] if name == "shared" else buffer[:, :self.length]

    def extend(self, ids: torch.Tensor, **rows: torch.Tensor | None) -> None:
        """Append the new positions' ``rows`` (B, new, ...); ``ids`` are all ids so far."""
        L, T = self.length, ids.shape[1]
        for name, value in rows.items():
            if value is not None:
                self._room(name, value, T)[:, L:T] = value
        self.ids = ids

    def add_overlap(self, lex: torch.Tensor) -> None:
        """Add the word overlap ``lex`` (B, new, T) of the newest positions with every position
        as rows and columns of the key-to-key overlap."""
        T = self.length
        L = T - lex.shape[1]
        shared = self._room("shared", lex, T)
        shared[:, L:T, :T] = lex
        shared[:, :L, L:T] = lex[:, :, :L].transpose(1, 2)

    def _room(self, name: str, like: torch.Tensor, T: int) -> torch.Tensor:
        """The buffer of ``name``, grown (doubled) to hold ``T`` positions, rows kept."""
        buffer = self.buffers.get(name)
        if buffer is not None and buffer.shape[1] >= T:
            return buffer
        square = name == "shared"
        grown = like.new_zeros(like.shape[0], 2 * T, *((2 * T,) if square else like.shape[2:]))
        if buffer is not None:
            n = buffer.shape[1]
            if square:
                grown[:, :n, :n] = buffer
            else:
                grown[:, :n] = buffer
        self.buffers[name] = grown
        return grown

    def particles(self, ids: torch.Tensor) -> torch.Tensor:
        """``particle_keys(ids)``, computed again only from the word that ran to the end of the
        ids marked last (an earlier word's marks are final)."""
        start = self.marked
        for row in ids.tolist():
            p = self.marked
            while p > 0 and 0 <= row[p - 1] < 256 and is_word_byte(row[p - 1]):
                p -= 1
            start = min(start, p)
        tail = particle_keys(ids[:, start:])
        self.marks = tail if self.marks is None else torch.cat([self.marks[:, :start], tail], 1)
        self.marked = ids.shape[1]
        return self.marks


class PointerHead(nn.Module):
    """A pointer over the model's own context, installed with ``core.set_memory_layer``.

    It passes the residual stream through unchanged and keeps the hidden states: of the
    whole sequence in training (and any forward of more than one token), appended to in
    one-token cached decoding, so generation reads every earlier position without a
    second forward pass.

    Pointer logits of query t over keys j < t (the value of key j is the token after j)::

        exp(log_scale) * cos(q_t, k_j) + recency[log2(t - j)] + exp(log_lexical) * overlap(t, j)
            + sum(match[:n(t, j)]) + restated * [n(t, j) >= 2 and overlap(t, j) names]
            + supersede * later(t, j)

    ``q``, ``k``: linear maps of the normed hidden state plus a local summary (attention
    pooling over the last ``window`` positions); ``overlap``: rarity-weighted words shared
    by the query's sentence and key j's (other sentences only); ``n``: how many tokens end
    equally at t and j (see [`match_lengths`][cortex_plugins.cognition._pointer_head.match_lengths]),
    so that a told wording is continued as told (``restated`` more where the sentences share a
    rare word: the same name's statement); ``later``: how like key j (cosine of the
    keys) the most similar key is that comes after it, before t, in a sentence sharing a rare
    word with j's (see [`superseded`][cortex_plugins.cognition._pointer_head.PointerHead.superseded]):
    the later of two statements of the same kind about the same name wins. How the pointer's
    distribution meets the model's is ``combine`` (see
    [`combine_log_probs`][cortex_plugins.cognition._pointer_head.PointerHead.combine_log_probs]).
    """

    def __init__(self, dim: int, width: int, gate_bias: float = -1.0, window: int = 32, combine: str = "poe",
                 eps: float = 0.05, beta: float = 1.0, fold_case: bool = True, read_eps: float | None = None,
                 copying: bool = False, look_ahead: bool = False) -> None:
        super().__init__()
        if combine not in ("poe", "gate"):
            raise ValueError(f"combine must be 'poe' or 'gate', not {combine!r}")
        self.window = window
        self.combine, self.eps, self.beta = combine, eps, beta
        self.read_eps = eps if read_eps is None else read_eps  # the floor outside training
        # poe: a byte and its other ASCII case count as one in the pointer's factor (a value
        # told as "apples" answers "Apples."; the model supplies the case, the pointer the word)
        self.fold_case = fold_case
        self.norm = nn.RMSNorm(dim)
        self.query = nn.Linear(dim, width, bias=False)
        self.key = nn.Linear(dim, width, bias=False)
        # the local summary: content score plus a learned bias per offset over the last
        # `window` positions, a bag of what was said just before, wherever it sat
        self.salience = nn.Linear(dim, 1, bias=False)
        self.offset_bias = nn.Parameter(torch.zeros(window))
        self.summary = nn.Linear(dim, width, bias=False)
        self.query_summary = nn.Linear(width, width, bias=False)
        self.key_summary = nn.Linear(width, width, bias=False)
        # look_ahead: a key in a sentence finished before the query's also reads the state at
        # its sentence's end, which has seen the whole statement: before 치즈 in "나는 치즈를
        # 좋아해." nothing says a food follows, the sentence's end does. Zero at first (the key
        # as without it), learned
        self.key_ahead = nn.Linear(dim, width, bias=False) if look_ahead else None
        if self.key_ahead is not None:
            nn.init.zeros_(self.key_ahead.weight)
        # log-parametrised weights, so that Adam's small steps move them by a factor; q and
        # k are unit vectors under a learned scale, so the learned match stays on the scale
        # of the word overlap instead of outgrowing it
        self.log_lexical = nn.Parameter(torch.tensor(math.log(2.0)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.recency = nn.Parameter(torch.zeros(BUCKETS))
        # learned from priors: a key gains match[i] for its (i+1)-th equal token, and loses to
        # a later statement like it (supersede < 0)
        self.match = nn.Parameter(torch.ones(MATCH - 1))
        # ... and gains `restated` where the key's sentence also shares a rare word with the
        # query's: a told statement about the same name, continued as told (where a template
        # alone matches, as "Jun lives in " after "Mina lives in Busan.", the next word differs)
        self.restated = nn.Parameter(torch.tensor(2.0))
        self.supersede = nn.Parameter(torch.tensor(-3.0))
        # poe with copying: a learned share of the pointer's own distribution, by how much of its
        # attention sits on keys whose last two tokens equal the query's, with a byte tokenizer
        # only inside a word or in a sentence sharing a rare word with the query's (a word being
        # copied, a told statement continued; not the next word after a copied template);
        # starts near 0, so it grows only where copying beats the product
        self.copy_share = nn.Parameter(torch.tensor([-6.0, 0.0])) if copying and combine == "poe" else None
        if combine == "gate":
            self.gate = nn.Linear(dim, 1)
            self.log_lexical_gate = nn.Parameter(torch.tensor(0.0))
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, gate_bias)
        # the copy share moves ten times Adam's step (make_optimizer's lr_scale): at ~lr a step
        # a thousand steps would move it by about one from where it starts, far too little
        # for a share that must open where a told name is spelt. The other priors keep the
        # plain rate: freed, the pointer's own likelihood wore the token match and the
        # supersede penalty down to where corrections failed (measured, docs/benchmarks.md)
        if self.copy_share is not None:
            self.copy_share.lr_scale = COPY_LR_SCALE
        nn.init.normal_(self.query.weight, std=dim ** -0.5)
        nn.init.normal_(self.key.weight, std=dim ** -0.5)
        #: byte-level word -> rarity (0 for template words); set by the Reader
        self.idf: Callable[[bytes], float] | None = None
        self._rarities: dict[bytes, tuple[int, float]] = {}
        #: ids are UTF-8 bytes: a key is read only where its value can come next (a character's
        #: first byte where one starts, a continuation byte inside one); set by the Reader
        self.utf8 = False
        #: least word overlap between two key sentences for the later to supersede the earlier
        #: (a shared name, not a shared template word); set by the Reader
        self.min_shared = 0.0
        self.hidden = None
        self._grammar: ByteGrammar | None = None  # of the ids last asked about (``grammar``)
        #: ``False`` turns the pointer off at inference (the model alone)
        self.enabled = True

    @property
    def hidden(self) -> torch.Tensor | None:
        """(B, T, dim) states of the sequence so far; setting them forgets the decoding cache."""
        return self._hidden

    @hidden.setter
    def hidden(self, states: torch.Tensor | None) -> None:
        self._hidden = states
        self._decoding: _Decoding | None = None

    def forward(self, x: torch.Tensor, memory: Any = None) -> torch.Tensor:
        if self.training or x.shape[1] > 1 or self._hidden is None or self._hidden.shape[0] != x.shape[0]:
            self.hidden = x
        else:  # one new token of cached decoding: what is known of earlier positions stays
            self._hidden = torch.cat([self._hidden, x.detach()], dim=1)
        return x

    def grammar(self, ids: torch.Tensor) -> ByteGrammar:
        """The [`ByteGrammar`][cortex_plugins.cognition._pointer_head.ByteGrammar] of ``ids``, kept
        while the same tensor is asked about (one forward's parts share it; cached decoding
        extends it token by token)."""
        if self._grammar is None or self._grammar.ids is not ids:
            self._grammar = ByteGrammar(ids)
        return self._grammar

    # -- the word overlap -------------------------------------------------------------

    def bags(self, ids: torch.Tensor, start: int = 0, compact: bool = False) -> torch.Tensor:
        """(B, T - start, BINS): the sentence words of each position from ``start`` on, hashed,
        weighted by rarity. ``compact``: only the bins some word of ``ids`` falls in, as
        columns (the same dot products between bags, at a fraction of the width)."""
        B, T = ids.shape
        n = T - start
        if self.idf is None:
            return torch.zeros(B, n, 1 if compact else BINS, device=ids.device)
        first: list[int] = []
        bins: list[int] = []
        weight: list[float] = []
        lengths: list[int] = []
        for b, row in enumerate(ids.tolist()):
            opens = sentence_start(row, start)  # read from the sentence that holds `start`
            skip = start - opens
            for word, lo, hi in word_spans(row[opens:]):
                lo = max(lo, skip)
                if lo < hi:
                    bin_, rarity = self._word(word)
                    first.append(b * n + lo - skip)
                    lengths.append(hi - lo)
                    bins.append(bin_)
                    weight.append(rarity)
        # every position of each span, then words sharing a bin add up (the hashing trick)
        column = torch.tensor(bins, dtype=torch.long)
        width = BINS
        if compact:
            used, column = torch.unique(column, return_inverse=True)
            width = max(1, used.numel())
        out = torch.zeros(B * n * width)
        if n == 1:  # one position (a decoded token): every span is one position long
            out.index_put_((torch.tensor(first, dtype=torch.long) * width + column,), torch.tensor(weight),
                           accumulate=True)
            return out.view(B, n, width).to(ids.device)
        length = torch.tensor(lengths, dtype=torch.long)
        offset = torch.arange(int(length.sum())) - torch.repeat_interleave(length.cumsum(0) - length, length)
        rows = torch.repeat_interleave(torch.tensor(first, dtype=torch.long), length) + offset
        index = rows * width + torch.repeat_interleave(column, length)
        out.index_put_((index,), torch.repeat_interleave(torch.tensor(weight), length), accumulate=True)
        return out.view(B, n, width).to(ids.device)

    def _word(self, word: bytes) -> tuple[int, float]:
        """(hashed bin, ``idf``) of a word, remembered (the Reader's rarity does not change)."""
        if word not in self._rarities:
            self._rarities[word] = (zlib.crc32(word) % BINS, self.idf(word))
        return self._rarities[word]

    @staticmethod
    def _closes(ids: torch.Tensor) -> torch.Tensor:
        """Whether each token closes its sentence (``.``, ``!``, newline, a non-byte token; not ``?``)."""
        return (ids == 46) | (ids == 33) | (ids == 10) | (ids >= 256) | (ids < 0)

    @classmethod
    def sentences(cls, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) sentence number of each position (see ``_closes``)."""
        ends = cls._closes(ids).long()
        return torch.cumsum(ends, dim=1) - ends  # a boundary closes its sentence

    @classmethod
    def sentence_ends(cls, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) the position closing each position's sentence (the last, for one still open)."""
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device).expand_as(ids)
        return torch.where(cls._closes(ids), pos, T - 1).flip(1).cummin(dim=1).values.flip(1)

    def overlap(self, ids: torch.Tensor, last: int | None = None, bags: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Tq, T) rarity-weighted word overlap of each query position's sentence (the
        last ``last`` positions, default all) with each position's in *other* sentences
        (a sentence trivially shares its own words); ``bags``: ``self.bags(ids)`` if known."""
        bags = self.bags(ids, compact=True) if bags is None else bags
        sentence = self.grammar(ids).sentence
        q = bags if last is None else bags[:, -last:]
        qs = sentence if last is None else sentence[:, -last:]
        lex = torch.bmm(q, bags.transpose(1, 2))
        return lex.masked_fill(qs[:, :, None] == sentence[:, None, :], 0.0)

    # -- attention --------------------------------------------------------------------

    def project(self, h: torch.Tensor, ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Queries (scaled), keys, keys that read their sentence's end (``look_ahead`` and
        ``ids`` given, else None) and the gate logit (None without a gate) of states ``h``."""
        n = self.norm(h)
        v, a = self.summary(n).float(), self.salience(n).float()[..., 0]
        q, k, g = self._query_key(n, self.local_summary(v, a))
        ahead = self._ahead(k, self.key_ahead(n), ids) if self.key_ahead is not None and ids is not None else None
        return q, F.normalize(k, dim=-1), ahead, g

    def _query_key(self, n: torch.Tensor, s: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Scaled unit queries, keys (not normalised) and gate logits of normed states ``n``
        with local summaries ``s``."""
        q = F.normalize(self.query(n) + self.query_summary(s), dim=-1) * self.log_scale.exp()
        return q, self.key(n) + self.key_summary(s), (self.gate(n).squeeze(-1) if self.combine == "gate" else None)

    def _ahead(self, k: torch.Tensor, key_ahead: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Unit keys that read their sentence's end: ``k`` plus ``key_ahead`` (the ``key_ahead``
        map of every state) at the position closing the key's sentence."""
        end = self.sentence_ends(ids)[..., None].expand(-1, -1, key_ahead.shape[-1])
        return F.normalize(k + key_ahead.gather(1, end), dim=-1)

    def local_summary(self, v: torch.Tensor, a: torch.Tensor, new: int | None = None) -> torch.Tensor:
        """(B, new, width): for each of the last ``new`` positions (all by default), a
        softmax-weighted sum of the projected states ``v`` (B, T, width) of itself and the
        ``window - 1`` positions before it, weighted by saliences ``a`` (B, T).

        One banded (new, T) softmax and a batched product: cheaper forward and backward
        than unfolding ``v`` into windows."""
        T = v.shape[1]
        new = T if new is None else new
        if new == 1 and T <= self.window:  # one decoded token: every position is inside its window
            return torch.bmm(torch.softmax(a[:, None, :] + self.offset_bias[:T].flip(0), dim=-1), v)
        offset = torch.arange(T - new, T, device=v.device)[:, None] - torch.arange(T, device=v.device)
        inside = (offset >= 0) & (offset < self.window)
        bias = lookup(self.offset_bias, offset.clamp(0, self.window - 1)).masked_fill(~inside, float("-inf"))
        return torch.bmm(torch.softmax(a[:, None, :] + bias, dim=-1), v)

    def scores(self, q: torch.Tensor, k: torch.Tensor, lex: torch.Tensor | None = None,
               ids: torch.Tensor | None = None, later: torch.Tensor | None = None,
               match: torch.Tensor | None = None, ahead: torch.Tensor | None = None) -> torch.Tensor:
        """Attention logits (B, Tq, Tk) of queries at the last Tq positions over all Tk keys,
        strictly causal: position t sees keys j < t (their next token is known). The token
        match needs the input ``ids`` (``match``: their match lengths, if the caller has them);
        ``later`` is [`superseded`][cortex_plugins.cognition._pointer_head.PointerHead.superseded];
        ``ahead``: keys that read their sentence's end, for keys in sentences closed before the query's."""
        Tq, Tk = q.shape[1], k.shape[1]
        logits = torch.einsum("bqr,bkr->bqk", q.float(), k.float())
        if ahead is not None and ids is not None:  # the key's sentence ended before the query's began
            sentence = self.grammar(ids).sentence
            closed = sentence[:, None, :] < sentence[:, -Tq:, None]
            logits = torch.where(closed, torch.einsum("bqr,bkr->bqk", q.float(), ahead.float()), logits)
        logits = logits + lookup(self.recency, distance_buckets(Tk, q.device, Tq))
        if lex is not None:
            logits = logits + self.log_lexical.exp() * lex
        if ids is not None:
            n = self.matches(ids, Tq) if match is None else match
            logits = logits + lookup(F.pad(self.match.cumsum(0), (1, 0)), n)  # match[:n] summed
            if lex is not None:
                logits = logits + self.restated * self.same_statement(n, lex)
        if later is not None:
            logits = logits + self.supersede * later
        pos_q = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        pos_k = torch.arange(Tk, device=q.device)[None, :]
        blocked = pos_k >= pos_q
        if self.utf8 and ids is not None:
            cont, inside = self.grammar(ids).character
            value_cont = F.pad(cont[:, 1:], (0, 1))  # the value of key j is the byte after it
            blocked = blocked | (value_cont[:, None, :] != inside[:, -Tq:, None])
            if not self.training:  # when reading, a word starts where a told word started:
                # after a non-word byte, no key inside a word whose value goes on with it
                word = self.grammar(ids).word
                inner = word & F.pad(word[:, 1:], (0, 1))
                blocked = blocked | (~word[:, -Tq:, None] & inner[:, None, :])
        return logits.masked_fill(blocked, float("-inf"))

    def matches(self, ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """``match_lengths`` of the last ``last`` queries; when reading with ``fold_case``, a
        letter's two cases match, so that a told word goes on after the capital an answer
        starts with ("Gold." after told "gold": the model's own "Green." won before)."""
        return match_lengths(ids, last, fold=self.fold_case and not self.training)

    def same_statement(self, match: torch.Tensor, lex: torch.Tensor) -> torch.Tensor:
        """(B, Tq, T) where at least two tokens end equally at query and key and their
        sentences share a word as rare as a name (``min_shared``): a statement continued as told."""
        return (match >= 2) & (lex > 0) & (lex >= self.min_shared)

    def superseded(self, ids: torch.Tensor, k: torch.Tensor, shared: torch.Tensor,
                   last: int | None = None) -> torch.Tensor:
        """(B, Tq, T) for query t and key j: the largest cosine ``k_j · k_j'`` over the keys j'
        after j in sentences before t's that share a rare word with j's (``shared`` (B, T, T):
        the key-to-key word overlap, 0 within a sentence; at least ``min_shared``), 0 where
        there is none."""
        B, T = ids.shape
        after = torch.ones(T, T, dtype=torch.bool, device=k.device).triu(1)  # j' > j
        sim = torch.einsum("bjr,bkr->bjk", k.float(), k.float()).clamp_min(0)
        sim = sim.masked_fill(~(after & (shared > 0) & (shared >= self.min_shared)), 0.0)
        best = F.pad(sim.cummax(dim=-1).values, (1, 0))  # best[j, s] = max over j' < s
        start = self.grammar(ids).start
        if last is not None:
            start = start[:, -last:]
        # out[t, j] = best[j, start(t)]: the keys j' before t's sentence
        return best.gather(2, start[:, None, :].expand(B, T, -1)).transpose(1, 2)

    @staticmethod
    def _sentence_start(sentence: torch.Tensor) -> torch.Tensor:
        """(B, T) the first position of each position's sentence (``sentence``: ``sentences(ids)``)."""
        opens = torch.ones_like(sentence, dtype=torch.bool)
        opens[:, 1:] = sentence[:, 1:] != sentence[:, :-1]
        return (torch.arange(sentence.shape[1], device=sentence.device) * opens).cummax(dim=1).values

    def gate_logit(self, g: torch.Tensor, s: torch.Tensor, lex: torch.Tensor) -> torch.Tensor:
        """combine: gate: the gate from the hidden state plus the overlap of the attended keys."""
        best = (torch.softmax(s, dim=-1).nan_to_num(0.0) * lex).sum(-1)
        return g.float() + self.log_lexical_gate.exp() * best

    # -- combining with the model -----------------------------------------------------

    def combine_log_probs(self, logp: torch.Tensor, p_ptr: torch.Tensor, g: torch.Tensor | None = None,
                          ends: torch.Tensor | None = None) -> torch.Tensor:
        """Combined log-probabilities (..., vocab) of the model's ``logp`` and the pointer's
        distribution ``p_ptr`` (..., vocab; all zeros where the pointer sees no key); ``ends``
        (..., 1): the attention on keys whose told word ends there (``WORD_END``), a vote in
        the product for every ``WORD_ENDS`` byte alike (the model picks which), none in the copy.

        ``poe`` (product of experts): ``log p = log p_model + beta * log(eps + p_ptr) - log Z``
        (``read_eps`` in place of ``eps`` outside training).
        The model supplies the template and the type (a city starts here), the pointer the
        binding (which city); where the pointer has nothing the factor is a constant and the
        model is unchanged. With ``copying`` the product is mixed with the pointer's distribution,
        ``(1 - c m) p_poe + c p_ptr`` (``m``: the pointer's mass that names a token, so the mix
        sums to 1 where attention sits on word ends), where the share ``c`` (``g``, a logit) grows with the
        attention on keys that continue a copy: a name never seen in training, which the
        model's prior would veto letter by letter, is copied as told. ``gate``:
        ``g p_ptr + (1 - g) p_model``.
        """
        if self.combine == "poe":
            told = p_ptr  # a distribution (the folded factor below counts both cases)
            if self.fold_case and p_ptr.shape[-1] >= 128:  # a letter's two cases share their mass
                both = p_ptr[..., 65:91] + p_ptr[..., 97:123]
                p_ptr = torch.cat([p_ptr[..., :65], both, p_ptr[..., 91:97], both, p_ptr[..., 123:]], dim=-1)
            if ends is not None:
                p_ptr = p_ptr + ends * self._word_ends(p_ptr.shape[-1], p_ptr.device)
            eps = self.eps if self.training else self.read_eps
            joint = torch.log_softmax(logp + self.beta * torch.log(eps + p_ptr), dim=-1)
            if g is None:
                return joint
            return self._copy_mix(joint, told, told.sum(-1, keepdim=True), g[..., None])
        gate = torch.sigmoid(g.float())[..., None]
        return torch.log((gate * p_ptr + (1 - gate) * logp.exp()).clamp_min(1e-12))

    @staticmethod
    def _copy_mix(joint: torch.Tensor, told: torch.Tensor, mass: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``copying``: ``log((1 - c m) p_poe + c p_ptr)`` from ``joint`` (log p_poe), ``told``
        (p_ptr), the pointer's mass ``m`` that names a token and the share's logit ``g`` (each
        broadcast against ``joint``). The share c takes only that mass (the word-end votes stay
        in the product), so the mixture sums to 1; none where m is 0."""
        log_share = F.logsigmoid(g.float())
        log_rest = torch.logaddexp(F.logsigmoid(-g.float()),  # in log space: no NaN when saturated
                                   log_share + torch.log1p(-mass.clamp(max=1 - 1e-6)))
        keys = mass > 0
        return torch.logaddexp(log_rest.masked_fill(~keys, 0.0) + joint,
                               log_share.masked_fill(~keys, float("-inf")) + torch.log(told.clamp_min(1e-12)))

    def _poe_at_targets(self, logp: torch.Tensor, attn: torch.Tensor, values: torch.Tensor,
                        targets: torch.Tensor, told: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """``combine_log_probs(logp, p_ptr, g)`` (``poe``, ``beta`` 1, no word ends) at ``targets``
        (B, T) alone, where ``p_ptr`` is the attention ``attn`` (B, T, T) on keys' ``values`` (B, T)
        and ``told`` (B, T) its mass on each target: the same values and gradients without a
        (B, T, vocab) product. With ``beta`` 1 the normaliser is ``eps + sum_w p_model(w)
        p_ptr(w)``, the attention-weighted model probability of each key's value (both cases of a
        folded letter)."""
        said = attn * (values >= 0)[:, None, :]
        p = logp.exp()
        pointed = told
        if self.fold_case and logp.shape[-1] >= 128:  # a letter's two cases share their mass
            both = p[..., 65:91] + p[..., 97:123]
            p = torch.cat([p[..., :65], both, p[..., 91:97], both, p[..., 123:]], dim=-1)
            v, y = (torch.where((x >= 65) & (x <= 90), x + 32, x) for x in (values, targets))
            pointed = (said * (v[:, None, :] == y[:, :, None])).sum(-1)
        index = values.clamp_min(0)[:, None, :].expand(-1, attn.shape[1], -1)
        expected = (said * p.gather(2, index)).sum(-1)
        eps = self.eps if self.training else self.read_eps
        joint = (logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
                 + torch.log(eps + pointed) - torch.log(eps + expected))
        return joint if g is None else self._copy_mix(joint, told, said.sum(-1), g)

    def _attend(self, ids: torch.Tensor, last: int | None = None):
        """Attention (B, Tq, T) of the last ``Tq = last`` queries (all by default), its logits, the
        queries' word overlap with every key and the share (or gate) logits. Outside training the
        decoding cache supplies the per-position quantities of earlier calls."""
        if last is not None and not self.training:
            q, k, ahead, g, shared, later = self._decoded(ids)
        else:
            q, k, ahead, g = self.project(self.hidden, ids)
            shared = self.overlap(ids)  # key to key
            later = self.superseded(ids, k if ahead is None else ahead, shared, last)
        lex = shared if last is None else shared[:, -last:]
        if last is not None:
            q, g = q[:, -last:], None if g is None else g[:, -last:]
        match = self.matches(ids, q.shape[1])
        s = self.scores(q, k, lex, ids, later, match, ahead)
        attn = torch.softmax(s, dim=-1).nan_to_num(0.0)  # row 0 sees nothing
        if self.copy_share is not None:  # poe: the copy share's logit stands in for the gate's
            copies = match >= 2
            if self.utf8:  # inside a word, or a told statement about the same name continued; not
                # the next word after a copied template ("Jun lives in " from "Mina lives in Busan.")
                copies = (copies & self.grammar(ids).word[:, -copies.shape[1]:, None]) | self.same_statement(match, lex)
            g = self.copy_share[0] + self.copy_share[1].exp() * (attn * copies).sum(-1)
        return attn, s, lex, g

    def sequence_log_probs(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Combined log-probabilities (B, T, vocab) at every position of input ``ids`` (B, T)
        from the kept states (teacher-forced: ``logits[:, t]`` predicts the token after t)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.hidden is None or self.hidden.shape[1] != ids.shape[1] or not self.enabled:
            return logp
        attn, s, lex, g = self._attend(ids)
        p_ptr, ends = self._scatter(attn, self.told_values(ids), logp.shape[-1])
        if self.combine == "poe":
            return self.combine_log_probs(logp, p_ptr, g, ends)
        seen = (torch.arange(ids.shape[1], device=ids.device) > 0).float()
        gate = torch.sigmoid(self.gate_logit(g, s, lex)) * seen
        return torch.log((gate[..., None] * p_ptr + (1 - gate[..., None]) * logp.exp()).clamp_min(1e-12))

    def told_values(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) what each key of input ``ids`` points at when reading: the token after it (-1
        after the last), ``WORD_END`` where with a byte tokenizer and ``poe`` the rest of its word
        is a Korean particle (``particle_keys``). Training points at the token itself: there a
        vote for every word end at every particle taught the pointer to seek particles (the
        small reader of tests/test_reading.py bound 0.39 of new names where it binds 0.7-0.97)."""
        values = F.pad(ids[:, 1:], (0, 1), value=-1)
        if self.utf8 and self.combine == "poe" and not self.training:
            d = self._decoding
            marks = particle_keys(ids) if d is None or d.length != ids.shape[1] else d.particles(ids)
            values = values.masked_fill(marks, WORD_END)
        return values

    # -- cached decoding --------------------------------------------------------------

    @torch.no_grad()
    def _decoded(self, ids: torch.Tensor):
        """``_attend``'s per-position quantities of ``ids`` (B, T) from the kept states, in
        cached decoding: the rows of earlier calls are kept, only new positions are computed
        (each quantity depends on the positions up to its own). The last query's
        ``superseded`` row is computed once per sentence (it reads only earlier sentences)."""
        d = self._decoding
        T, h = ids.shape[1], self._hidden
        if d is None or d.length > T or not torch.equal(d.ids, ids[:, :d.length]):
            d = self._decoding = _Decoding()
        new = T - d.length
        self._grammar = d.grammar = ByteGrammar(ids) if d.grammar is None else d.grammar.extended(ids)
        if new:  # asked again for the same ids: nothing to add
            n = self.norm(h[:, d.length:T])
            v, a = self.summary(n).float(), self.salience(n).float()[..., 0]
            if d.length:  # the summary reads the `window - 1` positions before
                v, a = (torch.cat([old[:, max(0, old.shape[1] - self.window + 1):], x], 1)
                        for old, x in ((d.v, v), (d.a, a)))
            d.v, d.a = v, a
            q, k, g = self._query_key(n, self.local_summary(v, a, new))
            bags = self.bags(ids, d.length)
            d.extend(ids, q=q, k=k, unit=F.normalize(k, dim=-1), g=g, bags=bags,
                     key_ahead=None if self.key_ahead is None else self.key_ahead(n))
            d.add_overlap(self.overlap(ids, last=new, bags=d.bags))  # (B, new, T)
        ahead = None if self.key_ahead is None else self._ahead(d.k, d.key_ahead, ids)
        unit = d.unit
        starts = d.grammar.start[:, -1]
        if d.later_starts is None or not torch.equal(d.later_starts, starts):  # a new sentence
            d.later_starts = starts
            d.later = self.superseded(ids, unit if ahead is None else ahead, d.shared, last=1)
        later = F.pad(d.later, (0, T - d.later.shape[-1]))  # keys since the sentence began: none later
        return d.q, unit, ahead, d.g, d.shared, later

    @staticmethod
    def _scatter(attn: torch.Tensor, values: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tq, vocab) pointer distributions (attention mass on each key's value) and
        (B, Tq, 1) the mass on ``WORD_END`` keys."""
        index = values.clamp(0, vocab - 1)[:, None, :].expand(-1, attn.shape[1], -1)
        p_ptr = torch.zeros(*attn.shape[:2], vocab, device=attn.device).scatter_add_(
            2, index, attn * (values >= 0)[:, None, :])
        return p_ptr, (attn * (values == WORD_END)[:, None, :]).sum(-1, keepdim=True)

    @staticmethod
    @functools.cache
    def _word_ends(vocab: int, device: torch.device) -> torch.Tensor:
        """(vocab,) 1 at each ``WORD_ENDS`` byte of a vocabulary of byte ids."""
        word_ends = torch.zeros(vocab, device=device)
        word_ends[[b for b in WORD_ENDS if b < vocab]] = 1.0
        return word_ends

    def mixture_log_probs(self, logits: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                          ids: torch.Tensor) -> torch.Tensor:
        """log p(targets) (B, T) of the combined distribution over a whole sequence of input
        ``ids`` (the training NLL); ``values[b, j]`` is the token after j."""
        return self.training_log_probs(logits, values, targets, ids)[0]

    def training_log_probs(self, logits: torch.Tensor, values: torch.Tensor, targets: torch.Tensor,
                           ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mixture_log_probs`` and the pointer's own log-probability of each target (B, T):
        the attention on keys whose value is the target, ``nan`` where no key it sees holds
        it (nothing to point at). Under ``poe`` mass on a value the model vetoes costs the
        product little; the pointer's own likelihood asks it to land on the key that holds
        the answer (a told city, not the space before it)."""
        attn, s, lex, g = self._attend(ids)
        hit = values[:, None, :] == targets[:, :, None]  # (B, T, T): key j's value is the target
        p_ptr = (attn * hit).sum(-1)
        own = torch.log(p_ptr.clamp_min(1e-6)).masked_fill(~(hit & torch.isfinite(s)).any(-1), float("nan"))
        if self.combine == "poe":
            logp = torch.log_softmax(logits.float(), dim=-1)
            if self.beta == 1:
                return self._poe_at_targets(logp, attn, values, targets, p_ptr, g), own
            joint = self.combine_log_probs(logp, self._scatter(attn, values, logits.shape[-1])[0], g)
            return joint.gather(-1, targets.clamp_min(0)[..., None])[..., 0], own
        g = self.gate_logit(g, s, lex)
        seen = torch.arange(values.shape[1], device=values.device) > 0
        log_g = F.logsigmoid(g).masked_fill(~seen, float("-inf"))
        log_1g = F.logsigmoid(-g).masked_fill(~seen, 0.0)
        lm = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return torch.logaddexp(log_g + torch.log(p_ptr.clamp_min(1e-9)), log_1g + lm), own

    @torch.no_grad()
    def mix_last(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Combined log-probabilities (B, vocab) of the token after ``ids``, from the kept states."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        h = self.hidden
        if h is None or h.shape[1] < 2 or not self.enabled:
            return logp
        T = min(h.shape[1], ids.shape[1])
        if h.shape[1] > T:  # states of an earlier call before a one-token prompt
            self.hidden = h[:, -T:]
        ids = ids[:, -T:]
        attn, s, lex, g = self._attend(ids, last=1)
        p_ptr, ends = self._scatter(attn, self.told_values(ids), logp.shape[-1])
        if self.combine == "gate":
            g = self.gate_logit(g[:, -1:], s, lex)
        return self.combine_log_probs(logp, p_ptr[:, 0], None if g is None else g[:, 0], ends[:, 0])
