"""Homeostasis: a population firing at 5x the target rate is brought to the target."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from cortex.kernel.interfaces import BuildContext, firing_rate
from cortex_plugins.plasticity.homeostasis import Homeostasis


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def population(bias: float = 0.0, **settings):
    torch.manual_seed(0)
    layer = nn.Linear(16, 64)
    nn.init.normal_(layer.weight, 0.0, 0.25)
    nn.init.constant_(layer.bias, bias)
    root = nn.Sequential(layer)
    rule = Homeostasis(Homeostasis.Settings(**settings), BuildContext(), target="0")
    rule.attach(root)
    return root, rule


def train(root, rule, steps: int, batch: int = 1024) -> None:
    root.train()
    for step in range(steps):
        root(torch.randn(batch, 16))
        rule.step_end(None, step, {})


def rates(root, threshold: float = 0.0) -> torch.Tensor:
    root.eval()
    with torch.no_grad():
        return firing_rate(root(torch.randn(8192, 16)), threshold)


def test_population_at_five_times_the_target_rate_converges_to_it():
    root, rule = population()
    start = rates(root)
    assert float(start.mean()) == pytest.approx(0.5, abs=0.03)  # 5x the default target 0.1
    train(root, rule, 100)
    end = rates(root)  # measured in evaluation: the adjustment is part of the model
    assert float(end.mean()) == pytest.approx(0.1, rel=0.1)
    assert float(((end - 0.1).abs() <= 0.01).float().mean()) >= 0.9  # nearly every unit, not just the mean
    stats = rule.stats()
    assert stats["updates"] == 100 and stats["rate"] == pytest.approx(0.1, rel=0.15)


def test_gain_mode_scales_units_toward_the_target():
    root, rule = population(bias=2.0, mode="gain", threshold=2.0)
    assert float(rates(root, 2.0).mean()) == pytest.approx(0.5, abs=0.05)
    train(root, rule, 150)
    assert float(rates(root, 2.0).mean()) == pytest.approx(0.1, rel=0.1)
    assert (rule.gain["0"] < 1).all()  # firing too often: every gain went down
    with pytest.raises(ValidationError, match="threshold > 0"):
        Homeostasis.Settings(mode="gain")


def test_no_updates_outside_training_and_the_optimiser_cannot_undo_the_control():
    root, rule = population()
    train(root, rule, 20)
    shift = rule.shift["0"].clone()
    root.eval()
    root(torch.randn(64, 16))
    rule.step_end(None, 20, {})
    assert torch.equal(rule.shift["0"], shift)  # evaluation does not feed the controller
    assert not any(p is rule.shift["0"] for p in root.parameters())  # a buffer of the rule
    metrics: dict[str, float] = {}
    root.train()
    root(torch.randn(64, 16))
    rule.step_end(None, 21, metrics)
    assert metrics[f"{rule.key}.rate"] == pytest.approx(0.1, abs=0.05)
