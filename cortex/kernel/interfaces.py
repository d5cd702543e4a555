"""The component interfaces: memory tiers, plasticity rules, cognitive features, data, loggers.

Every component is a class with a ``kind``, a ``name`` and a pydantic ``Settings`` model
(unknown keys rejected), constructed as ``cls(settings, context)``. Built instances are
registered on the model's plugin manager, so their ``@hookimpl`` methods take part in the
lifecycle. [`ModelHandle`][cortex.kernel.interfaces.ModelHandle] is the surface of a built
model that hooks and components may use. Nothing here imports torch until it is used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cortex.kernel.errors import CortexError
from cortex.kernel.lazy import torch

KINDS = ("memory", "plasticity", "feature", "data", "bench", "logger")


class Settings(BaseModel):
    """Base of every component's settings: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelShape(Protocol):
    """The shape of a transformer core (``cortex.core.transformer.ModelConfig``)."""

    vocab_size: int
    dim: int
    layers: int
    heads: int
    context: int
    memory_layers: tuple[int, ...]


class TextTokenizer(Protocol):
    """What components may use of a tokenizer (``cortex.core.tokenizer.Tokenizer``)."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ModelHandle(Protocol):
    """The surface of a built model (``cortex.model.CortexModel``) that hooks (as ``model``)
    and components (as ``self.model``) may use; the rest of the concrete model is private."""

    #: the transformer core (an ``nn.Module`` with ``blocks``, ``hidden_states`` and ``generate``)
    core: Any
    tokenizer: TextTokenizer
    memory: list[MemoryTier]
    plasticity: list[PlasticityRule]
    features: list[Component]
    #: the ``cortex.core.memory.MemorySystem`` reading and writing the tiers, or ``None``
    memory_system: Any
    #: this model's plugin manager: ``model.pm.hook.cortex_sleep(...)`` notifies every component
    pm: Any
    training: bool

    @property
    def config(self) -> ModelShape: ...
    @property
    def components(self) -> list[Component]: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def parameters(self) -> Iterator[Any]: ...
    def remember(self, text: str, session: str = "self") -> int: ...
    def interact(self, prompt: str, *, session: str = "self", **generation: Any) -> str: ...
    def generate_text(self, prompt: str, *, session: str = "self", **sampling: Any) -> str: ...


@dataclass
class BuildContext:
    """What a component may know about the model it is built into."""

    config: ModelShape | None = None
    tokenizer: TextTokenizer | None = None
    device: Any = field(default_factory=lambda: torch.device("cpu"))  # a torch.device
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
        self._model_ref: weakref.ref | None = None

    @property
    def model(self) -> ModelHandle:
        """The model this component was built into (held weakly, so no cycle keeps it alive)."""
        model = self._model_ref() if self._model_ref is not None else None
        if model is None:
            raise CortexError(f"component {self.key!r} is not part of a built model")
        return model

    @property
    def is_bound(self) -> bool:
        """Whether this component is part of a built model that still exists."""
        return self._model_ref is not None and self._model_ref() is not None

    def bind(self, model: ModelHandle) -> None:
        """Called by assembly, before ``cortex_model_built``: remember ``model`` weakly."""
        self._model_ref = weakref.ref(model)

    def stats(self) -> dict[str, Any]:
        """Figures worth showing in summaries and logs."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-compatible values that must survive save and load."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what [`state_dict`][cortex.kernel.interfaces.Component.state_dict] returned.

        This is the one way component state is saved: the model stores every component's
        ``state_dict`` under its ``key`` in run directories and checkpoints."""


@dataclass
class Entries:
    """A batch of ``N`` memory entries moving into, between or out of tiers.

    Attributes:
        keys: (N, key_dim) float32: what queries are compared with (cosine: tiers normalise).
        values: (N, value_dim) float32: the vectors kNN-attention mixes in.
        tokens: (N,) int64: the token that followed the key's position (kNN-LM's value), -1 if none.
        streams: (N,) int64: each entry's stream (a batch row in training, a session at inference).
        uses: (N,) int64: how often each was strengthened or retrieved; ``None``: zeros.
        steps: (N,) int64: the step each was last written or used; ``None``: the writing step.
        meta: one dict per entry, e.g. ``{"text": "...", "span": [a, b]}``, or ``None``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    tokens: torch.Tensor
    streams: torch.Tensor
    uses: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    meta: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass
