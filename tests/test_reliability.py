"""Nothing is lost: data-loss cases found by trying the CLI as a careful user would."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest("reliable", context=32, memory=[{"type": "stm", "settings": {"capacity": 16}}])


def test_data_prepare_never_replaces_a_folder_that_merely_holds_a_meta_json(cortex_cli, tmp_path):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "meta.json").write_text("{}")
    (mine / "thesis.txt").write_text("my thesis")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    refused = cortex_cli("data", "prepare", corpus, "-o", mine)
    assert refused.exit_code == 1 and "is not a Cortex dataset" in refused.stderr
    assert (mine / "thesis.txt").read_text() == "my thesis" and (mine / "meta.json").read_text() == "{}"

    data = tmp_path / "data"
    assert cortex_cli("data", "prepare", corpus, "-o", data).exit_code == 0
    assert cortex_cli("data", "prepare", corpus, "-o", data).exit_code == 0  # a dataset is replaced
    (data / "notes.txt").write_text("mine")  # ... but not once it holds a file of the user's
    again = cortex_cli("data", "prepare", corpus, "-o", data)
    assert again.exit_code == 1 and (data / "notes.txt").read_text() == "mine"
    assert json.loads((data / "meta.json").read_text())["cortex_dataset"]


@pytest.fixture
def lock_holder(tmp_path):
    """A real second process holding a run directory's lock, as `cortex train` would."""
    procs = []

    def hold(run):
        code = ("import sys, time\nfrom cortex.runtime.rundir import run_lock\n"
                f"with run_lock({str(run)!r}, 'cortex train'):\n    print('locked', flush=True)\n    time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_and_readers_go_on(lock_holder, cortex_cli, tmp_path, monkeypatch):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY)
    assert cortex_cli("build", manifest, "-o", tmp_path / "runs").exit_code == 0
    run = tmp_path / "runs" / "reliable"
    state = (run / "state.json").read_text()
    holder = lock_holder(run)
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Aris.\n/quit\n"))
    chat = cortex_cli("chat", run)
    assert chat.exit_code == 1
    assert f"is in use by pid {holder.pid} (cortex train)" in chat.stderr and "Traceback" not in chat.output
    assert (run / "state.json").read_text() == state  # the refused chat wrote nothing
    again = cortex_cli("build", manifest, "-o", tmp_path / "runs", "--overwrite")
    assert again.exit_code == 1 and f"pid {holder.pid}" in again.stderr
    assert cortex_cli("memory", run).exit_code == 0  # readers never block
    assert cortex_cli("generate", run, "-p", "Hi", "--max-tokens", "3").exit_code == 0
    holder.kill()
    holder.wait()
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Aris.\n/quit\n"))
    assert cortex_cli("chat", run).exit_code == 0  # the lock goes with its process


def test_a_run_name_with_a_trailing_newline_is_refused(cortex_cli, tmp_path):
    manifest = tmp_path / "nl.yaml"
    manifest.write_text(TINY.replace("name: reliable", 'name: "tiny\\n"'))
    result = cortex_cli("validate", manifest)
    assert result.exit_code == 1 and "name" in result.stderr and not (tmp_path / "runs").exists()


def test_chat_goes_on_after_input_that_is_not_utf8(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY)
    cortex = [sys.executable, "-m", "cortex.cli.app"]
    subprocess.run([*cortex, "build", str(manifest), "-o", str(tmp_path / "runs")], check=True, capture_output=True)
    done = subprocess.run([*cortex, "chat", str(tmp_path / "runs" / "reliable"), "--max-tokens", "2"],
                          input=b"hello\nhello \xff\xfe world\nafter\n/quit\n", capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-800:]
    assert b"not UTF-8" in done.stderr and b"Traceback" not in done.stderr
    assert done.stderr.count(b"confidence") == 3  # every turn answered, the one after the bad bytes too


def test_in_real_time_use_what_ltm_evicts_moves_down_to_the_archive(build_model):
    model = build_model(tiny_manifest("chain", context=32, memory=[
        {"type": "stm", "settings": {"capacity": 8, "consolidate_after": 1}},
        {"type": "ltm", "settings": {"capacity": 40, "index": "flat"}},
        {"type": "archive", "settings": {"capacity": 10000, "age_steps": [1000, 2000]}}]))
    stm, ltm, archive = model.memory
    for i in range(30):
        model.remember(f"Turn {i}: Mina said something new about the weather {i * 7}.")
    assert len(ltm) <= 40 and ltm.stats()["evicted"] > 0
    assert len(archive) > 0  # nothing LTM pushed out was dropped: it moved down
    assert len(archive) + len(ltm) + len(stm) >= ltm.stats()["evicted"]
    for i in range(3):  # reading strengthens entries; the next remember() hands them down, as a step does
        model.generate_text(f"Turn 29: Mina said something new about the weather", max_new_tokens=4)
        model.remember(f"Another turn {i}.")
    assert model.memory_system.stats["consolidated"] > 0


def _built(cortex_cli, tmp_path, text=TINY):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(text)
    assert cortex_cli("build", manifest, "-o", tmp_path / "runs").exit_code == 0
    return tmp_path / "runs" / "reliable"


def test_state_that_does_not_fit_the_manifest_is_one_clear_error(cortex_cli, tmp_path):
    run = _built(cortex_cli, tmp_path)
    manifest = run / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("dim: 32", "dim: 64").replace("heads: 2", "heads: 4"))
    (run / "model.safetensors").unlink()
    from safetensors.torch import save_model

    from cortex import assemble, load_manifest
    save_model(assemble(load_manifest(manifest)).core, str(run / "model.safetensors"))  # weights fit, state not
    result = cortex_cli("memory", run)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "state.safetensors: the state of 'memory.0.stm' does not fit this model" in result.stderr


