"""What the file data sources share: glob expansion and their settings."""

from __future__ import annotations

import glob
from pathlib import Path

from pydantic import Field

from cortex.kernel.errors import DataError
from cortex.kernel.interfaces import Settings


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
