"""The archive: levels by age, training, compression ratio with recall, eviction."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cortex.core.transformer import ModelConfig
from cortex.kernel.interfaces import BuildContext, Entries
from cortex.runtime.rundir import save_state
from cortex_plugins.memory._vector_index import entries_nbytes_fp32
from cortex_plugins.memory.archive import Archive


def archive(dim: int = 32, **settings) -> Archive:
    ctx = BuildContext(config=ModelConfig(vocab_size=32, dim=dim, layers=1, heads=2, context=8))
    return Archive(Archive.Settings(**settings), ctx)


def entries(keys, values=None, first_token=0, stream=0) -> Entries:
    n = keys.shape[0]
    values = keys * 2 if values is None else values
    return Entries(keys, values, torch.arange(first_token, first_token + n), torch.full((n,), stream))


def sub_clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """64 Gaussian clusters of 32 Gaussian sub-clusters each: neighbours are well defined."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, 1, dim, generator=g) + 1.0 * torch.randn(64, 32, dim, generator=g)
    a, b = torch.randint(0, 64, (n,), generator=g), torch.randint(0, 32, (n,), generator=g)
    return centres[a, b] + 0.1 * torch.randn(n, dim, generator=g)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.numel()


pytestmark = pytest.mark.usefixtures("one_thread", "one_faiss_thread")  # tests/conftest.py


#: the levels of the tests written for PQ keys (the default's deepest level is sq8/sq4)
PQ_LEVELS = ["fp16", "sq8", "pq"]


def measure(tier: Archive, keys, values, tmp_path, chunks, value_error=0.05):
    """Write ``keys`` in ``chunks``; return (bytes on disk / fp32 bytes, recall@10, found ids)."""
    n, dim = keys.shape
    bounds = [0, *chunks, n]
    for lo, hi in zip(bounds, bounds[1:]):
        tier.write(entries(keys[lo:hi], values[lo:hi], lo), step=lo)
    assert tier.stats()["levels"][tier.settings.levels[-1]] == n  # everything reached the coarsest level
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_state(tmp_path, {"archive": tier.state_dict()})
    on_disk = sum((tmp_path / f).stat().st_size for f in ("state.safetensors", "state.json"))
    ratio = on_disk / entries_nbytes_fp32(n, dim)
    g = torch.Generator().manual_seed(1)
    queries = keys[torch.randperm(n, generator=g)[:200]] + 0.02 * torch.randn(200, dim, generator=g)
    truth = (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T).topk(10, dim=1).indices
    got = tier.read(queries, 10, touch=False)
    assert torch.equal(got.tokens, got.ids)  # token i was written as id i
    err = (got.values[:, 0] - values[got.ids[:, 0]]).abs().mean()
    assert err < value_error  # values decode close to what was written
    return ratio, recall(got.ids, truth), got.ids


def test_pq_level_is_under_a_quarter_of_fp32_with_good_recall(tmp_path):
    keys, values = sub_clustered(20000, 128), torch.randn(20000, 128, generator=torch.Generator().manual_seed(2))
    tier = archive(dim=128, capacity=20000, age_steps=[0, 0], train_after=4096, pq_m=128, pq_bits=4, levels=PQ_LEVELS)
    ratio, rec, _ = measure(tier, keys, values, tmp_path, chunks=range(4096, 20000, 4000))
    print(f"archive pq128x4 d=128 n=20000: bytes on disk / fp32 = {ratio:.3f}, recall@10 = {rec:.3f}")
    assert ratio <= 0.25 and rec >= 0.8


@pytest.mark.slow
def test_default_pq_settings_ratio_and_recall(tmp_path):
    keys, values = sub_clustered(20000, 128), torch.randn(20000, 128, generator=torch.Generator().manual_seed(2))
    tier = archive(dim=128, capacity=20000, age_steps=[0, 0], levels=PQ_LEVELS)  # pq_m=32, pq_bits=8
    ratio, rec, _ = measure(tier, keys, values, tmp_path, chunks=range(4096, 20000, 4000))
    print(f"archive pq32x8 d=128 n=20000: bytes on disk / fp32 = {ratio:.3f}, recall@10 = {rec:.3f}")
    assert ratio <= 0.25 and rec >= 0.8


