"""BCM metaplasticity (``bcm``): Hebbian learning with a sliding modification threshold.

```yaml
plasticity:
  - type: bcm
    target: "blocks.*.mlp.fc"
    settings: {lr: 0.0001, tau: 20, max_norm: 1.0}
```

Bienenstock, Cooper and Munro (1982). For a target ``nn.Linear`` with ``y = W x`` (bias
ignored), averaged over the tokens of a training step::

    dw_i   = lr * mean_tokens( x * y_i * (y_i - theta_i) )
    theta_i <- theta_i + (mean_tokens(y_i^2) - theta_i) / tau

(``theta_i`` starts at the first step's ``mean_tokens(y_i^2)`` unless ``theta_init`` is set.)
A unit whose response is above its threshold ``theta_i`` is potentiated by that input,
below it depressed. The threshold slides with the unit's recent activity: ``theta_i`` is an
exponential moving average of ``y_i^2`` with a time constant of ``tau`` steps, so it
tracks ``E[y_i^2]``. A unit that responds to everything raises its own threshold and loses
its weaker responses: given two input patterns, it becomes selective to one of them (the
other's response falls to zero). ``tau`` must be short compared with the weights' time
scale (``1 / lr``) for the rule to be stable; ``max_norm`` bounds the rows in a model.

``theta`` (one value per unit per target) is the rule's state: it is saved with runs and
checkpoints, and the per-step statistics are averaged over DDP ranks before use.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import PlasticityRule, RuleSettings
from cortex.kernel.lazy import nn, torch

from cortex_plugins.plasticity.hebbian import linear_targets


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).float()


class BCMRule(PlasticityRule):
    """BCM rule with a sliding threshold ``theta`` = EMA of ``y^2`` (see the module docs)."""

    name = "bcm"

    class Settings(RuleSettings):
        lr: float = Field(1e-3, ge=0, description="Learning rate of the weight update.")
        tau: float = Field(10.0, ge=1.0, description="Time constant of the sliding threshold, in steps.")
        theta_init: float | None = Field(
            None, ge=0, description="Initial threshold (default: E[y^2] of the first step observed).")

    def __init__(self, settings: Settings, context: Any, target: str = "*") -> None:
        super().__init__(settings, context, target)
        self.theta: dict[str, torch.Tensor] = {}
        self._stats: dict[str, list[Any]] = {}
        self._rate: dict[str, torch.Tensor] = {}
        self.updates = 0

    def attach(self, root: nn.Module) -> None:
        super().attach(root)
        linear_targets(self)
        if self.settings.theta_init is not None:
            for name, module in self.targets.items():
                out = module.weight.shape[0]
                self.theta[name] = torch.full((out,), self.settings.theta_init, device=module.weight.device)

    def observe(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = _flat(inputs[0])
        # y = W x recomputed in float32: the rule's y whatever autocast or an earlier rule's
        # hook (e.g. homeostasis) made of the module's output. Autocast is off here: under a
        # bf16 autocast the products would come out in bf16, and theta (the rule's state,
        # restored in float32) would be a bf16 tensor only in a run that never resumed.
        with torch.autocast(x.device.type, enabled=False):
            y = x @ module.weight.detach().float().T
            # y (y - theta) x = y^2 x - theta y x: sums kept apart so that theta is applied at
            # step end, after the statistics are averaged over ranks (the same theta on every rank)
            parts = [y.square().T @ x, y.T @ x, y.square().sum(0), x.shape[0]]
        acc = self._stats.get(name)
        if acc is None:
            self._stats[name] = parts
        else:
            for i, p in enumerate(parts):
                acc[i] += p
        self._rate[name] = self.firing_rate(output)

    def apply(self, name: str, module: nn.Module) -> None:
        acc = self._stats.pop(name, None)
        if acc is None:
            return
        n = acc[3]
        y2x, yx, y2 = (self.reduce_mean_(t / n) for t in acc[:3])
        theta = self.theta.get(name)
        if theta is None:  # first step: start the threshold at this step's E[y^2]
            theta = self.theta[name] = y2.float().clone()
        module.weight.add_((self.lr * (y2x - theta[:, None] * yx)).to(module.weight.dtype))
        theta += (y2 - theta) / self.settings.tau
        self.updates += 1

    def stats(self) -> dict[str, Any]:
        rates = [float(r.mean()) for r in self._rate.values()]
        thetas = [float(t.mean()) for t in self.theta.values()]
        return {
            "targets": len(self.targets),
            "updates": self.updates,
            "theta": sum(thetas) / len(thetas) if thetas else None,
            "rate": sum(rates) / len(rates) if rates else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "theta": dict(self.theta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        for name, value in state.get("theta", {}).items():
            if name in self.targets:
                device = self.targets[name].weight.device
                self.theta[name] = value.to(device).float().clone()


@hookimpl
def cortex_register_components(register):
    register(BCMRule)
