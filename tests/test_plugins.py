"""Plugin discovery, namespacing, clashes, broken plugins and lifecycle hooks."""

from __future__ import annotations

import json

import pytest
import torch

from cortex.kernel.errors import PluginError
from cortex.kernel.interfaces import Entries
from cortex.kernel.plugins import create_plugin_manager
from tests.conftest import Counter, ExactTier, ScaleRule, make_plugin, tiny_manifest

THIRD_PARTY = tiny_manifest(
    "tp", context=16, memory=[{"type": "hopfield.exact", "settings": {"capacity": 4}}],
    plasticity=[{"type": "hopfield.scale", "target": "blocks.*.mlp.proj", "settings": {"factor": 0.5}}],
    features=["hopfield.counter"],
)


def test_builtins_come_through_entry_points():
    pm = create_plugin_manager()
    for kind, name in (("data", "demo"), ("data", "jsonl"), ("data", "text"), ("bench", "throughput")):
        info = pm.registry.get(kind, name)
        assert info is not None, name
        assert info.source.distribution == "cortex" and info.source.builtin
        assert info.source.value.startswith("cortex_plugins.")
    assert not pm.load_errors


def test_third_party_components_are_namespaced_listed_and_usable(fake_distribution, build_model, cortex_cli):
    fake_distribution("hopfield-memory", {"hopfield": make_plugin(ExactTier, ScaleRule, Counter)}, version="2.1")
    listed = json.loads(cortex_cli("plugins", "--json").stdout)["components"]
    row = next(r for r in listed if r["name"] == "hopfield.exact")
    assert row == {"name": "hopfield.exact", "kind": "memory", "distribution": "hopfield-memory",
                   "version": "2.1", "entry_point": "hopfield"}
    assert not any(r["name"] == "exact" for r in listed)  # never a plain, built-in-looking name

    model = build_model(THIRD_PARTY)
    [tier], [rule], [feature] = model.memory, model.plasticity, model.features
    assert isinstance(tier, ExactTier) and tier.capacity == 4 and tier.key == "memory.0.hopfield.exact"
    assert sorted(rule.targets) == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]
    assert feature.events == ["built"]  # the component's own @hookimpl ran

    # the rule observes forward passes and its non-gradient update runs at step end
    before = model.core.blocks[0].mlp.proj.weight.clone()
    model(torch.zeros(1, 8, dtype=torch.long))
    assert rule.seen == 2
    model.pm.hook.cortex_after_step(model=model, step=0, metrics={})
    assert torch.allclose(model.core.blocks[0].mlp.proj.weight, before * 0.5)
    assert feature.events == ["built", "step0"]


def test_broken_plugin_warns_in_listing_and_fails_build(fake_distribution, cortex_cli, tmp_path):
    fake_distribution("broken-dist", {"broken": ImportError("No module named 'missing_dep'")}, version="0.3")
    result = cortex_cli("plugins")
    assert result.exit_code == 0
    assert "broken-dist 0.3 (entry point broken" in result.stderr and "missing_dep" in result.stderr
    assert "demo" in result.stdout

    manifest = tmp_path / "m.yaml"
    manifest.write_text(tiny_manifest("b", features=["broken.thing"]))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert result.exit_code == 1
    assert "broken-dist 0.3" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_build_imports_only_the_namespaces_it_names(monkeypatch):
    from cortex.kernel import plugins
    from cortex.kernel.registry import PluginSource

    loaded = []

    def loader(namespace):
        def load():
            loaded.append(namespace)
            return make_plugin()
        return load

    real = plugins.discover
    extra = [plugins.PluginEntry(PluginSource("d", "1", ns, ns), loader(ns)) for ns in ("one", "two")]
    monkeypatch.setattr(plugins, "discover", lambda: real() + extra)
    pm = create_plugin_manager({"two"})
    assert loaded == ["two"]
    assert pm.installed_namespaces == {"one", "two"}


def test_component_clash_names_both_sources(fake_distribution):
    fake_distribution("cortex", {"a": make_plugin(ExactTier)})
    fake_distribution("cortex", {"b": make_plugin(type("Other", (ExactTier,), {"name": "exact"}))})
    with pytest.raises(PluginError) as info:
        create_plugin_manager()
    message = str(info.value)
    assert "memory component 'exact' is registered twice" in message
    assert "entry point a" in message and "entry point b" in message


