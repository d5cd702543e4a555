"""Working memory (``working``): a few task-gated slots read and written in the forward pass.

```yaml
model: {dim: 256, layers: 4, heads: 4, context: 256}
features:
  - {type: working, settings: {slots: 8, tasks: 2, gated: true}}
```

A [`WorkingMemoryLayer`][cortex_plugins.memory._working_layer.WorkingMemoryLayer] is installed after block
``layer`` (default: the first of ``model.memory_layers``, else the middle block) with
``model.core.set_memory_layer``. If a memory module is already installed there (the
memory system's kNN-attention), it is *chained*: the layer calls it first
(``blocks.<layer>.memory.inner``) and then reads and writes its own slots.

**Slots.** Each stream (a batch row in training, a session at inference: the memory
system's streams when the model has tiers) owns ``slots`` slots, each holding a key (the
unit-norm hidden state), a value (the hidden state, stop-gradient), the task that wrote it
and its write time.

**Read** (every forward call): a learned query (initialised to the identity) attends over
the stream's filled slots; the result goes through a learned output projection and a
sigmoid gate into the residual stream, like kNN-attention.

**Write** (every forward call of at least ``min_tokens`` tokens, so prompts are written but
single generated tokens are not): each row writes one item, its last position. A slot whose
key matches at ``match_threshold`` is refreshed; otherwise the item takes an empty slot,
else the least recently written one.

**Task gates.** Each of ``tasks`` tasks has a gate over the slots (learned logits,
initialised so that the tasks split the slots evenly). A task writes only into slots whose
gate is open (> 0.5) and its reads are weighted by the gate (``log gate`` added to the
attention logits), so what one task holds is neither overwritten nor distracted by
another's writes. ``gated: false`` opens every slot to every task: writes then evict other
tasks' items, which the tests measure as lost accuracy.

**API.** [`set_task`][cortex_plugins.memory.working.WorkingMemory.set_task]``(name)`` switches the
task (names get gates in order of first use; when every gate is taken, a
task that holds no slot gives its gate up), [`clear`][cortex_plugins.memory.working.WorkingMemory.clear]``(task=None, stream=None)``
empties slots, ``frozen()`` reads without writing. The slots are saved with the run.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import F, nn, torch, no_grad

if TYPE_CHECKING:
    from cortex import ModelHandle


class WorkingMemory(CognitiveFeature):
    """Task-gated slots inside the forward pass (see the module docs)."""

    name = "working"

    class Settings(Settings):
        slots: int = Field(8, gt=0, description="Slots per stream.")
        tasks: int = Field(2, gt=0, description="Task gates; the slots are split evenly among them at the start.")
        gated: bool = Field(True, description="Gate writes and reads by task (false: every task uses every slot).")
        layer: int | None = Field(None, ge=0, description="Block after which the layer sits "
                                                         "(default: the first memory layer, else the middle block).")
        task: str = Field("default", min_length=1, description="The task active after building.")
        min_tokens: int = Field(2, ge=1, description="Forward calls shorter than this read but do not write.")
        match_threshold: float = Field(0.999, ge=-1, le=1, description="Cosine at which a write refreshes a slot.")
        gate_init: float = Field(-1.0, description="Initial logit of the output gate.")
        read_temperature: float = Field(0.1, gt=0, description="Initial temperature of the slot attention.")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        if context.config is None:
            raise ValueError("working memory needs the model's shape (context.config.dim)")
        if settings.tasks > settings.slots:
            raise ValueError(f"tasks ({settings.tasks}) cannot exceed slots ({settings.slots}): every task needs a slot")
        self.dim = int(context.config.dim)
        layers = int(context.config.layers)
        memory_layers = list(context.config.memory_layers)
        self.layer_index = settings.layer if settings.layer is not None else (
            memory_layers[0] if memory_layers else layers // 2)
        if self.layer_index >= layers:
            raise ValueError(f"layer {self.layer_index} is not a block index (< {layers})")
        self.layer: Any = None  # the WorkingMemoryLayer, installed when the model is built
        self.tasks: list[str] = [settings.task]
        self.task = settings.task
        self.writing = True
        self._streams: torch.Tensor | None = None
        self.clock = 0
        self.next_tag = 0
        self.written: list[tuple[int, int, int]] = []  # (stream, slot, tag) of the last write call
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.counters = {"writes": 0, "refreshed": 0, "overwritten": 0}

    # ------------------------------------------------------------------ installation

    @hookimpl
    def cortex_model_built(self, model: ModelHandle) -> None:
        from cortex_plugins.memory._working_layer import WorkingMemoryLayer

        core = model.core
        inner = core.memory_layer(self.layer_index)
        if inner is not None:
            core.set_memory_layer(self.layer_index, None)
        self.layer = WorkingMemoryLayer(self, self.dim, inner).to(next(core.parameters()).device)
        core.set_memory_layer(self.layer_index, self.layer)

    # ------------------------------------------------------------------ tasks

    @property
    def task_index(self) -> int:
        return self.tasks.index(self.task)

    def set_task(self, name: str, *, clear: bool = False) -> None:
        """Make ``name`` the active task (a new name takes the next free task gate)."""
        if name not in self.tasks:
            if len(self.tasks) >= self.settings.tasks:  # reuse the gate of a task that holds nothing
                owned = {int(o) for slot in self.state.values() for o in slot["owner"].tolist() if o >= 0}
                idle = [i for i in range(len(self.tasks)) if i not in owned]
                if idle:
                    self.tasks[idle[0]] = name
                    self.task = name
                    return
                raise CortexError(f"working memory has {self.settings.tasks} task gates, all in use "
                                  f"({', '.join(self.tasks)}); raise `tasks` in its settings")
            self.tasks.append(name)
        self.task = name
        if clear:
            self.clear(task=name)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """The active task's gate over the slots (all ones when ungated)."""
        if not self.settings.gated:
            return torch.ones(logits.shape[1], device=logits.device, dtype=logits.dtype)
        return torch.sigmoid(logits[self.task_index])

    def writable(self) -> torch.Tensor:
        """Slots (S,) the active task may write."""
        assert self.layer is not None
        return (self.gate(self.layer.task_gates.detach()) > 0.5).cpu()

    # ------------------------------------------------------------------ streams and slots

    def current_streams(self, batch: int, memory: Any = None) -> torch.Tensor:
        """Stream of each row: an explicit override, the streams the pass reads, else the row."""
        if self._streams is not None:
            return self._streams
        if memory is not None and memory.streams.numel() == batch:
            return memory.streams.cpu().long()
        return torch.arange(batch)

    @contextmanager
    def streams(self, streams: torch.Tensor | list[int]) -> Iterator[None]:
        """Rows read and write these streams inside the block."""
        self._streams = torch.as_tensor(streams, dtype=torch.long)
        try:
            yield
        finally:
            self._streams = None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Read without writing inside the block (for evaluation)."""
        before, self.writing = self.writing, False
        try:
            yield
        finally:
            self.writing = before

    def _slots(self, stream: int) -> dict[str, torch.Tensor]:
        if stream not in self.state:
            S, d = self.settings.slots, self.dim
            self.state[stream] = {
                "keys": torch.zeros(S, d), "values": torch.zeros(S, d),
                "tags": torch.full((S,), -1, dtype=torch.long), "owner": torch.full((S,), -1, dtype=torch.long),
                "age": torch.zeros(S, dtype=torch.long),
            }
        return self.state[stream]

    def gather(self, streams: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys (B, S, d), values (B, S, d) and filled (B, S) of each row's stream."""
        S, d = self.settings.slots, self.dim
        keys, values, filled = [], [], []
        for s in streams.tolist():
            slot = self.state.get(int(s))
            if slot is None:
                keys.append(torch.zeros(S, d))
                values.append(torch.zeros(S, d))
                filled.append(torch.zeros(S, dtype=torch.bool))
            else:
                keys.append(slot["keys"])
                values.append(slot["values"])
                filled.append(slot["tags"] >= 0)
        return (torch.stack(keys).to(device), torch.stack(values).to(device), torch.stack(filled).to(device))

    @no_grad
    def write(self, streams: torch.Tensor, items: torch.Tensor) -> list[int]:
        """Write one item (d,) per row into its stream's slots; returns the slots' tags.

        Slot tensors are replaced, never modified in place (a read may still need them
        for its backward pass).
        """
        s = self.settings
        allowed = self.writable()
        items = items.float().cpu()
        keys = F.normalize(items, dim=-1)
        tags = []
        self.written = []
        for b, stream in enumerate(streams.tolist()):
            slot = {k: v.clone() for k, v in self._slots(int(stream)).items()}
            filled = slot["tags"] >= 0
            sims = (slot["keys"] @ keys[b]).masked_fill(~(filled & allowed), -2.0)
            best = int(sims.argmax())
            if float(sims[best]) >= s.match_threshold:
                target = best
                self.counters["refreshed"] += 1
            else:
                empty = torch.nonzero(~filled & allowed).flatten()
                if empty.numel():
                    target = int(empty[0])
                else:
                    age = slot["age"].masked_fill(~allowed, torch.iinfo(torch.long).max)
                    target = int(age.argmin())
                    self.counters["overwritten"] += 1
            self.clock += 1
            slot["keys"][target] = keys[b]
            slot["values"][target] = items[b]
            slot["tags"][target] = self.next_tag
            slot["owner"][target] = self.task_index
            slot["age"][target] = self.clock
            self.state[int(stream)] = slot
            self.written.append((int(stream), target, self.next_tag))
            tags.append(self.next_tag)
            self.next_tag += 1
            self.counters["writes"] += 1
        return tags

    def clear(self, task: str | None = None, stream: int | None = None) -> None:
        """Empty the slots written by ``task`` (every task when ``None``) in ``stream``
        (every stream when ``None``)."""
        for sid in list(self.state) if stream is None else [int(stream)]:
            slot = self.state.get(sid)
            if slot is None:
                continue
            if task is None:
                del self.state[sid]
                continue
            if task not in self.tasks:
                continue
            mine = slot["owner"] == self.tasks.index(task)
            slot = {k: v.clone() for k, v in slot.items()}
            slot["tags"][mine] = -1
            slot["owner"][mine] = -1
            slot["keys"][mine] = 0
            slot["values"][mine] = 0
            self.state[sid] = slot

    def contents(self, stream: int = 0) -> dict[str, list[int]]:
        """Tags and owning tasks of a stream's slots (-1: empty)."""
        slot = self._slots(int(stream))
        return {"tags": slot["tags"].tolist(), "owner": slot["owner"].tolist()}

    # ------------------------------------------------------------------ lifecycle and state

    @hookimpl
    def cortex_interaction(self, model: ModelHandle, session: str, prompt: str, response: str) -> None:
        """Nothing to do per turn: the session's slots were written in its forward passes."""

    def stats(self) -> dict[str, Any]:
        return {"slots": self.settings.slots, "streams": len(self.state), "task": self.task,
                "tasks": list(self.tasks), "gated": self.settings.gated, "layer": self.layer_index, **self.counters}

    def state_dict(self) -> dict[str, Any]:
        streams = sorted(self.state)
        state: dict[str, Any] = {"streams": torch.tensor(streams, dtype=torch.long)}
        for name in ("keys", "values", "tags", "owner", "age"):
            rows = [self.state[s][name] for s in streams]
            state[name] = torch.stack(rows) if rows else torch.zeros(0)
        state.update(tasks=list(self.tasks), task=self.task, clock=self.clock, next_tag=self.next_tag,
                     counters=dict(self.counters))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {}
        for i, s in enumerate(state["streams"].tolist()):
            slot = {name: state[name][i].clone() for name in ("keys", "values", "tags", "owner", "age")}
            if tuple(slot["keys"].shape) != (self.settings.slots, self.dim):
                raise ValueError(f"working memory state has {tuple(slot['keys'].shape)} slots x width, "
                                 f"this feature {self.settings.slots} x {self.dim}")
            for name in ("tags", "owner", "age"):
                slot[name] = slot[name].long()
            self.state[int(s)] = slot
        self.tasks = list(state["tasks"])
        self.task = str(state["task"])
        self.clock = int(state["clock"])
        self.next_tag = int(state["next_tag"])
        self.counters.update({k: int(v) for k, v in state["counters"].items()})


@hookimpl
def cortex_register_components(register):
    register(WorkingMemory)
