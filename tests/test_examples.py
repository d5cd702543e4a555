"""Every shipped manifest validates and builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.assembly import assemble
from cortex.kernel.manifest import load_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: manifests that read the environment (full_bge.yaml needs BGE-M3 weights) are tested on their own
EXAMPLES = sorted(p for p in (Path(__file__).resolve().parent.parent / "examples").glob("*.yaml")
                  if "${" not in p.read_text(encoding="utf-8"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"minimal.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_assembles(path):
    model = assemble(load_manifest(path))
    summary = model.summary()
    assert summary["parameters"] > 0
    assert summary["name"] == path.stem
