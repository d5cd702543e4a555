"""Cortical columns: exactly k of N columns per token, in training and evaluation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from cortex.core.transformer import ModelConfig, Transformer
from cortex.kernel.interfaces import BuildContext
from cortex_plugins.plasticity._column_mlp import ColumnMLP
from cortex_plugins.plasticity.cortical_columns import CorticalColumns


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def core(layers: int = 2) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, layers=layers, heads=2, context=16))


def columns(root: nn.Module, target: str = "blocks.*.mlp", **settings) -> CorticalColumns:
    rule = CorticalColumns(CorticalColumns.Settings(**settings), BuildContext(), target=target)
    rule.attach(root)
    return rule


def dense_reference(m: ColumnMLP, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same output computed column by column, only over the winners."""
    scores = m.router(x)
    out = torch.zeros_like(x)
    width = m.fc.out_features // m.columns
    gates = scores.masked_fill(mask == 0, float("-inf")).softmax(-1) * m.active
    for c in range(m.columns):
        rows = slice(c * width, (c + 1) * width)
        h = F.gelu(x @ m.fc.weight[rows].T)
        out += gates[..., c:c + 1] * (h @ m.proj.weight[:, rows].T)
    return out


@pytest.mark.parametrize("selection", ["topk", "gumbel"])
def test_exactly_k_of_n_columns_per_token_in_training_and_evaluation(selection):
    model = core()
    dense = model.num_parameters()
    fc = model.blocks[0].mlp.fc
    rule = columns(model, columns=8, active=3, selection=selection, temperature=0.5)
    assert sorted(rule.targets) == ["blocks.0.mlp", "blocks.1.mlp"]
    m = model.blocks[0].mlp
    assert isinstance(m, ColumnMLP) and m.fc is fc  # the MLP's own weights, cut into columns
    assert model.num_parameters() == dense + 2 * 32 * 8  # only the routers are new
    x = torch.randn(4, 10, 32)
    for training in (True, False):
        m.train(training)
        out = m(x)
        mask = m.last_mask
        assert mask.shape == (4, 10, 8)
        assert (mask.sum(-1) == 3).all()  # exactly k winners for every token
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.allclose(out, dense_reference(m, x, mask), atol=1e-5)
    m.eval()
    assert torch.equal(m(x), m(x))  # evaluation is deterministic (no noise), same k-WTA rule
    if selection == "gumbel":
        m.train()
        draws = []
        for _ in range(6):
            m(x)
            draws.append(m.last_mask)
        assert any(not torch.equal(draws[0], d) for d in draws[1:])  # sampled in training
        assert all((d.sum(-1) == 3).all() for d in draws)


def test_silent_columns_do_not_contribute():
    model = core(layers=1)
    columns(model, columns=4, active=1)
    m = model.blocks[0].mlp
    m.eval()
    x = torch.randn(2, 5, 32)
    out = m(x)
    winners = m.last_mask
    width = m.fc.out_features // 4
    with torch.no_grad():  # wipe every column no token chose
        for c in range(4):
            if winners[..., c].sum() == 0:
                m.fc.weight[c * width:(c + 1) * width] = 0
                m.proj.weight[:, c * width:(c + 1) * width] = 100.0
    assert torch.allclose(m(x), out)


def test_sparsity_setting_and_validation():
    assert CorticalColumns.Settings(columns=8, sparsity=0.75).k == 2
    assert CorticalColumns.Settings(columns=8).k == 1
    with pytest.raises(ValidationError, match="not both"):
        CorticalColumns.Settings(columns=8, active=2, sparsity=0.5)
    with pytest.raises(ValidationError, match="more than columns"):
        CorticalColumns.Settings(columns=4, active=5)
    with pytest.raises(ValueError, match="not divisible"):
        columns(core(), columns=5)


def biased_columns(balance: float, steps: int = 200):
    """One ColumnMLP whose router makes column 0 win every token, run for ``steps`` steps."""
    model = core(layers=1)
    rule = columns(model, columns=4, active=1, balance=balance)
    m = model.blocks[0].mlp
    with torch.no_grad():
        m.router.weight[0] += 0.05
    x = torch.randn(8, 16, 32) + 1.0
    m.train()
    first = None
    for step in range(steps):
        m(x)
        rule.step_end(None, step, {})
        if first is None:
            first = rule.usage["blocks.0.mlp"].clone()
    m.eval()
    m(x)
    return rule, first, m.last_mask.reshape(-1, 4).mean(0)


def test_boost_spreads_usage_and_stats_report_active_columns():
    rule, first, late = biased_columns(balance=0.05)
    assert first[0] > 0.9
    assert late.max() < 0.5 and late.min() > 0.1, late  # every column now gets a share of the tokens
    _, _, unbalanced = biased_columns(balance=0.0)
    assert unbalanced[0] > 0.9  # without the boost column 0 keeps winning
    stats = rule.stats()
    assert stats["k"] == 1 and stats["active_per_token"] == pytest.approx(1.0)
    assert len(stats["usage"]) == 4 and sum(stats["usage"]) == pytest.approx(1.0)
