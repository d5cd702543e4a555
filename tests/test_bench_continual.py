"""cortex bench continual: the task stream, Avalanche's metrics, and the report's structure
(a smoke run with a few steps; values are not asserted)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cortex.core.tokenizer import ByteTokenizer
from cortex_plugins.bench import continual as bench_continual
from cortex_plugins.bench.continual import Continual, Reservoir, make_tasks, metrics_of, training_batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tasks_are_disjoint_fact_sets_and_queries_are_not_training_sequences():
    tasks = make_tasks(0, 4, 16)
    assert make_tasks(0, 4, 16) == tasks and make_tasks(1, 4, 16) != tasks
    keys = [k for task in tasks for k, _ in task]
    assert len(keys) == len(set(keys)) == 64
    assert all(len(k) == 3 and k.isalpha() and len(v) == 2 and v.isdigit() for task in tasks for k, v in task)
    tok = ByteTokenizer()
    batch = training_batch(tok, tasks[0], 4, 65, random.Random(0))
    assert batch.shape == (4, 65)
    text = tok.decode(batch[0].tolist())
    facts = {f"{k}={v}" for k, v in tasks[0]}
    parts = text.split(";")
    assert text.startswith(";") and len(parts) > 5
    assert all(p in facts for p in parts[1:-1])  # whole facts of its own task, the last one cut
    assert all(tok.decode(row.tolist()) != f";{k}=" for row in batch for k, _ in tasks[0])


def test_metrics_follow_avalanche():
    R = [[0.9, 0.0, 0.0],
         [0.5, 1.0, 0.1],
         [0.3, 0.6, 0.8]]
    m = metrics_of(R)
    assert m["accuracy"] == pytest.approx((0.3 + 0.6 + 0.8) / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (1.0 - 0.6)) / 2)
    assert m["bwt"] == pytest.approx(-m["forgetting"])


def test_the_reservoir_is_a_uniform_sample_of_every_row_offered():
    from cortex_plugins.cognition.sleep_wake import SleepWake

    reservoir = Reservoir(SleepWake.Settings(buffer=100, record_rows=2, replay_batch=8), random.Random(0))
    for step in range(1000):  # rows 0..1999, two offered per batch of three
        reservoir.add(torch.tensor([[2 * step], [2 * step + 1], [-1]]))
    kept = [int(row) for row in reservoir.kept]
    assert len(kept) == 100 == len(set(kept)) and -1 not in kept
    assert 600 < sum(kept) / len(kept) < 1400  # old and new alike (the mean row is 999.5)
    assert sum(k < 1000 for k in kept) > 30 and sum(k >= 1000 for k in kept) > 30
    batch = reservoir.sample()
    assert batch.shape == (8, 1) and set(batch.flatten().tolist()) <= set(kept)


def test_quick_report_has_the_matrix_and_the_metrics_of_every_configuration(cortex_cli, monkeypatch, tmp_path):
    class Tiny(Continual.Settings):
        quick_facts: int = 3
        quick_steps: int = 3
        warmup: int = 1
        batch: int = 2
        sleep_wake: dict = {"wake": 2, "nrem": 1, "rem": 1, "replay_batch": 2}
        cls: dict = {"width": 4, "consolidation_steps": 1, "replay_batch": 2}

    monkeypatch.setattr(Continual, "Settings", Tiny)
    monkeypatch.setattr(bench_continual, "BASE_MANIFEST", bench_continual.BASE_MANIFEST.replace(
        "dim: 64, layers: 2, heads: 2, context: 64", "dim: 16, layers: 1, heads: 2, context: 32"))
    result = cortex_cli("bench", "continual", "--quick", "--seeds", "2", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "continual" / "results.json").read_text())
    figures = data["figures"]["built-in base"]
    assert set(figures) == {"plain", "sleep_wake", "cls", "sleep_wake+cls", "sleep_wake (REM generate)+cls",
                            "sleep_wake+cls (defaults)", "plain+replay"}
    # the equal-compute baseline: as many extra steps as sleep_wake+cls, seed by seed
    assert [r["extra_steps"] for r in figures["plain+replay"]["runs"]] == \
        [r["extra_steps"] for r in figures["sleep_wake+cls"]["runs"]]
    for config, fig in figures.items():
        assert len(fig["R"]) == 2  # one matrix per seed
        assert all(len(R) == 4 and all(len(row) == 4 for row in R) for R in fig["R"])
        assert all(0.0 <= v <= 1.0 for R in fig["R"] for row in R for v in row)
        for metric in ("accuracy", "bwt", "forgetting"):
            assert set(fig[metric]) >= {"mean", "std"} and len(fig[metric]["values"]) == 2
        assert fig["train_steps"] == 12
        assert (fig["extra_steps"] > 0) == (config != "plain")
    report = (tmp_path / "continual" / "report.md").read_text()
    assert "forgetting" in report and "R[i, j] of sleep_wake+cls" in report and "at equal compute" in report
    assert data["seeds"] == [0, 1]
    checks = data["checks"]
    if figures["plain"]["forgetting"]["mean"] > 0:
        assert checks and "reduction" in checks[0]["name"] and checks[0]["target"] == 0.3
    assert (tmp_path / "continual" / "continual-built-in-base.png").is_file()


def test_the_rem_generate_row_is_sleep_wake_cls_with_rem_mode_generate():
    import yaml

    suite = Continual(Continual.Settings(), None)
    name = "sleep_wake (REM generate)+cls"
    generate = yaml.safe_load(suite._manifest(bench_continual.BASE_MANIFEST, bench_continual.CONFIGS[name], 0,
                                              overrides=bench_continual.OVERRIDES[name]))
    recombine = yaml.safe_load(suite._manifest(bench_continual.BASE_MANIFEST, bench_continual.CONFIGS[name], 0))
    sleep = next(f["settings"] for f in generate["features"] if f["type"] == "sleep_wake")
    assert sleep == {**Continual.Settings().sleep_wake, "rem_mode": "generate"}
    assert [f["type"] for f in generate["features"]] == [f["type"] for f in recombine["features"]] == ["cls", "sleep_wake"]
