"""The training loop: loss goes down, lanes, spike rollback, OOM back-off, presets, data errors."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import Field

from cortex import hookimpl
from cortex.assembly import assemble
from cortex.core.tokenizer import ByteTokenizer
from cortex.kernel.errors import CortexError, DataError
from cortex.kernel.interfaces import CognitiveFeature, Document, Settings
from cortex.kernel.manifest import TrainSection, load_manifest
from cortex.runtime.data import TokenDataset, prepare
from cortex.runtime.rundir import load_run, save_run
from cortex.runtime.train import hardware_preset, train
from tests.conftest import make_plugin, tiny_manifest

CORPUS = "the cat sat on the mat. the dog ran to the park. "


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def manifest_text(**changes) -> str:
    """The tiny model these tests train: one block, seed 0; ``changes`` as for ``tiny_manifest``."""
    return tiny_manifest(**{"seed": 0, "layers": 1, **changes})


def write_corpus(path: Path, docs: int = 300) -> Path:
    """A tiny, very repetitive JSONL corpus (about 50 bytes per document)."""
    path.write_text("".join(json.dumps({"text": CORPUS + str(i % 5)}) + "\n" for i in range(docs)),
                    encoding="utf-8")
    return path


def new_run(tmp_path: Path, text: str, name: str = "run") -> tuple[object, Path]:
    """Assemble a manifest and write its (untrained) run directory, as `cortex build` does."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    model = assemble(load_manifest(path))
    run = save_run(model, tmp_path / "runs", name=name)
    return model, run


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "event" not in x], [x for x in lines if "event" in x]


def settings(**overrides) -> TrainSection:
    base = dict(tokens=10**9, batch=8, lr=3e-3, warmup=5, precision="fp32", eval_every=0,
                checkpoint_every=0, eval_batches=2)
    base.update(overrides)
    return TrainSection.model_validate(base)


plugin = make_plugin  # a plugin module registering classes

# --------------------------------------------------------------------------- learning


def test_loss_decreases_by_at_least_60_percent(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(eval_every=40), data=str(corpus), steps=120)
    steps, _ = read_metrics(run)
    assert [s["step"] for s in steps] == list(range(1, 121))
    first = np.mean([s["loss"] for s in steps[:5]])
    last = np.mean([s["loss"] for s in steps[-5:]])
    assert last <= 0.4 * first, (first, last)  # ~5.6 -> ~0.6 on this corpus
    assert summary["val_loss"] < 0.4 * first
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert key in steps[-1]
    assert steps[-1]["tokens"] == 120 * 8 * 32
    # the run directory holds the best model, loadable as such
    loaded = load_run(run)
    assert summary["best_step"] in (40, 80, 120)
    best = [s for s in steps if s.get("best")][-1]
    assert best["step"] == summary["best_step"]
    for a, b in zip(loaded.core.state_dict().values(), model.core.state_dict().values()):
        if summary["best_step"] == 120:
            assert torch.equal(a, b)
    assert json.loads((run / "train.json").read_text())["steps"] == 120


