"""Properties every memory tier must have: isolation, bounds, persistence, no gradients."""

from __future__ import annotations

import pytest
import torch

from cortex.core.transformer import ModelConfig
from cortex.kernel.interfaces import BuildContext, Entries, MemoryTier
from cortex.kernel.plugins import create_plugin_manager
from cortex.runtime.rundir import flatten_state, load_state, save_state
from cortex_plugins.memory._vector_index import entries_nbytes_fp32
from cortex_plugins.memory.archive import Archive
from cortex_plugins.memory.ltm import LongTermMemory
from cortex_plugins.memory.stm import ShortTermMemory

DIM = 32

#: (class, settings); LTM in each index kind, the archive with levels that age quickly
TIERS = {
    "stm": (ShortTermMemory, {"capacity": 8}),
    "ltm-flat": (LongTermMemory, {"capacity": 40}),
    "ltm-ivf": (LongTermMemory, {"capacity": 200, "index": "ivf", "train_after": 100, "nlist": 4, "nprobe": 4}),
    "ltm-hnsw": (LongTermMemory, {"capacity": 40, "index": "hnsw", "hnsw_m": 8}),
    "ltm-proj": (LongTermMemory, {"capacity": 200, "key_dim": 8, "train_after": 100}),
    "archive": (Archive, {"capacity": 200, "age_steps": [2, 4], "train_after": 64, "pq_m": 8, "pq_bits": 4}),
}


def context(dim: int = DIM) -> BuildContext:
    return BuildContext(config=ModelConfig(vocab_size=32, dim=dim, layers=1, heads=2, context=8))


def make(name: str) -> MemoryTier:
    cls, settings = TIERS[name]
    return cls(cls.Settings(**settings), context())


def batch(keys, tokens, stream, values=None) -> Entries:
    n = keys.shape[0]
    values = keys * 2 if values is None else values
    return Entries(keys, values, torch.as_tensor(tokens).long(), torch.full((n,), stream, dtype=torch.long))


def total_capacity(tier: MemoryTier, streams: int = 1) -> int:
    return tier.capacity * (streams if isinstance(tier, ShortTermMemory) else 1)


pytestmark = pytest.mark.usefixtures("one_thread", "one_faiss_thread")  # tests/conftest.py


tiers = pytest.mark.parametrize("name", list(TIERS))


def test_builtin_tiers_are_registered_through_entry_points():
    registry = create_plugin_manager().registry
    for name, cls in {"stm": ShortTermMemory, "ltm": LongTermMemory, "archive": Archive}.items():
        info = registry.get("memory", name)
        assert info is not None and info.cls is cls and info.source.builtin


@tiers
def test_settings_reject_unknown_keys(name):
    cls, settings = TIERS[name]
    with pytest.raises(ValueError):
        cls.Settings(**settings, colour="blue")
    for field in cls.Settings.model_fields.values():
        assert field.description, "every setting is documented"


@tiers
def test_empty_tier_reads_are_padded(name):
    tier = make(name)
    got = tier.read(torch.randn(3, DIM), 4, stream=0)
    assert got.values.shape == (3, 4, DIM) and got.tokens.shape == got.scores.shape == got.ids.shape == (3, 4)
    assert (got.ids == -1).all() and (got.tokens == -1).all() and (got.values == 0).all()
    assert torch.isinf(got.scores).all() and (got.scores < 0).all()
    assert got.keys.shape == (3, 4, DIM) and (got.keys == 0).all() and (got.uses == 0).all()
    got = tier.read_batch(torch.randn(2, 5, DIM), torch.tensor([0, 1]), 3)
    assert got.values.shape == (2, 5, 3, DIM) and got.ids.shape == (2, 5, 3) and (got.ids == -1).all()
    assert got.keys.shape == (2, 5, 3, DIM) and got.uses.shape == (2, 5, 3)
    # fewer entries than k: the rest is padding
    tier.write(batch(torch.randn(2, DIM), [5, 6], 0))
    got = tier.read(torch.randn(1, DIM), 4, stream=0)
    assert (got.ids[0, :2] >= 0).all() and (got.ids[0, 2:] == -1).all()
    assert (got.scores[0, 2:] == float("-inf")).all() and (got.tokens[0, 2:] == -1).all()
    assert (got.keys[0, 2:] == 0).all() and (got.uses[0, :2] == 1).all() and (got.uses[0, 2:] == 0).all()
    # the keys returned are the stored, normalised keys: their cosine with the query is the score
    query = torch.randn(1, DIM)
    got = tier.read(query, 2, stream=0)
    cos = torch.einsum("d,kd->k", torch.nn.functional.normalize(query[0], dim=0), got.keys[0])
    assert torch.allclose(cos, got.scores[0], atol=0.05)
    stats = tier.stats()
    for key in ("entries", "capacity", "bytes", "queries", "hits", "hit_rate",
                "consolidated_in", "consolidated_out", "evicted"):
        assert key in stats
    assert stats["entries"] == 2 and stats["queries"] == 15 and stats["hits"] == 2


