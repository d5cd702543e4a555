"""Pytest fixtures for Cortex and its plugins (installed as the ``cortex`` pytest plugin).

- ``fake_distribution(name, plugins, version="1.0")``: pretend a distribution is installed
  with ``cortex.plugins`` entry points ``{namespace: plugin object or loader}``; removed
  after the test.
- ``register_plugin(plugin, namespace="test")``: register one plugin object the same way.
- ``build_model(yaml_text)``: validate and assemble a manifest given as a string.
- ``cortex_cli(*args)``: run the ``cortex`` command in-process; returns exit code and output.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from cortex.kernel import plugins as _plugins
from cortex.kernel.registry import PluginSource


def _loader(target: Any) -> Callable[[], Any]:
    if isinstance(target, BaseException):
        def fail() -> Any:
            raise target
        return fail
    return lambda: target


@pytest.fixture
def fake_distribution(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Install fake distributions whose entry points load the given objects.

    A value that is an exception instance makes that entry point fail to load, like a
    broken plugin. A distribution named ``cortex`` counts as built-in (plain names).
    """
    extra: list[_plugins.PluginEntry] = []
    real = _plugins.discover

    def discover() -> list[_plugins.PluginEntry]:
        return real() + extra

    monkeypatch.setattr(_plugins, "discover", discover)

    def install(name: str, plugins: dict[str, Any], version: str = "1.0") -> None:
        for namespace, target in plugins.items():
            value = getattr(target, "__name__", type(target).__name__)
            builtin = name.lower() == _plugins.BUILTIN_DISTRIBUTION
            source = PluginSource(name, version, namespace, value, builtin=builtin)
            extra.append(_plugins.PluginEntry(source, _loader(target)))

    return install


@pytest.fixture
def register_plugin(fake_distribution: Callable[..., None]) -> Callable[..., None]:
    """Register a plugin object under ``namespace`` (as distribution ``test-<namespace>``)."""

    def register(plugin: Any, namespace: str = "test") -> None:
        fake_distribution(f"test-{namespace}", {namespace: plugin})

    return register


@pytest.fixture
def build_model(tmp_path: Path) -> Callable[..., Any]:
    """Build a [`CortexModel`][cortex.model.CortexModel] from a YAML string."""
    from cortex.assembly import assemble
    from cortex.kernel.manifest import load_manifest

    def build(text: str, name: str = "manifest.yaml") -> Any:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return assemble(load_manifest(path))

    return build


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cortex_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Run ``cortex ARGS...`` in this process, the way a user's shell would."""
    from cortex.cli import app as cli

    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(cli, "console", cli.Console(file=out, width=200))
        monkeypatch.setattr(cli, "err_console", cli.Console(file=err, width=200))
        code = 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run
