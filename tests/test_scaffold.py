"""`cortex init` and `cortex plugin new`: what they write is valid, atomic and never overwrites.

The slow test follows the plugin tutorial in a fresh virtual environment: scaffold,
``pip install -e``, ``cortex plugins``, a manifest that uses the new tier, its own tests.
"""

from __future__ import annotations

import importlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cortex.cli.scaffold import SIZES, InitOptions, manifest_text, plugin_files
from cortex.kernel.manifest import load_manifest
from tests.conftest import tiny_manifest
from tests.test_docs_examples import make_venv, shrink_manifest

# --------------------------------------------------------------------------- cortex init


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("memory", [True, False])
def test_init_writes_a_commented_manifest_that_validates(cortex_cli, tmp_path, size, memory):
    path = tmp_path / f"{size}.yaml"
    flag = "--memory" if memory else "--no-memory"
    result = cortex_cli("init", path, "--name", f"m-{size}", "--size", size, flag)
    assert result.exit_code == 0, result.output
    built = load_manifest(path)
    m = built.manifest
    assert m.name == f"m-{size}" and m.model.dim == SIZES[size]["dim"] and m.train is not None
    assert [c.spec.type for c in built.section("memory")] == (["stm", "ltm"] if memory else [])
    text = path.read_text(encoding="utf-8")
    assert text.count("#") > 15 and "cortex build" in text  # commented for a first-time reader


