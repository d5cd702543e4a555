"""Real-time learning: a fact told once is recalled, after a restart too; repetition
raises confidence; a correction wins. No train/inference switch."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from cortex import hookimpl
from cortex.runtime.rundir import load_run, save_run
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def manifest(stm_capacity: int = 128) -> str:
    return tiny_manifest("rt", dim=64, context=64, memory_system={"read": ["knn_lm"], "key_window": 16}, memory=[
        {"type": "stm", "settings": {"capacity": stm_capacity}}, {"type": "ltm", "settings": {"capacity": 1024}}])


MANIFEST = manifest()
FACT = "Mina's locker number is 3817."
CUE = "Before that we talked about lunch. Mina's locker number is"


def test_confidence_rises_with_each_telling(build_model):
    torch.manual_seed(0)
    model = build_model(MANIFEST).eval()
    before = model.confidence(CUE, " 3817")
    seen = []
    for _ in range(3):
        model.remember(FACT)
        seen.append(model.confidence(CUE, " 3817"))
    assert before < 0.2
    assert before < seen[0] < seen[1] < seen[2]
    assert model.confidence(CUE, " 3817") == seen[2]  # measuring does not strengthen


def test_a_correction_wins_over_the_stale_fact_before_and_after_a_restart(build_model, tmp_path):
    torch.manual_seed(0)
    model = build_model(MANIFEST).eval()
    model.remember("Jisoo's bike code is 5521.")
    model.remember("Correction: Jisoo's bike code is 7740.")
    model.remember("Correction: Jisoo's bike code is 7740.")
    cue = "Anyway. Jisoo's bike code is"
    assert model.confidence(cue, " 7740") > model.confidence(cue, " 5521")
    again = load_run(save_run(model, tmp_path)).eval()
    assert again.confidence(cue, " 7740") > again.confidence(cue, " 5521")
    assert again.generate_text(cue, max_new_tokens=5).startswith(" 7740")


def test_interact_answers_then_learns_and_fires_the_hook(build_model, register_plugin):
    turns = []

    class Listener:
        @hookimpl
        def cortex_interaction(self, model, session, prompt, response):
            turns.append((session, prompt, response))

    torch.manual_seed(0)
    model = build_model(MANIFEST).eval()
    model.pm.register(Listener())
    model.interact(FACT, session="alice")
    assert turns and turns[0][:2] == ("alice", FACT)
    assert model.interact(CUE, session="alice", max_new_tokens=5).startswith(" 3817")
    assert not model.interact(CUE, session="bob", max_new_tokens=5).startswith(" 3817")
    assert len(model.memory[0]) > 0


def test_chat_remembers_across_a_restart(cortex_cli, monkeypatch, tmp_path):
    manifest = tmp_path / "rt.yaml"
    manifest.write_text(MANIFEST)
    assert cortex_cli("build", manifest, "-o", tmp_path / "runs").exit_code == 0
    run = tmp_path / "runs" / "rt"
    monkeypatch.setattr(sys, "stdin", io.StringIO(FACT + "\n/quit\n"))
    first = cortex_cli("chat", run)
    assert first.exit_code == 0, first.output
    monkeypatch.setattr(sys, "stdin", io.StringIO(CUE + "\n"))
    second = cortex_cli("chat", run, "--max-tokens", "5")  # a new process would load the same files
    assert second.exit_code == 0, second.output
    assert second.stdout.strip().splitlines()[-1].strip().startswith("3817")
    monkeypatch.setattr(sys, "stdin", io.StringIO(CUE + "\n"))
    other = cortex_cli("chat", run, "--session", "stranger", "--max-tokens", "5", "--no-learn")
    assert not other.stdout.strip().splitlines()[-1].strip().startswith("3817")


def test_python_api_load_chat_and_stats(build_model, tmp_path):
    import cortex
    from cortex.model import detect_language

    torch.manual_seed(0)
    model = build_model(MANIFEST).eval()
    path = save_run(model, tmp_path)
    bot = cortex.load(path)
    bot.chat(FACT)
    reply = bot.chat(CUE, max_new_tokens=5)
    assert reply.text.startswith(" 3817") and reply.language == "en"
    assert 0.3 < reply.confidence <= 1.0
    korean = bot.chat("민아의 사물함 번호는", max_new_tokens=3)
    assert korean.language == detect_language(korean.text or "민아의 사물함 번호는")
    stats = bot.stats()
    assert stats["memory.0.stm"]["entries"] > 0 and "consolidated" in stats["memory_system"]


def test_language_detection():
    from cortex.model import detect_language

    assert detect_language("민아는 부산에 산다.") == "ko"
    assert detect_language("Mina lives in Busan.") == "en"
    assert detect_language("Mina는 부산에 산다") == "ko"  # mixed: the majority of letters decides
    assert detect_language("My friend Mina lives in 부산") == "en"
    assert detect_language("") == "en" and detect_language("3817!") == "en"  # no letters: English


def test_a_fact_survives_a_long_conversation_through_spill(build_model):
    torch.manual_seed(0)
    small = manifest(stm_capacity=16)
    model = build_model(small).eval()
    model.remember(FACT)
    for i in range(12):  # far more text than the STM holds
        model.remember(f"Filler sentence number {i} about the weather, lunch and the bus schedule.")
    stm, ltm = model.memory
    assert len(stm) <= 16 and len(ltm) > 0
    assert model.memory_system.stats["spilled"] > 0
    assert model.generate_text(CUE, max_new_tokens=5).startswith(" 3817")
    forgetful = build_model(small.replace("key_window: 16}", "key_window: 16, spill: never}")).eval()
    forgetful.remember(FACT)
    for i in range(12):
        forgetful.remember(f"Filler sentence number {i} about the weather, lunch and the bus schedule.")
    assert forgetful.memory_system.stats["spilled"] == 0  # only consolidated (strengthened) entries moved
    assert not forgetful.generate_text(CUE, max_new_tokens=5).startswith(" 3817")


def test_a_chat_reply_is_its_first_line(build_model):
    """Generation goes on past the answer's line (here kNN-LM continues the told text onto
    its next line); the chat reply stops at the line's end."""
    torch.manual_seed(0)
    model = build_model(MANIFEST).eval()
    model.remember(FACT + "\nJun lives in Oslo.", session="s")
    generated = model.generate_text(CUE, session="s", max_new_tokens=24)
    assert generated.startswith(" 3817.\n")  # the other side: generation crosses the line
    reply = model.chat(CUE, session="s", learn=False, max_new_tokens=24)
    assert reply.text == " 3817."
