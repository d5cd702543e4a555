"""Assembly: a validated manifest becomes a model — core, memory tiers, rules, features."""

from __future__ import annotations

from pathlib import Path

import torch

from cortex.core.tokenizer import Tokenizer, tokenizer_from_spec
from cortex.core.transformer import ModelConfig, Transformer
from cortex.kernel.errors import PluginError
from cortex.kernel.interfaces import BuildContext, Component
from cortex.kernel.manifest import ValidatedManifest
from cortex.model import CortexModel


def assemble(built: ValidatedManifest, *, device: str | torch.device = "cpu",
             tokenizer: Tokenizer | None = None) -> CortexModel:
    """Build the model a validated manifest describes, deterministically from its seed."""
    m = built.manifest
    base_dir = built.path.parent if built.path is not None else Path.cwd()
    tokenizer = tokenizer or tokenizer_from_spec(m.tokenizer.model_dump(), base_dir)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        **{k: v for k, v in m.model.model_dump().items() if k != "memory_layers"},
        memory_layers=tuple(m.model.memory_layers),
    )
    pm = built.plugins.fork()
    torch.manual_seed(m.seed)
    core = Transformer(config).to(device)
    context = BuildContext(config=config, tokenizer=tokenizer, device=torch.device(device), seed=m.seed)
    components: dict[str, list[Component]] = {"memory": [], "plasticity": [], "features": []}
    for resolved in built.components:
        cls = resolved.info.cls
        try:
            if resolved.section == "plasticity":
                component = cls(resolved.settings, context, target=resolved.spec.target)
            else:
                component = cls(resolved.settings, context)
        except Exception as exc:
            raise PluginError(
                f"{resolved.section}[{resolved.index}] {resolved.info.name!r} from "
                f"{resolved.info.source.describe()} failed to build: {type(exc).__name__}: {exc}"
            ) from exc
        component.key = resolved.key
        components[resolved.section].append(component)
        pm.register(component, name=component.key)
    model = CortexModel(built, core, tokenizer, components, pm)
    for rule in model.plasticity:
        rule.attach(core)
        if not rule.targets:
            raise PluginError(
                f"plasticity rule {rule.key!r}: target {rule.target!r} matches no module; "
                "module names look like 'blocks.0.mlp' (see `cortex build` summary)"
            )
    for component in model.components:
        component.bind(model)
    pm.hook.cortex_model_built(model=model)
    return model
