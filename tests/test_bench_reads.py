"""`cortex bench reads`: binding in the prompt, told text in other words, corrections."""

from __future__ import annotations

import json

import pytest

from cortex import ByteTokenizer
from cortex_plugins.bench._baselines import VerbatimStore, best_verbatim
from cortex_plugins.bench.reads import COLUMNS, measure
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_lookup_table_cannot_read():
    """The verbatim store repeats told wording and nothing else: it binds no question to its
    statement, answers no question in other words and takes no correction."""
    figures = best_verbatim(ByteTokenizer(), lambda store: measure(store, seed=0, n=12))
    assert figures["binding"] == figures["binding_new"] == figures["other_words"] == 0.0
    assert figures["corrections"] == figures["one_person"] == 0.0
    assert figures["told_wording"] >= 0.4  # it does repeat what it was told
    assert figures["locality"] == 1.0


def test_quick_report_has_every_column_and_baseline(cortex_cli, tmp_path):
    from cortex import assemble, load_manifest, save_run

    manifest = tmp_path / "reads.yaml"
    manifest.write_text(tiny_manifest("reads", context=128, memory=[{"type": "stm", "settings": {"capacity": 32}}],
                                      features=["reader"]))
    run = save_run(assemble(load_manifest(manifest)), tmp_path / "runs")
    result = cortex_cli("bench", "reads", run, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "out" / "reads" / "results.json").read_text())["figures"][str(run)]
    for prefix in ("trained:", "untrained:", "verbatim:"):
        assert all(0.0 <= figures[prefix + c]["mean"] <= 1.0 for c in COLUMNS)
    report = (tmp_path / "out" / "reads" / "report.md").read_text()
    assert "same manifest untrained" in report and "verbatim store" in report and "contribution" in report


def test_told_text_is_asked_after_the_restart_in_each_language():
    """Everything is told before ``restart``; what is asked of told text is asked of what the
    restart returns (a store that lost its table answers nothing told), in both languages."""
    kept = measure(VerbatimStore(ByteTokenizer(), 5), seed=0, n=12)
    lost = measure(VerbatimStore(ByteTokenizer(), 5), seed=0, n=12,
                   restart=lambda store: VerbatimStore(store.tokenizer, store.n))
    assert kept["told_wording"] > 0 and kept["told_wording:ko"] == 1.0
    assert lost["told_wording"] == lost["told_wording:en"] == lost["told_wording:ko"] == 0.0
    assert {k for k in kept if ":" not in k} == set(COLUMNS)
    assert all(f"{c}:{lang}" in kept for c in COLUMNS for lang in ("en", "ko"))
