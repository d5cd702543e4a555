"""Hebbian plasticity: Oja's rule finds the first principal component, Sanger's the leading ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cortex.kernel.interfaces import BuildContext
from cortex_plugins.plasticity.hebbian import HebbianRule


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def correlated_gaussian(d: int = 8, seed: int = 0):
    """A sampler of zero-mean Gaussian vectors with a random covariance, and its eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    cov = a @ a.T + torch.diag(torch.linspace(3.0, 0.1, d))
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    chol = torch.linalg.cholesky(cov)
    assert evals[-1] > 1.3 * evals[-2] > 1.3 * evals[-3]  # well separated components
    return (lambda n: torch.randn(n, d, generator=g) @ chol.T), evecs.flip(1), evals.flip(0)


def attached(rule_settings: dict, out: int, d: int = 8, **layer):
    torch.manual_seed(1)
    layer = nn.Linear(d, out, bias=False, **layer)
    root = nn.Sequential(layer)
    rule = HebbianRule(HebbianRule.Settings(**rule_settings), BuildContext(), target="0")
    rule.attach(root)
    return root, layer, rule


def run(root, rule, sample, steps: int, batch: int = 64):
    for step in range(steps):
        root(sample(batch))
        rule.step_end(None, step, {})


def test_oja_converges_to_the_first_principal_component():
    sample, pcs, _ = correlated_gaussian()
    root, layer, rule = attached({"lr": 0.002}, out=1)
    start = F.cosine_similarity(layer.weight[0], pcs[:, 0], dim=0).abs()
    run(root, rule, sample, 400)
    w = layer.weight.detach()[0]
    cosine = F.cosine_similarity(w, pcs[:, 0], dim=0).abs()
    assert start < 0.9 and cosine >= 0.99, (float(start), float(cosine))
    assert abs(float(w.norm()) - 1.0) < 0.02  # Oja's decay term normalises the weights
    assert rule.updates == 400 and rule.stats()["updates"] == 400


def test_sanger_rows_find_the_leading_components_in_order():
    sample, pcs, _ = correlated_gaussian(seed=3)
    root, layer, rule = attached({"lr": 0.002, "rule": "sanger"}, out=2)
    run(root, rule, sample, 800)
    w = layer.weight.detach()
    for i in range(2):
        assert F.cosine_similarity(w[i], pcs[:, i], dim=0).abs() >= 0.98, i


def test_norm_initial_keeps_row_norms_and_max_norm_bounds_them():
    sample, pcs, _ = correlated_gaussian()
    root, layer, rule = attached({"lr": 0.002, "norm": "initial"}, out=3)
    before = layer.weight.detach().norm(dim=1).clone()
    run(root, rule, sample, 300)
    after = layer.weight.detach().norm(dim=1)
    assert torch.allclose(after, before, rtol=0.05)
    cos = F.cosine_similarity(layer.weight.detach(), pcs[:, :1].T, dim=1).abs()
    assert (cos > 0.95).all()  # rotated toward the component without changing scale

    root, layer, rule = attached({"lr": 0.002, "norm": 4.0, "max_norm": 0.5}, out=2)
    run(root, rule, sample, 50)
    assert (layer.weight.detach().norm(dim=1) <= 0.5 + 1e-5).all()


def test_learning_rate_warms_up_and_only_training_passes_are_observed():
    root, layer, rule = attached({"lr": 0.01, "warmup": 4}, out=1)
    assert [rule.lr_at(s) for s in range(5)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])
    before = layer.weight.detach().clone()
    root.eval()
    root(torch.randn(16, 8))  # evaluation and generation never feed a rule
    rule.step_end(None, 0, {})
    assert torch.equal(layer.weight, before) and rule.updates == 0
    root.train()
    root(torch.randn(16, 8))
    rule.step_end(None, 0, {})
    assert not torch.equal(layer.weight, before) and rule.updates == 1


def test_hebbian_needs_linear_targets():
    rule = HebbianRule(HebbianRule.Settings(), BuildContext(), target="*")
    with pytest.raises(ValueError, match="nn.Linear"):
        rule.attach(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