def test_warmup_and_cosine_schedule_and_accumulation(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(micro_batch=2, lr=1e-3, warmup=4, min_lr=1e-4), data=str(corpus), steps=20)
    assert summary["micro_batch"] == 2 and summary["grad_accum"] == 4
    lrs = [s["lr"] for s in read_metrics(run)[0]]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert 1e-4 <= lrs[-1] < 1.1e-4 and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_accumulated_micro_batches_match_one_full_batch(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    weights = []
    for name, micro in (("full", 8), ("accum", 2)):
        model, run = new_run(tmp_path, manifest_text(), name=name)
        train(model, run, settings(micro_batch=micro), data=str(corpus), steps=3)
        weights.append(torch.cat([p.detach().flatten() for p in model.core.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


# --------------------------------------------------------------------------- lanes


def make_dataset(path: Path, train_tokens: np.ndarray, val_tokens: np.ndarray | None = None) -> Path:
    """A prepared dataset folder holding exactly the given byte-token arrays."""
    tok = ByteTokenizer()
    prepare([("x", [Document("ab", "x:1"), Document("cd", "x:2")], None)], path, tok, workers=1,
            val_fraction=0.5)
    val_tokens = val_tokens if val_tokens is not None else train_tokens[: 4 * 1024]
    meta = json.loads((path / "meta.json").read_text())
    for split, arr in (("train", train_tokens), ("val", val_tokens)):
        arr.astype(np.uint16).tofile(path / f"{split}.bin")
        meta["splits"][split]["tokens"] = int(len(arr))
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_lanes_continue_row_by_row_and_resume(tmp_path):
    data = TokenDataset(make_dataset(tmp_path / "d", np.arange(1003) % 256), "train")
    batch, seq = 4, 10
    lane_len = 1003 // 4  # 250 tokens per lane, 24 windows of 10
    it = data.lanes(batch, seq)
    got = [next(it) for _ in range(30)]
    for t, (position, x) in enumerate(got[:24]):
        assert position == (t + 1) * seq and x.shape == (batch, seq + 1)
        for r in range(batch):
            start = r * lane_len + t * seq
            assert x[r].tolist() == [(start + i) % 256 for i in range(seq + 1)]
        if t:
            assert torch.equal(x[:, 0], got[t - 1][1][:, -1])  # row r continues row r
    assert torch.equal(got[24][1], got[0][1])  # after the last window each lane starts over
    resumed = data.lanes(batch, seq, start=got[9][0])
    for position, x in got[10:20]:
        p2, x2 = next(resumed)
        assert p2 == position and torch.equal(x, x2)
    with pytest.raises(DataError, match="multiple of seq_len"):
        next(data.lanes(batch, seq, start=5))
    with pytest.raises(DataError, match="too few"):
        next(data.lanes(200, seq))


# --------------------------------------------------------------------------- spikes


def test_loss_spike_rolls_back_and_skips_the_batch(tmp_path):
    """A batch of random bytes in a model trained on repetitive text: loss jumps, rollback."""
    batch, seq, spike = 4, 32, 45
    lane_len = 60 * seq + 1
    tokens = np.tile(np.frombuffer(b"abcdefgh", dtype=np.uint8), batch * lane_len // 8 + 1)[: batch * lane_len]
    tokens = tokens.astype(np.int64)
    rng = np.random.default_rng(0)
    tokens[spike * seq + 1 : (spike + 1) * seq] = rng.integers(0, 256, seq - 1)  # lane 0, window `spike`
    data = make_dataset(tmp_path / "d", tokens)
    model, run = new_run(tmp_path, manifest_text())
    s = settings(batch=batch, checkpoint_every=20, spike_window=10, lr=1e-2)
    summary = train(model, run, s, data=str(data), steps=55)
    steps, events = read_metrics(run)
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and summary["rollbacks"] == 1
    assert rollbacks[0]["step"] == spike + 1 and rollbacks[0]["restored"] == "step-00000040"
    assert rollbacks[0]["skipped_position"] == (spike + 1) * seq
    assert [x["step"] for x in steps] == list(range(1, 56))  # replayed steps replace the old lines
    assert max(x["loss"] for x in steps[spike - 2:]) < 1.0  # the bad batch was never trained on
    assert all(torch.isfinite(p).all() for p in model.core.parameters())
    trainer = json.loads((run / "checkpoints" / "step-00000055" / "trainer.json").read_text())
    assert trainer["skip_positions"] == [(spike + 1) * seq] and trainer["position"] == 56 * seq


class NanOnce(CognitiveFeature):
    """Returns a NaN extra loss on the first forward of step ``at``."""

    name = "nan_once"

    class Settings(Settings):
        at: int = Field(12, ge=0)

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.fired = False
        self.step = -1

    @hookimpl
    def cortex_before_step(self, model, step, batch):
        self.step = step

    @hookimpl
    def cortex_extra_losses(self, model, batch, logits):
        if self.step == self.settings.at and not self.fired:
            self.fired = True
            return {"nan_term": logits.sum() * float("nan")}
        return None


def test_non_finite_gradient_rolls_back(tmp_path, register_plugin):
    register_plugin(plugin(NanOnce), namespace="spiky")
    model, run = new_run(tmp_path, manifest_text(features=["spiky.nan_once"]))
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(checkpoint_every=5), data=str(corpus), steps=20)
    _, events = read_metrics(run)
    (event,) = [e for e in events if e["event"] == "rollback"]
    assert event["step"] == 13 and "non-finite" in event["reason"] and event["restored"] == "step-00000010"
    assert summary["steps"] == 20 and math.isfinite(summary["loss"])
    assert all(torch.isfinite(p).all() for p in model.core.parameters())


class NanAlways(NanOnce):
    """Returns a NaN extra loss at every step: no rollback can recover."""

    name = "nan_always"

    @hookimpl
    def cortex_extra_losses(self, model, batch, logits):
        return {"nan_term": logits.sum() * float("nan")}


def test_endless_spikes_stop_with_a_clear_error(tmp_path, register_plugin):
    register_plugin(plugin(NanAlways), namespace="spiky")
    model, run = new_run(tmp_path, manifest_text(features=["spiky.nan_always"]))
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    with pytest.raises(CortexError, match="keeps diverging"):
        train(model, run, settings(max_rollbacks=2), data=str(corpus), steps=5)


# --------------------------------------------------------------------------- hardware


class OomOnce(CognitiveFeature):
    """Raises an out-of-memory error the first time it sees a micro-batch above 2 rows."""

    name = "oom_once"

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.raised = 0

    @hookimpl
    def cortex_extra_losses(self, model, batch, logits):
        if batch.size(0) > 2 and not self.raised:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return None


def test_out_of_memory_halves_the_micro_batch(tmp_path, register_plugin):
    register_plugin(plugin(OomOnce), namespace="oom")
    model, run = new_run(tmp_path, manifest_text(features=["oom.oom_once"]))
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(micro_batch=8, checkpoint_every=5), data=str(corpus), steps=6)
    assert summary["micro_batch"] == 4 and summary["grad_accum"] == 2 and summary["steps"] == 6
    steps, events = read_metrics(run)
    assert [e for e in events if e["event"] == "oom_backoff"] == [
        {"step": 0, "event": "oom_backoff", "micro_batch": 4, "grad_accum": 2}]
    assert len(steps) == 6
    trainer = json.loads((run / "checkpoints" / "step-00000006" / "trainer.json").read_text())
    assert trainer["micro_batch"] == 4  # a resume keeps the smaller micro-batch


def test_hardware_preset_on_this_cpu():
    model_cfg = types.SimpleNamespace(vocab_size=259, dim=256, layers=4, heads=4, context=256, hidden_dim=1024)
    preset = hardware_preset(model_cfg, 16, "cpu")
    assert preset.device == "cpu" and preset.precision in ("bf16", "fp32")
    assert 16 % preset.micro_batch == 0 and "CPU cores" in preset.reason
    assert hardware_preset(model_cfg, 12, "cpu").micro_batch in (1, 2, 3, 4, 6, 12)


def test_auto_precision_and_micro_batch_come_from_the_preset(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    summary = train(model, run, settings(precision="auto"), data=str(corpus), steps=2)
    preset = hardware_preset(model.config, 8, "cpu")
    assert summary["precision"] == preset.precision and summary["micro_batch"] == preset.micro_batch


# --------------------------------------------------------------------------- data


def test_demo_source_is_prepared_once_into_the_run(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    s = settings(data={"type": "demo", "settings": {"documents": 200}}, checkpoint_every=0)
    train(model, run, s, steps=2)
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == model.tokenizer.fingerprint
    stamp = (run / "data" / "train.bin").stat().st_mtime_ns
    import shutil

    shutil.rmtree(run / "checkpoints")
    train(model, run, s, steps=2)
    assert (run / "data" / "train.bin").stat().st_mtime_ns == stamp  # not prepared again


def test_bad_data_is_a_clear_error(tmp_path):
    model, run = new_run(tmp_path, manifest_text())
    with pytest.raises(DataError, match="no such file or folder — check"):
        train(model, run, settings(), data=str(tmp_path / "missing.jsonl"), steps=2)
    with pytest.raises(DataError, match="no data source of that name"):
        train(model, run, settings(), data="demoo", steps=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared dataset"):
        train(model, run, settings(), data=str(tmp_path / "empty"), steps=2)
    other = make_dataset(tmp_path / "other", np.arange(5000) % 256)
    meta = json.loads((other / "meta.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="another tokenizer"):
        train(model, run, settings(), data=str(other), steps=2)
    small = write_corpus(tmp_path / "small.jsonl", docs=2)
    with pytest.raises(DataError, match="too few"):
        train(model, run, settings(), data=str(small), steps=2)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, monkeypatch):
    import cortex.core.transformer

    calls = []
    real = cortex.core.transformer.checkpoint
    monkeypatch.setattr(cortex.core.transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    weights = []
    for name, flag in (("plain", False), ("recomputed", True)):
        model, run = new_run(tmp_path, manifest_text(layers=2, dropout=0.1),
                             name=name)
        torch.manual_seed(5)
        train(model, run, settings(gradient_checkpointing=flag), data=str(corpus), steps=3)
        assert model.core.gradient_checkpointing is flag
        weights.append(torch.cat([p.detach().flatten() for p in model.core.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    assert len(calls) == 3 * 2  # two blocks recomputed per step, only in the second run
