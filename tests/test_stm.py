"""Short-term memory: competitive slots, uses, consolidation and batched reads."""

from __future__ import annotations

import pytest
import torch

from cortex.core.transformer import ModelConfig
from cortex.kernel.interfaces import BuildContext, Entries
from cortex_plugins.memory.stm import ShortTermMemory

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DIM = 32


def stm(**settings) -> ShortTermMemory:
    ctx = BuildContext(config=ModelConfig(vocab_size=32, dim=DIM, layers=1, heads=2, context=8))
    return ShortTermMemory(ShortTermMemory.Settings(**settings), ctx)


def one(key, token, stream=0, value=None) -> Entries:
    key = key.reshape(1, -1)
    value = key * 3 if value is None else value.reshape(1, -1)
    return Entries(key, value, torch.tensor([token]), torch.tensor([stream]))


def many(keys, tokens, stream=0) -> Entries:
    return Entries(keys, keys * 3, torch.as_tensor(tokens).long(), torch.full((keys.shape[0],), stream))


def slot_of(tier: ShortTermMemory, token: int) -> tuple[int, int]:
    hit = (tier.tokens == token) & tier.valid
    assert int(hit.sum()) == 1, f"token {token} is in {int(hit.sum())} slots"
    r, s = hit.nonzero()[0].tolist()
    return r, s


@pytest.fixture
def keys():
    return torch.randn(20, DIM, generator=torch.Generator().manual_seed(0))


def test_a_repeated_key_strengthens_one_slot(keys):
    tier = stm(capacity=4)
    tier.write(one(keys[0], 1), step=1)
    tier.write(one(keys[0] * 5, 2), step=2)  # same direction: cosine 1
    tier.write(one(keys[0], 3), step=3)
    assert len(tier) == 1
    r, s = slot_of(tier, 3)  # the newest token replaced the older ones
    assert tier.uses[r, s] == 2 and tier.steps[r, s] == 3
    assert tier.stats()["strengthened"] == 2 and tier.stats()["evicted"] == 0


def test_a_matching_write_moves_key_and_value_by_value_mix(keys):
    tier = stm(capacity=4, threshold=0.5, value_mix=0.25)
    near = keys[0] + 0.1 * keys[1]
    tier.write(one(keys[0], 1, value=torch.ones(DIM)), step=1)
    tier.write(one(near, 2, value=torch.zeros(DIM)), step=2)
    assert len(tier) == 1
    r, s = slot_of(tier, 2)
    assert torch.allclose(tier.values[r, s], torch.full((DIM,), 0.75))
    k0, k1 = torch.nn.functional.normalize(keys[0], dim=0), torch.nn.functional.normalize(near, dim=0)
    expected = torch.nn.functional.normalize(0.75 * k0 + 0.25 * k1, dim=0)
    assert torch.allclose(tier.keys[r, s], expected, atol=1e-6)
    assert torch.isclose(tier.keys[r, s].norm(), torch.tensor(1.0))


def test_duplicates_within_one_call_share_a_slot(keys):
    tier = stm(capacity=4)
    tier.write(many(torch.stack([keys[0], keys[1], keys[0], keys[0]]), [1, 2, 3, 4]), step=5)
    assert len(tier) == 2
    r, s = slot_of(tier, 4)
    assert tier.uses[r, s] == 2
    assert tier.uses[slot_of(tier, 2)] == 0


