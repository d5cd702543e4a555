"""Reading text corpora, preparing token datasets, and serving training batches.

Readers
    [`read_jsonl`][cortex.runtime.data.read_jsonl] and [`read_text`][cortex.runtime.data.read_text] yield
    [`Document`][cortex.kernel.interfaces.Document]s whose ``origin`` is ``FILE:LINE``. A bad line
    is an error naming that line unless ``skip_bad`` is set, in which case it is skipped and
    counted. A missing file, a folder, or a file without any document is always an error:
    Cortex never trains on made-up data.

Preparation
    [`prepare`][cortex.runtime.data.prepare] tokenizes sources in worker processes and writes a
    dataset folder::

        train.bin       tokens of the training documents, each followed by <eos>
        val.bin         the same for the validation documents
        meta.json       tokenizer fingerprint, dtype, counts, mix weights
        tokenizer.json  the tokenizer the tokens were made with

    ``*.bin`` are raw little-endian numpy arrays (``uint16`` when the vocabulary fits,
    ``uint32`` otherwise).

Training
    [`TokenDataset`][cortex.runtime.data.TokenDataset] memory-maps a split and serves random
    windows or a resumable sequential stream of windows.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from cortex.kernel.errors import DataError
from cortex.kernel.interfaces import Document

if TYPE_CHECKING:
    import torch

    from cortex.core.tokenizer import Tokenizer

__all__ = [
    "DocumentStream",
    "read_jsonl",
    "read_text",
    "documents_from_path",
    "documents_from_paths",
    "parse_mix",
    "dtype_for_vocab",
    "prepare",
    "TokenDataset",
    "DATASET_VERSION",
]

#: version of the dataset folder layout written by [`prepare`][cortex.runtime.data.prepare]
DATASET_VERSION = 1

_SKIP_HINT = "fix the line or pass --skip-bad"
#: how many skipped-line origins a stream remembers (the count is always exact)
_MAX_REMEMBERED = 20


# --------------------------------------------------------------------------- readers


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file — check the path")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file — pass the files inside it (e.g. {path}/*.jsonl)")


def _lines(path: Path, stream: DocumentStream, skip_bad: bool) -> Iterator[tuple[int, str | None]]:
    """Yield ``(line_number, text)``; ``text`` is None for a skipped undecodable line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{path}:{number}"
                if not skip_bad:
                    raise DataError(f"{where}: invalid UTF-8 at byte {e.start} — {_SKIP_HINT}") from None
                stream._skip(where)
                yield number, None
                continue
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield number, line.rstrip("\r\n")


def _jsonl_documents(path: Path, stream: DocumentStream, skip_bad: bool) -> Iterator[Document]:
    for number, line in _lines(path, stream, skip_bad):
        if line is None or not line.strip():
            continue
        where = f"{path}:{number}"
        problem = None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg} at column {e.colno})"
        except RecursionError:
            problem = "JSON nested too deeply"
        else:
            if not isinstance(obj, dict):
                problem = f'expected a JSON object with a "text" field, got {type(obj).__name__}'
            elif "text" not in obj:
                problem = 'missing the "text" field'
            elif not isinstance(obj["text"], str):
                problem = f'"text" is {type(obj["text"]).__name__}, expected a string'
            else:
                text = obj["text"]
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    problem = '"text" contains an unpaired surrogate escape (e.g. \\ud800)'
        if problem is not None:
            if not skip_bad:
                raise DataError(f"{where}: {problem} — {_SKIP_HINT}")
            stream._skip(where)
            continue
        if text:
            yield Document(text, where)


def _text_documents(path: Path, stream: DocumentStream, skip_bad: bool) -> Iterator[Document]:
    lines: list[str] = []
    first = 0
    for number, line in _lines(path, stream, skip_bad):
        if line is None:
            continue
        if line.strip():
            if not lines:
                first = number
            lines.append(line)
        elif lines:
            yield Document("\n".join(lines), f"{path}:{first}")
            lines = []
    if lines:
        yield Document("\n".join(lines), f"{path}:{first}")