def test_namespace_provided_twice_names_both(fake_distribution):
    fake_distribution("first-dist", {"hop": make_plugin(ExactTier)})
    fake_distribution("second-dist", {"hop": make_plugin(Counter)})
    with pytest.raises(PluginError, match="first-dist 1.0.*second-dist 1.0"):
        create_plugin_manager()


def test_malformed_component_is_reported(fake_distribution):
    class NoKind:
        name = "x"

    fake_distribution("odd-dist", {"odd": make_plugin(NoKind)})
    pm = create_plugin_manager(strict=False)
    [error] = pm.load_errors
    assert "odd-dist 1.0" in str(error) and "kind None is not one of" in str(error)
    assert pm.registry.get("memory", "odd.x") is None


def test_autoload_switches(fake_distribution, monkeypatch):
    fake_distribution("a-dist", {"alpha": make_plugin(ExactTier)})
    fake_distribution("b-dist", {"beta": make_plugin(ExactTier)})
    assert {"alpha.exact", "beta.exact"} <= set(create_plugin_manager().registry.names("memory"))
    monkeypatch.setenv("CORTEX_PLUGINS", "beta")
    third_party = {n for n in create_plugin_manager().registry.names("memory") if "." in n}
    assert third_party == {"beta.exact"}
    monkeypatch.setenv("CORTEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = create_plugin_manager()
    assert [n for n in pm.registry.names("memory") if "." in n] == []
    assert pm.registry.get("data", "demo") is not None


def test_plugin_state_round_trips_through_a_run_directory(test_components, build_model, tmp_path):
    from cortex.runtime.rundir import load_run, save_run

    model = build_model(tiny_manifest("st", dim=16, layers=1, context=8,
                                      memory=[{"type": "test.exact", "settings": {"capacity": 3}}]))
    tier = model.memory[0]
    tier.write(Entries(torch.randn(5, 16), torch.randn(5, 16), torch.zeros(5, dtype=torch.long),
                       torch.zeros(5, dtype=torch.long)))
    path = save_run(model, tmp_path)
    again = load_run(path)
    assert len(again.memory[0]) == 3
    assert torch.equal(again.memory[0].keys, tier.keys)
    queries = torch.randn(2, 16)
    assert torch.equal(again.memory[0].read(queries, 2).ids, tier.read(queries, 2).ids)
    for name, tensor in model.core.state_dict().items():
        assert torch.equal(again.core.state_dict()[name], tensor), name


def test_a_namespace_excluded_by_the_environment_is_named_as_such(fake_distribution, monkeypatch):
    from cortex.kernel.manifest import ManifestError, load_manifest_text

    fake_distribution("a-dist", {"alpha": make_plugin(ExactTier)})
    text = tiny_manifest("x", dim=16, layers=1, context=8, memory=["alpha.exact"])
    assert load_manifest_text(text).section("memory")[0].info.name == "alpha.exact"
    monkeypatch.setenv("CORTEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(ManifestError, match="'alpha' is installed but not loaded: CORTEX_DISABLE_PLUGIN_AUTOLOAD"):
        load_manifest_text(text)


def test_a_plugin_adds_a_command_to_the_cli(register_plugin, cortex_cli, monkeypatch):
    from cortex import CortexError, hookimpl
    from cortex.cli import app as cli

    class Greeter:
        @hookimpl
        def cortex_register_commands(self, app):
            @app.command()
            def greet(name: str) -> None:
                """Say hello."""
                if name == "nobody":
                    raise CortexError("greet: give a name")
                print(f"hello {name}")

    assert "greet" not in cortex_cli("--help").stdout
    register_plugin(Greeter(), "greeter")
    monkeypatch.setattr(cli, "_plugin_commands", [])  # as in a new process, with the plugin installed
    before = list(cli.app.registered_commands)
    try:
        assert "greet" in cortex_cli("--help").stdout
        done = cortex_cli("greet", "Mina")
        assert done.exit_code == 0 and "hello Mina" in done.stdout
        failed = cortex_cli("greet", "nobody")  # a plugin command's CortexError is one line, no traceback
        assert failed.exit_code == 1 and failed.stderr.strip() == "error: greet: give a name"
    finally:
        cli.app.registered_commands[:] = before
    assert "greet" not in cortex_cli("--help").stdout


def test_graph_comes_from_its_plugin_through_the_hook():
    from pathlib import Path

    from cortex.cli import app as cli

    assert "def graph(" not in Path(cli.__file__).read_text(encoding="utf-8")
    pm = create_plugin_manager(namespaces=())
    impls = {impl.plugin_name for impl in pm.hook.cortex_register_commands.get_hookimpls()}
    assert impls == {"cortex:cognition_graph"}


def test_a_rule_with_its_own_after_step_hook_still_updates_in_manifest_order(register_plugin, build_model):
    """The rule trap: a rule's update never depends on the hook, which a subclass may implement."""
    from cortex import hookimpl
    from tests.conftest import ScaleRule, tiny_manifest

    order: list[str] = []

    class LoggingRule(ScaleRule):
        name = "logging_scale"

        @hookimpl
        def cortex_after_step(self, model, step, metrics):
            metrics["logging_scale/calls"] = 1.0

        def apply(self, name, module):
            order.append(self.key)
            super().apply(name, module)

    class Plugin:
        @hookimpl
        def cortex_register_components(self, register):
            register(LoggingRule)

    register_plugin(Plugin(), "trap")
    model = build_model(tiny_manifest("trap", plasticity=[
        {"type": "trap.logging_scale", "target": "blocks.0.mlp.proj", "settings": {"factor": 0.5}},
        {"type": "trap.logging_scale", "target": "blocks.1.mlp.proj", "settings": {"factor": 0.5}}]))
    before = [model.core.blocks[i].mlp.proj.weight.detach().clone() for i in (0, 1)]
    metrics: dict[str, float] = {}
    model.pm.hook.cortex_after_step(model=model, step=0, metrics=metrics)
    assert metrics["logging_scale/calls"] == 1.0  # its own hook ran ...
    for i in (0, 1):  # ... and so did its update, for both rules, in manifest order
        torch.testing.assert_close(model.core.blocks[i].mlp.proj.weight, before[i] * 0.5)
    assert order == ["plasticity.0.trap.logging_scale", "plasticity.1.trap.logging_scale"]


def _plugin_module(**attributes):
    import types

    module = types.ModuleType("mistake_plugin")
    module.__dict__.update(attributes)
    return module


@pytest.mark.parametrize("mistake, message", [
    ("plain pydantic", "derive it from cortex.Settings"),
    ("no capacity", "a memory tier's Settings needs a `capacity` field"),
    ("no own name", "give the subclass a name of its own"),
])
def test_component_mistakes_are_named_with_the_package_without_a_traceback(fake_distribution, cortex_cli,
                                                                           tmp_path, mistake, message):
    import pydantic

    from cortex import hookimpl
    from tests.conftest import tiny_manifest

    if mistake == "plain pydantic":
        cls = type("Loose", (ExactTier,), {"name": "loose", "Settings": type(
            "Settings", (pydantic.BaseModel,), {"__annotations__": {"capacity": int}, "capacity": 8})})
    elif mistake == "no capacity":
        cls = type("Bottomless", (ExactTier,), {"name": "bottomless", "Settings": type(
            "Settings", (ExactTier.Settings.__mro__[1],), {})})
    else:
        cls = type("Copy", (ExactTier,), {})
    fake_distribution("cortex-mistake", {"mistake": _plugin_module(
        cortex_register_components=hookimpl(lambda register: register(cls)))}, version="0.3")
    listing = cortex_cli("plugins")
    assert listing.exit_code == 0 and "warning: component" in listing.stderr
    assert "cortex-mistake 0.3 (entry point mistake" in listing.stderr and message in listing.stderr
    manifest = tmp_path / "m.yaml"
    manifest.write_text(tiny_manifest("m", memory=[{"type": "mistake.exact", "settings": {"capacity": 8}}]))
    build = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert build.exit_code == 1 and "cortex-mistake 0.3" in build.stderr and message in build.stderr
    assert "Traceback" not in build.output


def test_a_misspelt_hook_and_an_empty_plugin_are_warned_about(fake_distribution, cortex_cli):
    from cortex import hookimpl

    fake_distribution("cortex-typo", {"typo": _plugin_module(
        cortex_register_component=lambda register: None)}, version="1.2")
    fake_distribution("cortex-ok", {"ok": _plugin_module(
        cortex_register_components=hookimpl(lambda register: register(ExactTier)))})
    listing = cortex_cli("plugins")
    assert listing.exit_code == 0
    assert ("cortex-typo 1.2 (entry point typo = mistake_plugin): cortex_register_component is not a Cortex "
            "hook, so it is never called; did you mean cortex_register_components?") in listing.stderr
    assert "cortex-typo 1.2 (entry point typo = mistake_plugin) registers no component" in listing.stderr
    assert "cortex-ok" not in listing.stderr
