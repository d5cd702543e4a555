"""The ``text`` data source: plain UTF-8 text files, a document per paragraph.

```yaml
train:
  data: {type: text, settings: {paths: [data/*.txt], skip_bad: true}}
```

Paths are relative to the current working directory (where ``cortex`` is run) and may be
glob patterns; a pattern that matches nothing is an error. See
[`read_text`][cortex.runtime.data.read_text] for the file format. ``documents()`` returns a
[`DocumentStream`][cortex.runtime.data.DocumentStream]: re-readable, with the number of
skipped lines in ``skipped``.
"""

from __future__ import annotations

from cortex.kernel.interfaces import DataSource
from cortex.runtime.data import DocumentStream, read_text
from cortex_plugins.data._files import FileSettings, expand_paths


class TextSource(DataSource):
    """Plain UTF-8 text files; each paragraph (separated by blank lines) is a document."""

    name = "text"

    class Settings(FileSettings):
        pass

    def documents(self) -> DocumentStream:
        return read_text(expand_paths(self.settings.paths), skip_bad=self.settings.skip_bad)
