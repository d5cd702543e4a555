"""Tests of cortex-hopfield, with the fixtures of ``cortex.testing`` (installed with Cortex)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from torch import nn

from cortex.kernel.interfaces import BuildContext, Entries
from cortex.core.transformer import ModelConfig

from cortex_hopfield import plugin
from cortex_hopfield.plugin import HopfieldMemory, OjaHebbian

MANIFEST = """\
cortex: 1
name: hopfield-test
model: {dim: 32, layers: 2, heads: 2, context: 16, memory_layers: [1]}
memory:
  - {type: stm, settings: {capacity: 8, consolidate_after: 1}}
  - {type: hopfield.memory, settings: {capacity: 16, beta: 8.0}}
memory_system: {read: [knn_attention], write: all}   # reading stm counts uses: entries move on
plasticity:
  - {type: hopfield.hebbian, target: "blocks.*.mlp.proj", settings: {lr: 1.0e-3}}
"""


@pytest.fixture
def installed(fake_distribution):
    """The plugin as Cortex sees it: installed for real, or as a fake distribution."""
    if not metadata.entry_points(group="cortex.plugins", name="hopfield"):
        fake_distribution("cortex-hopfield", {"hopfield": plugin}, version="0.1.0")


def make_tier(dim=64, **settings) -> HopfieldMemory:
    context = BuildContext(config=ModelConfig(vocab_size=16, dim=dim, layers=1, heads=2, context=8))
    return HopfieldMemory(HopfieldMemory.Settings(**settings), context)


def entries(keys: torch.Tensor, stream: int = 0) -> Entries:
    n = keys.shape[0]
    return Entries(keys, keys * 2, torch.arange(n), torch.full((n,), stream))


def patterns(n=30, dim=64, seed=0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def noisy(p: torch.Tensor, noise: float, seed=1) -> torch.Tensor:
    return p + noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) / p.shape[-1] ** 0.5


def test_noisy_cues_complete_to_their_stored_patterns():
    tier = make_tier(beta=16.0, iterations=3)
    p = patterns()
    tier.write(entries(p))
    cues = noisy(p, 1.2)
    raw = torch.nn.functional.cosine_similarity(cues, p, dim=-1)
    assert raw.max() < 0.8  # the cues really are corrupted
    got = tier.read(cues, k=1)
    assert torch.equal(got.tokens[:, 0], torch.arange(30))  # every cue finds its own pattern
    assert (got.scores[:, 0] > 0.99).all()  # and settles onto it


def test_updates_lower_the_energy_and_beta_sets_sharpness():
    tier = make_tier(beta=4.0)
    p = patterns()
    tier.write(entries(p))
    state = torch.nn.functional.normalize(noisy(p[:5], 1.5), dim=-1)
    for _ in range(4):
        nxt = tier.update(state)
        assert (tier.energy(nxt) <= tier.energy(state) + 1e-6).all()
        state = nxt
    entropy = []
    for beta in (1.0, 32.0):
        tier.settings = HopfieldMemory.Settings(beta=beta)
        _, weights = tier.retrieve(noisy(p[:5], 0.5))
        entropy.append(float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()))
    assert entropy[1] < 0.5 * entropy[0]  # high beta: one pattern; low beta: a mixture


def test_streams_are_isolated_capacity_is_bounded_and_state_round_trips():
    tier = make_tier(capacity=8)
    p = patterns(20)
    tier.write(entries(p[:12], stream=0), step=1)
    tier.write(entries(p[12:], stream=5), step=1)
    assert len(tier) == 8 + 8 and tier.stats()["evicted"] == 4
    assert (tier.read(p[:1], k=3, stream=7).ids == -1).all()  # an unknown stream sees nothing
    assert set(tier.read(p[12:], k=1, stream=5).tokens[:, 0].tolist()) == set(range(8))
    copy = make_tier(capacity=8)
    copy.load_state_dict(tier.state_dict())
    q = torch.randn(3, 64)
    assert torch.equal(copy.read(q, 4, touch=False).ids, tier.read(q, 4, touch=False).ids)


def test_least_recently_used_patterns_are_forgotten_first():
    tier = make_tier(capacity=4, iterations=0)
    p = patterns(6)
    tier.write(entries(p[:4]), step=0)
    tier.read(p[:1], k=1, step=3)  # pattern 0 is used: it survives
    tier.write(entries(p[4:6]), step=4)
    kept = set(tier.streams[0]["ids"].tolist())
    assert 0 in kept and {4, 5} <= kept and len(kept) == 4


def test_oja_rule_finds_the_first_principal_component():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 1, bias=False))
    rule = OjaHebbian(OjaHebbian.Settings(lr=0.02), BuildContext(), target="0")
    rule.attach(layer)
    scale = torch.tensor([3.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    rotation, _ = torch.linalg.qr(torch.randn(6, 6))
    first_pc = rotation[:, 0]
    for _ in range(600):
        x = (torch.randn(64, 6) * scale) @ rotation.T
        layer(x)
        with torch.no_grad():
            rule.apply("0", layer[0])
    w = layer[0].weight[0].detach()
    assert abs(float(w.norm()) - 1.0) < 0.05
    assert abs(float(torch.dot(w / w.norm(), first_pc))) > 0.99


def test_cortex_lists_both_components(installed, cortex_cli):
    listed = json.loads(cortex_cli("plugins", "--json").stdout)["components"]
    rows = {r["name"]: r for r in listed}
    assert rows["hopfield.memory"]["kind"] == "memory" and rows["hopfield.memory"]["entry_point"] == "hopfield"
    assert rows["hopfield.hebbian"]["kind"] == "plasticity"


def test_a_manifest_builds_and_trains_with_both(installed, build_model):
    model = build_model(MANIFEST)
    stm, hop = model.memory
    [rule] = model.plasticity
    assert isinstance(hop, HopfieldMemory) and sorted(rule.targets) == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]
    before = model.core.blocks[0].mlp.proj.weight.clone()
    model.train()
    idx = torch.randint(0, 256, (2, 16))
    for step in range(3):
        model.pm.hook.cortex_before_step(model=model, step=step, batch=idx)
        model(idx, idx)
        model.pm.hook.cortex_after_step(model=model, step=step, metrics={})
    assert len(hop) > 0  # stm handed entries over to the Hopfield tier
    assert not torch.equal(before, model.core.blocks[0].mlp.proj.weight)  # the rule changed weights
    assert rule.updates == 6
