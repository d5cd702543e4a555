"""The documentation cannot fall behind the code: every hook is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pluggy

from cortex.kernel import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if name.startswith("cortex_") and hasattr(fn, "cortex_spec")]


def test_every_hook_has_a_docstring_and_a_reference_entry():
    page = (ROOT / "docs/reference/hooks.md").read_text(encoding="utf-8")
    names = hook_names()
    assert "cortex_register_components" in names and "cortex_register_commands" in names
    for name in names:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
        assert f"::: cortex.kernel.hookspecs.{name}" in page, f"{name} is missing from docs/reference/hooks.md"


def test_every_hook_is_named_with_the_prefix_and_typed():
    pm = pluggy.PluginManager("cortex")
    pm.add_hookspecs(hookspecs)
    for name in hook_names():
        signature = inspect.signature(getattr(hookspecs, name))
        assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name
        assert signature.return_annotation is not inspect.Signature.empty, name
    assert sorted(pm.hook.__dict__) == sorted(hook_names())


def test_every_page_in_the_nav_exists():
    import yaml

    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    text = text.replace("!!python/name:", "")  # the mermaid fence's formatter reference
    config = yaml.safe_load(text)

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    for page in pages(config["nav"]):
        assert (ROOT / "docs" / page).is_file(), page
