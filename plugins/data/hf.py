"""The ``hf`` data source: a local copy of a Hugging Face dataset.

```yaml
train:
  data: {type: hf, settings: {path: data/my-corpus, split: train, text_field: text}}
```

Needs the optional extra: ``pip install 'cortex[hf]'`` (the ``datasets`` package). This
module imports without it; ``datasets`` is imported only when the documents are read.

``path`` is a folder on this machine (``~`` expands; a relative path is relative to the
folder ``cortex`` runs in) holding either

- a dataset written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (it has a
  ``state.json`` or a ``dataset_dict.json``), read with ``datasets.load_from_disk``; or
- a dataset's data files as a download of its repository has them (``*.parquet``,
  ``*.jsonl``, ``*.csv``, ``*.arrow``, splits named by file or folder names such as
  ``data/train-00000-of-00001.parquet``), streamed with ``datasets.load_dataset`` — nothing
  is copied into the Hugging Face cache.

Nothing is ever downloaded: the library is imported and the folder opened with
``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1``. To use a dataset from the Hub, fetch it
on a machine with network access (``load_dataset(NAME).save_to_disk(FOLDER)``, or
``huggingface-cli download NAME --repo-type dataset --local-dir FOLDER``) and copy the folder.

Every row of the split, in order, is one document: the string in the column
``text_field``. Empty strings are left out; a null is an error naming the row unless
``skip_bad`` is set, in which case it is skipped and counted. ``limit`` reads only the
first rows. A saved dataset's own format (``set_format``) does not matter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError, DataError
from cortex.kernel.interfaces import DataSource, Document, Settings
from cortex.runtime.data import RereadableDocuments

INSTALL = "pip install 'cortex[hf]'"
#: the files ``save_to_disk`` writes at the top of its folder
SAVED_MARKERS = ("dataset_dict.json", "state.json")
#: data files that make a folder a dataset repository's local copy
DATA_FILES = ("*.parquet", "*.arrow")
_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_BATCH = 1000


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded (relative paths stay relative to the working directory)."""
    return Path(path).expanduser()


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (no import of ``datasets``)."""
    path = resolve_path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def is_hf_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder the ``hf`` source reads: a saved dataset, or a folder
    with Parquet or Arrow data files in it (at any depth)."""
    path = resolve_path(path)
    if is_saved_dataset(path):
        return True
    return path.is_dir() and any(next(path.rglob(pattern), None) is not None for pattern in DATA_FILES)


@contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face libraries (datasets, hub, transformers) stay offline inside this block."""
    old = {name: os.environ.get(name) for name in _OFFLINE}
    os.environ.update({name: "1" for name in _OFFLINE})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def import_datasets() -> Any:
    """The ``datasets`` module, imported offline; a [`CortexError`][cortex.kernel.errors.CortexError]
    naming the extra to install when it is missing."""
    try:
        with hf_offline():
            import datasets
    except ImportError:
        raise CortexError(
            f"the `hf` data source needs the `datasets` package, which is not installed — {INSTALL}"
        ) from None
    return datasets


def _type_name(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    return str(dtype) if isinstance(dtype, str) else type(feature).__name__


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


class HFDocuments(RereadableDocuments):
    """The documents of one split; ``skipped_at`` holds ``FOLDER[SPLIT]#ROW`` origins."""

    def __init__(self, rows: Callable[[], Iterator[Any]], where: str, settings: HFSource.Settings) -> None:
        super().__init__()
        self._rows = rows
        self.where = where
        self.settings = settings

    def _read(self) -> Iterator[Document]:
        s = self.settings
        self._new_pass()
        found = rows = 0
        for index, text in enumerate(self._rows()):
            if s.limit is not None and index >= s.limit:
                break
            rows += 1
            origin = f"{self.where}#{index}"
            problem = None
            if text is None:
                problem = f"{s.text_field!r} is null"
            elif not isinstance(text, str):
                problem = f"{s.text_field!r} is {type(text).__name__}, expected a string"
            if problem is not None:
                if not s.skip_bad:
                    raise DataError(
                        f"{origin}: {problem} — fix the row, or skip such rows with `skip_bad: true` "
                        "(`--skip-bad` in `cortex data prepare`)"
                    )
                self._skip(origin)
                continue
            if text:
                found += 1
                yield Document(text, origin)
        if not found:
            why = (f"all {self.skipped} rows were null and skipped" if self.skipped
                   else f"all {rows} rows have an empty {s.text_field!r}" if rows else "it has no rows")
            raise DataError(f"{self.where}: no documents ({why}) — check `path`, `split` and `text_field`")

    def __repr__(self) -> str:
        return f"HFDocuments({self.where!r}, text_field={self.settings.text_field!r})"


