"""`cortex bench ablate`: one variant per component, each measured, deltas tabulated."""

from __future__ import annotations

import json

import pytest

from cortex.kernel.manifest import load_manifest_text
from cortex_plugins.bench.ablate import variants
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STM = {"type": "stm", "settings": {"capacity": 32}}
LTM = {"type": "ltm", "settings": {"capacity": 4096}}


def manifest(*memory: dict) -> str:
    return tiny_manifest("abl", context=64, memory_layers=[1], memory=list(memory),
                         memory_system={"read": ["knn_lm"]})


TINY = manifest(STM, LTM)


def test_variants_remove_one_component_each_and_stay_valid():
    import yaml

    found = variants(yaml.safe_load(TINY))
    assert list(found) == ["full", "without memory[0] stm", "without memory[1] ltm"]
    assert [m["type"] for m in found["without memory[0] stm"]["memory"]] == ["ltm"]
    for variant in found.values():
        load_manifest_text(yaml.safe_dump(variant))
    lone = variants(yaml.safe_load(manifest(STM)))
    assert "memory_system" not in lone["without memory[0] stm"]
    load_manifest_text(yaml.safe_dump(lone["without memory[0] stm"]))


def test_quick_ablation_shows_what_each_tier_does(cortex_cli, tmp_path):
    manifest = tmp_path / "abl.yaml"
    manifest.write_text(TINY)
    result = cortex_cli("bench", "ablate", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "ablate" / "results.json").read_text())["figures"][str(manifest)]
    assert set(table) == {"full", "without memory[0] stm", "without memory[1] ltm"}
    metric = "recall:passkey:knn_lm:1"
    # a small STM alone forgets the passkey under a window of filler; with the LTM it is kept
    assert table["full"][metric]["mean"] > table["without memory[1] ltm"][metric]["mean"]
    assert table["full"][metric]["mean"] > table["full"]["recall:passkey:off:1"]["mean"]


def test_a_variant_its_components_refuse_is_named_and_the_others_measured(cortex_cli, tmp_path):
    manifest = tmp_path / "loss.yaml"  # without the STM, the retrieval loss has no dense tier to read
    manifest.write_text(tiny_manifest("abl", context=64, memory_layers=[1], memory=[STM, LTM],
                                      memory_system={"read": ["knn_attention"]}, features=["retrieval_loss"]))
    result = cortex_cli("bench", "ablate", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "ablate" / "results.json").read_text())
    table = report["figures"][str(manifest)]
    assert table["without memory[0] stm"] == {} and table["full"] and table["without features[0] retrieval_loss"]
    assert any("without memory[0] stm: not measured" in note and "dense" in note for note in report["notes"])
