"""kNN-attention's learned null slot (``memory_system.null_slot``): with no ``read_min_score``
floor, unrelated text reads nothing from a memory full of unrelated entries while a match is
still read; without the slot the same text reads them; the slot trains through the real
trainer and is saved with the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cortex
from cortex.core.memory import session_stream
from cortex.kernel.errors import CortexError
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOLD = ["Jisoo bought three apples at the market on Tuesday morning.",
        "The blue kettle is on the second shelf of the kitchen.",
        "Mina's locker number is 3817. She keeps her violin in it."]
UNRELATED = "Busan was cold and windy all week, with rain at night."
OWN, NOBODY = torch.tensor([session_stream("self")]), torch.tensor([session_stream("nobody")])


def manifest(null_slot: float | None, **more) -> str:
    """Two blocks, kNN-attention after the first over one STM tier; no ``read_min_score``."""
    system = {"read": ["knn_attention"], "key_window": 16, "write": "all"}
    if null_slot is not None:
        system["null_slot"] = null_slot
    return tiny_manifest("null", seed=0, dim=64, context=64, memory_layers=[0],
                         memory=[{"type": "stm", "settings": {"capacity": 256}}], memory_system=system, **more)


def build(tmp_path: Path, text: str, name: str = "null.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return cortex.assemble(cortex.load_manifest(path))


def logits(model, text: str, streams: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([model.tokenizer.encode(text)]), streams=streams)[0]


def reads(model, text: str) -> bool:
    """Whether ``text``'s logits change when its stream holds the told entries."""
    return not torch.allclose(logits(model, text, OWN), logits(model, text, NOBODY), atol=1e-3)


def test_the_null_slot_keeps_unrelated_text_unread_and_still_reads_a_match(tmp_path):
    nulled = build(tmp_path, manifest(0.9), "nulled.yaml")
    plain = build(tmp_path, manifest(None), "plain.yaml")
    plain.core.load_state_dict(nulled.core.state_dict(), strict=False)  # the same weights, no null slot
    assert nulled.memory_system.settings.read_min_score is None  # no floor
    for model in (nulled, plain):
        for text in TOLD:
            model.remember(text)
        model.eval()
    torch.testing.assert_close(logits(nulled, UNRELATED, OWN), logits(nulled, UNRELATED, NOBODY))
    assert reads(plain, UNRELATED)  # without the null slot the unrelated entries are mixed in
    assert reads(nulled, TOLD[2]) and reads(plain, TOLD[2])  # a stored match is still read
    nulled.train()  # in training the null slot is one soft choice among the entries, so both keep learning
    assert reads(nulled, UNRELATED)


def test_the_null_slot_gets_gradients_and_starts_with_the_gate_closed(tmp_path):
    model = build(tmp_path, manifest(0.5)).train()
    reader = model.core.memory_layer(0)
    assert float(torch.sigmoid(reader.gate.detach()).max()) < 0.5  # closed at the start, as without the slot
    assert not reader.null_key.detach().any() and float(reader.null_score.detach()) == 0.5
    batch = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    model(batch[:, :-1], batch[:, 1:])  # writes the rows' entries
    _, loss = model(batch[:, :-1], batch[:, 1:])  # reads them
    loss.backward()
    assert float(reader.null_key.grad.abs().sum()) > 0 and float(reader.null_score.grad.abs()) > 0


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(TOLD[(i + j) % 3] for j in range(3))}) + "\n"
                              for i in range(300)), encoding="utf-8")
    return corpus


def test_the_null_slot_trains_with_the_trainer_and_is_saved_with_the_run(tmp_path):
    train = {"tokens": 10**6, "batch": 8, "lr": 1.0e-2, "warmup": 5, "precision": "fp32", "device": "cpu",
             "eval_every": 0, "checkpoint_every": 0}
    model = build(tmp_path, manifest(0.5, train=train))
    run = cortex.save_run(model, tmp_path / "runs")
    cortex.train(model, run, model.manifest.train, data=str(_corpus(tmp_path)), steps=40)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [m["loss"] for m in metrics if "event" not in m]
    assert losses[-1] < 0.6 * losses[0]
    reader = model.core.memory_layer(0)
    assert reader.null_key.detach().any() and float(reader.null_score.detach()) != 0.5  # moved by gradients
    loaded = cortex.load(run).core.memory_layer(0)
    torch.testing.assert_close(loaded.null_key, reader.null_key, rtol=0, atol=0)
    torch.testing.assert_close(loaded.null_score, reader.null_score, rtol=0, atol=0)


def test_a_run_without_the_slot_loads_and_adding_it_later_is_refused_clearly(tmp_path):
    old = cortex.save_run(build(tmp_path, manifest(None)), tmp_path / "runs")
    assert not hasattr(cortex.load(old).core.memory_layer(0), "null_key")
    text = (old / "manifest.yaml").read_text(encoding="utf-8")
    (old / "manifest.yaml").write_text(text.replace("write: all", "write: all, null_slot: 0.5"), encoding="utf-8")
    with pytest.raises(CortexError, match=r"does not match this model \(missing .*null_key"):
        cortex.load(old)
