"""Manifest values from the command line (``--set``) and from the environment (``${NAME}``)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("# my comment\n" + tiny_manifest("tiny", memory=[{"type": "stm", "settings": {"capacity": 8}}]))
    return path


def test_set_changes_values_and_the_run_records_them(cortex_cli, manifest, tmp_path):
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs", "--set", "model.dim=64",
                        "--set", "memory.0.settings.capacity=16")
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "runs" / "tiny" / "manifest.yaml").read_text()
    data = yaml.safe_load(saved)
    assert data["model"]["dim"] == 64 and data["memory"][0]["settings"]["capacity"] == 16
    assert "--set model.dim=64" in saved.splitlines()[0]  # the record says how it was made
    assert "dim 64" in result.stdout and (tmp_path / "runs" / "tiny").is_dir()
    memory = cortex_cli("memory", tmp_path / "runs" / "tiny")  # the run loads with its own values
    assert memory.exit_code == 0 and " 16 " in memory.stdout


@pytest.mark.parametrize("option, message", [
    ("model.dimm=64", "--set model.dimm: unknown key; did you mean 'dim'?"),
    ("memory.0.settings.capacty=16", "--set memory[0].settings.capacty: unknown key; did you mean 'capacity'?"),
    ("model.dim=-3", "--set model.dim: Input should be greater than 0"),
    ("memory.5.settings.capacity=1", "--set memory[5]: no such list item or section"),
    ("model.dim", "--set model.dim: expected KEY.PATH=VALUE"),
])
def test_a_wrong_set_is_named_with_the_manifests_own_message(cortex_cli, manifest, tmp_path, option, message):
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs", "--set", option)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert not (tmp_path / "runs" / "tiny").exists() and "Traceback" not in result.output


def test_environment_variables_fill_values_and_an_unset_one_is_named(cortex_cli, tmp_path, monkeypatch):
    path = tmp_path / "env.yaml"
    path.write_text(tiny_manifest("env").replace("name: env", 'name: "${RUN_NAME_FOR_TEST}"'))
    monkeypatch.delenv("RUN_NAME_FOR_TEST", raising=False)
    missing = cortex_cli("validate", path)
    assert missing.exit_code == 1
    assert "name: environment variable RUN_NAME_FOR_TEST is not set" in missing.stderr
    monkeypatch.setenv("RUN_NAME_FOR_TEST", "from-env")
    assert cortex_cli("build", path, "-o", tmp_path / "runs").exit_code == 0
    assert yaml.safe_load((tmp_path / "runs" / "from-env" / "manifest.yaml").read_text())["name"] == "from-env"
