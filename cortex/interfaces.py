"""The component interfaces: memory tiers, plasticity rules, cognitive features, data sources.

Every component is a class with a ``kind``, a ``name`` and a pydantic ``Settings`` model
(unknown keys rejected), constructed as ``cls(settings, context)``. Built instances are
registered on the model's plugin manager, so their ``@hookimpl`` methods take part in the
lifecycle.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from cortex.hookspecs import hookimpl

if TYPE_CHECKING:
    from cortex.assemble import CortexModel
    from cortex.model import ModelConfig
    from cortex.tokenizer import Tokenizer


KINDS = ("memory", "plasticity", "feature", "data", "bench")


class Settings(BaseModel):
    """Base of every component's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class BuildContext:
    """What a component may know about the model it is built into."""

    model: ModelConfig | None = None
    tokenizer: Tokenizer | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    run_dir: Path | None = None


class Component:
    """Base of all components. Subclasses set ``kind``, ``name`` and ``Settings``."""

    kind: ClassVar[str]
    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings

    def __init__(self, settings: Settings, context: BuildContext) -> None:
        self.settings = settings
        self.context = context
        #: unique key of this instance in a model, e.g. ``memory.0.stm``; set by assembly
        self.key = self.name

    def stats(self) -> dict[str, Any]:
        """Figures worth showing in summaries and logs."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-compatible values that must survive save and load."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what [`state_dict`][cortex.interfaces.Component.state_dict] returned."""

    @hookimpl
    def cortex_state_save(self, model: CortexModel) -> dict[str, Any] | None:
        state = self.state_dict()
        return {self.key: state} if state else None

    @hookimpl
    def cortex_state_load(self, model: CortexModel, state: dict[str, Any]) -> None:
        if self.key in state:
            self.load_state_dict(state[self.key])


@dataclass
class Entries:
    """A batch of ``N`` memory entries moving into, between or out of tiers.

    ``keys`` are what queries are compared with (cosine similarity: tiers normalise);
    ``values`` are the vectors kNN-attention mixes in; ``tokens`` the token that followed
    the key's position (kNN-LM's value, -1 if none); ``streams`` the stream each entry
    belongs to (a batch row in training, a session at inference); ``uses`` how often it
    was strengthened or retrieved; ``steps`` the step it was last written or used.
    """

    keys: torch.Tensor  # (N, key_dim) float32
    values: torch.Tensor  # (N, value_dim) float32
    tokens: torch.Tensor  # (N,) int64
    streams: torch.Tensor  # (N,) int64
    uses: torch.Tensor | None = None  # (N,) int64, zeros when None
    steps: torch.Tensor | None = None  # (N,) int64, the writing step when None
    meta: list[dict[str, Any]] | None = None  # e.g. {"text": "...", "span": [a, b]}

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass
class Retrieval:
    """The top-``k`` result of a memory read for ``Q`` queries.

    Slots with no entry (fewer than ``k`` stored) have ``ids == -1``, ``scores == -inf``,
    zero ``values`` and ``tokens == -1``.
    """

    values: torch.Tensor  # (Q, k, value_dim)
    tokens: torch.Tensor  # (Q, k) int64
    scores: torch.Tensor  # (Q, k) cosine similarity, descending
    ids: torch.Tensor  # (Q, k) int64, tier-local entry ids
    keys: torch.Tensor | None = None  # (Q, k, key_dim) the stored (normalised) keys
    uses: torch.Tensor | None = None  # (Q, k) int64 use counts (strength) of the entries