class Retrieval:
    """The top-``k`` result of a memory read for ``Q`` queries (``(B, T, k, ...)`` from ``read_batch``).

    Attributes:
        values: (Q, k, value_dim) float32; zeros in a slot with no entry (fewer than ``k`` stored).
        tokens: (Q, k) int64, the entries' next tokens; -1 in an empty slot.
        scores: (Q, k) cosine similarity, descending; ``-inf`` in an empty slot.
        ids: (Q, k) int64 tier-local entry ids; -1 in an empty slot.
        keys: (Q, k, key_dim) the stored (normalised) keys, or ``None`` where the tier does not return them.
        uses: (Q, k) int64 use counts (strength) of the entries, or ``None``.
    """

    values: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor
    ids: torch.Tensor
    keys: torch.Tensor | None = None
    uses: torch.Tensor | None = None


class MemoryTier(Component):
    """A bounded store of memory entries searched by cosine similarity, per stream.

    Tiers are chained in manifest order (STM -> LTM -> Archive): what one tier hands
    over is written to the next. A tier never holds more than ``capacity`` entries, and a
    read only ever sees entries of the stream it asks for. Keys and values have the
    model's width (``context.config.dim``).

    A tier must implement ``write``, ``read``, ``clear`` and ``__len__``; ``capacity``
    comes from ``settings.capacity``, and state from ``state_dict``/``load_state_dict``.
    The rest is optional, with working defaults: ``read_batch`` (vectorised reads),
    ``dense_entries``/``mark_used`` (small exact tiers read densely), and the two ways
    entries move down the chain: **consolidation**, ``handover()`` (entries due for the
    next tier, by use or age), and **spill**, ``displaced()`` (entries pushed out of a full
    tier, kept while ``keep_displaced`` is set).
    """

    kind: ClassVar[str] = "memory"

    def write(self, entries: Entries, *, step: int = 0) -> None:
        """Store ``entries``, evicting (never the newest) so the tier stays within capacity."""
        raise NotImplementedError

    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0,
             touch: bool = True) -> Retrieval:
        """The ``k`` entries of ``stream`` most similar to each of ``queries`` (Q, key_dim).

        With ``touch`` it counts a use and refreshes the last-access step of every entry
        returned (retrieval strengthens a memory); ``touch=False`` only looks.
        """
        raise NotImplementedError

    def read_batch(self, queries: torch.Tensor, streams: torch.Tensor, k: int, *, step: int = 0,
                   touch: bool = True) -> Retrieval:
        """[`read`][cortex.kernel.interfaces.MemoryTier.read] for (B, T, d) queries, row ``b`` in
        stream ``streams[b]``; results have shapes (B, T, k, ...). Tiers may vectorise it."""
        parts = [self.read(q, k, stream=int(s), step=step, touch=touch) for q, s in zip(queries, streams)]

        def stack(name: str) -> torch.Tensor | None:
            items = [getattr(part, name) for part in parts]
            return None if items[0] is None else torch.stack(items)

        return Retrieval(**{f.name: stack(f.name) for f in fields(Retrieval)})

    def dense_entries(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For small exact tiers: every slot of each row's stream as ``(keys (B, S, d),
        values (B, S, d), valid (B, S))``, so a reader can attend to them densely; ``None``
        (the default) when the tier must be searched."""
        return None

    def mark_used(self, streams: torch.Tensor, used: torch.Tensor, *, step: int = 0, queries: int = 0,
              hits: int = 0) -> None:
        """After a dense read of [`dense_entries`][cortex.kernel.interfaces.MemoryTier.dense_entries]: count a use of
        the slots marked in ``used`` (B, S), and ``queries`` reads of which ``hits`` found some."""

    def handover(self, *, step: int = 0) -> Entries | None:
        """Remove and return the entries due for the next tier (consolidation), if any."""
        return None

    #: set by the memory system when entries pushed out of a full tier should move down
    #: the chain instead of being forgotten (see [`displaced`][cortex.kernel.interfaces.MemoryTier.displaced])
    keep_displaced: bool = False

    def displaced(self) -> Entries | None:
        """Entries evicted since the last call, kept while ``keep_displaced`` is set."""
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


def firing_rate(activity: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Cortex's one definition of a unit's firing rate, used by every rule and feature.

    ``activity`` (..., units) is what a module outputs for a batch of tokens; a unit *fires*
    on a token when its activation exceeds ``threshold``. Returns (units,) float32: the share
    of tokens (every leading position) on which each unit fired; for an MLP's ``fc`` output
    and ``threshold=0``, in the active (positive) half of its GELU."""
    flat = activity.detach().reshape(-1, activity.shape[-1])
    return (flat > threshold).float().mean(0)


