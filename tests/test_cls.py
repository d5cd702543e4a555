"""cls: parameter groups at their learning rates, a fact taught in chat lands in the fast
path at once, the core keeps `slow_share` of training updates, consolidation moves the
fast path into the core, and the fast path is saved with the run."""

from __future__ import annotations

import pytest
import torch

from cortex.runtime.rundir import load_run, save_run
from cortex.runtime.step import make_optimizer, train_step
from cortex_plugins.cognition.cls import ComplementaryLearning
from tests.conftest import tiny_manifest


def manifest(**cls) -> str:
    """The tiny model; with settings, the cls feature with them."""
    return tiny_manifest("cls", context=64, features=[{"type": "cls", "settings": cls}] if cls else None)


RATES = {"width": 16, "fast_lr": 1.0e-2, "slow_lr": 1.0e-4}
BASE = manifest()
CLS = manifest(**RATES, interaction_steps=3)
FACT = "Mina's locker number is 3817."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cls_of(model) -> ComplementaryLearning:
    return next(f for f in model.features if isinstance(f, ComplementaryLearning))


def logp(model, text: str) -> float:
    """Mean log-probability per token of ``text`` under the model (weights only)."""
    ids = torch.tensor([model.tokenizer.encode(text)])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    return -float(loss)


def test_parameter_groups_get_the_configured_learning_rates(build_model):
    model = build_model(manifest(**RATES, consolidation_steps=1)).eval()
    cls = cls_of(model)
    fast, slow = cls.group("fast"), cls.group("slow")
    assert fast["lr"] == 1e-2 and slow["lr"] == 1e-4
    assert {id(p) for p in fast["params"]} == {id(p) for p in cls.adapters.parameters()}
    assert {id(p) for p in slow["params"]} == {id(p) for p in model.core.parameters()}
    assert not {id(p) for p in cls.adapters.parameters()} & {id(p) for p in model.core.parameters()}

    # the applied update sizes: Adam's first step moves each parameter by ~lr
    B = [a.B.detach().clone() for a in cls.adapters.values()]
    core = [p.detach().clone() for p in model.core.parameters()]
    cls.learn_text(model, FACT, steps=1)
    step = max(float((a.B.detach() - b).abs().max()) for a, b in zip(cls.adapters.values(), B))
    assert 0.9e-2 < step <= 1.001e-2
    assert all(torch.equal(p, q) for p, q in zip(model.core.parameters(), core))  # chat leaves the core alone
    cls.recent.append(FACT)  # what consolidation replays when there is no sleep_wake
    cls.consolidate(model)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.core.parameters(), core))
    assert 0.9e-4 < moved <= 1.001e-4


def test_a_fact_told_in_chat_is_more_probable_with_cls_than_without(build_model):
    torch.manual_seed(0)
    plain = build_model(BASE).eval()
    torch.manual_seed(0)
    fast = build_model(CLS, name="cls.yaml").eval()
    before = logp(plain, FACT)
    assert abs(logp(fast, FACT) - before) < 1e-5  # a new fast path changes nothing
    plain.interact(FACT, max_new_tokens=2)
    fast.interact(FACT, max_new_tokens=2)
    assert logp(plain, FACT) == before  # no memory, no cls: nothing learned
    # +0.3 nats per token is 1.35x the probability of every token (an untrained model's tiny
    # embeddings cap what any path can add; the measured gain is ~0.4)
    assert logp(fast, FACT) > before + 0.3, (before, logp(fast, FACT))
    assert cls_of(fast).counters["turns"] == 1 and cls_of(fast).fast_norm() > 0


def test_training_steps_update_the_fast_path_and_the_core_keeps_its_share(build_model):
    def one_step(share: float):
        torch.manual_seed(0)
        model = build_model(manifest(**RATES, slow_share=share), name=f"s{share}.yaml")
        before = [p.detach().clone() for p in model.core.parameters()]
        opt = make_optimizer(model, 1e-3)
        batch = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
        metrics = train_step(model, opt, [batch], step=0, hook=model.pm.hook)
        assert all(p.grad is None for p in cls_of(model).fast_params)
        return metrics, [p.detach() - b for p, b in zip(model.core.parameters(), before)]

    full_metrics, full = one_step(1.0)
    half_metrics, half = one_step(0.5)
    assert full_metrics["cls/fast_norm"] > 0
    for a, b in zip(full, half):
        torch.testing.assert_close(b, 0.5 * a)


def test_consolidation_moves_the_fast_path_into_the_core(build_model):
    torch.manual_seed(0)
    model = build_model(manifest(width=16, fast_lr=1.0e-2, interaction_steps=10, consolidation_steps=60, keep=0.0,
                                 slow_lr=3.0e-3, replay_batch=2)).eval()
    cls = cls_of(model)
    before = logp(model, FACT)
    model.interact(FACT, max_new_tokens=2)
    taught = logp(model, FACT)
    assert taught > before + 0.3
    model.pm.hook.cortex_sleep(model=model, phase="nrem", step=0)
    assert cls.fast_norm() == 0.0 and cls.counters["consolidations"] == 1
    after = logp(model, FACT)  # the core alone now
    assert after - before > 0.5 * (taught - before), (before, taught, after)


def test_the_fast_path_is_saved_with_the_run(build_model, tmp_path):
    torch.manual_seed(0)
    model = build_model(CLS).eval()
    model.interact(FACT, max_new_tokens=2)
    again = load_run(save_run(model, tmp_path)).eval()
    assert abs(logp(again, FACT) - logp(model, FACT)) < 1e-6
    assert cls_of(again).counters == cls_of(model).counters
