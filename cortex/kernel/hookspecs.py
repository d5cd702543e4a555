"""The hooks of Cortex. Each docstring below is the hook's reference documentation.

Hooks *register* and *notify*; behaviour lives in component classes. A plugin module
implements hooks with the [`cortex.hookimpl`][cortex.hookimpl] marker; a built component
instance is registered on its model's plugin manager, so its own ``@hookimpl`` methods
are called by the runtime too. Lifecycle hooks fire per step or per interaction, never
per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from cortex.assemble import CortexModel

hookspec = pluggy.HookspecMarker("cortex")
#: marks a plugin's or a component's hook implementations
hookimpl = pluggy.HookimplMarker("cortex")


@hookspec
def cortex_register_components(register: Callable[[type], None]) -> None:
    """Hand the kernel this plugin's component classes.

    Call ``register(cls)`` once for each class. A class declares ``kind`` (``"memory"``,
    ``"plasticity"``, ``"feature"``, ``"data"`` or ``"bench"``), ``name`` and a pydantic
    ``Settings`` model. Built-in components keep their plain name (``stm``); a third-party
    component is registered as ``<entry point name>.<name>`` (``hopfield.hebbian``), so it
    can never clash with a built-in.
    """


@hookspec
def cortex_model_built(model: CortexModel) -> None:
    """Called once when a manifest has been assembled into ``model``, before any step.

    Use it to attach forward hooks, allocate state or check that other components you
    depend on are present.
    """


@hookspec
def cortex_before_step(model: CortexModel, step: int, batch: torch.Tensor) -> None:
    """Called before the forward pass of training step ``step`` (0-based) on ``batch``."""


@hookspec
def cortex_extra_losses(
    model: CortexModel, batch: torch.Tensor, logits: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Return named auxiliary loss terms for this step, or ``None``.

    The returned scalars are added to the language-modelling loss (already weighted by the
    plugin) and logged under their names. A name returned by two plugins is an error.
    """


@hookspec
def cortex_after_step(model: CortexModel, step: int, metrics: dict[str, float]) -> None:
    """Called after the optimiser update of step ``step``.

    Non-gradient updates (plasticity rules, consolidation) happen here, under
    ``torch.no_grad()``. Plugins may add entries to ``metrics``; they are logged.
    """


@hookspec
def cortex_sleep(model: CortexModel, phase: str, step: int) -> None:
    """Called when the model enters a sleep-cycle phase: ``"wake"``, ``"nrem"`` or ``"rem"``."""


@hookspec
def cortex_interaction(model: CortexModel, session: str, prompt: str, response: str) -> None:
    """Called after each turn of real-time use (``cortex chat`` or the Python API)."""


@hookspec
def cortex_state_save(model: CortexModel) -> dict[str, Any] | None:
    """Return this plugin's state to be stored with the model, keyed by a unique name.

    Values may be tensors, JSON-compatible data, or dicts of those. The kernel writes
    tensors to safetensors and the rest to JSON, atomically, in the run directory; the
    same dict comes back through [`cortex_state_load`][cortex.kernel.hookspecs.cortex_state_load].
    """


@hookspec
def cortex_state_load(model: CortexModel, state: dict[str, Any]) -> None:
    """Restore this plugin's state from ``state``, the merged dict every plugin saved.

    Take your own key(s) only. Called after the model weights are loaded.
    """
