"""Plasticity rules inside a real model: built from a manifest, run by ``train_step``'s hooks,
saved and loaded with the run, synchronised across DDP ranks, and measurably doing their job."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import yaml

import pytest
import torch
import torch.multiprocessing as mp

from cortex.kernel.interfaces import PlasticityRule, firing_rate
from cortex.runtime.rundir import load_run, save_run
from cortex.runtime.step import cosine_schedule, make_optimizer, train_step
from cortex_plugins.data.demo import demo_documents
from cortex_plugins.plasticity._column_mlp import ColumnMLP
from tests.conftest import tiny_manifest


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def manifest(rules: list[dict], context: int = 16) -> str:
    return tiny_manifest("plastic", seed=0, context=context, plasticity=rules)


RULES = {
    "hebbian": {"type": "hebbian", "target": "blocks.0.mlp.fc", "settings": {"lr": 0.05, "norm": "initial"}},
    "bcm": {"type": "bcm", "target": "blocks.1.attn.proj", "settings": {"lr": 0.5, "tau": 5, "max_norm": 0.5}},
    "homeostasis": {"type": "homeostasis", "target": "blocks.*.mlp.fc"},
    "cortical_columns": {"type": "cortical_columns", "target": "blocks.1.mlp",
                         "settings": {"columns": 4, "active": 2, "balance": 0.05}},
}
ALL = [RULES["cortical_columns"], RULES["homeostasis"], RULES["hebbian"], RULES["bcm"]]


def batches(n: int, seed: int = 0, rows: int = 4, length: int = 17) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, length), generator=g) for _ in range(n)]


def steps(model, data, *, lr: float = 0.0, first: int = 0, optimizer=None):
    """``train_step`` with the model's hooks; ``lr=0`` leaves every change to the rules."""
    optimizer = optimizer or make_optimizer(model, lr, weight_decay=0.0)
    model.train()
    out = []
    for i, batch in enumerate(data):
        out.append(train_step(model, optimizer, [batch], step=first + i, hook=model.pm.hook))
    return out


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.core.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {k for k, v in model.core.state_dict().items() if not torch.equal(v, before[k])}


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("rule", ["hebbian", "bcm"])
def test_weight_rules_change_their_targets_and_nothing_else(build_model, rule):
    model = build_model(manifest([RULES[rule]]))
    [built] = model.plasticity
    before = weights(model)
    steps(model, batches(3))
    expected = {"hebbian": {"blocks.0.mlp.fc.weight"}, "bcm": {"blocks.1.attn.proj.weight"}}[rule]
    assert changed(before, model) == expected
    assert built.updates == 3
    if rule == "bcm":
        assert (model.core.blocks[1].attn.proj.weight.norm(dim=1) <= 0.5 + 1e-5).all()  # max_norm
        assert float(built.theta["blocks.1.attn.proj"].mean()) > 0


def test_homeostasis_changes_the_targets_activity_not_the_weights(build_model):
    model = build_model(manifest([RULES["homeostasis"]]))
    [rule] = model.plasticity
    probe = batches(1, seed=9)[0][:, :-1]
    model.eval()
    with torch.no_grad():
        logits_before, _ = model(probe)
    before = weights(model)
    out = steps(model, batches(5))
    assert changed(before, model) == set()  # the rule's controls are not weights
    assert sorted(rule.shift) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    assert all((rule.shift[n] > 0).all() for n in rule.shift)  # units fired too often: thresholds rose
    assert "plasticity.0.homeostasis.rate" in out[-1]
    model.eval()
    with torch.no_grad():
        logits_after, _ = model(probe)
    assert not torch.allclose(logits_before, logits_after)  # evaluation sees the adjusted units


def test_cortical_columns_replace_only_the_targeted_mlps(build_model):
    model = build_model(manifest([RULES["cortical_columns"]]))
    [rule] = model.plasticity
    assert isinstance(model.core.blocks[1].mlp, ColumnMLP)
    assert not isinstance(model.core.blocks[0].mlp, ColumnMLP)
    before = weights(model)
    steps(model, batches(4))
    assert changed(before, model) == set()  # lr 0: only the non-gradient boost moves
    assert not torch.equal(model.core.blocks[1].mlp.boost, torch.zeros(4))
    stats = rule.stats()
    assert stats["active_per_token"] == pytest.approx(2.0) and len(stats["usage"]) == 4
    # the router trains with the rest of the model
    weights_before = weights(model)
    steps(model, batches(1, seed=5), lr=1e-2)
    assert "blocks.1.mlp.router.weight" in changed(weights_before, model)


def test_rules_compose_in_manifest_order_and_only_observers_hook(build_model, monkeypatch):
    plain = build_model(manifest([]))
    assert not any(m._forward_hooks for m in plain.core.modules())  # no rule: nothing hooked

    model = build_model(manifest(ALL))
    order: list[str] = []
    for rule in model.plasticity:
        real = rule.step_end
        monkeypatch.setattr(rule, "step_end", lambda m, s, x, real=real, key=rule.key: (order.append(key), real(m, s, x)))
    hooked = sorted(n for n, m in model.core.named_modules() if m._forward_hooks)
    # homeostasis on both fc layers, hebbian on blocks.0.mlp.fc (columns swap modules, no hooks)
    assert hooked == ["blocks.0.mlp.fc", "blocks.1.attn.proj", "blocks.1.mlp.fc"]  # + bcm's attn.proj
    assert len(model.core.blocks[0].mlp.fc._forward_hooks) == 2
    steps(model, batches(2))
    keys = [r.key for r in model.plasticity]
    assert keys == ["plasticity.0.cortical_columns", "plasticity.1.homeostasis", "plasticity.2.hebbian",
                    "plasticity.3.bcm"]
    assert order == keys + keys  # each step, every rule once, in manifest order