def test_a_new_key_replaces_the_least_useful_slot(keys):
    tier = stm(capacity=3)
    tier.write(many(keys[:3], [0, 1, 2]), step=1)  # empty slots are taken first
    assert len(tier) == 3
    tier.write(one(keys[0], 10), step=2)  # slot of key 0: 1 use
    tier.write(one(keys[0], 11), step=3)  # 2 uses
    tier.write(one(keys[1], 12), step=4)  # slot of key 1: 1 use
    tier.write(one(keys[3], 13), step=5)  # key 2 has the fewest uses: replaced
    assert sorted(tier.tokens[tier.valid].tolist()) == [11, 12, 13]
    tier.write(one(keys[4], 14), step=6)  # key 3 has 0 uses: replaced
    assert sorted(tier.tokens[tier.valid].tolist()) == [11, 12, 14]
    tier.write(one(keys[1], 15), step=7)  # key 1: 2 uses now, like key 0 (older step)
    tier.write(one(keys[4], 16), step=8)  # key 4: 1 use
    tier.write(one(keys[5], 17), step=9)  # fewest uses: key 4 (1)
    assert sorted(tier.tokens[tier.valid].tolist()) == [11, 15, 17]
    tier.write(one(keys[5], 18), step=10)
    tier.write(one(keys[5], 19), step=11)  # all have 2 uses: the oldest step (key 0, step 3) goes
    tier.write(one(keys[6], 20), step=12)
    assert sorted(tier.tokens[tier.valid].tolist()) == [15, 19, 20]
    assert tier.stats()["evicted"] == 4


def test_a_call_never_overwrites_its_own_slots_and_the_newest_win(keys):
    tier = stm(capacity=4)
    tier.write(many(keys[:4], [0, 1, 2, 3]), step=1)
    tier.write(many(keys[4:7], [4, 5, 6]), step=2)
    assert sorted(tier.tokens[tier.valid].tolist()) == [3, 4, 5, 6]  # three distinct slots
    tier.write(many(keys[10:20], list(range(100, 110))), step=3)  # more than capacity
    assert sorted(tier.tokens[tier.valid].tolist()) == [106, 107, 108, 109]
    assert tier.stats()["evicted"] == 3 + 4 + 6


def test_the_newest_entry_is_kept_even_when_a_call_strengthened_every_slot(keys):
    tier = stm(capacity=2)
    tier.write(many(keys[:2], [0, 1]), step=1)
    tier.write(many(keys[:3], [10, 11, 12]), step=2)
    assert 12 in tier.tokens[tier.valid].tolist() and len(tier) == 2


def test_capacity_is_per_stream(keys):
    tier = stm(capacity=3)
    tier.write(many(keys[:5], range(5), stream=0))
    tier.write(many(keys[5:10], range(5, 10), stream=9))
    assert len(tier) == 6 and tier.stats()["streams"] == 2
    assert tier.valid.sum(1).tolist() == [3, 3]


def test_reads_count_one_use_per_entry_returned(keys):
    tier = stm(capacity=4)
    tier.write(many(keys[:3], [0, 1, 2]), step=1)
    got = tier.read(torch.stack([keys[0], keys[0] * 2, keys[1]]), 1, stream=0, step=7)
    assert got.tokens[:, 0].tolist() == [0, 0, 1]
    assert tier.uses[slot_of(tier, 0)] == 1 and tier.uses[slot_of(tier, 1)] == 1
    assert tier.steps[slot_of(tier, 0)] == 7 and tier.steps[slot_of(tier, 2)] == 1
    tier.read(keys[:1], 1, stream=0, touch=False)
    assert tier.uses[slot_of(tier, 0)] == 1


