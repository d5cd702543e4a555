"""Long-term memory: exact and approximate search, eviction, hand-over, projection."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cortex.core.transformer import ModelConfig
from cortex.kernel.interfaces import BuildContext, Entries
from cortex_plugins.memory.ltm import LongTermMemory


def ltm(dim: int = 32, **settings) -> LongTermMemory:
    ctx = BuildContext(config=ModelConfig(vocab_size=32, dim=dim, layers=1, heads=2, context=8))
    return LongTermMemory(LongTermMemory.Settings(**settings), ctx)


def entries(keys, first_token=0, streams=None) -> Entries:
    n = keys.shape[0]
    streams = torch.zeros(n, dtype=torch.long) if streams is None else streams
    return Entries(keys, -keys, torch.arange(first_token, first_token + n), streams)


def clustered(n: int, dim: int, clusters: int, seed: int = 0, spread: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.numel()


pytestmark = pytest.mark.usefixtures("one_thread", "one_faiss_thread")  # tests/conftest.py


def test_flat_returns_exactly_the_brute_force_top_k():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2000, 32, generator=g)
    streams = torch.randint(0, 3, (2000,), generator=g)
    tier = ltm(capacity=5000)
    tier.write(entries(keys, streams=streams))  # ids are write order
    queries = torch.randn(20, 32, generator=g)
    normed = F.normalize(keys, dim=-1)
    for stream in range(3):
        mine = torch.nonzero(streams == stream).flatten()
        truth = (F.normalize(queries, dim=-1) @ normed[mine].T).topk(10, dim=1)
        got = tier.read(queries, 10, stream=stream)
        assert torch.equal(got.ids, mine[truth.indices])
        assert torch.allclose(got.scores, truth.values, atol=1e-5)
        assert torch.equal(got.tokens, got.ids) and torch.equal(got.values, -keys[got.ids])


@pytest.mark.parametrize("kind,settings", [
    ("ivf", {"nlist": 32, "nprobe": 8, "train_after": 1000}),
    ("hnsw", {"hnsw_m": 16, "ef_search": 64}),
])
def test_approximate_indexes_have_high_recall_on_clustered_keys(kind, settings):
    keys = clustered(3000, 32, clusters=40)
    tier = ltm(capacity=5000, index=kind, **settings)
    for start in range(0, 3000, 500):
        tier.write(entries(keys[start:start + 500], start))
    assert tier.indexes[0].kind == kind  # IVF was trained once enough entries existed
    queries = keys[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:200]]
    queries = queries + 0.05 * torch.randn(200, 32, generator=torch.Generator().manual_seed(2))
    truth = (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).topk(10, dim=1).indices
    got = tier.read(queries, 10, stream=0)
    assert recall(got.ids, truth) >= 0.9


def test_ivf_is_exact_until_trained():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(300, 32, generator=g)
    tier = ltm(capacity=5000, index="ivf", train_after=400, nlist=8, nprobe=1)
    tier.write(entries(keys))
    assert tier.indexes[0].kind == "flat"
    queries = torch.randn(10, 32, generator=g)
    truth = (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).topk(5, dim=1).indices
    assert torch.equal(tier.read(queries, 5).ids, truth)
    tier.write(entries(torch.randn(200, 32, generator=g), 300))
    assert tier.indexes[0].kind == "ivf" and tier.ntotal == 500


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_ten_times_capacity_keeps_the_index_bounded_and_the_newest(kind):
    g = torch.Generator().manual_seed(4)
    cap = 300
    tier = ltm(capacity=cap, index=kind, train_after=100, nlist=4, hnsw_m=8)
    for step, start in enumerate(range(0, 10 * cap, 70)):
        keys = torch.randn(70, 32, generator=g)
        tier.write(entries(keys, start, streams=torch.arange(70) % 2), step=step)
        assert tier.ntotal <= cap and len(tier) <= cap
    assert tier.ntotal == len(tier) >= cap - 70
    # bytes: keys + values + index vectors (fp32) plus ids and counters, and some headroom
    assert tier.stats()["bytes"] <= cap * (3 * 32 * 4 + 8 * 8) * 1.5 + 32 * 1024
    newest = tier.read(keys[-1:], 1, stream=1)
    assert newest.tokens.item() == start + 69 and newest.scores.item() > 0.999


def test_eviction_drops_least_recently_used_entries_first():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(100, 32, generator=g)
    tier = ltm(capacity=100)  # chunks of 5
    tier.write(entries(keys), step=0)
    tier.read(keys[:10], 1, step=5)  # entries 0-9 are used recently
    tier.write(entries(torch.randn(3, 32, generator=g), 100), step=6)
    held = set(tier.ids[tier.live].tolist())
    assert set(range(10)) <= held and {100, 101, 102} <= held
    assert not {10, 11, 12, 13, 14} & held and len(tier) == 98 and tier.stats()["evicted"] == 5


def test_handover_returns_exactly_the_idle_entries():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    tier = ltm(capacity=100, idle_steps=1000)
    tier.write(entries(a, 0), step=0)
    tier.write(entries(b, 5, streams=torch.ones(5, dtype=torch.long)), step=500)
    tier.read(a[:2], 1, step=900)
    assert tier.handover(step=1200) is not None  # entries 2-4: idle since step 0
    out = tier.handover(step=1600)  # b's: idle since 500; a[:2] read at 900 stay
    assert sorted(out.tokens.tolist()) == [5, 6, 7, 8, 9] and (out.streams == 1).all()
    assert torch.allclose(out.keys, F.normalize(b, dim=-1)) and torch.allclose(out.values, -b)
    assert (out.steps == 500).all()
    assert len(tier) == 2 and tier.ntotal == 2 and sorted(tier.ids[tier.live].tolist()) == [0, 1]
    assert tier.stats()["consolidated_out"] == 8 and tier.handover(step=1601) is None
    assert (tier.read(b, 1, stream=1).ids == -1).all()


def test_hit_counts_and_last_access_are_kept():
    keys = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    tier = ltm(capacity=10)
    tier.write(Entries(keys, keys, torch.arange(4), torch.zeros(4, dtype=torch.long),
                       uses=torch.tensor([3, 3, 3, 3])), step=1)
    tier.read(keys[:1], 1, step=9)
    tier.read(torch.stack([keys[0], keys[0]]), 1, step=10)
    assert tier.uses[tier.ids == 0].item() == 5 and tier.last[tier.ids == 0].item() == 10
    assert tier.uses[tier.ids == 1].item() == 3 and tier.last[tier.ids == 1].item() == 1
    assert tier.stats()["hit_rate"] == 1.0


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_projection_to_a_smaller_key_dim(kind):
    g = torch.Generator().manual_seed(8)
    keys = clustered(600, 64, clusters=20, seed=8)
    tier = ltm(dim=64, capacity=1000, index=kind, key_dim=16, train_after=300)
    tier.write(entries(keys[:200]))
    assert not tier.projected and tier.stats()["key_dim"] == 64
    queries = torch.randn(5, 64, generator=g)
    truth = (F.normalize(queries, dim=-1) @ F.normalize(keys[:200], dim=-1).T).topk(5, dim=1)
    got = tier.read(queries, 5)  # exact in full dimension before the projection exists
    assert torch.equal(got.ids, truth.indices)
    tier.write(entries(keys[200:], 200))
    assert tier.projected and tier.stats()["key_dim"] == 16
    assert tier.indexes[0].index.d == 16
    probe = torch.arange(0, 600, 30)
    got = tier.read(keys[probe], 3)
    assert torch.equal(got.ids[:, 0], probe)  # an exact duplicate key is found
    assert torch.allclose(got.scores[:, 0], torch.ones(len(probe)), atol=1e-5)  # true cosine
    out = tier.handover(step=10**6)
    assert out.keys.shape == (600, 64)  # full keys go on to the next tier


def test_key_dim_cannot_exceed_the_width():
    with pytest.raises(ValueError, match="key_dim"):
        ltm(dim=32, key_dim=64)


def test_read_batch_matches_reads_per_row():
    g = torch.Generator().manual_seed(9)
    tier = ltm(capacity=500, index="hnsw")
    tier.write(entries(torch.randn(300, 32, generator=g), streams=torch.randint(0, 4, (300,), generator=g)))
    queries = torch.randn(5, 6, 32, generator=g)
    streams = torch.tensor([2, 0, 2, 9, 1])
    got = tier.read_batch(queries, streams, 4, touch=False)
    assert got.ids.shape == (5, 6, 4) and got.values.shape == (5, 6, 4, 32)
    for row, stream in enumerate(streams.tolist()):
        ref = tier.read(queries[row], 4, stream=stream, touch=False)
        assert torch.equal(got.ids[row], ref.ids) and torch.allclose(got.scores[row], ref.scores)
    assert (got.ids[3] == -1).all()