class MemoryTier(Component):
    """A bounded store of memory entries searched by cosine similarity, per stream.

    Tiers are chained in manifest order (STM -> LTM -> Archive): what one tier hands
    over is written to the next. A tier never holds more than ``capacity`` entries, and a
    read only ever sees entries of the stream it asks for. Keys and values have the
    model's width (``context.model.dim``).
    """

    kind: ClassVar[str] = "memory"

    def write(self, entries: Entries, *, step: int = 0) -> None:
        """Store ``entries``, evicting (never the newest) so the tier stays within capacity."""
        raise NotImplementedError

    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0) -> Retrieval:
        """The ``k`` entries of ``stream`` most similar to each of ``queries`` (Q, key_dim).

        Counts a use and refreshes the last-access step of every entry returned.
        """
        raise NotImplementedError

    def read_batch(self, queries: torch.Tensor, streams: torch.Tensor, k: int, *, step: int = 0) -> Retrieval:
        """[`read`][cortex.interfaces.MemoryTier.read] for (B, T, d) queries, row ``b`` in
        stream ``streams[b]``; results have shapes (B, T, k, ...). Tiers may vectorise it."""
        parts = [self.read(q, k, stream=int(s), step=step) for q, s in zip(queries, streams)]

        def stack(name: str) -> torch.Tensor | None:
            items = [getattr(part, name) for part in parts]
            return None if items[0] is None else torch.stack(items)

        return Retrieval(**{f.name: stack(f.name) for f in fields(Retrieval)})

    def slots(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For small exact tiers: every slot of each row's stream as ``(keys (B, S, d),
        values (B, S, d), valid (B, S))``, so a reader can attend to them densely; ``None``
        (the default) when the tier must be searched."""
        return None

    def touch(self, streams: torch.Tensor, used: torch.Tensor, *, step: int = 0) -> None:
        """Count a use of the slots marked in ``used`` (B, S) after a dense read of
        [`slots`][cortex.interfaces.MemoryTier.slots]."""

    def handover(self, *, step: int = 0) -> Entries | None:
        """Remove and return the entries due for the next tier (consolidation), if any."""
        return None

    def clear(self, stream: int | None = None) -> None:
        """Forget the entries of ``stream`` (all streams when ``None``)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        """The most entries this tier will ever hold."""
        return int(getattr(self.settings, "capacity"))


class PlasticityRule(Component):
    """A non-gradient weight update on the modules matched by a glob ``target``.

    The kernel selects modules by ``fnmatch`` over ``model.core.named_modules()`` names,
    calls [`observe`][cortex.interfaces.PlasticityRule.observe] from forward hooks while
    [`observing`][cortex.interfaces.PlasticityRule.observing] is true, and calls
    [`apply`][cortex.interfaces.PlasticityRule.apply] for each target at step end under
    ``torch.no_grad()``.
    """

    kind: ClassVar[str] = "plasticity"
    #: whether forward hooks should record activity right now
    observing: bool = True

    def __init__(self, settings: Settings, context: BuildContext, target: str = "*") -> None:
        super().__init__(settings, context)
        self.target = target
        self.targets: dict[str, torch.nn.Module] = {}
        self._handles: list[Any] = []

    def attach(self, root: torch.nn.Module) -> None:
        """Select the target modules under ``root`` and hook their forward passes."""
        self.targets = {
            name: module
            for name, module in root.named_modules()
            if name and fnmatch.fnmatchcase(name, self.target)
        }
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            if self.observing:
                with torch.no_grad():
                    self.observe(name, module, inputs, output)

        return hook

    def observe(self, name: str, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        """Record pre/post activity of target ``name`` during a forward pass."""

    def apply(self, name: str, module: torch.nn.Module) -> None:
        """Update target ``name``'s weights from the recorded activity."""

    @hookimpl
    def cortex_after_step(self, model: CortexModel, step: int, metrics: dict[str, float]) -> None:
        with torch.no_grad():
            for name, module in self.targets.items():
                self.apply(name, module)


class CognitiveFeature(Component):
    """A feature that reacts to lifecycle hooks (steps, sleep phases, interactions)."""

    kind: ClassVar[str] = "feature"


@dataclass
class Document:
    """One text of a data source, with where it came from (``FILE:LINE`` or a generator)."""

    text: str
    origin: str


class DataSource(Component):
    """A named source of training text (``demo``, ``jsonl``, ``text``, ...)."""

    kind: ClassVar[str] = "data"

    def documents(self) -> Iterator[Document]:
        """Yield the source's documents in a deterministic order."""
        raise NotImplementedError
