"""CortexModel.save (issue 16): what the Python API teaches a model survives a restart."""

from __future__ import annotations

import pytest
import torch

import cortex
from cortex.runtime.rundir import RUN_FILES, run_lock
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FACT = "Mina's locker number is 4821."


@pytest.fixture
def run(cortex_cli, tmp_path):
    manifest = tmp_path / "mem.yaml"
    manifest.write_text(tiny_manifest("mem", memory=[{"type": "stm", "settings": {"capacity": 64}}]))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "mem"


def test_memory_told_through_python_survives_save_and_load(run):
    model = cortex.load(run)
    stored = model.remember(FACT, session="alice")
    assert stored > 0 and len(model.memory[0]) == stored
    assert len(cortex.load(run).memory[0]) == 0  # not saved yet: a restart forgets
    assert model.save() == run.resolve()
    again = cortex.load(run)
    assert len(again.memory[0]) == stored
    for key, value in model.memory[0].state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again.memory[0].state_dict()[key], value), key
    assert [p for p in run.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_save_to_a_new_path_writes_a_whole_run_and_later_saves_go_there(run, tmp_path):
    model = cortex.load(run)
    model.remember(FACT, session="alice")
    copy = model.save(tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(RUN_FILES)
    assert len(cortex.load(copy).memory[0]) == len(model.memory[0]) and len(cortex.load(run).memory[0]) == 0
    model.remember("Jun's locker number is 1234.", session="alice")
    model.save()
    assert len(cortex.load(copy).memory[0]) == len(model.memory[0])
    with pytest.raises(cortex.CortexError, match="already exists and is not the run this model was loaded from"):
        model.save(run)


def test_save_waits_for_no_one_while_another_writer_holds_the_run(run):
    model = cortex.load(run)
    with run_lock(run, "cortex chat"):
        with pytest.raises(cortex.CortexError, match=r"is in use by pid \d+ \(cortex chat\)"):
            model.save()


def test_a_model_assembled_in_python_is_first_saved_with_save_run(tmp_path):
    built = cortex.load_manifest_text(tiny_manifest("fresh", memory=[{"type": "stm", "settings": {"capacity": 8}}]))
    model = cortex.assemble(built)
    with pytest.raises(cortex.CortexError, match=r"cortex.save_run\(model, OUT_DIR\)"):
        model.save()
    path = cortex.save_run(model, tmp_path / "runs")
    model.remember(FACT)
    assert model.save() == path and len(cortex.load(path).memory[0]) == len(model.memory[0]) > 0
