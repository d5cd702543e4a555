"""Tests of the training step (cortex.runtime.step)."""

from __future__ import annotations

import copy
import math

import pluggy
import pytest
import torch

import cortex
import cortex.kernel.hookspecs
from cortex.core.transformer import ModelConfig, Transformer
from cortex.runtime.step import cosine_schedule, make_optimizer, set_lr, train_step


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    settings = dict(vocab_size=32, dim=32, layers=2, heads=4, context=32)
    settings.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**settings))


def repeating_batch(batch: int = 4, length: int = 33, period: int = 7) -> torch.Tensor:
    """Rows of a short repeating pattern at different phases: (batch, length)."""
    pattern = torch.tensor([3, 17, 5, 9, 30, 1, 12][:period])
    rows = [pattern.roll(-i).repeat(length // period + 1)[:length] for i in range(batch)]
    return torch.stack(rows)


def random_batch(batch: int, length: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def plugin_manager(*plugins) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("cortex")
    pm.add_hookspecs(cortex.kernel.hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


# ------------------------------------------------------------------------- learning


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_decreases_on_repeating_sequence(precision):
    model = tiny_model()
    optimizer = make_optimizer(model, lr=3e-3)
    batch = repeating_batch()
    losses = [
        train_step(model, optimizer, [batch], step=step, precision=precision)["loss"]
        for step in range(60)
    ]
    assert losses[0] == pytest.approx(math.log(32), abs=0.3)
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_metrics():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    metrics = train_step(model, optimizer, [random_batch(2), random_batch(2, seed=1)], step=0)
    assert set(metrics) == {"loss", "grad_norm", "tokens", "lr", "skipped"}
    assert metrics["tokens"] == 2 * 2 * 16
    assert metrics["lr"] == 1e-3
    assert metrics["skipped"] == 0.0
    assert metrics["grad_norm"] > 0
    assert all(p.grad is None for p in model.parameters())  # zeroed (set to None)


def test_gradient_accumulation_equals_one_big_batch():
    a = tiny_model()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5)
    first, second = random_batch(3, seed=1), random_batch(3, seed=2)
    m_a = train_step(a, opt_a, [first, second], step=0, clip=None)
    m_b = train_step(b, opt_b, [torch.cat([first, second])], step=0, clip=None)
    assert m_a["loss"] == pytest.approx(m_b["loss"], rel=1e-5)
    assert m_a["grad_norm"] == pytest.approx(m_b["grad_norm"], rel=1e-4)
    assert m_a["tokens"] == m_b["tokens"]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    # and the update was not trivial
    fresh = tiny_model()
    assert not torch.allclose(fresh.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)


def test_clipping_limits_the_update():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = train_step(model, optimizer, [random_batch(2)], step=0, clip=1e-3)
    assert metrics["grad_norm"] > 1e-3  # reported before clipping
    moved = torch.sqrt(sum(((p - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    assert moved.item() == pytest.approx(1e-3, rel=1e-3)


def test_non_finite_loss_is_reported_and_update_skipped():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = float("nan")
    before = model.blocks[0].mlp.fc.weight.detach().clone()
    metrics = train_step(model, optimizer, [random_batch(2)], step=0)
    assert math.isnan(metrics["loss"])
    assert metrics["skipped"] == 1.0
    torch.testing.assert_close(model.blocks[0].mlp.fc.weight, before)


def test_invalid_arguments():
    model = tiny_model()
    optimizer = make_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="precision"):
        train_step(model, optimizer, [random_batch(2)], step=0, precision="fp16")
    with pytest.raises(ValueError, match="micro-batch"):
        train_step(model, optimizer, [], step=0)
    with pytest.raises(ValueError, match="micro-batch"):
        train_step(model, optimizer, [torch.zeros(2, 1, dtype=torch.long)], step=0)


# ---------------------------------------------------------------------------- hooks


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @cortex.hookimpl
    def cortex_before_step(self, model, step, batch):
        self.events.append(("before", step, tuple(batch.shape)))

    @cortex.hookimpl
    def cortex_after_step(self, model, step, metrics):
        self.events.append(("after", step, metrics["loss"]))
        metrics["recorder"] = 1.0


class LogitPenalty:
    def __init__(self, name: str = "logit_l2", weight: float = 0.1) -> None:
        self.name = name
        self.weight = weight
        self.calls = 0

    @cortex.hookimpl
    def cortex_extra_losses(self, model, batch, logits):
        self.calls += 1
        return {self.name: self.weight * logits.float().pow(2).mean()}


class Silent:
    @cortex.hookimpl
    def cortex_extra_losses(self, model, batch, logits):
        return None


def test_hooks_are_called_in_order():
    model = tiny_model()
    recorder = Recorder()
    pm = plugin_manager(recorder)
    optimizer = make_optimizer(model, lr=1e-3)
    micro = [random_batch(2, seed=1), random_batch(2, seed=2)]
    metrics = train_step(model, optimizer, micro, step=7, hook=pm.hook)
    assert recorder.events[0] == ("before", 7, (2, 17))  # once per step, first micro-batch
    assert recorder.events[1] == ("after", 7, metrics["loss"])
    assert len(recorder.events) == 2
    assert metrics["recorder"] == 1.0


def test_extra_loss_is_reported_and_changes_gradient():
    base = tiny_model()
    plain, penalised = copy.deepcopy(base), copy.deepcopy(base)
    penalty = LogitPenalty(weight=5.0)
    pm = plugin_manager(penalty, Silent())
    micro = [random_batch(2, seed=1), random_batch(2, seed=2)]

    m_plain = train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), micro, step=0, clip=None)
    m_pen = train_step(
        penalised, torch.optim.SGD(penalised.parameters(), lr=0.1), micro, step=0, hook=pm.hook, clip=None
    )
    assert penalty.calls == 2  # once per micro-batch
    assert "logit_l2" in m_pen and "logit_l2" not in m_plain
    assert m_pen["logit_l2"] > 0
    assert m_pen["loss"] == pytest.approx(m_plain["loss"], rel=1e-6)  # LM loss alone
    assert m_pen["grad_norm"] != pytest.approx(m_plain["grad_norm"], rel=1e-3)
    assert not torch.allclose(plain.tok_emb.weight, penalised.tok_emb.weight)

    # the penalty's gradient is exactly what changed the update
    check = copy.deepcopy(base)
    inputs = [b[:, :-1] for b in micro]
    targets = [b[:, 1:] for b in micro]
    total = 0
    for x, y in zip(inputs, targets):
        logits, loss = check(x, y)
        total = total + (loss + 5.0 * logits.pow(2).mean()) / 2
    total.backward()
    with torch.no_grad():
        for p in check.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(check.parameters(), penalised.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_extra_loss_under_bf16():
    model = tiny_model()
    pm = plugin_manager(LogitPenalty())
    metrics = train_step(model, make_optimizer(model, 1e-3), [random_batch(2)], step=0,
                         hook=pm.hook, precision="bf16")
    assert math.isfinite(metrics["logit_l2"])


def test_duplicate_extra_loss_name_raises():
    model = tiny_model()
    pm = plugin_manager(LogitPenalty("aux"), LogitPenalty("aux"))
    with pytest.raises(ValueError, match="'aux'"):
        train_step(model, make_optimizer(model, 1e-3), [random_batch(2)], step=0, hook=pm.hook)


def test_reserved_extra_loss_name_raises():
    model = tiny_model()
    pm = plugin_manager(LogitPenalty("grad_norm"))
    with pytest.raises(ValueError, match="reserved"):
        train_step(model, make_optimizer(model, 1e-3), [random_batch(2)], step=0, hook=pm.hook)


# ------------------------------------------------------------- optimiser and schedule


def test_make_optimizer_groups():
    model = tiny_model()
    model.set_memory_layer(0, torch.nn.Linear(32, 32))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.2)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert any(p is model.tok_emb.weight for p in decay["params"])
    assert any(p is model.blocks[0].memory.bias for p in no_decay["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_cosine_schedule():
    kw = dict(warmup=10, total=110, lr=1.0, min_lr=0.1)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)
    assert cosine_schedule(9, **kw) == pytest.approx(1.0)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(500, **kw) == pytest.approx(0.1)
    values = [cosine_schedule(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine_schedule(0, warmup=0, total=10, lr=2.0, min_lr=0.0) == pytest.approx(2.0)


def test_a_parameter_with_lr_scale_moves_that_much_faster():
    """A scalar prior marked ``lr_scale = 10`` gets its own group at ten times the rate,
    kept by ``set_lr``: after the same steps it has moved ten times as far (Adam's steps are
    about the learning rate whatever the gradient's size)."""
    model = torch.nn.Module()
    model.plain, model.prior = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    model.prior.lr_scale = 10.0
    optimizer = make_optimizer(model, 1e-3)
    set_lr(optimizer, 2e-3)
    assert sorted(g["lr"] for g in optimizer.param_groups if g["params"]) == pytest.approx([2e-3, 2e-2])
    for _ in range(20):
        optimizer.zero_grad()
        (model.plain + model.prior).sum().backward()
        optimizer.step()
    prior, plain = float(model.prior.detach()), float(model.plain.detach())
    assert prior == pytest.approx(10 * plain, rel=1e-4) and plain < -0.03
