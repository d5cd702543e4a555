"""The ``sources`` entry point: registers the file data sources ``jsonl`` and ``text``."""

from __future__ import annotations

from cortex import hookimpl
from cortex_plugins.data.jsonl import JsonlSource
from cortex_plugins.data.text import TextSource


@hookimpl
def cortex_register_components(register):
    register(JsonlSource)
    register(TextSource)
