"""`cortex bench recall`: tasks are well formed and only memory can answer."""

from __future__ import annotations

import json
import random

import pytest

from cortex_plugins.bench.recall import filler, mqar_trial, passkey_trial, qa_trial, told_names, told_sentence
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


def test_filler_names_nobody_the_told_text_names():
    """A QA world's people appear in no filler after it (a later statement about a namesake
    would change the answer); a passkey names nobody, so its filler is the suite's usual one."""
    from cortex import ByteTokenizer

    tokenizer = ByteTokenizer()
    text, _ = qa_trial(random.Random(3))
    names = told_names(text)
    assert names and all(name in text for name in names)
    usual = filler(4000, tokenizer, 7)
    assert any(name in doc for doc in usual for name in names)  # the demo corpus does name them
    kept = filler(4000, tokenizer, 7, names)
    assert not any(name in doc for doc in kept for name in names)
    assert sum(len(tokenizer.encode(doc)) for doc in kept) >= 4000
    assert told_names(passkey_trial(random.Random(3))[0]) == frozenset()


def test_in_window_prompts_hold_the_sentence_that_answers():
    """The told sentence holding the answer and sharing most words with the cue: the asked
    person's, the asked pair's, never a longer number holding the answer's digits."""
    told = "Yejin's locker number is 1662. Mina has 1 horse. Yejin has 1 horse. Yejin lives in Busan."
    assert told_sentence(told, "How many horses does Yejin have?", "1") == "Yejin has 1 horse."
    assert told_sentence(told, "Where does Yejin live?", "Busan") == "Yejin lives in Busan."
    assert told_sentence("Remember: ab=12. Remember: kq=12.", "Remember: kq=", "12") == "Remember: kq=12."
    assert told_sentence("하나는 부산에 산다. 민준은 부산에 산다.", "민준은 어디에 살아?", "부산") == "민준은 부산에 산다."
    with pytest.raises(ValueError, match="holds the answer"):
        told_sentence(told, "Where does Mina live?", "Seoul")


def test_quick_report_memory_on_beats_off(cortex_cli, tmp_path):
    manifest = tmp_path / "recall.yaml"
    manifest.write_text(TINY)
    result = cortex_cli("bench", "recall", manifest, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "out" / "recall" / "results.json").read_text())["figures"]
    tasks = ("passkey", "mqar", "qa")
    assert set(figures) == {f"{manifest}:{t}:{m}:{d}" for t in tasks for m in ("knn_lm", "off", "verbatim store")
                            for d in (1, 4)} | {f"{manifest}:{t}:in window:0" for t in tasks}
    assert figures[f"{manifest}:passkey:knn_lm:1"]["mean"] > figures[f"{manifest}:passkey:off:1"]["mean"]
    assert figures[f"{manifest}:passkey:off:4"]["mean"] == 0.0


def test_in_window_asks_the_cue_after_its_told_sentence_in_a_session_told_nothing(build_model):
    """The in-window row: every cue follows a sentence of its told text, in a session that
    was told nothing (what the model reads in view); the other rows ask the cue alone."""
    from cortex_plugins.bench.recall import RecallSuite

    model = build_model(TINY.replace("context: 64", "context: 128"))
    asked, told = [], []
    generate, remember = model.generate_text, model.remember
    model.generate_text = lambda prompt, **kw: asked.append((prompt, kw["session"])) or generate(prompt, **kw)
    model.remember = lambda text, **kw: told.append((text, kw["session"])) or remember(text, **kw)
    out = RecallSuite._one_seed(model, seed=0, distances=[1], trials=2)
    assert {k for k in out if k[1] == "in window"} == {(t, "in window", 0) for t in ("passkey", "mqar", "qa")}
    cues = {p for p, session in asked if "window" not in session}
    in_view = [(p, session) for p, session in asked if "window" in session]
    assert in_view and len(in_view) == len(asked) // 3  # beside the session's read and memory off
    for prompt, session in in_view:
        sentence, cue = prompt.split("\n")
        assert cue in cues and any(sentence in text for text, _ in told)
        assert session not in {s for _, s in told}
