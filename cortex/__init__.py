"""Cortex: small language models with brain-inspired memory, assembled from plugins.

This module is the public API; plugins, docs and users import from here only. The
contracts (interfaces, errors, manifest loading) come with ``import cortex`` at no torch
cost; the names that need torch (the model, assembly, the runtime) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cortex.kernel import VERSION
from cortex.kernel.errors import CheckpointError, CortexError, DataError, PluginError
from cortex.kernel.hookspecs import hookimpl
from cortex.kernel.interfaces import (
    BuildContext,
    CognitiveFeature,
    Component,
    DataSource,
    Document,
    Entries,
    Logger,
    MemoryTier,
    ModelHandle,
    PlasticityRule,
    Retrieval,
    RuleSettings,
    Settings,
    all_reduce_mean,
    firing_rate,
)
from cortex.kernel.manifest import load_manifest_text
from cortex.kernel.plugins import create_plugin_manager
from cortex.runtime.manifests import load_manifest

if TYPE_CHECKING:
    from cortex.assembly import assemble
    from cortex.core.memory import MemorySystem, session_stream
    from cortex.core.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
    from cortex.core.transformer import ModelConfig, Transformer
    from cortex.model import CortexModel, Reply
    from cortex.runtime.rundir import load, save_run
    from cortex.runtime.train import train

__version__ = VERSION

#: public names that need torch, and the module each is loaded from on first use
_LAZY = {
    "assemble": "cortex.assembly",
    "CortexModel": "cortex.model",
    "Reply": "cortex.model",
    "MemorySystem": "cortex.core.memory",
    "session_stream": "cortex.core.memory",
    "ModelConfig": "cortex.core.transformer",
    "Transformer": "cortex.core.transformer",
    "Tokenizer": "cortex.core.tokenizer",
    "ByteTokenizer": "cortex.core.tokenizer",
    "load_tokenizer": "cortex.core.tokenizer",
    "load": "cortex.runtime.rundir",
    "save_run": "cortex.runtime.rundir",
    "train": "cortex.runtime.train",
}

__all__ = [
    "BuildContext", "CheckpointError", "CognitiveFeature", "Component", "CortexError", "DataError",
    "DataSource", "Document", "Entries", "Logger", "MemoryTier", "ModelHandle", "PlasticityRule", "PluginError",
    "Retrieval", "RuleSettings", "Settings", "__version__", "all_reduce_mean", "create_plugin_manager",
    "firing_rate", "hookimpl", "load_manifest", "load_manifest_text", *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cortex' has no attribute {name!r}")
