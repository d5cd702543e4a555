"""Cortical columns (``cortical_columns``): a block's MLP as N sparsely active columns.

```yaml
plasticity:
  - type: cortical_columns
    target: "blocks.*.mlp"
    settings: {columns: 8, active: 2, selection: topk, balance: 0.01}
```

At attach time every module the ``target`` glob selects (an MLP with ``fc`` and ``proj``
linear layers, e.g. ``blocks.*.mlp``) is replaced by a
[`ColumnMLP`][cortex_plugins.plasticity._column_mlp.ColumnMLP]. Its hidden layer is cut into
``columns`` equal columns (column ``c`` owns hidden units ``c*H/N ... (c+1)*H/N - 1`` of
``fc`` and the matching inputs of ``proj``), so it keeps the MLP's own ``fc`` and ``proj``
(same parameters, same names: rules targeting ``blocks.*.mlp.fc`` still find them) and
adds one small router ``dim -> columns``. Parameter count: the MLP's plus ``dim x columns``.

Per token, **exactly k of the N columns are active** (k-winners-take-all):

- the router scores every column; the selection score adds the column's balancing boost
  (below) and, with ``selection: gumbel`` in training only, Gumbel noise times
  ``temperature`` — the Gumbel-top-k trick, which samples k columns without replacement
  from ``softmax(score / temperature)``;
- the k best selection scores win, in training and evaluation alike (evaluation adds no
  noise); the other columns' outputs are zeroed;
- the winners' outputs are weighted by ``k * softmax`` of their router scores (so the
  router learns by gradient, and a uniform router gives weight 1 to each winner).

``active`` sets k directly; ``sparsity`` sets the share of columns that stay silent
(``k = columns - round(sparsity * columns)``, at least 1). Give one of them; the default is
``active: 1``.

The plastic part is a non-gradient homeostatic **boost** at step end, like the duty-cycle
boosting of k-WTA layers: each column's usage ``u_c`` (the firing rate of its selection,
averaged over DDP ranks) moves its boost by ``balance * (k/N - u_c) / (k/N)``, so columns
used less than their share win more often. ``balance: 0`` turns it off. The boosts and the
usage counts are the rule's state (saved with runs). ``stats()`` reports the active columns:
mean active per token (always k) and the usage histogram.

It is a component of kind ``plasticity`` because it selects its modules by the rules'
target glob and changes them outside backprop (module swap at attach, boost at step end).
Put it before other rules that target the MLP module itself (rules targeting ``mlp.fc``
or ``mlp.proj`` may come in any order).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cortex import hookimpl
from cortex.kernel.interfaces import PlasticityRule, Settings
from cortex.kernel.lazy import F, nn, torch


class CorticalColumns(PlasticityRule):
    """Replaces target MLPs by [`ColumnMLP`][cortex_plugins.plasticity._column_mlp.ColumnMLP]s
    with k-winners-take-all columns and usage boosting (see the module docs)."""

    name = "cortical_columns"

    class Settings(Settings):
        columns: int = Field(4, ge=2, description="Columns per MLP (must divide its hidden width).")
        active: int | None = Field(None, ge=1, description="Columns active per token (k).")
        sparsity: float | None = Field(
            None, ge=0, lt=1, description="Share of columns silent per token (alternative to `active`).")
        selection: Literal["topk", "gumbel"] = Field(
            "topk", description="`topk`: the k best router scores; `gumbel`: Gumbel-top-k sampling in "
            "training (plain top-k in evaluation).")
        temperature: float = Field(1.0, gt=0, description="Gumbel noise scale of `selection: gumbel`.")
        balance: float = Field(0.01, ge=0, description="Step of the usage-balancing boost (0: off).")

        @model_validator(mode="after")
        def _k(self):
            if self.active is not None and self.sparsity is not None:
                raise ValueError("give `active` or `sparsity`, not both")
            if self.active is not None and self.active > self.columns:
                raise ValueError(f"active {self.active} is more than columns {self.columns}")
            return self

        @property
        def k(self) -> int:
            if self.active is not None:
                return self.active
            if self.sparsity is not None:
                return max(1, self.columns - round(self.sparsity * self.columns))
            return 1

    def __init__(self, settings: Settings, context: Any, target: str = "*") -> None:
        super().__init__(settings, context, target)
        #: per target: fraction of tokens that activated each column, over the whole run
        self.usage: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, float] = {}
        self.updates = 0

    def attach(self, root: nn.Module) -> None:
        from cortex_plugins.plasticity._column_mlp import ColumnMLP

        super().attach(root)
        s = self.settings
        # a glob like 'blocks.*.mlp*' also matches the MLPs' own children: keep the outermost
        self.targets = {n: m for n, m in self.targets.items()
                        if not any(n.startswith(p + ".") for p in self.targets)}
        replaced: dict[str, nn.Module] = {}
        for name, module in self.targets.items():
            if isinstance(module, ColumnMLP):
                replaced[name] = module
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            try:
                columns = ColumnMLP(module, s.columns, s.k, selection=s.selection, temperature=s.temperature)
            except ValueError as exc:
                raise ValueError(f"cortical_columns target {name!r}: {exc}") from None
            setattr(parent, child, columns)
            replaced[name] = columns
        self.targets = replaced
        for name, module in self.targets.items():
            self.usage[name] = torch.zeros(s.columns, device=module.boost.device)
            self.tokens[name] = 0.0

    def apply(self, name: str, module: nn.Module) -> None:
        from cortex_plugins.plasticity._column_mlp import ColumnMLP

        if not isinstance(module, ColumnMLP):
            return
        n = float(module.tokens)
        if n == 0:
            return
        rate = self.reduce_mean_(module.usage / n)
        module.usage.zero_()
        module.tokens.zero_()
        share = self.settings.k / self.settings.columns
        self.usage[name] = (self.usage[name] * self.tokens[name] + rate * n) / (self.tokens[name] + n)
        self.tokens[name] += n
        if self.settings.balance > 0:
            module.boost += self.settings.balance * (share - rate) / share
        self.updates += 1

    def stats(self) -> dict[str, Any]:
        """Active columns: mean active per token and the usage histogram (share of tokens per column)."""
        seen = [name for name, t in self.tokens.items() if t > 0]
        hist = torch.stack([self.usage[n] for n in seen]).mean(0) if seen else None
        return {
            "columns": self.settings.columns,
            "k": self.settings.k,
            "active_per_token": None if hist is None else float(hist.sum()),
            "usage": None if hist is None else [round(float(u), 4) for u in hist],
            "per_target": {n: [round(float(u), 4) for u in self.usage[n]] for n in seen},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "boost": {n: m.boost.clone() for n, m in self.targets.items()},
            "usage": dict(self.usage),
            "tokens": dict(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        for name, value in state.get("boost", {}).items():
            if name in self.targets:
                self.targets[name].boost.copy_(value)
        for name, value in state.get("usage", {}).items():
            if name in self.usage:
                self.usage[name] = value.to(self.usage[name].device).float().clone()
        for name, value in state.get("tokens", {}).items():
            if name in self.tokens:
                self.tokens[name] = float(value)


@hookimpl
def cortex_register_components(register):
    register(CorticalColumns)
