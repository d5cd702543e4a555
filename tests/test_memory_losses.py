"""The memory-augmented losses (``retrieval_loss``, ``stm_usage_loss``, ``consolidation_loss``):
each trains exactly the kNN-attention query path, is a real function of the reads, trains
through the real trainer with its term logged, and is absent when switched off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cortex
from cortex.kernel.errors import CortexError
from cortex_plugins.memory.losses import retrieval_nce, usage_deficit, wasted_reads
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LOSSES = {"retrieval_loss": "memory/retrieval_loss", "stm_usage_loss": "memory/stm_usage_loss",
          "consolidation_loss": "memory/consolidation_loss"}
MEASURES = {"retrieval_loss": "memory/retrieval_hit", "consolidation_loss": "memory/consolidation_precision"}
SENTENCES = ["Mina's locker number is 3817. ", "The blue kettle is on the second shelf. ",
             "Jisoo rides bus 42 to school. "]


def manifest(*features: dict | str, train: dict | None = None) -> str:
    """Two blocks, kNN-attention after the first, one STM tier read in training."""
    return tiny_manifest("losses", seed=0, context=32, memory_layers=[0],
                         memory=[{"type": "stm", "settings": {"capacity": 32}}],
                         memory_system={"read": ["knn_attention"]}, features=list(features), train=train)


def build(tmp_path: Path, text: str):
    path = tmp_path / "losses.yaml"
    path.write_text(text, encoding="utf-8")
    return cortex.assemble(cortex.load_manifest(path))


def terms(model, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extra losses of one training forward of ``batch``."""
    logits, _ = model(batch[:, :-1], batch[:, 1:])
    out: dict[str, torch.Tensor] = {}
    for result in model.pm.hook.cortex_extra_losses(model=model, batch=batch, logits=logits):
        out.update(result or {})
    return out


@pytest.mark.parametrize("feature", list(LOSSES))
def test_each_loss_trains_the_query_path_and_nothing_else(tmp_path, feature):
    model = build(tmp_path, manifest({"type": feature, "settings": {"weight": 1.0}})).train()
    batch = torch.randint(0, 40, (2, 33), generator=torch.Generator().manual_seed(0))
    assert terms(model, batch) == {}  # memory empty: nothing to read yet, no term
    got = terms(model, batch)  # the first pass's entries are read now
    assert set(got) == {LOSSES[feature]} and float(got[LOSSES[feature]].detach()) > 0
    got[LOSSES[feature]].backward()
    core = model.core
    reader = core.memory_layer(0)

    def moved(p: torch.Tensor) -> bool:
        return p.grad is not None and float(p.grad.abs().sum()) > 0

    trained = [reader.query.weight, reader.norm.weight, reader.log_scale, core.blocks[0].attn.qkv.weight,
               core.tok_emb.weight]
    untouched = [reader.value.weight, reader.out.weight, reader.gate, *core.blocks[1].parameters()]
    assert all(moved(p) for p in trained)
    assert not any(moved(p) for p in untouched)


@pytest.mark.parametrize("feature", ["retrieval_loss", "stm_usage_loss"])
def test_with_key_queries_a_loss_trains_the_reads_sharpness_alone(tmp_path, feature):
    text = tiny_manifest("losses", seed=0, context=32, memory_layers=[0],
                         memory=[{"type": "stm", "settings": {"capacity": 32}}],
                         memory_system={"read": ["knn_attention"], "query": "key", "value": "next"},
                         features=[{"type": feature, "settings": {"weight": 1.0}}])
    model = build(tmp_path, text).train()
    batch = torch.randint(0, 40, (2, 33), generator=torch.Generator().manual_seed(0))
    terms(model, batch)
    got = terms(model, batch)
    assert set(got) == {LOSSES[feature]}
    got[LOSSES[feature]].backward()
    reader = model.core.memory_layer(0)
    assert float(reader.log_scale.grad.abs()) > 0
    assert all(p.grad is None or not p.grad.any() for n, p in model.core.named_parameters() if "log_scale" not in n)