class HFSource(DataSource):
    """A Hugging Face dataset in a local folder (`save_to_disk`, or its data files); needs `cortex[hf]`."""

    name = "hf"

    class Settings(Settings):
        path: str = Field(..., min_length=1, description="Folder of the dataset (`save_to_disk` output or data files), relative to the current folder.")
        split: str | None = Field(None, min_length=1, description="Split of a dataset with splits (default: `train`, or the only one).")
        text_field: str = Field("text", min_length=1, description="Column holding each document's text.")
        limit: int | None = Field(None, gt=0, description="Read only the first this many rows.")
        skip_bad: bool = Field(False, description="Skip (and count) rows whose text is null instead of failing.")

    @classmethod
    def reads(cls, path: Path) -> Settings | None:
        """A saved dataset or a folder of Parquet/Arrow files (not a prepared Cortex dataset)."""
        if (path.expanduser() / "meta.json").is_file() or not is_hf_dataset(path):
            return None
        return cls.Settings(path=str(path))

    def documents(self) -> HFDocuments:
        s = self.settings
        path = resolve_path(s.path)
        if not path.exists():
            raise DataError(f"{s.path}: no such folder — check `path` in the hf data source settings")
        if not path.is_dir():
            raise DataError(
                f"{s.path}: is a file, not a folder — set `path` to the folder written by `save_to_disk` "
                "(a .jsonl or text file is read by the `jsonl` / `text` sources)"
            )
        datasets = import_datasets()
        if is_saved_dataset(path):
            return self._saved(datasets, path)
        return self._files(datasets, path)

    # ---------------------------------------------------------------- save_to_disk

    def _saved(self, datasets: Any, path: Path) -> HFDocuments:
        s = self.settings
        try:
            with hf_offline():
                loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # the library's own errors name the problem
            raise DataError(f"{s.path}: could not be read as a saved dataset ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = self._split(list(loaded))
            dataset, where = loaded[split], f"{s.path}[{split}]"
        else:
            if s.split is not None:
                raise DataError(
                    f"{s.path}: holds a single dataset without splits, so `split: {s.split}` does not apply "
                    "— remove `split`"
                )
            dataset, where = loaded, s.path
        features = dataset.features
        self._check_field({name: features[name] for name in dataset.column_names})
        dataset = dataset.with_format(None).select_columns([s.text_field])
        field = s.text_field

        def rows() -> Iterator[Any]:
            for batch in dataset.iter(batch_size=_BATCH):
                yield from batch[field]

        return HFDocuments(rows, where, s)

    # ---------------------------------------------------------------- data files

    def _files(self, datasets: Any, path: Path) -> HFDocuments:
        s = self.settings
        try:
            with hf_offline():
                loaded = datasets.load_dataset(str(path), streaming=True)
        except Exception as e:
            raise DataError(
                f"{s.path}: neither a saved dataset (no {' or '.join(SAVED_MARKERS)}) nor a folder of "
                f"data files the `datasets` library reads ({e}) — check `path`"
            ) from None
        split = self._split(list(loaded))
        dataset, where = loaded[split], f"{s.path}[{split}]"
        features = dataset.features
        if features is not None:
            self._check_field(dict(features))
        field = s.text_field

        def rows() -> Iterator[Any]:
            for index, row in enumerate(dataset):
                if field not in row:
                    columns = ", ".join(row) or "none"
                    raise DataError(f"{where}#{index}: no column {field!r} (`text_field`) — columns: {columns}")
                yield row[field]

        return HFDocuments(rows, where, s)

    # ---------------------------------------------------------------- checks

    def _split(self, splits: list[str]) -> str:
        s = self.settings
        available = ", ".join(splits) or "none"
        if s.split is not None:
            if s.split not in splits:
                raise DataError(f"{s.path}: no split {s.split!r} (`split`) — available: {available}")
            return s.split
        if "train" in splits:
            return "train"
        if len(splits) == 1:
            return splits[0]
        raise DataError(f"{s.path}: several splits and none is `train` — set `split` to one of: {available}")

    def _check_field(self, features: dict[str, Any]) -> None:
        s = self.settings
        columns = ", ".join(f"{name} ({_type_name(f)})" for name, f in features.items()) or "none"
        if s.text_field not in features:
            raise DataError(f"{s.path}: no column {s.text_field!r} (`text_field`) — columns: {columns}")
        if not _is_text(features[s.text_field]):
            raise DataError(
                f"{s.path}: column {s.text_field!r} (`text_field`) holds "
                f"{_type_name(features[s.text_field])}, not text — columns: {columns}"
            )


@hookimpl
def cortex_register_components(register):
    register(HFSource)