def test_deeply_nested_json_is_a_format_error_not_a_recursion_error(cortex_cli, tmp_path):
    run = _built(cortex_cli, tmp_path)
    (run / "tokenizer.json").write_text("[" * 200_000)
    result = cortex_cli("generate", run, "-p", "Hi")
    assert result.exit_code == 1 and "tokenizer.json: not a readable tokenizer file" in result.stderr
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_a_pickle_in_a_checkpoint_is_refused_with_cortexs_own_message(cortex_cli, tmp_path):
    import pickle

    train = {"data": "demo", "tokens": 2048, "batch": 2, "eval_every": 4, "checkpoint_every": 2, "warmup": 1}
    run = _built(cortex_cli, tmp_path, tiny_manifest("reliable", context=32, train=train))
    checkpoints = sorted((run / "checkpoints").iterdir())
    payload = pickle.dumps(Exception("not tensors"))
    (checkpoints[-1] / "optimizer.pt").write_bytes(payload)
    index = json.loads((checkpoints[-1] / "checkpoint.json").read_text())  # an attacker fixes the index too
    index["files"]["optimizer.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (checkpoints[-1] / "checkpoint.json").write_text(json.dumps(index))
    result = cortex_cli("train", run, "--resume", checkpoints[-1])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not a checkpoint file this version of Cortex wrote" in result.stderr
    assert "weights_only" not in result.stderr  # torch's advice to load it unsafely is not passed on


@pytest.mark.parametrize("change, where", [
    ({"dim": 1 << 40}, "model: needs about"),
    ({"context": 4_000_000_000}, "model: needs about"),
    ({"capacity": 10 ** 12}, "memory[0].settings.capacity: 1000000000000 entries"),
])
def test_sizes_that_cannot_fit_are_refused_at_validation(cortex_cli, tmp_path, change, where):
    capacity = change.pop("capacity", 16)
    manifest = tmp_path / "big.yaml"
    manifest.write_text(tiny_manifest("big", memory=[{"type": "stm", "settings": {"capacity": capacity}}],
                                      **{"heads": 2, **change}))
    result = cortex_cli("validate", manifest)
    assert result.exit_code == 1 and where in result.stderr and "this machine has" in result.stderr
    assert "Traceback" not in result.output


def test_output_paths_are_checked_before_any_work(cortex_cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello world"}\n')
    cases = [
        (("build", manifest, "-o", afile), "is a file, not a folder"),
        (("bench", "throughput", manifest, "--quick", "-o", afile), "is a file, not a folder"),
        (("tokenizer", "train", corpus, "-o", afile / "t.json"), "is not a folder"),
        (("schema", "-o", tmp_path), "is a folder"),
        (("schema", "-o", tmp_path / "missing" / "s.json"), "does not exist"),
    ]
    for args, message in cases:
        result = cortex_cli(*args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
        assert "Traceback" not in result.output and "build" not in result.stdout.lower()
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("killed_after", [0, 1])
def test_a_kill_inside_a_best_model_write_leaves_one_consistent_save(build_model, tmp_path, monkeypatch,
                                                                    killed_after):
    """Fault injection: the process dies after ``killed_after`` of the two file replacements."""
    import os

    import torch

    from cortex import load, save_run
    from cortex.runtime import rundir

    model = build_model(TINY)
    model.remember("Mina's locker number is 3817.")
    run = save_run(model, tmp_path / "runs")
    old = load(run)
    with torch.no_grad():
        for p in model.core.parameters():
            p.add_(0.1)
    model.remember("Jun's bike code is 4242.")
    real, done = os.replace, []

    def dying_replace(src, dst):
        if Path(dst).name in ("model.safetensors", "state.safetensors"):
            if len(done) == killed_after:
                raise KeyboardInterrupt("killed")
            done.append(dst)
        return real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        rundir.write_into(model, run)
    monkeypatch.setattr(rundir.os, "replace", real)
    loaded = load(run)
    expected = old if killed_after == 0 else model  # before the first rename: the old save, else the new
    assert all(torch.equal(a, b) for a, b in zip(loaded.core.parameters(), expected.core.parameters()))
    assert len(loaded.memory[0]) == len(expected.memory[0])
    assert not list(run.glob(".*.tmp")) or killed_after == 0  # the pending state was put in place
    rundir.write_into(loaded, run)  # the next write cleans what the killed one left
    assert not list(run.glob(".*.tmp"))


def test_sessions_are_bounded_the_least_recently_used_moves_down(build_model):
    model = build_model(tiny_manifest("sessions", context=32, memory=[
        {"type": "stm", "settings": {"capacity": 16, "max_streams": 4}},
        {"type": "ltm", "settings": {"capacity": 100000, "index": "flat"}}]))
    stm, ltm = model.memory
    for i in range(30):
        model.remember(f"Session {i} says its number is {1000 + i}.", session=f"s{i}")
    assert stm.stream_ids.numel() == 4 and len(stm) <= 4 * 16  # bounded, whatever the number of sessions
    assert stm.stats()["evicted"] > 0 and len(ltm) > 0  # the dropped sessions' entries moved down
    assert model.generate_text("Session 0 says its number is", session="s0",
                               max_new_tokens=5).startswith(" 1000")  # ... where they are still found


@pytest.mark.parametrize("tamper", ["random index", "huge allocation", "wrong json type"])
def test_tampered_ltm_state_is_one_clear_error(cortex_cli, tmp_path, monkeypatch, tamper):
    import torch

    from cortex.runtime.rundir import load_state, save_state

    text = tiny_manifest("reliable", context=32, memory=[
        {"type": "stm", "settings": {"capacity": 8}}, {"type": "ltm", "settings": {"capacity": 1000, "index": "flat"}}])
    run = _built(cortex_cli, tmp_path, text)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"Fact number {i} is {i * 37}.\n" for i in range(6))))
    assert cortex_cli("chat", run, "--max-tokens", "1").exit_code == 0  # fills LTM through spill
    state = load_state(run)
    ltm = state["memory.1.ltm"]
    assert ltm["index_table"], "LTM should hold a FAISS index"
    if tamper == "random index":
        ltm["index_blob"] = torch.randint(0, 255, ltm["index_blob"].shape, dtype=torch.uint8)
    elif tamper == "huge allocation":
        ltm["allocated"] = 10 ** 14
    else:
        ltm["next_id"] = "abc"
    save_state(run, state)
    result = cortex_cli("memory", run)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output[-500:]
    assert "state.safetensors: the state of 'memory.1.ltm' does not fit this model" in result.stderr


