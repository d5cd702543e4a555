"""Memory at scale: the LTM's IVF-PQ index (exact re-ranking of a shortlist, bytes per entry,
save/load, settings errors) and one LTM sharded over two gloo ranks, merged by an all-gather
of top-k."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pydantic import ValidationError
from torch.nn import functional as F

from cortex.runtime import distributed
from cortex.runtime.rundir import load_state, save_state
from cortex_plugins.memory._vector_index import ivf_of
from tests.test_ltm import clustered, entries, ltm, recall

pytestmark = pytest.mark.usefixtures("one_thread", "one_faiss_thread")  # tests/conftest.py

DIM = 64
IVFPQ = dict(index="ivfpq", nlist=32, nprobe=8, pq_m=8, train_after=1000, capacity=10_000)


def filled(n: int = 4000, **settings):
    keys = clustered(n, DIM, clusters=40, spread=0.5)
    tier = ltm(DIM, **{**IVFPQ, **settings})
    for start in range(0, n, 1000):
        tier.write(entries(keys[start:start + 1000], start))
    return tier, keys


def queries_near(keys: torch.Tensor, n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    picked = keys[torch.randperm(keys.shape[0], generator=g)[:n]]
    return picked + 0.1 * torch.randn(n, keys.shape[1], generator=g)


def exact_top(queries: torch.Tensor, keys: torch.Tensor, k: int = 10):
    return (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).topk(k, dim=1)


def test_ivfpq_reranked_shortlist_reaches_exact_recall_and_true_cosines():
    tier, keys = filled()
    assert tier.indexes[0].kind == "ivfpq"  # trained once the stream held train_after entries
    q = queries_near(keys)
    truth = exact_top(q, keys)
    got = tier.read(q, 10)
    assert recall(got.ids, truth.indices) >= 0.9
    # scores are exact cosines of the entries found, not the codes' approximations
    assert torch.allclose(got.scores, (F.normalize(q, dim=-1)[:, None] * F.normalize(keys, dim=-1)[got.ids]).sum(-1),
                          atol=1e-5)
    tier.settings.shortlist = 1  # no shortlist beyond k: the codes' own order, measurably worse
    assert recall(tier.read(q, 10).ids, truth.indices) < recall(got.ids, truth.indices) - 0.05


def test_ivfpq_bytes_per_entry_are_the_codes_and_an_id():
    n = 4000
    pq, _ = filled(n)
    flat, _ = filled(n, index="flat")
    per_pq = pq.state_dict()["index_blob"].numel() / n
    per_flat = flat.state_dict()["index_blob"].numel() / n
    nlist = ivf_of(pq.indexes[0].index).nlist  # trained at 1,000 entries: 1000 // 39 lists
    shared = (256 * DIM + nlist * DIM) * 4 / n  # codebooks (256 x 8 codes of width 8) and the list centroids
    assert 8 + 8 + shared < per_pq < 8 + 8 + shared + 1  # pq_m one-byte codes and an int64 id per key
    assert per_flat > 4 * DIM  # fp32 keys (and ids)
    assert pq.stats()["index"] == "ivfpq"


def test_ivfpq_tier_survives_a_save_load_round_trip(tmp_path: Path):
    tier, keys = filled(opq=True)
    q = queries_near(keys, 50)
    before = tier.read(q, 10, touch=False)
    (tmp_path / "ltm").mkdir()
    save_state(tmp_path / "ltm", tier.state_dict())
    again = ltm(DIM, **{**IVFPQ, "opq": True})
    again.load_state_dict(load_state(tmp_path / "ltm"))
    after = again.read(q, 10, touch=False)
    assert again.indexes[0].kind == "ivfpq" and again.ntotal == len(keys)
    assert torch.equal(after.ids, before.ids) and torch.equal(after.scores, before.scores)
    again.write(entries(keys[:10] + 0.01, 9000))  # a loaded index keeps taking entries
    assert again.ntotal == len(keys) + 10


def test_ivfpq_settings_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"pq_m \(24\) must divide the key dimension \(64\); choose one of"):
        ltm(DIM, index="ivfpq", pq_m=24)
    with pytest.raises(ValueError, match=r"pq_m \(24\) must divide the key dimension \(16\)"):
        ltm(DIM, index="ivfpq", pq_m=24, key_dim=16)  # the projected width counts
    with pytest.raises(ValidationError, match="pq_bits"):
        ltm(DIM, index="ivfpq", pq_bits=16)
    with pytest.raises(ValidationError, match="shortlist"):
        ltm(DIM, index="ivfpq", shortlist=0)
    with pytest.raises(ValidationError, match="index"):
        ltm(DIM, index="pq")
    ltm(DIM, index="flat", pq_m=24)  # pq_m only matters for ivfpq


# --------------------------------------------------------------------------- sharded top-k

N, K = 3000, 10


def _shard_data():
    g = torch.Generator().manual_seed(11)
    keys = F.normalize(torch.randn(N, DIM, generator=g), dim=-1)
    return keys, torch.randn(40, DIM, generator=g)


def _shard_search(keys: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor):
    """One flat LTM over ``keys``: its top-K scores and the entries' global ids."""
    tier = ltm(DIM, capacity=N)
    tier.write(entries(keys, 0))
    got = tier.read(queries, K, touch=False)
    return got.scores, ids[got.tokens]  # tokens are positions within the shard


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    keys, queries = _shard_data()
    mine = torch.arange(rank, N, world)  # interleaved shards: every rank holds every cluster
    scores, ids = _shard_search(keys[mine], mine, queries)
    merged = distributed.all_gather_topk(scores, ids, K)
    torch.save({"scores": merged[0], "ids": merged[1]}, Path(out) / f"rank{rank}.pt")
    distributed.destroy()
    # no C++ static destructors at exit: see tests/test_ddp.py::_rank
    os._exit(0)


def test_all_gather_topk_over_two_gloo_ranks_equals_one_process_holding_everything(tmp_path):
    keys, queries = _shard_data()
    scores, ids = _shard_search(keys, torch.arange(N), queries)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["ids"], ids) and torch.equal(got["scores"], scores)


def test_all_gather_topk_in_one_process_keeps_the_best_k_ties_by_id():
    scores = torch.tensor([[0.5, 0.9, 0.9, -float("inf")]])
    ids = torch.tensor([[7, 4, 2, -1]])
    top, which = distributed.all_gather_topk(scores, ids, 3)
    assert which.tolist() == [[2, 4, 7]] and torch.equal(top, torch.tensor([[0.9, 0.9, 0.5]]))
