"""Tokenizers: a zero-set-up byte tokenizer and a byte-level BPE tokenizer.

Both turn any text into ids and back exactly (``decode(encode(text)) == text``), so no
input is ever lost or replaced by an unknown token. A tokenizer is identified by its
``fingerprint``, the sha256 of a canonical description: datasets and checkpoints record it
so that data prepared with one tokenizer is never fed to a model built with another.

A tokenizer is saved as one ``tokenizer.json`` file. The manifest refers to it by a spec::

    tokenizer: {type: byte}
    tokenizer: {type: bpe, path: tokenizer.json}   # relative to the manifest's folder

and [`config`][cortex.core.tokenizer.Tokenizer.config] returns the spec that reloads a tokenizer
from the folder it was saved in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cortex.kernel.errors import CortexError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "tokenizer_from_spec",
    "TOKENIZER_FILE",
]

#: the file name a tokenizer is saved under inside a folder
TOKENIZER_FILE = "tokenizer.json"

#: special tokens of our tokenizers, in id order after the regular vocabulary
SPECIAL_TOKENS = ("<eos>", "<pad>", "<bos>")

# names that other tokenizer.json files commonly use for the end-of-text token
_EOS_CANDIDATES = ("<eos>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


def _canonical_hash(description: Any) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _target_file(path: Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a folder."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


class Tokenizer:
    """What every tokenizer offers. Subclasses implement the abstract parts.

    Attributes:
        vocab_size: number of ids, special tokens included; every id is ``< vocab_size``.
        eos_id: the end-of-document id, appended after each document by data preparation.
    """

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``. Special-token names in ``text`` are plain text."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts; subclasses may do it faster than one at a time."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``, leaving out special tokens.

        Never raises on an incomplete UTF-8 sequence: it becomes U+FFFD.
        """
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The manifest spec that reloads this tokenizer from the folder it was saved in."""
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        """A complete, canonical description of this tokenizer (what the fingerprint hashes)."""
        raise NotImplementedError

    def to_json(self) -> str:
        """The text of this tokenizer's ``tokenizer.json``."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the canonical description: equal tokenizers share it."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = _canonical_hash(self.description())
            self.__dict__["_fingerprint"] = cached
        return cached

    def save(self, path: Path) -> Path:
        """Write ``tokenizer.json`` atomically; ``path`` is a file, or a folder to write it in.

        Returns the file written.
        """
        target = _target_file(Path(path))
        _write_atomic(target, self.to_json())
        return target

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<eos>`` = 256, ``<pad>`` = 257, ``<bos>`` = 258.

    Needs no training and round-trips every text exactly. Ids of 256 and above are
    special and left out by [`decode`][cortex.core.tokenizer.ByteTokenizer.decode].
    """

    VERSION = 1

    def __init__(self) -> None:
        self.eos_id = 256
        self.pad_id = 257
        self.bos_id = 258
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(i for i in (int(x) for x in ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def config(self) -> dict[str, Any]:
        return {"type": "byte"}

    def description(self) -> dict[str, Any]:
        return {
            "cortex_tokenizer": "byte",
            "version": self.VERSION,
            "special_tokens": {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)},
        }

    def to_json(self) -> str:
        return json.dumps(self.description(), indent=2, ensure_ascii=False) + "\n"


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``, normally a byte-level BPE from [`train_bpe`][cortex.runtime.bpe.train_bpe].

    Any ``tokenizer.json`` with an end-of-text special token (``<eos>``, ``</s>``,
    ``<|endoftext|>``, ...) can be wrapped. Special-token names inside input text are
    encoded as ordinary text, so user data can never inject an ``<eos>``.
    """

    def __init__(self, hf_tokenizer: Any, source: Path | None = None) -> None:
        self._hf = hf_tokenizer
        self._hf.encode_special_tokens = True
        #: the file this tokenizer was loaded from or last saved to, if any
        self.source = source
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        eos = None
        for name in _EOS_CANDIDATES:
            eos = hf_tokenizer.token_to_id(name)
            if eos is not None:
                break
        if eos is None:
            where = f"{source}: " if source else ""
            raise CortexError(
                f"{where}the tokenizer has no end-of-text token (one of "
                f"{', '.join(_EOS_CANDIDATES)}) — add one as a special token, or train a "
                "tokenizer with `cortex tokenizer train`"
            )
        self.eos_id = int(eos)

    @property
    def hf(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._hf

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hf"] = self._hf.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        state = dict(state)
        hf = HFTokenizer.from_str(state.pop("_hf"))
        hf.encode_special_tokens = True
        self.__dict__.update(state)
        self._hf = hf

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def config(self) -> dict[str, Any]:
        return {"type": "bpe", "path": TOKENIZER_FILE}

    def description(self) -> dict[str, Any]:
        return {"cortex_tokenizer": "hf", "tokenizer": json.loads(self._hf.to_str())}

    def to_json(self) -> str:
        return self._hf.to_str(pretty=True)

    def save(self, path: Path) -> Path:
        target = super().save(path)
        self.source = target
        return target


def new_bpe(vocab_size: int) -> tuple[Any, Any]:
    """An empty byte-level BPE and its trainer for at most ``vocab_size`` ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return hf, trainer


#: the smallest vocabulary a byte-level BPE can have: 256 bytes plus the special tokens
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a ``tokenizer.json``: ours (``{"cortex_tokenizer": "byte", ...}``) or any Hugging Face one.

    ``path`` is the file, or a folder holding ``tokenizer.json``.

    Raises:
        CortexError: the file is missing or is not a tokenizer; the message names it.
    """
    target = _target_file(Path(path))
    if not target.is_file():
        raise CortexError(
            f"{target}: tokenizer file not found — train one with "
            f"`cortex tokenizer train FILES -o {target}` or use `tokenizer: {{type: byte}}`"
        )
    try:
        text = target.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CortexError(
            f"{target}: not a readable tokenizer file ({e}) — re-create it with "
            "`cortex tokenizer train`"
        ) from e
    if not isinstance(data, dict):
        raise CortexError(f"{target}: not a tokenizer file (expected a JSON object) — re-create it with `cortex tokenizer train`")
    kind = data.get("cortex_tokenizer")
    if kind == "byte":
        if data.get("version") != ByteTokenizer.VERSION:
            raise CortexError(
                f"{target}: byte tokenizer version {data.get('version')!r} is not supported "
                f"(this Cortex reads version {ByteTokenizer.VERSION}) — upgrade Cortex or re-save it"
            )
        return ByteTokenizer()
    if kind is not None:
        raise CortexError(f"{target}: unknown cortex_tokenizer {kind!r} — expected 'byte' or a Hugging Face tokenizer.json")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exceptions
        raise CortexError(
            f"{target}: not a valid tokenizer.json ({e}) — re-create it with `cortex tokenizer train`"
        ) from e
    return BPETokenizer(hf, source=target)


def tokenizer_from_spec(spec: Mapping[str, Any] | Any, base_dir: Path) -> Tokenizer:
    """Build the tokenizer of a manifest spec: ``{"type": "byte"}`` or ``{"type": "bpe", "path": ...}``.

    A relative ``path`` is resolved against ``base_dir`` (the manifest's folder).
    """
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(exclude_none=True)
    if not isinstance(spec, Mapping):
        raise CortexError(f"tokenizer spec must be a mapping like {{type: byte}}, got {spec!r}")
    spec = {k: v for k, v in spec.items() if v is not None}
    kind = spec.pop("type", None)
    if kind == "byte":
        if spec:
            raise CortexError(f"tokenizer type 'byte' takes no settings, got {sorted(spec)}")
        return ByteTokenizer()
    if kind == "bpe":
        path = spec.pop("path", None)
        if spec:
            raise CortexError(f"tokenizer type 'bpe' takes only 'path', got also {sorted(spec)}")
        if not path:
            raise CortexError("tokenizer type 'bpe' needs a path, e.g. {type: bpe, path: tokenizer.json}")
        full = Path(path)
        if not full.is_absolute():
            full = Path(base_dir) / full
        return load_tokenizer(full)
    raise CortexError(f"unknown tokenizer type {kind!r} — use 'byte' or 'bpe'")
