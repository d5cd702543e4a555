"""The `hf` data source: local Hugging Face datasets, read offline, prepared and trained on.

Needs the `hf` extra (`datasets`, also in `dev`); every dataset here is made by the test.
The network is blocked in every test of this module: nothing may be downloaded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from cortex.core.tokenizer import ByteTokenizer  # noqa: E402
from cortex.kernel.errors import CortexError, DataError  # noqa: E402
from cortex.kernel.interfaces import BuildContext  # noqa: E402
from cortex.kernel.plugins import create_plugin_manager  # noqa: E402
from cortex.runtime.data import TokenDataset, prepare  # noqa: E402
from cortex_plugins.data.hf import HFSource, is_hf_dataset, is_saved_dataset  # noqa: E402
from tests.conftest import tiny_manifest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline")  # one_thread: cortex/testing.py

TEXTS = [
    "Mina lives in Busan. Where does Mina live? Busan.",
    "민아는 부산에 산다. 민아는 어디에 살아? 부산.",
    "Jun is a teacher. What is Jun's job? A teacher.",
    "준은 교사이다. 준의 직업은? 교사.",
    "The cat sat on the mat.",
    "고양이가 매트 위에 앉았다.",
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No socket may connect, and the Hugging Face cache is a temporary folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the hf data source tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def texts(n: int) -> list[str]:
    """``n`` documents cycling through ``TEXTS`` (numbered, so none is repeated)."""
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def save_dataset(path: Path, rows: list[str] | dict[str, list], **columns) -> Path:
    data = rows if isinstance(rows, dict) else {"text": rows, **columns}
    datasets.Dataset.from_dict(data).save_to_disk(str(path))
    return path


def save_dict(path: Path, splits: dict[str, list[str]]) -> Path:
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def source(path: Path | str, **settings) -> HFSource:
    return HFSource(HFSource.Settings(path=str(path), **settings), BuildContext())


def read(path: Path | str, **settings) -> list[str]:
    return [d.text for d in source(path, **settings).documents()]


def split_documents(ds_dir: Path, tok) -> list[str]:
    """Every document of a prepared dataset, decoded from its token files."""
    out = []
    for split in ("train", "val"):
        tokens = np.asarray(TokenDataset(ds_dir, split, tok).tokens)
        if len(tokens):
            assert tokens[-1] == tok.eos_id
        pieces = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)
        out += [tok.decode(p[:-1].tolist()) for p in pieces if len(p)]
    return out


# --------------------------------------------------------------------------- reading


def test_registered_as_a_builtin_data_source():
    info = create_plugin_manager(namespaces=()).registry.get("data", "hf")
    assert info is not None and info.cls is HFSource and info.source.builtin


def test_saved_dataset_documents_in_order_with_origins(tmp_path):
    path = save_dataset(tmp_path / "one", TEXTS, n=list(range(len(TEXTS))))
    environ = dict(os.environ)
    assert is_saved_dataset(path) and is_hf_dataset(path)
    docs = list(source(path).documents())
    assert [d.text for d in docs] == TEXTS
    assert [d.origin for d in docs] == [f"{path}#{i}" for i in range(len(TEXTS))]
    stream = source(path, limit=2).documents()
    assert [d.text for d in stream] == TEXTS[:2]
    assert [d.text for d in stream] == TEXTS[:2]  # re-readable
    assert next(stream).text == TEXTS[0]  # and an iterator, as DataSource.documents() promises
    assert dict(os.environ) == environ  # offline only while importing and opening


def test_dataset_dict_splits(tmp_path):
    path = save_dict(tmp_path / "dd", {"train": TEXTS[:4], "validation": TEXTS[4:]})
    assert is_saved_dataset(path)
    assert read(path) == TEXTS[:4]  # `train` by default
    docs = list(source(path, split="validation").documents())
    assert [d.text for d in docs] == TEXTS[4:]
    assert docs[0].origin == f"{path}[validation]#0"
    only = save_dict(tmp_path / "only", {"test": TEXTS[:2]})
    assert read(only) == TEXTS[:2]  # the only split


def test_another_text_field_and_saved_format_do_not_matter(tmp_path):
    ds = datasets.Dataset.from_dict({"id": list(range(len(TEXTS))), "body": TEXTS})
    ds.set_format("numpy")
    ds.save_to_disk(str(tmp_path / "fmt"))
    assert read(tmp_path / "fmt", text_field="body") == TEXTS


def test_empty_and_null_texts(tmp_path):
    path = save_dataset(tmp_path / "nulls", ["a", "", None, "b", None])
    with pytest.raises(DataError, match=r"nulls#2: 'text' is null — fix the row.*skip_bad"):
        read(path)
    stream = source(path, skip_bad=True).documents()
    assert [d.text for d in stream] == ["a", "b"]  # the empty string is left out, uncounted
    assert stream.skipped == 2 and stream.skipped_at == [f"{path}#2", f"{path}#4"]
    empty = save_dataset(tmp_path / "empty", ["", ""])
    with pytest.raises(DataError, match=r"empty: no documents \(all 2 rows have an empty 'text'\)"):
        read(empty)


def test_data_files_folder(tmp_path):
    """A dataset repository's local copy: Parquet files whose names give the splits."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": TEXTS[:4], "n": [1, 2, 3, 4]}).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"text": TEXTS[4:], "n": [5, 6]}).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    assert is_hf_dataset(repo) and not is_saved_dataset(repo)
    assert read(repo) == TEXTS[:4]
    docs = list(source(repo, split="test").documents())
    assert [d.text for d in docs] == TEXTS[4:] and docs[0].origin == f"{repo}[test]#0"
    assert read(repo, limit=3) == TEXTS[:3]
    with pytest.raises(DataError, match=r"no split 'validation' \(`split`\) — available: (train, test|test, train)"):
        read(repo, split="validation")
    with pytest.raises(DataError, match=r"no column 'body' \(`text_field`\) — columns: text \(string\), n \(int64\)"):
        read(repo, text_field="body")


