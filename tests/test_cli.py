"""The command line as users run it: messages, exit codes, run directories, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cortex
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest()


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    """The installed ``cortex`` entry point, in a fresh interpreter."""
    code = "import sys; from cortex.cli.app import main; sys.argv[0] = 'cortex'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_version(cortex_cli):
    result = cortex_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"cortex {cortex.__version__}"


def test_validate_reports_both_errors_with_suggestion(cortex_cli, tmp_path):
    # its own text: the errors name these lines and columns
    path = write(tmp_path, "cortex: 1\nname: tiny\nmodel: {dim: -1, layers: 2, heads: 2, context: 32}\n"
                           "memory:\n  - type: stmm\n")
    result = cortex_cli("validate", path)
    assert result.exit_code == 1
    assert f"{path}:3:14 model.dim: Input should be greater than 0" in result.stderr
    assert f"{path}:5:11 memory[0].type: unknown memory component 'stmm'; did you mean 'stm'?" in result.stderr
    assert "Traceback" not in result.output


def test_real_script_prints_no_traceback(tmp_path):
    path = write(tmp_path, tiny_manifest(dim=-1, train={"data": "dmo"}))
    result = run_script("validate", path)
    assert result.returncode == 1
    assert "model.dim" in result.stderr and "did you mean 'demo'?" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_python_tag_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path, TINY + f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    result = run_script("build", path, "-o", tmp_path / "runs")
    assert result.returncode == 1
    assert "python/object/apply" in result.stderr and "not allowed" in result.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_build_writes_a_complete_run_directory(cortex_cli, tmp_path):
    path = write(tmp_path, TINY)
    result = cortex_cli("build", path, "-o", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert {p.name for p in run.iterdir()} == {
        "manifest.yaml", "model.safetensors", "tokenizer.json", "state.safetensors", "state.json", "build.json"}
    assert (run / "manifest.yaml").read_text() == TINY
    info = json.loads((run / "build.json").read_text())
    assert info["environment"]["cortex"] == cortex.__version__
    assert info["summary"]["parameters"] > 0 and info["summary"]["model"]["dim"] == 32
    assert "parameters" in result.stdout and "transformer" in result.stdout
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]  # no temp leftovers

    again = cortex_cli("build", path, "-o", tmp_path / "runs")
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert cortex_cli("build", path, "-o", tmp_path / "runs", "--overwrite").exit_code == 0


def test_run_name_cannot_leave_the_output_directory(cortex_cli, tmp_path):
    path = write(tmp_path, TINY)
    result = cortex_cli("build", path, "-o", tmp_path / "runs", "--name", "../outside")
    assert result.exit_code == 1 and "not allowed" in result.stderr
    assert not (tmp_path / "outside").exists()


def test_missing_manifest_and_unknown_suite(cortex_cli, tmp_path):
    result = cortex_cli("build", tmp_path / "nope.yaml")
    assert result.exit_code == 1 and "nope.yaml: no such manifest file" in result.stderr
    result = cortex_cli("bench", "thruput")
    assert result.exit_code == 1 and "did you mean 'throughput'?" in result.stderr


def test_schema_includes_component_settings(cortex_cli):
    result = cortex_cli("schema")
    schema = json.loads(result.stdout)
    assert "model" in schema["properties"]
    assert "documents" in schema["x-cortex-components"]["data:demo"]["properties"]


def test_bench_throughput_quick_writes_a_report(cortex_cli, tmp_path):
    path = write(tmp_path, TINY)
    result = cortex_cli("bench", "throughput", path, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "throughput"
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == ["cortex", "bench", "throughput", str(path), "--quick", "-o", str(tmp_path / "out")]
    assert data["threads"] >= 1 and data["seeds"] == [0]
    fp32 = data["figures"][f"{path}:fp32"]
    assert fp32["tokens_per_s"]["median"] > 0 and fp32["vs_reference"]["mean"] > 0
    assert {c["name"] for c in data["checks"]} == {f"{path} fp32 core/reference", f"{path} bf16 core/reference"}
    report = (out / "report.md").read_text()
    assert "core/reference" in report and "![throughput.png](throughput.png)" in report
    assert (out / "throughput.png").stat().st_size > 1000


def test_bench_throughput_compares_a_memory_manifest_with_the_plain_one(cortex_cli, tmp_path):
    plain = write(tmp_path, TINY)
    memory = write(tmp_path, tiny_manifest("mem", memory_layers=[1], memory=[{"type": "stm", "settings": {"capacity": 16}}],
                                           memory_system={"read": ["knn_attention"]}), "mem.yaml")
    result = cortex_cli("bench", "throughput", plain, memory, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "throughput" / "results.json").read_text())
    names = {c["name"] for c in data["checks"]}
    assert f"{memory} bf16 vs {plain}" in names and f"{plain} bf16 core/reference" in names
    assert data["figures"][f"{memory}:fp32"]["vs_first_target"]["mean"] > 0
    assert data["figures"][f"{plain}:fp32"]["vs_first_target"]["mean"] == 1.0


def test_bench_throughput_times_generation_that_reads_memory_at_every_token(tmp_path, monkeypatch):
    """Its prompt is token ids, which no feature reads told text for, so under
    ``lm_recalled_only`` kNN-LM would read nothing: the timing switches it off."""
    from cortex.core.memory import MemorySystem
    from cortex_plugins.bench.throughput import Throughput

    path = write(tmp_path, tiny_manifest("lm", memory=[{"type": "stm", "settings": {"capacity": 64}}],
                                         memory_system={"read": ["knn_lm"], "lm_recalled_only": True}), "lm.yaml")
    reads = []
    original = MemorySystem.knn_distribution
    monkeypatch.setattr(MemorySystem, "knn_distribution", lambda self, *a, **k: reads.append(1) or original(self, *a, **k))
    figures = Throughput(Throughput.Settings(), None)._generation([path], rounds=1, seeds=[0], log=lambda _: None)
    assert figures[str(path)]["tokens_per_s"]["mean"] > 0 and figures[str(path)]["remembered_tokens"] > 0
    assert len(reads) >= 4 + 16  # the warm-up's tokens and every timed one (context 32: 16 new after 16)


def test_tables_never_cut_names_when_the_output_is_not_a_terminal():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cortex.cli.app", "plugins"], capture_output=True, text=True,
                          env={**__import__("os").environ, "COLUMNS": "40"})
    assert done.returncode == 0
    assert "cognition_graph" in done.stdout and "…" not in done.stdout
