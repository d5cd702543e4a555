"""Hebbian plasticity (``hebbian``): Oja's normalised Hebbian rule on linear layers.

```yaml
plasticity:
  - type: hebbian
    target: "blocks.*.mlp.fc"
    settings: {lr: 0.0001, rule: oja, norm: initial}
```

For a target ``nn.Linear`` with ``y = W x`` (bias ignored) and the inputs ``x`` and
outputs ``y`` of every token the layer saw in a training step, each row ``w_i`` moves by
Oja's rule, averaged over the step's tokens::

    dw_i = lr * (y_i x - y_i^2 w_i / r_i^2)

With ``r_i = 1`` this is Oja (1982): the Hebbian term ``y x`` grows the weights along the
input's directions of largest variance, the decay term ``y^2 w`` keeps ``|w_i|`` at ``r_i``,
and a single unit converges to the first principal component of its (zero-mean) inputs.
``norm`` sets ``r_i``: a number, or ``initial`` to keep each row's norm at attach time (so
the rule turns rows toward principal directions without rescaling a trained layer).

``rule: sanger`` is Sanger's generalised Hebbian algorithm: the decay term of row ``i``
sums over rows ``j <= i`` (``dW = lr * (y x^T - tril(y y^T) W)``), so rows converge to the
leading principal components in order instead of all to the first.

Settings shared by every rule (see [`RuleSettings`][cortex.kernel.interfaces.RuleSettings]):
``lr``, ``warmup`` (linear ramp of ``lr``), ``max_norm`` (bound on row norms),
``threshold`` (firing-rate threshold of the reported ``rate``). Under DDP the averaged
statistics are reduced over ranks before the update, so every rank applies the same one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import PlasticityRule, RuleSettings
from cortex.kernel.lazy import nn, torch


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).float()


def linear_targets(rule: PlasticityRule) -> None:
    """Raise unless every target of ``rule`` is an ``nn.Linear``."""
    bad = [n for n, m in rule.targets.items() if not isinstance(m, nn.Linear)]
    if bad:
        raise ValueError(
            f"{rule.name} needs nn.Linear targets (e.g. 'blocks.*.mlp.fc'); {bad[0]!r} is "
            f"{type(rule.targets[bad[0]]).__name__}"
        )


class HebbianRule(PlasticityRule):
    """Oja's (or Sanger's) normalised Hebbian rule on ``nn.Linear`` targets (see the module docs)."""

    name = "hebbian"

    class Settings(RuleSettings):
        lr: float = Field(1e-3, ge=0, description="Learning rate of the Hebbian update.")
        rule: Literal["oja", "sanger"] = Field(
            "oja", description="`oja`: every row learns the first principal component; `sanger`: rows learn "
            "the leading components in order.")
        norm: float | Literal["initial"] = Field(
            1.0, description="Row norm the decay term holds each row at: a number, or `initial` (each row's "
            "norm when the rule was attached).")

    def __init__(self, settings: Settings, context: Any, target: str = "*") -> None:
        super().__init__(settings, context, target)
        #: per target: running sums of y x^T (out, in), of y^2 (out,) or y y^T (out, out), token count
        self._yx: dict[str, torch.Tensor] = {}
        self._yy: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}
        self._rate: dict[str, torch.Tensor] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.last_delta = 0.0

    def attach(self, root: nn.Module) -> None:
        super().attach(root)
        linear_targets(self)
        for name, module in self.targets.items():
            w = module.weight.detach().float()
            if self.settings.norm == "initial":
                self.norms[name] = w.norm(dim=1).clamp_min(1e-8)
            else:
                self.norms[name] = torch.full((w.shape[0],), float(self.settings.norm), device=w.device)

    def observe(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = _flat(inputs[0])
        # y = W x recomputed in float32: the rule's y whatever autocast or an earlier rule's
        # hook (e.g. homeostasis) made of the module's output
        y = x @ module.weight.detach().float().T
        yx = y.T @ x
        yy = y.T @ y if self.settings.rule == "sanger" else y.square().sum(0)
        if name in self._yx:
            self._yx[name] += yx
            self._yy[name] += yy
            self._n[name] += x.shape[0]
        else:
            self._yx[name], self._yy[name], self._n[name] = yx, yy, x.shape[0]
        self._rate[name] = self.firing_rate(output)

    def apply(self, name: str, module: nn.Module) -> None:
        if name not in self._yx:
            return
        n = self._n.pop(name)
        yx = self.reduce_mean_(self._yx.pop(name) / n)
        yy = self.reduce_mean_(self._yy.pop(name) / n)
        w = module.weight.detach().float()
        r2 = self.norms[name].to(w.device).square()
        if self.settings.rule == "sanger":
            decay = torch.tril(yy) @ w
        else:
            decay = yy[:, None] * w
        delta = self.lr * (yx - decay / r2[:, None])
        module.weight.add_(delta.to(module.weight.dtype))
        self.last_delta = float(delta.norm())
        self.updates += 1

    def stats(self) -> dict[str, Any]:
        rates = [float(r.mean()) for r in self._rate.values()]
        return {
            "targets": len(self.targets),
            "updates": self.updates,
            "last_delta_norm": self.last_delta,
            "rate": sum(rates) / len(rates) if rates else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "norms": dict(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        for name, value in state.get("norms", {}).items():
            if name in self.norms:
                self.norms[name] = value.to(self.norms[name].device).float()


@hookimpl
def cortex_register_components(register):
    register(HebbianRule)
