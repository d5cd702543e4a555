"""The hooks of Cortex. Each docstring below is the hook's reference documentation.

Hooks *register* and *notify*; behaviour lives in component classes. A plugin module
implements hooks with the [`cortex.hookimpl`][cortex.hookimpl] marker; a built component
instance is registered on its model's plugin manager, so its own ``@hookimpl`` methods
are called by the runtime too. Lifecycle hooks fire per step or per interaction, never
per token. The ``model`` they receive is a [`ModelHandle`][cortex.kernel.interfaces.ModelHandle].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from cortex.kernel.interfaces import ModelHandle

hookspec = pluggy.HookspecMarker("cortex")
#: marks a plugin's or a component's hook implementations
hookimpl = pluggy.HookimplMarker("cortex")


@hookspec
def cortex_register_components(register: Callable[[type], None]) -> None:
    """Hand the kernel this plugin's component classes.

    :param register: call ``register(cls)`` once for each class. A class declares ``kind``
        (``"memory"``, ``"plasticity"``, ``"feature"``, ``"data"``, ``"logger"`` or ``"bench"``),
        ``name`` and a pydantic ``Settings`` model; its ``@hookimpl`` methods and the interface
        methods it overrides are checked against the hooks and the interfaces here.

    Built-in components keep their plain name (``stm``); a third-party component is
    registered as ``<entry point name>.<name>`` (``hopfield.hebbian``), so it can never
    clash with a built-in. Called once per plugin manager, when plugins load.
    """


@hookspec
def cortex_register_commands(app: Any) -> None:
    """Add commands to the ``cortex`` command line.

    :param app: the CLI's ``typer.Typer`` application; add a command with
        ``@app.command()``.

    Called once when the CLI starts, with every plugin loaded. A command raising
    [`CortexError`][cortex.kernel.errors.CortexError] is reported in one line, as the
    built-in commands are. ``cortex graph`` comes from the ``cognition_graph`` plugin this way.
    """


@hookspec
def cortex_model_built(model: ModelHandle) -> None:
    """Called once when a manifest has been assembled into ``model``, before any step.

    :param model: the built model; every component is already bound to it
        ([`Component.model`][cortex.kernel.interfaces.Component.model]).

    Use it to attach forward hooks, allocate state or check that other components you
    depend on are present.
    """


@hookspec
def cortex_before_step(model: ModelHandle, step: int, batch: torch.Tensor) -> None:
    """Called before the forward pass of a training step.

    :param step: the step number, 0-based.
    :param batch: the step's first micro-batch of token ids, (B, T + 1).

    Called once per optimiser step, also under gradient accumulation.
    """


@hookspec
def cortex_extra_losses(
    model: ModelHandle, batch: torch.Tensor, logits: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Return named auxiliary loss terms for this micro-batch, or ``None``.

    :param batch: the micro-batch of token ids, (B, T + 1).
    :param logits: the model's logits for it, (B, T, vocab).

    The returned scalars are added to the language-modelling loss (already weighted by the
    plugin) and logged under their names. A name returned by two plugins is an error.
    """


@hookspec
def cortex_after_step(model: ModelHandle, step: int, metrics: dict[str, float]) -> None:
    """Called after the optimiser update of step ``step``.

    :param metrics: the step's logged figures; plugins may add entries, which are logged.

    Non-gradient updates (consolidation, running statistics) happen here, under
    ``torch.no_grad()``. Plasticity rules do not implement it: the model runs every
    rule's ``step_end``, in manifest order, after all implementations of this hook.
    """


@hookspec
def cortex_sleep(model: ModelHandle, phase: str, step: int) -> None:
    """Called when the model enters a sleep-cycle phase.

    :param phase: ``"wake"``, ``"nrem"`` or ``"rem"``.
    :param step: the training step at which the phase begins.
    """


@hookspec
def cortex_interaction(model: ModelHandle, session: str, prompt: str, response: str) -> None:
    """Called after each turn of real-time use (``cortex chat`` or the Python API).

    :param session: the session the turn belongs to (``"self"`` by default).
    :param prompt: what the user said.
    :param response: what the model answered.
    """
