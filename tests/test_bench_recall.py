"""`cortex bench recall`: tasks are well formed and only memory can answer."""

from __future__ import annotations

import json
import random

import pytest

from cortex_plugins.bench.recall import mqar_trial, passkey_trial
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest("recall", context=64, memory_system={"read": ["knn_lm"]}, memory=[
    {"type": "stm", "settings": {"capacity": 32}}, {"type": "ltm", "settings": {"capacity": 4096}}])


def test_trials_state_the_answers_they_ask_for():
    rng = random.Random(0)
    text, [(cue, key)] = passkey_trial(rng)
    assert f"{cue} {key}." in text and len(key) == 5
    text, questions = mqar_trial(rng, pairs=4)
    assert len(questions) == 4 and len({c for c, _ in questions}) == 4
    for cue, value in questions:
        assert f"{cue}{value}." in text


def test_quick_report_memory_on_beats_off(cortex_cli, tmp_path):
    manifest = tmp_path / "recall.yaml"
    manifest.write_text(TINY)
    result = cortex_cli("bench", "recall", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "out" / "recall" / "results.json").read_text())["figures"]
    assert set(figures) == {f"{manifest}:{t}:{m}:{d}" for t in ("passkey", "mqar", "qa")
                            for m in ("knn_lm", "off", "verbatim store") for d in (1, 4)}
    assert figures[f"{manifest}:passkey:knn_lm:1"]["mean"] > figures[f"{manifest}:passkey:off:1"]["mean"]
    assert figures[f"{manifest}:passkey:off:4"]["mean"] == 0.0
