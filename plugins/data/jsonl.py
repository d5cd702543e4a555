"""The ``jsonl`` data source: JSONL files of ``{"text": ...}`` objects.

```yaml
train:
  data: {type: jsonl, settings: {paths: [data/*.jsonl], skip_bad: true}}
```

Paths are relative to the current working directory (where ``cortex`` is run) and may be
glob patterns; a pattern that matches nothing is an error. See
[`read_jsonl`][cortex.runtime.data.read_jsonl] for the file format. ``documents()`` returns a
[`DocumentStream`][cortex.runtime.data.DocumentStream]: re-readable, with the number of
skipped lines in ``skipped``.
"""

from __future__ import annotations

from cortex.kernel.interfaces import DataSource
from cortex.runtime.data import DocumentStream, read_jsonl
from cortex_plugins.data._files import FileSettings, expand_paths


class JsonlSource(DataSource):
    """JSONL files with one ``{"text": ...}`` object per line, read in the order given."""

    name = "jsonl"

    class Settings(FileSettings):
        pass

    def documents(self) -> DocumentStream:
        return read_jsonl(expand_paths(self.settings.paths), skip_bad=self.settings.skip_bad)
