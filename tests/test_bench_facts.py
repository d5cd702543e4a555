"""`cortex bench facts`: report structure and the fact generator."""

from __future__ import annotations

import json
import re

import pytest

from cortex_plugins.bench.facts import GROUPS, make_facts, wordings
from cortex_plugins.bench.heldout_templates import NAMES, WORDINGS
from cortex_plugins.data import demo
from cortex_plugins.data.demo import demo_documents
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest("facts", context=96, memory_system={"read": ["knn_lm"]}, memory=[
    {"type": "stm", "settings": {"capacity": 64}}, {"type": "ltm", "settings": {"capacity": 2048}}])


@pytest.mark.parametrize("kind,language", GROUPS)
def test_facts_are_distinct_and_their_cues_are_prefixes(kind, language):
    facts = make_facts(30, seed=1, kind=kind, language=language)
    assert len({f["cue"] for f in facts}) == len({f["value"] for f in facts}) == 30
    for fact in facts:
        at = fact["statement"].index(fact["value"])
        assert fact["statement"][:at].rstrip() == fact["cue"] and fact["value"] not in fact["question"]
        assert fact["value"].isdigit() and len(fact["value"]) == 4
        if kind == "held-out":
            assert fact["cue"] not in fact["question"]
    assert make_facts(5, seed=1, kind=kind, language=language) == facts[:5]
    assert make_facts(5, seed=2, kind=kind, language=language) != facts[:5]


def _pattern(template: str) -> re.Pattern:
    """A template as a regular expression: any text where a name or value goes."""
    return re.compile(".+?".join(re.escape(part) for part in re.split(r"\{[nv]\}", template)))


def test_held_out_wordings_and_names_never_occur_in_the_demo_corpus():
    """No held-out statement or question matches any demo sentence and no fact name is a demo
    name or occurs in its text, while the demo group's wordings do match demo sentences."""
    corpus = [d.text for d in demo_documents(3000, korean=0.5, updates=0.5)]
    sentences = {s for text in corpus for s in re.split(r"(?<=[.?!])\s+|\n", text)}
    for language in ("en", "ko"):
        for statement, question in WORDINGS[language]:
            for template in (statement, question):
                pattern = _pattern(template)
                assert not any(pattern.search(s) for s in sentences), template
    for english, korean in NAMES:
        assert english not in {n[0] for n in demo.NAMES} and korean not in {n[1] for n in demo.NAMES}
        assert not any(english in text or korean in text for text in corpus), (english, korean)
    for language in ("en", "ko"):  # the check finds the demo's own wording (so it can fail)
        statement, question = wordings("demo", language)[0](("Brisa", "가온"), "1234")
        for sentence in (statement, question):
            template = sentence.replace("Brisa", "{n}").replace("가온", "{n}").replace("1234", "{v}")
            assert any(_pattern(template).search(s) for s in sentences), template


def test_quick_report_structure(cortex_cli, tmp_path):
    manifest = tmp_path / "facts.yaml"
    manifest.write_text(TINY)
    result = cortex_cli("bench", "facts", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "facts" / "results.json").read_text())
    figures = data["figures"][str(manifest)]
    for kind, language in GROUPS:
        for name in ("efficacy", "efficacy_no_restart", "paraphrase", "locality", "specificity", "efficacy_off",
                     "paraphrase_off", "verbatim:efficacy", "verbatim:paraphrase"):
            assert 0.0 <= figures[f"{kind}-{language}:{name}"]["mean"] <= 1.0, name
        mine = {k: v["mean"] for k, v in figures.items() if k.startswith(f"{kind}-{language}:")}
        assert mine[f"{kind}-{language}:efficacy_off"] < mine[f"{kind}-{language}:efficacy"]  # memory on wins
    assert {c["name"] for c in data["checks"]} == {f"{manifest} {kind} {language} {column}"
                                                   for kind, language in GROUPS for column in ("efficacy", "locality")}
    report = (tmp_path / "out" / "facts" / "report.md").read_text()
    assert "| held-out | ko |" in report and "| demo | en |" in report
