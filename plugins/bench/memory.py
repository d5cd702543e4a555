"""``cortex bench memory``: the memory tiers' indexes against the fastest exact search.

**Keys.** By default (``keys: auto``) the suite runs each target (a run directory, or a
manifest built untrained — said so in the report) over **held-out** demo-corpus text (a
seed different from the training data's) and collects the memory keys of every position:
``model.memory_system.keys(idx)`` when the model has a memory system, else the core's
local-window hidden states (``hidden_states(idx, layer=last, window=16)``). A key depends on
the tokens of its *receptive field* — ``(key_layer + 1) x (window - 1) + 1`` tokens back,
plus the largest of the memory system's ``key_offsets`` (``MemorySystem.key_span``), cut at
the start of its row — so keys are de-duplicated by those tokens; when a size needs more
unique keys, more demo documents are generated. Beyond ``model_keys_max`` entries (or with
``keys: clustered``) the keys are **clustered synthetic** vectors of the model's width
([`clustered_keys`][cortex_plugins.bench.memory.clustered_keys]); never uniform random
vectors, on which no index beats brute force. Keys and queries are cached as ``.npy`` files
(with a JSON fingerprint of what made them) in the output directory and reused; the
database keys are read memory-mapped from that file.

**Exact search, the 1x.** At every size the same keys are searched exactly two ways, each
on every CPU and on one: FAISS ``IndexFlatIP`` (BLAS) and a torch matmul + topk (in chunks
of keys). The fastest of these is the reference every speed-up is a multiple of, and
FAISS's top-k is the ground truth of recall@k.

**What is measured.** Up to ``tier_max`` entries, whole tiers written in one bulk write: LTM
``flat``, ``ivf``, ``hnsw``, ``ivfpq`` and the Archive aged to its deepest level. Above it,
where a tier's fp32 keys and values no longer fit in RAM, the LTM's IVF-PQ index
(``index:ivfpq``, the same ``make_index`` the tier uses) with its shortlist re-ranked exactly
against the full keys **memory-mapped from the keys file on disk**. For each:

- **build**: seconds of the write (index training and adds included; the archive's
  includes training its codecs and ageing every entry to the deepest level);
- **queries/s**: held-out query keys in batches of ``batch`` (k = 10), median over
  ``rounds`` passes after a warm-up search, and its multiple of the fastest exact search;
- **recall@10** against the exact top-10 on the same entries;
- **bytes/entry**: a tier's state written with [`save_state`][cortex.runtime.rundir.save_state]
  (file sizes over entries, and the ratio to the uncompressed fp32 tier,
  ``entries_nbytes_fp32``), and the bytes of its FAISS index alone (for ``index:ivfpq``, the
  RAM it holds; the full keys stay on disk);
- **RSS**: the process's resident memory after the build and its peak so far.

IVF, IVF-PQ and HNSW are measured at several search settings (``nprobe``, ``shortlist``,
``efSearch``); the checks take the fastest one with recall@10 at the target. HNSW is
skipped at a size when the build time predicted from the previous size (``n log n``)
exceeds ``hnsw_budget_s``, and abandoned when its build (in chunks of 5%) passes it.

Sizes are settings of the suite (``MemoryBench.Settings``), chosen on the command line with
``--set sizes=1e6,3e6,1e7``; tests subclass the settings with tiny sizes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, median_and_spread
from cortex.kernel.interfaces import BuildContext, Entries, Settings
from cortex.kernel.lazy import torch, no_grad
from cortex_plugins.memory._vector_index import entries_nbytes_fp32

#: LTM: the best approximate index must reach this many times the fastest exact search ...
SPEEDUP_TARGET = 50.0
#: ... with at least this recall@10 against exact search
LTM_RECALL_TARGET = 0.9
#: the compressed index the largest sizes are held in: at most this many bytes per entry in RAM
INDEX_BYTES_TARGET = 64.0
#: Archive: bytes on disk per entry at most this share of the uncompressed fp32 tier's ...
ARCHIVE_BYTES_TARGET = 0.25
#: ... with at least this recall@10
ARCHIVE_RECALL_TARGET = 0.8

INDEXES = ("ltm:flat", "ltm:ivf", "ltm:hnsw", "ltm:ivfpq", "archive")
#: the two exact searches over all entries; the faster one is the 1x
FAISS_EXACT, TORCH_EXACT = "exact:faiss", "exact:torch"
#: above ``tier_max``: the LTM's IVF-PQ index, shortlist re-ranked with memory-mapped full keys
SCALE_INDEX = "index:ivfpq"
#: queries of the untimed search before each timed setting
WARM_UP = 16
#: keys per chunk when adding to an index or scoring with torch (bounds the temporary memory)
CHUNK = 262_144


# --------------------------------------------------------------------------- measures


def recall_at_k(found: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Mean share of each query's exact top-``k`` ids (``exact``, -1 = none) that ``found``
    also returned in its first ``k``; queries with no exact neighbour are left out."""
    found, exact = found[:, :k], exact[:, :k]
    valid = exact >= 0
    hit = ((exact[:, :, None] == found[:, None, :]) & (found[:, None, :] >= 0)).any(dim=2) & valid
    per_query = valid.sum(dim=1)
    keep = per_query > 0
    if not bool(keep.any()):
        return 0.0
    return float((hit.sum(dim=1)[keep].float() / per_query[keep].float()).mean())


