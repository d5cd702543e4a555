"""`cortex bench facts`: report structure and the fact generator."""

from __future__ import annotations

import json

import pytest

from cortex_plugins.bench.facts import make_facts
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest("facts", context=96, memory_system={"read": ["knn_lm"]}, memory=[
    {"type": "stm", "settings": {"capacity": 64}}, {"type": "ltm", "settings": {"capacity": 2048}}])


def test_facts_are_distinct_and_their_cues_are_prefixes():
    facts = make_facts(30, seed=1)
    assert len({(f["cue"]) for f in facts}) == 30
    for fact in facts:
        assert fact["statement"] == f"{fact['cue']} {fact['value']}."
        assert fact["value"].isdigit() and len(fact["value"]) == 4
        assert fact["cue"] not in fact["question"]
    assert make_facts(5, seed=1) == facts[:5] and make_facts(5, seed=2) != facts[:5]


def test_quick_report_structure(cortex_cli, tmp_path):
    manifest = tmp_path / "facts.yaml"
    manifest.write_text(TINY)
    result = cortex_cli("bench", "facts", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "facts" / "results.json").read_text())
    figures = data["figures"][str(manifest)]
    for name in ("efficacy", "efficacy_no_restart", "paraphrase", "locality", "specificity", "efficacy_off",
                 "paraphrase_off"):
        assert 0.0 <= figures[name]["mean"] <= 1.0, name
    assert figures["efficacy_off"]["mean"] < figures["efficacy"]["mean"]  # memory on beats memory off
    assert {c["name"] for c in data["checks"]} == {f"{manifest} efficacy", f"{manifest} locality"}
