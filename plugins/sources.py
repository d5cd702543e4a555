"""File data sources: ``jsonl`` and ``text``.

```yaml
train:
  data: {type: jsonl, settings: {paths: [data/*.jsonl], skip_bad: true}}
```

Paths are relative to the current working directory (where ``cortex`` is run) and may be
glob patterns; a pattern that matches nothing is an error. See
[`read_jsonl`][cortex.data.read_jsonl] and [`read_text`][cortex.data.read_text] for the
file formats. ``documents()`` returns a [`DocumentStream`][cortex.data.DocumentStream]:
re-readable, with the number of skipped lines in ``skipped``.
"""

from __future__ import annotations

import glob
from pathlib import Path

from pydantic import Field

from cortex import hookimpl
from cortex.data import DocumentStream, read_jsonl, read_text
from cortex.errors import DataError
from cortex.interfaces import DataSource, Settings


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


class JsonlSource(DataSource):
    """JSONL files with one ``{"text": ...}`` object per line, read in the order given."""

    name = "jsonl"

    class Settings(FileSettings):
        pass

    def documents(self) -> DocumentStream:
        return read_jsonl(expand_paths(self.settings.paths), skip_bad=self.settings.skip_bad)


class TextSource(DataSource):
    """Plain UTF-8 text files; each paragraph (separated by blank lines) is a document."""

    name = "text"

    class Settings(FileSettings):
        pass

    def documents(self) -> DocumentStream:
        return read_text(expand_paths(self.settings.paths), skip_bad=self.settings.skip_bad)


@hookimpl
def cortex_register_components(register):
    register(JsonlSource)
    register(TextSource)