def test_consolidation_hands_over_exactly_the_entries_used_enough(keys):
    tier = stm(capacity=8, consolidate_after=3)
    tier.write(many(keys[:4], [0, 1, 2, 3], stream=0), step=1)
    tier.write(many(keys[4:8], [4, 5, 6, 7], stream=5), step=1)
    for _ in range(3):
        tier.write(one(keys[0], 0, stream=0), step=2)  # token 0: 3 uses by strengthening
    for step in (3, 4, 5):
        tier.read(keys[5:6], 1, stream=5, step=step)  # token 5: 3 uses by retrieval
    tier.read(keys[1:2], 1, stream=0, step=6)
    tier.read(keys[1:2], 1, stream=0, step=7)  # token 1: 2 uses, stays
    out = tier.handover(step=8)
    assert sorted(out.tokens.tolist()) == [0, 5]
    by_token = {t: i for i, t in enumerate(out.tokens.tolist())}
    assert out.streams[by_token[0]] == 0 and out.streams[by_token[5]] == 5
    assert out.uses.tolist() == [3, 3] and out.steps[by_token[5]] == 5
    assert torch.allclose(out.keys[by_token[5]], torch.nn.functional.normalize(keys[5], dim=0))
    assert torch.allclose(out.values[by_token[5]], keys[5] * 3)
    assert sorted(tier.tokens[tier.valid].tolist()) == [1, 2, 3, 4, 6, 7]
    assert tier.stats()["consolidated_out"] == 2 and tier.handover(step=9) is None
    # a retrieval more makes token 1 due
    tier.read(keys[1:2], 1, stream=0, step=10)
    assert tier.handover(step=11).tokens.tolist() == [1]


def test_handover_carries_metadata(keys):
    tier = stm(capacity=4, consolidate_after=1)
    entries = many(keys[:2], [0, 1])
    entries.meta = [{"text": "zero"}, {"text": "one"}]
    tier.write(entries)
    tier.write(one(keys[1], 2))
    assert tier.meta_of(tier.read(keys[1:2], 1, touch=False).ids) == [{"text": "one"}]
    out = tier.handover()
    assert out.tokens.tolist() == [2] and out.meta == [{"text": "one"}]
    assert len(tier.meta) == 1


def test_read_batch_equals_per_row_reads():
    g = torch.Generator().manual_seed(4)
    tier = stm(capacity=6)
    for stream in (3, 1, 8):
        tier.write(many(torch.randn(5, DIM, generator=g), range(stream * 10, stream * 10 + 5), stream=stream))
    queries = torch.randn(4, 7, DIM, generator=g)
    streams = torch.tensor([8, 1, 3, 42])
    got = tier.read_batch(queries, streams, 8, touch=False)
    assert got.values.shape == (4, 7, 8, DIM)
    for row, stream in enumerate(streams.tolist()):
        ref = tier.read(queries[row], 8, stream=stream, touch=False)
        assert torch.equal(got.ids[row], ref.ids) and torch.equal(got.tokens[row], ref.tokens)
        assert torch.allclose(got.scores[row], ref.scores) and torch.equal(got.values[row], ref.values)
        assert torch.equal(got.keys[row], ref.keys) and torch.equal(got.uses[row], ref.uses)
    assert (got.ids[3] == -1).all()
    # a read one stream at a time counts the same uses as the batched read
    twin = stm(capacity=6)
    twin.load_state_dict(tier.state_dict())
    twin.read(queries[0], 2, stream=8, step=4)
    tier.read_batch(queries[:1], streams[:1], 2, step=4)
    assert torch.equal(twin.uses, tier.uses) and torch.equal(twin.steps, tier.steps) and int(tier.uses.sum()) > 0
    # the batched read counts uses per row, like the reads one by one
    tier.read_batch(queries, streams, 2)
    assert int(tier.uses.sum()) > 0


def test_clear(keys):
    tier = stm(capacity=4)
    tier.write(many(keys[:2], [0, 1], stream=0))
    tier.write(many(keys[2:4], [2, 3], stream=1))
    tier.clear(0)
    assert len(tier) == 2 and tier.stats()["streams"] == 1
    assert tier.read(keys[2:3], 1, stream=1).tokens.tolist() == [[2]]
    tier.clear()
    assert len(tier) == 0 and (tier.read(keys[:1], 1, stream=1).ids == -1).all()


def test_settings_are_validated():
    with pytest.raises(ValueError):
        ShortTermMemory.Settings(capacity=0)
    with pytest.raises(ValueError):
        ShortTermMemory.Settings(consolidate_after=0)
    with pytest.raises(ValueError):
        ShortTermMemory.Settings(value_mix=1.5)
