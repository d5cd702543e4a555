"""Cortex: small language models with brain-inspired memory, assembled from plugins."""

from cortex.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
