"""Sleep-wake cycle (``sleep_wake``): wake, NREM replay and consolidation, REM recombination.

```yaml
features:
  - {type: sleep_wake, settings: {wake: 1000, nrem: 50, rem: 20}}
  # or a cycle length split by ratios (wake, nrem, rem):
  - {type: sleep_wake, settings: {cycle: 1000, ratios: [0.9, 0.07, 0.03]}}
```

**The clock.** Lengths are counted in *units*: a training step (``cortex_after_step``) or a
chat turn (``cortex_interaction``) each advance the clock by one. A cycle is ``wake``
units of wake, then ``nrem`` units of NREM sleep, then ``rem`` units of REM sleep. Each
phase change fires ``cortex_sleep(model, phase, step)`` (``"nrem"``, ``"rem"``, then
``"wake"``), so any plugin can react, and every unit's phase is logged in the step's
metrics as ``sleep/phase`` (0 wake, 1 NREM, 2 REM). The training data keeps flowing
during sleep (a plugin cannot pause the loop): sleep adds replay *interleaved* with new
learning, the pattern complementary-learning-systems theory asks for.
[`sleep`][cortex_plugins.cognition.sleep_wake.SleepWake.sleep] runs a whole night at once
(NREM then REM, then wake), e.g. between chat sessions.

**NREM** (every NREM unit):

1. memory consolidation — the memory system hands entries down its tiers. With
   ``memory_system.consolidate: sleep`` it does so only when this plugin fires the NREM
   hook; in every NREM unit this plugin also calls ``memory_system.consolidate(step)``
   (with ``consolidate: step`` the system consolidates every step anyway);
2. replay — ``replay_steps`` gradient steps on ``replay_batch`` stored sequences, at the
   slow learning rate ``lr``, with this plugin's **own Adam optimiser** over the core's
   parameters (not an extra loss of the training step: replay must also run in chat,
   where there is no training step, and at its own learning rate).

**REM** (every REM unit): the same slow gradient steps on *recombined* memories:
``rem_mode: recombine`` cuts stored sequences into fragments at boundary tokens (end of
document, newline, ``. ; ! ?``) and joins fragments of different memories in random
order; ``rem_mode: generate`` lets the model dream: it continues the first ``rem_prompt``
tokens of stored memories by sampling at ``rem_temperature`` and learns from its dreams.

**What is replayed** (``sources``; each used when available):

- ``episodic`` — episodes of a feature offering ``replay(n)`` (the ``episodic`` plugin);
- ``memory`` — texts stored in the memory tiers: entries written by ``model.remember`` /
  ``model.interact`` carry their text in their metadata; each distinct text is one memory;
- ``buffer`` — the plugin's own hippocampal trace of wake experience: a reservoir sample
  (uniform over everything seen, old and new alike) of ``buffer`` sequences, fed with
  ``record_rows`` rows of every training batch and the prompt of every chat turn.

A replayed sequence longer than ``replay_tokens + 1`` is cut to a random window of that
length. The replay pool is gathered afresh in every sleep unit.

Replay runs through the core alone (memory is not read or written); plasticity rules do
not observe replay passes and features with a ``frozen()`` context (working memory) are
frozen meanwhile. Under DDP the recorded rows are gathered from every rank (every rank
holds the same buffer) and replay gradients are averaged, so ranks stay identical. The
state saved with runs and checkpoints: the clock, the buffer and the replay optimiser.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field, model_validator

from cortex import hookimpl
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import torch, no_grad

if TYPE_CHECKING:
    from cortex import ModelHandle

PHASES = ("wake", "nrem", "rem")
PHASE_CODE = {name: i for i, name in enumerate(PHASES)}
#: characters that end a fragment for recombination (besides the end-of-document token)
BOUNDARY_CHARS = "\n.;!?"


# --------------------------------------------------------------------------- helpers shared with `cls`


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser's state dict in a form plugin state can hold (string keys)."""
    sd = optimizer.state_dict()
    return {"state": {str(k): dict(v) for k, v in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of [`optimizer_state`][cortex_plugins.cognition.sleep_wake.optimizer_state]."""
    groups = []
    for g in state["param_groups"]:
        g = dict(g)
        g["params"] = [int(p) for p in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": {int(k): dict(v) for k, v in state["state"].items()},
                               "param_groups": groups})


def apply_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                    grads: list[torch.Tensor | None], clip: float | None) -> float:
    """One ``optimizer`` update of ``params`` from ``grads`` (averaged over DDP ranks,
    clipped to total norm ``clip``), leaving every ``.grad`` as it was. Returns the norm."""
    from cortex.runtime.distributed import all_reduce_mean, is_distributed

    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return 0.0
    if is_distributed():
        for _, g in pairs:
            all_reduce_mean(g)
    norm = torch.nn.utils.get_total_norm([g for _, g in pairs])
    if not math.isfinite(float(norm)):
        return float(norm)
    if clip is not None and float(norm) > clip:
        for _, g in pairs:
            g.mul_(clip / (float(norm) + 1e-6))
    ours = {id(p) for p, _ in pairs}
    stash = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ours and p.grad is not None:
                stash[p] = p.grad  # a gradient someone else is accumulating: not ours to apply
                p.grad = None
    saved = [(p, p.grad) for p, _ in pairs]
    for p, g in pairs:
        p.grad = g.to(p.dtype)
    try:
        optimizer.step()
    finally:
        for p, old in saved:
            p.grad = old
        for p, old in stash.items():
            p.grad = old
    return float(norm)


def lm_batch(seqs: list[torch.Tensor], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (-1 where padded) for token sequences of unequal lengths."""
    length = max(int(s.numel()) for s in seqs) - 1
    inputs = torch.full((len(seqs), length), pad, dtype=torch.long)
    targets = torch.full((len(seqs), length), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = int(s.numel()) - 1
        inputs[i, :n] = s[:-1]
        targets[i, :n] = s[1:]
    return inputs.to(device), targets.to(device)


@contextlib.contextmanager
def quiet(model: Any) -> Iterator[None]:
    """Offline passes (replay, consolidation): rules do not observe, features with
    ``frozen()`` are frozen."""
    rules = list(model.plasticity)
    before = [r.observing for r in rules]
    with contextlib.ExitStack() as stack:
        for r in rules:
            r.observing = False
        for f in model.features:
            if isinstance(f, CognitiveFeature):
                stack.enter_context(f.frozen())
        try:
            yield
        finally:
            for r, b in zip(rules, before):
                r.observing = b


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the feature


class SleepWake(CognitiveFeature):
    """A wake / NREM / REM cycle with replay at a slow learning rate (see the module docs)."""

    name = "sleep_wake"

    class Settings(Settings):
        wake: int | None = Field(None, ge=1, description="Units (steps or chat turns) of wake per cycle (default 1000).")
        nrem: int | None = Field(None, ge=0, description="Units of NREM sleep per cycle (default 50).")
        rem: int | None = Field(None, ge=0, description="Units of REM sleep per cycle (default 20).")
        cycle: int | None = Field(None, ge=3, description="Cycle length in units, split by `ratios` (instead of wake/nrem/rem).")
        ratios: list[float] = Field([0.9, 0.07, 0.03], min_length=3, max_length=3,
                                    description="Shares of wake, NREM and REM in a `cycle`.")
        lr: float = Field(1e-4, gt=0, description="Slow learning rate of replay (its own Adam optimiser).")
        replay_steps: int = Field(1, ge=0, description="Replay gradient steps per NREM or REM unit.")
        replay_batch: int = Field(8, ge=1, description="Sequences per replay step.")
        replay_tokens: int | None = Field(None, ge=2, description="Tokens per replayed sequence (default: the model context).")
        clip: float = Field(1.0, gt=0, description="Gradient-norm clipping of replay steps.")
        sources: list[Literal["episodic", "memory", "buffer"]] = Field(
            ["episodic", "memory", "buffer"], description="What NREM replays (each when available).")
        episodes: int = Field(64, ge=1, description="Episodes taken from an episodic feature per sleep phase.")
        buffer: int = Field(256, ge=0, description="Sequences in the reservoir of wake experience (0: none).")
        record_rows: int = Field(1, ge=0, description="Rows of each training batch offered to the buffer.")
        rem_mode: Literal["recombine", "generate", "none"] = Field(
            "recombine", description="REM replay: recombined fragments, the model's own dreams, or nothing.")
        rem_prompt: int = Field(8, ge=1, description="`generate`: tokens of a stored memory that start a dream.")
        rem_temperature: float = Field(0.8, gt=0, description="`generate`: sampling temperature of dreams.")

        @model_validator(mode="after")
        def _lengths(self):
            explicit = [v is not None for v in (self.wake, self.nrem, self.rem)]
            if self.cycle is not None and any(explicit):
                raise ValueError("give either `cycle` (with `ratios`) or wake/nrem/rem, not both")
            if any(r < 0 for r in self.ratios) or self.ratios[0] <= 0:
                raise ValueError("ratios must be >= 0 with a positive wake share")
            return self

        def lengths(self) -> tuple[int, int, int]:
            """(wake, nrem, rem) in units."""
            if self.cycle is None:
                return (self.wake if self.wake is not None else 1000,
                        self.nrem if self.nrem is not None else 50,
                        self.rem if self.rem is not None else 20)
            total = sum(self.ratios)
            nrem = round(self.cycle * self.ratios[1] / total)
            rem = round(self.cycle * self.ratios[2] / total)
            nrem = max(nrem, 1) if self.ratios[1] > 0 else 0
            rem = max(rem, 1) if self.ratios[2] > 0 else 0
            return max(1, self.cycle - nrem - rem), nrem, rem

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        self.wake_len, self.nrem_len, self.rem_len = settings.lengths()
        self.tokenizer = context.tokenizer
        self.device = torch.device(context.device)
        self.seed = int(context.seed)
        ctx = int(context.config.context) if context.config is not None else 256
        self.seq_len = min(ctx, settings.replay_tokens or ctx) + 1  # tokens per replayed sequence
        self.optimizer: torch.optim.Optimizer | None = None
        self._params: list[torch.Tensor] = []
        self._pending_optimizer: dict[str, Any] | None = None
        self._boundaries: torch.Tensor | None = None
        self._pool: list[torch.Tensor] = []
        self.clock = 0  # units completed
        self.phase = "wake"
        self.step = 0
        self.buf_tokens = torch.full((0, self.seq_len), -1, dtype=torch.long)
        self.buf_lengths = torch.zeros(0, dtype=torch.long)
        self.seen = 0
        self.counters = {"cycles": 0, "transitions": 0, "replay_steps": 0, "replayed": 0,
                         "rem_steps": 0, "consolidated": 0}
        self.last_replay_loss: float | None = None
        #: the sequences of the latest replay step (for inspection and tests)
        self.last_replayed: list[torch.Tensor] = []

    # ------------------------------------------------------------------ the clock

    @property
    def cycle_length(self) -> int:
        return self.wake_len + self.nrem_len + self.rem_len

    def phase_at(self, unit: int) -> str:
        """The phase of unit ``unit`` (0-based) of the endless cycle."""
        p = unit % self.cycle_length
        if p < self.wake_len:
            return "wake"
        return "nrem" if p < self.wake_len + self.nrem_len else "rem"

    def _enter(self, model: Any, phase: str, step: int) -> None:
        if phase == self.phase:
            return
        if phase == "wake":
            self.counters["cycles"] += 1
        self.phase = phase
        self.counters["transitions"] += 1
        model.pm.hook.cortex_sleep(model=model, phase=phase, step=step)

    def _unit(self, model: Any, step: int) -> dict[str, float]:
        """Finish one unit: enter its phase and do its sleep work."""
        phase = self.phase_at(self.clock)
        self._pool = self.pool(model) if phase != "wake" else []
        ms = model.memory_system
        before = int(ms.stats["consolidated"]) if ms is not None else 0
        self._enter(model, phase, step)
        out: dict[str, float] = {"sleep/phase": float(PHASE_CODE[phase])}
        if phase == "nrem":
            if ms is not None:
                ms.consolidate(step)
                moved = int(ms.stats["consolidated"]) - before  # by the NREM hook and by this call
                self.counters["consolidated"] += moved
                out["sleep/consolidated"] = float(moved)
            loss = self._replay(model, step, rem=False)
        elif phase == "rem":
            loss = self._replay(model, step, rem=True)
        else:
            loss = None
        if loss is not None:
            out["sleep/replay_loss"] = loss
        self.clock += 1
        return out

    def sleep(self, model: Any | None = None, step: int | None = None) -> dict[str, float]:
        """A whole night now: ``nrem`` NREM units, ``rem`` REM units, then wake. The clock
        restarts at the beginning of a wake phase. Returns the mean replay losses."""
        model = model or self.model
        step = self.step if step is None else step
        losses: dict[str, list[float]] = {"nrem": [], "rem": []}
        for phase, units in (("nrem", self.nrem_len), ("rem", self.rem_len)):
            for _ in range(units):
                self._pool = self.pool(model)
                ms = model.memory_system
                before = int(ms.stats["consolidated"]) if ms is not None else 0
                self._enter(model, phase, step)
                if phase == "nrem" and ms is not None:
                    ms.consolidate(step)
                    self.counters["consolidated"] += int(ms.stats["consolidated"]) - before
                loss = self._replay(model, step, rem=phase == "rem")
                if loss is not None:
                    losses[phase].append(loss)
        self._pool = []
        self._enter(model, "wake", step)
        self.clock = (self.clock // self.cycle_length + 1) * self.cycle_length
        return {f"sleep/{k}_loss": sum(v) / len(v) for k, v in losses.items() if v}

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def cortex_before_step(self, model: ModelHandle, step: int, batch: torch.Tensor) -> None:
        self.step = step
        if self.settings.buffer and self.settings.record_rows and batch.numel():
            g = _generator(self.seed, 17, step)
            rows = torch.randperm(batch.shape[0], generator=g)[: self.settings.record_rows]
            chosen = batch[rows.to(batch.device)].detach()
            for row in _gather_rows(chosen):
                self.record(row.cpu())

    @hookimpl
    def cortex_after_step(self, model: ModelHandle, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        metrics.update(self._unit(model, step))

    @hookimpl
    def cortex_interaction(self, model: ModelHandle, session: str, prompt: str, response: str) -> None:
        if self.settings.buffer and self.tokenizer is not None:
            ids = self.tokenizer.encode(prompt)
            if len(ids) >= 2:
                self.record(torch.tensor(ids[: self.seq_len], dtype=torch.long))
        ms = model.memory_system
        self._unit(model, int(ms.step) if ms is not None else self.clock)  # memory's own clock ages in chat

    # ------------------------------------------------------------------ memories

    def record(self, tokens: torch.Tensor) -> None:
        """Offer a sequence of wake experience to the reservoir (uniform over all seen)."""
        cap = self.settings.buffer
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)[: self.seq_len]
        if cap == 0 or tokens.numel() < 2:
            return
        self.seen += 1
        if self.buf_tokens.shape[0] < cap:
            slot = self.buf_tokens.shape[0]
            self.buf_tokens = torch.cat([self.buf_tokens, torch.full((1, self.seq_len), -1, dtype=torch.long)])
            self.buf_lengths = torch.cat([self.buf_lengths, torch.zeros(1, dtype=torch.long)])
        else:
            slot = int(torch.randint(0, self.seen, (1,), generator=_generator(self.seed, 29, self.seen)))
            if slot >= cap:
                return
        self.buf_tokens[slot] = -1
        self.buf_tokens[slot, : tokens.numel()] = tokens
        self.buf_lengths[slot] = tokens.numel()

    def buffered(self) -> list[torch.Tensor]:
        """The sequences held in the reservoir."""
        return [self.buf_tokens[i, : int(n)] for i, n in enumerate(self.buf_lengths.tolist())]

    def pool(self, model: Any | None = None) -> list[torch.Tensor]:
        """Every stored memory the ``sources`` setting allows, as token sequences."""
        model = model or (self.model if self.is_bound else None)
        out: list[torch.Tensor] = []
        sources = self.settings.sources
        if model is not None and "episodic" in sources:
            for feature in model.features:
                replay = getattr(feature, "replay", None)
                if feature is self or not callable(replay):
                    continue
                try:
                    episodes = replay(self.settings.episodes, strategy="random", seed=self.seed + self.clock)
                except TypeError:
                    episodes = replay(self.settings.episodes)
                for episode in episodes:
                    tokens = getattr(episode, "tokens", episode)
                    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
                    if tokens.numel() >= 2:
                        out.append(tokens)
        if model is not None and "memory" in sources and self.tokenizer is not None:
            texts: dict[str, None] = {}
            for tier in model.memory:
                for meta in list(getattr(tier, "meta", {}).values()):
                    text = meta.get("text") if isinstance(meta, dict) else None
                    if isinstance(text, str) and text:
                        texts[text] = None
            for text in texts:
                ids = self.tokenizer.encode(text)
                if len(ids) >= 2:
                    out.append(torch.tensor(ids, dtype=torch.long))
        if "buffer" in sources:
            out.extend(self.buffered())
        return out

    def replay_sequences(self, n: int, generator: torch.Generator | None = None,
                         pool: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``n`` memories drawn (with replacement) from the replay pool, each cut to a
        random window of at most ``replay_tokens + 1`` tokens; ``[]`` when nothing is stored."""
        pool = pool if pool is not None else (self._pool or self.pool())
        if not pool:
            return []
        g = generator or _generator(self.seed, 31, self.clock)
        picks = torch.randint(0, len(pool), (n,), generator=g).tolist()
        out = []
        for i in picks:
            s = pool[i]
            if s.numel() > self.seq_len:
                start = int(torch.randint(0, s.numel() - self.seq_len + 1, (1,), generator=g))
                s = s[start: start + self.seq_len]
            out.append(s)
        return out

    # ------------------------------------------------------------------ REM

    def _boundary_ids(self) -> torch.Tensor:
        if self._boundaries is None:
            tok = self.tokenizer
            ids = [tok.eos_id] if tok is not None else []
            if tok is not None:
                for i in range(tok.vocab_size):
                    try:
                        text = tok.decode([i])
                    except Exception:  # special or partial tokens
                        continue
                    if any(ch in text for ch in BOUNDARY_CHARS):
                        ids.append(i)
            self._boundaries = torch.tensor(sorted(set(ids)), dtype=torch.long)
        return self._boundaries

    def fragments(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sequences cut after every boundary token (end of document, newline, ``. ; ! ?``)."""
        bounds = self._boundary_ids()
        out = []
        for s in seqs:
            cut = torch.isin(s, bounds).nonzero().flatten().tolist()
            start = 0
            for c in cut + [s.numel() - 1]:
                if c + 1 > start:
                    out.append(s[start: c + 1])
                start = c + 1
        return [f for f in out if f.numel() > 0]

    def recombine(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``n`` sequences of fragments of different memories joined in random order."""
        frags = self.fragments(self.replay_sequences(4 * n, generator))
        if len(frags) < 2:
            return self.replay_sequences(n, generator)
        out = []
        for _ in range(n):
            parts, total = [], 0
            while total < self.seq_len:
                f = frags[int(torch.randint(0, len(frags), (1,), generator=generator))]
                parts.append(f)
                total += f.numel()
            out.append(torch.cat(parts)[: self.seq_len])
        return out

    @no_grad
    def dream(self, model: Any, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``n`` continuations the model samples from the openings of stored memories."""
        seeds = [s for s in self.replay_sequences(4 * n, generator) if s.numel() >= self.settings.rem_prompt][:n]
        if not seeds:
            return []
        prompt = torch.stack([s[: self.settings.rem_prompt] for s in seeds]).to(self.device)
        new = max(1, self.seq_len - prompt.shape[1])
        was = model.core.training
        try:
            out = model.core.generate(prompt, new, temperature=self.settings.rem_temperature, generator=None
                                      if self.device.type != "cpu" else generator)
        finally:
            model.core.train(was)
        return [row.cpu() for row in out]

    # ------------------------------------------------------------------ replay

    def _optimizer(self, model: Any) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self._params = [p for p in model.core.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adam(self._params, lr=self.settings.lr)
            if self._pending_optimizer is not None:
                load_optimizer_state(self.optimizer, self._pending_optimizer)
                self._pending_optimizer = None
        return self.optimizer

    def _replay(self, model: Any, step: int, *, rem: bool) -> float | None:
        """The replay steps of one sleep unit; the mean loss before each update, or None."""
        s = self.settings
        if s.replay_steps == 0 or (rem and s.rem_mode == "none"):
            return None
        losses = []
        for i in range(s.replay_steps):
            g = _generator(self.seed, 41 if rem else 43, self.clock, i)
            if not rem:
                seqs = self.replay_sequences(s.replay_batch, g)
            elif s.rem_mode == "recombine":
                seqs = self.recombine(s.replay_batch, g) if self._pool else []
            else:
                seqs = self.dream(model, s.replay_batch, g) if self._pool else []
            if not seqs:
                return None
            losses.append(self.learn(model, seqs))
            self.counters["rem_steps" if rem else "replay_steps"] += 1
            self.counters["replayed"] += len(seqs)
        self.last_replay_loss = sum(losses) / len(losses)
        return self.last_replay_loss

    def learn(self, model: Any, seqs: list[torch.Tensor]) -> float:
        """One slow gradient step of the core on ``seqs``; returns the loss before it."""
        self.last_replayed = seqs
        opt = self._optimizer(model)
        pad = self.tokenizer.eos_id if self.tokenizer is not None else 0
        inputs, targets = lm_batch(seqs, pad, next(model.core.parameters()).device)
        with torch.enable_grad(), quiet(model):
            _, loss = model.core(inputs, targets)
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        apply_gradients(opt, self._params, list(grads), self.settings.clip)
        return float(loss.detach())

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return {"phase": self.phase, "clock": self.clock, "wake": self.wake_len, "nrem": self.nrem_len,
                "rem": self.rem_len, "buffer": int(self.buf_tokens.shape[0]), "seen": self.seen,
                "last_replay_loss": self.last_replay_loss, **self.counters}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "clock": self.clock, "phase": self.phase, "step": self.step, "seen": self.seen,
            "counters": dict(self.counters), "buffer_tokens": self.buf_tokens.clone(),
            "buffer_lengths": self.buf_lengths.clone(),
        }
        if self.optimizer is not None:
            state["optimizer"] = optimizer_state(self.optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock = int(state["clock"])
        self.phase = str(state["phase"])
        self.step = int(state.get("step", 0))
        self.seen = int(state["seen"])
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        tokens = state["buffer_tokens"].long()
        if tokens.shape[0] and tokens.shape[1] != self.seq_len:
            raise ValueError(f"sleep_wake buffer was saved with sequences of {tokens.shape[1]} tokens, "
                             f"this model replays {self.seq_len}")
        self.buf_tokens = tokens.reshape(-1, self.seq_len).clone()
        self.buf_lengths = state["buffer_lengths"].long().clone()
        if "optimizer" in state:
            self.optimizer = None
            self._pending_optimizer = state["optimizer"]
            if self.is_bound:
                self._optimizer(self.model)


def _gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Rows from every DDP rank, in rank order (just ``rows`` in a single process)."""
    from cortex.runtime.distributed import is_distributed

    if not is_distributed():
        return list(rows)
    import torch.distributed as dist

    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    return [r for part in parts for r in part]


@hookimpl
def cortex_register_components(register):
    register(SleepWake)