def torch_exact(keys: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the exact top-``k`` of normalised ``keys`` for ``queries``: torch matmul + topk
    over chunks of ``CHUNK`` keys, merged (so the score matrix never holds every key)."""
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    best_s = torch.full((q.shape[0], 0), -math.inf)
    best_i = torch.zeros(q.shape[0], 0, dtype=torch.long)
    for lo in range(0, keys.shape[0], CHUNK):
        top = (q @ keys[lo:lo + CHUNK].T).topk(min(k, keys.shape[0] - lo), dim=1)
        best_s, pos = torch.cat([best_s, top.values], 1).topk(min(k, best_s.shape[1] + top.values.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, top.indices + lo], 1), 1, pos)
    return best_i


def clustered_keys(n: int, dim: int, seed: int, out: np.ndarray | None = None, *, clusters: int = 4096,
                   rank: int = 8, spread: float = 0.6, noise: float = 0.05) -> np.ndarray:
    """``n`` unit keys of width ``dim`` from a fixed clustered distribution, sampled with ``seed``.

    The distribution (seed 0, the same for database and queries): ``clusters`` centres drawn
    from N(0, I/dim) with Zipf-like weights (share of cluster i proportional to 1/(i + 10)),
    each point its centre plus a spread in a shared ``rank``-dimensional subspace (scale
    ``spread``) plus isotropic noise (scale ``noise``), then normalised. So neighbours are mostly in one
    cluster, clusters differ in size, and a key's intrinsic dimension is low, as with a
    model's keys. Written into ``out`` (e.g. a memory-mapped file) in chunks when given.
    """
    shape = np.random.default_rng(0)
    centres = shape.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)
    basis = spread * shape.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
    weights = 1.0 / (np.arange(clusters) + 10.0)
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32) if out is None else out
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        x = centres[rng.choice(clusters, m, p=weights)]
        x += rng.standard_normal((m, rank), dtype=np.float32) @ basis
        x += noise * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:lo + m] = x
    return out


def rss_bytes() -> tuple[int, int]:
    """(resident now, peak so far) of this process in bytes (now = peak where /proc is missing)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak, peak
    return now, max(now, peak)  # the kernel's high-water mark is updated lazily


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Threads for torch and FAISS during the run, and why.

    Explicit ``requested`` wins. Otherwise every CPU, unless the machine is already busy
    (1-minute load average >= CPUs): then one, since OpenMP thread teams on a shared,
    oversubscribed machine wait on each other.
    """
    cpus = os.cpu_count() or 1
    if requested:
        return requested, "set by the suite's settings"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if cpus > 1 and load >= cpus:
        return 1, f"machine busy (load average {load:.1f} on {cpus} CPUs): one thread"
    return cpus, f"all {cpus} CPUs (load average {load:.1f})"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def ivf_nlist(n: int) -> int:
    """The power of two nearest ``sqrt(n)``: a standard IVF list count."""
    return 2 ** max(1, round(math.log2(math.sqrt(max(n, 4)))))


def _weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.core.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _harness_out_dir() -> Path | None:
    """The suite's output directory: the harness (``run_suite``) does not pass it to suites,
    so it is read from the calling ``run_suite`` frame; ``None`` when called otherwise."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "run_suite" and frame.f_globals.get("__name__") == "cortex.bench.harness":
            out, suite = frame.f_locals.get("out_dir"), frame.f_locals.get("suite")
            if out is not None and suite is not None:
                out = Path(out)
                return out if out.name == suite else out / suite
        frame = frame.f_back
    return None


# --------------------------------------------------------------------------- keys


class KeySource:
    """Memory keys of one target over held-out demo text, de-duplicated by receptive field."""

    def __init__(self, target: Path, key_window: int, text_seed: int, log: Callable[[str], None]) -> None:
        from cortex.assembly import assemble
        from cortex.kernel.manifest import load_manifest
        from cortex.runtime.rundir import load_run

        self.target = target
        self.is_run = target.is_dir()
        self.model = load_run(target) if self.is_run else assemble(load_manifest(target))
        if self.is_run:
            trained = (target / "metrics.jsonl").is_file()
            self.source = "run directory" + (" (trained)" if trained else " (no metrics.jsonl: never trained?)")
        else:
            self.source = "manifest (built untrained)"
        self.model.eval()
        m = self.model.manifest
        cfg = self.model.config
        ms = self.model.memory_system
        if ms is not None:
            self.layer, self.window = ms.key_layer, ms.settings.key_window
            self.how = f"memory_system.keys (block {self.layer}, window {self.window}, offsets {ms.settings.key_offsets})"
            self._keys = ms.keys
        else:
            self.layer, self.window = cfg.layers - 1, key_window
            self.how = f"core.hidden_states(layer={self.layer}, window={self.window}) (no memory system)"
            self._keys = lambda idx: self.model.core.hidden_states(idx, layer=self.layer, window=self.window).float()
        self.context = cfg.context
        self.dim = cfg.dim
        # a windowed hidden state after block L sees (L + 1) x (window - 1) + 1 tokens (each
        # block widens the band); a key's offsets reach further back
        span = (self.layer + 1) * (self.window - 1) + 1
        self.receptive = ms.key_span() if ms is not None else (
            cfg.context if self.window <= 0 else min(cfg.context, span))
        data = m.train.data if m.train is not None else None
        self.train_seed = int(data.settings.get("seed", 0)) if data is not None and data.type == "demo" else 0
        self.text_seed = text_seed if text_seed != self.train_seed else text_seed + 1
        self.fingerprint = _weights_fingerprint(self.model)
        self.log = log
        self.docs = 0
        self.tokens = 0
        self.duplicates = 0

    def _rows(self, seed: int) -> Any:
        """Rows of ``context`` tokens of demo documents of ``seed`` (EOS between documents)."""
        from cortex_plugins.data.demo import demo_documents

        tok = self.model.tokenizer
        buf: list[int] = []
        for doc in demo_documents(10**9, seed=seed):
            buf.extend(tok.encode(doc.text))
            buf.append(tok.eos_id)
            if seed == self.text_seed:
                self.docs += 1
            while len(buf) >= self.context:
                yield buf[: self.context]
                buf = buf[self.context:]

    @no_grad
    def collect(self, n: int, seed: int, *, batch_rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` unique keys (n, dim) float32 and their next tokens of ``seed``'s text."""
        seen: set[int] = set()
        keys = np.zeros((n, self.dim), dtype=np.float32)
        nexts = np.zeros(n, dtype=np.int64)
        got = 0
        rows = self._rows(seed)
        R = self.receptive
        last_log = time.time()
        while got < n:
            chunk = [next(rows) for _ in range(batch_rows)]
            idx = torch.tensor(chunk, dtype=torch.long)
            k = self._keys(idx).float().numpy()
            arr = idx.numpy().astype(np.int32)
            for b in range(arr.shape[0]):
                row = arr[b]
                for t in range(self.context - 1):  # the last position has no next token in its row
                    h = hash(row[max(0, t - R + 1): t + 1].tobytes())
                    if h in seen:
                        if seed == self.text_seed:
                            self.duplicates += 1
                        continue
                    seen.add(h)
                    keys[got] = k[b, t]
                    nexts[got] = row[t + 1]
                    got += 1
                    if got == n:
                        break
                if seed == self.text_seed:
                    self.tokens += self.context
                if got == n:
                    break
            if time.time() - last_log > 30:
                self.log(f"keys: {got:,}/{n:,}")
                last_log = time.time()
        return keys, nexts


# --------------------------------------------------------------------------- the suite


class MemoryBench(BenchSuite):
    """LTM (flat, IVF, HNSW, IVF-PQ) and Archive indexes against the fastest exact search:
    build time, queries/s, recall@10, bytes/entry, RSS."""

    name = "memory"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        sizes: list[int] = Field([10_000, 100_000, 1_000_000], description="Entries per tier measured (e.g. --set sizes=1e6,3e6,1e7).")
        quick_sizes: list[int] = Field([10_000, 50_000], description="Sizes with --quick.")
        quick_queries: int = Field(256, gt=0, description="Query keys per seed with --quick (the first of queries).")
        queries: int = Field(1024, gt=0, description="Held-out query keys per seed.")
        batch: int = Field(256, gt=0, description="Queries per read call (fixed).")
        k: int = Field(10, gt=0, description="Neighbours per query (recall@k).")
        rounds: int = Field(3, gt=0, description="Timed passes over the queries (median); 1 with --quick.")
        threads: int | None = Field(None, gt=0, description="torch and FAISS threads (default: every CPU, "
                                                            "or 1 when the machine is already busy).")
        pass_budget_s: float = Field(10.0, gt=0, description="Timed passes stop once they took this long.")
        key_window: int = Field(16, ge=0, description="Key window for models without a memory system.")
        text_seed: int = Field(104729, description="Seed of the held-out demo text (bumped if it is the training seed).")
        keys: Literal["auto", "model", "clustered"] = Field("auto", description="Keys measured: the target's own (model), clustered synthetic keys of its width, or auto (model keys up to model_keys_max entries, clustered beyond).")
        model_keys_max: int = Field(1_000_000, gt=0, description="keys: auto uses the model's keys up to this many entries.")
        tier_max: int = Field(1_000_000, gt=0, description="Largest size at which whole tiers are built; above it only the exact searches and the LTM's IVF-PQ index (full keys memory-mapped from disk) are measured.")
        nprobe: list[int] = Field([4, 8, 16, 32, 64], description="IVF and IVF-PQ search settings measured.")
        shortlist: list[int] = Field([4, 16], description="IVF-PQ: candidates per result re-ranked exactly (shortlist x k), measured.")
        pq_m: int = Field(32, gt=0, description="IVF-PQ: codes per key (bytes at 8 bits).")
        opq: bool = Field(False, description="IVF-PQ: learn an OPQ rotation first.")
        nlist_max: int = Field(2048, gt=0, description="IVF and IVF-PQ lists: the power of two nearest sqrt(size), at most this.")
        ef_search: list[int] = Field([16, 32, 64, 128], description="HNSW search settings measured.")
        hnsw_budget_s: float = Field(600.0, gt=0, description="Skip an HNSW build predicted to take longer, "
                                                             "abandon one that takes longer.")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        import faiss

        s = self.settings
        sizes = sorted(s.quick_sizes if quick else s.sizes)
        rounds = min(2, s.rounds) if quick else s.rounds
        threads, why = choose_threads(s.threads)
        before = (torch.get_num_threads(), faiss.omp_get_max_threads())
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        result = SuiteResult()
        result.figures["setup"] = {
            "sizes": sizes, "queries": min(s.queries, s.quick_queries) if quick else s.queries, "batch": s.batch, "k": s.k, "rounds": rounds,
            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "threads_reason": why,
        }
        log(f"threads: torch {torch.get_num_threads()}, FAISS {faiss.omp_get_max_threads()} ({why})")
        try:
            for target in targets:
                self._target(target, sizes, rounds, seeds, result, log, quick=quick)
        finally:
            torch.set_num_threads(before[0])
            faiss.omp_set_num_threads(before[1])
        result.plots["memory_queries_per_s.png"] = self._plot(result, "qps", "queries/s", log_y=True)
        result.plots["memory_recall.png"] = self._plot(result, "recall", f"recall@{s.k} vs exact", log_y=False)
        result.notes += [
            f"Queries are searched in batches of {s.batch}, k={s.k}, after a warm-up search of {WARM_UP}, median over up to "
            f"{rounds} passes (fewer once passes took {s.pass_budget_s:g} s); torch and FAISS threads fixed at "
            f"{threads} ({why}), except for the exact searches, each measured on every CPU ({os.cpu_count()}) "
            "and on one, the faster counting. "
            "Tiers are read through their own `read`, and run FAISS on one thread for "
            "operations under 4,096 vectors of work (`faiss_threads`): a batch of "
            f"{s.batch} LTM queries searches on one thread.",
            f"`{FAISS_EXACT}` (FAISS `IndexFlatIP`, BLAS) and `{TORCH_EXACT}` (torch matmul + topk in chunks of "
            f"{CHUNK:,} keys) search every entry exactly; the faster of the two at each size is 1x, and "
            f"`{FAISS_EXACT}`'s top-{s.k} is the ground truth of recall@{s.k}. Speed-ups are given by the wall "
            "clock and by queries per CPU-second of this process (all its threads): on a shared machine the "
            "wall clock also measures the other jobs, CPU time only the work done.",
            "Every tier holds one stream (stream 0) with all entries, written in one bulk write; values "
            "are the keys themselves (value bytes depend only on the width).",
            "Bytes/entry: `save_state` of the tier's state_dict, file sizes / entries, and its ratio to the "
            "uncompressed fp32 tier (`entries_nbytes_fp32`); index bytes/entry: the serialised FAISS "
            "index(es) alone. RSS: resident memory of the process after the build, and its peak so far.",
            f"Above tier_max={s.tier_max:,} entries, `{SCALE_INDEX}` is the LTM's IVF-PQ index (the tier's own "
            "`make_index`, pq_m x 8-bit codes and an 8-byte id per entry in RAM) whose shortlist is re-ranked "
            "exactly against the full keys read from the memory-mapped keys file on disk.",
            "A missed target is reported as MISSED in the targets table, never dropped.",
        ]
        return result

    # ------------------------------------------------------------------ one target

    def _target(self, target: Path, sizes: list[int], rounds: int, seeds: list[int],
                result: SuiteResult, log: Callable[[str], None], *, quick: bool = False) -> None:
        s = self.settings
        name = str(target)
        src = KeySource(target, s.key_window, s.text_seed, log)
        db, db_tokens, queries, key_info = self._keys(src, max(sizes), seeds, log)
        if quick:
            queries = {seed: q[:s.quick_queries] for seed, q in queries.items()}
        fig: dict[str, Any] = {"keys": key_info, "sizes": {}}
        result.figures[name] = fig
        result.tables.append((
            f"Keys of {name}",
            ["field", "value"],
            [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in key_info.items()],
        ))
        if not src.is_run and key_info["kind"] == "model":
            result.notes.append(f"{name} is a manifest: its model was built **untrained** (random weights); "
                                "pass a run directory to measure a trained model's keys.")
        rows, stat_rows = [], []
        hnsw_prev: tuple[int, float] | None = None
        for n in sizes:
            log(f"{name}: size {n:,}")
            per: dict[str, Any] = {}
            fig["sizes"][str(n)] = per
            exact = self._exact(db[:n], queries, rounds, per, log)
            best_exact = max(per[FAISS_EXACT]["best"]["qps"]["mean"], per[TORCH_EXACT]["best"]["qps"]["mean"])
            per["exact_1x"] = max((FAISS_EXACT, TORCH_EXACT), key=lambda i: per[i]["best"]["qps"]["mean"])
            indexes = INDEXES if n <= s.tier_max else (SCALE_INDEX,)
            if n <= s.tier_max:
                keys = torch.from_numpy(np.array(db[:n]))
                tokens = torch.from_numpy(np.array(db_tokens[:n]))
            for index in indexes:
                if index == "ltm:hnsw" and hnsw_prev is not None:
                    pn, pt = hnsw_prev
                    predicted = pt * (n / pn) * (math.log(n) / math.log(pn))
                    if predicted > s.hnsw_budget_s:
                        reason = (f"predicted build {predicted:.0f} s (from {pt:.0f} s at {pn:,}) exceeds "
                                  f"hnsw_budget_s={s.hnsw_budget_s:g}")
                        per[index] = {"skipped": reason}
                        log(f"  {index}: skipped ({reason})")
                        continue
                if index == SCALE_INDEX:
                    tier, build_s, settings = self._build_scale(db[:n], log)
                else:
                    tier, build_s, settings = self._build(src, index, keys, tokens)
                if tier is None:  # an HNSW build abandoned at its time budget
                    per[index] = {"skipped": settings["reason"], "build_s": build_s, **settings}
                    log(f"  {index}: skipped ({settings['reason']})")
                    continue
                if index == "ltm:hnsw":
                    hnsw_prev = (n, build_s)
                rss = rss_bytes()
                points = []
                for label, search in self._search_points(tier, index, db[:n]):
                    points.append(self._point(label, search, queries, exact, rounds))
                    log(f"  {index} {label}: {points[-1]['qps']['mean']:.0f} q/s, "
                        f"recall {points[-1]['recall']['mean']:.3f}")
                entry = per[index] = {"build_s": build_s, "settings": settings, "points": points,
                                      "best": self._best(points, index), "rss_bytes": rss[0], "peak_rss_bytes": rss[1]}
                if index == SCALE_INDEX:
                    entry["index_bytes_per_entry"] = settings.pop("index_bytes") / n
                else:
                    fp32 = entries_nbytes_fp32(n, src.dim) / n
                    disk = self._disk_bytes(tier)
                    entry.update(bytes_per_entry=disk / n, fp32_bytes_per_entry=fp32, fp32_ratio=disk / n / fp32,
                                 index_bytes_per_entry=self._index_bytes(tier, index) / n, stats=tier.stats())
                    stat_rows.append([n, index] + [_cell(entry["stats"].get(c)) for c in _STAT_COLUMNS])
                log(f"  {index}: build {build_s:.1f} s, index {entry['index_bytes_per_entry']:.1f} bytes/entry, "
                    f"RSS {rss[0] / 2**30:.2f} GB (peak {rss[1] / 2**30:.2f})")
                del tier
            best_cpu = max(p["cpu_qps"]["mean"] for i in (FAISS_EXACT, TORCH_EXACT) for p in per[i]["points"])
            for index, entry in per.items():
                if isinstance(entry, dict) and "best" in entry:
                    for p in entry["points"]:
                        p["speedup_vs_exact"] = p["qps"]["mean"] / best_exact
                        p["cpu_speedup_vs_exact"] = p["cpu_qps"]["mean"] / best_cpu
                    entry["speedup_vs_exact"] = entry["best"]["speedup_vs_exact"]
            rows += self._rows(n, per)
        result.tables.append((
            f"{name}: queries/s (batch {s.batch}) against the fastest exact search, recall@{s.k} against exact, "
            "bytes, RSS",
            ["size", "index", "search setting", "build s", "queries/s", "vs exact", "vs exact (CPU time)",
             f"recall@{s.k}",
             "bytes/entry", "vs fp32 tier", "index bytes/entry", "RSS GB (peak)", ""], rows,
        ))
        result.tables.append((f"Tier stats() of {name}", ["size", "index", *_STAT_COLUMNS], stat_rows))
        if src.is_run and src.model.memory_system is not None:
            own = [[t.key] + [_cell(t.stats().get(c)) for c in _STAT_COLUMNS] for t in src.model.memory]
            result.tables.append((f"The run's own tiers (stats())", ["tier", *_STAT_COLUMNS], own))
        self._checks(name, fig, result)

    @staticmethod
    def _rows(n: int, per: dict[str, Any]) -> list[list[Any]]:
        """Table rows of one size: every search setting of every index, or why it was skipped."""
        rows = []
        for index, entry in per.items():
            if not isinstance(entry, dict):
                continue
            if "skipped" in entry:
                rows.append([n, index, "skipped", _cell(entry.get("build_s")), "", "", "", "", "", "", "", "",
                             entry["skipped"]])
                continue
            rss = f"{entry['rss_bytes'] / 2**30:.2f} ({entry['peak_rss_bytes'] / 2**30:.2f})"
            for p in entry["points"]:
                mark = ("1x" if index == per["exact_1x"] else "best") if p is entry["best"] else ""
                rows.append([n, index, p["setting"], round(entry["build_s"], 2), round(p["qps"]["mean"]),
                             f"{p['speedup_vs_exact']:.2f}x", f"{p['cpu_speedup_vs_exact']:.2f}x", _pm(p["recall"]), _cell(entry.get("bytes_per_entry")),
                             _cell(entry.get("fp32_ratio")), _cell(entry.get("index_bytes_per_entry")), rss, mark])
        return rows

    def _point(self, label: str, search, queries: dict, exact: dict, rounds: int) -> dict[str, Any]:
        """Queries/s (wall clock and per CPU-second of this process) and recall@k of one search
        setting over every query seed."""
        qps, cpu, recalls = [], [], []
        for seed, q in queries.items():
            rate, cpu_rate, found = self._time_reads(search, q, rounds)
            qps.append(rate)
            cpu.append(cpu_rate)
            recalls.append(recall_at_k(found, exact[seed], self.settings.k))
        return {"setting": label, "qps": median_and_spread(qps), "cpu_qps": median_and_spread(cpu),
                "recall": median_and_spread(recalls)}

    def _exact(self, keys, queries: dict, rounds: int, per: dict, log) -> dict[int, torch.Tensor]:
        """Measure both exact searches over ``keys`` into ``per``; returns FAISS's ids per seed.

        The keys are added (normalised, in chunks) to one ``IndexFlatIP``; torch searches a
        view of that index's own storage, so they are held once. Each runs on every CPU and
        on one (OpenMP teams on a busy machine can be slower than one thread); the faster
        setting is its best.
        """
        import faiss

        n, d = keys.shape
        start = time.perf_counter()
        flat = faiss.IndexFlatIP(d)
        for lo in range(0, n, CHUNK):
            part = np.array(keys[lo:lo + CHUNK], dtype=np.float32)
            faiss.normalize_L2(part)
            flat.add(part)
        build_s = time.perf_counter() - start
        stored = torch.from_numpy(faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d))
        k = self.settings.k
        searches = {
            FAISS_EXACT: ("IndexFlatIP", lambda q: torch.from_numpy(flat.search(
                np.ascontiguousarray(torch.nn.functional.normalize(q, dim=-1).numpy()), k)[1])),
            TORCH_EXACT: ("matmul + topk", lambda q: torch_exact(stored, q, k)),
        }
        before = (torch.get_num_threads(), faiss.omp_get_max_threads())
        truth: dict[int, torch.Tensor] = {}
        try:
            for index, (label, search) in searches.items():
                if not truth:  # FAISS's ids are the ground truth, its own recall is 1 by definition
                    truth = {seed: search(q) for seed, q in queries.items()}
                rss = rss_bytes()
                points = []
                for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
                    torch.set_num_threads(threads)
                    faiss.omp_set_num_threads(threads)
                    points.append(self._point(f"{label}, {threads} thread{'s' * (threads > 1)}", search, queries,
                                              truth, rounds))
                    log(f"  {index} {points[-1]['setting']}: {points[-1]['qps']['mean']:.0f} q/s")
                best = max(points, key=lambda p: p["qps"]["mean"])
                log(f"  {index}: build {build_s:.1f} s, RSS {rss[0] / 2**30:.2f} GB (peak {rss[1] / 2**30:.2f})")
                per[index] = {"build_s": build_s, "settings": {}, "points": points, "best": best,
                              "index_bytes_per_entry": 4.0 * d, "rss_bytes": rss[0], "peak_rss_bytes": rss[1]}
        finally:
            torch.set_num_threads(before[0])
            faiss.omp_set_num_threads(before[1])
        del stored, flat
        return truth

    def _keys(self, src: KeySource, n: int, seeds: list[int], log) -> tuple:
        """Database keys, their tokens, query keys per seed and a description; cached as .npy."""
        s = self.settings
        if s.keys == "clustered" or (s.keys == "auto" and n > s.model_keys_max):
            return self._clustered(src.dim, n, seeds, log)
        pool = 8 * s.queries
        spec = {"target": str(src.target), "weights": src.fingerprint, "layer": src.layer, "window": src.window,
                "receptive": src.receptive,
                "text_seed": src.text_seed, "context": src.context, "pool": pool}
        out = _harness_out_dir()
        stem = src.target.stem if src.target.suffix else src.target.name
        cached = None
        if out is not None:
            paths = (out / f"keys-{stem}.npy", out / f"keys-{stem}.tokens.npy", out / f"queries-{stem}.npy",
                     out / f"keys-{stem}.json")
            try:
                meta = json.loads(paths[3].read_text())
                if meta["spec"] == spec and meta["n"] >= n and meta["seeds"] >= len(seeds):
                    cached = meta, np.load(paths[0], mmap_mode="r"), np.load(paths[1]), np.load(paths[2])
            except (OSError, ValueError, KeyError):
                cached = None
        started = time.time()
        if cached is not None:
            meta, db, db_tokens, qs = cached
            db, db_tokens = np.array(db[:n]), np.array(db_tokens[:n])  # writable copies of the cache
            info = {**meta["info"], "unique_keys": n, "cached_keys": meta["n"], "cache": f"reused {paths[0]}"}
            log(f"keys: reused {paths[0]}")
        else:
            log(f"keys: computing {n:,} unique keys of {src.target} ({src.how})")
            db, db_tokens = src.collect(n, src.text_seed)
            qs = []
            for seed in range(max(len(seeds), 1)):
                qkeys, _ = src.collect(pool, src.text_seed + 1 + seed)
                pick = random.Random(seed).sample(range(pool), s.queries)
                qs.append(qkeys[sorted(pick)])
            qs = np.stack(qs)
            info = {
                "kind": "model", "source": src.source,
                "how": src.how, "dim": src.dim, "receptive_field_tokens": src.receptive,
                "train_seed": src.train_seed, "text_seed": src.text_seed,
                "documents": src.docs, "tokens": src.tokens, "unique_keys": n,
                "duplicates_dropped": src.duplicates,
                "reached_size_by": "more held-out demo documents (no jitter)",
                "query_seeds": [src.text_seed + 1 + i for i in range(len(qs))],
                "queries_per_seed": s.queries, "keys_seconds": round(time.time() - started, 1),
                "weights_fingerprint": src.fingerprint,
            }
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                np.save(paths[0], db)
                np.save(paths[1], db_tokens)
                np.save(paths[2], qs)
                paths[3].write_text(json.dumps({"spec": spec, "n": n, "seeds": len(qs), "info": info}, indent=2))
                info["cache"] = f"written {paths[0]}"
            else:
                info["cache"] = "none (no output directory known)"
        queries = {seed: torch.from_numpy(np.ascontiguousarray(qs[seed])) for seed in seeds}
        return db, db_tokens, queries, info

    def _clustered(self, dim: int, n: int, seeds: list[int], log) -> tuple:
        """:func:`clustered_keys` for the database (seed 1) and the queries (seeds 2, 3, ...),
        cached as ``keys-clustered-DIM.npy`` (read memory-mapped) in the output directory."""
        s = self.settings
        out = _harness_out_dir()
        spec = {"dim": dim, "distribution": inspect.signature(clustered_keys).parameters["clusters"].default}
        started = time.time()
        queries = {seed: torch.from_numpy(clustered_keys(s.queries, dim, 2 + seed)) for seed in seeds}
        info: dict[str, Any] = {
            "kind": "clustered", "source": "clustered synthetic keys (clustered_keys), not the model's",
            "dim": dim, "unique_keys": n, "database_seed": 1, "query_seeds": [2 + seed for seed in seeds],
            "queries_per_seed": s.queries,
        }
        if out is None:
            db = clustered_keys(n, dim, 1)
            info["cache"] = "none (no output directory known)"
        else:
            path, meta_path = out / f"keys-clustered-{dim}.npy", out / f"keys-clustered-{dim}.json"
            try:
                meta = json.loads(meta_path.read_text())
                fresh = any(meta["spec"].get(key) != value for key, value in spec.items()) or meta["n"] < n
            except (OSError, ValueError, KeyError):
                fresh = True
            if fresh:
                log(f"keys: generating {n:,} clustered keys of width {dim} into {path}")
                out.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.stem + ".tmp.npy")
                db = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
                clustered_keys(n, dim, 1, db)
                db.flush()
                del db
                os.replace(tmp, path)
                meta_path.write_text(json.dumps({"spec": spec, "n": n}))
                info["cache"] = f"written {path}"
            else:
                info["cache"] = f"reused {path}"
            db = np.load(path, mmap_mode="r")
        info["keys_seconds"] = round(time.time() - started, 1)
        return db, np.zeros(n, dtype=np.int64), queries, info

    # ------------------------------------------------------------------ tiers

    def _build(self, src: KeySource, index: str, keys: torch.Tensor, tokens: torch.Tensor):
        """A tier of kind ``index`` holding ``keys``: (tier, build seconds, settings used).

        HNSW is written in chunks of 5% (its graph takes additions one by one either way)
        and abandoned once the build passes ``hnsw_budget_s``: then the tier is ``None`` and
        the settings say how far it got.
        """
        from cortex_plugins.memory.archive import Archive
        from cortex_plugins.memory.ltm import LongTermMemory

        n = keys.shape[0]
        context = BuildContext(config=src.model.config, tokenizer=src.model.tokenizer, seed=0)
        entries = Entries(keys=keys, values=keys, tokens=tokens, streams=torch.zeros(n, dtype=torch.long))
        if index.startswith("ltm"):
            base = self._manifest_settings(src, "ltm")
            base.update(capacity=n, index=index.split(":")[1], nlist=min(ivf_nlist(n), self.settings.nlist_max),
                        train_after=min(LongTermMemory.Settings().train_after, n),
                        pq_m=self.settings.pq_m, opq=self.settings.opq, shortlist=max(self.settings.shortlist))
            tier = LongTermMemory(LongTermMemory.Settings(**base), context)
            start = time.perf_counter()
            if index == "ltm:hnsw":
                budget = self.settings.hnsw_budget_s
                for lo in range(0, n, max(1, math.ceil(n / 20))):
                    part = slice(lo, min(n, lo + max(1, math.ceil(n / 20))))
                    tier.write(Entries(keys=keys[part], values=keys[part], tokens=tokens[part],
                                       streams=entries.streams[part]), step=0)
                    spent = time.perf_counter() - start
                    if spent > budget and len(tier) < n:
                        done = len(tier)
                        return None, spent, {"entries_built": done, "reason": (
                            f"build passed hnsw_budget_s={budget:g} s: {done:,} of {n:,} entries in {spent:.0f} s "
                            f"(a full build would take ~{spent * n / done:.0f} s)")}
            else:
                tier.write(entries, step=0)
        else:
            base = self._manifest_settings(src, "archive")
            base.update(capacity=n, train_after=min(Archive.Settings().train_after, n))
            tier = Archive(Archive.Settings(**base), context)
            start = time.perf_counter()
            tier.write(entries, step=0)
            tier.compact(max([0, *tier.settings.age_steps]))
        build_s = time.perf_counter() - start
        settings = tier.settings.model_dump()
        if index == "archive":
            settings["deepest_level_entries"] = tier.levels[-1].n
        return tier, build_s, settings

    @staticmethod
    def _manifest_settings(src: KeySource, kind: str) -> dict[str, Any]:
        """The target's own settings of its first ``kind`` tier (defaults when it has none)."""
        for tier in src.model.memory:
            if tier.name == kind:
                return tier.settings.model_dump()
        return {}

    def _build_scale(self, keys, log):
        """The LTM's IVF-PQ index over ``keys`` (an array, memory-mapped above ``tier_max``),
        trained on a seeded sample and filled in chunks: (index, build seconds, settings)."""
        import faiss
        from cortex_plugins.memory._vector_index import make_index

        s = self.settings
        n, d = keys.shape
        nlist = min(ivf_nlist(n), s.nlist_max)
        start = time.perf_counter()
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False))
        train = np.array(keys[sample], dtype=np.float32)
        faiss.normalize_L2(train)
        index = make_index("ivfpq", d, nlist=nlist, pq_m=s.pq_m, opq=s.opq, train_data=train)
        del train
        for lo in range(0, n, CHUNK):
            part = np.array(keys[lo:lo + CHUNK], dtype=np.float32)
            faiss.normalize_L2(part)
            index.add(part)
            if lo and lo % (16 * CHUNK) == 0:
                log(f"  {SCALE_INDEX}: {lo:,}/{n:,} added")
        build_s = time.perf_counter() - start
        settings = {"nlist": nlist, "pq_m": s.pq_m, "pq_bits": 8, "opq": s.opq, "trained_on": int(sample.size),
                    "full_keys": "memory-mapped from the keys file" if isinstance(keys, np.memmap) else "in RAM",
                    "index_bytes": int(faiss.serialize_index(index).size)}
        return index, build_s, settings

    def _search_points(self, tier, index: str, keys):
        """(label, search) for each search setting measured on ``tier``: ``search(q)`` gives
        the ids of the top-k of each row of ``q`` (search settings applied inside)."""
        from cortex_plugins.memory._vector_index import ivf_of, rerank_exact, set_search_params

        s, k = self.settings, self.settings.k

        def read(q):
            return tier.read(q, k, stream=0, touch=False).ids

        si = getattr(tier, "indexes", {}).get(0)
        if index == SCALE_INDEX:  # ``tier`` is the bare FAISS index (behind OPQ with ``opq``)
            nlist = ivf_of(tier).nlist
            for p in sorted({min(p, nlist) for p in s.nprobe}):
                for sl in s.shortlist:
                    def search(q, p=p, sl=sl):
                        set_search_params(tier, nprobe=p)
                        q = torch.nn.functional.normalize(q, dim=-1)
                        found = torch.from_numpy(tier.search(np.ascontiguousarray(q.numpy()), sl * k)[1])
                        return rerank_exact(q, found, keys, k)[1]
                    yield f"nlist {nlist}, nprobe {p}, shortlist {sl}{', OPQ' if s.opq else ''}", search
        elif index in ("ltm:ivf", "ltm:ivfpq") and si is not None and si.kind in ("ivf", "ivfpq"):
            nlist = ivf_of(si.index).nlist
            for p in sorted({min(p, nlist) for p in s.nprobe}):
                for sl in (s.shortlist if index == "ltm:ivfpq" else [None]):
                    def search(q, p=p, sl=sl):
                        set_search_params(si.index, nprobe=p)
                        if sl is not None:
                            tier.settings.shortlist = sl
                        return read(q)
                    pq = f", pq_m {tier.settings.pq_m}, shortlist {sl}" if sl is not None else ""
                    yield f"nlist {nlist}, nprobe {p}{pq}", search
        elif index == "ltm:hnsw" and si is not None and si.kind == "hnsw":
            for ef in s.ef_search:
                def search(q, ef=ef):
                    set_search_params(si.index, ef_search=ef)
                    return read(q)
                yield f"M {tier.settings.hnsw_m}, efSearch {ef}", search
        elif index == "archive":
            lv = tier.levels[-1]
            pq = f" (pq_m {tier.settings.pq_m} x {tier.settings.pq_bits} bits)" if lv.codec.startswith("pq") else ""
            yield f"{lv.codec}{pq}", read
        else:
            yield f"{si.kind if si else 'empty'}", read

    def _time_reads(self, search, queries: torch.Tensor, rounds: int) -> tuple[float, float, torch.Tensor]:
        """Median queries/s of ``search`` over ``rounds`` passes, by the wall clock and per
        CPU-second of this process (every thread), and the ids found (first pass)."""
        batches = list(torch.split(queries, self.settings.batch))
        search(batches[0][:WARM_UP])  # first-call costs (allocation, lazy GPU copies) stay out of the timing
        rates, cpu_rates, found = [], [], None
        spent = 0.0
        for r in range(rounds):
            if r and spent > self.settings.pass_budget_s:
                break
            start, cpu = time.perf_counter(), time.process_time()
            ids = [search(q) for q in batches]
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            spent += took
            rates.append(queries.shape[0] / took)
            cpu_rates.append(queries.shape[0] / max(cpu, 1e-9))
            if found is None:
                found = torch.cat(ids)
        return statistics.median(rates), statistics.median(cpu_rates), found

    @staticmethod
    def _index_bytes(tier, index: str) -> int:
        """Bytes of a tier's FAISS index(es) alone (the archive: its deepest level's keys)."""
        if index == "archive":
            from cortex_plugins.memory._vector_index import index_to_tensor

            return int(index_to_tensor(tier.levels[-1].index).numel())
        return int(tier.state_dict()["index_blob"].numel())

    @staticmethod
    def _disk_bytes(tier) -> int:
        from cortex.runtime.rundir import save_state

        with tempfile.TemporaryDirectory(prefix="cortex-bench-memory-") as tmp:
            save_state(Path(tmp), {"tier": tier.state_dict()})
            return directory_bytes(Path(tmp))

    @staticmethod
    def _best(points: list[dict], index: str) -> dict:
        """The fastest point (per CPU-second) with recall >= the index's target, else the most accurate."""
        target = ARCHIVE_RECALL_TARGET if index == "archive" else LTM_RECALL_TARGET
        good = [p for p in points if p["recall"]["mean"] >= target]
        if good:
            return max(good, key=lambda p: p["cpu_qps"]["mean"])
        return max(points, key=lambda p: (p["recall"]["mean"], p["cpu_qps"]["mean"]))

    # ------------------------------------------------------------------ checks, plots

    def _checks(self, name: str, fig: dict, result: SuiteResult) -> None:
        k = self.settings.k
        n = max(int(x) for x in fig["sizes"])
        per = fig["sizes"][str(n)]
        one = per["exact_1x"]
        candidates = []
        for index in ("ltm:ivf", "ltm:hnsw", "ltm:ivfpq", SCALE_INDEX):
            entry = per.get(index, {})
            if "skipped" in entry:
                result.notes.append(f"{name} LTM {index} at {n:,}: skipped, {entry['skipped']}")
            candidates += [(index, p) for p in entry.get("points", [])]
        good = [(i, p) for i, p in candidates if p["recall"]["mean"] >= LTM_RECALL_TARGET]
        if good:  # by CPU time: on a shared machine the wall clock also measures the other jobs
            index, p = max(good, key=lambda ip: ip[1]["cpu_qps"]["mean"])
        elif candidates:
            index, p = max(candidates, key=lambda ip: ip[1]["recall"]["mean"])
        else:
            index, p = "none", {"setting": "", "speedup_vs_exact": 0.0, "cpu_speedup_vs_exact": 0.0,
                                "recall": {"mean": 0.0}}
        label = f"{name} LTM @{n:,}: {index} {p['setting']}"
        result.checks.append(Check(f"{label} queries/s / fastest exact ({one})", p["speedup_vs_exact"],
                                   SPEEDUP_TARGET))
        result.checks.append(Check(f"{label} queries per CPU-second / fastest exact", p["cpu_speedup_vs_exact"],
                                   SPEEDUP_TARGET))
        result.checks.append(Check(f"{label} recall@{k}", p["recall"]["mean"], LTM_RECALL_TARGET))
        fig["ltm_best"] = {"index": index, "setting": p["setting"], "speedup_vs_exact": p["speedup_vs_exact"],
                           "cpu_speedup_vs_exact": p["cpu_speedup_vs_exact"],
                           "recall": p["recall"]["mean"], "exact_1x": one}
        pq = per.get(SCALE_INDEX) or per.get("ltm:ivfpq")
        if pq and "index_bytes_per_entry" in pq:
            result.checks.append(Check(f"{name} IVF-PQ index @{n:,}: index bytes/entry", pq["index_bytes_per_entry"],
                                       INDEX_BYTES_TARGET, higher_is_better=False))
        built = [int(x) for x, e in fig["sizes"].items() if "best" in e.get("archive", {})]
        if built:
            m = max(built)
            arch = fig["sizes"][str(m)]["archive"]
            label = f"{name} Archive @{m:,}: {arch['best']['setting']}"
            result.checks.append(Check(f"{label} bytes/entry / fp32 tier", arch["fp32_ratio"], ARCHIVE_BYTES_TARGET,
                                       higher_is_better=False))
            result.checks.append(Check(f"{label} deepest level's key index bytes/entry", arch["index_bytes_per_entry"],
                                       INDEX_BYTES_TARGET, higher_is_better=False))
            result.checks.append(Check(f"{label} recall@{k}", arch["best"]["recall"]["mean"], ARCHIVE_RECALL_TARGET))

    @staticmethod
    def _plot(result: SuiteResult, what: str, ylabel: str, *, log_y: bool):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        targets = [t for t, f in result.figures.items() if isinstance(f, dict) and "keys" in f]
        for target in targets:
            sizes = result.figures[target]["sizes"]
            for index in (FAISS_EXACT, TORCH_EXACT, *INDEXES, SCALE_INDEX):
                xs, ys = [], []
                for n, per in sizes.items():
                    entry = per.get(index, {})
                    if "best" in entry:
                        xs.append(int(n))
                        ys.append(entry["best"][what]["mean"])
                if xs:
                    label = index if len(targets) == 1 else f"{Path(target).stem} {index}"
                    ax.plot(xs, ys, marker="o", label=label, linestyle=":" if index.startswith("exact") else "-")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("entries in the tier")
        ax.set_ylabel(ylabel)
        ax.set_title("fastest setting with recall@k >= target (else most accurate)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        return fig


_STAT_COLUMNS = ("entries", "capacity", "ntotal", "bytes", "index", "levels", "key_dim", "queries", "hit_rate")


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, dict):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    if isinstance(v, float):
        return round(v, 3)
    return v


def _pm(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["n"] > 1 else "")


@hookimpl
def cortex_register_components(register):
    register(MemoryBench)