def test_the_terms_are_functions_of_the_reads():
    # usage: every read on one slot is a collapse (1), reads spread evenly over the slots are not (0)
    valid = torch.ones(1, 4, dtype=torch.bool)
    collapsed = torch.zeros(1, 6, 4)
    collapsed[..., 0] = 1.0
    spread = torch.eye(4)[torch.arange(6) % 4][None]
    assert float(usage_deficit(collapsed, valid)) == pytest.approx(1.0)
    assert float(usage_deficit(spread, valid)) < 0.05
    assert float(usage_deficit(collapsed, valid)) > float(usage_deficit(0.5 * collapsed + 0.5 * spread, valid)) > \
        float(usage_deficit(spread, valid))
    # retrieval: lower when the positive slot scores above the other candidates
    keep = torch.ones(1, 1, 4, dtype=torch.bool)
    positive = torch.tensor([[[False, False, True, False]]])
    right, wrong = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]]), torch.tensor([[[5.0, 0.0, 0.0, 0.0]]])
    assert float(retrieval_nce(right, keep, positive)) < 0.1 < 4.0 < float(retrieval_nce(wrong, keep, positive))
    assert retrieval_nce(right, keep, torch.zeros_like(positive)) is None  # nothing in memory to find
    # consolidation: the share of read weight on slots their strongest reader could not use
    strongest = torch.tensor([[0.9, 0.1, 0.0, 0.0]])
    assert float(wasted_reads(strongest, torch.tensor([[True, False, False, False]]))) == pytest.approx(0.1)
    assert float(wasted_reads(strongest, torch.tensor([[False, True, False, False]]))) == pytest.approx(0.9)


def _train(tmp_path: Path, *features: dict | str, steps: int) -> list[dict]:
    """``steps`` steps of the real trainer on a corpus whose documents repeat three
    sentences, so each row's memory holds contexts that come back; the metrics logged."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(SENTENCES[(i + j) % 3] for j in range(3))}) + "\n"
                              for i in range(300)), encoding="utf-8")
    model = build(tmp_path, manifest(*features, train={
        "tokens": 10**6, "batch": 8, "lr": 1.0e-2, "warmup": 5, "precision": "fp32", "device": "cpu",
        "eval_every": 0, "checkpoint_every": 0}))
    run = cortex.save_run(model, tmp_path / "runs")
    cortex.train(model, run, model.manifest.train, data=str(corpus), steps=steps)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [x for x in lines if "event" not in x]


def test_the_losses_train_with_the_trainer_and_are_logged(tmp_path):
    metrics = _train(tmp_path, *({"type": f, "settings": {"weight": 1.0}} for f in LOSSES), steps=60)
    assert len(metrics) == 60
    for key in [*LOSSES.values(), *MEASURES.values()]:
        assert sum(key in m for m in metrics) >= 55, key  # every step once memory holds entries
    for key in LOSSES.values():
        values = [m[key] for m in metrics if key in m]
        first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
        assert last < 0.85 * first, (key, first, last)
    hits = [m["memory/retrieval_hit"] for m in metrics if "memory/retrieval_hit" in m]
    assert sum(hits[-10:]) > sum(hits[:10]) + 1.0  # the query finds the right continuations more often
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]


def test_off_means_no_term(tmp_path):
    (tmp_path / "off").mkdir()
    (tmp_path / "zero").mkdir()
    left_out = _train(tmp_path / "off", steps=5)
    weight_zero = _train(tmp_path / "zero", *({"type": f, "settings": {"weight": 0}} for f in LOSSES), steps=5)
    for metrics in (left_out, weight_zero):
        assert not any(key in m for m in metrics for key in [*LOSSES.values(), *MEASURES.values()])


def test_a_model_without_knn_attention_is_refused_with_the_fix(tmp_path):
    text = tiny_manifest("plain", memory=[{"type": "stm"}], features=["retrieval_loss"])
    with pytest.raises(CortexError, match=r"retrieval_loss trains the kNN-attention read.*knn_attention"):
        build(tmp_path, text)
