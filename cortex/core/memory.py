"""The memory system: how the model writes to, reads from and consolidates its memory tiers.

Entries are written per processed segment: the **key** of position ``t`` is the hidden
state after block ``key_layer`` computed over only the last ``key_window`` tokens
(a banded causal mask, so keys do not depend on distant context; with ``key_words`` they
also carry their sentence's rare words, see ``cortex.core.words``), the **value** is the
full-context hidden state after the memory layer, and the **token** is what followed.
An importance score chooses which positions are stored (``write``/``write_fraction``).

Two read modes, both configurable and both measured:

* ``knn_attention`` (Memorizing Transformers): at each memory layer a learned query looks
  up the ``k`` nearest entries of every tier in the row's own stream; attention over the
  retrieved (stop-gradient) values is mixed into the residual stream through a learned
  gate; tiers are weighted by a temperature-controlled softmax of their best score. With
  ``null_slot`` every query also attends to a learned null slot whose value is zero: in
  training it is one more soft choice, so the read learns to rest on it when nothing stored
  helps; outside training no entry scoring at or below it is read, so unrelated text reads
  nothing. With ``query: key`` the query is the position's own memory key, so a repeat of
  stored context finds its entry at cosine 1 before anything is learnt; with ``value: next``
  (or ``both``) an entry carries the embedding of the token that followed its key, which a
  read of the state alone cannot (a causal state does not know its next token). With
  ``read_at: frontier`` generation reads only at the last position of each pass, the one
  whose next token is unknown, so a prompt's own text pulls nothing from memory.
* ``knn_lm`` (Khandelwal et al.): training-free; at evaluation and generation the
  next-token distribution of the retrieved neighbours is interpolated with the model's.

Consolidation hands entries down the tier chain (STM -> LTM -> Archive) at every step end
or only during sleep (``consolidate: sleep``; the sleep plugin calls
[`MemorySystem.consolidate`][cortex.core.memory.MemorySystem.consolidate]).

How often each tier is read: with ``knn_attention`` every tier is read once per memory
layer per segment, for every token of every row (one batched search per tier); with
``knn_lm`` only at evaluation/generation, once per token. Writes happen once per segment.
In generation the key of each new token comes from a [`KeyStream`][cortex.core.memory.KeyStream]:
the states of the window are computed once, then one token at a time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from cortex.core.words import SentenceWords
from cortex.kernel.hookspecs import hookimpl
from cortex.kernel.interfaces import Entries, MemoryTier, Retrieval

if TYPE_CHECKING:
    from cortex.core.transformer import Transformer
    from cortex.kernel.manifest import MemorySettings

#: stream ids of sessions start here, above any batch-row stream used in training
SESSION_BASE = 1 << 32


def session_stream(session: str) -> int:
    """The stable stream id of a named session (``"self"`` is the persistent one)."""
    return SESSION_BASE + zlib.crc32(session.encode("utf-8"))


def tier_weights(best_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over tiers (last dim) of their best scores / ``temperature``.

    Empty tiers (score ``-inf``) get weight 0; when every tier is empty all weights are 0.
    A low temperature favours the best-matching tier, a high one spreads evenly — never a
    hard winner-take-all.
    """
    logits = best_scores / temperature
    empty = torch.isneginf(best_scores)
    weights = torch.softmax(logits.masked_fill(empty, -1e9), dim=-1)
    return weights.masked_fill(empty, 0.0)