# --------------------------------------------------------------------------- errors


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"missing: no such folder — check `path`"):
        read(tmp_path / "missing")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl: is a file, not a folder.*`jsonl`"):
        read(tmp_path / "a.jsonl")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: neither a saved dataset .*check `path`"):
        read(tmp_path / "nothing")

    one = save_dataset(tmp_path / "one", TEXTS, n=list(range(len(TEXTS))))
    with pytest.raises(DataError, match=r"no column 'body' \(`text_field`\) — columns: text \(string\), n \(int64\)"):
        read(one, text_field="body")
    with pytest.raises(DataError, match=r"column 'n' \(`text_field`\) holds int64, not text"):
        read(one, text_field="n")
    with pytest.raises(DataError, match=r"single dataset without splits, so `split: train` does not apply"):
        read(one, split="train")

    dd = save_dict(tmp_path / "dd", {"train": TEXTS, "validation": TEXTS})
    with pytest.raises(DataError, match=r"dd: no split 'test' \(`split`\) — available: train, validation"):
        read(dd, split="test")
    both = save_dict(tmp_path / "both", {"a": TEXTS, "b": TEXTS})
    with pytest.raises(DataError, match=r"none is `train` — set `split` to one of: a, b"):
        read(both)


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch, cortex_cli):
    path = save_dataset(tmp_path / "one", TEXTS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(CortexError, match=r"needs the `datasets` package.*pip install 'cortex\[hf\]'"):
        source(path).documents()
    result = cortex_cli("data", "prepare", path, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "pip install 'cortex[hf]'" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- prepare and train


def test_prepare_round_trip(tmp_path):
    path = save_dataset(tmp_path / "one", texts(60))
    tok = ByteTokenizer()
    meta = prepare([("hf", source(path).documents(), None)], tmp_path / "ds", tok, workers=1, val_fraction=0.1)
    assert Counter(split_documents(tmp_path / "ds", tok)) == Counter(texts(60))
    assert meta["splits"]["val"]["documents"] == 6 and meta["sources"]["hf"]["documents_read"] == 60
    total = sum(len(tok.encode(t)) + 1 for t in texts(60))
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total


def test_cli_prepare_recognises_dataset_folders(tmp_path, cortex_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_dict(tmp_path / "dd", {"train": texts(40), "validation": ["held out"]})
    save_dataset(tmp_path / "nulls", ["x", None, "y"])
    result = cortex_cli("data", "prepare", "dd", "nulls", "-o", "prepared", "--skip-bad", "--workers", "2")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["sources"]["dd"]["documents_read"] == 40  # the train split
    assert meta["sources"]["nulls"]["skipped_lines"] == 1
    tok = ByteTokenizer()
    assert Counter(split_documents(tmp_path / "prepared", tok)) == Counter(texts(40) + ["x", "y"])
    bad = cortex_cli("data", "prepare", "nulls", "-o", "again")
    assert bad.exit_code == 1 and "nulls#1: 'text' is null" in bad.output and "Traceback" not in bad.output


def trained(name: str, data, tokens: int) -> str:
    """One block trained on ``data`` for ``tokens`` tokens, quickly, on the CPU."""
    return tiny_manifest(name, seed=0, layers=1, train={
        "data": data, "tokens": tokens, "batch": 8, "lr": 1.0e-2, "warmup": 5, "precision": "fp32", "device": "cpu",
        "eval_every": 0, "eval_batches": 2, "checkpoint_every": 0})


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "event" not in x]


def assert_learned(run: Path, steps: int) -> None:
    loss = losses(run)
    assert len(loss) == steps
    first, last = np.mean(loss[:5]), np.mean(loss[-5:])
    assert last <= 0.5 * first, (first, last)  # ~5.3 -> ~1.6 on this corpus


def assert_trained_on_the_corpus(run: Path, source: str) -> None:
    """60 steps that learned, on exactly the 300 documents of ``texts(300)`` read by ``source``."""
    assert_learned(run, 60)
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["sources"][source]["documents_read"] == 300
    assert Counter(split_documents(run / "data", ByteTokenizer())) == Counter(texts(300))


def test_build_trains_on_a_dataset_dict(tmp_path, cortex_cli):
    path = save_dict(tmp_path / "dd", {"train": texts(300), "validation": texts(10)})
    data = {"type": "hf", "settings": {"path": str(path), "split": "train"}}
    manifest = tmp_path / "hf.yaml"
    manifest.write_text(trained("hf", data, 60 * 8 * 32), encoding="utf-8")
    result = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert_trained_on_the_corpus(tmp_path / "runs" / "hf", source="hf")


def test_train_on_a_prepared_dataset_folder(tmp_path, cortex_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_dataset(tmp_path / "corpus", texts(300))
    assert cortex_cli("data", "prepare", "corpus", "-o", "prepared", "--workers", "1").exit_code == 0
    (tmp_path / "m.yaml").write_text(trained("m", "demo", 10**6), encoding="utf-8")
    result = cortex_cli("train", "m.yaml", "--data", "prepared", "--steps", "60", "-o", "runs")
    assert result.exit_code == 0, result.output
    assert_learned(tmp_path / "runs" / "m", 60)


def test_train_data_option_reads_a_dataset_folder(tmp_path, cortex_cli, monkeypatch):
    """`cortex train --data FOLDER` prepares a Hugging Face dataset folder through the hf source."""
    monkeypatch.chdir(tmp_path)
    save_dataset(tmp_path / "corpus", texts(300))
    (tmp_path / "m.yaml").write_text(trained("m", "demo", 10**6), encoding="utf-8")
    result = cortex_cli("train", "m.yaml", "--data", "corpus", "--steps", "60", "-o", "runs")
    assert result.exit_code == 0, result.output
    assert_trained_on_the_corpus(tmp_path / "runs" / "m", source="corpus")
