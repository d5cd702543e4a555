"""Checkpoints: exact resume, atomic writes that survive a crash, clear errors when damaged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cortex import hookimpl
from cortex.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cortex.kernel.errors import CheckpointError
from cortex.kernel.interfaces import CognitiveFeature
from cortex.runtime.rundir import load_run
from cortex.runtime.step import make_optimizer
from cortex.runtime.train import train
from tests.test_train import (
    manifest_text,
    new_run,
    plugin,
    read_metrics,
    settings,
    write_corpus,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class StepCounter(CognitiveFeature):
    """Plugin state that changes every step: a count and a running sum of the loss."""

    name = "counter"

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.count = 0
        self.total = torch.zeros(2, dtype=torch.float64)

    @hookimpl
    def cortex_after_step(self, model, step, metrics):
        self.count += 1
        self.total += torch.tensor([metrics["loss"], step], dtype=torch.float64)
        metrics["counted"] = float(self.count)

    def state_dict(self):
        return {"count": self.count, "total": self.total.clone()}

    def load_state_dict(self, state):
        self.count = int(state["count"])
        self.total = state["total"].clone()


COUNTED = manifest_text(dropout=0.1, features=["ckpt.counter"])


def counter(model) -> StepCounter:
    (feature,) = model.features
    return feature


def test_train_2n_equals_train_n_then_resume_n(tmp_path, register_plugin):
    register_plugin(plugin(StepCounter), namespace="ckpt")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    s = settings(checkpoint_every=4, eval_every=4, micro_batch=4)  # dropout: the RNG matters too
    n = 6

    straight, run_a = new_run(tmp_path, COUNTED, name="a")
    train(straight, run_a, s, data=str(corpus), steps=2 * n)

    first, run_b = new_run(tmp_path, COUNTED, name="b")
    part = train(first, run_b, s, data=str(corpus), steps=2 * n, stop_at=n)
    assert part["steps"] == n and latest_checkpoint(run_b).name == f"step-{n:08d}"
    torch.manual_seed(1234)  # a fresh process would not share the first half's RNG state
    resumed = load_run(run_b)
    train(resumed, run_b, s, data=str(corpus), resume="auto")

    for (name, a), b in zip(straight.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.equal(a, b), name
    assert counter(straight).count == counter(resumed).count == 2 * n
    assert torch.equal(counter(straight).total, counter(resumed).total)
    ca, cb = (latest_checkpoint(r) for r in (run_a, run_b))
    assert ca.name == cb.name == f"step-{2 * n:08d}"
    ta, tb = (json.loads((c / "trainer.json").read_text()) for c in (ca, cb))
    assert ta == tb and ta["position"] == 2 * n * 32
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ca, cb))
    for pa, pb in zip(oa["state"].values(), ob["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ra, rb = (torch.load(c / "rng.pt", weights_only=True) for c in (ca, cb))
    assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
    assert torch.equal(ra["numpy"]["key"], rb["numpy"]["key"])
    la, lb = (read_metrics(r)[0] for r in (run_a, run_b))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert [x["counted"] for x in lb] == [float(i) for i in range(1, 2 * n + 1)]
    assert len(list_checkpoints(run_b)) == 2  # keep_checkpoints


def _small_checkpoint(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    optimizer = make_optimizer(model, 1e-3)
    first = save_checkpoint(run, model, optimizer, {"step": 1})
    return model, run, optimizer, first


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path):
    model, run, optimizer, first = _small_checkpoint(tmp_path)
    with torch.no_grad():
        for p in model.core.parameters():
            p.add_(1.0)
    for files in range(1, 6):
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(run, model, optimizer, {"step": 2}, fail_after=files)
        assert latest_checkpoint(run) == first
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    trainer = load_checkpoint(latest_checkpoint(run), model, optimizer)
    assert trainer["step"] == 1
    assert all((p.abs() < 1.0).all() for n, p in model.core.named_parameters() if "norm" not in n)


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_latest(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text(), encoding="utf-8")
    script = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        from cortex.assembly import assemble
        from cortex.kernel.manifest import load_manifest, TrainSection
        from cortex.runtime.rundir import save_run
        from cortex.runtime.train import train
        model = assemble(load_manifest({str(manifest)!r}))
        run = save_run(model, {str(tmp_path / 'runs')!r}, name="killed")
        s = TrainSection(tokens=10**9, batch=8, precision="fp32", eval_every=0, checkpoint_every=1)
        train(model, run, s, data={str(corpus)!r}, steps=100000)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "runs" / "killed"
    try:
        deadline = time.time() + 60
        while not (run / "checkpoints").is_dir() or len(list_checkpoints(run)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.137)  # somewhere in the middle of writing another checkpoint
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    latest = latest_checkpoint(run)
    verify_checkpoint(latest)
    model = load_run(run)
    assert load_checkpoint(latest, model, make_optimizer(model, 1e-3))["step"] >= 2


def test_corrupt_or_incomplete_checkpoint_names_the_file(tmp_path, cortex_cli):
    model, run, optimizer, first = _small_checkpoint(tmp_path)
    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt .* resume from an earlier checkpoint"):
        load_checkpoint(first, model, optimizer)
    result = cortex_cli("train", run, "--resume", "auto")
    assert result.exit_code == 1 and "model.safetensors: corrupt" in result.stderr
    assert "Traceback" not in result.output
    (first / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="checkpoint.json: missing — the checkpoint is incomplete"):
        verify_checkpoint(first)
    (run / "checkpoints" / "latest").write_text("step-00000007\n")
    with pytest.raises(CheckpointError, match="points to step-00000007, which does not exist"):
        latest_checkpoint(run)
    result = cortex_cli("train", run, "--resume", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "no such checkpoint" in result.stderr


def test_resume_refuses_a_checkpoint_of_another_batch(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    train(model, run, settings(checkpoint_every=2), data=str(corpus), steps=4, stop_at=2)
    with pytest.raises(CheckpointError, match="written with batch 8, this run has 4"):
        train(model, run, settings(batch=4), data=str(corpus), resume="auto")
    with pytest.raises(CheckpointError, match="has checkpoints from an earlier training"):
        train(model, run, settings(), data=str(corpus))


def _flat(state, prefix=""):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flat(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _flat(value, f"{prefix}[{i}]")
    else:
        yield prefix, state


def test_exact_resume_includes_memory_tiers(tmp_path):
    """STM + LTM (FAISS) with kNN-attention: weights and every tier's state resume exactly."""
    text = manifest_text(layers=2, memory_layers=[1], memory_system={"read": ["knn_attention"]}, memory=[
        {"type": "stm", "settings": {"capacity": 16}}, {"type": "ltm", "settings": {"capacity": 256}}])
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    s = settings(checkpoint_every=3, eval_every=3, micro_batch=4)
    straight, run_a = new_run(tmp_path, text, name="a")
    train(straight, run_a, s, data=str(corpus), steps=8)
    first, run_b = new_run(tmp_path, text, name="b")
    train(first, run_b, s, data=str(corpus), steps=8, stop_at=4)
    resumed = load_run(run_b)
    train(resumed, run_b, s, data=str(corpus), resume="auto")
    for (name, a), b in zip(straight.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = dict(_flat(straight.plugin_state())), dict(_flat(resumed.plugin_state()))
    assert sa.keys() == sb.keys() and any(k.startswith("/memory.0.stm") for k in sa)
    for key, value in sa.items():
        other = sb[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