@tiers
def test_streams_never_see_each_other(name):
    tier = make(name)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, DIM, generator=g), torch.randn(6, DIM, generator=g)
    tier.write(batch(a, range(6), stream=0))
    tier.write(batch(b, range(100, 106), stream=1))
    mine = tier.read(a, 4, stream=0)
    assert ((mine.tokens >= 0) & (mine.tokens < 6)).all()
    theirs = tier.read(b, 10, stream=0)  # the other stream's exact keys do not leak
    valid = theirs.ids >= 0
    assert (theirs.tokens[valid] < 6).all() and valid.sum(1).eq(6).all()
    assert not set(theirs.ids[valid].tolist()) & set(tier.read(b, 6, stream=1).ids.flatten().tolist())
    got = tier.read_batch(torch.stack([b, a, a]), torch.tensor([0, 1, 7]), 3)
    assert (got.tokens[0][got.ids[0] >= 0] < 6).all()
    assert (got.tokens[1][got.ids[1] >= 0] >= 100).all()
    assert (got.ids[2] == -1).all()  # a stream with nothing written sees nothing
    tier.clear(1)
    assert (tier.read(b, 3, stream=1).ids == -1).all() and len(tier) == 6


@tiers
def test_ten_times_capacity_stays_bounded_and_keeps_the_newest(name):
    tier = make(name)
    cap = total_capacity(tier)
    g = torch.Generator().manual_seed(2)
    chunk = max(1, cap // 4)
    sizes = []
    for step, start in enumerate(range(0, 10 * cap, chunk)):
        keys = torch.randn(chunk, DIM, generator=g)
        tier.write(batch(keys, range(start, start + chunk), 0), step=step)
        assert len(tier) <= cap and tier.ntotal <= cap
        if start + chunk in (5 * cap, 10 * cap):
            sizes.append(tier.stats()["bytes"])
    assert tier.ntotal == len(tier) and len(tier) >= cap // 2
    newest = tier.read(keys[-1:], 1, stream=0, step=step)
    assert newest.tokens[0, 0] == 10 * cap - 1 and newest.scores[0, 0] > 0.95
    # serialised state is bounded by the capacity and does not grow with more writes
    assert sizes[1] <= 3 * entries_nbytes_fp32(cap, DIM) + 64 * 1024
    assert sizes[1] <= 1.1 * sizes[0] + 4096
    assert tier.stats()["evicted"] >= 10 * cap - cap - chunk


@tiers
def test_save_and_load_give_identical_retrievals(name, tmp_path):
    tier = make(name)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        keys = torch.randn(30, DIM, generator=g)
        entries = batch(keys, range(step * 30, step * 30 + 30), step % 2)
        entries.meta = [{"text": f"entry {step}:{i}"} for i in range(30)]
        tier.write(entries, step=step)
    queries = torch.randn(2, 7, DIM, generator=g)
    tier.read(queries[0], 3, stream=0, step=6)
    save_state(tmp_path, {"memory.0": tier.state_dict()})
    again = make(name)
    again.load_state_dict(load_state(tmp_path)["memory.0"])
    assert again.stats() == tier.stats()
    for stream in (0, 1):
        x, y = tier.read(queries[stream], 5, stream=stream, step=7), again.read(queries[stream], 5, stream=stream, step=7)
        assert torch.equal(x.ids, y.ids) and torch.equal(x.tokens, y.tokens)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.values, y.values)
        assert torch.equal(x.keys, y.keys) and torch.equal(x.uses, y.uses)
        assert tier.meta_of(x.ids) == again.meta_of(y.ids)
    x = tier.read_batch(queries, torch.tensor([1, 0]), 4, step=8)
    y = again.read_batch(queries, torch.tensor([1, 0]), 4, step=8)
    assert torch.equal(x.ids, y.ids) and torch.equal(x.values, y.values) and torch.equal(x.scores, y.scores)
    assert again.stats() == tier.stats()  # uses and counters moved alike


@tiers
def test_no_gradient_reaches_stored_memory(name):
    tier = make(name)
    source = torch.randn(12, DIM, requires_grad=True)
    keys, values = source * 2, source * 3
    tier.write(Entries(keys, values, torch.arange(12), torch.zeros(12, dtype=torch.long)))
    before = {k: v.clone() for k, v in flatten_state(tier.state_dict())[0].items()}
    assert not any(v.requires_grad for v in before.values())
    with torch.no_grad():
        source.add_(1.0)  # changing the source after the write does not change memory
    query = torch.randn(4, DIM, requires_grad=True)
    got = tier.read(query, 3, stream=0, touch=False)
    batched = tier.read_batch(query[None], torch.tensor([0]), 3, touch=False)
    for r in (got, batched):
        assert not any(t.requires_grad for t in (r.values, r.scores, r.tokens, r.ids, r.keys, r.uses))
    weight = torch.ones(DIM, requires_grad=True)
    loss = (got.values * weight).sum() + (query * weight).sum() + (source * 0).sum()
    loss.backward()
    assert weight.grad is not None and query.grad is not None
    after = flatten_state(tier.state_dict())[0]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