def test_rule_state_round_trips_through_a_run_and_continues_exactly(build_model, tmp_path):
    model = build_model(manifest(ALL))
    steps(model, batches(3))
    state = model.plugin_state()
    assert set(state) == {r.key for r in model.plasticity}
    run = save_run(model, tmp_path / "runs")
    loaded = load_run(run)
    assert tensors_equal(loaded.plugin_state(), state)
    assert tensors_equal(weights(loaded), weights(model))
    for m in (model, loaded):
        steps(m, batches(2, seed=3), first=3)
    assert tensors_equal(loaded.plugin_state(), model.plugin_state())
    assert tensors_equal(weights(loaded), weights(model))


def test_every_manifest_fragment_in_the_docs_builds(build_model):
    page = Path(__file__).resolve().parent.parent / "docs" / "concepts" / "plasticity.md"
    blocks = re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        data = yaml.safe_load(block)
        if "cortex" not in data:  # a fragment: give it a tiny model
            data = {**yaml.safe_load(tiny_manifest("doc", context=16)), **data}
        data["model"] = {**data["model"], "dim": 32, "heads": 2}  # keep it fast
        model = build_model(yaml.safe_dump(data), name=f"doc{i}.yaml")
        assert model.plasticity and all(r.targets for r in model.plasticity)
        steps(model, batches(1))


# ------------------------------------------------------------------ training with homeostasis


def corpus(tokenizer, documents: int) -> torch.Tensor:
    ids: list[int] = []
    for doc in demo_documents(documents, seed=0, korean=0.0):
        ids += tokenizer.encode(doc.text) + [tokenizer.eos_id]
    return torch.tensor(ids)


def fc_rates(model, data: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean firing rate of each block's ``mlp.fc`` units (as the model uses them) and the loss."""
    seen: list[torch.Tensor] = []
    hooks = [b.mlp.fc.register_forward_hook(lambda m, i, o: seen.append(firing_rate(o)))
             for b in model.core.blocks]
    model.eval()
    with torch.no_grad():
        _, loss = model(data[:, :-1], data[:, 1:])
    for h in hooks:
        h.remove()
    return torch.stack([s.mean() for s in seen]), float(loss)


def test_training_with_homeostasis_holds_the_units_at_the_target_rate(build_model):
    results = {}
    for on in (True, False):
        model = build_model(manifest([RULES["homeostasis"]] if on else [], context=32), name=f"m{on}.yaml")
        data = corpus(model.tokenizer, 400)
        val, train = data[-64 * 33:].view(64, 33), data[: -64 * 33]
        g = torch.Generator().manual_seed(0)
        optimizer = make_optimizer(model, 3e-3, weight_decay=0.0)
        start = fc_rates(model, val)[0]
        for step in range(150):
            lr = cosine_schedule(step, warmup=10, total=150, lr=3e-3, min_lr=3e-4)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = torch.randint(0, len(train) - 33, (16,), generator=g)
            steps(model, [torch.stack([train[r:r + 33] for r in rows])], first=step, optimizer=optimizer)
        results[on] = (start, *fc_rates(model, val))
    (start, rates_on, loss_on), (_, rates_off, loss_off) = results[True], results[False]
    assert (start > 0.35).all()  # a fresh model's fc units fire on about half the tokens
    print(f"fc rates: start {start.tolist()}, with homeostasis {rates_on.tolist()} (val loss {loss_on:.3f}), "
          f"without {rates_off.tolist()} (val loss {loss_off:.3f})")
    assert float(rates_on.mean()) == pytest.approx(0.1, rel=0.1), rates_on  # held at the target
    assert (rates_on - 0.1).abs().max() < 0.02, rates_on  # in every block
    assert (rates_off > 0.3).all(), rates_off  # without the rule they stay far from it
    assert loss_on < 1.05 * loss_off, (loss_on, loss_off)  # and the model learns as well


# ------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, text: str, out: str) -> None:
    from cortex.runtime import distributed
    from cortex.assembly import assemble
    from cortex.kernel.manifest import load_manifest_text

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    model = assemble(load_manifest_text(text))
    data = [b[rank * 2:(rank + 1) * 2] for b in batches(3, rows=4)]  # each rank its own rows
    steps(model, data)
    torch.save({"weights": weights(model), "state": model.plugin_state()}, Path(out) / f"rank{rank}.pt")
    distributed.destroy()
    os._exit(0)  # no C++ static destructors at exit: see tests/test_ddp.py::_rank


def test_rules_stay_identical_across_ddp_ranks(build_model, tmp_path):
    text = manifest(ALL)
    single = build_model(text)
    steps(single, batches(3, rows=4))  # one process with the whole batch
    # fork: the ranks inherit every module imported so far (the optimiser's imports take seconds)
    mp.start_processes(_rank, args=(2, _free_port(), text, str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert tensors_equal(r0["weights"], r1["weights"])  # the ranks saw different data, yet never drift
    assert tensors_equal(r0["state"], r1["state"])
    # ... and they made the same updates as one process with the whole batch
    for name, value in weights(single).items():
        assert torch.allclose(r0["weights"][name], value, atol=1e-5), name
    assert not tensors_equal(r0["weights"], weights(build_model(text, name="fresh.yaml")))
