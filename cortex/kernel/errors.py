"""User-facing errors. The CLI prints these without a traceback; anything else is a bug."""

from __future__ import annotations


class CortexError(Exception):
    """A mistake in user input (manifest, data, checkpoint, arguments) with a fix in its message."""


class PluginError(CortexError):
    """A plugin could not be loaded, or its components clash with another plugin's."""


class DataError(CortexError):
    """Input data is missing, malformed or was made with another tokenizer."""


class CheckpointError(CortexError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""
