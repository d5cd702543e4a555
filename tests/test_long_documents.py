"""Training where memory pays: document lanes (``train.lanes: documents``) and the long demo.

A lane reads one document's segments in order, its memory stream holds what the
document's earlier segments wrote and nothing of another document; ``distance_windows``
makes demo documents whose facts are asked windows after they are stated.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from cortex import hookimpl
from cortex.assembly import assemble
from cortex.core.tokenizer import ByteTokenizer
from cortex.core.transformer import ModelConfig
from cortex.kernel.errors import DataError
from cortex.kernel.interfaces import BuildContext, CognitiveFeature, Document, Settings
from cortex.kernel.manifest import ManifestError, TrainSection, load_manifest
from cortex.runtime.data import TokenDataset, prepare
from cortex.runtime.document_lanes import DocumentLanes, document_ends
from cortex.runtime.rundir import save_run
from cortex.runtime.train import train
from cortex_plugins.data.demo import DemoSource
from tests.conftest import make_plugin, tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEQ = 16
#: fifteen disjoint four-letter alphabets: the letters of a token tell its document
ALPHABETS = [(string.ascii_letters + string.digits)[4 * k : 4 * k + 4] for k in range(15)]


def alphabet_documents() -> list[Document]:
    """Documents of 30 to 100 letters, each from its own alphabet (several segments each)."""
    rng = np.random.default_rng(0)
    return [Document("".join(rng.choice(list(letters), size=30 + 5 * k)), f"doc:{k}")
            for k, letters in enumerate(ALPHABETS)]


def prepared(tmp_path: Path, docs: list[Document]) -> Path:
    out = tmp_path / "data"
    prepare([("docs", docs, None)], out, ByteTokenizer(), workers=1, val_fraction=0.0)
    return out


def owner(ids: list[int]) -> int | None:
    """The document (alphabet index) the letters of ``ids`` come from; None for only <eos>."""
    letters = {chr(i) for i in ids if i < 256}
    found = {k for k, a in enumerate(ALPHABETS) if letters & set(a)}
    assert len(found) <= 1, f"tokens of documents {found} in one segment"
    return found.pop() if found else None


# --------------------------------------------------------------------------- the lanes


def test_a_lane_reads_one_documents_segments_in_order_then_the_next(tmp_path):
    tok = ByteTokenizer()
    docs = alphabet_documents()
    data = TokenDataset(prepared(tmp_path, docs), "train")
    lanes = DocumentLanes(data, batch=3, seq_len=SEQ, eos=tok.eos_id)
    assert lanes.documents == len(docs) and len(lanes.units) == len(docs)  # none short enough to pack
    steps = list(zip(range(40), lanes.batches()))
    read: dict[int, list[list[int]]] = {}  # lane -> the ids it read of its current document
    last: dict[int, list[int]] = {}  # lane -> its previous row
    finished: list[str] = []
    for step, part in steps:
        assert part.position == (step + 1) * SEQ and part.tokens.shape == (3, SEQ + 1)
        for r in range(3):
            n = int(part.lengths[r])
            row = part.tokens[r, :n].tolist()
            assert part.tokens[r, n:].eq(tok.eos_id).all()  # filling after the document's end
            if bool(part.fresh[r]):
                if r in read:
                    finished.append(tok.decode([i for seg in read[r] for i in seg if i != tok.eos_id]))
                read[r], last[r] = [row], row
                continue
            previous = last[r]
            assert len(previous) == SEQ + 1 and row[0] == previous[-1]  # continues exactly
            assert owner(row) == owner(previous)
            read[r].append(row[1:])
            last[r] = row
    texts = {d.text for d in docs}
    assert len(finished) >= 10 and all(text in texts for text in finished)  # whole documents, in order
    assert len(set(finished)) == len(finished[: len(docs)])  # each document once per pass
    # every document read from the <eos> before it (but the file's first) to its own <eos>
    ends = document_ends(data.tokens, tok.eos_id)
    assert ends.tolist() == [i + 1 for i, t in enumerate(data.tokens) if t == tok.eos_id]
    # resuming at a position gives the same batches
    again = lanes.batches(start=steps[11][1].position)
    for _, part in steps[12:30]:
        other = next(again)
        assert other.position == part.position and torch.equal(other.tokens, part.tokens)
        assert torch.equal(other.fresh, part.fresh) and torch.equal(other.lengths, part.lengths)


def test_short_documents_are_packed_whole_and_too_few_documents_are_an_error(tmp_path):
    tok = ByteTokenizer()
    docs = [Document(letters, f"short:{k}") for k, letters in enumerate(ALPHABETS)]  # 5 tokens with <eos>
    data = TokenDataset(prepared(tmp_path, docs), "train")
    lanes = DocumentLanes(data, batch=2, seq_len=SEQ, eos=tok.eos_id)
    assert len(lanes.units) < len(docs) and lanes.segments.tolist() == [1] * len(lanes.units)
    part = next(lanes.batches())
    assert part.fresh.all() and int(part.lengths.max()) <= SEQ + 1
    for r in range(2):  # whole documents side by side in one segment
        words = tok.decode([i for i in part.tokens[r, : int(part.lengths[r])].tolist() if i != tok.eos_id])
        assert len(words) == 12  # three documents (16 tokens with the <eos> before each)
    with pytest.raises(DataError, match="fewer than the 8 lanes of a batch"):
        DocumentLanes(data, batch=8, seq_len=SEQ, eos=tok.eos_id)
    with pytest.raises(DataError, match="multiple of seq_len"):
        next(lanes.batches(start=3))


# --------------------------------------------------------------------------- memory in training


class LaneProbe(CognitiveFeature):
    """Records, before each step, every row's tokens and the tokens its STM stream holds."""

    name = "lane_probe"

    class Settings(Settings):
        pass

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.seen: list[tuple[torch.Tensor, list[set[int]]]] = []

    @hookimpl
    def cortex_before_step(self, model, step, batch):
        stm = model.memory[0]
        held = []
        for lane in range(batch.size(0)):
            rows = (stm.stream_ids == lane).nonzero().flatten()
            held.append(set(stm.tokens[rows][stm.valid[rows]].tolist()) if rows.numel() else set())
        self.seen.append((batch.clone(), held))


