"""Plugin discovery and the plugin manager factory (no global singleton).

Plugins are modules (or objects) published in the ``cortex.plugins`` entry-point group.
The built-ins come through that very group from the ``cortex`` distribution; every other
distribution's entry point name is the namespace of its components. Environment:
``CORTEX_DISABLE_PLUGIN_AUTOLOAD=1`` loads the built-ins only, ``CORTEX_PLUGINS=ns1,ns2`` these namespaces only.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterable

import pluggy

from cortex.kernel import hookspecs
from cortex.kernel.errors import PluginError
from cortex.kernel.registry import PluginSource, Registry

GROUP = "cortex.plugins"
BUILTIN_DISTRIBUTION = "cortex"


@dataclass(frozen=True)
class PluginEntry:
    """An installed plugin: where it comes from and how to load it."""

    source: PluginSource
    load: Callable[[], Any]

    @property
    def namespace(self) -> str:
        return self.source.entry_point


def discover() -> list[PluginEntry]:
    """All entry points of the ``cortex.plugins`` group, built-ins first."""
    entries = []
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist
        name = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else "unknown"
        builtin = name.lower() == BUILTIN_DISTRIBUTION
        source = PluginSource(name, version, ep.name, ep.value, builtin)
        entries.append(PluginEntry(source, ep.load))
    return sorted(entries, key=lambda e: (not e.source.builtin, e.namespace))


def _autoload_allowed(entry: PluginEntry) -> bool:
    if entry.source.builtin:
        return True
    if os.environ.get("CORTEX_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0"):
        return False
    allow = os.environ.get("CORTEX_PLUGINS")
    if allow is not None:
        return entry.namespace in {n.strip() for n in allow.split(",") if n.strip()}
    return True


class CortexPluginManager(pluggy.PluginManager):
    """A pluggy manager with the Cortex hookspecs, its component registry and load errors."""

    def __init__(self) -> None:
        super().__init__("cortex")
        self.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.load_errors: list[PluginError] = []
        #: problems that do not stop a plugin from loading (a misspelt hook, nothing registered)
        self.warnings: list[str] = []
        #: every installed third-party namespace, loaded or not (for "did you mean")
        self.installed_namespaces: set[str] = set()
        self._loaded: dict[str, PluginSource] = {}

    def add_plugin(self, plugin: Any, source: PluginSource) -> None:
        """Register a plugin object and the components it hands over, or nothing at all."""
        earlier = None if source.builtin else self._loaded.get(source.entry_point)
        if earlier is not None:
            raise PluginError(
                f"plugin namespace {source.entry_point!r} is provided by {earlier.describe()} "
                f"and by {source.describe()}; uninstall one of them"
            )
        classes: list[type] = []
        register_impl = getattr(plugin, "cortex_register_components", None)
        if register_impl is not None:
            try:
                register_impl(register=classes.append)
            except Exception as exc:
                raise PluginError(
                    f"plugin {source.describe()} failed while registering its components: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        trial = Registry()
        for info in self.registry:
            trial.add(info.cls, info.source)
        for cls in classes:
            trial.add(cls, source)  # raises on a clash or a malformed class, changing nothing
        try:
            scratch = CortexPluginManager()
            for cls in dict.fromkeys(classes):  # components' own @hookimpl methods, checked before any is built
                scratch.register(cls, name=cls.__qualname__)
            self.register(plugin, name=f"{source.distribution}:{source.entry_point}")
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {source.describe()} is not compatible: {exc}") from exc
        self.registry = trial
        self._check_hook_names(plugin, source, registered=bool(classes))
        if not source.builtin:
            self._loaded[source.entry_point] = source
            self.installed_namespaces.add(source.entry_point)

    def _check_hook_names(self, plugin: Any, source: PluginSource, *, registered: bool) -> None:
        """Warn about ``cortex_*`` functions that are no hook and about a plugin providing nothing."""
        hooks = {name for name in dir(hookspecs) if name.startswith("cortex_")}
        defined = {name for name in dir(plugin) if name.startswith("cortex_") and callable(getattr(plugin, name))}
        for name in sorted(defined - hooks):
            hint = difflib.get_close_matches(name, sorted(hooks), n=1)
            self.warnings.append(f"plugin {source.describe()}: {name} is not a Cortex hook, so it is never "
                                 f"called" + (f"; did you mean {hint[0]}?" if hint else ""))
        if not registered and not (defined & hooks):
            self.warnings.append(f"plugin {source.describe()} registers no component and implements no hook")

    @property
    def loaded_namespaces(self) -> set[str]:
        """Third-party namespaces whose plugins were loaded into this manager."""
        return set(self._loaded)

    def fork(self) -> CortexPluginManager:
        """A new manager with the same plugins and registry, for one model's components."""
        new = CortexPluginManager()
        for plugin in self.get_plugins():
            new.register(plugin, name=self.get_name(plugin))
        new.registry = self.registry
        new.installed_namespaces = set(self.installed_namespaces)
        new.warnings = list(self.warnings)
        new._loaded = dict(self._loaded)
        return new


def create_plugin_manager(namespaces: Iterable[str] | None = None, *, strict: bool = True) -> CortexPluginManager:
    """Load the built-in plugins and the third-party ones allowed.

    ``namespaces`` limits third-party loading to those namespaces (``None``: all of them),
    so building a manifest imports only what it names. With ``strict`` a broken plugin
    raises a [`PluginError`][cortex.kernel.errors.PluginError] naming its distribution, version
    and entry point; otherwise the error is kept in ``load_errors``.
    """
    wanted = None if namespaces is None else set(namespaces)
    pm = CortexPluginManager()
    for entry in discover():
        if not entry.source.builtin:
            pm.installed_namespaces.add(entry.namespace)
            if (wanted is not None and entry.namespace not in wanted) or not _autoload_allowed(entry):
                continue
        try:
            try:
                plugin = entry.load()
            except Exception as exc:
                raise PluginError(f"plugin {entry.source.describe()} failed to load: "
                                  f"{type(exc).__name__}: {exc}") from exc
            pm.add_plugin(plugin, entry.source)
        except PluginError as err:
            if strict:
                raise
            pm.load_errors.append(err)
    return pm
