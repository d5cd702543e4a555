"""Manifest errors: every kind, reported at once, with FILE:LINE:COL and a fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cortex.kernel.manifest import ManifestError, load_manifest, load_manifest_text, parse_yaml

GOOD = """\
cortex: 1
name: tiny
model: {dim: 32, layers: 2, heads: 2, context: 32}
memory:
  - type: stm
    settings: {capacity: 8}
"""


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}:") for line in lines), lines
    return lines


def test_good_manifest_validates():
    built = load_manifest_text(GOOD)
    assert built.manifest.model.dim == 32
    [tier] = built.section("memory")
    assert tier.info.name == "stm" and tier.settings.capacity == 8


def test_misspelt_component_and_negative_dim_reported_together(tmp_path):
    text = GOOD.replace("dim: 32", "dim: -4").replace("type: stm", "type: stmm")
    lines = problems(text, tmp_path)
    assert len(lines) == 2
    dim, comp = lines
    assert re.match(r".*m\.yaml:3:\d+ model\.dim: .*greater than 0", dim)
    assert re.match(r".*m\.yaml:5:11 memory\[0\]\.type: unknown memory component 'stmm'; did you mean 'stm'\?", comp)


def test_component_settings_errors_point_at_the_value(tmp_path):
    text = GOOD.replace("capacity: 8", "capacity: 0, colour: red")
    lines = problems(text, tmp_path)
    assert any(":6:" in l and "memory[0].settings.capacity: Input should be greater than 0" in l for l in lines)
    assert any("memory[0].settings.colour: unknown key" in l for l in lines)


def test_unknown_keys_missing_fields_and_version(tmp_path):
    lines = problems("cortex: 2\nmodle: {dim: 8}\n", tmp_path)
    text = "\n".join(lines)
    assert ":1:9 cortex: schema version 2 is not supported" in text
    assert ":2:1 modle: unknown key" in text
    assert "name: required field `name` is missing" in text


def test_shape_constraints(tmp_path):
    lines = problems("cortex: 1\nname: x\nmodel:\n  dim: 30\n  heads: 4\n", tmp_path)
    assert any(":4:3 model: dim 30 is not divisible by heads 4" in l for l in lines)
    lines = problems("cortex: 1\nname: x\nmodel: {dim: 32, heads: 2, layers: 2, memory_layers: [5]}\n", tmp_path)
    assert any("memory_layers [5] outside 0..1" in l for l in lines)


def test_python_tags_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    text = f"cortex: 1\nname: !!python/object/apply:os.system ['touch {marker}']\n"
    lines = problems(text, tmp_path)
    assert "tag:yaml.org,2002:python/object/apply:os.system" in lines[0]
    assert ":2:7 name: YAML tag" in lines[0] and "plain data only" in lines[0]
    assert not marker.exists()


def test_invalid_yaml_duplicate_keys_and_empty(tmp_path):
    assert ":3:1: invalid YAML: expected ',' or ']'" in problems("cortex: 1\nname: [unclosed\n", tmp_path)[0]
    dup = problems("cortex: 1\nname: a\nname: b\n", tmp_path)
    assert any(":3:1 name: duplicate key" in l for l in dup)
    assert "the manifest is empty" in problems("", tmp_path)[0]
    assert "a manifest is a mapping" in problems("- 1\n- 2\n", tmp_path)[0]


def test_alias_bomb_is_refused(tmp_path):
    lines = ["cortex: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    assert "more than" in problems("\n".join(lines) + "\n", tmp_path)[0]


def test_run_name_cannot_escape(tmp_path):
    lines = problems("cortex: 1\nname: ../evil\n", tmp_path)
    assert "not a valid run name" in lines[0]


def test_wrong_kind_and_unknown_namespace(fake_distribution, tmp_path):
    from tests.conftest import ExactTier, make_plugin

    fake_distribution("hopfield-memory", {"hopfield": make_plugin(ExactTier)})
    text = GOOD + "features:\n  - type: stm\n  - type: hopfeld.exact\n"
    lines = problems(text, tmp_path)
    assert any("features[0].type: 'stm' is a memory component, not a feature component" in l for l in lines)
    assert any("no installed plugin provides the namespace 'hopfeld'; did you mean 'hopfield'?" in l for l in lines)


def test_data_source_names_and_paths(tmp_path):
    base = "cortex: 1\nname: x\ntrain:\n  data: {}\n"
    built = load_manifest_text(base.format("demo").replace("{}", "demo"))
    assert built.data is not None and built.data.info.name == "demo"
    built = load_manifest_text(base.replace("{}", "data/prepared"))
    assert built.data is None and built.manifest.train.data.type == "data/prepared"
    lines = problems(base.replace("{}", "dmo"), tmp_path)
    assert "train.data.type: unknown data component 'dmo'; did you mean 'demo'?" in lines[0]


def test_positions_are_recorded_for_every_node():
    src = parse_yaml(GOOD, "g.yaml")
    assert src.position(("memory", 0, "settings", "capacity")) == (6, 26)
    assert src.position(("model", "dim")) == (3, 14)
    assert src.position(("model", "nonexistent")) == (3, 8)
