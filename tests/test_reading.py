"""A small reader trained for a few minutes reads (issue 19), built with the real CLI.

One model (2 layers, d192, about 1,000 steps on the demo corpus with updates, restated
statements and first-person speakers) is built once for the module with ``cortex build``
(marked slow). It binds the asked name to its fact in the prompt, answers text told once
when asked in other words, takes the later of two statements in either order of the
wordings, and keeps a told value off a name never told. The same manifest untrained and
the verbatim store (a table from the last n tokens to the next, at its best n) fail each
of these. Facts told in ``cortex chat`` are answered in other words after a restart, in
English and in Korean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cortex import ByteTokenizer, load, save_run
from cortex_plugins.bench._baselines import best_verbatim, restarted, untrained_twin
from cortex_plugins.bench.reads import measure
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.slow

#: enough trials that one measurement's noise (about 0.07 at 36) stays inside the margin
#: between the floors below and what this model reaches. Builds of it differ far more than
#: that, on one machine too (threaded bf16 sums): new names 0.50-0.97, other words 0.67-0.86,
#: corrections 0.39-0.83 over the builds measured, so the floors guard the gap to the
#: baselines (at most 0.2), not the quickstart's targets (``cortex bench reads``)
TRIALS = 36
MANIFEST = tiny_manifest(
    "reading", dim=192, layers=2, heads=4, context=192, seed=0, tokenizer={"type": "byte"},
    features=[{"type": "reader", "settings": {"background": 1000}}],
    train={"data": {"type": "demo", "settings": {"documents": 8000, "updates": 0.5, "restate": 0.3,
                                                  "selves": 0.15}},
           "tokens": 3200000, "batch": 16, "lr": 2.0e-3, "warmup": 30, "eval_every": 2000,
           "checkpoint_every": 2000})


def _cortex(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("cortex")
    return subprocess.run([str(cli), *args], input=stdin, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reading")
    (folder / "reading.yaml").write_text(MANIFEST)
    built = _cortex("build", str(folder / "reading.yaml"), "-o", str(folder / "runs"))
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return folder / "runs" / "reading"


@pytest.fixture(scope="module")
def figures(run) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    return {"trained": measure(load(run).eval(), seed=0, n=TRIALS, restart=restarted),
            "untrained": measure(untrained_twin(run), seed=0, n=TRIALS, restart=restarted),
            "verbatim": best_verbatim(ByteTokenizer(), lambda store: measure(store, seed=0, n=TRIALS))}


def test_training_lowered_the_loss(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("task, floor", [
    ("binding_new", 0.4),  # the asked one of 2-4 people in the prompt, names never seen in training
    ("other_words", 0.4),  # told once, asked with the demo question
    ("corrections", 0.3),  # "lives" then "moved", the reverse, and "Correction:": the later wins
])
def test_reads_where_a_lookup_table_and_the_untrained_model_cannot(figures, task, floor):
    assert figures["trained"][task] >= floor
    # near chance: kept to word starts when reading, the twin's pointer sometimes lands on the
    # asked value (up to 4 of 36 measured)
    assert figures["untrained"][task] <= 0.2 and figures["verbatim"][task] <= 0.1


def test_a_told_value_stays_off_other_names_and_unrelated_prompts(figures):
    """A reader that gave every question the told value would score 0 on specificity."""
    assert figures["trained"]["specificity"] >= 0.7 and figures["trained"]["locality"] >= 0.9


#: per language: what the user tells (one line each), unrelated turns, then after a restart
#: the questions and their answers
CHATS = {
    "en": (["Aris lives in Busan.", "Bexa lives in Lima.", "Corin lives in Oslo.", "Dovi lives in Cairo."],
           ["What a nice day.", "Tell me a story."],
           [("Where does Aris live?", "Busan."), ("Where does Bexa live?", "Lima."),
            ("Where does Corin live?", "Oslo."), ("Where does Dovi live?", "Cairo.")]),
    "ko": (["가람은 부산에 산다.", "누리는 리마에 산다.", "다온은 오슬로에 산다.", "라온은 카이로에 산다."],
           ["날씨가 좋네.", "이야기 하나 해 줘."],
           [("가람은 어디에 살아?", "부산."), ("누리는 어디에 살아?", "리마."),
            ("다온은 어디에 살아?", "오슬로."), ("라온은 어디에 살아?", "카이로.")]),
}


def _chat_answers(run: Path) -> list[bool]:
    """Per language, through the real CLI: tell and chat, quit; a new process asks each
    question. Whether each reply is the told answer."""
    right = []
    for language, (told, small_talk, asked) in CHATS.items():
        said = _cortex("chat", str(run), "--session", language, stdin="\n".join([*told, *small_talk, "/quit"]) + "\n")
        assert said.returncode == 0, said.stderr[-2000:]
        replies = _cortex("chat", str(run), "--session", language,
                          stdin="\n".join([q for q, _ in asked] + ["/quit"]) + "\n")
        assert replies.returncode == 0, replies.stderr[-2000:]
        lines = replies.stdout.strip().splitlines()[-len(asked):]  # one line a reply, after the header
        right += [line.strip() == answer for line, (_, answer) in zip(lines, asked)]
    return right


def test_chat_answers_what_it_was_told_after_a_restart(run, tmp_path):
    """Told once each, in English and Korean, among other people's facts and small talk; the
    run saved by `cortex chat`, a new process asked in other words. A lookup table of the
    told text cannot answer a question in other words; the untrained twin answers none."""
    trained = tmp_path / "trained"
    shutil.copytree(run, trained)  # chat learns into its run; the module's run stays as built
    right = _chat_answers(trained)
    assert sum(right) >= 2, right  # how often is the benchmark's figure; none is the baselines' 
    twin = save_run(untrained_twin(run), tmp_path, name="untrained")
    assert not any(_chat_answers(twin))
