"""Readers, dataset preparation (splits, mixes, atomicity, workers) and TokenDataset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cortex.runtime.data import (
    TokenDataset,
    documents_from_path,
    dtype_for_vocab,
    parse_mix,
    prepare,
    read_jsonl,
    read_text,
)
from cortex.core.tokenizer import ByteTokenizer, load_tokenizer
from cortex.kernel.errors import CortexError, DataError
from cortex.kernel.interfaces import BuildContext, Document
from cortex_plugins.data.jsonl import JsonlSource
from cortex_plugins.data.text import TextSource

TEXTS = [f"Document {i}: 민아는 부산에 산다 {'x' * (i % 7)} 🎉" for i in range(60)]


class BigVocab(ByteTokenizer):
    """Byte ids, but claims a vocabulary too large for uint16."""

    def __init__(self):
        super().__init__()
        self.vocab_size = 70000
        self.eos_id = 69999

    def description(self):
        return {**super().description(), "vocab_size": self.vocab_size}


class Exploding(ByteTokenizer):
    """Fails on a document containing BOOM, like a tokenizer crashing midway."""

    def encode(self, text):
        if "BOOM" in text:
            raise RuntimeError("tokenizer exploded")
        return super().encode(text)


def docs(texts, name="mem"):
    return [Document(t, f"{name}:{i}") for i, t in enumerate(texts)]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def split_documents(ds_dir: Path, tok) -> list[str]:
    meta = json.loads((ds_dir / "meta.json").read_text())
    out = []
    for split in ("train", "val"):
        tokens = np.fromfile(ds_dir / f"{split}.bin", dtype=meta["dtype"])
        assert len(tokens) == meta["splits"][split]["tokens"]
        if len(tokens):
            assert tokens[-1] == tok.eos_id
        pieces = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)
        out += [tok.decode(p[:-1].tolist()) for p in pieces if len(p)]
    return out


# ----------------------------------------------------------------------------- readers


def test_read_jsonl_origins_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two", "id": 3}\n{"text": ""}\n{"text": "세 번째"}\n', encoding="utf-8")
    got = list(read_jsonl(path))
    assert [d.text for d in got] == ["one", "two", "세 번째"]
    assert [d.origin for d in got] == [f"{path}:1", f"{path}:4", f"{path}:6"]


def test_read_text_paragraphs(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("\ufefffirst line\nsecond line\r\n\r\n\n  \nnext 문단\n\nlast".encode("utf-8"))
    got = list(read_text(path))
    assert [d.text for d in got] == ["first line\nsecond line", "next 문단", "last"]
    assert [d.origin.rsplit(":", 1)[1] for d in got] == ["1", "6", "8"]
    assert type(documents_from_path(path)) is type(read_text(path))
    assert [d.text for d in documents_from_path(write_jsonl(tmp_path / "x.JSONL", ["a"]))] == ["a"]


@pytest.mark.parametrize(
    "line, what",
    [
        ("{oops", "invalid JSON"),
        ('{"txt": "x"}', 'missing the "text" field'),
        ('{"text": 5}', '"text" is int'),
        ('["text"]', "expected a JSON object"),
        ('{"text": "\\ud800"}', "surrogate"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "fine"}}\n\n{line}\n{{"text": "after"}}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_jsonl(path))
    message = str(e.value)
    assert message.startswith(f"{path}:3: ") and what in message and "--skip-bad" in message


def test_skip_bad_counts_skipped_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{oops\n{"text": 1}\n\xff\xfe\n{"text": "b"}\n')
    stream = read_jsonl(path, skip_bad=True)
    assert [d.text for d in stream] == ["a", "b"]
    assert stream.skipped == 3
    assert stream.skipped_at == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert [d.text for d in stream] == ["a", "b"] and stream.skipped == 3  # re-readable


def test_undecodable_bytes(tmp_path):
    for name in ("bad.jsonl", "bad.txt"):
        path = tmp_path / name
        path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
        with pytest.raises(DataError, match=rf"{name}:3: invalid UTF-8"):
            list(documents_from_path(path))
    stream = read_text(tmp_path / "bad.txt", skip_bad=True)
    assert [d.text for d in stream] == ['{"text": "ok"}'] and stream.skipped == 1


def test_missing_empty_and_folder_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_text(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no documents \(the file is empty\)"):
        list(read_jsonl(empty))
    allbad = tmp_path / "allbad.jsonl"
    allbad.write_text("{oops\n[1]\n")
    with pytest.raises(DataError, match="all 2 non-blank lines were bad"):
        list(read_jsonl(allbad, skip_bad=True))


def test_file_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a1.jsonl", ["a", "b"])
    (tmp_path / "a2.jsonl").write_text('{"text": "c"}\n{bad\n')
    (tmp_path / "t.txt").write_text("p1\n\np2\n")
    src = JsonlSource(JsonlSource.Settings(paths=["a*.jsonl"], skip_bad=True), BuildContext())
    stream = src.documents()
    assert [d.text for d in stream] == ["a", "b", "c"] and stream.skipped == 1
    assert next(src.documents()).text == "a"
    text = TextSource(TextSource.Settings(paths=["t.txt"]), BuildContext())
    assert [d.text for d in text.documents()] == ["p1", "p2"]
    with pytest.raises(DataError, match="no file matches"):
        JsonlSource(JsonlSource.Settings(paths=["zz*.jsonl"]), BuildContext()).documents()
    with pytest.raises(ValueError):
        JsonlSource.Settings(paths=[])
    with pytest.raises(ValueError):
        JsonlSource.Settings(paths=["a"], unknown=1)


# ----------------------------------------------------------------------------- prepare


def test_prepare_round_trip(tmp_path):
    tok = ByteTokenizer()
    meta = prepare([("mem", docs(TEXTS), None)], tmp_path / "ds", tok, workers=1, val_fraction=0.1)
    ds_dir = tmp_path / "ds"
    assert sorted(p.name for p in ds_dir.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert Counter(split_documents(ds_dir, tok)) == Counter(TEXTS)
    assert meta == json.loads((ds_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["val"]["documents"] == 6 and meta["splits"]["train"]["documents"] == 54
    total = sum(len(tok.encode(t)) + 1 for t in TEXTS)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total
    assert meta["sources"]["mem"]["documents_read"] == 60
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert meta["tokenizer"]["config"] == {"type": "byte"}
    assert load_tokenizer(ds_dir / "tokenizer.json").fingerprint == tok.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left


def test_prepare_is_deterministic_and_seed_dependent(tmp_path):
    tok = ByteTokenizer()
    prepare([("mem", docs(TEXTS), None)], tmp_path / "a", tok, workers=1)
    prepare([("mem", docs(TEXTS), None)], tmp_path / "b", tok, workers=1)
    prepare([("mem", docs(TEXTS), None)], tmp_path / "c", tok, workers=1, seed=1)
    train = lambda d: (tmp_path / d / "train.bin").read_bytes()  # noqa: E731
    assert train("a") == train("b") != train("c")


def test_parallel_output_identical_to_inline(tmp_path):
    tok = ByteTokenizer()
    many = [f"{i} {t}" for i, t in enumerate(TEXTS * 5)]
    prepare([("mem", docs(many), None)], tmp_path / "one", tok, workers=1, chunk_size=7)
    prepare([("mem", docs(many), None)], tmp_path / "two", tok, workers=2, chunk_size=7)
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_dtype_rule(tmp_path):
    assert dtype_for_vocab(259) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32
    tok = BigVocab()
    meta = prepare([("mem", docs(TEXTS[:10]), None)], tmp_path / "ds", tok, workers=1)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "ds" / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    assert Counter(split_documents(tmp_path / "ds", tok)) == Counter(TEXTS[:10])
    assert len(TokenDataset(tmp_path / "ds", tokenizer=tok)) == meta["splits"]["train"]["tokens"]


def test_prepare_from_paths_counts_skipped_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{bad\n{"text": "b"}\n{"nope": 1}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2"):
        prepare([("d", str(path), None)], tmp_path / "ds", ByteTokenizer(), workers=1)
    assert not (tmp_path / "ds").exists()
    meta = prepare([("d", str(path), None)], tmp_path / "ds", ByteTokenizer(), workers=1, skip_bad=True)
    assert meta["skipped_lines"] == 2 and meta["sources"]["d"]["skipped_lines"] == 2
    assert meta["sources"]["d"]["documents_read"] == 3
    # a stream made by the caller reports its count too
    meta = prepare([("d", read_jsonl(path, skip_bad=True), None)], tmp_path / "ds", ByteTokenizer(), workers=1)
    assert meta["skipped_lines"] == 2


def test_prepare_refuses_empty_sources_and_bad_arguments(tmp_path):
    tok = ByteTokenizer()
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="has no documents"):
        prepare([("none", [], None)], out, tok, workers=1)
    with pytest.raises(DataError, match="no such file"):
        prepare([("m", tmp_path / "missing.jsonl", None)], out, tok, workers=1)
    with pytest.raises(DataError, match="weight for every source"):
        prepare([("a", docs(TEXTS), 0.5), ("b", docs(TEXTS), None)], out, tok, workers=1)
    with pytest.raises(DataError, match="unique"):
        prepare([("a", docs(TEXTS), None), ("a", docs(TEXTS), None)], out, tok, workers=1)
    with pytest.raises(DataError, match="val_fraction"):
        prepare([("a", docs(TEXTS), None)], out, tok, workers=1, val_fraction=1.0)
    assert list(tmp_path.iterdir()) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not a Cortex dataset"):
        prepare([("a", docs(TEXTS), None)], other, tok, workers=1)
    assert (other / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_prepare_leaves_nothing_behind(tmp_path, workers):
    texts = TEXTS * 3 + ["BOOM"] + TEXTS
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="exploded"):
        prepare([("mem", docs(texts), None)], out, Exploding(), workers=workers, chunk_size=5)
    assert list(tmp_path.iterdir()) == []
    # an existing dataset survives a failed re-preparation untouched
    prepare([("mem", docs(TEXTS), None)], out, ByteTokenizer(), workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError):
        prepare([("mem", docs(texts), None)], out, Exploding(), workers=workers, chunk_size=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    # and a successful one replaces it
    meta = prepare([("mem", docs(TEXTS[:20]), None)], out, ByteTokenizer(), workers=1)
    assert meta["sources"]["mem"]["documents_read"] == 20
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_parse_mix():
    assert parse_mix("a.jsonl=0.4,b.jsonl=0.6") == pytest.approx({"a.jsonl": 0.4, "b.jsonl": 0.6})
    assert parse_mix(" a = 2 , b=1") == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    for bad, what in [
        ("", "empty"),
        ("a.jsonl", "NAME=WEIGHT"),
        ("=1", "NAME=WEIGHT"),
        ("a=", "NAME=WEIGHT"),
        ("a=x", "not a number"),
        ("a=0,b=1", "positive"),
        ("a=-1", "positive"),
        ("a=nan", "positive"),
        ("a=1,a=2", "twice"),
    ]:
        with pytest.raises(DataError, match=what):
            parse_mix(bad)


def test_mix_ratios_are_achieved(tmp_path):
    short = [f"s{i} " + "a" * (20 + i % 9) for i in range(600)]  # ~25 tokens each
    long = [f"l{i} " + "b" * (90 + i % 31) for i in range(300)]  # ~110 tokens each
    meta = prepare(
        [("short", docs(short, "s"), 0.4), ("long", docs(long, "l"), 0.6)],
        tmp_path / "ds", ByteTokenizer(), workers=1, val_fraction=0.05,
    )
    achieved = meta["mix"]["achieved"]
    assert meta["mix"]["requested"] == pytest.approx({"short": 0.4, "long": 0.6})
    assert achieved["short"] == pytest.approx(0.4, abs=0.02)
    assert achieved["long"] == pytest.approx(0.6, abs=0.02)
    # the scarce source (short: ~15k tokens for a 40% share) is used entirely, the other downsampled
    s, l = meta["sources"]["short"], meta["sources"]["long"]
    assert s["documents"]["train"] + s["documents"]["val"] == 600
    assert l["documents"]["train"] + l["documents"]["val"] < 300
    # measured from the file itself
    texts = split_documents(tmp_path / "ds", ByteTokenizer())
    assert len(texts) == len(set(texts))  # no repetition
    train = np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint16)
    pieces = np.split(train, np.flatnonzero(train == 256) + 1)
    from_short = sum(len(p) for p in pieces if len(p) and p[0] == ord("s"))
    assert from_short / len(train) == pytest.approx(0.4, abs=0.02)


# ----------------------------------------------------------------------------- TokenDataset


@pytest.fixture
def dataset(tmp_path) -> Path:
    prepare([("mem", docs(TEXTS), None)], tmp_path / "ds", ByteTokenizer(), workers=1, val_fraction=0.1)
    return tmp_path / "ds"


def test_mismatched_tokenizer_is_refused(dataset):
    assert len(TokenDataset(dataset, tokenizer=ByteTokenizer())) > 0
    with pytest.raises(DataError, match="prepared with another tokenizer") as e:
        TokenDataset(dataset, tokenizer=BigVocab())
    assert "cortex data prepare" in str(e.value)
    assert TokenDataset(dataset).load_tokenizer().fingerprint == ByteTokenizer().fingerprint


def test_missing_or_damaged_dataset(tmp_path, dataset):
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="no split"):
        TokenDataset(dataset, split="test")
    with open(dataset / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="damaged"):
        TokenDataset(dataset, split="val")


def test_sample_shapes_and_determinism(dataset):
    ds = TokenDataset(dataset)
    x = ds.sample(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 17) and x.dtype == torch.long
    assert torch.equal(x, ds.sample(4, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, ds.sample(4, 16, torch.Generator().manual_seed(1)))
    tokens = np.fromfile(dataset / "train.bin", dtype=np.uint16)
    for row in x.numpy():  # each row is a contiguous window of the data
        starts = np.flatnonzero(tokens[: len(tokens) - 16] == row[0])
        assert any(np.array_equal(tokens[s : s + 17], row) for s in starts)


def test_batches_are_sequential_and_resumable(dataset):
    ds = TokenDataset(dataset)
    tokens = torch.from_numpy(np.fromfile(dataset / "train.bin", dtype=np.uint16).astype(np.int64))
    stream = ds.batches(3, 8)
    got = [next(stream) for _ in range(6)]
    assert [p for p, _ in got] == [24, 48, 72, 96, 120, 144]
    assert torch.equal(got[0][1][1], tokens[8:17])
    assert torch.equal(got[1][1][0], tokens[24:33])
    resumed = ds.batches(3, 8, start=got[2][0])
    for position, batch in got[3:]:
        p, b = next(resumed)
        assert p == position and torch.equal(b, batch)
    # one pass without looping covers every window exactly once
    windows = (len(ds) - 1) // 8
    one_pass = torch.cat([b for _, b in ds.batches(5, 8, loop=False)])
    assert one_pass.shape == (windows, 9)
    assert torch.equal(one_pass[:, :-1].reshape(-1), tokens[: windows * 8])
    # looping wraps around to the start
    looped = ds.batches(windows, 8, start=0)
    next(looped)
    assert torch.equal(next(looped)[1][0], tokens[0:9])
    with pytest.raises(DataError, match="multiple of seq_len"):
        next(ds.batches(3, 8, start=5))


def test_too_short_and_empty_splits(tmp_path, dataset):
    ds = TokenDataset(dataset, split="val")
    with pytest.raises(DataError, match="fewer than seq_len"):
        ds.sample(1, len(ds), torch.Generator())
    ds.sample(1, len(ds) - 1, torch.Generator())
    prepare([("mem", docs(TEXTS), None)], tmp_path / "noval", ByteTokenizer(), workers=1, val_fraction=0)
    empty = TokenDataset(tmp_path / "noval", split="val")
    assert len(empty) == 0
    with pytest.raises(DataError, match="val_fraction above 0"):
        next(empty.batches(1, 4))


def test_errors_are_cortex_errors():
    assert issubclass(DataError, CortexError)
