"""The example third-party package (examples/third_party_plugin, `cortex-hopfield`) works with
an unchanged Cortex: listed by `cortex plugins`, built and trained by `cortex build`.

The fast tests load its module through a fake distribution; the slow one installs the
package for real (a wheel built offline) into a fresh virtual environment and runs its
own tests there.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_docs_examples import make_venv, shrink_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples/third_party_plugin"


def tiny_example() -> dict:
    """The example's manifest at a size that trains in seconds."""
    return shrink_manifest(yaml.safe_load((EXAMPLE / "hopfield.yaml").read_text(encoding="utf-8")))


@pytest.fixture
def hopfield(fake_distribution, monkeypatch):
    """cortex-hopfield as if installed: its entry point loads the module from the example's src/."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    module = importlib.import_module("cortex_hopfield.plugin")
    fake_distribution("cortex-hopfield", {"hopfield": module}, version="0.1.0")
    yield module
    for name in [n for n in sys.modules if n == "cortex_hopfield" or n.startswith("cortex_hopfield.")]:
        del sys.modules[name]


def test_the_package_declares_its_entry_point():
    import tomllib

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "cortex-hopfield"
    assert project["entry-points"]["cortex.plugins"] == {"hopfield": "cortex_hopfield.plugin"}


def test_cortex_plugins_lists_its_components(hopfield, cortex_cli):
    listed = json.loads(cortex_cli("plugins", "--json").stdout)["components"]
    rows = {r["name"]: r for r in listed if r["entry_point"] == "hopfield"}
    assert {n: r["kind"] for n, r in rows.items()} == {"hopfield.memory": "memory", "hopfield.hebbian": "plasticity"}
    assert {r["distribution"] for r in rows.values()} == {"cortex-hopfield"}


def test_its_manifest_builds_trains_and_the_run_keeps_the_hopfield_memory(hopfield, cortex_cli, tmp_path):
    import cortex

    path = tmp_path / "hopfield.yaml"
    path.write_text(yaml.safe_dump(tiny_example()), encoding="utf-8")
    result = cortex_cli("build", path, "-o", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "cortex-hopfield 0.1.0" in result.stdout and "trained" in result.stdout
    memory = json.loads(cortex_cli("memory", tmp_path / "runs/hopfield", "--json").stdout)
    tiers = {t["tier"]: t for t in memory["tiers"]}
    assert tiers["memory.1.hopfield.memory"]["entries"] > 0  # stm handed entries to the Hopfield tier

    model = cortex.load(tmp_path / "runs/hopfield")
    stm, hop = model.memory
    assert isinstance(hop, hopfield.HopfieldMemory) and len(hop) > 0  # restored from the run directory
    stream = next(iter(hop.streams))
    keys = hop.streams[stream]["keys"]
    got = hop.read(keys[:1] + 0.05 * keys[-1:], k=1, stream=stream)
    assert int(got.ids[0, 0]) >= 0 and float(got.scores[0, 0]) > 0.5
    assert model.plasticity[0].targets  # the Hebbian rule is attached again after loading
    reply = model.generate_text("Mina lives in", max_new_tokens=4)  # kNN-attention reads both tiers
    assert isinstance(reply, str)


@pytest.mark.slow
def test_installed_for_real_it_builds_trains_and_passes_its_own_tests(tmp_path):
    venv = make_venv(tmp_path / "venv")
    package = tmp_path / "cortex-hopfield"
    shutil.copytree(EXAMPLE, package, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    work = tmp_path / "work"
    work.mkdir()

    def run(command: str, cwd: Path = work) -> str:
        result = venv.run(command, cwd)
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    run(f"pip install --no-deps --no-build-isolation {package}")  # a wheel, not an editable install
    listed = json.loads(run("cortex plugins --json"))
    names = {r["name"]: r for r in listed["components"]}
    assert names["hopfield.memory"]["distribution"] == "cortex-hopfield" and "hopfield.hebbian" in names
    assert not listed["errors"]
    (work / "hopfield.yaml").write_text(yaml.safe_dump(tiny_example()), encoding="utf-8")
    out = run("cortex build hopfield.yaml -o runs")
    assert "cortex-hopfield 0.1.0" in out and "trained" in out
    tiers = {t["tier"]: t for t in json.loads(run("cortex memory runs/hopfield --json"))["tiers"]}
    assert tiers["memory.1.hopfield.memory"]["entries"] > 0
    shutil.rmtree(package / "src")  # its tests must use the installed package
    assert "7 passed" in run("pytest -q -p no:cacheprovider", cwd=package)
