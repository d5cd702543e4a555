"""The component registry: (kind, full name) -> class, with the plugin it came from."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from cortex.kernel.errors import PluginError
from cortex.kernel.interfaces import KINDS, Component, Settings


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from: its distribution, version and entry point."""

    distribution: str
    version: str
    entry_point: str  # the entry point's name, which is the namespace of third parties
    value: str  # what the entry point loads, e.g. ``cortex_plugins.data.demo``
    builtin: bool = False

    def describe(self) -> str:
        return f"{self.distribution} {self.version} (entry point {self.entry_point} = {self.value})"


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component class."""

    kind: str
    name: str
    cls: type
    source: PluginSource


def _signature_problem(cls: type) -> str | None:
    """How ``cls`` overrides an interface method so that the runtime's calls of it would fail."""
    for base in [b for b in cls.__mro__ if b.__module__ == Component.__module__]:
        for attr, spec in vars(base).items():
            own = getattr(cls, attr)
            if attr.startswith("_") or not inspect.isfunction(spec) or own is spec:
                continue
            params = list(inspect.signature(spec).parameters.values())[1:]
            try:
                inspect.signature(own).bind(None, *(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD),
                                            **{p.name: None for p in params if p.kind == p.KEYWORD_ONLY})
            except (TypeError, ValueError):
                wanted = str(inspect.signature(spec)).replace("'", "")
                return f"its method {attr} cannot be called as the runtime calls it: {attr}{wanted}"
    return None


class Registry:
    """Maps (kind, name) to component classes. Third-party names carry their namespace."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], ComponentInfo] = {}

    def add(self, cls: type, source: PluginSource) -> ComponentInfo:
        """Register ``cls`` for ``source``; a real clash raises an error naming both sources."""
        kind, name = getattr(cls, "kind", None), getattr(cls, "name", None)
        settings = getattr(cls, "Settings", None)
        problem = None
        if kind not in KINDS:
            problem = f"kind {kind!r} is not one of {', '.join(KINDS)}"
        elif not isinstance(name, str) or not name.isidentifier():
            problem = f"name {name!r} must be a Python identifier such as 'my_tier'"
        elif not (isinstance(settings, type) and issubclass(settings, BaseModel)):
            problem = "it has no pydantic Settings model"
        elif not issubclass(settings, Settings):
            problem = ("its Settings derives from pydantic's BaseModel, which accepts misspelt keys "
                       "silently: derive it from cortex.Settings")
        elif "name" not in vars(cls):
            problem = (f"it inherits the name {name!r} of {cls.__mro__[1].__qualname__}: give the subclass "
                       "a name of its own (class attribute `name`)")
        elif kind == "memory" and "capacity" not in settings.model_fields:
            problem = "a memory tier's Settings needs a `capacity` field: the most entries the tier holds"
        elif (unfit := _signature_problem(cls)) is not None:
            problem = unfit
        if problem:
            raise PluginError(
                f"component {getattr(cls, '__qualname__', cls)!r} from {source.describe()} "
                f"cannot be registered: {problem}"
            )
        full = name if source.builtin else f"{source.entry_point}.{name}"
        existing = self._items.get((kind, full))
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"{kind} component {full!r} is registered twice: by "
                f"{existing.source.describe()} and by {source.describe()}; uninstall one of them"
            )
        info = ComponentInfo(kind, full, cls, source)
        self._items[(kind, full)] = info
        return info

    def get(self, kind: str, name: str) -> ComponentInfo | None:
        return self._items.get((kind, name))

    def names(self, kind: str | None = None) -> list[str]:
        return sorted(n for k, n in self._items if kind is None or k == kind)

    def reader_of(self, path: Any) -> tuple[ComponentInfo, BaseModel] | None:
        """The data source that recognises ``path`` (see ``DataSource.reads``) and the
        settings it reads it with, or ``None``."""
        for info in self:
            reads = getattr(info.cls, "reads", None) if info.kind == "data" else None
            settings = reads(Path(path)) if reads is not None else None
            if settings is not None:
                return info, settings
        return None

    def __iter__(self) -> Iterator[ComponentInfo]:
        return iter(sorted(self._items.values(), key=lambda i: (i.kind, i.name)))

    def __len__(self) -> int:
        return len(self._items)
