"""A plugin author's mistakes in component code (issue 16, item 9), through the CLI: each is one
message naming the package, its version, the component and the method, and no traceback;
``--traceback`` and ``CORTEX_DEBUG=1`` add the full traceback."""

from __future__ import annotations

import types

import pytest

from cortex import hookimpl
from tests.conftest import ExactTier, ScaleRule, tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SOURCE = "cortex-mistake 0.3 (entry point mistake = mistake_plugin)"
TRAIN = {"data": {"type": "demo", "settings": {"documents": 100}}, "tokens": 128, "batch": 2, "eval_every": 0,
         "checkpoint_every": 0}


def _install(fake_distribution, *classes):
    module = types.ModuleType("mistake_plugin")
    module.cortex_register_components = hookimpl(lambda register: [register(cls) for cls in classes])
    fake_distribution("cortex-mistake", {"mistake": module}, version="0.3")


def _manifest(tmp_path, **sections):
    path = tmp_path / "m.yaml"
    path.write_text(tiny_manifest("m", **sections))
    return path


class Sloppy(ExactTier):
    """A tier whose hook implementation names an argument the hook does not pass."""

    name = "sloppy"

    @hookimpl
    def cortex_after_step(self, model, stepp, metrics):
        metrics["sloppy"] = 1.0


class Narrow(ExactTier):
    """A tier whose read does not take the keyword arguments the memory system passes."""

    name = "narrow"

    def read(self, queries, k):
        return super().read(queries, k)


def test_a_wrong_hook_argument_is_refused_at_validation_naming_the_package(fake_distribution, cortex_cli, tmp_path):
    _install(fake_distribution, Sloppy)
    listing = cortex_cli("plugins")
    assert listing.exit_code == 0 and f"warning: plugin {SOURCE} is not compatible" in listing.stderr
    result = cortex_cli("validate", _manifest(tmp_path, memory=[{"type": "mistake.sloppy"}]))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"plugin {SOURCE} is not compatible" in result.stderr
    assert "cortex_after_step" in result.stderr and "stepp" in result.stderr
    assert len(result.stderr.splitlines()) < 8  # not pluggy's 47 lines


def test_a_wrong_method_signature_is_refused_at_validation_naming_the_package(fake_distribution, cortex_cli,
                                                                              tmp_path):
    _install(fake_distribution, Narrow)
    result = cortex_cli("validate", _manifest(tmp_path, memory=[{"type": "mistake.narrow"}]))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"component 'Narrow' from {SOURCE} cannot be registered" in result.stderr
    assert ("its method read cannot be called as the runtime calls it: read(self, queries: torch.Tensor, k: int, "
            "*, stream: int = 0, step: int = 0, touch: bool = True)") in result.stderr


class Leaky(ExactTier):
    """A tier with a bug in ``write``."""

    name = "leaky"

    def write(self, entries, *, step=0):
        raise KeyError("slot")


class Shaky(ScaleRule):
    """A rule with a bug in ``apply``."""

    name = "shaky"

    def apply(self, name, module):
        raise ValueError(f"cannot update {name}")


@pytest.mark.parametrize("cls, sections, names", [
    (Leaky, {"memory": [{"type": "mistake.leaky"}]}, "memory.0.mistake.leaky: Leaky.write from"),
    (Shaky, {"plasticity": [{"type": "mistake.shaky", "target": "blocks.0.mlp.fc"}]},
     "plasticity.0.mistake.shaky: Shaky.apply from"),
])
def test_an_exception_in_a_component_method_names_the_entry_the_package_and_the_method(
        fake_distribution, cortex_cli, tmp_path, cls, sections, names):
    _install(fake_distribution, cls)
    result = cortex_cli("build", _manifest(tmp_path, train=TRAIN, **sections), "-o", tmp_path / "runs")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{names} {SOURCE} failed:" in result.stderr and "a bug in that plugin" in result.stderr


class Uncountable(ExactTier):
    """A tier with a bug in ``stats`` (what ``cortex memory`` shows)."""

    name = "uncountable"

    def stats(self):
        return {"entries": len(self) / 0}


def test_the_full_traceback_comes_with_the_option_or_the_variable(fake_distribution, cortex_cli, tmp_path,
                                                                  monkeypatch):
    _install(fake_distribution, Uncountable)
    assert cortex_cli("build", _manifest(tmp_path, memory=[{"type": "mistake.uncountable"}]), "-o",
                      tmp_path / "runs").exit_code == 0
    run = tmp_path / "runs" / "m"
    names = f"memory.0.mistake.uncountable: Uncountable.stats from {SOURCE} failed: ZeroDivisionError"
    quiet = cortex_cli("memory", run)
    assert quiet.exit_code == 1 and names in quiet.stderr and "Traceback" not in quiet.output
    shown = cortex_cli("--traceback", "memory", run)
    assert shown.exit_code == 1 and names in shown.stderr
    assert "Traceback (most recent call last)" in shown.stderr and "in stats" in shown.stderr
    assert "Traceback" not in cortex_cli("memory", run).output  # --traceback does not stick
    monkeypatch.setenv("CORTEX_DEBUG", "1")
    assert "Traceback (most recent call last)" in cortex_cli("memory", run).stderr


def test_a_plugin_import_error_shows_its_traceback_only_when_asked(fake_distribution, cortex_cli, tmp_path,
                                                                   monkeypatch):
    fake_distribution("cortex-broken", {"broken": ImportError("No module named 'numpyy'")}, version="2.0")
    manifest = _manifest(tmp_path, memory=[{"type": "broken.tier"}])
    quiet = cortex_cli("validate", manifest)
    assert quiet.exit_code == 1 and "cortex-broken 2.0" in quiet.stderr and "numpyy" in quiet.stderr
    assert "Traceback" not in quiet.output
    shown = cortex_cli("--traceback", "validate", manifest)
    assert shown.exit_code == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "ImportError: No module named 'numpyy'" in shown.stderr and "cortex-broken 2.0" in shown.stderr
