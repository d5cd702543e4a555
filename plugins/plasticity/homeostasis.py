"""Homeostatic plasticity (``homeostasis``): hold each unit's firing rate near a target.

```yaml
plasticity:
  - type: homeostasis
    target: "blocks.*.mlp.fc"
    settings: {target_rate: 0.1, lr: 1.0, mode: shift}
```

The targeted modules' outputs (..., units) are the units. Each unit ``i`` gets a gain
``g_i`` and a shift ``b_i``; a forward hook replaces the module's output ``a`` by
``g_i * a - b_i`` in training *and* evaluation, so the adjusted unit is what the rest of
the model sees. Gains and shifts are buffers of the rule, never parameters: the optimiser
cannot undo them, and they are saved with runs and checkpoints.

At the end of every training step the unit's firing rate ``r_i`` over that step's tokens
([`firing_rate`][cortex.kernel.interfaces.firing_rate]: share of tokens with adjusted activation
above ``threshold``, 0 by default — for ``mlp.fc`` the share of tokens in the active half
of the GELU) is averaged over DDP ranks and moves the controls toward ``target_rate``:

- ``mode: shift`` (intrinsic plasticity, the default) raises the unit's threshold when it
  fires too often: ``b_i += lr * (r_i - target_rate) * s_i``, with ``s_i`` a running
  standard deviation (time constant ``scale_tau`` steps) of the unit's raw activation, so
  the step is scale-free;
- ``mode: gain`` (synaptic scaling) scales the unit multiplicatively:
  ``g_i *= exp(-lr * (r_i - target_rate))`` (kept within ``[0.001, 1000]``). Scaling
  cannot change the sign of an activation, so this mode needs ``threshold > 0``, and a
  unit reaches the target only if its activation is positive on at least ``target_rate``
  of the tokens.

Both are integral controllers: at equilibrium each unit fires on ``target_rate`` of the
tokens. A population of a fresh model's ``mlp.fc`` units (rate about 0.5, five times the
default target of 0.1) reaches it within a few dozen steps.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cortex import hookimpl
from cortex.kernel.interfaces import PlasticityRule, RuleSettings
from cortex.kernel.lazy import nn, torch


class Homeostasis(PlasticityRule):
    """Per-unit gain / threshold control toward ``target_rate`` (see the module docs)."""

    name = "homeostasis"

    class Settings(RuleSettings):
        target_rate: float = Field(0.1, gt=0, lt=1, description="Firing rate each unit is held at.")
        lr: float = Field(1.0, ge=0, description="Controller step per unit of rate error.")
        mode: Literal["shift", "gain"] = Field(
            "shift", description="`shift`: adapt each unit's threshold (additive); `gain`: scale its output "
            "(multiplicative, needs threshold > 0).")
        scale_tau: float = Field(
            5.0, ge=1, description="Time constant, in steps, of the running activation scale of `shift`.")

        @model_validator(mode="after")
        def _gain_needs_threshold(self):
            if self.mode == "gain" and self.threshold <= 0:
                raise ValueError("mode 'gain' cannot change the sign of an activation: set threshold > 0")
            return self

    def __init__(self, settings: Settings, context: Any, target: str = "*") -> None:
        super().__init__(settings, context, target)
        self.gain: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.scale: dict[str, torch.Tensor] = {}
        #: per target: firing counts (units,), token count, sum and sum of squares of activations
        self._acc: dict[str, list[Any]] = {}
        #: per target: the rate measured at the last step end (units,)
        self.rate: dict[str, torch.Tensor] = {}
        self.updates = 0

    @property
    def needs_hooks(self) -> bool:
        return True  # the adjusted output is part of the model's function

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"homeostasis target {name!r} must return a tensor, got {type(output).__name__}")
            if name not in self.gain:
                self._allocate(name, output)
            gain, shift = self.gain[name], self.shift[name]
            out = torch.addcmul(-shift.to(output.dtype), output, gain.to(output.dtype))
            if self.observing and module.training:
                with torch.no_grad():
                    self.observe(name, module, inputs, out)
            return out

        return hook

    def _allocate(self, name: str, output: torch.Tensor) -> None:
        units, device = output.shape[-1], output.device
        self.gain[name] = torch.ones(units, device=device)
        self.shift[name] = torch.zeros(units, device=device)
        self.scale[name] = torch.zeros(units, device=device)

    def observe(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        a = output.detach().reshape(-1, output.shape[-1]).float()
        fired = self.firing_rate(a) * a.shape[0]
        parts = [fired, a.shape[0], a.sum(0), a.square().sum(0)]
        acc = self._acc.get(name)
        if acc is None:
            self._acc[name] = parts
        else:
            for i, p in enumerate(parts):
                acc[i] += p

    def apply(self, name: str, module: nn.Module) -> None:
        acc = self._acc.pop(name, None)
        if acc is None:
            return
        fired, n, s1, s2 = acc
        stats = self.reduce_mean_(torch.stack([fired / n, s1 / n, s2 / n]))
        rate, mean, meansq = stats
        self.rate[name] = rate
        error = rate - self.settings.target_rate
        if self.settings.mode == "gain":
            self.gain[name] = (self.gain[name] * torch.exp(-self.lr * error)).clamp_(1e-3, 1e3)
        else:
            # std of the *raw* activation: the adjusted one is gain * raw - shift
            std = ((meansq - mean.square()).clamp_min(0).sqrt() / self.gain[name]).clamp_min(1e-6)
            scale = self.scale[name]
            if self.updates == 0 or not bool(scale.any()):
                scale.copy_(std)
            else:
                scale += (std - scale) / self.settings.scale_tau
            self.shift[name] += self.lr * error * scale * self.gain[name]
        self.updates += 1

    def step_end(self, model: Any, step: int, metrics: dict[str, float]) -> None:
        super().step_end(model, step, metrics)
        if self.rate:
            metrics[f"{self.key}.rate"] = float(torch.cat(list(self.rate.values())).mean())

    def mean_rate(self) -> float | None:
        """Mean over every targeted unit of its rate at the last step end."""
        if not self.rate:
            return None
        return float(torch.cat(list(self.rate.values())).mean())

    def stats(self) -> dict[str, Any]:
        rates = torch.cat(list(self.rate.values())) if self.rate else None
        tol = 0.1 * self.settings.target_rate
        return {
            "targets": len(self.targets),
            "updates": self.updates,
            "target_rate": self.settings.target_rate,
            "rate": None if rates is None else float(rates.mean()),
            "units_within_10pct": None if rates is None else float(((rates - self.settings.target_rate).abs()
                                                                    <= tol).float().mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "gain": dict(self.gain), "shift": dict(self.shift),
                "scale": dict(self.scale)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        for key in ("gain", "shift", "scale"):
            target = getattr(self, key)
            for name, value in state.get(key, {}).items():
                if name in self.targets:
                    device = next(self.targets[name].parameters(), torch.empty(0)).device
                    target[name] = value.to(device).float().clone()


@hookimpl
def cortex_register_components(register):
    register(Homeostasis)
