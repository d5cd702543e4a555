"""Working memory: task-gated slots read and written inside the model's forward pass."""

from __future__ import annotations

import pytest
import torch

from cortex.kernel.errors import CortexError
from cortex_plugins.memory._working_layer import WorkingMemoryLayer
from tests.conftest import tiny_manifest


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def build(build_model, name="m.yaml", **settings):
    torch.manual_seed(0)
    model = build_model(tiny_manifest("wm", features=[{"type": "working", "settings": settings}]), name=name)
    return model.eval(), model.features[0]


class Items:
    """Random token sequences with distinct last tokens (an untrained model's last hidden
    state is dominated by the last token)."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.last = iter(torch.randperm(256, generator=self.g).tolist())

    def __call__(self, n: int) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            x = torch.randint(0, 256, (1, 8), generator=self.g)
            x[0, -1] = next(self.last)
            out.append(x)
        return out


def write(model, wm, task: str, items: list[torch.Tensor]) -> list[int]:
    """Each item is written by a forward pass of the model under ``task``."""
    wm.set_task(task)
    tags = []
    for x in items:
        model.core(x)
        tags.append(wm.written[0][2])
    return tags


def accuracy(model, wm, task: str, items: list[torch.Tensor], tags: list[int]) -> float:
    """Share of ``task``'s items whose own slot the forward pass attends to most when the
    item is seen again (reads only)."""
    wm.set_task(task)
    hits = 0
    with wm.frozen():
        for x, tag in zip(items, tags):
            model.core(x)
            slot = int(wm.layer.last_attention[0, -1].argmax())
            hits += int(wm.state[0]["tags"][slot]) == tag
    return hits / len(items)


def alternate(model, wm, rounds: int = 3) -> list[tuple[float, float]]:
    """Rounds of: task A writes 4 items, then task B writes 6; A's accuracy before and after B."""
    items = Items()
    out = []
    for _ in range(rounds):
        a = items(4)
        tags = write(model, wm, "A", a)
        before = accuracy(model, wm, "A", a, tags)
        write(model, wm, "B", items(6))
        out.append((before, accuracy(model, wm, "A", a, tags)))
    return out


def test_gates_keep_task_a_intact_while_b_writes_and_without_gates_b_interferes(build_model):
    """Acceptance: with gates A's accuracy is unchanged by B's writes; without, it drops."""
    model, wm = build(build_model, slots=8, tasks=2, gated=True)
    gated = alternate(model, wm)
    ungated = alternate(*build(build_model, name="u.yaml", slots=8, tasks=2, gated=False))
    print(f"task A accuracy (before, after B writes) per round: gated {gated}, ungated {ungated}")
    for before, after in gated:
        assert before == after == 1.0
    for before, after in ungated:
        assert before == 1.0 and after <= 0.5  # B's writes evicted A's items
    # what protects A: gated, each task wrote only into its own half of the slots
    assert wm.contents(0)["owner"] == [0] * 4 + [1] * 4


def test_reads_and_writes_happen_in_the_forward_pass_per_stream(build_model):
    model, wm = build(build_model, slots=4, tasks=1)
    layer = model.core.memory_layer(wm.layer_index)
    assert isinstance(layer, WorkingMemoryLayer) and wm.layer_index == 1  # the middle block
    x = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    empty, _ = model.core(x)  # reads nothing, then writes one item per row
    assert [s for s, _, _ in wm.written] == [0, 1] and len(wm.state) == 2
    full, _ = model.core(x)
    assert not torch.allclose(empty, full)  # the written slots are read in the next pass
    assert wm.layer.last_attention.shape == (2, 8, 4)
    # streams are isolated: row 1's slots hold only what row 1 wrote
    with wm.frozen(), wm.streams([5, 1]):
        model.core(x)
    assert float(wm.layer.last_attention[0].sum()) == 0.0  # stream 5 is empty
    wm.clear()
    again, _ = model.core(x)
    assert torch.allclose(again, empty, atol=1e-6)
    # prompts are written, single generated tokens (shorter than min_tokens) are not
    wm.clear()
    model.core.generate(x[:1], 5, temperature=0.0)
    assert wm.counters["writes"] == 2 + 2 + 2 + 1


def test_tasks_switch_clear_and_run_out(build_model):
    model, wm = build(build_model, slots=6, tasks=3)
    assert wm.task == "default"
    write(model, wm, "A", Items()(2))
    write(model, wm, "B", Items(1)(2))
    assert wm.tasks == ["default", "A", "B"]
    write(model, wm, "C", Items(2)(1))  # every gate taken: C takes the gate of "default", which holds nothing
    assert wm.tasks == ["C", "A", "B"]
    assert wm.contents(0)["owner"] == [0, -1, 1, 1, 2, 2]  # each task in its own slots
    with pytest.raises(CortexError, match="3 task gates"):
        wm.set_task("D")
    wm.clear(task="B")
    assert wm.contents(0)["owner"] == [0, -1, 1, 1, -1, -1]
    wm.set_task("D")  # B holds nothing now: D takes its gate
    assert wm.tasks == ["C", "A", "D"]
    wm.set_task("A", clear=True)
    assert wm.contents(0)["owner"] == [0, -1, -1, -1, -1, -1]


def test_working_memory_chains_the_memory_systems_reader_and_trains(build_model):
    torch.manual_seed(0)
    model = build_model(tiny_manifest("wm", memory_layers=[0], memory=[{"type": "stm", "settings": {"capacity": 32}}],
                                      memory_system={"read": ["knn_attention"]}, features=["working"]))
    wm = model.features[0]
    layer = model.core.memory_layer(0)
    assert wm.layer_index == 0 and isinstance(layer, WorkingMemoryLayer)
    assert layer.inner is model.memory_system.readers[0]  # wrapped, not replaced
    model.train()
    x = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    assert len(model.memory[0]) > 0 and len(wm.state) == 2  # both memories were written
    assert layer.query.weight.grad is not None and layer.task_gates.grad is not None
    assert layer.inner.query.weight.grad is not None


def test_slots_and_tasks_survive_save_and_load(build_model, tmp_path):
    from cortex.runtime.rundir import load_run, save_run

    model, wm = build(build_model, slots=4, tasks=2, task="A")
    items = Items()(2)
    tags = write(model, wm, "A", items)
    write(model, wm, "B", Items(3)(1))
    loaded = load_run(save_run(model, tmp_path / "runs")).eval()
    lw = loaded.features[0]
    assert lw.tasks == ["A", "B"] and lw.task == "B" and lw.contents(0) == wm.contents(0)
    assert accuracy(loaded, lw, "A", items, tags) == 1.0
    x = torch.randint(0, 256, (1, 8))
    wm.set_task("A")
    with wm.frozen(), lw.frozen():
        assert torch.allclose(model.core(x)[0], loaded.core(x)[0], atol=1e-6)


def test_settings_are_checked(build_model):
    with pytest.raises(CortexError, match="tasks"):
        build(build_model, slots=2, tasks=3)
    with pytest.raises(CortexError, match="layer"):
        build(build_model, name="l.yaml", layer=5)
