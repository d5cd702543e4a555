"""What the file data sources (``jsonl``, ``text``) share: glob expansion, settings, reading."""

from __future__ import annotations

import glob
from pathlib import Path

from typing import Any, Callable, ClassVar

from pydantic import Field

from cortex.kernel.errors import DataError
from cortex.kernel.interfaces import DataSource, Settings
from cortex.runtime.data import DocumentStream


def expand_paths(patterns: list[str]) -> list[Path]:
    """``patterns`` with glob patterns replaced by their (sorted) matches."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern — check the path")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern))
    return paths


class FileSettings(Settings):
    paths: list[str] = Field(..., min_length=1, description="Files or glob patterns, relative to the current folder.")
    skip_bad: bool = Field(False, description="Skip (and count) malformed lines instead of failing.")


class FileSource(DataSource):
    """Files or glob patterns (``paths``), each read by ``reader`` in the order given.
    ``documents()`` returns a re-readable [`DocumentStream`][cortex.runtime.data.DocumentStream]
    with the number of skipped lines in ``skipped``."""

    Settings = FileSettings
    reader: ClassVar[Callable[..., Any]]

    def documents(self) -> DocumentStream:
        return type(self).reader(expand_paths(self.settings.paths), skip_bad=self.settings.skip_bad)
