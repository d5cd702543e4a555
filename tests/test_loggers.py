"""Loggers (issue 16): TensorBoard event files and offline W&B runs hold what metrics.jsonl holds."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TRAIN = {"data": {"type": "demo", "settings": {"documents": 300}}, "tokens": 1024, "batch": 4, "eval_every": 4,
         "eval_batches": 1, "sample_tokens": 8, "checkpoint_every": 0}


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _build(cortex_cli, tmp_path, *options, train=TRAIN, name="logged"):
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(tiny_manifest(name, train=train))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs", *options)
    return result, tmp_path / "runs" / name


def test_tensorboard_event_file_holds_the_metrics_and_samples_of_metrics_jsonl(cortex_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run = _build(cortex_cli, tmp_path, "--log", "tensorboard")
    assert result.exit_code == 0, result.output
    assert "step 8/8  loss" in result.stdout  # the plain progress line of a log file
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    steps = [line for line in _lines(run) if "event" not in line]
    assert [line["step"] for line in steps] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "val_loss"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {line["step"]: line[key] for line in steps if key in line}
        assert logged == pytest.approx(expected, rel=1e-6), key
    assert {e.step for e in events.Scalars("val_loss")} == {4, 8}
    samples = {line["step"]: line["text"] for line in _lines(run) if line.get("event") == "sample"}
    assert sorted(samples) == [4, 8]  # one sample at every evaluation
    texts = {e.step: e.tensor_proto.string_val[0].decode("utf-8") for e in events.Tensors("sample/text_summary")}
    assert texts == samples
    manifest = (run / "manifest.yaml").read_text(encoding="utf-8")
    assert "--log tensorboard" in manifest and "- tensorboard" in manifest  # recorded, so a resume logs too


def test_without_a_logger_nothing_but_metrics_jsonl_is_written(cortex_cli, tmp_path):
    result, run = _build(cortex_cli, tmp_path)
    assert result.exit_code == 0, result.output
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()
    assert not [line for line in _lines(run) if line.get("event") == "sample"]  # sample_every 0: none


def test_loggers_named_in_the_manifest_are_validated(cortex_cli, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(tiny_manifest("m", train={**TRAIN, "loggers": ["tensorbord"]}))
    result = cortex_cli("validate", manifest)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train.loggers[0].type: unknown logger component 'tensorbord'; did you mean 'tensorboard'" in result.stderr
    manifest.write_text(tiny_manifest("m", train={**TRAIN, "loggers": [{"type": "tensorboard",
                                                                        "settings": {"flush_secs": 0}}]}))
    assert "train.loggers[0].settings.flush_secs: Input should be greater than 0" in cortex_cli(
        "validate", manifest).stderr
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs", "--log", "wandbb")
    assert result.exit_code == 1 and "unknown logger component 'wandbb'; did you mean 'wandb'" in result.stderr
    assert not (tmp_path / "runs" / "m").exists()
    manifest.write_text(tiny_manifest("m"))
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs", "--log", "tensorboard")
    assert result.exit_code == 1 and "--log: the manifest has no `train:` section" in result.stderr


def test_wandb_missing_is_one_line_naming_the_extra(cortex_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where the package is not installed
    result, run = _build(cortex_cli, tmp_path, "--log", "wandb")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the wandb logger needs the `wandb` package, which is not installed — pip install 'cortex[wandb]'" \
        in result.stderr


def test_wandb_offline_run_holds_the_metrics_of_metrics_jsonl(cortex_cli, tmp_path):
    pytest.importorskip("wandb")  # the `wandb` extra, not part of `dev`
    result, run = _build(cortex_cli, tmp_path, "--log", "wandb")
    assert result.exit_code == 0, result.output
    assert [line["step"] for line in _lines(run) if line.get("event") == "sample"] == [4, 8]
    (record,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for line in _lines(run):
        if "event" in line:
            assert json.dumps(line["text"], ensure_ascii=False).encode("utf-8") in data
        else:
            assert json.dumps(line["loss"]).encode() in data and json.dumps(line["tokens"]).encode() in data
