"""Shared test helpers: the tiny manifest most tests build, and small but real components
registered through fake distributions."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from pydantic import Field

import yaml

from cortex import hookimpl
from cortex.kernel.interfaces import CognitiveFeature, Entries, MemoryTier, PlasticityRule, Retrieval, Settings


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads stall badly
    when another process holds a core; restore the caller's setting afterwards. Modules of
    tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_faiss_thread():
    """One FAISS (OpenMP) thread: small indexes are faster and steadier on a shared machine.
    Used with ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _flow(value: Any) -> str:
    """``value`` as one line of flow-style YAML (keys in the order given)."""
    return yaml.safe_dump([value], default_flow_style=True, sort_keys=False, width=float("inf")).strip()[1:-1]


def tiny_manifest(
    name: str = "tiny",
    *,
    dim: int = 32,
    layers: int = 2,
    heads: int = 2,
    context: int = 32,
    seed: int | None = None,
    tokenizer: dict[str, Any] | None = None,
    memory: list[Any] | None = None,
    memory_system: dict[str, Any] | None = None,
    plasticity: list[Any] | None = None,
    features: list[Any] | None = None,
    train: dict[str, Any] | None = None,
    **model: Any,
) -> str:
    """The YAML text of a tiny model: build it with the ``build_model`` fixture, write it to a
    file for the CLI, or validate it with ``load_manifest_text``.

    Further keyword arguments are more ``model:`` keys (``memory_layers=[1]``, ``dropout=0.1``).
    Component lists take dicts (``{"type": "stm", "settings": {"capacity": 8}}``) or bare type
    names. Each section is one flow-style line, components one line each, in the manifest's
    usual order::

        cortex: 1
        name: tiny
        model: {dim: 32, layers: 2, heads: 2, context: 32}
    """
    lines = ["cortex: 1", f"name: {_flow(name)}"]
    if seed is not None:
        lines.append(f"seed: {seed}")
    lines.append(f"model: {_flow({'dim': dim, 'layers': layers, 'heads': heads, 'context': context, **model})}")
    if tokenizer is not None:
        lines.append(f"tokenizer: {_flow(tokenizer)}")
    for key, value in (("memory", memory), ("memory_system", memory_system), ("plasticity", plasticity),
                       ("features", features), ("train", train)):
        if value is None:
            continue
        if isinstance(value, dict) or not value:
            lines.append(f"{key}: {_flow(value)}")
        else:
            lines.append(f"{key}:")
            lines += [f"  - {_flow({'type': c} if isinstance(c, str) else c)}" for c in value]
    return "\n".join(lines) + "\n"


class ExactTier(MemoryTier):
    """An exact FIFO key-value buffer: enough to exercise the kernel's tier plumbing."""

    name = "exact"

    class Settings(Settings):
        capacity: int = Field(64, gt=0)
        temperature: float = Field(1.0, gt=0)

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.keys = torch.zeros(0, context.config.dim)
        self.values = torch.zeros(0, context.config.dim)

    def write(self, entries: Entries, *, step=0):
        self.keys = torch.cat([self.keys, entries.keys])[-self.capacity:]
        self.values = torch.cat([self.values, entries.values])[-self.capacity:]

    def read(self, queries, k, *, stream=0, step=0, touch=True):
        scores = queries @ self.keys.T
        top = scores.topk(min(k, len(self)), dim=-1)
        return Retrieval(self.values[top.indices], torch.full_like(top.indices, -1), top.values, top.indices)

    def clear(self, stream=None):
        self.keys, self.values = self.keys[:0], self.values[:0]

    def __len__(self):
        return len(self.keys)

    def state_dict(self):
        return {"keys": self.keys, "values": self.values, "writes": len(self)}

    def load_state_dict(self, state):
        self.keys, self.values = state["keys"], state["values"]


class ScaleRule(PlasticityRule):
    """Multiplies target weights by a factor at each step end (observable, non-gradient)."""

    name = "scale"

    class Settings(Settings):
        factor: float = Field(0.5, gt=0)

    def __init__(self, settings, context, target="*"):
        super().__init__(settings, context, target)
        self.seen = 0

    def observe(self, name, module, inputs, output):
        self.seen += 1

    def apply(self, name, module):
        module.weight.mul_(self.settings.factor)


class Counter(CognitiveFeature):
    """Counts lifecycle events."""

    name = "counter"

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.events: list[str] = []

    @hookimpl
    def cortex_model_built(self, model):
        self.events.append("built")

    @hookimpl
    def cortex_after_step(self, model, step, metrics):
        self.events.append(f"step{step}")


def make_plugin(*classes):
    """A plugin module registering ``classes``."""
    module = types.ModuleType("test_plugin")

    @hookimpl
    def cortex_register_components(register):
        for cls in classes:
            register(cls)

    module.cortex_register_components = cortex_register_components
    return module


@pytest.fixture
def test_components(fake_distribution):
    """A third-party distribution ``test-components`` providing ``test.exact``, ``test.scale``
    and ``test.counter``."""
    fake_distribution("test-components", {"test": make_plugin(ExactTier, ScaleRule, Counter)})


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped, the reason shown (``-rs``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "scripts/gpu-check runs the gpu tests on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