def probed_run(tmp_path: Path, register_plugin, lanes: str) -> LaneProbe:
    register_plugin(make_plugin(LaneProbe), namespace=f"probe_{lanes}")
    text = tiny_manifest(name=f"lanes-{lanes}", seed=0, layers=1, context=SEQ,
                         memory=[{"type": "stm", "settings": {"capacity": 256}}],
                         features=[f"probe_{lanes}.lane_probe"])
    path = tmp_path / f"{lanes}.yaml"
    path.write_text(text, encoding="utf-8")
    model = assemble(load_manifest(path))
    run = save_run(model, tmp_path / "runs", name=f"lanes-{lanes}")
    data = prepared(tmp_path / lanes, alphabet_documents())
    settings = TrainSection.model_validate(dict(tokens=10**9, batch=3, lanes=lanes, precision="fp32",
                                                eval_every=0, checkpoint_every=0, warmup=2))
    train(model, run, settings, data=str(data), steps=30)
    return model.features[0]


def test_a_lanes_memory_holds_its_documents_earlier_segments_and_nothing_of_another(tmp_path, register_plugin):
    probe = probed_run(tmp_path, register_plugin, "documents")
    eos = ByteTokenizer().eos_id
    first = TokenDataset(tmp_path / "documents" / "data", "train").tokens[: SEQ + 1].tolist()
    mid = fresh = 0
    for batch, held in probe.seen:
        for r in range(batch.size(0)):
            row = batch[r].tolist()
            doc = owner(row)
            if row[0] == eos or row == first:  # the segment starts a document (read from the <eos> before it)
                assert not held[r], "a new document starts with an empty memory stream"
                fresh += 1
                continue
            # a later segment: memory holds what this document's earlier segments wrote, only that
            assert held[r] and owner(sorted(held[r])) == doc, (held[r], doc)
            mid += 1
    assert mid >= 20 and fresh >= 6


