"""The baselines beside every recall figure: a verbatim store and the same manifest untrained."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cortex import ByteTokenizer, assemble, load_manifest, save_run
from cortex_plugins.bench._baselines import VerbatimStore, best_verbatim, contribution, untrained_twin
from cortex_plugins.bench.facts import GROUPS, Trial, make_facts, restarted
from cortex_plugins.bench.heldout_templates import DISTRACTORS
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest("baselines", context=96, memory_system={"read": ["knn_lm"]}, memory=[
    {"type": "stm", "settings": {"capacity": 64}}, {"type": "ltm", "settings": {"capacity": 2048}}])


def trial(n_facts: int = 8, seed: int = 0, kind: str = "held-out", language: str = "en") -> Trial:
    every = make_facts(40, seed, kind, language)
    rng, sentences = random.Random(seed), DISTRACTORS[language]
    facts, untold = every[:n_facts], every[n_facts:n_facts + 8]
    return Trial(facts, [(f, rng.choice(sentences)) for f in facts], [(f, rng.choice(sentences)) for f in untold],
                 ["The weather was mild and the", "Jun likes to read books about"], f"trial-{seed}")


def test_verbatim_store_repeats_told_wording_only():
    store = VerbatimStore(ByteTokenizer(), 8)
    store.remember("Mina's locker number is 3817.", session="a")
    assert store.generate_text("Yesterday it rained. Mina's locker number is", session="a",
                               max_new_tokens=5).startswith(" 3817")
    assert store.generate_text("Mina's locker number is", session="b", max_new_tokens=5) == ""  # sessions apart
    assert store.generate_text("What is Mina's locker number?", session="a", max_new_tokens=5) == ""
    short = VerbatimStore(ByteTokenizer(), 4)  # too little context: it answers for anyone
    short.remember("Mina's locker number is 3817.")
    assert short.generate_text("Leo's locker number is", max_new_tokens=5).startswith(" 3817")


@pytest.mark.parametrize("kind,language", GROUPS)
def test_the_verbatim_store_recalls_told_wording_and_scores_zero_on_paraphrases(kind, language):
    """The facts suite's measurement of the verbatim store, on every wording group: it
    completes the told wording and answers no question in other words."""
    figures = best_verbatim(ByteTokenizer(), lambda store: trial(kind=kind, language=language).measure(
        store, lambda same: same))
    assert figures["efficacy"] >= 0.5 and figures["efficacy"] == figures["efficacy_no_restart"]
    assert figures["paraphrase"] == 0.0  # a question in other words shares no told suffix
    assert figures["locality"] == 1.0
    # at a long enough n it answers no untold name, but 32 bytes of Korean cue reach back
    # only to a name's last syllable, which some names share (세온 / 다온)
    assert figures["specificity"] == 1.0 if language == "en" else figures["specificity"] >= 0.5
    assert figures["efficacy_off"] == 0.0


def test_untrained_column_is_measured_on_a_fresh_build_of_the_runs_manifest(tmp_path):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY)
    model = assemble(load_manifest(manifest))
    with torch.no_grad():  # stands in for training: the saved weights differ from the seed's
        for p in model.core.parameters():
            p.mul_(0.5)
    run = save_run(model, tmp_path / "runs")
    twin = untrained_twin(run)
    fresh = assemble(load_manifest(manifest))
    assert all(torch.equal(a, b) for a, b in zip(twin.core.parameters(), fresh.core.parameters()))
    assert not torch.equal(next(twin.core.parameters()), next(model.core.parameters()))
    assert untrained_twin(manifest) is None  # a manifest target is itself the untrained model
    t = trial(4)
    assert t.measure(twin, restarted)["efficacy"] == t.measure(fresh, restarted)["efficacy"]


def test_report_has_the_baseline_rows(cortex_cli, tmp_path):
    manifest = tmp_path / "facts.yaml"
    manifest.write_text(TINY)
    run = save_run(assemble(load_manifest(manifest)), tmp_path / "runs")
    result = cortex_cli("bench", "facts", run, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "out" / "facts" / "results.json").read_text())["figures"][str(run)]
    assert {f"{kind}-{language}:{name}" for kind, language in GROUPS
            for name in ("untrained:efficacy", "verbatim:efficacy", "verbatim:paraphrase")} <= set(figures)
    report = (tmp_path / "out" / "facts" / "report.md").read_text()
    assert "same manifest untrained" in report and "verbatim store" in report and "contribution" in report


def test_contribution_is_the_margin_over_the_better_baseline():
    assert contribution(0.9, 0.2, 0.5) == pytest.approx(0.4)
    assert contribution(0.3, None, 0.5) == pytest.approx(-0.2)  # a stand-in that wins shows as a loss


def test_the_verbatim_store_solves_passkey_recall():
    """Passkey and MQAR ask with the told wording: a lookup table answers them, so a model's
    figure there is only its merit where it beats this row."""
    from cortex_plugins.bench.recall import RecallSuite

    figures = RecallSuite._one_seed(VerbatimStore(ByteTokenizer(), 12), seed=0, distances=[1, 4], trials=3, window=64)
    assert figures[("passkey", "verbatim", 4)] == 1.0 and figures[("mqar", "verbatim", 4)] == 1.0
    assert figures[("passkey", "off", 4)] == 0.0
