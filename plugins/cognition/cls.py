"""Complementary learning systems (``cls``): a fast hippocampal path beside the slow cortex.

```yaml
features:
  - {type: cls, settings: {width: 32, fast_lr: 1.0e-2, slow_lr: 1.0e-4}}
  - {type: sleep_wake, settings: {wake: 1000, nrem: 50, rem: 20}}   # consolidation in NREM
```

**Two paths, two learning rates.**

- The *fast* (hippocampal) path is a small adapter in parallel with the MLP of each
  chosen block (``layers``, default all): ``mlp(x) + scale * B(act(A(x)))`` with ``A``
  (width x dim, random), ``act`` a GELU (``activation: gelu``; ``none`` makes it a
  rank-``width`` linear map, LoRA-style) and ``B`` (dim x width) zero at first, so a new
  model is unchanged. The nonlinearity matters: a linear rank-``r`` map holds about ``r``
  arbitrary associations, a GELU bottleneck of width ``r`` far more.
  It is installed with a forward hook on ``blocks.N.mlp`` (whatever module is there, e.g.
  cortical columns), so it acts in training, evaluation and generation alike. Its weights
  belong to this feature, not to the core: the training optimiser never sees them, and
  they are saved with the feature's state.
- The *slow* (neocortical) path is the core's own parameters.

This feature's optimiser (Adam) has two parameter groups: ``fast`` (the adapters) at
``fast_lr`` and ``slow`` (the core) at ``slow_lr``.

**When each learns.**

- Every chat turn (``cortex_interaction``, i.e. ``model.interact`` and ``cortex chat``):
  ``interaction_steps`` gradient steps of the fast path on the turn's text (the prompt;
  ``learn_from: turn`` adds the answer) — a fact told once is in the weights at once.
- Every training step (``train_fast``): the fast path takes a step at ``fast_lr`` on the
  gradient the training step already computed; the core takes the trainer's own step,
  of which it keeps the share ``slow_share`` (1 by default: the trainer's rate; below 1
  the core is pulled back toward its weights before the step, so the cortex learns new
  data slowly and mostly through consolidation, as complementary-learning-systems theory
  has it).
- NREM (``cortex_sleep(phase="nrem")``, fired by ``sleep_wake`` or by anyone):
  *consolidation*, fast -> slow through replay. For ``consolidation_steps`` steps, a batch
  of replayed memories (from the ``sleep_wake`` feature's replay pool when the model has
  one, else the turns this feature has kept) goes through the model twice: the *teacher*
  is the whole model as it was when sleep began (core snapshot plus the full fast path);
  the *student* is the live core plus the fast path scaled by ``keep``. The core (slow
  group, ``slow_lr``) learns to close the KL divergence between them; then the fast path
  is scaled by ``keep``. The model's function is preserved while what the fast path knew
  moves into the core, and the hippocampus is freed for new learning.
- The fast path also decays by ``decay`` per unit (training step or turn): hippocampal
  traces fade unless consolidated.

Under DDP the fast path's gradients are averaged over ranks before every update.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import F, nn, torch, no_grad
from cortex_plugins.cognition.sleep_wake import apply_gradients, lm_batch, load_optimizer_state, optimizer_state, quiet

if TYPE_CHECKING:
    from cortex import ModelHandle


class ComplementaryLearning(CognitiveFeature):
    """A fast low-rank path at a high learning rate, consolidated into the slow core (see the module docs)."""

    name = "cls"

    class Settings(Settings):
        layers: list[int] | None = Field(None, description="Blocks whose MLP gets a fast path (default: all).")
        width: int = Field(32, ge=1, description="Hidden width (rank) of each fast adapter.")
        activation: Literal["gelu", "none"] = Field("gelu", description="Nonlinearity of the fast adapters.")
        scale: float = Field(1.0, gt=0, description="Output scale of the fast adapters.")
        fast_lr: float = Field(1e-2, gt=0, description="Learning rate of the fast (hippocampal) path.")
        slow_lr: float = Field(1e-4, gt=0, description="Learning rate of the slow (neocortical) path in consolidation.")
        interaction_steps: int = Field(3, ge=0, description="Fast-path gradient steps on each chat turn.")
        learn_from: Literal["prompt", "turn"] = Field(
            "prompt", description="What a chat turn teaches: the prompt, or the prompt and the answer.")
        train_fast: bool = Field(True, description="Update the fast path at every training step too.")
        slow_share: float = Field(
            1.0, gt=0, le=1, description="Share of each training step's update the core keeps (1: the trainer's "
            "rate; 0.25: the cortex learns new data at a quarter of it and mostly through consolidation).")
        decay: float = Field(0.0, ge=0, lt=1, description="Share of the fast path lost per unit (step or turn).")
        consolidation_steps: int = Field(4, ge=0, description="Fast -> slow distillation steps in each NREM consolidation.")
        keep: float = Field(0.5, ge=0, le=1, description="Share of the fast path kept after a consolidation (0: cleared).")
        replay_batch: int = Field(8, ge=1, description="Sequences per consolidation step.")
        turns: int = Field(64, ge=0, description="Recent chat turns kept for consolidation without sleep_wake.")
        clip: float = Field(1.0, gt=0, description="Gradient-norm clipping of this feature's updates.")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        cfg = context.config
        if cfg is None:
            raise ValueError("cls needs the model's shape")
        layers = list(range(cfg.layers)) if settings.layers is None else list(settings.layers)
        bad = [i for i in layers if not 0 <= i < cfg.layers]
        if bad:
            raise ValueError(f"cls layers {bad} are not block indices (0..{cfg.layers - 1})")
        self.layers = layers
        self.tokenizer = context.tokenizer
        self.seq_len = int(cfg.context) + 1
        from cortex_plugins.cognition._fast_adapter import FastAdapter

        g = torch.Generator().manual_seed(int(context.seed) * 7919 + 1)
        self.adapters = nn.ModuleDict({
            str(i): FastAdapter(cfg.dim, settings.width, settings.scale, settings.activation, g) for i in layers
        }).to(context.device)
        self.fast_params = list(self.adapters.parameters())
        self.slow_params: list[torch.Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        #: multiplies every fast path's output (consolidation's student runs with ``keep``)
        self.factor = 1.0
        self.recent: deque[str] = deque(maxlen=settings.turns)
        self.counters = {"fast_updates": 0, "turns": 0, "consolidations": 0, "consolidation_steps": 0}
        self.last_consolidation_loss: float | None = None

    # ------------------------------------------------------------------ wiring

    @hookimpl
    def cortex_model_built(self, model: ModelHandle) -> None:
        for i in self.layers:
            mlp = model.core.blocks[i].mlp
            self._handles.append(mlp.register_forward_hook(self._hook(str(i))))
        self.slow_params = [p for p in model.core.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam([
            {"params": self.fast_params, "lr": self.settings.fast_lr, "name": "fast"},
            {"params": self.slow_params, "lr": self.settings.slow_lr, "name": "slow"},
        ])
        if self._pending_optimizer is not None:
            load_optimizer_state(self.optimizer, self._pending_optimizer)
            self._pending_optimizer = None

    def _hook(self, key: str):
        adapter = self.adapters[key]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.factor == 0.0:
                return output
            return output + self.factor * adapter(inputs[0])

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def group(self, name: str) -> dict[str, Any]:
        """This feature's optimiser parameter group ``fast`` or ``slow``."""
        assert self.optimizer is not None, "cls is not attached to a model yet"
        return next(g for g in self.optimizer.param_groups if g.get("name") == name)

    # ------------------------------------------------------------------ fast learning

    def _fast_step(self, grads: list[torch.Tensor | None]) -> None:
        assert self.optimizer is not None
        apply_gradients(self.optimizer, self.fast_params, grads, self.settings.clip)
        self.counters["fast_updates"] += 1

    @no_grad
    def _decay(self) -> None:
        if self.settings.decay:
            for adapter in self.adapters.values():
                adapter.B.mul_(1.0 - self.settings.decay)

    def learn_text(self, model: Any, text: str, steps: int | None = None) -> float | None:
        """``steps`` fast-path gradient steps on ``text``; the loss before the first one."""
        steps = self.settings.interaction_steps if steps is None else steps
        ids = self.tokenizer.encode(text) if self.tokenizer is not None else []
        if len(ids) < 2 or steps == 0:
            return None
        windows = [torch.tensor(ids[i: i + self.seq_len], dtype=torch.long)
                   for i in range(0, max(1, len(ids) - 1), self.seq_len - 1)]
        windows = [w for w in windows if w.numel() >= 2]
        pad = self.tokenizer.eos_id
        inputs, targets = lm_batch(windows, pad, next(model.core.parameters()).device)
        first = None
        for _ in range(steps):
            with torch.enable_grad(), quiet(model):
                _, loss = model.core(inputs, targets)
                grads = torch.autograd.grad(loss, self.fast_params, allow_unused=True)
            self._fast_step(list(grads))
            first = float(loss.detach()) if first is None else first
        return first

    @hookimpl
    def cortex_interaction(self, model: ModelHandle, session: str, prompt: str, response: str) -> None:
        text = prompt if self.settings.learn_from == "prompt" else prompt + response
        self.counters["turns"] += 1
        self.recent.append(text)
        self.learn_text(model, text)
        self._decay()

    @hookimpl
    def cortex_before_step(self, model: ModelHandle, step: int, batch: torch.Tensor) -> None:
        if self.settings.slow_share < 1.0:
            self._before = [p.detach().clone() for p in self.slow_params]

    @hookimpl(tryfirst=True)  # before any other step-end work (sleep replay) changes the core
    def cortex_after_step(self, model: ModelHandle, step: int, metrics: dict[str, float]) -> None:
        if self._before is not None:
            with torch.no_grad():
                for p, old in zip(self.slow_params, self._before):
                    p.lerp_(old, 1.0 - self.settings.slow_share)
            self._before = None
        grads = [p.grad for p in self.fast_params]
        for p in self.fast_params:
            p.grad = None  # the training step's backward left them here; the trainer does not clear them
        if self.settings.train_fast and any(g is not None for g in grads):
            self._fast_step([None if g is None else g.clone() for g in grads])
        self._decay()
        metrics["cls/fast_norm"] = self.fast_norm()

    def fast_norm(self) -> float:
        """Frobenius norm of the fast path's output matrices ``B`` (0 for a fresh model)."""
        return float(torch.sqrt(sum((a.B.detach().float() ** 2).sum() for a in self.adapters.values())))

    # ------------------------------------------------------------------ consolidation

    def _replay_sequences(self, model: Any, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        for feature in model.features:
            if feature is not self and isinstance(feature, CognitiveFeature):
                seqs = feature.replay_sequences(n, generator)
                if seqs:
                    return seqs
        texts = list(self.recent)
        if not texts or self.tokenizer is None:
            return []
        picks = torch.randint(0, len(texts), (n,), generator=generator).tolist()
        seqs = [torch.tensor(self.tokenizer.encode(texts[i])[: self.seq_len], dtype=torch.long) for i in picks]
        return [s for s in seqs if s.numel() >= 2]

    def consolidate(self, model: Any | None = None, step: int = 0) -> float | None:
        """Move the fast path into the core through replay (see the module docs); returns
        the mean distillation loss, or None when there was nothing to replay."""
        model = model or self.model
        s = self.settings
        assert self.optimizer is not None
        core = model.core
        snapshot = {n: p.detach().clone() for n, p in core.named_parameters()}
        device = next(core.parameters()).device
        losses = []
        for i in range(s.consolidation_steps):
            g = torch.Generator().manual_seed(int(self.context.seed) * 1_000_003 + step * 101 + i)
            seqs = self._replay_sequences(model, s.replay_batch, g)
            if not seqs:
                break
            inputs, targets = lm_batch(seqs, self.tokenizer.eos_id, device)
            valid = targets >= 0
            with quiet(model):
                with torch.no_grad():
                    teacher, _ = torch.func.functional_call(core, snapshot, (inputs,))
                self.factor = s.keep
                try:
                    with torch.enable_grad():
                        student, _ = core(inputs)
                        kl = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
                                      log_target=True, reduction="none").sum(-1)
                        loss = kl[valid].mean()
                        grads = torch.autograd.grad(loss, self.slow_params, allow_unused=True)
                finally:
                    self.factor = 1.0
            apply_gradients(self.optimizer, self.slow_params, list(grads), s.clip)
            losses.append(float(loss.detach()))
            self.counters["consolidation_steps"] += 1
        with torch.no_grad():
            for adapter in self.adapters.values():
                adapter.B.mul_(s.keep)
        self.counters["consolidations"] += 1
        self.last_consolidation_loss = sum(losses) / len(losses) if losses else None
        return self.last_consolidation_loss

    @hookimpl
    def cortex_sleep(self, model: ModelHandle, phase: str, step: int) -> None:
        if phase == "nrem":
            self.consolidate(model, step)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return {"layers": self.layers, "width": self.settings.width, "fast_norm": self.fast_norm(),
                "fast_lr": self.settings.fast_lr, "slow_lr": self.settings.slow_lr,
                "last_consolidation_loss": self.last_consolidation_loss, **self.counters}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "adapters": {k: v.detach().clone() for k, v in self.adapters.state_dict().items()},
            "counters": dict(self.counters), "recent": list(self.recent),
        }
        if self.optimizer is not None:
            state["optimizer"] = optimizer_state(self.optimizer)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.adapters.load_state_dict({k: v for k, v in state["adapters"].items()})
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
        if "optimizer" in state:
            if self.optimizer is not None:
                load_optimizer_state(self.optimizer, state["optimizer"])
            else:
                self._pending_optimizer = state["optimizer"]


@hookimpl
def cortex_register_components(register):
    register(ComplementaryLearning)
