"""The ``text`` data source: plain UTF-8 text files, a document per paragraph.

```yaml
train:
  data: {type: text, settings: {paths: [data/*.txt], skip_bad: true}}
```

Paths are relative to the current working directory (where ``cortex`` is run) and may be
glob patterns; a pattern that matches nothing is an error. See
[`read_text`][cortex.runtime.data.read_text] for the file format.
"""

from __future__ import annotations

from cortex.runtime.data import read_text
from cortex_plugins.data._files import FileSource


class TextSource(FileSource):
    """Plain UTF-8 text files; each paragraph (separated by blank lines) is a document."""

    name = "text"
    reader = staticmethod(read_text)
