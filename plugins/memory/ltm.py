"""Long-term memory (``ltm``): FAISS indexes over keys plus a value store.

```yaml
memory:
  - {type: ltm, settings: {capacity: 10000, index: hnsw, idle_steps: 1000}}
```

Keys are normalised and searched by inner product, so scores are cosine similarities.
Values, tokens, streams, uses (hit counts) and last-access steps live in torch tensors
indexed by a slot; the slot is the id FAISS stores. Entry ids reported in retrievals are
tier-local, increasing and never reused.

**Stream filtering: one index per stream.** Each stream (batch row, session) has its own
FAISS index, so a read searches exactly the entries of its stream, with no filtering
overhead or recall loss, and costs what that stream's size costs. Capacity is global (all
streams together).

**Index kinds.** ``flat``: exact (``IndexIDMap2(IndexFlatIP)``). ``ivf``: a stream's
index is exact (flat) until the stream holds ``train_after`` entries, then it is rebuilt
as an ``IndexIVFFlat`` trained on them with ``min(nlist, n // 39)`` lists, searched with
``nprobe``. ``ivfpq``: the same, as an ``IndexIVFPQ`` (``pq_m`` codes of ``pq_bits`` bits per
key, behind an OPQ rotation with ``opq``), trained once the stream holds
``max(train_after, 2**pq_bits)`` entries; each search fetches ``shortlist x k`` candidates and
re-ranks them by exact cosine with the full keys the tier keeps in RAM, so scores are true
cosines. ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)`` searched with ``ef_search``; HNSW
cannot remove ids, so a stream's HNSW index is rebuilt from its live entries whenever
entries leave it (eviction, hand-over), which chunked eviction amortises.

**Key projection.** ``key_dim`` smaller than the model width fits a PCA
(``faiss.PCAMatrix``) once the tier holds ``max(train_after, key_dim + 1)`` entries, and
every index is rebuilt over projected (renormalised) keys. Before that, search is exact in
full dimension. Full keys are kept beside the index: projected searches fetch
``shortlist x k`` candidates and re-rank them by exact cosine with the full keys (so scores
are always true cosines), and hand-over passes full keys on to the archive.

**Eviction.** When a write would exceed ``capacity``, the least recently used entries
(oldest last access, then oldest id) are evicted in chunks of 5% of capacity, before the
new entries are added: the newest entry written is never evicted. A single write larger
than the capacity keeps its newest ``capacity`` entries.

**Hand-over.** [`handover`][cortex_plugins.memory.ltm.LongTermMemory.handover] removes and returns
entries whose last access is ``idle_steps`` or more steps old.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import Entries, MemoryTier, Retrieval, Settings
from cortex.kernel.lazy import torch, no_grad
from cortex_plugins.memory._vector_index import (
    Counters,
    SearchMirror,
    TierCommon,
    empty_retrieval,
    faiss_module,
    faiss_threads,
    index_from_tensor,
    index_to_tensor,
    lru_order,
    make_index,
    normalize,
    rerank_exact,
    set_search_params,
    state_nbytes,
    to_numpy,
)

_SLOT_FIELDS = ("keys", "values", "tokens", "streams", "uses", "last", "ids")


class _StreamIndex:
    """The FAISS index of one stream and how it was built."""

    def __init__(self, index, kind: str) -> None:
        self.index = index
        self.kind = kind  # "flat", "ivf" or "hnsw": what the index *is* now
        self.mirror = SearchMirror()


class LongTermMemory(TierCommon, MemoryTier):
    """A bounded FAISS-backed store with hit counts and last access (see the module docs)."""

    name = "ltm"

    class Settings(Settings):
        capacity: int = Field(10000, gt=0, description="Most entries held, over all streams.")
        index: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field("flat", description="FAISS index kind: exact flat, IVF (trained), HNSW graph or IVF-PQ (trained, compressed, shortlist re-ranked exactly).")
        key_dim: int | None = Field(None, gt=0, description="Dimension keys are indexed in; None = the model width. Smaller fits a PCA projection once train_after entries exist (exact full-dimension search before).")
        nlist: int = Field(256, gt=0, description="IVF: number of inverted lists (capped at entries/39).")
        nprobe: int = Field(16, gt=0, description="IVF: lists visited per query.")
        pq_m: int = Field(32, gt=0, description="ivfpq: codes per key (bytes per key at 8 bits); must divide the key dimension.")
        pq_bits: int = Field(8, ge=4, le=12, description="ivfpq: bits per code.")
        opq: bool = Field(False, description="ivfpq: learn an OPQ rotation before the codes (better recall, slower training).")
        shortlist: int = Field(8, ge=1, description="ivfpq and projected keys: candidates fetched per result (shortlist x k), re-ranked by exact cosine with the full keys.")
        hnsw_m: int = Field(32, ge=4, description="HNSW: graph neighbours per node.")
        ef_search: int = Field(64, gt=0, description="HNSW: candidate list size while searching.")
        idle_steps: int = Field(1000, ge=0, description="Entries not accessed for this many steps are handed over to the next tier.")
        train_after: int = Field(2048, gt=0, description="Entries needed before training IVF lists (per stream) or the key projection; exact search before.")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        if context.config is None:
            raise ValueError("ltm needs the model's shape (context.config.dim)")
        self.dim = int(context.config.dim)
        key_dim = settings.key_dim
        if key_dim is not None and key_dim > self.dim:
            raise ValueError(f"ltm key_dim ({key_dim}) cannot exceed the model width ({self.dim})")
        self.key_dim = self.dim if key_dim is None else key_dim
        if settings.index == "ivfpq" and self.key_dim % settings.pq_m:
            divisors = [m for m in range(1, self.key_dim + 1) if self.key_dim % m == 0]
            raise ValueError(f"ltm pq_m ({settings.pq_m}) must divide the key dimension ({self.key_dim}); "
                             f"choose one of {divisors}")
        self.counters = Counters()
        self._reset()

    def _reset(self) -> None:
        self.next_id = 0
        self.meta: dict[int, Any] = {}
        self._displaced: list[Entries] = []
        self.indexes: dict[int, _StreamIndex] = {}
        self.proj_A: torch.Tensor | None = None  # (key_dim, dim)
        self.proj_b: torch.Tensor | None = None  # (key_dim,)
        self._alloc(0)

    def _alloc(self, n: int) -> None:
        d = self.dim
        self.keys = torch.zeros(n, d)
        self.values = torch.zeros(n, d)
        self.tokens = torch.full((n,), -1, dtype=torch.long)
        self.streams = torch.zeros(n, dtype=torch.long)
        self.uses = torch.zeros(n, dtype=torch.long)
        self.last = torch.zeros(n, dtype=torch.long)
        self.ids = torch.full((n,), -1, dtype=torch.long)
        self.live = torch.zeros(n, dtype=torch.bool)

    def _grow(self, n: int) -> None:
        old = self.live.numel()
        if n <= old:
            return
        extra = n - old
        self.keys = torch.cat([self.keys, torch.zeros(extra, self.dim)])
        self.values = torch.cat([self.values, torch.zeros(extra, self.dim)])
        self.tokens = torch.cat([self.tokens, torch.full((extra,), -1, dtype=torch.long)])
        self.streams = torch.cat([self.streams, torch.zeros(extra, dtype=torch.long)])
        self.uses = torch.cat([self.uses, torch.zeros(extra, dtype=torch.long)])
        self.last = torch.cat([self.last, torch.zeros(extra, dtype=torch.long)])
        self.ids = torch.cat([self.ids, torch.full((extra,), -1, dtype=torch.long)])
        self.live = torch.cat([self.live, torch.zeros(extra, dtype=torch.bool)])

    # ------------------------------------------------------------------ index space

    @property
    def projected(self) -> bool:
        return self.proj_A is not None

    def _space(self, keys: torch.Tensor):
        """Normalised keys as the float32 array the indexes hold (projected when trained)."""
        if self.proj_A is None:
            return to_numpy(keys)
        return to_numpy(normalize(keys @ self.proj_A.T + self.proj_b))

    def _maybe_fit_projection(self) -> None:
        if self.key_dim >= self.dim or self.projected:
            return
        live = torch.nonzero(self.live).flatten()
        if live.numel() < max(self.settings.train_after, self.key_dim + 1):
            return
        faiss = faiss_module()
        pca = faiss.PCAMatrix(self.dim, self.key_dim)
        with faiss_threads(live.numel()):
            pca.train(to_numpy(self.keys[live]))
        self.proj_A = torch.from_numpy(faiss.vector_to_array(pca.A).reshape(self.key_dim, self.dim).copy())
        self.proj_b = torch.from_numpy(faiss.vector_to_array(pca.b).copy())
        for stream in list(self.indexes):
            self._rebuild(stream)

    def _stream_slots(self, streams: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Live slots (ascending) of each stream, in one pass."""
        live = torch.nonzero(self.live).flatten()
        s = self.streams[live]
        order = torch.argsort(s, stable=True)
        live, s = live[order], s[order]
        uniq, counts = torch.unique_consecutive(s, return_counts=True)
        out = dict(zip(uniq.tolist(), torch.split(live, counts.tolist())))
        if streams is not None:
            out = {st: out.get(st, live[:0]) for st in streams}
        return out

    def _rebuild(self, stream: int, slots: torch.Tensor | None = None) -> None:
        """Build ``stream``'s index afresh from its live entries (drop it when it has none)."""
        if slots is None:
            slots = self._stream_slots([stream])[stream]
        if slots.numel() == 0:
            self.indexes.pop(stream, None)
            return
        s = self.settings
        x = self._space(self.keys[slots])
        kind = s.index
        if kind in ("ivf", "ivfpq") and slots.numel() < self._train_size():
            kind = "flat"  # exact until enough entries to train the lists
        with faiss_threads(slots.numel()):
            if kind in ("ivf", "ivfpq"):
                index = make_index(kind, x.shape[1], nlist=min(s.nlist, max(1, slots.numel() // 39)),
                                   pq_m=s.pq_m, pq_bits=s.pq_bits, opq=s.opq, train_data=x)
            else:
                index = make_index(kind, x.shape[1], hnsw_m=s.hnsw_m)
            set_search_params(index, nprobe=s.nprobe, ef_search=s.ef_search)
            index.add_with_ids(x, slots.numpy().astype("int64"))
        self.indexes[stream] = _StreamIndex(index, kind)

    def _train_size(self) -> int:
        """Entries a stream needs before its IVF (or IVF-PQ) index is trained."""
        s = self.settings
        return max(s.train_after, 2 ** s.pq_bits) if s.index == "ivfpq" else s.train_after

    # ------------------------------------------------------------------ write

    @no_grad
    def write(self, entries: Entries, *, step: int = 0) -> None:
        n = len(entries)
        if n == 0:
            return
        first = self._count_handover(n)
        cap = self.settings.capacity
        keys = normalize(entries.keys[first:]).cpu()
        values = entries.values[first:].detach().to("cpu", torch.float32)
        tokens = entries.tokens[first:].detach().to("cpu", torch.long).reshape(-1)
        streams = entries.streams[first:].detach().to("cpu", torch.long).reshape(-1)
        uses = (torch.zeros(n - first, dtype=torch.long) if entries.uses is None
                else entries.uses[first:].detach().to("cpu", torch.long).reshape(-1))
        n -= first
        held = len(self)
        if held + n > cap:
            chunk = max(1, math.ceil(0.05 * cap))
            self._evict(min(held, max(held + n - cap, chunk)))
        slots = torch.nonzero(~self.live).flatten()[:n]
        if slots.numel() < n:
            self._grow(min(cap, max(2 * self.live.numel(), len(self) + n, 256)))
            slots = torch.nonzero(~self.live).flatten()[:n]
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        self.keys[slots], self.values[slots], self.tokens[slots] = keys, values, tokens
        self.streams[slots], self.uses[slots], self.ids[slots] = streams, uses, ids
        self.last[slots] = step
        self.live[slots] = True
        if entries.meta is not None:
            for i, m in zip(ids.tolist(), entries.meta[first:]):
                if m is not None:
                    self.meta[i] = m
        s = self.settings
        for stream in torch.unique(streams).tolist():
            mine = slots[streams == stream]
            si = self.indexes.get(stream)
            if si is None:
                self._rebuild(stream)
                continue
            if si.kind == "flat" and s.index in ("ivf", "ivfpq") and si.index.ntotal + mine.numel() >= self._train_size():
                self._rebuild(stream)  # enough entries: train the IVF lists
                continue
            with faiss_threads(mine.numel()):
                si.index.add_with_ids(self._space(self.keys[mine]), mine.numpy().astype("int64"))
            si.mirror.mark_dirty()
        self._maybe_fit_projection()

    def _evict(self, count: int) -> None:
        live = torch.nonzero(self.live).flatten()
        order = lru_order(self.last[live], self.ids[live])
        victims = live[order[:count]]
        self.counters.evicted += int(victims.numel())
        if self.keep_displaced:  # real-time use: what LTM pushes out moves down to the Archive
            self._displaced.append(Entries(
                keys=self.keys[victims].clone(), values=self.values[victims].clone(),
                tokens=self.tokens[victims].clone(), streams=self.streams[victims].clone(),
                uses=self.uses[victims].clone(), steps=self.last[victims].clone(),
                meta=self.meta_of(self.ids[victims])))
        self._remove(victims)

    def _remove(self, slots: torch.Tensor) -> None:
        """Take ``slots`` out of the store and out of their streams' indexes."""
        if slots.numel() == 0:
            return
        faiss = faiss_module()
        affected = torch.unique(self.streams[slots]).tolist()
        for i in self.ids[slots].tolist():
            self.meta.pop(i, None)
        self.live[slots] = False
        self.ids[slots] = -1
        by_stream = self._stream_slots(affected)
        for stream in affected:
            si = self.indexes.get(stream)
            if si is None:
                continue
            if si.kind == "hnsw" or by_stream[stream].numel() == 0:
                self._rebuild(stream, by_stream[stream])
            else:
                gone = slots[self.streams[slots] == stream].numpy().astype("int64")
                with faiss_threads(gone.size):
                    si.index.remove_ids(faiss.IDSelectorBatch(gone))
                si.mirror.mark_dirty()

    # ------------------------------------------------------------------ read

    def _search(self, stream: int, q: torch.Tensor, k: int, step: int, touch: bool):
        """Scores (Q, k) and slots (Q, k) (-inf / -1 where empty) of ``q`` in ``stream``."""
        nq = q.shape[0]
        scores = torch.full((nq, k), -math.inf)
        slots = torch.full((nq, k), -1, dtype=torch.long)
        si = self.indexes.get(stream)
        if si is None or k <= 0 or nq == 0:
            return scores, slots
        total = si.index.ntotal
        kk = min(k, total)
        rerank = self.projected or si.kind == "ivfpq"
        fetch = min(total, self.settings.shortlist * k) if rerank else kk
        with faiss_threads(nq):
            dist, found = si.mirror.search(si.index, self._space(q), fetch)
        found = torch.from_numpy(found).long()
        if rerank:  # re-rank the shortlist by exact cosine on the full keys
            dist, found = rerank_exact(q, found, self.keys, kk)
        else:
            dist = torch.from_numpy(dist).float()
        ok = found >= 0
        scores[:, :kk] = dist.masked_fill(~ok, -math.inf)
        slots[:, :kk] = found
        if touch and bool(ok.any()):
            seen = torch.unique(found[ok])
            self.uses[seen] += 1
            self.last[seen] = step
        self.counters.hits += int(ok.any(dim=1).sum())
        return scores, slots

    def _gather(self, scores: torch.Tensor, slots: torch.Tensor, device) -> Retrieval:
        ok = slots >= 0
        if self.live.numel() == 0:
            return empty_retrieval(tuple(slots.shape[:-1]), slots.shape[-1], self.dim, device)
        s = slots.clamp(min=0)
        return Retrieval(
            values=self.values[s].masked_fill(~ok[..., None], 0.0).to(device),
            tokens=self.tokens[s].masked_fill(~ok, -1).to(device),
            scores=scores.to(device),
            ids=self.ids[s].masked_fill(~ok, -1).to(device),
            keys=self.keys[s].masked_fill(~ok[..., None], 0.0).to(device),
            uses=self.uses[s].masked_fill(~ok, 0).to(device),
        )

    @no_grad
    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0, touch: bool = True) -> Retrieval:
        q = normalize(queries).cpu()
        self.counters.queries += q.shape[0]
        if k <= 0:
            return empty_retrieval((q.shape[0],), 0, self.dim, queries.device)
        scores, slots = self._search(int(stream), q, k, step, touch)
        return self._gather(scores, slots, queries.device)

    @no_grad
    def read_batch(self, queries: torch.Tensor, streams: torch.Tensor, k: int, *, step: int = 0,
                   touch: bool = True) -> Retrieval:
        """Top-``k`` of each row's own stream for ``queries`` (B, T, d): shapes (B, T, k, ...).

        Rows sharing a stream are searched together (one FAISS call per distinct stream).
        """
        b, t, d = queries.shape
        q = normalize(queries).cpu()
        self.counters.queries += b * t
        k = max(k, 0)
        scores = torch.full((b, t, k), -math.inf)
        slots = torch.full((b, t, k), -1, dtype=torch.long)
        streams = streams.detach().cpu().long().reshape(b)
        for stream in torch.unique(streams).tolist():
            rows = torch.nonzero(streams == stream).flatten()
            sc, sl = self._search(stream, q[rows].reshape(-1, d), k, step, touch)
            scores[rows] = sc.reshape(rows.numel(), t, k)
            slots[rows] = sl.reshape(rows.numel(), t, k)
        return self._gather(scores, slots, queries.device)

    # ------------------------------------------------------------------ consolidation

    @no_grad
    def handover(self, *, step: int = 0) -> Entries | None:
        """Remove and return entries not accessed for ``idle_steps`` steps, least recent first."""
        idle = self.live & (step - self.last >= self.settings.idle_steps)
        slots = torch.nonzero(idle).flatten()
        if slots.numel() == 0:
            return None
        slots = slots[lru_order(self.last[slots], self.ids[slots])]
        metas = [self.meta.get(i) for i in self.ids[slots].tolist()]
        out = Entries(
            keys=self.keys[slots].clone(), values=self.values[slots].clone(),
            tokens=self.tokens[slots].clone(), streams=self.streams[slots].clone(),
            uses=self.uses[slots].clone(), steps=self.last[slots].clone(),
            meta=metas if any(m is not None for m in metas) else None,
        )
        self._remove(slots)
        self.counters.consolidated_out += len(out)
        return out

    def clear(self, stream: int | None = None) -> None:
        if stream is None:
            self._reset()
            return
        slots = torch.nonzero(self.live & (self.streams == int(stream))).flatten()
        self.indexes.pop(int(stream), None)
        for i in self.ids[slots].tolist():
            self.meta.pop(i, None)
        self.live[slots] = False
        self.ids[slots] = -1

    def __len__(self) -> int:
        return int(self.live.sum())

    @property
    def ntotal(self) -> int:
        """Entries held, counted by the FAISS indexes themselves."""
        return sum(int(si.index.ntotal) for si in self.indexes.values())

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return self._tier_stats(bytes=state_nbytes(self.state_dict()), ntotal=self.ntotal,
                                streams=len(self.indexes), index=self.settings.index,
                                key_dim=self.key_dim if self.projected else self.dim)

    def state_dict(self) -> dict[str, Any]:
        live = torch.nonzero(self.live).flatten()
        state: dict[str, Any] = {name: getattr(self, name)[live].clone() for name in _SLOT_FIELDS}
        state["slots"] = live.clone()
        state["allocated"] = int(self.live.numel())
        blobs, table = [], []
        offset = 0
        for stream in sorted(self.indexes):
            si = self.indexes[stream]
            blob = index_to_tensor(si.index)
            blobs.append(blob)
            table.append([int(stream), si.kind, offset, int(blob.numel())])
            offset += int(blob.numel())
        state["index_blob"] = torch.cat(blobs) if blobs else torch.zeros(0, dtype=torch.uint8)
        state["index_table"] = table
        if self.projected:
            state["proj_A"], state["proj_b"] = self.proj_A.clone(), self.proj_b.clone()
        state.update(self._common_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["keys"].shape[1:] != (self.dim,):
            raise ValueError(f"ltm state has width {tuple(state['keys'].shape[1:])}, this tier {self.dim}")
        self._reset()
        self._alloc(int(state["allocated"]))
        slots = state["slots"].long()
        for name in _SLOT_FIELDS:
            getattr(self, name)[slots] = state[name].to(getattr(self, name).dtype)
        self.live[slots] = True
        if "proj_A" in state:
            self.proj_A, self.proj_b = state["proj_A"].float().clone(), state["proj_b"].float().clone()
        blob = state["index_blob"]
        s = self.settings
        for stream, kind, offset, length in state["index_table"]:
            index = index_from_tensor(blob[offset:offset + length])
            set_search_params(index, nprobe=s.nprobe, ef_search=s.ef_search)
            self.indexes[int(stream)] = _StreamIndex(index, kind)
        self._load_common_state(state)


@hookimpl
def cortex_register_components(register):
    register(LongTermMemory)
