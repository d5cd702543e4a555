"""Helpers shared by the memory tiers (``stm``, ``ltm``, ``archive``).

FAISS is imported lazily (inside functions) so that importing a tier, and therefore
``cortex --version``, stays fast. What lives here:

- [`faiss_module`][cortex_plugins.memory._vector_index.faiss_module], [`gpu_available`][cortex_plugins.memory._vector_index.gpu_available]:
  the lazy import and whether a GPU FAISS index can be used (CUDA present *and* a GPU
  build of FAISS with at least one GPU);
- [`make_index`][cortex_plugins.memory._vector_index.make_index]: an inner-product index by name
  (``flat``, ``ivf``, ``hnsw``, ``ivfpq``) for normalised keys, so scores are cosine similarities;
- [`rerank_exact`][cortex_plugins.memory._vector_index.rerank_exact]: a shortlist found by a
  compressed index re-ranked by exact cosine with the full keys (held in RAM or memory-mapped);
- [`index_to_tensor`][cortex_plugins.memory._vector_index.index_to_tensor] /
  [`index_from_tensor`][cortex_plugins.memory._vector_index.index_from_tensor]: FAISS indexes as
  ``uint8`` tensors (``faiss.serialize_index``), which is how tiers put them in their state;
- [`SearchMirror`][cortex_plugins.memory._vector_index.SearchMirror]: a GPU copy of a CPU index used
  for searching only, refreshed lazily after the CPU index changes;
- small tensor helpers (normalisation, empty retrievals, LRU order, state size, counters).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, Iterator


from cortex.kernel.interfaces import Entries, Retrieval
from cortex.kernel.lazy import F, torch

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")


# --------------------------------------------------------------------------- FAISS


def faiss_module():
    """Import and return ``faiss`` (deferred so that importing a tier costs nothing)."""
    import faiss

    return faiss


def gpu_available() -> bool:
    """Whether searches can run on a GPU: CUDA is present and FAISS was built with GPUs."""
    if not torch.cuda.is_available():
        return False
    faiss = faiss_module()
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0 and hasattr(faiss, "StandardGpuResources"))


#: below this many vectors (added, trained or queried) FAISS runs single-threaded
PARALLEL_WORK = 4096


@contextmanager
def faiss_threads(work: int) -> Iterator[None]:
    """Run the FAISS calls of the block on one thread unless ``work`` is large.

    FAISS and torch bundle separate OpenMP runtimes; on a small machine their spinning
    thread pools starve each other: many small adds after torch work can take far longer
    on two threads than on one. Small operations gain nothing from
    threads anyway, so they run on one; large ones keep FAISS's own thread count.
    """
    if work >= PARALLEL_WORK:
        yield
        return
    faiss = faiss_module()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def make_index(kind: str, dim: int, *, nlist: int = 1, hnsw_m: int = 32, pq_m: int = 32, pq_bits: int = 8,
               opq: bool = False, train_data=None):
    """A new inner-product index of ``kind`` over ``dim``-dimensional normalised keys.

    ``flat`` and ``hnsw`` are wrapped in ``IndexIDMap2`` (so they take and return our ids);
    ``ivf`` is an ``IndexIVFFlat`` with ``nlist`` lists, which keeps ids itself; ``ivfpq`` an
    ``IndexIVFPQ`` (``pq_m`` codes of ``pq_bits`` bits per key, so ``pq_m * pq_bits / 8`` bytes
    plus an 8-byte id), behind an ``OPQMatrix`` rotation when ``opq``. IVF kinds are trained on
    ``train_data`` (a float32 array) when given.
    """
    faiss = faiss_module()
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        return faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, hnsw_m, ip))
    if kind in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, max(1, nlist), ip)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, max(1, nlist), pq_m, pq_bits, ip)
            index.pq.cp.min_points_per_centroid = 1
        index.cp.min_points_per_centroid = 1  # we choose nlist from the data size ourselves
        if kind == "ivfpq" and opq:
            rotation = faiss.OPQMatrix(dim, pq_m)
            rotation.pq = faiss.ProductQuantizer(dim, pq_m, 8)  # the PQ it trains against
            rotation.pq.cp.min_points_per_centroid = 1
            rotation.referenced_objects = [rotation.pq]  # keep it alive beside the C++ pointer
            index = faiss.IndexPreTransform(rotation, index)
        if train_data is not None:
            index.train(train_data)
        return index
    raise ValueError(f"unknown index kind {kind!r}; use one of {', '.join(INDEX_KINDS)}")


def ivf_of(index):
    """The ``IndexIVF`` inside ``index`` (behind an ID map or a transform), or ``None``."""
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_params(index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Set ``nprobe`` (IVF kinds) or ``efSearch`` (HNSW) on ``index`` or the index it wraps."""
    faiss = faiss_module()
    ivf = ivf_of(index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if ef_search is not None and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def rerank_exact(q: torch.Tensor, found: torch.Tensor, keys, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each query's shortlist ``found`` (Q, S) by exact cosine.

    ``keys`` holds the full normalised keys by id: a tensor or a (memory-mapped) array;
    ``q`` (Q, d) is normalised. Returns (scores, ids), both (Q, k), ``-inf`` / -1 where the
    shortlist ran out.
    """
    ok = found >= 0
    flat = found.clamp(min=0).reshape(-1)
    if isinstance(keys, torch.Tensor):
        cand = keys[flat]
    else:  # a numpy array or memmap: read the rows in ascending order (fewer disk seeks)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        cand = torch.from_numpy(keys[uniq.numpy()].astype("float32", copy=False))[inverse]
    cand = cand.reshape(*found.shape, -1)
    exact = torch.einsum("qd,qsd->qs", q, cand).masked_fill(~ok, -math.inf)
    top, pos = exact.topk(min(k, found.shape[1]), dim=1)
    return top, torch.gather(found, 1, pos).masked_fill(top == -math.inf, -1)


def index_to_tensor(index) -> torch.Tensor:
    """Serialise a (CPU) FAISS index to a ``uint8`` tensor."""
    faiss = faiss_module()
    return torch.from_numpy(faiss.serialize_index(index).copy())


def index_from_tensor(blob: torch.Tensor):
    """Inverse of [`index_to_tensor`][cortex_plugins.memory._vector_index.index_to_tensor]."""
    faiss = faiss_module()
    return faiss.deserialize_index(blob.detach().cpu().contiguous().numpy().astype("uint8", copy=False))


class SearchMirror:
    """Searches a CPU index, through a GPU copy of it when one can be used.

    The CPU index stays the master (adds, removals, serialisation); the GPU copy is made
    lazily at the first search after a change (``mark_dirty``). Index types FAISS cannot
    put on a GPU (HNSW) are searched on the CPU.
    """

    _resources = None

    def __init__(self) -> None:
        self._gpu = None
        self._dirty = True
        self.enabled = gpu_available()

    def mark_dirty(self) -> None:
        self._dirty = True
        self._gpu = None

    def search(self, index, x, k: int):
        if self.enabled:
            if self._dirty:
                self._gpu = self._to_gpu(index)
                self._dirty = False
            if self._gpu is not None:
                return self._gpu.search(x, k)
        return index.search(x, k)

    def _to_gpu(self, index):
        faiss = faiss_module()
        try:
            if SearchMirror._resources is None:
                SearchMirror._resources = faiss.StandardGpuResources()
            return faiss.index_cpu_to_gpu(SearchMirror._resources, 0, index)
        except Exception:  # e.g. HNSW has no GPU version: search on the CPU
            return None


# --------------------------------------------------------------------------- tensors


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Detached float32 rows of unit L2 norm (zero rows stay zero)."""
    return F.normalize(x.detach().float(), dim=-1)


def to_numpy(x: torch.Tensor):
    """A contiguous float32 numpy array of ``x`` (on the CPU), as FAISS wants it."""
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


def empty_retrieval(shape: tuple[int, ...], k: int, value_dim: int, device, key_dim: int | None = None) -> Retrieval:
    """A retrieval of ``shape`` queries with every one of its ``k`` slots empty
    (ids -1, scores -inf, zero values and keys, tokens -1, uses 0)."""
    key_dim = value_dim if key_dim is None else key_dim
    return Retrieval(
        values=torch.zeros(*shape, k, value_dim, device=device),
        tokens=torch.full((*shape, k), -1, dtype=torch.long, device=device),
        scores=torch.full((*shape, k), -math.inf, device=device),
        ids=torch.full((*shape, k), -1, dtype=torch.long, device=device),
        keys=torch.zeros(*shape, k, key_dim, device=device),
        uses=torch.zeros(*shape, k, dtype=torch.long, device=device),
    )


def lru_order(last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Positions sorted by ``last`` ascending, ties broken by ``ids`` ascending (oldest first)."""
    by_id = torch.argsort(ids, stable=True)
    return by_id[torch.argsort(last[by_id], stable=True)]


def state_nbytes(state: Any) -> int:
    """Size of a tier's state as saved: tensor bytes plus the JSON length of everything else."""
    tensors = 0

    def strip(value: Any) -> Any:
        nonlocal tensors
        if isinstance(value, torch.Tensor):
            tensors += value.numel() * value.element_size()
            return 0
        if isinstance(value, dict):
            return {str(k): strip(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        return value

    rest = strip(state)
    return tensors + len(json.dumps(rest, ensure_ascii=False).encode())


def entries_nbytes_fp32(n: int, dim: int, value_dim: int | None = None) -> int:
    """Bytes of ``n`` uncompressed entries: float32 keys and values, int64 token, stream,
    id, uses and step. The baseline the archive's compression is measured against."""
    value_dim = dim if value_dim is None else value_dim
    return n * (4 * dim + 4 * value_dim + 5 * 8)


class Counters:
    """The read/write counters every tier reports and persists."""

    FIELDS = ("writes", "queries", "hits", "consolidated_in", "consolidated_out", "evicted")

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.FIELDS}

    def load(self, values: dict[str, Any]) -> None:
        for name in self.FIELDS:
            setattr(self, name, int(values.get(name, 0)))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.as_dict()
        out["hit_rate"] = self.hits / self.queries if self.queries else 0.0
        return out


class TierCommon:
    """What the built-in tiers (stm, ltm, archive) share: per-entry metadata lookup, the
    accounting of a write and the common part of ``stats()``. Mixed into a ``MemoryTier``
    that has ``settings.capacity``, ``counters`` (a [`Counters`][cortex_plugins.memory._vector_index.Counters])
    and ``meta`` (``{id: dict}``)."""

    counters: Counters
    meta: dict[int, Any]
    #: entries pushed out since the last ``displaced()`` call (filled while ``keep_displaced``)
    _displaced: list[Entries]

    def displaced(self) -> Entries | None:
        """Entries pushed out of this tier since the last call (kept only with ``keep_displaced``)."""
        parts, self._displaced = self._displaced, []
        if not parts:
            return None
        metas = [m for p in parts for m in (p.meta or [None] * len(p))]
        return Entries(
            keys=torch.cat([p.keys for p in parts]), values=torch.cat([p.values for p in parts]),
            tokens=torch.cat([p.tokens for p in parts]), streams=torch.cat([p.streams for p in parts]),
            uses=torch.cat([p.uses for p in parts]), steps=torch.cat([p.steps for p in parts]),
            meta=metas if any(m is not None for m in metas) else None)

    def meta_of(self, ids: torch.Tensor) -> list[Any]:
        """The metadata written with each entry id (``None`` where there is none)."""
        return [self.meta.get(int(i)) for i in ids.reshape(-1).tolist()]

    def _count_handover(self, n: int) -> int:
        """Count a write of ``n`` handed-down entries into a tier of fixed capacity; returns
        how many of the oldest are dropped at once (a write larger than the tier keeps its
        newest entries)."""
        self.counters.writes += n
        self.counters.consolidated_in += n
        first = max(0, n - self.settings.capacity)  # type: ignore[attr-defined]
        self.counters.evicted += first
        return first

    def _common_state(self) -> dict[str, Any]:
        """The state every built-in tier saves besides its entries: next id, counters, metadata."""
        return {"next_id": self.next_id, "counters": self.counters.as_dict(),  # type: ignore[attr-defined]
                "meta": meta_to_json(self.meta)}

    def _load_common_state(self, state: dict[str, Any]) -> None:
        """Restore what [`_common_state`][cortex_plugins.memory._vector_index.TierCommon._common_state] saved."""
        self.next_id = int(state["next_id"])
        self.counters.load(state.get("counters", {}))
        self.meta = meta_from_json(state.get("meta"))

    def _tier_stats(self, **fields: Any) -> dict[str, Any]:
        """``entries`` and ``capacity``, then ``fields``, then the counters."""
        out: dict[str, Any] = {"entries": len(self), "capacity": self.settings.capacity}  # type: ignore
        out.update(fields)
        out.update(self.counters.stats())
        return out


def meta_to_json(meta: dict[int, Any]) -> list[list[Any]]:
    """Per-entry metadata ``{id: dict}`` as a JSON-able list of ``[id, dict]`` pairs."""
    return [[int(k), v] for k, v in sorted(meta.items())]


def meta_from_json(items: list[list[Any]] | None) -> dict[int, Any]:
    return {int(k): v for k, v in (items or [])}