class MemoryAttention(nn.Module):
    """kNN-attention after one block: a learned query reads every tier, a gate mixes it in."""

    def __init__(self, system: MemorySystem, dim: int, settings: MemorySettings) -> None:
        super().__init__()
        self._system = [system]  # a list: not a registered child (the system is not a Module of the core)
        self.norm = nn.RMSNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Parameter(torch.full((dim,), float(settings.gate_init)))
        self.log_scale = nn.Parameter(torch.tensor(-float(torch.log(torch.tensor(settings.read_temperature)))))
        if settings.null_slot is not None:  # the null slot's score for query q: q . null_key + null_score
            self.null_key = nn.Parameter(torch.zeros(dim))
            self.null_score = nn.Parameter(torch.tensor(float(settings.null_slot)))
        self.settings = settings
        with torch.no_grad():
            self.query.weight.copy_(torch.eye(dim))
            self.value.weight.copy_(torch.eye(dim))
            nn.init.normal_(self.out.weight, std=0.02)
        self.query.requires_grad_(settings.query == "learned")  # with `key`, the keys query

    def forward(self, x: torch.Tensor, memory: MemoryRead | None) -> torch.Tensor:
        """``x`` plus what the tiers hold for ``memory.streams``; ``x`` itself when memory
        is not consulted (``memory`` is ``None``)."""
        system = self._system[0]
        if memory is None or "knn_attention" not in self.settings.read:
            return x
        if memory.frontier and x.shape[1] > 1:
            last = replace(memory, frontier=False, keys=None if memory.keys is None else memory.keys[:, -1:])
            return torch.cat([x[:, :-1], self(x[:, -1:], last)], dim=1)
        if memory.value is None:
            memory.value = x.detach()
        if self.settings.query == "key":
            if memory.keys is None:
                raise ValueError("kNN-attention with query: key needs the memory keys of the pass (MemoryRead.keys)")
            q = memory.keys.to(x.dtype)
        else:
            q = F.normalize(self.query(self.norm(x)), dim=-1)
        null = q.float() @ self.null_key + self.null_score if self.settings.null_slot is not None else None
        tiers = system.readable_tiers(self.training)
        mixed, best = [], []
        for tier in tiers:
            slots = tier.dense_entries(memory.streams)
            if slots is not None:
                read = self._dense(tier, slots, q, null, memory, system.step)
            else:
                read = self._searched(tier, q, null, memory, system.step)
            if read is not None:
                mixed.append(read[0])
                best.append(read[1])
        if not mixed:
            return x
        weights = tier_weights(torch.stack(best, dim=-1), self.settings.tier_temperature).to(q.dtype)
        if memory.touch:
            system.record_read(weights)
        memory = torch.einsum("btn,nbtd->btd", weights, torch.stack(mixed))
        out = self.out(self.value(memory))
        return x + self.settings.residual_weight * torch.sigmoid(self.gate) * out

    def _attend(self, logits: torch.Tensor, empty: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        """Attention weights over slots: memory dropout and Gumbel-softmax in training; the
        null slot's share (scores ``null``), if any, is left out of the weights returned."""
        if self.training and self.settings.memory_dropout > 0:
            empty = empty | (torch.rand_like(logits) < self.settings.memory_dropout)
        if null is not None:
            logits = torch.cat([logits, (null * self.log_scale.exp()).to(logits.dtype)[..., None]], dim=-1)
            empty = F.pad(empty, (0, 1), value=False)
        logits = logits.masked_fill(empty, -1e9)
        if self.training and self.settings.gumbel_temperature:
            attn = F.gumbel_softmax(logits, tau=self.settings.gumbel_temperature, dim=-1)
        else:
            attn = torch.softmax(logits, dim=-1)
        attn = attn.masked_fill(empty, 0.0)
        return attn if null is None else attn[..., :-1]

    def _dense(self, tier: MemoryTier, slots: tuple, q: torch.Tensor, null: torch.Tensor | None, read: MemoryRead,
               step: int):
        """Attend to the top-k of every slot of a small exact tier with batched matmuls."""
        keys, values, valid = slots
        if not bool(valid.any()):
            return None
        scores = torch.bmm(q.float().detach(), keys.transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf"))
        scores = self._relevant(scores, null)
        k = min(self.settings.k, scores.shape[-1])
        top = scores.topk(k, dim=-1)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, True) & torch.isfinite(scores)
        found = torch.isfinite(top.values[..., 0])
        if read.touch:
            tier.mark_used(read.streams, keep.any(dim=1), step=step, queries=found.numel(), hits=int(found.sum()))
        logits = torch.bmm(q, keys.to(q.dtype).transpose(1, 2)) * self.log_scale.exp()
        attn = self._attend(logits, ~keep, null)
        return torch.bmm(attn, values.to(q.dtype)), top.values[..., 0]

    def _searched(self, tier: MemoryTier, q: torch.Tensor, null: torch.Tensor | None, read: MemoryRead, step: int):
        """Attend to the k nearest entries found by the tier's search."""
        r = tier.read_batch(q.detach().float(), read.streams, self.settings.k, step=step, touch=read.touch)
        scores = self._relevant(r.scores.float().masked_fill(r.ids < 0, float("-inf")), null)
        if not bool(torch.isfinite(scores).any()):
            return None
        logits = torch.einsum("btd,btkd->btk", q, r.keys.to(q.dtype)) * self.log_scale.exp()
        attn = self._attend(logits, torch.isneginf(scores), null)
        return torch.einsum("btk,btkd->btd", attn, r.values.to(q.dtype)), scores.max(dim=-1).values

    def _relevant(self, scores: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        """``scores`` (B, T, S) set to ``-inf`` (not read) outside training where below
        ``read_min_score`` or not above the null slot's score ``null`` (B, T)."""
        if self.training:
            return scores
        if self.settings.read_min_score is not None:
            scores = scores.masked_fill(scores < self.settings.read_min_score, float("-inf"))
        return scores if null is None else scores.masked_fill(scores <= null.detach()[..., None], float("-inf"))


@dataclass
class MemoryRead:
    """What one forward pass reads: the stream of each batch row. The memory system makes
    one per pass and hands it to the core, which passes it to every memory module."""

    streams: torch.Tensor  # (B,) int64
    #: the residual stream entering the first reader, kept as what this pass writes as values
    value: torch.Tensor | None = None
    #: ``False`` only looks: the read strengthens no entry and is not counted (``confidence``)
    touch: bool = True
    #: the memory keys (B, T, d) of the pass's positions, where readers query with them (``query: key``)
    keys: torch.Tensor | None = None
    #: only the last position reads (``read_at: frontier``): in generation the others' next tokens are known
    frontier: bool = False


class KeyStream:
    """The memory key of the newest position of a sequence that grows one token per call
    (generation), with the key-layer states of earlier positions kept.

    The first call (or one whose ids do not continue the last call's by one token) runs the
    last ``key_span()`` tokens through the blocks up to ``key_layer`` with the banded mask of
    `Transformer.hidden_states`, filling a KV cache;
    each later call runs only the new token against the cached keys and values of its band.
    A state depends only on its band of tokens, so the keys are those
    [`MemorySystem.keys`][cortex.core.memory.MemorySystem.keys] gives for the same window.
    """

    def __init__(self, system: MemorySystem) -> None:
        self.system = system
        core = system.core
        self.blocks = list(core.blocks[: system.key_layer + 1])
        self.window = system.settings.key_window
        self.span = system.key_span()
        self.keep = max(system.settings.key_offsets) + 1  # states a key reads
        self.cache = core.new_cache(1)
        self.tail: torch.Tensor | None = None  # the last `span` ids seen
        self.key: tuple[torch.Tensor, int] | None = None  # what the last call returned
        self.length = 0  # ids seen in all
        self.states: torch.Tensor | None = None  # (B, <= keep, d) normalised

    @torch.no_grad()
    def last(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The key (B, d) after ``ids`` (B, T) and its position in the window (for coverage)."""
        B, T = ids.shape
        if self.tail is not None and T == self.length and torch.equal(ids[:, -self.tail.shape[1]:], self.tail):
            return self.key  # asked again for the same ids: nothing new to run
        continues = (self.tail is not None and T == self.length + 1 and B == self.tail.shape[0]
                     and torch.equal(ids[:, -self.tail.shape[1] - 1:-1], self.tail))
        if continues and self.cache.length < self.system.core.config.context:
            self._step(ids[:, -1:])
        else:
            self._start(ids[:, -self.span:])
        self.tail, self.length = ids[:, -self.span:], T
        n = self.states.shape[1]
        rows = torch.arange(B, device=ids.device)
        key = self.system.combine(self.states, rows, torch.full_like(rows, n - 1))
        if self.system.words is not None:  # key_words: the words of the sentence so far
            words = self.system.words.directions(ids, last=1)[:, 0].to(key.device)
            key = F.normalize(key + self.system.settings.key_words * words, dim=-1)
        self.key = key, min(T, self.span) - 1
        return self.key

    def _run(self, x: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        rope = self.system.core._rope(start, start + x.shape[1])
        for block in self.blocks:
            x = block.body(x, rope, self.cache, start, mask)
        self.cache.length = start + x.shape[1]
        return F.normalize(x.float(), dim=-1)

    def _start(self, window: torch.Tensor) -> None:
        self.cache = self.system.core.new_cache(window.shape[0])
        T = window.shape[1]
        mask = None
        if 0 < self.window < T:
            pos = torch.arange(T, device=window.device)
            offset = pos[:, None] - pos[None, :]
            mask = (offset >= 0) & (offset < self.window)
        self.states = self._run(self.system.core.tok_emb(window), 0, mask)[:, -self.keep:]

    def _step(self, token: torch.Tensor) -> None:
        p = self.cache.length
        mask = None
        if 0 < self.window <= p:
            mask = (torch.arange(p + 1, device=token.device) > p - self.window)[None, :]
        h = self._run(self.system.core.tok_emb(token), p, mask)
        self.states = torch.cat([self.states, h], dim=1)[:, -self.keep:]


class MemorySystem:
    """Owns the tier chain of one model: writes, reads, kNN-LM and consolidation."""

    def __init__(self, settings: MemorySettings, tiers: list[MemoryTier], core: Transformer) -> None:
        if not tiers:
            raise ValueError("a memory system needs at least one tier")
        self.settings = settings
        self.tiers = tiers
        self.core = core
        layers = core.config.layers
        self.memory_layers = list(core.config.memory_layers)
        self.key_layer = settings.key_layer if settings.key_layer is not None else (
            self.memory_layers[0] if self.memory_layers else layers - 1)
        if self.key_layer >= layers:
            raise ValueError(f"memory_system.key_layer {self.key_layer} is not a block index (< {layers})")
        g = torch.Generator().manual_seed(0x6B6579)  # fixed: the same keys in every run and process
        d = core.config.dim
        self._rotations = [torch.eye(d)] + [torch.linalg.qr(torch.randn(d, d, generator=g))[0]
                                            for _ in range(len(set(settings.key_offsets)) - 1)]
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step = 0
        self.stats = {"writes": 0, "reads": 0, "consolidated": 0, "spilled": 0}
        self._tier_weight_sum = torch.zeros(len(tiers))
        #: ``key_words``: the sentence words keys carry, and the sentences counted for their rarity
        self.words = SentenceWords(core.config.dim) if settings.key_words else None
        self.readers: list[MemoryAttention] = []
        if "knn_attention" in settings.read:
            if not self.memory_layers:
                raise ValueError("knn_attention needs model.memory_layers, e.g. [1]")
            for layer in self.memory_layers:
                reader = MemoryAttention(self, core.config.dim, settings)
                core.set_memory_layer(layer, reader)
                self.readers.append(reader)

    # -- reading ----------------------------------------------------------------------

    @property
    def query_keys(self) -> bool:
        """Whether kNN-attention queries with the positions' memory keys (``query: key``)."""
        return bool(self.readers) and self.settings.query == "key"

    def pass_read(self, idx: torch.Tensor, streams: torch.Tensor, *, touch: bool = True,
                  keys: torch.Tensor | None = None) -> MemoryRead:
        """What a forward pass over ``idx`` reads: the rows' streams, and the positions' keys
        (``keys``, if already computed) where readers query with them."""
        if not self.query_keys:
            return MemoryRead(streams, touch=touch)
        return MemoryRead(streams, touch=touch, keys=self.keys(idx) if keys is None else keys)

    def generation_read(self, streams: torch.Tensor, keys: KeyStream | None) -> MemoryRead | Callable:
        """What generation passes to the core: one read, or (``query: key``) a function of
        the ids so far and the count of new positions a cached step runs, whose keys come
        from the key stream ``keys`` one token at a time. With ``read_at: frontier`` only the
        last position of a pass reads (and only its key is computed)."""
        frontier = self.settings.read_at == "frontier"
        if not self.query_keys:
            return MemoryRead(streams, frontier=frontier)

        def read(ids: torch.Tensor, new: int) -> MemoryRead:
            if new == 1 and keys is not None:
                return MemoryRead(streams, keys=keys.last(ids)[0][:, None])
            if frontier:  # the last key reads only the key span before it (its words: its sentence)
                span = ids[:, -min(new, self.key_span()):]
                return MemoryRead(streams, keys=self.keys(span, context=ids)[:, -1:], frontier=True)
            return MemoryRead(streams, keys=self.keys(ids[:, -new:]))
        return read

    def readable_tiers(self, training: bool) -> list[MemoryTier]:
        """Tiers kNN-attention reads: the first ``train_read_tiers`` in training, all otherwise."""
        self.stats["reads"] += 1
        tiers = self.tiers[: self.settings.train_read_tiers] if training else self.tiers
        return [t for t in tiers if len(t)]

    def record_read(self, weights: torch.Tensor) -> None:
        self._tier_weight_sum[: weights.shape[-1]] += weights.detach().float().reshape(-1, weights.shape[-1]).sum(0)

    # -- keys -------------------------------------------------------------------------

    @torch.no_grad()
    def keys(self, idx: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor] | None = None,
             context: torch.Tensor | None = None) -> torch.Tensor:
        """Memory keys (B, T, d) for every position of ``idx``, or (n, d) for the positions
        ``at = (rows, cols)`` alone (what a write stores).

        The hidden states after ``key_layer`` over only the last ``key_window`` tokens, at
        the positions ``key_offsets`` back, each normalised, turned by a fixed random
        rotation of its own offset and summed with weights ``key_decay ** i``. The
        rotations make two keys compare position by position — like one long vector of
        the states side by side, in the width of one — so "Mina's ... is" and "Jisoo's
        ... is" differ where the names sit instead of blurring into one bag of states.
        A key never depends on more than ``key_span()`` tokens, but for its words: with
        ``key_words`` it adds that weight times its sentence words' direction
        ([`SentenceWords`][cortex.core.words.SentenceWords]; read from ``context``, ids (B, >= T)
        that end with ``idx``, where the sentence began before ``idx``), normalised again.
        """
        h = F.normalize(self.core.hidden_states(idx, layer=self.key_layer, window=self.settings.key_window).float(),
                        dim=-1)
        B, T = idx.shape
        whole = at is None
        if whole:
            at = (torch.arange(B, device=h.device).repeat_interleave(T), torch.arange(T, device=h.device).repeat(B))
        keys = self.combine(h, *at)
        if self.words is not None:
            words = self.words.directions(idx if context is None else context, last=T)[at[0], at[1]]
            keys = F.normalize(keys + self.settings.key_words * words.to(keys.device), dim=-1)
        return keys.view(B, T, -1) if whole else keys

    def combine(self, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The keys (n, d) at positions ``(rows, cols)`` of normalised key-layer states ``h``
        (B, T, d): the states ``key_offsets`` back, each turned by its rotation and weighted
        ``key_decay ** i``, summed (offsets before the start left out), normalised. One matrix
        product per block of positions: the states side by side times the stacked rotations."""
        offsets, rotations = self._stacked_rotations(h.device)
        parts = []
        for lo in range(0, rows.numel(), 4096):  # blocks bound the (n, offsets * d) gather
            src = cols[lo:lo + 4096, None] - offsets
            back = h[rows[lo:lo + 4096, None], src.clamp(min=0)].masked_fill((src < 0)[..., None], 0.0)
            parts.append(back.flatten(1) @ rotations)
        keys = parts[0] if len(parts) == 1 else torch.cat(parts)
        return F.normalize(keys, dim=-1)

    def _stacked_rotations(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted key offsets and their rotations weighted ``key_decay ** i``, stacked
        (offsets * d, d) so that the states side by side times them sum the turned states."""
        if self._stacked is None or self._stacked[1].device != device:
            s = self.settings
            weighted = [s.key_decay**i * r for i, r in enumerate(self._rotations)]
            self._stacked = (torch.tensor(sorted(set(s.key_offsets)), device=device),
                             torch.cat(weighted).to(device))
        return self._stacked

    def key_coverage(self, positions: torch.Tensor) -> torch.Tensor:
        """The norm a key at each of ``positions`` (counted from the text's start) keeps of a
        key with every offset: offsets that reach before the start are missing.

        Offset terms are unit vectors turned by near-orthogonal rotations, so a key missing
        some matches a full key of the same text at about this cosine; kNN-LM lowers its
        floor by the same factor, and so compares only the offsets both keys have.
        """
        s = self.settings
        offsets = torch.tensor(sorted(set(s.key_offsets)))
        weights = s.key_decay ** (2 * torch.arange(len(offsets), dtype=torch.float32))
        present = (offsets[None, :] <= positions[:, None]).float()
        return (present @ weights / weights.sum()).sqrt()

    def key_span(self) -> int:
        """Tokens the key of the last position depends on (the whole context when unbounded)."""
        s, context = self.settings, self.core.config.context
        if not s.key_window:
            return context
        # each banded block reaches key_window - 1 tokens further back
        reach = (self.key_layer + 1) * (s.key_window - 1) + 1
        return min(context, reach + max(s.key_offsets))

    # -- a segment's forward pass -----------------------------------------------------

    @torch.no_grad()
    def write_segment(self, idx: torch.Tensor, targets: torch.Tensor, streams: torch.Tensor,
                      *, importance: torch.Tensor | None = None, values: torch.Tensor | None = None,
                      meta: list[dict[str, Any]] | None = None, training: bool = False,
                      keys: torch.Tensor | None = None) -> int:
        """Write the chosen positions of a processed segment to the first tier.

        ``importance`` (B, T) ranks positions for ``write: surprise``; ``values`` (B, T, d)
        are what kNN-attention will read (the stream entering the memory layer, with ``value:
        next`` or ``both`` the embedding of the token that followed); without readers the keys
        serve as values. ``keys`` (B, T, d): the positions' keys, if the pass computed them.
        Positions whose target is -1 are never written.
        Returns the number of entries written.
        """
        B, T = idx.shape
        keep = targets >= 0
        if self.settings.write == "surprise" and importance is not None and T > 1:
            n = max(1, round(T * self.settings.write_fraction))
            ranked = importance.float().masked_fill(~keep, float("-inf"))
            top = ranked.topk(min(n, T), dim=1).indices
            chosen = torch.zeros_like(keep)
            chosen.scatter_(1, top, True)
            keep = keep & chosen
        rows, cols = keep.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return 0
        keys = self.keys(idx, at=(rows, cols)) if keys is None else keys[rows, cols]
        entries = Entries(
            keys=keys,
            values=keys if values is None else self._values(values[rows, cols].float(), targets[rows, cols]),
            tokens=targets[rows, cols].long(),
            streams=streams[rows].long(),
            meta=[meta[i] for i in (rows * T + cols).tolist()] if meta is not None else None,
        )
        spill = self.settings.spill == "always" or (self.settings.spill == "inference" and not training)
        for tier in self.tiers[:-1]:
            tier.keep_displaced = spill
        self.tiers[0].write(entries, step=self.step)
        if spill:
            for upper, lower in zip(self.tiers, self.tiers[1:]):
                pushed = upper.displaced()
                if pushed is not None and len(pushed):
                    lower.write(pushed, step=self.step)
                    self.stats["spilled"] += len(pushed)
        self.stats["writes"] += len(entries)
        return len(entries)

    def _values(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What kNN-attention will read of entries with ``states`` (n, d) followed by ``tokens``:
        the states, the tokens' embeddings at the states' norm, or their sum (``value``)."""
        if self.settings.value == "state":
            return states
        told = self.core.tok_emb(tokens).float()
        told = told * (states.norm(dim=-1, keepdim=True) / told.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return told if self.settings.value == "next" else states + told

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None, streams: torch.Tensor,
                *, training: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The core's forward pass with memory: reads, then (training) writes or (eval) kNN-LM."""
        segment = self.pass_read(idx, streams)
        logits, loss = self.core(idx, targets, memory=segment)
        if training:
            if targets is not None and self.settings.write_in_training:
                importance = None
                if self.settings.write == "surprise":
                    with torch.no_grad():
                        importance = F.cross_entropy(logits.detach().float().transpose(1, 2),
                                                     targets.clamp_min(0), reduction="none")
                self.write_segment(idx, targets, streams, importance=importance, values=segment.value,
                                   training=True, keys=segment.keys)
                if self.words is not None:  # the written sentences count towards each word's rarity
                    self.words.count(idx.tolist())
        elif "knn_lm" in self.settings.read:
            logits = self.knn_lm_logits(idx, logits, streams, keys=segment.keys)
            if targets is not None:
                loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def remember(self, ids: torch.Tensor, stream: int, meta: dict[str, Any] | None = None) -> int:
        """Store every position of token ids (1-D) in ``stream``; returns entries written.

        Texts longer than the context are stored window by window, the keys near a window's
        start read over the text before it, so where a window cuts a text does not show in
        its keys. Entries pushed out of
        a full tier move down the chain (``spill``), so what was told is not forgotten, and
        each text ends like a training step: consolidation hands due entries down.
        """
        ids = ids.reshape(-1)
        ctx = self.core.config.context
        written = 0
        if self.words is not None:  # its sentences count towards each word's rarity
            self.words.count([ids.tolist()])
        for start in range(0, max(1, ids.numel() - 1), ctx):
            chunk = ids[start : start + ctx + 1]
            if chunk.numel() < 2:
                break
            inputs, targets = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
            streams = torch.tensor([stream])
            told = ids[: start + inputs.shape[1]].unsqueeze(0)  # what the window's sentences began with
            keys = self.keys(inputs, context=told)
            if start:  # keys near the window's start read the text before it too
                n = min(self.key_span() - 1, ctx // 2, inputs.shape[1])
                keys[:, :n] = self.keys(ids[start - n:start + n].unsqueeze(0), context=told[:, :start + n])[:, n:]
            segment = self.pass_read(inputs, streams, keys=keys)
            self.core(inputs, memory=segment)
            entry_meta = None
            if meta is not None:
                entry_meta = [{**meta, "position": start + t} for t in range(inputs.shape[1])]
            written += self.write_segment(inputs, targets, streams, values=segment.value, meta=entry_meta,
                                          importance=None, keys=keys)
        self.step += 1  # outside training, each remembered text ages memory by one step
        if self.settings.consolidate == "step":
            self.consolidate()  # as at a training step's end: due entries move down the tiers
        return written

    @torch.no_grad()
    def knn_lm_logits(self, idx: torch.Tensor, logits: torch.Tensor, streams: torch.Tensor, *,
                      touch: bool = True, keys: torch.Tensor | None = None,
                      told: Callable[[str | None], bool] | None = None) -> torch.Tensor:
        """kNN-LM log-probabilities (B, T, vocab) for every position of ``idx``; ``keys``: its
        memory keys, if the pass computed them; ``told``: see ``knn_distribution``."""
        keys = self.keys(idx) if keys is None else keys
        vocab = logits.shape[-1]
        coverage = self.key_coverage(torch.arange(idx.shape[1]))
        rows = []
        for b in range(idx.shape[0]):
            dist, lam = self.knn_distribution(keys[b], int(streams[b]), vocab, touch=touch, coverage=coverage,
                                              told=told)
            rows.append(self.interpolate(logits[b], dist, lam))
        return torch.stack(rows)

    @torch.no_grad()
    def knn_lm_next(self, ids: torch.Tensor, logits: torch.Tensor, stream: int, *,
                    keys: KeyStream | None = None, told: Callable[[str | None], bool] | None = None) -> torch.Tensor:
        """kNN-LM log-probabilities (B, vocab) of the token after ``ids`` (B, T).

        ``keys`` is the generation's [`KeyStream`][cortex.core.memory.KeyStream] (the same key,
        computed from the states of earlier calls); without one the window is computed anew.
        ``told``: see ``knn_distribution``.
        """
        if not any(len(tier) for tier in self.tiers):
            return torch.log_softmax(logits.float(), dim=-1)  # nothing held: the model's own
        key, position = (keys if keys is not None else KeyStream(self)).last(ids)
        coverage = self._coverage_at(position).expand(key.shape[0])
        dist, lam = self.knn_distribution(key, stream, logits.shape[-1], coverage=coverage, told=told)
        return self.interpolate(logits, dist, lam)

    def _coverage_at(self, position: int) -> torch.Tensor:
        """``key_coverage`` of one position, remembered (generation asks for the same few)."""
        cache = self.__dict__.setdefault("_coverage_cache", {})
        if position not in cache:
            cache[position] = self.key_coverage(torch.tensor([position]))
        return cache[position]

    # -- kNN-LM -----------------------------------------------------------------------

    @torch.no_grad()
    def knn_distribution(self, keys: torch.Tensor, stream: int, vocab: int, *, touch: bool = True,
                         coverage: torch.Tensor | None = None,
                         told: Callable[[str | None], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token distribution (Q, vocab) of the neighbours of ``keys`` (Q, d) in ``stream``,
        and the memory weight λ per query: 0 where nothing close was found, else
        ``lm_lambda * s / (s + 1)`` with ``s`` the strength (1 + uses) of the best match.

        A neighbour counts from a cosine of ``lm_min_score`` times the query's ``coverage``
        (Q,) (see [`key_coverage`][cortex.core.memory.MemorySystem.key_coverage]; 1 by default).

        The neighbours of every tier are pooled into one softmax (a kNN-LM's datastore is
        the whole hierarchy): the best match wins wherever it is held. Weighting tiers
        first would let a near miss in one tier outvote the exact match in another.

        With ``told`` only entries written from a text it accepts count (the ``text`` of the
        entry's metadata, ``None`` where there is none); a tier that keeps no metadata
        (no ``meta_of``) is read whole.
        """
        s = self.settings
        Q = keys.shape[0]
        dist = torch.zeros(Q, vocab)
        tiers = [tier for tier in self.tiers if len(tier)]
        reads = [tier.read(keys, s.k, stream=stream, step=self.step, touch=touch) for tier in tiers]
        if not reads:
            return dist, torch.zeros(Q)
        scores = torch.cat([r.scores for r in reads], dim=1)
        tokens = torch.cat([r.tokens for r in reads], dim=1)
        uses = torch.cat([self._uses(r) for r in reads], dim=1)
        floor = s.lm_min_score if coverage is None else s.lm_min_score * coverage[:, None]
        valid = (torch.cat([r.ids for r in reads], dim=1) >= 0) & (scores >= floor)
        valid &= (tokens >= 0) & (tokens < vocab)
        if told is not None:
            valid &= torch.cat([self._written_from(tier, r.ids, told) for tier, r in zip(tiers, reads)], dim=1)
        found = valid.any(dim=1)
        logits = (scores / s.lm_temperature + s.use_bonus * torch.log1p(uses)).masked_fill(~valid, float("-inf"))
        p = torch.zeros_like(logits)
        p[found] = torch.softmax(logits[found], dim=1)
        dist.scatter_add_(1, tokens.clamp(min=0), p)
        best = scores.masked_fill(~valid, float("-inf")).argmax(dim=1, keepdim=True)
        strength = 1 + uses.gather(1, best)[:, 0]
        lam = torch.where(found, s.lm_lambda * strength / (strength + 1), torch.zeros(Q))
        if s.lm_margin > 0:  # a neighbour saying another token nearly as close: memory is unsure
            rival = valid & (tokens != tokens.gather(1, best))
            margin = scores.gather(1, best)[:, 0] - scores.masked_fill(~rival, float("-inf")).max(dim=1).values
            lam = lam * -torch.expm1(-margin / s.lm_margin)
        return dist, lam

    @staticmethod
    def _written_from(tier: MemoryTier, ids: torch.Tensor, told: Callable[[str | None], bool]) -> torch.Tensor:
        """Whether each entry ``ids`` (Q, k) of ``tier`` was written from a text ``told`` accepts."""
        meta_of = getattr(tier, "meta_of", None)
        if meta_of is None:
            return torch.ones_like(ids, dtype=torch.bool)
        return torch.tensor([told(m.get("text") if isinstance(m, dict) else None) for m in meta_of(ids)],
                            dtype=torch.bool).view(ids.shape)

    @staticmethod
    def _uses(r: Retrieval) -> torch.Tensor:
        return r.uses.float() if r.uses is not None else torch.zeros_like(r.scores)

    def interpolate(self, logits: torch.Tensor, knn: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Log of ``(1 - λ) p_model + λ p_knn`` per row (λ = 0 leaves the model's)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if not bool((lam > 0).any()):
            return logp
        lam = lam.unsqueeze(-1)
        mixed = torch.logaddexp(logp + torch.log1p(-lam.clamp(max=1 - 1e-6)),
                                torch.log(knn.clamp_min(1e-12)) + torch.log(lam.clamp_min(1e-12)))
        return torch.where(lam > 0, mixed, logp)

    # -- consolidation ----------------------------------------------------------------

    def consolidate(self, step: int | None = None) -> int:
        """Hand entries down the tier chain; returns how many moved."""
        step = self.step if step is None else step
        moved = 0
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            entries = upper.handover(step=step)
            if entries is not None and len(entries):
                lower.write(entries, step=step)
                moved += len(entries)
        self.stats["consolidated"] += moved
        return moved

    # -- lifecycle --------------------------------------------------------------------

    @hookimpl
    def cortex_before_step(self, model: Any, step: int, batch: torch.Tensor) -> None:
        self.step = step

    @hookimpl
    def cortex_after_step(self, model: Any, step: int, metrics: dict[str, float]) -> None:
        if self.settings.consolidate == "step":
            metrics["memory/consolidated"] = float(self.consolidate(step))
        metrics["memory/writes"] = float(self.stats["writes"])

    @hookimpl
    def cortex_sleep(self, model: Any, phase: str, step: int) -> None:
        if phase == "nrem":
            self.consolidate(step)

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "stats": dict(self.stats), "tier_weight_sum": self._tier_weight_sum.clone()}
        if self.words is not None:
            state["word_counts"], state["word_sentences"] = self.words.counts.clone(), self.words.sentences
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stats.update({k: int(v) for k, v in state["stats"].items()})
        self._tier_weight_sum = state["tier_weight_sum"].clone()
        if self.words is not None and "word_counts" in state:
            self.words.counts, self.words.sentences = state["word_counts"].clone(), int(state["word_sentences"])

    def summary(self) -> dict[str, Any]:
        total = self._tier_weight_sum.sum().clamp_min(1e-9)
        return {
            **self.stats,
            "read": list(self.settings.read),
            "tier_weight_share": {t.key: float(w / total) for t, w in zip(self.tiers, self._tier_weight_sum)},
        }
