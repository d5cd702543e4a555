"""Modules imported on first use, so that importing the kernel or a plugin costs no torch.

Plugin modules bind ``from cortex.kernel.lazy import F, nn, torch``: ``cortex validate``,
``schema`` and ``plugins`` then never load torch. What a module needs at import (a base
class such as ``nn.Module``) would import it, so such classes live in modules imported later.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class LazyModule(ModuleType):
    """A stand-in for module ``name`` that imports it at the first attribute access."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later lookups skip __getattr__
        return getattr(module, attr)


torch: Any = LazyModule("torch")
nn: Any = LazyModule("torch.nn")
F: Any = LazyModule("torch.nn.functional")


def no_grad(fn: Callable[..., T]) -> Callable[..., T]:
    """``@torch.no_grad()`` for modules that must not import torch when they are imported."""

    @functools.wraps(fn)
    def without_gradients(*args: Any, **kwargs: Any) -> T:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_gradients
