"""kNN-attention learns to read memory (issue 15): a small model trained a few hundred steps
on long documents, where codes told at a document's start are said again windows later,
reads a code told once from memory that its window no longer holds. The gate starts
closed and nothing is set by hand; the untrained model and memory off read nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import cortex
from cortex.core.memory import session_stream
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONTEXT = 64
NAMES = ["Mina", "Jisoo", "Tom", "Aris", "Hana", "Brisa", "Leo", "Sora", "Yuna", "Ivo"]
THINGS = ["pass key", "door code", "bike code", "room number", "pin"]
FILLER = ["The market opens early on Tuesdays.", "Rain is expected in the north tonight.",
          "She walked the dog along the river.", "The train to Busan was late again.",
          "He painted the fence a pale green.", "Our class read two chapters today."]


def statement(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)}'s {rng.choice(THINGS)} is {rng.randint(1000, 99999)}."


def filler(rng: random.Random, n_bytes: int) -> str:
    out = []
    while len(" ".join(out)) < n_bytes:
        out.append(rng.choice(FILLER))
    return " ".join(out)


def documents(n: int) -> list[str]:
    """Three codes, two windows of filler, two of the codes again: memory alone knows them."""
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        told = [statement(rng) for _ in range(3)]
        docs.append(" ".join(told) + "\n" + filler(rng, 2 * CONTEXT) + "\n" + " ".join(rng.sample(told, 2)))
    return docs


def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "learned.yaml"
    system = {"read": ["knn_attention"], "key_layer": 0, "key_window": 16, "write": "all", "query": "key",
              "value": "next", "null_slot": 0.9, "read_temperature": 0.02}
    train = {"tokens": 10**7, "batch": 8, "lr": 3.0e-3, "warmup": 10, "precision": "fp32", "device": "cpu",
             "eval_every": 0, "checkpoint_every": 0, "lanes": "documents"}
    path.write_text(tiny_manifest("learned", seed=0, dim=64, layers=2, heads=2, context=CONTEXT, memory_layers=[1],
                                  memory=[{"type": "stm", "settings": {"capacity": 512}}],
                                  memory_system=system, train=train), encoding="utf-8")
    return path


def told_code_probability(model, tag: str, trials: int = 12) -> tuple[float, float]:
    """Mean probability of a told code's digits after its cue, with the code's session and with
    a session told nothing; the code is told, then two windows of filler, then asked."""
    rng = random.Random(1)
    on = off = 0.0
    for t in range(trials):
        fact = statement(rng)
        cue, code = fact[:-1].rsplit(" ", 1)
        model.remember(fact, session=f"{tag}{t}")
        model.remember(filler(rng, 2 * CONTEXT), session=f"{tag}{t}")
        ids = torch.tensor([model.tokenizer.encode(f"{cue} {code}")])
        n = len(code)
        for session in (f"{tag}{t}", "nobody"):
            with torch.no_grad():
                logits, _ = model.core(ids[:, :-1], memory=model.memory_system.pass_read(
                    ids[:, :-1], torch.tensor([session_stream(session)])))
            p = torch.softmax(logits.float(), -1)[0, -n:].gather(1, ids[0, -n:, None]).mean()
            if session == "nobody":
                off += float(p) / trials
            else:
                on += float(p) / trials
    return on, off


def test_a_small_model_learns_to_read_a_code_its_window_no_longer_holds(tmp_path):
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(1000)), encoding="utf-8")
    path = manifest(tmp_path)
    model = cortex.assemble(cortex.load_manifest(path))
    reader = model.core.memory_layer(1)
    assert float(torch.sigmoid(reader.gate.detach()).max()) < 0.5  # the gate starts closed
    untrained_on, untrained_off = told_code_probability(model.eval(), "untrained")
    model.train()
    run = cortex.save_run(model, tmp_path / "runs")
    cortex.train(model, run, model.manifest.train, data=str(corpus), steps=800)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [m["loss"] for m in metrics if "event" not in m]
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20])
    on, off = told_code_probability(model.eval(), "trained")
    assert untrained_on - untrained_off < 0.02  # untrained, memory adds nothing
    assert on > off + 0.3 and on > 2 * off, (on, off)  # trained, it reads the told code (0.79 vs 0.10 here)