def test_default_deepest_level_spends_its_bytes_on_the_keys(tmp_path):
    keys, values = sub_clustered(20000, 128), torch.randn(20000, 128, generator=torch.Generator().manual_seed(2))
    tier = archive(dim=128, capacity=20000, age_steps=[0, 0])  # levels fp16, sq8, sq8/sq4
    assert tier.settings.levels[-1] == "sq8/sq4"
    ratio, rec, found = measure(tier, keys, values, tmp_path, chunks=range(4096, 20000, 4000), value_error=0.2)
    print(f"archive sq8/sq4 d=128 n=20000: bytes on disk / fp32 = {ratio:.3f}, recall@10 = {rec:.3f}")
    assert ratio <= 0.25 and rec >= 0.9
    # the value codec does not change what is found: sq8/sq8 finds the same entries, at more bytes
    wide = archive(dim=128, capacity=20000, age_steps=[0], levels=["fp16", "sq8"])
    wide_ratio, _, wide_found = measure(wide, keys, values, tmp_path / "wide", chunks=range(4096, 20000, 4000))
    assert torch.equal(found, wide_found) and wide_ratio > ratio + 0.05
    # 4-bit keys find less than 8-bit keys
    narrow = archive(dim=128, capacity=20000, age_steps=[0, 0], levels=["fp16", "sq8", "sq4"])
    _, narrow_rec, _ = measure(narrow, keys, values, tmp_path / "narrow", chunks=range(4096, 20000, 4000),
                               value_error=0.2)
    assert narrow_rec < rec - 0.02


def test_entries_move_down_the_levels_as_they_age():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(100, 32, generator=g)
    tier = archive(age_steps=[10, 20], train_after=64, pq_m=8, pq_bits=4, levels=PQ_LEVELS)
    tier.write(entries(keys), step=0)
    assert tier.stats()["levels"] == {"fp16": 100, "sq8": 0, "pq": 0}
    assert tier.compact(9) == 0
    assert tier.compact(10) == 100 and tier.stats()["levels"] == {"fp16": 0, "sq8": 100, "pq": 0}
    tier.write(entries(keys[:5] * -1, first_token=100), step=15)
    tier.handover(step=25)  # the last tier hands nothing over but compacts
    assert tier.handover(step=25) is None
    assert tier.stats()["levels"] == {"fp16": 0, "sq8": 5, "pq": 100}
    assert tier.ntotal == len(tier) == 105
    got = tier.read(keys, 1)  # compressed keys still find themselves
    assert (got.ids[:, 0] == torch.arange(100)).float().mean() >= 0.95
    assert got.scores[:, 0].min() > 0.5  # 4-bit codes of 4 dimensions each: coarse
    assert torch.allclose(got.keys[:, 0].norm(dim=-1), torch.ones(100), atol=1e-5)
    assert (got.uses[:, 0] >= 1).all()


def test_untrained_levels_wait_for_enough_entries():
    g = torch.Generator().manual_seed(4)
    tier = archive(age_steps=[0, 0], train_after=200, pq_m=8, pq_bits=4, levels=PQ_LEVELS)
    tier.write(entries(torch.randn(150, 32, generator=g)), step=0)
    assert tier.stats()["levels"] == {"fp16": 150, "sq8": 0, "pq": 0} and tier.stats()["trained"] == ["fp16"]
    tier.write(entries(torch.randn(60, 32, generator=g), first_token=150), step=1)
    assert tier.stats()["levels"] == {"fp16": 0, "sq8": 0, "pq": 210}
    # pq also needs 2**pq_bits entries: with 8 bits and train_after 64, sq8 trains first
    tier = archive(age_steps=[0, 0], train_after=64, pq_m=8, pq_bits=8, levels=PQ_LEVELS)
    tier.write(entries(torch.randn(100, 32, generator=g)), step=0)
    assert tier.stats()["levels"] == {"fp16": 0, "sq8": 100, "pq": 0}