def test_init_without_training_and_defaults_with_yes(cortex_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cortex_cli("init", "--yes").exit_code == 0
    built = load_manifest(tmp_path / "my-model.yaml").manifest
    assert built.name == "my-model" and built.memory and built.train is not None
    assert cortex_cli("init", "bare.yaml", "--no-train").exit_code == 0
    bare = load_manifest(tmp_path / "bare.yaml").manifest
    assert bare.name == "bare" and bare.train is None
    folder = tmp_path / "sub"
    folder.mkdir()
    assert cortex_cli("init", folder, "--name", "inner").exit_code == 0
    assert load_manifest(folder / "inner.yaml").manifest.name == "inner"


def test_init_never_overwrites_and_rejects_bad_names(cortex_cli, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("mine\n", encoding="utf-8")
    result = cortex_cli("init", path, "--yes")
    assert result.exit_code == 1 and "already exists" in result.stderr and "Traceback" not in result.output
    assert path.read_text() == "mine\n"
    result = cortex_cli("init", tmp_path / "x.yaml", "--name", "no spaces")
    assert result.exit_code == 1 and "not a valid model name" in result.stderr
    assert not (tmp_path / "x.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]  # no temporary files left


def test_init_asks_questions_when_given_no_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cortex.cli.app import app

    monkeypatch.chdir(tmp_path)
    answers = "bad name\nasked\nhuge\nsmall\nn\nn\n"  # wrong answers are asked again
    result = CliRunner().invoke(app, ["init"], input=answers)
    assert result.exit_code == 0, result.output
    assert "not a valid model name" in result.output and "is not a size" in result.output
    m = load_manifest(tmp_path / "asked.yaml").manifest
    assert m.model.dim == SIZES["small"]["dim"] and not m.memory and m.train is None


def test_every_preset_is_consistent():
    for size in SIZES:
        for memory in (True, False):
            for train in (True, False):
                text = manifest_text(InitOptions(name="x", size=size, memory=memory, train=train))
                yaml.safe_load(text)
                assert "\t" not in text and all(len(line) <= 100 for line in text.splitlines())


# --------------------------------------------------------------------------- cortex plugin new


@pytest.fixture
def forget_demo_tier():
    """Tests import the generated package from their own folder; forget it afterwards."""
    yield
    for name in [n for n in sys.modules if n == "demo_tier" or n.startswith("demo_tier.")]:
        del sys.modules[name]


def test_plugin_new_writes_a_valid_package(cortex_cli, tmp_path):
    result = cortex_cli("plugin", "new", "demo_tier", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    root = tmp_path / "demo_tier"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(plugin_files("demo_tier"))
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["name"] == "cortex-demo-tier"
    assert project["project"]["entry-points"]["cortex.plugins"] == {"demo_tier": "demo_tier.plugin"}
    for path in root.rglob("*.py"):
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    assert "cortex.testing" in (root / "tests/test_plugin.py").read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["demo_tier"]  # no temporary folder left


def test_generated_plugin_registers_builds_and_remembers(cortex_cli, build_model, fake_distribution, tmp_path,
                                                         monkeypatch, forget_demo_tier):
    import torch

    assert cortex_cli("plugin", "new", "demo_tier", "-o", tmp_path).exit_code == 0
    monkeypatch.syspath_prepend(str(tmp_path / "demo_tier/src"))
    plugin = importlib.import_module("demo_tier.plugin")
    fake_distribution("cortex-demo-tier", {"demo_tier": plugin}, version="0.1.0")
    listed = json.loads(cortex_cli("plugins", "--json").stdout)["components"]
    assert {"name": "demo_tier.recent", "kind": "memory", "distribution": "cortex-demo-tier", "version": "0.1.0",
            "entry_point": "demo_tier"} in listed
    model = build_model(tiny_manifest("d", context=16, memory=[{"type": "demo_tier.recent", "settings": {"capacity": 4}}],
                                      memory_system={"write": "all"}))
    [tier] = model.memory
    model.train()
    idx = torch.randint(0, 256, (3, 16))
    model(idx, idx)
    assert tier.stats() == {"entries": 12, "capacity": 4, "streams": 3}  # 4 per stream, 3 streams
    copy = type(tier)(tier.settings, tier.context)
    copy.load_state_dict(tier.state_dict())
    assert len(copy) == 12


def test_plugin_new_never_overwrites_and_rejects_bad_names(cortex_cli, tmp_path):
    (tmp_path / "demo_tier").mkdir()
    (tmp_path / "demo_tier" / "keep.txt").write_text("mine", encoding="utf-8")
    result = cortex_cli("plugin", "new", "demo_tier", "-o", tmp_path)
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert [p.name for p in (tmp_path / "demo_tier").iterdir()] == ["keep.txt"]
    for bad in ("Demo", "demo-tier", "class", "cortex", "1tier"):
        result = cortex_cli("plugin", "new", bad, "-o", tmp_path)
        assert result.exit_code == 1 and "cannot name a plugin" in result.stderr, bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_tier"]


def test_plugin_new_is_all_or_nothing(cortex_cli, tmp_path, monkeypatch):
    real = Path.write_text
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    from cortex.cli.scaffold import new_plugin

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(OSError):
        new_plugin("demo_tier", tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the package nor its temporary folder


# --------------------------------------------------------------------------- the template files


def _template_files() -> set[str]:
    """Every file under cortex/cli/templates, as a '/'-separated path, read as package data."""
    from importlib.resources import files

    found, todo = set(), [(files("cortex.cli").joinpath("templates"), "")]
    while todo:
        folder, prefix = todo.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                todo.append((entry, f"{prefix}{entry.name}/"))
            else:
                found.add(prefix + entry.name)
    return found


def test_every_template_file_is_used_and_renders_with_no_placeholder_left(monkeypatch):
    from cortex.cli import scaffold

    used, real = set(), scaffold._template
    monkeypatch.setattr(scaffold, "_template", lambda path: used.add(path) or real(path))
    rendered = dict(plugin_files("demo_tier"))
    for size in SIZES:
        for memory in (True, False):
            for train in (True, False):
                text = manifest_text(InitOptions(name="x", size=size, memory=memory, train=train))
                rendered[f"x-{size}-{memory}-{train}.yaml"] = text
    assert used == _template_files() and all(path.endswith(".tmpl") for path in used)
    assert {f"plugin/{path}.tmpl" for path in scaffold.PLUGIN_TEMPLATES} <= used
    for path, text in rendered.items():
        assert "__ns__" not in path and ".tmpl" not in path, path
        assert "$" not in text and "__ns__" not in text, path  # no placeholder, escaped or not
        assert text.endswith("\n") and not text.endswith("\n\n"), path


def test_package_data_ships_every_template_file():
    """A non-editable wheel holds the templates: the package-data globs cover every file."""
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    package = root / "cortex/cli"
    shipped = {str(p.relative_to(package / "templates").as_posix())
               for pattern in project["tool"]["setuptools"]["package-data"]["cortex.cli"]
               for p in package.glob(pattern) if p.is_file()}
    assert shipped == _template_files()


def test_rendered_files_match_the_golden_text():
    files = plugin_files("demo_tier")
    assert list(files) == ["pyproject.toml", "README.md", "src/demo_tier/__init__.py", "src/demo_tier/plugin.py",
                           "src/demo_tier/tiers.py", "tests/test_plugin.py"]  # the order `plugin new` lists
    lines = {path: text.splitlines() for path, text in files.items()}
    assert lines["pyproject.toml"][5] == 'name = "cortex-demo-tier"'
    assert 'demo_tier = "demo_tier.plugin"' in lines["pyproject.toml"]
    assert lines["README.md"][0] == "# cortex-demo-tier"
    assert lines["src/demo_tier/__init__.py"] == [
        '"""cortex-demo-tier: a Cortex plugin (components under the `demo_tier.` namespace)."""', "",
        '__version__ = "0.1.0"']
    assert lines["src/demo_tier/plugin.py"][-6:] == [
        "from demo_tier.tiers import RecentMemory", "", "", "@hookimpl",
        "def cortex_register_components(register):", "    register(RecentMemory)"]
    assert lines["src/demo_tier/tiers.py"][0] == '"""The memory tier of cortex-demo-tier: `demo_tier.recent`."""'
    test = lines["tests/test_plugin.py"]
    i = test.index('MANIFEST = """\\')  # the backslash survives: the string starts at "cortex: 1"
    assert test[i + 1:i + 6] == ["cortex: 1", "name: demo_tier-test",
                                 "model: {dim: 32, layers: 2, heads: 2, context: 16}", "memory:",
                                 "  - {type: demo_tier.recent, settings: {capacity: 8}}"]
    assert '        fake_distribution("cortex-demo-tier", {"demo_tier": plugin}, version="0.1.0")' in test

    text = manifest_text(InitOptions(name="golden", size="small"), "golden.yaml").splitlines()
    assert text[4] == "#   cortex build golden.yaml         assemble the model, then train it into runs/golden"
    assert text[6] == "name: golden               # the run directory will be runs/golden"
    assert text[10] == "  dim: 128                 # width of the residual stream"
    bpe = " " * 27 + "# or {type: bpe, path: tokenizer.json} (`cortex tokenizer train`)"
    assert text[16:19] == [bpe, "", "memory:                    # memory tiers, in hand-over order (stm -> ltm)"]
    assert "      capacity: 10000      # entries at most, over all streams" in text
    i = text.index("train:                     # with this section, `cortex build` also trains the model")
    assert text[i - 1] == "" and text[-1] == (
        "  checkpoint_every: 200    # resumable checkpoints (`cortex train RUN --resume auto`)")
    bare = manifest_text(InitOptions(name="golden", memory=False, train=False)).splitlines()
    assert bare[4] == "#   cortex build manifest.yaml         assemble the model"
    assert bare[16:] == [bpe]  # nothing after the tokenizer


# --------------------------------------------------------------------------- the tutorial's steps, for real


@pytest.mark.slow
def test_plugin_new_then_the_tutorial_steps_in_a_fresh_virtual_environment(tmp_path):
    venv = make_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()

    def run(command: str, cwd: Path = work) -> str:
        result = venv.run(command, cwd)
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    run("cortex plugin new demo_tier")
    run("pip install --no-deps --no-build-isolation -e demo_tier")
    listed = json.loads(run("cortex plugins --json"))
    row = next(r for r in listed["components"] if r["name"] == "demo_tier.recent")
    assert row["distribution"] == "cortex-demo-tier" and row["version"] == "0.1.0" and not listed["errors"]

    manifest = shrink_manifest(yaml.safe_load(tiny_manifest(
        "uses-demo", memory=[{"type": "demo_tier.recent", "settings": {"capacity": 64}}],
        memory_system={"write": "all"}, train={"data": "demo", "batch": 4},
    )))
    (work / "uses-demo.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    out = run("cortex build uses-demo.yaml -o runs")
    assert "cortex-demo-tier" in out and "trained" in out
    stats = json.loads(run("cortex memory runs/uses-demo --json"))
    tiers = {t["tier"]: t for t in stats["tiers"]}
    assert tiers["memory.0.demo_tier.recent"]["entries"] > 0  # training wrote to the new tier
    assert "passed" in run("pytest demo_tier -p no:cacheprovider")
    assert "demo_tier" not in run("CORTEX_DISABLE_PLUGIN_AUTOLOAD=1 cortex plugins --json")


@pytest.mark.parametrize("name, reason", [
    ("json", "would shadow the module 'json'"),
    ("torch", "would shadow the module 'torch'"),
    ("stm", "the name of a built-in Cortex plugin"),
    ("cortex_extra", "try 'extra'"),
    ("cortex", "Cortex's own packages are named cortex*"),
    ("Bad-Name", "use a lower-case Python identifier"),
])
def test_plugin_new_refuses_names_that_would_shadow_or_double(cortex_cli, tmp_path, name, reason):
    result = cortex_cli("plugin", "new", name, "-o", tmp_path)
    assert result.exit_code == 1 and reason in result.stderr and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())
