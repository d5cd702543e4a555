"""The archive (``archive``): compressed storage whose levels get coarser as entries age.

```yaml
memory:
  - {type: archive, settings: {capacity: 100000, levels: [fp16, sq8, pq], age_steps: [1000, 10000]}}
```

The last tier. Entries arrive (from LTM's hand-over) at the first level and move to the
next level when their age in the archive (steps since they arrived) reaches
``age_steps[i]``. At every level **keys and values are stored compressed** and decoded on
read. A level is named ``KEYS`` or ``KEYS/VALUES``, each one of these codecs:

| codec  | FAISS codec                          | bytes per entry at width d |
|--------|--------------------------------------|----------------------------|
| `fp16` | `IndexScalarQuantizer` QT_fp16       | 2d                         |
| `sq8`  | `IndexScalarQuantizer` QT_8bit       | d                          |
| `sq6`  | `IndexScalarQuantizer` QT_6bit       | 3d/4                       |
| `sq4`  | `IndexScalarQuantizer` QT_4bit       | d/2                        |
| `pq`   | `IndexPQ` (`pq_m` x `pq_bits`), keys only | pq_m x pq_bits / 8    |

Values take the keys' codec when a level names one codec (``sq8`` means ``sq8/sq8``), and
``sq8`` under ``pq`` keys. The default deepest level, ``sq8/sq4``, spends the bytes on the
keys, which decide what is found (recall), and fewer on the values, which are only read
for the k found. `cortex bench memory` measures the deepest level on a run's own keys
(recall@10 against exact search, bytes per entry; figures on the benchmarks page);
``tests/test_archive.py`` shows that the value codec does not change what is found and
that 4-bit keys find less than 8-bit keys.

Levels after the first are trained on the archive's (decoded) entries once it holds
``train_after`` entries (``pq`` also needs at least ``2**pq_bits``); until then entries
wait at the deepest trained level. The first level must be ``fp16``, and each level's keys
and values are no finer than the previous level's.

Each level keeps its key codes inside its FAISS index, in the same order as the level's
columns (ids, value codes, tokens, streams, uses, last access, arrival step), so a FAISS
position is a row. **Stream filtering**: when a stream owns all of a level, the level's
index is searched directly; otherwise the stream's rows are decoded (in chunks) and
scored with one matrix product. Both score a query against the decoded key, so they rank
alike. The archive is read rarely (it is the slowest, largest tier).

**Eviction**: oldest arrival first (then oldest id), in chunks of 5% of capacity, before new
entries are added, so the newest entry is never evicted. ``compact(step)`` moves aged
entries down; ``write`` and ``handover`` call it. ``handover`` returns ``None``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from cortex import hookimpl
from cortex.kernel.interfaces import Entries, MemoryTier, Retrieval, Settings
from cortex.kernel.lazy import torch, no_grad
from cortex_plugins.memory._vector_index import (
    Counters,
    TierCommon,
    empty_retrieval,
    entries_nbytes_fp32,
    faiss_module,
    faiss_threads,
    index_from_tensor,
    index_to_tensor,
    lru_order,
    normalize,
    state_nbytes,
    to_numpy,
)

#: codecs from finest to coarsest; ``pq`` is for keys only
CODECS = ("fp16", "sq8", "sq6", "sq4", "pq")
#: FAISS scalar quantiser type of each scalar codec
_SQ_TYPES = {"fp16": "QT_fp16", "sq8": "QT_8bit", "sq6": "QT_6bit", "sq4": "QT_4bit"}


def level_codecs(level: str) -> tuple[str, str]:
    """The (keys, values) codecs of a level named ``KEYS`` or ``KEYS/VALUES``."""
    keys, _, values = level.partition("/")
    return keys, values or ("sq8" if keys == "pq" else keys)
#: per-entry columns and their storage types (int32 where the range allows: bytes count)
_DTYPES = {"ids": "int64", "streams": "int64", "tokens": "int32", "uses": "int32", "last": "int32", "born": "int32"}
_COLUMNS = tuple(_DTYPES)
#: rows decoded at once when scoring part of a level
_DECODE_CHUNK = 32768


class _Level:
    """One compression level: a FAISS index of key codes plus row-aligned columns."""

    def __init__(self, codec: str, value_dim: int) -> None:
        self.codec = codec
        self.index = None  # key index (an IndexFlatCodes), None until trained
        self.vcodec = None  # value codec (an empty IndexScalarQuantizer), None until trained
        self.vcodes = torch.zeros(0, 0, dtype=torch.uint8)
        self.cols = {name: torch.zeros(0, dtype=getattr(torch, dtype)) for name, dtype in _DTYPES.items()}
        self.n = 0
        self.value_dim = value_dim

    @property
    def trained(self) -> bool:
        return self.index is not None

    def col(self, name: str) -> torch.Tensor:
        return self.cols[name][: self.n]

    def key_codes(self, rows: torch.Tensor | None = None):
        """Key codes of ``rows`` (all rows when ``None``) as a (rows, code_size) uint8 array."""
        faiss = faiss_module()
        size = self.index.code_size
        codes = faiss.rev_swig_ptr(self.index.codes.data(), self.n * size).reshape(self.n, size)
        return codes.copy() if rows is None else codes[rows.numpy()]

    def decode_keys(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() == 0:
            return torch.zeros(0, self.index.d)
        return torch.from_numpy(self.index.sa_decode(self.key_codes(rows)))

    def decode_values(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.numel() == 0:
            return torch.zeros(0, self.value_dim)
        return torch.from_numpy(self.vcodec.sa_decode(self.vcodes[rows].numpy()))

    def append(self, keys: torch.Tensor, values: torch.Tensor, columns: dict[str, torch.Tensor]) -> None:
        n = keys.shape[0]
        if n == 0:
            return
        with faiss_threads(n):
            self.index.add(to_numpy(keys))
            vcodes = torch.from_numpy(self.vcodec.sa_encode(to_numpy(values)))
        need = self.n + n
        if need > self.cols["ids"].numel():  # amortised growth of the columns
            size = max(need, 2 * self.cols["ids"].numel(), 64)
            grown = torch.zeros(size, vcodes.shape[1], dtype=torch.uint8)
            if self.n:
                grown[: self.n] = self.vcodes[: self.n]
            self.vcodes = grown
            for name, col in self.cols.items():
                bigger = torch.zeros(size, dtype=col.dtype)
                bigger[: self.n] = col[: self.n]
                self.cols[name] = bigger
        self.vcodes[self.n: need] = vcodes
        for name in _COLUMNS:
            self.cols[name][self.n: need] = columns[name].to(getattr(torch, _DTYPES[name]))
        self.n = need

    def remove(self, rows: torch.Tensor) -> None:
        """Drop ``rows``; the index keeps the remaining codes in order, and so do the columns."""
        if rows.numel() == 0:
            return
        faiss = faiss_module()
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[rows] = False
        with faiss_threads(self.n):
            self.index.remove_ids(faiss.IDSelectorBatch(rows.numpy().astype("int64")))
        m = int(keep.sum())
        self.vcodes[:m] = self.vcodes[: self.n][keep].clone()
        for name, col in self.cols.items():
            col[:m] = col[: self.n][keep].clone()
        self.n = m


class Archive(TierCommon, MemoryTier):
    """Compressed, levelled long-term storage (see the module docs)."""

    name = "archive"

    class Settings(Settings):
        capacity: int = Field(100000, gt=0, description="Most entries held, over all streams and levels.")
        levels: list[str] = Field(["fp16", "sq8", "sq8/sq4"], min_length=1, description="Compression levels entries pass through as they age, from finest to coarsest, each `KEYS` or `KEYS/VALUES` of the codecs fp16, sq8, sq6, sq4 and pq (keys only); the first must be fp16.")
        age_steps: list[int] = Field([1000, 10000], description="Age (steps since arrival) at which an entry moves to level i+1; one item per level after the first, non-decreasing.")
        pq_m: int = Field(32, gt=0, description="pq level: number of sub-quantisers; must divide the model width.")
        pq_bits: int = Field(8, ge=1, le=16, description="pq level: bits per sub-quantiser code.")
        train_after: int = Field(4096, gt=0, description="Entries needed before the levels after the first are trained (pq also needs 2**pq_bits); entries wait at the previous level until then.")

        @model_validator(mode="after")
        def _check_levels(self):
            levels = self.levels
            for level in levels:
                keys, values = level_codecs(level)
                if keys not in CODECS or values not in CODECS[:-1] or level.count("/") > 1:
                    raise ValueError(f"level {level!r}: name it KEYS or KEYS/VALUES with KEYS one of "
                                     f"{', '.join(CODECS)} and VALUES one of {', '.join(CODECS[:-1])}")
            if levels[0] != "fp16":
                raise ValueError("levels must start with 'fp16' (the later levels are trained on entries held at fp16 first)")
            ranks = [tuple(CODECS.index(c) for c in level_codecs(x)) for x in levels]
            coarser = all(a[0] <= b[0] and a[1] <= b[1] and a != b for a, b in zip(ranks, ranks[1:]))
            if not coarser:
                raise ValueError(f"levels must be distinct and ordered from finest to coarsest ({', '.join(CODECS)}; "
                                 f"keys and values each no finer than the level before), got {levels}")
            if len(self.age_steps) != len(levels) - 1:
                raise ValueError(f"age_steps needs one item per level after the first: {len(levels) - 1} for {levels}, got {len(self.age_steps)}")
            if any(a < 0 for a in self.age_steps) or self.age_steps != sorted(self.age_steps):
                raise ValueError(f"age_steps must be non-negative and non-decreasing, got {self.age_steps}")
            return self

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        if context.config is None:
            raise ValueError("archive needs the model's shape (context.config.dim)")
        self.dim = int(context.config.dim)
        if any(level_codecs(x)[0] == "pq" for x in settings.levels) and self.dim % settings.pq_m:
            raise ValueError(
                f"archive pq_m ({settings.pq_m}) must divide the model width ({self.dim}); "
                f"choose one of {[m for m in range(1, self.dim + 1) if self.dim % m == 0]}"
            )
        self.seed = int(getattr(context, "seed", 0))
        self.counters = Counters()
        self._reset()

    def _reset(self) -> None:
        self.levels = [_Level(codec, self.dim) for codec in self.settings.levels]
        self._train(self.levels[0], None, None)  # fp16 needs no data
        self.next_id = 0
        self.meta: dict[int, Any] = {}

    # ------------------------------------------------------------------ codecs

    def _train(self, level: _Level, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        faiss = faiss_module()
        ip, d = faiss.METRIC_INNER_PRODUCT, self.dim
        keys_codec, values_codec = level_codecs(level.codec)

        def scalar(codec: str):
            return faiss.IndexScalarQuantizer(d, getattr(faiss.ScalarQuantizer, _SQ_TYPES[codec]), ip)

        if keys_codec == "pq":
            index = faiss.IndexPQ(d, self.settings.pq_m, self.settings.pq_bits, ip)
            index.pq.cp.min_points_per_centroid = 1  # we decide when there is enough data
        else:
            index = scalar(keys_codec)
        vcodec = scalar(values_codec)
        if level.codec != "fp16":  # fp16 needs no training
            with faiss_threads(keys.shape[0]):
                index.train(to_numpy(keys))
                vcodec.train(to_numpy(values))
        level.index, level.vcodec = index, vcodec

    def _min_train(self, codec: str) -> int:
        s = self.settings
        return max(s.train_after, 2 ** s.pq_bits) if level_codecs(codec)[0] == "pq" else s.train_after

    def _training_data(self, limit: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values of the entries held now (a seeded sample of ``limit``)."""
        sizes = [level.n for level in self.levels]
        pick = torch.arange(sum(sizes))
        if pick.numel() > limit:
            g = torch.Generator().manual_seed(self.seed)
            pick = torch.sort(torch.randperm(pick.numel(), generator=g)[:limit]).values
        keys, values = [], []
        start = 0
        for level, n in zip(self.levels, sizes):
            rows = pick[(pick >= start) & (pick < start + n)] - start
            start += n
            if rows.numel():
                keys.append(level.decode_keys(rows))
                values.append(level.decode_values(rows))
        return normalize(torch.cat(keys)), torch.cat(values)

    # ------------------------------------------------------------------ write

    @no_grad
    def write(self, entries: Entries, *, step: int = 0) -> None:
        n = len(entries)
        if n == 0:
            return
        first = self._count_handover(n)
        cap = self.settings.capacity
        n -= first
        held = len(self)
        if held + n > cap:
            self._evict(min(held, max(held + n - cap, max(1, math.ceil(0.05 * cap)))))
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        columns = {
            "ids": ids,
            "tokens": entries.tokens[first:].detach().cpu().long().reshape(-1),
            "streams": entries.streams[first:].detach().cpu().long().reshape(-1),
            "uses": (torch.zeros(n, dtype=torch.long) if entries.uses is None
                     else entries.uses[first:].detach().cpu().long().reshape(-1)),
            "last": torch.full((n,), step, dtype=torch.long),
            "born": torch.full((n,), step, dtype=torch.long),
        }
        self.levels[0].append(normalize(entries.keys[first:]).cpu(),
                              entries.values[first:].detach().cpu().float(), columns)
        if entries.meta is not None:
            for i, m in zip(ids.tolist(), entries.meta[first:]):
                if m is not None:
                    self.meta[i] = m
        self.compact(step)

    def _evict(self, count: int) -> None:
        born = torch.cat([lv.col("born") for lv in self.levels])
        ids = torch.cat([lv.col("ids") for lv in self.levels])
        which = torch.cat([torch.full((lv.n,), i, dtype=torch.long) for i, lv in enumerate(self.levels)])
        rows = torch.cat([torch.arange(lv.n) for lv in self.levels])
        victims = lru_order(born, ids)[:count]
        self.counters.evicted += int(victims.numel())
        if self.meta:
            for i in self.ids_at(which[victims], rows[victims]):
                self.meta.pop(i, None)
        for li, level in enumerate(self.levels):
            level.remove(rows[victims][which[victims] == li])

    def ids_at(self, levels: torch.Tensor, rows: torch.Tensor) -> list[int]:
        return [int(self.levels[li].cols["ids"][r]) for li, r in zip(levels.tolist(), rows.tolist())]

    @no_grad
    def compact(self, step: int) -> int:
        """Move entries whose age reached a deeper level's ``age_steps`` down; returns how many.

        A level that needs training is trained here, on the entries held, once the archive
        holds enough of them; until then entries wait at the deepest trained level.
        """
        ages = torch.tensor(self.settings.age_steps, dtype=torch.long)
        moved = 0
        for li, level in enumerate(self.levels[:-1]):
            if level.n == 0:
                continue
            age = step - level.col("born").long()
            target = torch.searchsorted(ages, age, right=True)  # the level this age belongs to
            if not bool((target > li).any()):
                continue
            for tj in range(int(target.max()), li, -1):  # make sure the levels wanted exist
                if not self.levels[tj].trained and bool((target >= tj).any()):
                    if len(self) >= self._min_train(self.levels[tj].codec):
                        self._train(self.levels[tj], *self._training_data())
            usable = torch.tensor([lv.trained for lv in self.levels])
            deepest = torch.cummax(torch.where(usable, torch.arange(len(self.levels)), -1), 0).values
            target = deepest[target]  # the deepest trained level at or above the wanted one
            for tj in range(li + 1, len(self.levels)):
                rows = torch.nonzero(target == tj).flatten()
                if rows.numel() == 0:
                    continue
                keys, values = level.decode_keys(rows), level.decode_values(rows)
                cols = {name: level.col(name)[rows].clone() for name in _COLUMNS}
                self.levels[tj].append(normalize(keys), values, cols)
                moved += int(rows.numel())
            gone = torch.nonzero(target > li).flatten()
            level.remove(gone)
        return moved

    # ------------------------------------------------------------------ read

    def _score_level(self, level: _Level, rows: torch.Tensor, q: torch.Tensor, k: int):
        """Top-``k`` (scores, rows) of ``q`` among ``rows`` of ``level``."""
        kk = min(k, rows.numel())
        if rows.numel() == level.n:  # the stream owns the level: search the index itself
            with faiss_threads(q.shape[0] * level.n // 256):
                dist, found = level.index.search(to_numpy(q), kk)
            return torch.from_numpy(dist).float(), torch.from_numpy(found).long()
        best_s = torch.full((q.shape[0], 0), -math.inf)
        best_r = torch.zeros(q.shape[0], 0, dtype=torch.long)
        for part in torch.split(rows, _DECODE_CHUNK):
            scores = q @ level.decode_keys(part).T
            s, p = scores.topk(min(kk, part.numel()), dim=1)
            best_s, pos = torch.cat([best_s, s], 1), torch.cat([best_r, part[p]], 1)
            best_s, order = best_s.topk(min(kk, best_s.shape[1]), dim=1)
            best_r = torch.gather(pos, 1, order)
        return best_s, best_r

    def _read(self, stream: int, q: torch.Tensor, k: int, step: int, touch: bool, device) -> Retrieval:
        nq = q.shape[0]
        out = empty_retrieval((nq,), k, self.dim, torch.device("cpu"))
        if k <= 0 or nq == 0:
            return self._to(out, device)
        cand_s, cand_l, cand_r = [], [], []
        for li, level in enumerate(self.levels):
            if level.n == 0:
                continue
            rows = torch.nonzero(level.col("streams") == stream).flatten()
            if rows.numel() == 0:
                continue
            s, r = self._score_level(level, rows, q, k)
            cand_s.append(s)
            cand_r.append(r)
            cand_l.append(torch.full_like(r, li))
        if not cand_s:
            return self._to(out, device)
        scores, rows, lvl = torch.cat(cand_s, 1), torch.cat(cand_r, 1), torch.cat(cand_l, 1)
        scores = scores.masked_fill(rows < 0, -math.inf)
        kk = min(k, scores.shape[1])
        top, pick = scores.topk(kk, dim=1)
        rows, lvl = torch.gather(rows, 1, pick), torch.gather(lvl, 1, pick)
        ok = top > -math.inf
        out.scores[:, :kk] = top.masked_fill(~ok, -math.inf)
        for li, level in enumerate(self.levels):
            sel = ok & (lvl == li)
            if not bool(sel.any()):
                continue
            r = rows[sel]
            out.values[:, :kk][sel] = level.decode_values(r)
            out.tokens[:, :kk][sel] = level.col("tokens")[r].long()
            out.ids[:, :kk][sel] = level.col("ids")[r]
            out.keys[:, :kk][sel] = normalize(level.decode_keys(r))
            if touch:
                seen = torch.unique(r)
                level.cols["uses"][seen] += 1
                level.cols["last"][seen] = step
            out.uses[:, :kk][sel] = level.col("uses")[r].long()
        self.counters.hits += int(ok.any(dim=1).sum())
        return self._to(out, device)

    @staticmethod
    def _to(r: Retrieval, device) -> Retrieval:
        return Retrieval(r.values.to(device), r.tokens.to(device), r.scores.to(device), r.ids.to(device),
                         r.keys.to(device), r.uses.to(device))

    @no_grad
    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0, touch: bool = True) -> Retrieval:
        q = normalize(queries).cpu()
        self.counters.queries += q.shape[0]
        return self._read(int(stream), q, max(k, 0), step, touch, queries.device)

    @no_grad
    def read_batch(self, queries: torch.Tensor, streams: torch.Tensor, k: int, *, step: int = 0,
                   touch: bool = True) -> Retrieval:
        """Top-``k`` of each row's own stream for ``queries`` (B, T, d): shapes (B, T, k, ...)."""
        b, t, d = queries.shape
        k = max(k, 0)
        q = normalize(queries).cpu()
        self.counters.queries += b * t
        out = empty_retrieval((b, t), k, self.dim, torch.device("cpu"))
        streams = streams.detach().cpu().long().reshape(b)
        for stream in torch.unique(streams).tolist():
            rows = torch.nonzero(streams == stream).flatten()
            got = self._read(stream, q[rows].reshape(-1, d), k, step, touch, torch.device("cpu"))
            out.values[rows] = got.values.reshape(rows.numel(), t, k, self.dim)
            out.tokens[rows] = got.tokens.reshape(rows.numel(), t, k)
            out.scores[rows] = got.scores.reshape(rows.numel(), t, k)
            out.ids[rows] = got.ids.reshape(rows.numel(), t, k)
            out.keys[rows] = got.keys.reshape(rows.numel(), t, k, self.dim)
            out.uses[rows] = got.uses.reshape(rows.numel(), t, k)
        return self._to(out, queries.device)

    # ------------------------------------------------------------------ consolidation

    def handover(self, *, step: int = 0) -> Entries | None:
        """The archive is the last tier: runs [`compact`][cortex_plugins.memory.archive.Archive.compact], hands nothing over."""
        self.compact(step)
        return None

    def clear(self, stream: int | None = None) -> None:
        if stream is None:
            self._reset()
            return
        for level in self.levels:
            if level.n:
                rows = torch.nonzero(level.col("streams") == int(stream)).flatten()
                for i in level.col("ids")[rows].tolist():
                    self.meta.pop(i, None)
                level.remove(rows)

    def __len__(self) -> int:
        return sum(level.n for level in self.levels)

    @property
    def ntotal(self) -> int:
        """Entries held, counted by the FAISS indexes themselves."""
        return sum(int(level.index.ntotal) for level in self.levels if level.trained)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        n = len(self)
        size = state_nbytes(self.state_dict())
        return self._tier_stats(
            bytes=size, ntotal=self.ntotal, levels={lv.codec: lv.n for lv in self.levels},
            trained=[lv.codec for lv in self.levels if lv.trained], bytes_per_entry=size / n if n else 0.0,
            fp32_ratio=size / entries_nbytes_fp32(n, self.dim) if n else 0.0)

    def state_dict(self) -> dict[str, Any]:
        levels = []
        for level in self.levels:
            item: dict[str, Any] = {"codec": level.codec, "n": level.n}
            if level.trained:
                item["index"] = index_to_tensor(level.index)
                item["vcodec"] = index_to_tensor(level.vcodec)
                item["vcodes"] = level.vcodes[: level.n].clone()
                for name in _COLUMNS:
                    item[name] = level.col(name).clone()
            levels.append(item)
        return {"levels": levels, **self._common_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        codecs = [item["codec"] for item in state["levels"]]
        if codecs != list(self.settings.levels):
            raise ValueError(f"archive state has levels {codecs}, this tier {list(self.settings.levels)}")
        self._reset()
        for level, item in zip(self.levels, state["levels"]):
            if "index" not in item:
                level.index = level.vcodec = None
                continue
            level.index = index_from_tensor(item["index"])
            level.vcodec = index_from_tensor(item["vcodec"])
            if level.index.d != self.dim:
                raise ValueError(f"archive state has width {level.index.d}, this tier {self.dim}")
            level.n = int(item["n"])
            level.vcodes = item["vcodes"].to(torch.uint8).clone()
            level.cols = {name: item[name].to(getattr(torch, dtype)).clone() for name, dtype in _DTYPES.items()}
        self._load_common_state(state)


@hookimpl
def cortex_register_components(register):
    register(Archive)