def test_fp16_and_sq8_levels_decode_values_closely():
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)
    tier = archive(levels=["fp16", "sq8"], age_steps=[5], train_after=100)
    tier.write(entries(keys, values), step=0)
    got = tier.read(keys, 1, touch=False)
    assert torch.equal(got.ids[:, 0], torch.arange(300))
    assert (got.values[:, 0] - values).abs().max() < 1e-2  # fp16
    tier.compact(5)
    got = tier.read(keys, 1, touch=False)
    assert torch.equal(got.ids[:, 0], torch.arange(300))
    assert (got.values[:, 0] - values).abs().mean() < 0.02  # 8-bit


def test_eviction_is_oldest_first_and_keeps_the_newest():
    g = torch.Generator().manual_seed(6)
    tier = archive(capacity=100, age_steps=[3, 6], train_after=50, pq_m=8, pq_bits=4, levels=PQ_LEVELS)
    for step in range(12):
        keys = torch.randn(30, 32, generator=g)
        tier.write(entries(keys, first_token=30 * step), step=step)
        assert len(tier) <= 100 and tier.ntotal <= 100
    held = sorted(torch.cat([lv.col("ids") for lv in tier.levels]).tolist())
    assert held == list(range(360 - len(held), 360))  # the oldest went first
    got = tier.read(keys[-1:], 1)
    assert got.tokens.item() == 359


def test_subset_search_agrees_with_whole_level_search():
    keys = torch.randn(3000, 32, generator=torch.Generator().manual_seed(7))
    tier = archive(age_steps=[0, 0], train_after=1000, pq_m=8, pq_bits=8, levels=PQ_LEVELS)
    tier.write(entries(keys[:1500]), step=0)
    tier.write(entries(keys[1500:], first_token=1500), step=0)
    queries = keys[:50] + 0.01
    alone = tier.read(queries, 5, touch=False)  # stream 0 owns the level: index search
    tier.write(entries(keys[:10], first_token=5000, stream=3), step=0)
    shared = tier.read(queries, 5, touch=False)  # rows of stream 0 are decoded and scored
    # both score a query against the decoded key: same scores and entries
    assert torch.allclose(alone.scores, shared.scores, atol=1e-5)
    assert torch.equal(alone.ids, shared.ids)
    assert (tier.read(queries, 5, stream=3).tokens >= 5000).all()


def test_settings_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match="must divide the model width"):
        archive(dim=32, pq_m=5, levels=PQ_LEVELS)
    with pytest.raises(ValueError, match="one item per level"):
        Archive.Settings(levels=["fp16", "pq"], age_steps=[1, 2])
    with pytest.raises(ValueError, match="start with 'fp16'"):
        Archive.Settings(levels=["pq"], age_steps=[])
    with pytest.raises(ValueError, match="ordered"):
        Archive.Settings(levels=["fp16", "pq", "sq8"])
    with pytest.raises(ValueError, match="non-decreasing"):
        Archive.Settings(age_steps=[10, 5])
    with pytest.raises(ValueError, match="ordered"):
        Archive.Settings(levels=["fp16", "sq8/sq4", "sq6"])  # values finer again
    for bad in ("sq3", "pq/pq", "fp16/sq8/sq4"):
        with pytest.raises(ValueError, match=f"level '{bad}': name it KEYS or KEYS/VALUES"):
            Archive.Settings(levels=["fp16", bad], age_steps=[1])
    archive(dim=36, levels=["fp16", "sq8"], age_steps=[1], pq_m=7)  # pq_m unused without pq
