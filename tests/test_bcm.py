"""BCM: the sliding threshold tracks E[y^2] and the unit becomes selective to one pattern."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cortex.kernel.interfaces import BuildContext
from cortex_plugins.plasticity.bcm import BCMRule


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def two_patterns(d: int = 10) -> torch.Tensor:
    """Two overlapping, unit-norm, non-negative input patterns (rows)."""
    p = torch.zeros(2, d)
    p[0, :6] = 1.0
    p[1, 4:] = 1.0
    return p / p.norm(dim=1, keepdim=True)


def unit(seed: int, **settings):
    torch.manual_seed(seed)
    layer = nn.Linear(10, 1, bias=False)
    nn.init.uniform_(layer.weight, 0.0, 0.5)  # responds to both patterns at first
    root = nn.Sequential(layer)
    rule = BCMRule(BCMRule.Settings(**settings), BuildContext(), target="0")
    rule.attach(root)
    return root, layer, rule


def present(root, rule, patterns, steps, *, batch=128, noise=0.02, first=0, scale=1.0):
    for step in range(first, first + steps):
        x = patterns[torch.randint(0, len(patterns), (batch,))] + noise * torch.randn(batch, patterns.shape[1])
        root(scale * x)
        rule.step_end(None, step, {})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_becomes_selective_and_theta_tracks_mean_square_response(seed):
    patterns = two_patterns()
    root, layer, rule = unit(seed, lr=0.02, tau=5)
    with torch.no_grad():
        start = layer(patterns).squeeze(1)
    assert (start > 0.2).all()  # not selective to begin with
    present(root, rule, patterns, 1200)
    with torch.no_grad():
        y = layer(patterns).squeeze(1)
    strong, weak = y.abs().max(), y.abs().min()
    assert strong > 1.5 and weak < 0.05 * strong, y.tolist()  # selective to exactly one pattern
    # theta is the sliding threshold: the running mean of y^2 over the inputs (patterns equally likely)
    expected = float(y.square().mean())
    theta = float(rule.theta["0"])
    assert theta == pytest.approx(expected, rel=0.1), (theta, expected)
    # the stable BCM fixed point: the preferred response sits at the threshold, y (y - theta) = 0
    assert float(strong) == pytest.approx(theta, rel=0.1)


def test_theta_follows_a_change_of_activity_with_time_constant_tau():
    patterns = two_patterns()
    root, layer, rule = unit(0, lr=0.0, tau=4, theta_init=0.0)
    with torch.no_grad():
        y2 = float(layer(patterns).square().mean())
    present(root, rule, patterns, 1, noise=0.0, batch=2000)
    assert float(rule.theta["0"]) == pytest.approx(y2 / 4, rel=0.1)  # one step covers 1/tau of the gap
    present(root, rule, patterns, 40, noise=0.0, batch=2000, first=1)
    assert float(rule.theta["0"]) == pytest.approx(y2, rel=0.05)
    present(root, rule, patterns, 40, noise=0.0, batch=2000, first=41, scale=2.0)  # 4x the activity
    assert float(rule.theta["0"]) == pytest.approx(4 * y2, rel=0.05)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_2n_equals_train_n_then_resume_n(tmp_path, precision):
    """Through cortex.runtime.train.train: theta (the rule's state) resumes exactly, also under bf16
    autocast (where theta once stayed bf16 in a straight run but came back float32)."""
    from cortex.runtime.checkpoint import latest_checkpoint
    from cortex.runtime.rundir import load_run
    from cortex.runtime.train import train
    from tests.test_train import manifest_text, new_run, settings, write_corpus

    text = manifest_text(plasticity=[{"type": "bcm", "target": "blocks.0.attn.proj",
                                      "settings": {"lr": 1.0e-3, "tau": 5, "max_norm": 2.0}}])
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    s = settings(checkpoint_every=3, eval_every=3, micro_batch=4, precision=precision)
    n = 3
    straight, run_a = new_run(tmp_path, text, name="a")
    train(straight, run_a, s, data=str(corpus), steps=2 * n)
    first, run_b = new_run(tmp_path, text, name="b")
    train(first, run_b, s, data=str(corpus), steps=2 * n, stop_at=n)
    assert latest_checkpoint(run_b).name == f"step-{n:08d}"
    torch.manual_seed(1234)
    resumed = load_run(run_b)
    train(resumed, run_b, s, data=str(corpus), resume="auto")

    for (name, a), b in zip(straight.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.equal(a, b), name
    ra, rb = straight.plasticity[0], resumed.plasticity[0]
    assert ra.updates == rb.updates == 2 * n
    (theta_a,), (theta_b,) = ra.theta.values(), rb.theta.values()
    assert theta_a.dtype == theta_b.dtype == torch.float32 and torch.equal(theta_a, theta_b)
