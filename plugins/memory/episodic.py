"""Episodic memory (``episodic``): experiences stored as sequences, recalled from a noisy cue.

```yaml
features:
  - {type: episodic, settings: {capacity: 10000, key: ngram, window: 8}}
```

A cognitive feature, not a memory tier: a tier stores independent (key, value) pairs that
the model reads at every layer call, while an episode is an *ordered sequence* whose use is
to be completed (cue -> episode -> what came next). It lives beside the tier chain and is
fed by the lifecycle:

- [`record`][cortex_plugins.memory.episodic.EpisodicMemory.record]``(tokens_or_text, episode=...)``
  appends items (token ids, or text encoded with the model's tokenizer) to an episode;
- ``cortex_interaction`` records every chat turn (prompt, then response) in the episode of
  its session (``episode_per: session``) or in a new episode per turn;
- ``record_every_steps: N`` records the first row of every N-th training batch.

**Items and temporal context.** Every stored item is one token with its episode id, its
order inside the episode and the step (and write clock) at which it was written.

**Keys.** Each item is keyed by a vector of its local context, the ``window`` items ending
at it (and the one before, for the oldest bigram; earlier items of the same episode
included, across turns):

- ``ngram`` (default): a signed feature-hashing of position-tagged unigrams, order-free
  unigrams and position-tagged bigrams into ``key_dim`` buckets. A cue with a few of its tokens
  replaced keeps most of its unigram and bigram features, so its key stays close to the
  stored one (``tests/test_episodic.py`` checks noisy cues); unrelated contexts are near-orthogonal.
- ``model``: the model's own memory keys (``model.memory_system.keys``: local-window hidden
  states), or the last block's local-window hidden states when there are no tiers.
- ``both``: the two, concatenated with equal weight.

**Recall** ([`recall`][cortex_plugins.memory.episodic.EpisodicMemory.recall]) is two-stage: for a
few probe positions of the cue (its last token, then one every ``window`` tokens back) the
``candidates`` items with the most similar keys are found by one matrix product; each
candidate is then *verified* by aligning the whole cue on it and counting the cue tokens
that agree with the stored ones. The best alignment (agreement, then key similarity) gives the episode, the
position in it and the continuation (the items that came next). Below ``min_score``
agreement nothing is returned.

**Capacity and eviction.** At most ``capacity`` items are held. A write that would exceed
it first evicts whole episodes, oldest first (by creation), never the episode being written,
until the write fits with 5% of the capacity to spare (eviction is amortised);
an episode larger than the capacity on its own keeps its newest items.

**Persistence.** Tokens, episode ids, orders and steps are saved as tensors, episode
metadata as JSON. ``ngram`` keys are recomputed on load (they depend on tokens alone);
model keys are saved, since they depend on the weights at writing time.

**Replay.** [`replay`][cortex_plugins.memory.episodic.EpisodicMemory.replay]``(n)`` returns stored
episodes (most recent, oldest or a seeded random sample) for sleep replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import F, torch, no_grad

if TYPE_CHECKING:
    from cortex import ModelHandle

_P = 2_147_483_647  # 2**31 - 1: hashing modulus (products of two residues fit in int64)
_M1, _M2, _M3, _M4 = 1_000_003, 999_983, 2_654_435, 40_503


def _mix(h: torch.Tensor, x: torch.Tensor | int) -> torch.Tensor:
    return (h * _M1 + x) % _P


def ngram_keys(tokens: torch.Tensor, *, dim: int, window: int, left: torch.Tensor | None = None) -> torch.Tensor:
    """Hashed local-context keys (L, dim), unit norm, one per token of ``tokens`` (L,).

    The key of position ``t`` sums signed hashed features of the ``window`` tokens ending at
    ``t``: (token, offset), (token) and (previous token, token, offset). ``left`` are the
    tokens that precede ``tokens`` (earlier items of the same episode).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    L = tokens.numel()
    if L == 0:
        return torch.zeros(0, dim)
    pre = torch.zeros(0, dtype=torch.long) if left is None else torch.as_tensor(left, dtype=torch.long).reshape(-1)
    pre = pre[max(0, pre.numel() - window):]
    pad = torch.full((window + 1 - pre.numel(),), -1, dtype=torch.long)
    seq = torch.cat([pad, pre, tokens])  # position t of `tokens` is seq[window + 1 + t - ... ]
    base = seq.numel() - L
    pos = torch.arange(L)[:, None] + base - torch.arange(window)[None, :]  # (L, w): t - j
    cur, prev = seq[pos], seq[pos - 1]
    j = torch.arange(window)[None, :].expand(L, window)
    tok = cur + 1  # 0 is padding
    feats = [
        (_mix(_mix(torch.full_like(tok, 11), tok), j), cur >= 0),  # token at offset j
        (_mix(torch.full_like(tok, 13), tok), cur >= 0),  # token anywhere in the window
        (_mix(_mix(_mix(torch.full_like(tok, 17), prev + 1), tok), j), (cur >= 0) & (prev >= 0)),  # bigram
    ]
    h = torch.cat([f for f, _ in feats], dim=1)
    weight = torch.cat([m for _, m in feats], dim=1).float()
    bucket = (h * _M3 % _P) % dim
    sign = ((h * _M4 % _P) >> 7 & 1).float() * 2 - 1
    keys = torch.zeros(L, dim).scatter_add_(1, bucket, sign * weight)
    return F.normalize(keys, dim=-1)