def test_training_prints_plain_progress_lines_when_the_output_is_not_a_terminal(cortex_cli, tmp_path, monkeypatch):
    from cortex.runtime import train

    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)  # a line at every step instead of every 30 s
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(tiny_manifest("progress", context=32, train={"data": "demo", "tokens": 1024, "batch": 4,
                                                                      "eval_every": 0, "checkpoint_every": 0}))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/8" for i in range(1, 9)]
    assert all("loss" in line and "tok/s" in line and "left" in line for line in lines)
    assert "train " not in result.stdout and "ETA" not in result.stdout  # no bar drawn into a file


def test_a_build_that_fails_in_training_says_the_run_is_kept_and_how_to_go_on(cortex_cli, tmp_path):
    manifest = tmp_path / "fails.yaml"
    manifest.write_text(tiny_manifest("fails", train={"data": {"type": "jsonl", "settings": {"paths": ["gone.jsonl"]}},
                                                      "tokens": 1024, "batch": 4}))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    run = tmp_path / "runs" / "fails"
    assert result.exit_code == 1 and "gone.jsonl" in result.stderr and "Traceback" not in result.output
    assert f"the run directory {run} is kept" in result.stderr and f"cortex train {run} --resume auto" in result.stderr
    assert (run / "manifest.yaml").is_file()  # loadable and resumable, not half-written
