"""Tokenizers: exact round trips, fingerprints, BPE training, saving and loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from cortex.kernel.errors import CortexError, DataError
from cortex.core.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)
from cortex.runtime.bpe import train_bpe

SAMPLES = [
    "Mina lives in Busan. Where does Mina live? Busan.",
    "민아는 부산에 산다. 민아는 어디에 살아? 부산.",
    "mixed 한국어 and English, emoji 🎉👩‍💻, tabs\tand\nnewlines  ",
    "literal <eos> and <pad> in text stay text",
    "",
]


def _corpus(tmp_path: Path) -> list[Path]:
    jsonl = tmp_path / "a.jsonl"
    lines = []
    for i in range(150):
        lines.append(json.dumps({"text": f"Person {i} lives in city number {i * 7 % 31}. 사람 {i}번은 도시 {i % 13}에 산다."}))
        lines.append(json.dumps({"text": f"The {['red', 'blue', 'green'][i % 3]} fox {i} jumps over {i % 5} lazy dogs! 여우가 {i}마리 있다."}))
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = tmp_path / "b.txt"
    text.write_text("Once upon a time there was a model.\n\n옛날 옛적에 모델이 있었다.\n", encoding="utf-8")
    return [jsonl, text]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[BPETokenizer, Path]:
    folder = tmp_path_factory.mktemp("bpe")
    out = folder / "tokenizer.json"
    return train_bpe(_corpus(folder), 400, out), out


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_are_outside_bytes_and_left_out_of_decode():
    tok = ByteTokenizer()
    assert tok.eos_id >= 256 and tok.vocab_size == max(tok.eos_id, tok.pad_id, tok.bos_id) + 1
    assert tok.eos_id not in tok.encode("<eos>")
    assert tok.decode(tok.encode("ab") + [tok.eos_id] + tok.encode("cd")) == "abcd"
    assert tok.config() == {"type": "byte"}


def test_decode_of_truncated_utf8_does_not_raise(bpe):
    byte = ByteTokenizer()
    ids = byte.encode("민아")
    assert byte.decode(ids[:-1]) == "민\ufffd"
    assert byte.decode(ids[1:]).endswith("아")
    tok, _ = bpe
    # byte-level BPE: cut inside the 4-byte emoji, whichever tokens it spans
    ids = tok.encode("a🎉")
    for cut in range(len(ids) + 1):
        assert isinstance(tok.decode(ids[:cut]), str)


def test_fingerprints(bpe, tmp_path):
    tok, _ = bpe
    assert ByteTokenizer().fingerprint == ByteTokenizer().fingerprint
    assert len(ByteTokenizer().fingerprint) == 64
    int(ByteTokenizer().fingerprint, 16)
    assert tok.fingerprint != ByteTokenizer().fingerprint
    other = train_bpe(_corpus(tmp_path), 350, tmp_path / "other.json")
    assert other.fingerprint != tok.fingerprint
    again = train_bpe(_corpus(tmp_path), 400, tmp_path / "again.json")
    assert again.fingerprint == tok.fingerprint


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(bpe, text):
    tok, _ = bpe
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bpe_vocab_size_eos_and_compression(bpe):
    tok, _ = bpe
    assert tok.vocab_size == 400
    assert tok.eos_id == tok.hf.token_to_id("<eos>")
    assert tok.eos_id not in tok.encode("text <eos> text")  # user text cannot inject <eos>
    text = "Person 12 lives in city number 22."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # merges were learned
    assert tok.config() == {"type": "bpe", "path": "tokenizer.json"}


def test_bpe_save_load_round_trip(bpe, tmp_path):
    tok, path = bpe
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.fingerprint == tok.fingerprint
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    # saving into a folder writes folder/tokenizer.json, atomically (no temp files left)
    written = loaded.save(tmp_path)
    assert written == tmp_path / "tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


def test_bpe_survives_pickling_for_worker_processes(bpe):
    tok, _ = bpe
    clone = pickle.loads(pickle.dumps(tok))
    text = "a <eos> b 민아"
    assert clone.encode(text) == tok.encode(text)
    assert clone.fingerprint == tok.fingerprint


def test_byte_save_load(tmp_path):
    path = ByteTokenizer().save(tmp_path / "tok.json")
    data = json.loads(path.read_text())
    assert data["cortex_tokenizer"] == "byte" and data["version"] == 1
    loaded = load_tokenizer(path)
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint == ByteTokenizer().fingerprint


def test_load_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(CortexError, match="tokenizer file not found") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value) and "cortex tokenizer train" in str(e.value)
    corrupt = tmp_path / "bad.json"
    corrupt.write_text("{not json")
    with pytest.raises(CortexError) as e:
        load_tokenizer(corrupt)
    assert str(corrupt) in str(e.value)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(CortexError, match=str(wrong).replace("\\", "\\\\")):
        load_tokenizer(wrong)


def test_tokenizer_from_spec(bpe, tmp_path):
    tok, path = bpe
    assert isinstance(tokenizer_from_spec({"type": "byte"}, tmp_path), ByteTokenizer)
    assert isinstance(tokenizer_from_spec({"type": "byte", "path": None}, tmp_path), ByteTokenizer)
    loaded = tokenizer_from_spec({"type": "bpe", "path": path.name}, path.parent)
    assert loaded.fingerprint == tok.fingerprint
    with pytest.raises(CortexError, match="not found"):
        tokenizer_from_spec({"type": "bpe", "path": "tokenizer.json"}, tmp_path)
    with pytest.raises(CortexError, match="unknown tokenizer type"):
        tokenizer_from_spec({"type": "wordpiece"}, tmp_path)
    with pytest.raises(CortexError, match="needs a path"):
        tokenizer_from_spec({"type": "bpe"}, tmp_path)


def test_train_bpe_errors(tmp_path):
    files = _corpus(tmp_path)
    with pytest.raises(CortexError, match="no training files"):
        train_bpe([], 400, tmp_path / "t.json")
    with pytest.raises(CortexError, match="too small"):
        train_bpe(files, 100, tmp_path / "t.json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        train_bpe([empty], 400, tmp_path / "t.json")
    with pytest.raises(DataError, match="no such file"):
        train_bpe([tmp_path / "missing.txt"], 400, tmp_path / "t.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=f"bad.jsonl:2"):
        train_bpe([bad], 400, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
