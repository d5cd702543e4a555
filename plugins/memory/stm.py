"""Short-term memory (``stm``): a small exact buffer per stream with competitive slots.

```yaml
memory:
  - {type: stm, settings: {capacity: 64, threshold: 0.995, consolidate_after: 3}}
```

Every stream (a batch row in training, a session at inference) owns ``capacity`` slots:
**capacity is per stream**, so the tier holds at most ``capacity x streams`` entries. Rows
are allocated lazily as new stream ids appear and freed by ``clear(stream)``.

Write (vectorised over the entries of a call, one stream at a time):

- an entry whose best cosine to a slot of its stream is ``>= threshold`` *strengthens*
  that slot: ``uses += 1``, ``step = now``, key and value move by ``value_mix`` toward the
  mean of the entries matching it (the key renormalised), the token (and metadata) become
  the newest matching entry's;
- entries of one call that match each other but no slot form one group (each joins the
  newest entry it matches); a group takes one slot with the newest member's key, value
  and token and ``uses = group size - 1``;
- a group takes the least useful slot: empty first, then fewest uses, then oldest step,
  never a slot written by this same call; if a call brings more groups than free slots,
  the newest win (the newest entry of a call is always kept).

Read: exact cosine top-k over the stream's slots in one batched op
([`read_batch`][cortex_plugins.memory.stm.ShortTermMemory.read_batch]: ``bmm`` + ``topk``). Each
distinct entry a read returns counts one use and gets ``step = now``, so entries that keep
being retrieved consolidate. [`handover`][cortex_plugins.memory.stm.ShortTermMemory.handover]
removes and returns every entry with ``uses >= consolidate_after``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import Entries, MemoryTier, Retrieval, Settings
from cortex.kernel.lazy import torch, no_grad

from cortex_plugins.memory._vector_index import Counters, TierCommon, empty_retrieval, normalize, state_nbytes


class ShortTermMemory(TierCommon, MemoryTier):
    """A per-stream exact buffer of ``capacity`` competitive slots (see the module docs)."""

    name = "stm"

    class Settings(Settings):
        capacity: int = Field(64, gt=0, description="Slots per stream (the tier holds at most capacity x streams entries).")
        threshold: float = Field(0.995, ge=-1.0, le=1.0, description="Cosine similarity at which a write matches (strengthens) an existing slot; high, so that only a repeat of the same context strengthens and distinct contexts keep their own slots.")
        consolidate_after: int = Field(3, ge=1, description="Uses (strengthenings + retrievals) after which an entry is handed over to the next tier.")
        value_mix: float = Field(0.5, ge=0.0, le=1.0, description="How far a matching write moves the slot's key and value toward the new ones (0 keeps the old, 1 takes the new).")
        max_streams: int = Field(256, gt=0, description="Streams (sessions, batch rows) held at once. A write to a new stream beyond this drops the least recently used other stream: its entries move down the tiers where spill is on, else they are forgotten.")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        if context.config is None:
            raise ValueError("stm needs the model's shape (context.config.dim)")
        self.dim = int(context.config.dim)
        self.device = torch.device(context.device)
        self.counters = Counters()
        self.strengthened = 0
        self.next_id = 0
        self.meta: dict[int, Any] = {}
        self._displaced: list[Entries] = []
        self._allocate(0)

    # ------------------------------------------------------------------ storage

    def _allocate(self, streams: int) -> None:
        c, d, dev = self.settings.capacity, self.dim, self.device
        self.stream_ids = torch.zeros(streams, dtype=torch.long, device=dev)
        self.keys = torch.zeros(streams, c, d, device=dev)
        self.values = torch.zeros(streams, c, d, device=dev)
        self.tokens = torch.full((streams, c), -1, dtype=torch.long, device=dev)
        self.uses = torch.zeros(streams, c, dtype=torch.long, device=dev)
        self.steps = torch.zeros(streams, c, dtype=torch.long, device=dev)
        self.ids = torch.full((streams, c), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(streams, c, dtype=torch.bool, device=dev)
        self._reindex()

    _ROW_FIELDS = ("stream_ids", "keys", "values", "tokens", "uses", "steps", "ids", "valid")

    def _reindex(self) -> None:
        """Sorted stream ids for vectorised stream -> row lookups, and the row of each stream id."""
        self._sorted_ids, self._sorted_rows = torch.sort(self.stream_ids)
        self._row_of = {stream: row for row, stream in enumerate(self.stream_ids.tolist())}

    def _rows(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``streams`` (B,) and whether each stream has a row at all."""
        streams = streams.to(self.device, torch.long)
        if self._sorted_ids.numel() == 0:
            return torch.zeros_like(streams), torch.zeros_like(streams, dtype=torch.bool)
        pos = torch.searchsorted(self._sorted_ids, streams).clamp(max=self._sorted_ids.numel() - 1)
        known = self._sorted_ids[pos] == streams
        return torch.where(known, self._sorted_rows[pos], 0), known

    def _ensure_rows(self, streams: torch.Tensor) -> torch.Tensor:
        """Rows of ``streams``, allocating rows for stream ids never seen before (and making
        room for them under ``max_streams``)."""
        rows, known = self._rows(streams)
        if not bool(known.all()):
            new = torch.unique(streams.to(self.device, torch.long)[~known])
            self._drop_streams(self.stream_ids.numel() + new.numel() - self.settings.max_streams,
                               keep=torch.unique(rows[known]))
            c, d, n, dev = self.settings.capacity, self.dim, new.numel(), self.device
            self.stream_ids = torch.cat([self.stream_ids, new])
            self.keys = torch.cat([self.keys, torch.zeros(n, c, d, device=dev)])
            self.values = torch.cat([self.values, torch.zeros(n, c, d, device=dev)])
            self.tokens = torch.cat([self.tokens, torch.full((n, c), -1, dtype=torch.long, device=dev)])
            self.uses = torch.cat([self.uses, torch.zeros(n, c, dtype=torch.long, device=dev)])
            self.steps = torch.cat([self.steps, torch.zeros(n, c, dtype=torch.long, device=dev)])
            self.ids = torch.cat([self.ids, torch.full((n, c), -1, dtype=torch.long, device=dev)])
            self.valid = torch.cat([self.valid, torch.zeros(n, c, dtype=torch.bool, device=dev)])
            self._reindex()
            rows, _ = self._rows(streams)
        return rows

    def _drop_streams(self, count: int, keep: torch.Tensor) -> None:
        """Remove the ``count`` least recently used rows other than ``keep``; their entries
        are displaced (kept for the next tier) while ``keep_displaced`` is set."""
        if count <= 0:
            return
        recency = self.steps.masked_fill(~self.valid, -1).amax(dim=1) if self.valid.numel() else self.steps.sum(1)
        candidates = torch.ones(self.stream_ids.numel(), dtype=torch.bool, device=self.device)
        candidates[keep] = False
        order = torch.nonzero(candidates).flatten()
        order = order[torch.argsort(recency[order], stable=True)][:count]
        for row in order.tolist():
            slots = torch.nonzero(self.valid[row]).flatten()
            self.counters.evicted += int(slots.numel())
            if self.keep_displaced:
                self._displace_slots(row, slots)
            for i in self.ids[row, slots].tolist():
                self.meta.pop(i, None)
        rest = torch.ones(self.stream_ids.numel(), dtype=torch.bool, device=self.device)
        rest[order] = False
        for name in self._ROW_FIELDS:
            setattr(self, name, getattr(self, name)[rest])
        self._reindex()

    # ------------------------------------------------------------------ write

    @no_grad
    def write(self, entries: Entries, *, step: int = 0) -> None:
        n = len(entries)
        if n == 0:
            return
        self.counters.writes += n
        keys = normalize(entries.keys).to(self.device)
        values = entries.values.detach().to(self.device, torch.float32)
        tokens = entries.tokens.detach().to(self.device, torch.long).reshape(n)
        streams = entries.streams.detach().to(self.device, torch.long).reshape(n)
        rows = self._ensure_rows(streams)
        for row in torch.unique(rows).tolist():
            sel = torch.nonzero(rows == row).flatten()  # ascending: oldest to newest
            meta = [entries.meta[i] for i in sel.tolist()] if entries.meta is not None else None
            self._write_row(row, keys[sel], values[sel], tokens[sel], meta, step)

    def _write_row(self, row: int, keys, values, tokens, meta, step: int) -> None:
        s = self.settings
        c, m, dev = s.capacity, s.value_mix, self.device
        n = keys.shape[0]
        valid = self.valid[row]
        sims = keys @ self.keys[row].T  # (n, c)
        sims = sims.masked_fill(~valid, -math.inf)
        best, slot = sims.max(dim=1)
        matched = best >= s.threshold
        touched = torch.zeros(c, dtype=torch.bool, device=dev)

        if bool(matched.any()):  # strengthen the matching slots
            ms, order = slot[matched], torch.nonzero(matched).flatten()
            count = torch.bincount(ms, minlength=c)
            touched = count > 0
            sum_k = torch.zeros(c, self.dim, device=dev).index_add_(0, ms, keys[matched])
            sum_v = torch.zeros(c, self.dim, device=dev).index_add_(0, ms, values[matched])
            newest = torch.full((c,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, ms, order, "amax")
            hit = torch.nonzero(touched).flatten()
            k_mean = sum_k[hit] / count[hit, None]
            v_mean = sum_v[hit] / count[hit, None]
            self.keys[row, hit] = normalize((1 - m) * self.keys[row, hit] + m * k_mean)
            self.values[row, hit] = (1 - m) * self.values[row, hit] + m * v_mean
            self.uses[row, hit] += count[hit]
            self.steps[row, hit] = step
            self.tokens[row, hit] = tokens[newest[hit]]
            self.strengthened += int(matched.sum())
            if meta is not None:
                for h, e in zip(self.ids[row, hit].tolist(), newest[hit].tolist()):
                    if meta[e] is not None:
                        self.meta[h] = meta[e]

        free = torch.nonzero(~matched).flatten()
        if free.numel() == 0:
            return
        # group unmatched entries that match each other: each joins the newest it matches
        fk = keys[free]
        f = free.numel()
        idx = torch.arange(f, device=dev)
        leader = torch.empty_like(idx)
        for lo in range(0, f, 1024):  # blocks of rows bound the (rows, f) similarity matrix
            block = idx[lo:lo + 1024]
            link = (fk[block] @ fk.T >= s.threshold) & (idx[None, :] >= block[:, None])
            leader[block] = torch.where(link, idx[None, :], -1).max(dim=1).values
        leader = torch.maximum(leader, idx)  # an entry always matches itself (even a zero key)
        while True:
            nxt = leader[leader]
            if torch.equal(nxt, leader):
                break
            leader = nxt
        roots = torch.nonzero(leader == idx).flatten()  # oldest to newest
        size = torch.bincount(leader, minlength=f)
        # least useful slots first: empty, then fewest uses, then oldest step
        perm = torch.arange(c, device=dev)
        perm = perm[torch.argsort(self.steps[row, perm], stable=True)]
        perm = perm[torch.argsort(self.uses[row, perm], stable=True)]
        perm = perm[torch.argsort(valid[perm].long(), stable=True)]
        slots = perm[~touched[perm]]
        take = min(roots.numel(), slots.numel())
        if take == 0:  # every slot was strengthened by this call: still keep the newest entry
            slots, take = perm[:1], 1
        winners, slots = roots[roots.numel() - take:], slots[:take]
        lost = int(valid[slots].sum()) + int(size[roots[: roots.numel() - take]].sum())
        self.counters.evicted += lost
        if self.keep_displaced:
            self._displace_slots(row, slots[valid[slots]])
            losers = free[roots[: roots.numel() - take]]
            if losers.numel():
                self._displaced.append(Entries(
                    keys=keys[losers].clone(), values=values[losers].clone(), tokens=tokens[losers].clone(),
                    streams=self.stream_ids[row].repeat(losers.numel()),
                    uses=(size[roots[: roots.numel() - take]] - 1).clone(),
                    steps=torch.full((losers.numel(),), step, dtype=torch.long, device=dev),
                    meta=[meta[i] for i in losers.tolist()] if meta is not None else None))
        for old in self.ids[row, slots][valid[slots]].tolist():
            self.meta.pop(old, None)
        src = free[winners]
        new_ids = torch.arange(self.next_id, self.next_id + take, device=dev)
        self.next_id += take
        self.keys[row, slots] = keys[src]
        self.values[row, slots] = values[src]
        self.tokens[row, slots] = tokens[src]
        self.uses[row, slots] = size[winners] - 1
        self.steps[row, slots] = step
        self.ids[row, slots] = new_ids
        self.valid[row, slots] = True
        if meta is not None:
            for i, e in zip(new_ids.tolist(), src.tolist()):
                if meta[e] is not None:
                    self.meta[i] = meta[e]

    # ------------------------------------------------------------------ read

    def dense_entries(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every slot of each row's stream: keys, values (B, capacity, d) and valid (B, capacity)."""
        if self.stream_ids.numel() == 0:
            b, c = streams.numel(), self.settings.capacity
            zeros = torch.zeros(b, c, self.dim, device=self.device)
            return zeros, zeros, torch.zeros(b, c, dtype=torch.bool, device=self.device)
        rows, known = self._rows(streams.reshape(-1))
        return self.keys[rows], self.values[rows], self.valid[rows] & known[:, None]

    def dense_tokens(self, streams: torch.Tensor) -> torch.Tensor:
        """The token stored with each slot of [`dense_entries`][cortex_plugins.memory.stm.ShortTermMemory.dense_entries]
        (what followed its key), (B, capacity); -1 where empty."""
        if self.stream_ids.numel() == 0:
            return torch.full((streams.numel(), self.settings.capacity), -1, dtype=torch.long, device=self.device)
        rows, known = self._rows(streams.reshape(-1))
        return self.tokens[rows].masked_fill(~(self.valid[rows] & known[:, None]), -1)

    @no_grad
    def mark_used(self, streams: torch.Tensor, used: torch.Tensor, *, step: int = 0, queries: int = 0,
              hits: int = 0) -> None:
        """Count one use of each slot marked in ``used`` (B, capacity), as a read would."""
        self.counters.queries += queries
        self.counters.hits += hits
        if self.stream_ids.numel() == 0:
            return
        rows, known = self._rows(streams.reshape(-1))
        bi, si = (used.to(self.device) & known[:, None] & self.valid[rows]).nonzero(as_tuple=True)
        self.uses.index_put_((rows[bi], si), torch.ones_like(si), accumulate=True)
        self.steps[rows[bi], si] = step

    @no_grad
    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0, touch: bool = True) -> Retrieval:
        """``read_batch`` for the queries (Q, d) of one stream, without its batching (kNN-LM
        asks one query per generated token)."""
        nq = queries.shape[0]
        self.counters.queries += nq
        row = self._row_of.get(int(stream))
        if k <= 0 or row is None:
            return empty_retrieval((nq,), max(k, 0), self.dim, queries.device)
        sims = (normalize(queries).to(self.device) @ self.keys[row].T).masked_fill_(~self.valid[row], -math.inf)
        scores, slot = sims.topk(min(k, self.settings.capacity), dim=-1)
        ok = scores > -math.inf
        self.counters.hits += int(ok.any(dim=-1).sum())
        if touch and bool(ok.any()):  # one use per distinct entry returned
            used = slot[ok].unique()
            self.uses[row, used] += 1
            self.steps[row, used] = step
        empty = ~ok

        def gather(table: torch.Tensor, fill) -> torch.Tensor:
            out = table[row][slot]
            return out.masked_fill_(empty.view(*empty.shape, *([1] * (out.dim() - 2))), fill)

        got = Retrieval(gather(self.values, 0.0), gather(self.tokens, -1), scores, gather(self.ids, -1),
                        gather(self.keys, 0.0), gather(self.uses, 0))
        return _padded(got, k, self.dim, queries.device)

    @no_grad
    def read_batch(self, queries: torch.Tensor, streams: torch.Tensor, k: int, *, step: int = 0,
                   touch: bool = True) -> Retrieval:
        """Top-``k`` of each row's own stream for ``queries`` (B, T, d): shapes (B, T, k, ...).

        One ``bmm`` + ``topk`` over every row at once. With ``touch`` (the default) each
        distinct entry returned to a row counts one use and gets ``step = step``; the
        ``uses`` reported include that use. ``keys`` are the stored (normalised) keys.
        """
        b, t, _ = queries.shape
        out_device = queries.device
        self.counters.queries += b * t
        c = self.settings.capacity
        kk = min(k, c)
        if k <= 0 or self.stream_ids.numel() == 0 or b == 0:
            return empty_retrieval((b, t), max(k, 0), self.dim, out_device)
        rows, known = self._rows(streams.reshape(b))
        q = normalize(queries).to(self.device)
        valid = self.valid[rows] & known[:, None]  # (B, c)
        sims = torch.bmm(q, self.keys[rows].transpose(1, 2))  # (B, T, c)
        sims = sims.masked_fill(~valid[:, None, :], -math.inf)
        scores, slot = sims.topk(kk, dim=-1)  # (B, T, kk)
        ok = scores > -math.inf
        empty = ~ok
        some_empty = bool(empty.any())
        flat = (rows[:, None, None] * c + slot).reshape(-1)  # slot positions in (streams * c)

        def gather(table: torch.Tensor, fill) -> torch.Tensor:
            out = table.reshape(-1, *table.shape[2:]).index_select(0, flat).reshape(b, t, kk, *table.shape[2:])
            if some_empty:
                out.masked_fill_(empty.reshape(b, t, kk, *([1] * (table.dim() - 2))), fill)
            return out

        values, tokens, ids = gather(self.values, 0.0), gather(self.tokens, -1), gather(self.ids, -1)
        self.counters.hits += int(ok.any(dim=-1).sum())
        if touch and bool(ok.any()):  # one use per distinct entry returned to a row
            returned = torch.zeros(b * c, dtype=torch.bool, device=self.device)
            returned[(torch.arange(b, device=self.device)[:, None, None] * c + slot)[ok]] = True
            bi, si = returned.view(b, c).nonzero(as_tuple=True)
            self.uses.index_put_((rows[bi], si), torch.ones_like(si), accumulate=True)
            self.steps[rows[bi], si] = step
        keys, uses = gather(self.keys, 0.0), gather(self.uses, 0)
        return _padded(Retrieval(values, tokens, scores, ids, keys, uses), k, self.dim, out_device)

    # ------------------------------------------------------------------ consolidation

    @no_grad
    def _displace_slots(self, row: int, slots: torch.Tensor) -> None:
        if slots.numel():
            ids = self.ids[row, slots]
            self._displaced.append(Entries(
                keys=self.keys[row, slots].clone(), values=self.values[row, slots].clone(),
                tokens=self.tokens[row, slots].clone(), streams=self.stream_ids[row].repeat(slots.numel()),
                uses=self.uses[row, slots].clone(), steps=self.steps[row, slots].clone(),
                meta=[self.meta.get(i) for i in ids.tolist()]))

    def handover(self, *, step: int = 0) -> Entries | None:
        """Remove and return every entry with ``uses >= consolidate_after``, oldest step first."""
        due = self.valid & (self.uses >= self.settings.consolidate_after)
        if not bool(due.any()):
            return None
        r, sl = due.nonzero(as_tuple=True)
        order = torch.argsort(self.ids[r, sl], stable=True)
        order = order[torch.argsort(self.steps[r, sl][order], stable=True)]
        r, sl = r[order], sl[order]
        ids = self.ids[r, sl]
        metas = [self.meta.pop(i, None) for i in ids.tolist()]
        out = Entries(
            keys=self.keys[r, sl].clone(),
            values=self.values[r, sl].clone(),
            tokens=self.tokens[r, sl].clone(),
            streams=self.stream_ids[r].clone(),
            uses=self.uses[r, sl].clone(),
            steps=self.steps[r, sl].clone(),
            meta=metas if any(m is not None for m in metas) else None,
        )
        self.valid[r, sl] = False
        self.uses[r, sl] = 0
        self.ids[r, sl] = -1
        self.tokens[r, sl] = -1
        self.counters.consolidated_out += len(out)
        return out

    def clear(self, stream: int | None = None) -> None:
        if stream is None:
            self.meta.clear()
            self._allocate(0)
            return
        rows, known = self._rows(torch.tensor([stream]))
        if not bool(known[0]):
            return
        row = int(rows[0])
        for i in self.ids[row][self.valid[row]].tolist():
            self.meta.pop(i, None)
        keep = torch.arange(self.stream_ids.numel(), device=self.device) != row
        for name in self._ROW_FIELDS:
            setattr(self, name, getattr(self, name)[keep])
        self._reindex()

    def __len__(self) -> int:
        return int(self.valid.sum())

    @property
    def ntotal(self) -> int:
        """Entries held, counted from the slot masks themselves."""
        return int(self.valid.sum())

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return self._tier_stats(capacity_per="stream", streams=int(self.stream_ids.numel()),
                                bytes=state_nbytes(self.state_dict()), strengthened=self.strengthened)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in self._ROW_FIELDS}
        state.update(self._common_state())
        state["strengthened"] = self.strengthened
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c, d = self.settings.capacity, self.dim
        if tuple(state["keys"].shape[1:]) != (c, d):
            raise ValueError(
                f"stm state has {tuple(state['keys'].shape[1:])} slots x width, "
                f"but this tier has capacity {c} and width {d}"
            )
        for name in self._ROW_FIELDS:
            setattr(self, name, state[name].to(self.device).clone())
        self._load_common_state(state)
        self.strengthened = int(state.get("strengthened", 0))
        self._reindex()


def _padded(got: Retrieval, k: int, dim: int, device) -> Retrieval:
    """``got`` (..., kk) widened to ``k`` results with empty slots (a stream holds fewer than
    ``k`` slots), on ``device``."""
    kk = got.tokens.shape[-1]
    if kk < k:
        pad = empty_retrieval(tuple(got.tokens.shape[:-1]), k - kk, dim, got.tokens.device)
        got = Retrieval(*(torch.cat([a, b], dim=got.tokens.dim() - 1) for a, b in (
            (got.values, pad.values), (got.tokens, pad.tokens), (got.scores, pad.scores), (got.ids, pad.ids),
            (got.keys, pad.keys), (got.uses, pad.uses))))
    return Retrieval(got.values.to(device), got.tokens.to(device), got.scores.to(device), got.ids.to(device),
                     got.keys.to(device), got.uses.to(device))


@hookimpl
def cortex_register_components(register):
    register(ShortTermMemory)
