"""The ``jsonl`` data source: JSONL files of ``{"text": ...}`` objects.

```yaml
train:
  data: {type: jsonl, settings: {paths: [data/*.jsonl], skip_bad: true}}
```

Paths are relative to the current working directory (where ``cortex`` is run) and may be
glob patterns; a pattern that matches nothing is an error. See
[`read_jsonl`][cortex.runtime.data.read_jsonl] for the file format.
"""

from __future__ import annotations

from cortex.runtime.data import read_jsonl
from cortex_plugins.data._files import FileSource


class JsonlSource(FileSource):
    """JSONL files with one ``{"text": ...}`` object per line, read in the order given."""

    name = "jsonl"
    reader = staticmethod(read_jsonl)
