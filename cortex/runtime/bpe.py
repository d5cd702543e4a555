"""Training a byte-level BPE tokenizer on the documents of files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from cortex.core.tokenizer import MIN_BPE_VOCAB, SPECIAL_TOKENS, BPETokenizer, new_bpe
from cortex.kernel.errors import CortexError, DataError
from cortex.runtime.data import documents_from_path


def train_bpe(files: Sequence[Path], vocab_size: int, out: Path) -> BPETokenizer:
    """Train a byte-level BPE tokenizer on ``files`` and save it to ``out``.

    ``files`` are JSONL (``{"text": ...}`` per line, chosen by the ``.jsonl`` extension) or
    plain text files, read with [`documents_from_path`][cortex.runtime.data.documents_from_path].
    The vocabulary has at most ``vocab_size`` ids (fewer when the corpus is too small to
    learn that many merges). ``out`` is a file, or a folder to write ``tokenizer.json`` in.

    Raises:
        CortexError: no files, a vocabulary smaller than ``MIN_BPE_VOCAB``, or a corpus
            without any text (a [`DataError`][cortex.kernel.errors.DataError]).
    """
    files = [Path(f) for f in files]
    if not files:
        raise CortexError("no training files given — pass one or more .jsonl or text files")
    if vocab_size < MIN_BPE_VOCAB:
        raise CortexError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); try 8000"
        )
    streams = [documents_from_path(f) for f in files]  # checks every file up front
    count = 0

    def texts() -> Iterable[str]:
        nonlocal count
        for stream in streams:
            for doc in stream:
                if doc.text:
                    count += 1
                    yield doc.text

    hf, trainer = new_bpe(vocab_size)
    hf.train_from_iterator(texts(), trainer)
    if count == 0:
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: the corpus has no text — give files with documents in them")
    tok = BPETokenizer(hf)
    tok.save(Path(out))
    return tok
