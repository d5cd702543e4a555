"""Cortex: small language models with brain-inspired memory, assembled from plugins."""

from cortex.kernel.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "load"]


def load(run, *, device: str = "cpu"):
    """Load a run directory for real-time use (see [`cortex.assemble.load`][cortex.assemble.load])."""
    from cortex.assemble import load as _load

    return _load(run, device=device)