@dataclass
class Episode:
    """One stored episode: its items in order, with their temporal context."""

    id: int
    tokens: torch.Tensor  # (n,) int64, in order
    orders: torch.Tensor  # (n,) int64, position of each item in the episode
    steps: torch.Tensor  # (n,) int64, step at which each item was written
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = None  # decoded with the model's tokenizer, when there is one


@dataclass
class EpisodeRecall:
    """The episode a cue recalled, where the cue ended in it, and what came next."""

    episode: int
    position: int  # order (in its episode) of the item aligned with the cue's last token
    score: float  # share of the cue's tokens that agree with the stored episode
    similarity: float  # cosine of the cue's key and the matched item's key
    continuation: list[int]
    text: str | None = None  # the continuation decoded, when there is a tokenizer
    meta: dict[str, Any] = field(default_factory=dict)


_COLUMNS = ("tokens", "episode", "order", "step", "clock")


class EpisodicMemory(CognitiveFeature):
    """Sequences with temporal context; cue -> episode -> continuation (see the module docs)."""

    name = "episodic"

    class Settings(Settings):
        capacity: int = Field(10000, gt=0, description="Most items (tokens) held over all episodes.")
        key: Literal["ngram", "model", "both"] = Field(
            "ngram", description="Item keys: hashed local n-grams, the model's memory keys, or both.")
        key_dim: int = Field(512, ge=16, description="Width of the hashed n-gram keys.")
        window: int = Field(8, ge=1, description="Items of local context a key covers (the item and those before it).")
        candidates: int = Field(64, gt=0, description="Items found per probe by key similarity, then verified by aligning the cue.")
        probes: int = Field(4, ge=1, description="Cue positions (one every `window` tokens from the end) whose keys are searched.")
        max_cue: int = Field(64, ge=1, description="Only the last `max_cue` tokens of a cue are used.")
        continuation: int = Field(32, ge=0, description="Items returned after the matched position.")
        min_score: float = Field(0.25, ge=0, le=1, description="Least share of agreeing cue tokens for a recall.")
        episode_per: Literal["session", "turn"] = Field(
            "session", description="Chat turns go to one episode per session, or one episode per turn.")
        record_interactions: bool = Field(True, description="Record every chat turn (cortex_interaction).")
        record_every_steps: int = Field(0, ge=0, description="Record batch row 0 every N training steps (0: never).")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        self.tokenizer = context.tokenizer
        self.model_dim = int(context.config.dim) if context.config is not None else None
        if settings.key != "ngram" and self.model_dim is None:
            raise ValueError(f"key: {settings.key} needs the model's shape")
        self.key_width = {"ngram": settings.key_dim, "model": self.model_dim or 0,
                          "both": settings.key_dim + (self.model_dim or 0)}[settings.key]
        self.step = 0
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.cols = {name: torch.zeros(0, dtype=torch.long) for name in _COLUMNS}
        self.keys = torch.zeros(0, self.key_width)
        self.episodes: dict[int, dict[str, Any]] = {}  # id -> metadata, in creation order
        self.names: dict[str, int] = {}  # episode name (e.g. a session) -> current episode id
        self.next_episode = 0
        self.clock = 0
        self.counters = {"recorded": 0, "evicted_items": 0, "evicted_episodes": 0, "recalls": 0, "hits": 0,
                         "replayed": 0}
        self._sorted: tuple[torch.Tensor, ...] | None = None

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def cortex_before_step(self, model: ModelHandle, step: int, batch: torch.Tensor) -> None:
        self.step = step
        every = self.settings.record_every_steps
        if every and step % every == 0 and batch.numel():
            self.record(batch[0].reshape(-1), meta={"source": "train", "step": step})

    @hookimpl
    def cortex_interaction(self, model: ModelHandle, session: str, prompt: str, response: str) -> None:
        if not self.settings.record_interactions:
            return
        tokens = self._encode(prompt) + self._encode(response)
        if not tokens:
            return
        episode = session if self.settings.episode_per == "session" else None
        e = self.record(tokens, episode=episode, meta={"session": session})
        self.episodes[e]["turns"] = int(self.episodes[e].get("turns", 0)) + 1

    # ------------------------------------------------------------------ storage

    def __len__(self) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return self.settings.capacity

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise CortexError("episodic: text needs the model's tokenizer; pass token ids instead")
        return list(self.tokenizer.encode(text))

    def _as_tokens(self, tokens_or_text: Any) -> torch.Tensor:
        if isinstance(tokens_or_text, str):
            return torch.tensor(self._encode(tokens_or_text), dtype=torch.long)
        return torch.as_tensor(tokens_or_text, dtype=torch.long).reshape(-1).cpu()

    def _model_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.is_bound:
            raise CortexError("episodic: `key: model` needs the model (build it from a manifest)")
        model = self.model
        ms = model.memory_system
        ctx = model.config.context
        out = []
        with torch.no_grad():
            for start in range(0, tokens.numel(), ctx):
                chunk = tokens[start:start + ctx].unsqueeze(0)
                if ms is not None:
                    k = ms.keys(chunk)
                else:
                    k = model.core.hidden_states(chunk, layer=model.config.layers - 1,
                                                 window=self.settings.window).float()
                out.append(k[0])
        return F.normalize(torch.cat(out).float(), dim=-1)

    def _keys(self, tokens: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        s = self.settings
        parts = []
        if s.key in ("ngram", "both"):
            parts.append(ngram_keys(tokens, dim=s.key_dim, window=s.window, left=left))
        if s.key in ("model", "both"):
            pre = left[max(0, left.numel() - s.window):] if left is not None else torch.zeros(0, dtype=torch.long)
            parts.append(self._model_keys(torch.cat([pre, tokens]))[pre.numel():])
        keys = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return F.normalize(keys, dim=-1)

    def _episode_tokens(self, episode: int) -> torch.Tensor:
        rows = torch.nonzero(self.cols["episode"][: self.n] == episode).flatten()
        order = self.cols["order"][rows]
        return self.cols["tokens"][rows[torch.argsort(order)]]

    def _reserve(self, need: int) -> None:
        have = self.keys.shape[0]
        if need <= have:
            return
        size = min(self.capacity, max(need, 2 * have, 256))
        for name, col in self.cols.items():
            grown = torch.zeros(size, dtype=torch.long)
            grown[: self.n] = col[: self.n]
            self.cols[name] = grown
        keys = torch.zeros(size, self.key_width)
        keys[: self.n] = self.keys[: self.n]
        self.keys = keys

    def _keep(self, keep: torch.Tensor) -> None:
        """Compact storage to the live rows where ``keep`` (n,) is true."""
        rows = torch.nonzero(keep).flatten()
        m = rows.numel()
        for col in self.cols.values():
            col[:m] = col[rows].clone()
        self.keys[:m] = self.keys[rows].clone()
        self.counters["evicted_items"] += self.n - m
        self.n = m
        self._sorted = None

    def _evict_for(self, incoming: int, current: int) -> None:
        """Make room for ``incoming`` items: oldest episodes first, never ``current``."""
        if self.n + incoming <= self.capacity:
            return
        # free a chunk (5% of capacity) beyond what is needed, so eviction is amortised
        excess = self.n + incoming - self.capacity + self.capacity // 20
        ep = self.cols["episode"][: self.n]
        counts = torch.bincount(ep, minlength=self.next_episode)
        drop: list[int] = []
        freed = 0
        for e in sorted(self.episodes):
            if freed >= excess:
                break
            if e == current:
                continue
            drop.append(e)
            freed += int(counts[e]) if e < counts.numel() else 0
        if drop:
            self._keep(~torch.isin(ep, torch.tensor(drop)))
            for e in drop:
                self.episodes.pop(e, None)
            self.names = {k: v for k, v in self.names.items() if v in self.episodes}
            self.counters["evicted_episodes"] += len(drop)
        excess = self.n + incoming - self.capacity
        if excess > 0:  # the current episode alone is too long: drop its oldest items
            ep = self.cols["episode"][: self.n]
            mine = torch.nonzero(ep == current).flatten()
            oldest = mine[torch.argsort(self.cols["order"][mine])][: min(excess, mine.numel())]
            keep = torch.ones(self.n, dtype=torch.bool)
            keep[oldest] = False
            self._keep(keep)

    def _resolve(self, episode: int | str | None, meta: dict[str, Any] | None) -> int:
        if isinstance(episode, str):
            if episode in self.names and self.names[episode] in self.episodes:
                return self.names[episode]
            new = self._new_episode({"name": episode, **(meta or {})})
            self.names[episode] = new
            return new
        if episode is None:
            return self._new_episode(dict(meta or {}))
        episode = int(episode)
        if episode not in self.episodes:
            if episode < self.next_episode:
                raise CortexError(f"episodic: episode {episode} was evicted or never existed")
            self.next_episode = episode
            return self._new_episode(dict(meta or {}))
        return episode

    def _new_episode(self, meta: dict[str, Any]) -> int:
        e = self.next_episode
        self.next_episode += 1
        self.episodes[e] = {"created_step": self.step, "length": 0, **meta}
        return e

    @no_grad
    def record(self, tokens_or_text: Any, episode: int | str | None = None, *,
               meta: dict[str, Any] | None = None, step: int | None = None) -> int:
        """Append items to ``episode`` and return its id.

        ``tokens_or_text``: token ids (a list or 1-D tensor) or text (encoded with the
        model's tokenizer). ``episode``: ``None`` starts a new episode; an int appends to
        that episode; a string names an episode (a session, say): the first use creates it,
        later uses append to it. ``meta`` is stored with a new episode.
        """
        tokens = self._as_tokens(tokens_or_text)
        e = self._resolve(episode, meta)
        if tokens.numel() == 0:
            return e
        info = self.episodes[e]
        start = int(info["length"])
        if tokens.numel() > self.capacity:  # longer than the capacity: keep the newest items
            start += tokens.numel() - self.capacity
            tokens = tokens[-self.capacity:]
        step = self.step if step is None else int(step)
        left = self._episode_tokens(e)[-self.settings.window:] if start else None
        keys = self._keys(tokens, left)
        self._evict_for(tokens.numel(), e)
        n, m = self.n, tokens.numel()
        self._reserve(n + m)
        self.cols["tokens"][n:n + m] = tokens
        self.cols["episode"][n:n + m] = e
        self.cols["order"][n:n + m] = torch.arange(start, start + m)
        self.cols["step"][n:n + m] = step
        self.cols["clock"][n:n + m] = torch.arange(self.clock, self.clock + m)
        self.keys[n:n + m] = keys
        self.clock += m
        self.n = n + m
        info["length"] = start + m
        info["last_step"] = step
        self.counters["recorded"] += m
        self._sorted = None
        return e

    def clear(self) -> None:
        """Forget every episode."""
        self._reset()

    # ------------------------------------------------------------------ recall

    def _sorted_view(self) -> tuple[torch.Tensor, ...]:
        """Items sorted by (episode, order): tokens, rank of each row, episode start and end."""
        if self._sorted is None:
            n = self.n
            ep, order = self.cols["episode"][:n], self.cols["order"][:n]
            perm = torch.argsort(ep * (1 << 32) + order)
            rank = torch.empty_like(perm)
            rank[perm] = torch.arange(n)
            eps = ep[perm]
            ids, counts = torch.unique_consecutive(eps, return_counts=True)
            ends = torch.cumsum(counts, 0)
            start_of = torch.zeros(self.next_episode + 1, dtype=torch.long)
            end_of = torch.zeros(self.next_episode + 1, dtype=torch.long)
            start_of[ids] = ends - counts
            end_of[ids] = ends
            self._sorted = (self.cols["tokens"][:n][perm], rank, start_of, end_of, perm)
        return self._sorted

    @no_grad
    def recall(self, cue: Any, *, k: int = 1, continuation: int | None = None) -> list[EpisodeRecall]:
        """The ``k`` best-matching episodes (at most one recall per episode) for ``cue``.

        ``cue``: token ids or text, partial and possibly noisy. Each recall says where in
        its episode the cue's last token falls and carries the ``continuation`` items that
        followed it. An empty list when nothing agrees with at least ``min_score`` of the cue.
        """
        s = self.settings
        self.counters["recalls"] += 1
        cue_t = self._as_tokens(cue)
        if cue_t.numel() == 0 or self.n == 0:
            return []
        cue_t = cue_t[-s.max_cue:]
        L = cue_t.numel()
        tokens_sorted, rank, start_of, end_of, _ = self._sorted_view()
        # query with the keys of a few positions spread over the cue (its last token first):
        # a window the noise hit hard is made up for by another
        cue_keys = self._keys(cue_t, None)
        probes = list(range(L - 1, -1, -s.window))[: s.probes]
        sims = cue_keys[probes] @ self.keys[: self.n].T  # (P, n)
        c = min(s.candidates, self.n)
        top = sims.topk(c, dim=1)
        shift = torch.tensor([L - 1 - p for p in probes])[:, None].expand(-1, c)
        rows, sim = top.indices.reshape(-1), top.values.reshape(-1)
        ep = self.cols["episode"][rows]
        end = rank[rows] + shift.reshape(-1)  # sorted position of the cue's last token
        inside = end < end_of[ep]
        rows, sim, ep, end = rows[inside], sim[inside], ep[inside], end[inside]
        if rows.numel() == 0:
            return []
        back = torch.arange(L - 1, -1, -1)
        idx = end[:, None] - back[None, :]  # (C, L) sorted positions aligned with the cue
        valid = idx >= start_of[ep][:, None]
        agree = (tokens_sorted[idx.clamp(min=0)] == cue_t[None, :]) & valid
        score = agree.float().sum(1) / L
        ranking = score + 1e-3 * sim  # agreement first, key similarity breaks ties
        order = torch.argsort(ranking, descending=True)
        n_next = s.continuation if continuation is None else continuation
        out: list[EpisodeRecall] = []
        seen: set[int] = set()
        _, _, _, _, perm = self._sorted_view()
        for i in order.tolist():
            if len(out) >= k or float(score[i]) < s.min_score:
                break
            e = int(ep[i])
            if e in seen:
                continue
            seen.add(e)
            at = int(end[i])
            nxt = tokens_sorted[at + 1: min(at + 1 + n_next, int(end_of[e]))].tolist()
            text = self.tokenizer.decode(nxt) if self.tokenizer is not None else None
            row = int(perm[at])
            out.append(EpisodeRecall(e, int(self.cols["order"][row]), float(score[i]), float(sim[i]), nxt, text,
                              dict(self.episodes.get(e, {}))))
        if out:
            self.counters["hits"] += 1
        return out

    def complete(self, cue: Any, n: int | None = None) -> list[int] | str | None:
        """What came after ``cue`` in the best-matching episode: text for a text cue, else
        token ids; ``None`` when nothing is recalled."""
        found = self.recall(cue, continuation=n)
        if not found:
            return None
        return found[0].text if isinstance(cue, str) and found[0].text is not None else found[0].continuation

    # ------------------------------------------------------------------ episodes and replay

    def episode(self, episode: int) -> Episode:
        """The stored items of ``episode``, in order."""
        if episode not in self.episodes:
            raise KeyError(f"episode {episode} is not stored")
        rows = torch.nonzero(self.cols["episode"][: self.n] == episode).flatten()
        rows = rows[torch.argsort(self.cols["order"][rows])]
        tokens = self.cols["tokens"][rows].clone()
        text = self.tokenizer.decode(tokens.tolist()) if self.tokenizer is not None else None
        return Episode(episode, tokens, self.cols["order"][rows].clone(), self.cols["step"][rows].clone(),
                       dict(self.episodes[episode]), text)

    def episode_ids(self) -> list[int]:
        """Ids of the stored episodes, oldest first."""
        return sorted(self.episodes)

    def replay(self, n: int, *, strategy: Literal["recent", "oldest", "random"] = "recent",
               seed: int | None = None) -> list[Episode]:
        """Up to ``n`` stored episodes for sleep replay: the most recent, the oldest, or a
        seeded random sample (the same seed gives the same episodes)."""
        ids = [e for e in self.episode_ids() if self.episodes[e].get("length", 0)]
        if strategy == "recent":
            chosen = ids[::-1][:n]
        elif strategy == "oldest":
            chosen = ids[:n]
        elif strategy == "random":
            chosen = random.Random(seed).sample(ids, min(n, len(ids)))
        else:
            raise ValueError(f"unknown replay strategy {strategy!r}; use recent, oldest or random")
        self.counters["replayed"] += len(chosen)
        return [self.episode(e) for e in chosen]

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return {"items": self.n, "capacity": self.capacity, "episodes": len(self.episodes),
                "key": self.settings.key, **self.counters}

    def state_dict(self) -> dict[str, Any]:
        n = self.n
        state: dict[str, Any] = {f"item_{name}": col[:n].clone() for name, col in self.cols.items()}
        if self.settings.key != "ngram":
            state["keys"] = self.keys[:n].clone()
        state["episodes"] = [[e, meta] for e, meta in self.episodes.items()]
        state["names"] = dict(self.names)
        state["next_episode"] = self.next_episode
        state["clock"] = self.clock
        state["step"] = self.step
        state["counters"] = dict(self.counters)
        state["key"] = self.settings.key
        state["key_width"] = self.key_width
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("key") != self.settings.key or int(state.get("key_width", -1)) != self.key_width:
            raise ValueError(f"episodic state was saved with key {state.get('key')!r} of width "
                             f"{state.get('key_width')}, this feature uses {self.settings.key!r} of width {self.key_width}")
        self._reset()
        n = int(state["item_tokens"].numel())
        self._reserve(n)
        for name in _COLUMNS:
            self.cols[name][:n] = state[f"item_{name}"].long()
        self.n = n
        self.episodes = {int(e): dict(meta) for e, meta in state["episodes"]}
        self.names = {str(k): int(v) for k, v in state["names"].items()}
        self.next_episode = int(state["next_episode"])
        self.clock = int(state["clock"])
        self.step = int(state["step"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})
        if "keys" in state:
            self.keys[:n] = state["keys"].float()
        else:  # ngram keys depend on the tokens alone: recompute them episode by episode
            for e in self.episodes:
                rows = torch.nonzero(self.cols["episode"][:n] == e).flatten()
                rows = rows[torch.argsort(self.cols["order"][rows])]
                if rows.numel():
                    self.keys[rows] = self._keys(self.cols["tokens"][rows], None)


@hookimpl
def cortex_register_components(register):
    register(EpisodicMemory)
