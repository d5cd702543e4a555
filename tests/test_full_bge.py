"""examples/full_bge.yaml (issue 16): full.yaml plus bge_m3, its weights folder from ${CORTEX_BGE_M3};
without the variable it fails at once, saying how to get the weights."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MANIFEST = EXAMPLES / "full_bge.yaml"


def test_it_is_full_yaml_plus_bge_m3_reading_the_environment():
    full = yaml.safe_load((EXAMPLES / "full.yaml").read_text(encoding="utf-8"))
    bge = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert bge["features"][-1] == {"type": "bge_m3", "settings": {"path": "${CORTEX_BGE_M3}"}}
    assert {**bge, "name": "full", "features": bge["features"][:-1]} == full


def test_without_the_variable_validate_and_build_fail_at_once_saying_how_to_get_the_weights(
        cortex_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("CORTEX_BGE_M3", raising=False)
    for args in (("validate", MANIFEST), ("build", MANIFEST, "-o", tmp_path / "runs")):
        result = cortex_cli(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        (line,) = result.stderr.splitlines()  # one problem: nothing checked with ${CORTEX_BGE_M3} left in
        assert line.startswith("error: ") and "full_bge.yaml:" in line and "features[5].settings.path" in line
        assert "environment variable CORTEX_BGE_M3 is not set" in line
        assert "huggingface-cli download BAAI/bge-m3 --local-dir ~/models/bge-m3" in line
        assert "export CORTEX_BGE_M3=~/models/bge-m3" in line
    assert not (tmp_path / "runs").exists()


def test_a_variable_naming_a_folder_without_weights_is_named_with_the_download_hint(cortex_cli, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("CORTEX_BGE_M3", str(tmp_path / "bge-m3"))
    result = cortex_cli("validate", MANIFEST)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no BGE-M3 weights at {tmp_path / 'bge-m3'}" in result.stderr
    assert "huggingface-cli download BAAI/bge-m3" in result.stderr and "${" not in result.stderr