def test_stream_lanes_are_the_token_stream_as_before_and_carry_memory_across_documents(tmp_path, register_plugin):
    probe = probed_run(tmp_path, register_plugin, "stream")
    data = TokenDataset(tmp_path / "stream" / "data", "train")
    expected = data.lanes(3, SEQ)
    for batch, _ in probe.seen:  # the default batches are TokenDataset.lanes, unchanged
        assert torch.equal(batch, next(expected)[1])
    mixed = 0
    for batch, held in probe.seen:
        letters = [{chr(i) for i in h if i < 256} for h in held]
        mixed += sum(len({k for k, a in enumerate(ALPHABETS) if s & set(a)}) > 1 for s in letters)
    assert mixed > 0  # without document lanes a stream's memory mixes documents


def test_training_on_long_demo_documents_in_document_lanes_lowers_the_loss(tmp_path):
    text = tiny_manifest(name="long", seed=0, layers=1, context=64,
                         memory=[{"type": "stm", "settings": {"capacity": 64}}], memory_layers=[0])
    path = tmp_path / "long.yaml"
    path.write_text(text, encoding="utf-8")
    model = assemble(load_manifest(path))
    run = save_run(model, tmp_path / "runs", name="long")
    settings = TrainSection.model_validate(dict(
        tokens=10**9, batch=4, lanes="documents", lr=1e-2, warmup=5, precision="fp32", eval_every=0,
        checkpoint_every=0, data={"type": "demo", "settings": {"documents": 40, "distance_windows": 2}}))
    train(model, run, settings, steps=100)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert len(losses) == 100 and last < 0.6 * first, (first, last)


def test_a_bad_lanes_value_is_one_line_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(tiny_manifest(train={"lanes": "docs"}), encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "train.lanes" in message and "'documents'" in message and "\n" not in message.strip()


# --------------------------------------------------------------------------- the long demo


def long_source(windows: int, context: int = 48, documents: int = 6) -> DemoSource:
    settings = DemoSource.Settings(documents=documents, distance_windows=windows, seed=3)
    config = ModelConfig(vocab_size=259, dim=8, layers=1, heads=2, context=context)
    return DemoSource(settings, BuildContext(config=config, tokenizer=ByteTokenizer()))


def test_the_long_demo_asks_each_fact_at_least_two_windows_after_it_is_stated():
    from cortex_plugins.data.demo import long_demo_worlds

    tok, context = ByteTokenizer(), 48
    worlds = list(long_demo_worlds(6, 2, context, lambda t: len(tok.encode(t)), seed=3))
    docs = list(long_source(2, context).documents())
    assert [d.text for d in docs] == [w.text for w in worlds] and len({d.text for d in docs}) == 6
    for world in worlds:
        facts = world.text.split("\n", 1)[0]
        told = len(tok.encode(facts))
        names = {p.name[1] if world.korean else p.name[0] for p in world.people}
        for question, answer in world.qa:
            at = world.text.rindex(f"{question} {answer}")
            assert len(tok.encode(world.text[:at])) - told >= 2 * context  # two windows back or more
            assert any(n in question for n in names) and at > len(facts)
        between = world.text[len(facts) : world.text.rindex(world.qa[0][0])]
        assert not any(n in between for n in names)  # nobody asked about appears in the filler
    assert len(tok.encode(worlds[0].text)) > 3 * context


def test_the_long_demo_needs_the_model_and_leaves_the_default_corpus_alone():
    with pytest.raises(DataError, match="distance_windows"):
        DemoSource(DemoSource.Settings(distance_windows=2), BuildContext(tokenizer=ByteTokenizer())).documents()
    plain = DemoSource(DemoSource.Settings(documents=5), BuildContext(tokenizer=ByteTokenizer()))
    assert [d.origin for d in plain.documents()] == [f"demo:0:{i}" for i in range(5)]


def test_extra_losses_see_no_targets_past_a_rows_end():
    """A row's <eos> filling is no target of the LM loss nor of a feature's extra loss."""
    from cortex.runtime.train import _LaneStreams

    lanes = _LaneStreams(torch.nn.Identity(), streams=False)
    lanes.start(0, lengths=torch.tensor([3, 6]))  # row 0: 3 real tokens, row 1: all 6
    lanes.calls = 2  # after the forward of both rows
    batch = torch.arange(12).view(2, 6)
    masked = lanes.mask_last(batch)
    assert masked[0].tolist() == [0, 1, 2, -1, -1, -1] and masked[1].tolist() == batch[1].tolist()
    lanes.start(0)  # stream lanes: nothing to mask
    assert lanes.mask_last(batch) is batch
