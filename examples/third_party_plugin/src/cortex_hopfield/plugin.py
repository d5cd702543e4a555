"""The components of cortex-hopfield, registered under the namespace ``hopfield``.

- ``hopfield.memory``: a modern Hopfield network (Ramsauer et al., 2020, "Hopfield
  Networks is All You Need") as a Cortex memory tier. The stored keys are the patterns;
  a query is a state ``ξ`` that is updated ``iterations`` times with
  ``ξ <- Kᵀ softmax(β K ξ)`` (each update lowers the energy
  ``E(ξ) = -lse(β, K ξ) + ½ ξᵀξ``), and the patterns closest to the settled state are
  returned. A large inverse temperature ``β`` retrieves single patterns even from
  noisy cues; a small one settles on mixtures (metastable states).
- ``hopfield.hebbian``: Oja's Hebbian rule (Oja's subspace rule for several outputs) on
  ``nn.Linear`` modules: ``ΔW = η (y xᵀ - y yᵀ W)``. A single output converges to the
  first principal component of its input, with unit norm.

Nothing here imports from Cortex beyond its public interfaces.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from cortex import hookimpl
from cortex.kernel.interfaces import Entries, MemoryTier, PlasticityRule, Retrieval, Settings

_FIELDS = ("keys", "values", "tokens", "ids", "uses", "steps")


class HopfieldMemory(MemoryTier):
    """A modern Hopfield associative memory per stream, with bounded capacity.

    Each stream (a batch row in training, a session at inference) holds at most
    ``capacity`` patterns; when it is full, the least recently used patterns are
    forgotten (never the newest). Reads count a use and refresh the last-access step of
    every pattern they return.
    """

    name = "memory"

    class Settings(Settings):
        capacity: int = Field(512, gt=0, description="Patterns kept per stream; the least recently used go first.")
        beta: float = Field(8.0, gt=0, description="Inverse temperature of the softmax over stored patterns: "
                                                   "high retrieves one pattern, low a mixture.")
        iterations: int = Field(1, ge=0, description="Hopfield updates of the query before ranking the patterns "
                                                     "(0: plain cosine nearest neighbours).")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        if context.config is None:
            raise ValueError("hopfield.memory needs the model's width (context.config.dim)")
        self.dim = int(context.config.dim)
        self.next_id = 0
        self.evicted = 0
        self.reads = 0
        self.streams: dict[int, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ storage

    def _empty(self) -> dict[str, torch.Tensor]:
        long = {"dtype": torch.long}
        return {"keys": torch.zeros(0, self.dim), "values": torch.zeros(0, self.dim),
                "tokens": torch.zeros(0, **long), "ids": torch.zeros(0, **long),
                "uses": torch.zeros(0, **long), "steps": torch.zeros(0, **long)}

    @torch.no_grad()
    def write(self, entries: Entries, *, step: int = 0) -> None:
        n = len(entries)
        if n == 0:
            return
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        new_all = {
            "keys": F.normalize(entries.keys.detach().float().cpu(), dim=-1),
            "values": entries.values.detach().float().cpu(),
            "tokens": entries.tokens.detach().long().cpu().reshape(n),
            "ids": ids,
            "uses": (entries.uses.detach().long().cpu().reshape(n) if entries.uses is not None
                     else torch.zeros(n, dtype=torch.long)),
            "steps": torch.full((n,), int(step), dtype=torch.long),
        }
        streams = entries.streams.detach().long().cpu().reshape(n)
        for stream in streams.unique().tolist():
            sel = streams == stream
            old = self.streams.get(stream, self._empty())
            merged = {k: torch.cat([old[k], new_all[k][sel]]) for k in _FIELDS}
            self.streams[stream] = self._bound(merged)

    def _bound(self, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the ``capacity`` most recently used patterns (ties: more uses, newer id)."""
        excess = len(s["ids"]) - self.settings.capacity
        if excess <= 0:
            return s
        order = torch.arange(len(s["ids"]))
        order = order[torch.argsort(s["ids"][order], stable=True)]
        order = order[torch.argsort(s["uses"][order], stable=True)]
        order = order[torch.argsort(s["steps"][order], stable=True)]  # least recently used first
        keep = order[excess:].sort().values
        self.evicted += excess
        return {k: v[keep] for k, v in s.items()}

    # ------------------------------------------------------------------ retrieval

    def energy(self, state: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """Hopfield energy ``-lse(β, K ξ) + ½ ξᵀξ`` of each state (Q, d) in ``stream``."""
        keys = self.streams[int(stream)]["keys"]
        beta = self.settings.beta
        return -torch.logsumexp(beta * state @ keys.T, dim=-1) / beta + 0.5 * (state * state).sum(-1)

    def update(self, state: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """One Hopfield update ``ξ <- Kᵀ softmax(β K ξ)`` of each state (Q, d); never raises the energy."""
        keys = self.streams[int(stream)]["keys"]
        return torch.softmax(self.settings.beta * state @ keys.T, dim=-1) @ keys

    def settle(self, queries: torch.Tensor, stream: int = 0, iterations: int | None = None) -> torch.Tensor:
        """The states (Q, d) reached from the normalised ``queries`` after ``iterations`` updates."""
        state = F.normalize(queries.detach().float().cpu(), dim=-1)
        for _ in range(self.settings.iterations if iterations is None else iterations):
            state = self.update(state, stream)
        return state

    def retrieve(self, queries: torch.Tensor, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The classic Hopfield read-out: ``(softmax(β K ξ) V, softmax(β K ξ))`` for the
        settled states, the retrieved values (Q, d) and the weights over patterns (Q, n)."""
        s = self.streams[int(stream)]
        state = self.settle(queries, stream)
        weights = torch.softmax(self.settings.beta * F.normalize(state, dim=-1) @ s["keys"].T, dim=-1)
        return weights @ s["values"], weights

    @torch.no_grad()
    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0,
             touch: bool = True) -> Retrieval:
        """The ``k`` patterns closest (cosine) to the settled states of ``queries`` (Q, d)."""
        self.reads += 1
        q_n = queries.shape[0]
        out = {
            "values": torch.zeros(q_n, k, self.dim), "tokens": torch.full((q_n, k), -1),
            "scores": torch.full((q_n, k), float("-inf")), "ids": torch.full((q_n, k), -1),
            "keys": torch.zeros(q_n, k, self.dim), "uses": torch.zeros(q_n, k, dtype=torch.long),
        }
        s = self.streams.get(int(stream))
        if s is not None and len(s["ids"]) and k > 0:
            state = F.normalize(self.settle(queries, stream), dim=-1)
            top = (state @ s["keys"].T).topk(min(k, len(s["ids"])), dim=-1)
            j, m = top.indices, top.indices.shape[1]
            if touch:
                hit = j.unique()
                s["uses"][hit] += 1
                s["steps"][hit] = int(step)
            out["scores"][:, :m] = top.values
            for name in ("values", "keys", "tokens", "ids", "uses"):
                out[name][:, :m] = s[name][j]
        device = queries.device
        return Retrieval(**{name: t.to(device) for name, t in out.items()})

    # ------------------------------------------------------------------ bookkeeping

    def clear(self, stream: int | None = None) -> None:
        if stream is None:
            self.streams.clear()
        else:
            self.streams.pop(int(stream), None)

    def __len__(self) -> int:
        return sum(len(s["ids"]) for s in self.streams.values())

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self), "capacity": self.settings.capacity, "capacity_per": "stream",
                "streams": len(self.streams), "evicted": self.evicted, "reads": self.reads}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"next_id": self.next_id, "evicted": self.evicted,
                                 "streams": sorted(self.streams)}
        for stream, s in self.streams.items():
            for name in _FIELDS:
                state[f"s{stream}.{name}"] = s[name].clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_id = int(state["next_id"])
        self.evicted = int(state.get("evicted", 0))
        self.streams = {}
        for stream in state["streams"]:
            s = {name: state[f"s{stream}.{name}"].clone() for name in _FIELDS}
            if s["keys"].shape[1:] != (self.dim,):
                raise ValueError(f"hopfield.memory state has width {s['keys'].shape[1]}, this tier {self.dim}")
            self.streams[int(stream)] = s


class OjaHebbian(PlasticityRule):
    """Oja's Hebbian rule on the ``nn.Linear`` modules the target selects.

    Forward hooks accumulate ``y xᵀ`` and ``y yᵀ`` over the tokens of the step; at step
    end each weight moves by ``lr * (mean y xᵀ - mean y yᵀ W)``. Without gradients, a row
    of ``W`` converges to a principal direction of the module's input with unit norm
    (the rows together to an orthonormal basis of the principal subspace).
    """

    name = "hebbian"

    class Settings(Settings):
        lr: float = Field(1e-3, gt=0, description="Hebbian learning rate η.")
        max_tokens: int = Field(4096, gt=0, description="Tokens per forward pass used for the update "
                                                        "(the most recent ones), bounding its cost.")

    def __init__(self, settings: Settings, context: Any, target: str = "*") -> None:
        super().__init__(settings, context, target)
        self.sums: dict[str, list[Any]] = {}  # target -> [y xᵀ, y yᵀ, tokens]
        self.updates = 0

    def attach(self, root: nn.Module) -> None:
        """Like the base class, but only ``nn.Linear`` modules are targets."""
        super().attach(root)
        self.detach()
        self.targets = {n: m for n, m in self.targets.items() if isinstance(m, nn.Linear)}
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def observe(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach().reshape(-1, module.in_features)[-self.settings.max_tokens:].float()
        y = output.detach().reshape(-1, module.out_features)[-self.settings.max_tokens:].float()
        if module.bias is not None:
            y = y - module.bias.detach().float()  # the rule concerns the weight's own output
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 sums under bf16 training
            yx, yy = y.T @ x, y.T @ y
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = [yx, yy, x.shape[0]]
        else:
            acc[0] += yx
            acc[1] += yy
            acc[2] += x.shape[0]

    def apply(self, name: str, module: nn.Module) -> None:
        acc = self.sums.pop(name, None)
        if acc is None or acc[2] == 0:
            return
        yx, yy, n = acc
        w = module.weight
        delta = self.settings.lr * (yx - yy @ w.float()) / n
        w.add_(delta.to(w.dtype))
        self.updates += 1

    def stats(self) -> dict[str, Any]:
        return {"targets": len(self.targets), "updates": self.updates}


@hookimpl
def cortex_register_components(register):
    """Hand Cortex the components of this plugin."""
    register(HopfieldMemory)
    register(OjaHebbian)
