"""The generated reference pages (manifest, command line) are current and complete.

When a test here fails after you changed a model field, a component's settings or a
command: run ``python docs/gen_reference.py`` and commit the pages it rewrites.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `python docs/gen_reference.py` and commit docs/reference/manifest.md and cli.md"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs/gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_reference_is_current(gen):
    committed = gen.MANIFEST_PAGE.read_text(encoding="utf-8")
    assert committed == gen.manifest_reference(), f"docs/reference/manifest.md is out of date; {FIX}"


def test_cli_reference_is_current(gen):
    committed = gen.CLI_PAGE.read_text(encoding="utf-8")
    assert committed == gen.cli_reference(), f"docs/reference/cli.md is out of date; {FIX}"


def test_every_manifest_field_and_builtin_setting_is_described(gen):
    assert gen.undocumented_fields() == [], "give these fields a Field(description=...)"


def test_every_command_and_parameter_has_help(gen):
    assert gen.undocumented_cli() == [], "give these commands a docstring and these parameters help=..."


def test_reference_covers_every_field_section_and_component(gen):
    from cortex.kernel.manifest import Manifest, TrainSection
    from cortex.kernel.manifest import MemorySettings

    page = gen.MANIFEST_PAGE.read_text(encoding="utf-8")
    for model in (Manifest, TrainSection, MemorySettings):
        for name in model.model_fields:
            assert f"| `{name}` |" in page, f"{model.__name__}.{name} is missing from the manifest reference"
    for section in ("`model`", "`tokenizer`", "`memory_system`", "`plasticity[]`", "`train`", "`train.data`"):
        assert f"### {section}" in page
    for info in gen.builtin_components():
        assert f"#### `{info.name}`" in page, f"{info.kind} component {info.name} is missing"
    cli = gen.CLI_PAGE.read_text(encoding="utf-8")
    for command in ("cortex build", "cortex init", "cortex plugin new", "cortex data prepare"):
        assert f"## `{command}`" in cli


def test_generation_ignores_third_party_plugins(gen, fake_distribution):
    from tests.conftest import ExactTier, make_plugin

    fake_distribution("third-party", {"thirdp": make_plugin(ExactTier)})
    assert "thirdp" not in gen.manifest_reference()


def test_check_mode_reports_a_stale_page(gen, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "PAGES", {stale: gen.cli_reference})
    assert gen.main(["--check"]) == 1 and stale.read_text() == "old\n"
    assert "out of date" in capsys.readouterr().err
    assert gen.main([]) == 0 and stale.read_text() == gen.cli_reference()
    assert gen.main(["--check"]) == 0


def test_reference_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in ("reference/manifest.md", "reference/cli.md", "plugins/tutorial.md", "ko/quickstart.md"):
        assert page in nav, f"{page} is not in mkdocs.yml's nav"
