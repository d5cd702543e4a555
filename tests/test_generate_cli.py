"""`cortex build` with a train: section, `cortex train`, `cortex generate`, `cortex plot`."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from cortex.runtime.rundir import load_run
from tests.test_train import (
    manifest_text,
    read_metrics,
    write_corpus,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model built and trained by `cortex build` (shared by the tests of this module)."""
    from cortex.cli import app as cli

    tmp = tmp_path_factory.mktemp("built")
    corpus = write_corpus(tmp / "corpus.jsonl")
    train = {"data": str(corpus), "tokens": 20480, "batch": 8, "lr": 3.0e-3, "warmup": 5, "precision": "fp32",
             "eval_every": 40, "checkpoint_every": 50, "sample_every": 40}
    path = tmp / "tiny.yaml"
    path.write_text(manifest_text(train=train), encoding="utf-8")
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = cli.console, cli.err_console
    cli.console = cli.err_console = cli.Console(file=out, width=300)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            cli.main(["build", str(path), "-o", str(tmp / "runs")])
    except SystemExit as exc:
        assert exc.code in (0, None), out.getvalue()
    finally:
        cli.console, cli.err_console = saved
        torch.set_num_threads(threads)
    return tmp / "runs" / "tiny", out.getvalue()


def test_build_trains_into_a_complete_loadable_run(trained):
    run, output = trained
    assert "trained 80 steps" in output and "best validation loss" in output
    model = load_run(run)
    steps, events = read_metrics(run)
    assert len(steps) == 80 and steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert [e["step"] for e in events if e["event"] == "sample"] == [40, 80]
    assert {p.name for p in run.iterdir()} >= {
        "manifest.yaml", "model.safetensors", "tokenizer.json", "state.safetensors", "state.json",
        "build.json", "metrics.jsonl", "checkpoints", "data", "train.json"}
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]
    assert model.summary()["parameters"] > 0


def test_generate_is_streamed_and_seeded(trained, cortex_cli, monkeypatch):
    run, _ = trained
    a = cortex_cli("generate", run, "--prompt", "the cat", "--max-tokens", "40", "--seed", "7")
    b = cortex_cli("generate", run, "--prompt", "the cat", "--max-tokens", "40", "--seed", "7")
    c = cortex_cli("generate", run, "--prompt", "the cat", "--max-tokens", "40", "--seed", "8",
                   "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    assert a.exit_code == 0, a.output
    assert a.stdout == b.stdout and a.stdout.startswith("the cat") and len(a.stdout) > len("the cat") + 5
    assert c.exit_code == 0 and c.stdout != a.stdout
    greedy = cortex_cli("generate", run, "--prompt", "the dog ran", "--max-tokens", "12", "--temperature", "0")
    assert greedy.stdout.startswith("the dog ran to the") or greedy.stdout.startswith("the dog ran"), greedy.stdout

    from cortex.cli import app as cli

    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    monkeypatch.setattr(cli, "console", cli.Console(file=Recorder(), width=200))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", str(run), "--prompt", "the cat sat on", "--max-tokens", "30", "--seed", "1",
                  "--temperature", "0.5"])
    assert exit_info.value.code in (0, None)
    pieces = [w for w in writes if w.strip()]
    assert len(pieces) >= 6, writes  # token by token, not one final string


def test_plot_writes_a_png(trained, cortex_cli, tmp_path):
    run, _ = trained
    result = cortex_cli("plot", run, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert cortex_cli("plot", run).exit_code == 0 and (run / "metrics.png").is_file()
    result = cortex_cli("plot", tmp_path)
    assert result.exit_code == 1 and "no metrics to plot" in result.stderr


def test_train_command_builds_from_a_manifest_and_resumes(tmp_path, cortex_cli):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(train={"tokens": 5120, "batch": 4, "precision": "fp32", "checkpoint_every": 10}),
                    encoding="utf-8")
    result = cortex_cli("train", path, "-o", tmp_path / "runs", "--data", corpus, "--steps", "20")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert len(read_metrics(run)[0]) == 20
    again = cortex_cli("train", path, "-o", tmp_path / "runs", "--data", corpus)
    assert again.exit_code == 1 and "already exists" in again.stderr
    more = cortex_cli("train", run, "--data", corpus, "--resume", "auto", "--steps", "30")
    assert more.exit_code == 0, more.output
    assert "resuming from" in more.stdout and len(read_metrics(run)[0]) == 30
    fresh = cortex_cli("train", run, "--data", corpus)
    assert fresh.exit_code == 1 and "--resume auto" in fresh.stderr


def test_bad_data_and_missing_run_are_clean_errors(tmp_path, cortex_cli):
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(train={"tokens": 5120, "batch": 4}), encoding="utf-8")
    result = cortex_cli("train", path, "-o", tmp_path / "runs", "--data", tmp_path / "nope.jsonl")
    assert result.exit_code == 1 and "nope.jsonl: no such file or folder" in result.stderr
    result = cortex_cli("train", tmp_path / "runs" / "tiny", "--data", tmp_path / "empty_dir", "--resume", "auto")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (tmp_path / "ds").mkdir()
    result = cortex_cli("train", tmp_path / "runs" / "tiny", "--data", tmp_path / "ds")
    assert result.exit_code == 1 and "not a prepared dataset" in result.stderr
    result = cortex_cli("train", tmp_path / "nothing")
    assert result.exit_code == 1 and "no such manifest file or run directory" in result.stderr
    result = cortex_cli("generate", tmp_path / "nothing", "--prompt", "x")
    assert result.exit_code == 1 and "not a run directory" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest_text(train={"batch": 6, "micro_batch": 4}), encoding="utf-8")
    result = cortex_cli("validate", bad)
    assert result.exit_code == 1 and "batch 6 is not a multiple of micro_batch 4" in result.stderr
    assert json.loads(cortex_cli("schema").stdout)["$defs"]["TrainSection"]["properties"]["spike_factor"]["description"]
