"""Manifest files as users load them: environment values, command-line overrides, and a
check that the model fits this machine, on top of the kernel's validation.

- ``${NAME}`` in a string value reads the environment variable ``NAME``; an unset one is a
  problem naming it.
- ``--set KEY.PATH=VALUE`` (``overrides``) changes a value; its problems name the option.
- Where either changed anything, the manifest text kept with a run is the result, with a
  comment saying how it was made.
- A model or a tier whose floats alone would not fit in this machine's memory is refused
  here, instead of failing to allocate later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from cortex.kernel.manifest import (
    FieldPath,
    Manifest,
    ManifestError,
    Problem,
    ResolvedComponent,
    Source,
    ValidatedManifest,
    dotted,
    read_source,
    validate,
)
from cortex.kernel.plugins import create_plugin_manager


def load_manifest(path: str | Path, *, plugins: Any = None, overrides: list[str] = (),
                  loggers: list[str] = ()) -> ValidatedManifest:
    """Read ``path``, fill in ``${NAME}`` values, apply ``overrides``, add ``loggers`` (``--log``)
    to ``train.loggers`` and validate, reporting every problem at once with its position (or
    its option)."""
    src = read_source(path)
    changed = interpolate_environment(src)
    if src.problems:  # an unset variable: what is checked with its ${NAME} left in would only confuse
        raise ManifestError(src.problems)
    apply_overrides(src, list(overrides))
    add_loggers(src, list(loggers))
    if (changed or overrides or loggers) and not src.problems:
        given = "".join(f" --set {o}" for o in overrides) + "".join(f" --log {name}" for name in loggers)
        src.text = (f"# {path}{given}, with the environment's values filled in\n"
                    + yaml.safe_dump(src.data, sort_keys=False, allow_unicode=True))
    built = validate(src, Path(path), plugins=plugins)
    fits_this_machine(src, built.manifest, built.components)
    if src.problems:
        raise ManifestError(src.problems)
    return built


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate_environment(src: Source) -> bool:
    """Replace ``${NAME}`` in string values by the environment variable ``NAME``; an unset
    variable is a problem naming it. Returns whether anything was replaced."""
    found = False

    def walk(value: Any, path: FieldPath) -> Any:
        nonlocal found
        if isinstance(value, dict):
            return {k: walk(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or not _ENV.search(value):
            return value
        found = True

        def variable(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                note = comment_above(src, path)
                src.problem(path, f"environment variable {name} is not set — set it (export {name}=...) "
                                  "or write the value into the manifest" + (f"; the manifest says: {note}" if note else ""))
                return match.group(0)
            return os.environ[name]

        return _ENV.sub(variable, value)

    src.data = walk(src.data, ())
    return found


def comment_above(src: Source, path: FieldPath) -> str:
    """The comment lines right above the line of ``path`` in the manifest, joined (how to get
    a value, say), or ``""``."""
    lines = src.text.splitlines()
    above = []
    for line in reversed(lines[: src.position(path)[0] - 1]):
        if not line.strip().startswith("#"):
            break
        above.insert(0, line.strip().lstrip("#").strip())
    return " ".join(part for part in above if part)


def apply_overrides(src: Source, overrides: list[str]) -> None:
    """Apply ``KEY.PATH=VALUE`` settings from the command line (``--set``) to ``src``.

    ``VALUE`` is read as YAML (``1e-3``, ``[1, 2]``, ``true``); a number in the path indexes
    a list (``memory.0.settings.capacity=128``). Validation then checks the result with the
    manifest's own messages, which name the option instead of a line.
    """
    if not isinstance(src.data, dict):
        return
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        if not sep or not all(str(p) for p in parts):
            src.problems.append(Problem("--set", 0, 0, key, "expected KEY.PATH=VALUE, e.g. train.tokens=1000000"))
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        path = tuple(parts)
        node: Any = src.data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            elif isinstance(node, dict):
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                    src.overridden.add(path[: i + 1])  # a section the option made
                node = node[part]
            else:
                src.problems.append(Problem("--set", 0, 0, dotted(path[: i + 1]), "no such list item or section"))
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and isinstance(last, int) and last < len(node):
                node[last] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                src.problems.append(Problem("--set", 0, 0, dotted(path), "no such list item or section"))
                continue
            src.overridden.add(path)


def add_loggers(src: Source, names: list[str]) -> None:
    """Add the loggers ``names`` (``--log NAME``) to ``train.loggers``, each once."""
    if not names or not isinstance(src.data, dict):
        return
    train = src.data.get("train")
    if not isinstance(train, dict):
        src.problems.append(Problem("--log", 0, 0, "", "the manifest has no `train:` section, so nothing is "
                                                       "trained or logged; add one"))
        return
    given = train.get("loggers") if isinstance(train.get("loggers"), list) else []
    present = {item.get("type") if isinstance(item, dict) else item for item in given}
    train["loggers"] = given + [name for name in dict.fromkeys(names) if name not in present]


def fits_this_machine(src: Source, m: Manifest, components: list[ResolvedComponent]) -> None:
    """Refuse a model or a memory tier whose floats alone would not fit in this machine's
    memory, at validation instead of as an allocation failure later."""
    ram = _physical_memory()
    if ram is None:
        return
    d = m.model.dim
    hidden = int(d * m.model.mlp_ratio)
    weights = 4 * (m.model.layers * (4 * d * d + 2 * d * hidden) + 65536 * d)  # fp32, a large vocabulary
    rope = 4 * m.model.context * (d // m.model.heads)  # the rotary table: context x head_dim/2 complex
    if weights + rope > ram:
        src.problem(("model",), f"needs about {_size(weights + rope)} for its weights and position table "
                                f"alone; this machine has {_size(ram)} — lower dim, layers or context")
    for c in components:
        capacity = getattr(c.settings, "capacity", None)
        if c.section == "memory" and isinstance(capacity, int) and 8 * capacity * d > ram:
            src.problem((c.section, c.index, "settings", "capacity"),
                        f"{capacity} entries of a key and a value of {d} floats need about "
                        f"{_size(8 * capacity * d)}; this machine has {_size(ram)}")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} B"


def json_schema() -> dict[str, Any]:
    """JSON schema of the manifest, plus the settings schema of every registered component."""
    schema = Manifest.model_json_schema()
    pm = create_plugin_manager(strict=False)
    schema["x-cortex-components"] = {
        f"{info.kind}:{info.name}": info.cls.Settings.model_json_schema() for info in pm.registry
    }
    return schema