def all_reduce_mean(tensor: Any) -> Any:
    """Replace ``tensor`` in place by its mean over all DDP ranks and return it.

    For non-gradient state (plasticity updates, running statistics) that must stay identical
    on every rank. Integer tensors are averaged in float64 and rounded back. A no-op in one process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if tensor.is_floating_point():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.div_(dist.get_world_size())
    total = tensor.double()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return tensor.copy_(total.div_(dist.get_world_size()).round_())


class RuleSettings(Settings):
    """Settings every rule built on [`PlasticityRule`][cortex.kernel.interfaces.PlasticityRule] may use.

    Rules subclass it (and may change the defaults); the runtime reads ``lr``, ``warmup``
    and ``max_norm``.
    """

    lr: float = Field(1e-3, ge=0, description="Learning rate of the rule's non-gradient update.")
    warmup: int = Field(0, ge=0, description="Steps of linear warm-up of `lr` from 0 (0: constant).")
    max_norm: float | None = Field(
        None, gt=0, description="Bound on the L2 norm of each row of the target's weight after every update.")
    threshold: float = Field(0.0, description="Activation above which a unit counts as firing (see `firing_rate`).")


class PlasticityRule(Component):
    """A non-gradient weight update on the modules matched by a glob ``target``.

    Targets are ``model.core.named_modules()`` names matched by ``fnmatch``. Only a rule
    that overrides ``observe`` hooks them: it then sees forward passes in training mode
    while ``observing``, under ``torch.no_grad()`` (no rule: nothing hooked, zero cost).
    At step end, after every ``cortex_after_step`` implementation, the model runs each
    rule's ``step_end`` in manifest order: ``apply`` per target with ``self.lr`` from the
    schedule, then the ``max_norm`` bound. Statistics gathered on one DDP rank go through
    ``reduce_mean_`` before they change weights, so ranks never drift apart.
    """

    kind: ClassVar[str] = "plasticity"
    observing: bool = True
    """Whether forward hooks record activity right now (set it to ``False`` to pause a rule)."""

    def __init__(self, settings: Settings, context: BuildContext, target: str = "*") -> None:
        super().__init__(settings, context)
        self.target = target
        self.targets: dict[str, torch.nn.Module] = {}
        self._handles: list[Any] = []
        #: the learning rate of the current step's update (set by ``step_end``)
        self.lr = float(getattr(settings, "lr", 1.0))

    @property
    def needs_hooks(self) -> bool:
        """Whether this rule observes forward passes (it overrides ``observe``)."""
        return type(self).observe is not PlasticityRule.observe

    def attach(self, root: torch.nn.Module) -> None:
        """Select the target modules under ``root`` and hook their forward passes."""
        self.targets = {
            name: module
            for name, module in root.named_modules()
            if name and fnmatch.fnmatchcase(name, self.target)
        }
        if self.needs_hooks:
            for name, module in self.targets.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            if self.observing and module.training:
                with torch.no_grad():
                    self.observe(name, module, inputs, output)

        return hook

    def observe(self, name: str, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        """Record pre/post activity of target ``name`` during a forward pass."""

    def apply(self, name: str, module: torch.nn.Module) -> None:
        """Update target ``name``'s weights from the recorded activity."""

    # -- runtime helpers ---------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """``settings.lr``, ramped linearly over the first ``settings.warmup`` steps."""
        lr = float(getattr(self.settings, "lr", 1.0))
        warmup = int(getattr(self.settings, "warmup", 0) or 0)
        return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr

    def firing_rate(self, activity: torch.Tensor) -> torch.Tensor:
        """[`firing_rate`][cortex.kernel.interfaces.firing_rate] at this rule's ``threshold`` setting."""
        return firing_rate(activity, float(getattr(self.settings, "threshold", 0.0)))

    def bound_(self, weight: torch.Tensor) -> torch.Tensor:
        """Scale down, in place, the rows of ``weight`` whose L2 norm exceeds ``max_norm``."""
        max_norm = getattr(self.settings, "max_norm", None)
        if max_norm is not None:
            weight.copy_(torch.renorm(weight, 2, 0, float(max_norm)))
        return weight

    @staticmethod
    def reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over DDP ranks in place (a no-op in a single process)."""
        return all_reduce_mean(tensor)

    def step_end(self, model: Any, step: int, metrics: dict[str, float]) -> None:
        """This rule's part of step end, under ``torch.no_grad()``: ``apply`` to every
        target, then the weight bound. The model calls it; tests may call it directly."""
        self.lr = self.lr_at(step)
        with torch.no_grad():
            for name, module in self.targets.items():
                self.apply(name, module)
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.Tensor) and getattr(self.settings, "max_norm", None) is not None:
                    self.bound_(weight)


class CognitiveFeature(Component):
    """A feature that reacts to lifecycle hooks (steps, sleep phases, interactions)."""

    kind: ClassVar[str] = "feature"

    def frozen(self) -> ContextManager[None]:
        """A context in which this feature's state stays as it is (sleep replay runs in it)."""
        return contextlib.nullcontext()

    def replay_sequences(self, n: int, generator: Any = None) -> list[Any]:
        """Up to ``n`` stored token sequences (1-D LongTensors) for offline replay: what
        ``sleep_wake`` keeps, ``cls`` consolidates. The default offers none."""
        return []

    # -- the read path: the model calls these on every feature (no-ops by default) -------

    def remember(self, text: str, session: str) -> int:
        """Keep ``text`` told to ``session``; returns how many entries were kept (default 0)."""
        return 0

    def context_for(self, prompt: str, session: str) -> str:
        """The text the model reads for ``prompt`` (e.g. recalled text put before it)."""
        return prompt

    def adjust_logits(self, ids: torch.Tensor, logits: torch.Tensor, session: str) -> torch.Tensor:
        """Next-token scores after ``ids`` (B, T): ``logits`` is (B, vocab) in generation,
        (B, T, vocab) teacher-forced; same shape back. Applied in manifest order, then kNN-LM."""
        return logits


@dataclass
class Document:
    """One text of a data source, with where it came from (``FILE:LINE`` or a generator)."""

    text: str
    origin: str


class Logger(Component):
    """An experiment tracker (``train.loggers`` or ``--log NAME``), built when training starts
    with ``context.run_dir``, inside which it writes. It is fed what ``metrics.jsonl`` gets."""

    kind: ClassVar[str] = "logger"

    def log(self, step: int, values: dict[str, float], texts: dict[str, str]) -> None:
        """Record a ``metrics.jsonl`` line: its numbers and its texts (``sample``, ``rollback``)."""

    def close(self) -> None:
        """Flush and let go of files: training has ended (also when it failed)."""


class DataSource(Component):
    """A named source of training text (``demo``, ``jsonl``, ``text``, ...)."""

    kind: ClassVar[str] = "data"

    def documents(self) -> Iterator[Document]:
        """Yield the source's documents in a deterministic order."""
        raise NotImplementedError

    @classmethod
    def reads(cls, path: Path) -> Settings | None:
        """The settings with which this source reads ``path`` (given as ``--data PATH`` or a
        file to prepare), or ``None`` when it does not recognise it (the default)."""
        return None