class RereadableDocuments:
    """Documents that can be read again from the start, counting what a pass skipped.

    Iterating starts a new pass (``_read``, written by subclasses); ``skipped`` and
    ``skipped_at`` (the first few origins) describe the latest pass. Also an iterator, as
    ``DataSource.documents()`` promises: ``next()`` continues one pass.
    """

    def __init__(self) -> None:
        self.skipped = 0
        self.skipped_at: list[str] = []
        self._pass: Iterator[Document] | None = None

    def _skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.skipped_at) < _MAX_REMEMBERED:
            self.skipped_at.append(where)

    def _new_pass(self) -> None:
        self.skipped = 0
        self.skipped_at = []

    def __next__(self) -> Document:
        if self._pass is None:
            self._pass = iter(self)
        return next(self._pass)

    def __iter__(self) -> Iterator[Document]:
        return self._read()

    def _read(self) -> Iterator[Document]:
        raise NotImplementedError


class DocumentStream(RereadableDocuments):
    """The documents of one or more files; ``skipped_at`` holds ``FILE:LINE`` origins."""

    def __init__(
        self,
        paths: Sequence[Path],
        reader: Callable[[Path, DocumentStream, bool], Iterator[Document]],
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            _check_file(p)
        self._reader = reader
        self.skip_bad = skip_bad

    def _read(self) -> Iterator[Document]:
        self._new_pass()
        for path in self.paths:
            _check_file(path)
            before = self.skipped
            found = 0
            for doc in self._reader(path, self, self.skip_bad):
                found += 1
                yield doc
            if not found:
                bad = self.skipped - before
                why = f"all {bad} non-blank lines were bad and skipped" if bad else "the file is empty"
                raise DataError(f"{path}: no documents ({why}) — give a file with text in it")

    def __repr__(self) -> str:
        return f"DocumentStream({[str(p) for p in self.paths]}, skip_bad={self.skip_bad})"


def _as_paths(path: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    paths = [Path(p) for p in path]
    if not paths:
        raise DataError("no data files given — pass one or more .jsonl or text files")
    return paths


def read_jsonl(path: Path | Sequence[Path], skip_bad: bool = False) -> DocumentStream:
    """Documents of a JSONL file (or several, in order): one JSON object with a string ``"text"`` per line.

    Blank lines and empty texts are ignored; other fields are ignored. A line that is not
    valid JSON, has no string ``"text"``, or is not valid UTF-8 raises
    ``DataError("FILE:LINE: ... — fix the line or pass --skip-bad")``; with ``skip_bad``
    it is skipped and counted in the stream's ``skipped``.
    """
    return DocumentStream(_as_paths(path), _jsonl_documents, skip_bad)


def read_text(path: Path | Sequence[Path], skip_bad: bool = False) -> DocumentStream:
    """Documents of a plain UTF-8 text file (or several, in order): one document per paragraph.

    Paragraphs are separated by one or more blank (whitespace-only) lines; a paragraph's
    lines are joined with ``"\\n"``, and its origin is the line it starts on. A line that is
    not valid UTF-8 raises ``DataError("FILE:LINE: ...")``; with ``skip_bad`` that line
    alone is dropped and counted.
    """
    return DocumentStream(_as_paths(path), _text_documents, skip_bad)


def documents_from_path(path: Path, skip_bad: bool = False) -> DocumentStream:
    """[`read_jsonl`][cortex.runtime.data.read_jsonl] for ``*.jsonl``, [`read_text`][cortex.runtime.data.read_text] otherwise."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, skip_bad)
    return read_text(path, skip_bad)


class _ChainedStreams:
    def __init__(self, streams: list[DocumentStream]) -> None:
        self.streams = streams

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.streams)

    @property
    def skipped_at(self) -> list[str]:
        return [w for s in self.streams for w in s.skipped_at][:_MAX_REMEMBERED]

    def __iter__(self) -> Iterator[Document]:
        for s in self.streams:
            yield from s


def documents_from_paths(paths: Sequence[Path | str], skip_bad: bool = False) -> Iterable[Document]:
    """The documents of several files in order, each read by extension; counts ``skipped``."""
    if not paths:
        raise DataError("no data files given — pass one or more .jsonl or text files")
    return _ChainedStreams([documents_from_path(Path(p), skip_bad) for p in paths])


# --------------------------------------------------------------------------- mix


def parse_mix(spec: str) -> dict[str, float]:
    """Parse ``"a.jsonl=0.4,b.jsonl=0.6"`` into weights that sum to 1.

    Weights are positive numbers in any scale (``a=2,b=1`` means two thirds and one third).
    """
    if not spec or not spec.strip():
        raise DataError("empty --mix: write it as NAME=WEIGHT,NAME=WEIGHT (e.g. a.jsonl=0.4,b.jsonl=0.6)")
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        name, eq, value = part.rpartition("=")
        name = name.strip()
        if not eq or not name or not value.strip():
            raise DataError(f"--mix entry {part!r} is not NAME=WEIGHT (e.g. a.jsonl=0.4,b.jsonl=0.6)")
        try:
            weight = float(value)
        except ValueError:
            raise DataError(f"--mix entry {part!r}: weight {value.strip()!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"--mix entry {part!r}: weight must be a positive number")
        if name in weights:
            raise DataError(f"--mix names {name!r} twice — give each source once")
        weights[name] = weight
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def _take_share(lengths: np.ndarray, budget: float) -> int:
    """How many leading documents of ``lengths`` come closest to ``budget`` tokens."""
    if len(lengths) == 0:
        return 0
    cum = np.cumsum(lengths)
    k = int(np.searchsorted(cum, budget, side="left"))  # cum[k] >= budget
    if k >= len(cum):
        return len(cum)
    under = cum[k - 1] if k > 0 else 0
    return k if budget - under <= cum[k] - budget else k + 1


def _apply_mix(pools: list[np.ndarray], weights: list[float] | None) -> list[int]:
    """For each source, how many documents of its (shuffled) pool to keep."""
    if weights is None:
        return [len(p) for p in pools]
    # a source with nothing in this pool (e.g. too few documents to hold one out for
    # validation) is left out, and the others keep their relative shares
    available = [float(p.sum()) for p in pools]
    present = [(a, w) for a, w in zip(available, weights) if a > 0]
    if not present:
        return [0 for _ in pools]
    total = min(a / w for a, w in present)
    return [_take_share(p, w * total) if a > 0 else 0 for p, a, w in zip(pools, available, weights)]


# --------------------------------------------------------------------------- prepare


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


_worker_tokenizer: Any = None
_worker_dtype: Any = None


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = tokenizer
    _worker_dtype = np.dtype(dtype)


def _encode_texts(tokenizer: Tokenizer, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``texts`` with ``eos`` after each, and each document's length (eos included)."""
    ids = tokenizer.encode_batch(texts)
    eos = int(tokenizer.eos_id)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(
        chain.from_iterable(chain(x, (eos,)) for x in ids), dtype=np.int64, count=int(lengths.sum())
    )
    if len(flat) and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
        bad = int(flat.max()) if flat.max() >= tokenizer.vocab_size else int(flat.min())
        raise DataError(f"the tokenizer produced id {bad}, outside its vocabulary of {tokenizer.vocab_size}")
    return flat.astype(dtype), lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_texts(_worker_tokenizer, _worker_dtype, texts)


@contextmanager
def _quiet_hf_fork() -> Iterator[None]:
    # HF tokenizers warns in every forked child once the parent has used its thread pool;
    # workers tokenize one chunk at a time anyway, so turn its parallelism off there.
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _chunks(docs: Iterable[Any], name: str, size: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for i, doc in enumerate(docs):
        if isinstance(doc, Document):
            text = doc.text
        elif isinstance(doc, str):
            text = doc
        else:
            raise DataError(f"source {name!r}: item {i} is a {type(doc).__name__}, not a Document")
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(
    chunks: Iterator[list[str]], tokenizer: Tokenizer, dtype: np.dtype, executor: Any, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode chunks in order, inline or with a bounded number of chunks in flight."""
    if executor is None:
        for chunk in chunks:
            yield _encode_texts(tokenizer, dtype, chunk)
        return
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(executor.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _source_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]))


SourceSpec = tuple[str, Union[Iterable[Document], str, Path], Union[float, None]]


def prepare(
    sources: Sequence[SourceSpec],
    out_dir: Path,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.05,
    workers: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    chunk_size: int = 256,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize ``sources`` into the dataset folder ``out_dir`` and return its ``meta.json``.

    Args:
        sources: ``(name, documents, weight)`` triples. ``documents`` is an iterable of
            [`Document`][cortex.kernel.interfaces.Document]s, or a file path read with
            [`documents_from_path`][cortex.runtime.data.documents_from_path] (honouring
            ``skip_bad``). ``weight`` is ``None`` for every source (keep everything) or a
            positive number for every source (a mix, see below).
        out_dir: the dataset folder. An existing dataset (or empty folder) there is
            replaced; any other existing folder is refused.
        tokenizer: appends ``tokenizer.eos_id`` after every document; saved in ``out_dir``.
        val_fraction: share of each source's documents held out for ``val.bin``
            (at least one document when it is above 0 and the source has two or more).
        workers: tokenizer processes; ``1`` tokenizes inline; default ``min(4, cpu count)``.
            The output does not depend on it.
        seed: fixes the train/val split, the mix sample and the document order.
        skip_bad: skip and count bad lines of sources given as paths.
        chunk_size: documents sent to a worker at a time.
        progress: called as ``progress(source_name, documents_done, tokens_done)`` after
            each chunk.

    Mix rule: weights are normalised and give each source's share of the *training tokens*.
    With ``A_i`` the tokens source ``i`` can supply and ``w_i`` its weight, the total is the
    largest one every source can honour without repetition, ``T = min_i A_i / w_i``; from
    each source the documents are taken whole, in a seeded random order, up to the prefix
    whose token count is closest to ``w_i * T``. So the scarcest source is used entirely,
    the others are downsampled, nothing is repeated, and the achieved shares differ from
    the requested ones by at most about one document per source. Validation documents are
    held out first and mixed by the same rule.

    Writes go to a temporary folder beside ``out_dir`` that is renamed into place at the
    end: an error or interruption never leaves a half-written dataset.

    Raises:
        DataError: bad input data (with ``FILE:LINE``), an empty source, bad arguments.
    """
    out_dir = Path(out_dir)
    if not sources:
        raise DataError("no data sources given")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = [s[0] for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"data source names must be unique, got {names}")
    given = [s[2] for s in sources]
    if all(w is None for w in given):
        weights: list[float] | None = None
    elif any(w is None for w in given):
        missing = [n for n, w in zip(names, given) if w is None]
        raise DataError(f"a mix needs a weight for every source; missing for {missing}")
    else:
        if any(not math.isfinite(float(w)) or float(w) <= 0 for w in given):  # type: ignore[arg-type]
            raise DataError(f"mix weights must be positive numbers, got {dict(zip(names, given))}")
        total_w = sum(float(w) for w in given)  # type: ignore[arg-type]
        weights = [float(w) / total_w for w in given]  # type: ignore[arg-type]
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    _check_out_dir(out_dir)

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir_beside(out_dir, "tmp")
    try:
        meta = _prepare_into(
            tmp, sources, weights, tokenizer, dtype,
            val_fraction=val_fraction, workers=workers, seed=seed, skip_bad=skip_bad,
            chunk_size=chunk_size, progress=progress,
        )
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _new_dir_beside(target: Path, tag: str, create: bool = True) -> Path:
    """A fresh hidden name next to ``target`` (created with normal permissions if ``create``)."""
    while True:
        candidate = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        if candidate.exists():
            continue
        if create:
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
        return candidate


#: everything a dataset folder holds; a folder with anything else is never replaced
DATASET_FILES = frozenset({"train.bin", "val.bin", "meta.json", "tokenizer.json"})


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is verifiably a dataset ``prepare`` wrote: its ``meta.json`` is a
    Cortex dataset's, and it holds nothing but a dataset's files."""
    try:
        names = {p.name for p in path.iterdir()}
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "cortex_dataset" in meta and names <= DATASET_FILES


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir}: exists and is not a folder — choose another output folder")
        if any(out_dir.iterdir()) and not is_dataset_dir(out_dir):
            raise DataError(
                f"{out_dir}: folder exists and is not a Cortex dataset (only a folder holding nothing but "
                f"{', '.join(sorted(DATASET_FILES))} is replaced) — choose another output folder or remove it"
            )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        _check_out_dir(out_dir)  # again: the folder may have changed while we tokenized
        old = _new_dir_beside(out_dir, "old", create=False)
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def _prepare_into(
    tmp: Path,
    sources: Sequence[SourceSpec],
    weights: list[float] | None,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    *,
    val_fraction: float,
    workers: int,
    seed: int,
    skip_bad: bool,
    chunk_size: int,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, Any]:
    # 1. tokenize each source into its own temporary token file
    lengths: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    executor = None
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer, dtype.str)
        )
    try:
        with _quiet_hf_fork():
            for index, (name, docs, _) in enumerate(sources):
                if isinstance(docs, (str, Path)):
                    docs = documents_from_path(Path(docs), skip_bad=skip_bad)
                doc_lengths: list[np.ndarray] = []
                done_docs = done_tokens = 0
                with open(tmp / f"source-{index}.bin", "wb") as f:
                    chunks = _chunks(docs, name, chunk_size, max_chars=chunk_size * 4096)
                    for tokens, lens in _encoded_chunks(chunks, tokenizer, dtype, executor, workers):
                        f.write(tokens.tobytes())
                        doc_lengths.append(lens)
                        done_docs += len(lens)
                        done_tokens += int(lens.sum())
                        if progress is not None:
                            progress(name, done_docs, done_tokens)
                if done_docs == 0:
                    raise DataError(f"data source {name!r} has no documents — check its files or settings")
                lengths.append(np.concatenate(doc_lengths))
                skipped[name] = int(getattr(docs, "skipped", 0))
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # 2. hold out validation documents, then apply the mix to each split
    names = [s[0] for s in sources]
    pools: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for name, lens in zip(names, lengths):
        order = _source_rng(seed, name).permutation(len(lens))
        n_val = 0
        if val_fraction > 0 and len(lens) >= 2:
            n_val = min(max(1, round(val_fraction * len(lens))), len(lens) - 1)
        pools["val"].append(order[:n_val])
        pools["train"].append(order[n_val:])
    chosen: dict[str, list[np.ndarray]] = {}
    for split, idx in pools.items():
        keep = _apply_mix([lens[i] for lens, i in zip(lengths, idx)], weights)
        chosen[split] = [i[:k] for i, k in zip(idx, keep)]

    # 3. write each split in a seeded order that interleaves the sources
    offsets = [np.concatenate(([0], np.cumsum(lens))) for lens in lengths]
    maps = [np.memmap(tmp / f"source-{i}.bin", dtype=dtype, mode="r") for i in range(len(sources))]
    split_tokens: dict[str, int] = {}
    for split in ("train", "val"):
        src = np.concatenate([np.full(len(c), s, dtype=np.int64) for s, c in enumerate(chosen[split])])
        doc = np.concatenate([c.astype(np.int64) for c in chosen[split]])
        order = np.random.default_rng(np.random.SeedSequence([seed, 1 if split == "train" else 2])).permutation(len(src))
        written = 0
        with open(tmp / f"{split}.bin", "wb") as f:
            buffer: list[np.ndarray] = []
            buffered = 0
            for j in order:
                s, d = int(src[j]), int(doc[j])
                piece = maps[s][offsets[s][d] : offsets[s][d + 1]]
                buffer.append(piece)
                buffered += len(piece)
                if buffered >= 1 << 20:
                    f.write(np.concatenate(buffer).tobytes())
                    written += buffered
                    buffer, buffered = [], 0
            if buffer:
                f.write(np.concatenate(buffer).tobytes())
                written += buffered
        split_tokens[split] = written
    del maps
    for i in range(len(sources)):
        os.unlink(tmp / f"source-{i}.bin")

    # 4. meta.json and the tokenizer
    per_source: dict[str, Any] = {}
    train_total = split_tokens["train"]
    for s, name in enumerate(names):
        lens = lengths[s]
        entry: dict[str, Any] = {
            "documents_read": int(len(lens)),
            "tokens_read": int(lens.sum()),
            "documents": {sp: int(len(chosen[sp][s])) for sp in ("train", "val")},
            "tokens": {sp: int(lens[chosen[sp][s]].sum()) for sp in ("train", "val")},
            "skipped_lines": skipped[name],
        }
        entry["share_achieved"] = entry["tokens"]["train"] / train_total if train_total else 0.0
        if weights is not None:
            entry["share_requested"] = weights[s]
        per_source[name] = entry
    meta: dict[str, Any] = {
        "cortex_dataset": DATASET_VERSION,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "config": tokenizer.config(),
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id),
        },
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": {
            sp: {"tokens": split_tokens[sp], "documents": int(sum(len(c) for c in chosen[sp]))}
            for sp in ("train", "val")
        },
        "sources": per_source,
        "skipped_lines": int(sum(skipped.values())),
        "mix": {
            "requested": dict(zip(names, weights)) if weights is not None else None,
            "achieved": {n: per_source[n]["share_achieved"] for n in names},
        },
    }
    tokenizer.save(tmp / "tokenizer.json")
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return meta


# --------------------------------------------------------------------------- dataset


class TokenDataset:
    """One split (``train`` or ``val``) of a prepared dataset folder, memory-mapped.

    Args:
        path: the folder written by [`prepare`][cortex.runtime.data.prepare].
        split: ``"train"`` or ``"val"``.
        tokenizer: when given, its fingerprint must be the dataset's.
    """

    def __init__(self, path: Path, split: str = "train", tokenizer: Tokenizer | None = None) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path}: not a prepared dataset (no meta.json) — run `cortex data prepare` first")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{meta_file}: unreadable ({str(e)[:300]}) — re-run `cortex data prepare`") from None
        version = self.meta.get("cortex_dataset")
        if version != DATASET_VERSION:
            raise DataError(
                f"{meta_file}: dataset format {version!r} is not supported (expected "
                f"{DATASET_VERSION}) — re-run `cortex data prepare`"
            )
        if split not in self.meta["splits"]:
            raise DataError(f"{self.path}: no split {split!r}; choose one of {sorted(self.meta['splits'])}")
        self.split = split
        self.fingerprint: str = self.meta["tokenizer"]["fingerprint"]
        if tokenizer is not None and tokenizer.fingerprint != self.fingerprint:
            raise DataError(
                f"{self.path}: the dataset was prepared with another tokenizer "
                f"({self.meta['tokenizer']['config']}, fingerprint {self.fingerprint[:12]}) than "
                f"this one ({tokenizer.config()}, fingerprint {tokenizer.fingerprint[:12]}) — re-run "
                "`cortex data prepare` with this tokenizer, or use the dataset's tokenizer.json"
            )
        self.dtype = np.dtype(self.meta["dtype"])
        bin_file = self.path / f"{split}.bin"
        if not bin_file.is_file():
            raise DataError(f"{bin_file}: missing — the dataset is incomplete; re-run `cortex data prepare`")
        expected = int(self.meta["splits"][split]["tokens"])
        size = bin_file.stat().st_size
        if size != expected * self.dtype.itemsize:
            raise DataError(
                f"{bin_file}: holds {size} bytes, meta.json says {expected} tokens of {self.dtype.name} "
                "— the dataset is damaged; re-run `cortex data prepare`"
            )
        if expected:
            self.tokens = np.memmap(bin_file, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer saved with the dataset."""
        from cortex.core.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer.json")

    def _windows(self, seq_len: int) -> int:
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}")
        n = len(self)
        if n < seq_len + 1:
            hint = "prepare with a val_fraction above 0" if n == 0 and self.split == "val" else "use a shorter context or more data"
            raise DataError(
                f"{self.path}: split {self.split!r} has {n} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1} — {hint}"
            )
        return (n - 1) // seq_len

    def _rows(self, starts: np.ndarray, seq_len: int) -> torch.Tensor:
        import torch

        index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``batch`` random windows of ``seq_len + 1`` tokens, a ``(batch, seq_len + 1)`` LongTensor.

        Inputs are ``x[:, :-1]``, targets ``x[:, 1:]``. The same generator state gives the
        same windows.
        """
        import torch

        self._windows(seq_len)
        high = len(self) - seq_len
        starts = torch.randint(0, high, (batch,), generator=generator).numpy().astype(np.int64)
        return self._rows(starts, seq_len)

    def batches(
        self, batch: int, seq_len: int, start: int = 0, loop: bool = True
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Consecutive windows in file order, yielding ``(position, tensor)``.

        Window ``w`` holds tokens ``[w * seq_len, w * seq_len + seq_len]`` (``seq_len + 1``
        tokens, so every token is a target exactly once per pass). ``position`` is the
        number of window tokens served *including this batch*, i.e. the ``start`` to pass
        to resume right after it (with the same ``seq_len``)::

            for position, x in data.batches(16, 256, start=saved_position):
                train_step(x)
                saved_position = position

        With ``loop`` (the default) the stream wraps around forever and positions keep
        growing; without it, it stops after one pass, the last batch possibly smaller.
        """
        windows = self._windows(seq_len)
        if batch < 1:
            raise DataError(f"batch must be at least 1, got {batch}")
        if start < 0 or start % seq_len:
            raise DataError(f"start position {start} is not a multiple of seq_len {seq_len} — resume with the seq_len the position was saved with")
        w = start // seq_len
        while True:
            if loop:
                count = batch
            else:
                if w >= windows:
                    return
                count = min(batch, windows - w)
            ids = (w + np.arange(count, dtype=np.int64)) % windows
            w += count
            yield w * seq_len, self._rows(ids * seq_len, seq_len)

    def lanes(self, batch: int, seq_len: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Parallel sequential streams, one per batch row, yielding ``(position, tensor)`` forever.

        The split is cut into ``batch`` equal contiguous lanes (the last ``len % batch``
        tokens are unused). Row ``r`` of every batch reads lane ``r`` in order, so row ``r``
        of the next batch continues exactly where row ``r`` of this one ended (its first
        token is this row's last, as in ``batches``): a
        model that carries per-row memory across segments sees each lane as one long
        document stream. ``tensor`` is ``(batch, seq_len + 1)``.

        ``position`` is the number of tokens each lane has advanced *including this batch*
        — pass it as ``start`` to resume right after it (same ``batch`` and ``seq_len``).
        A lane holds ``(lane_len - 1) // seq_len`` windows; after the last one every lane
        starts over from its beginning and positions keep growing.
        """
        if batch < 1:
            raise DataError(f"batch must be at least 1, got {batch}")
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}")
        lane_len = len(self) // batch
        windows = (lane_len - 1) // seq_len if lane_len > 0 else 0
        if windows < 1:
            raise DataError(
                f"{self.path}: split {self.split!r} has {len(self)} tokens, too few for {batch} "
                f"lanes of at least seq_len + 1 = {seq_len + 1} tokens — use more data, a smaller "
                "batch or a shorter context"
            )
        if start < 0 or start % seq_len:
            raise DataError(
                f"start position {start} is not a multiple of seq_len {seq_len} — resume with the "
                "batch and seq_len the position was saved with"
            )
        bases = np.arange(batch, dtype=np.int64) * lane_len
        position = start
        while True:
            offset = (position // seq_len) % windows * seq_len
            position += seq_len
            yield position, self._rows(bases + offset, seq_len)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, split={self.split!r}, tokens={len(self)})"
