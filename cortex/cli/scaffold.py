"""Scaffolding: a commented first manifest (``cortex init``) and a plugin package
(``cortex plugin new``).

Both write atomically: the manifest through a temporary file linked into place, the
package into a temporary directory renamed into place. Neither ever overwrites anything.
What they write is checked before it is written: the manifest validates against the
installed components, and the package's Python compiles.

The files written are rendered from ``string.Template`` files under ``cortex/cli/templates/``
(package data, read with ``importlib.resources``): ``init/`` for the manifest, ``plugin/`` for
the package, whose paths name the package folder ``__ns__``. They are kept as files rather than
generated from ``examples/third_party_plugin`` because that example is a different, larger plugin
(a Hopfield tier and an Oja rule that the tutorial walks through), so deriving this minimal
one-tier package from it would mean rewriting its code, not renaming it.

This module imports neither torch nor the plugins, so ``cortex init`` starts fast.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from string import Template

from cortex.kernel.errors import CortexError

# --------------------------------------------------------------------------- cortex init

#: preset shapes: the core, a training budget, and the memory tiers' capacities
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 64, "layers": 2, "heads": 2, "context": 64, "batch": 8, "tokens": 200_000,
             "documents": 2_000, "warmup": 20, "eval_every": 50, "checkpoint_every": 100,
             "stm": 32, "ltm": 2_000},
    "small": {"dim": 128, "layers": 4, "heads": 4, "context": 128, "batch": 16, "tokens": 2_000_000,
              "documents": 10_000, "warmup": 50, "eval_every": 100, "checkpoint_every": 200,
              "stm": 64, "ltm": 10_000},
    "base": {"dim": 256, "layers": 6, "heads": 8, "context": 256, "batch": 32, "tokens": 20_000_000,
             "documents": 40_000, "warmup": 100, "eval_every": 200, "checkpoint_every": 500,
             "stm": 64, "ltm": 100_000},
}

#: what a size costs, for the prompt
SIZE_HELP = {
    "tiny": "about 0.1M parameters, trains in a minute or two on a laptop CPU",
    "small": "about 1M parameters, tens of minutes on a CPU",
    "base": "about 5M parameters, hours on a CPU, minutes on a GPU",
}


@dataclass(frozen=True)
class InitOptions:
    """The answers ``cortex init`` asks for."""

    name: str = "my-model"
    size: str = "tiny"
    memory: bool = True
    train: bool = True


@cache
def _template(path: str) -> Template:
    """The template file ``cortex/cli/templates/<path>`` (``/``-separated)."""
    resource = files(__package__).joinpath("templates")
    for part in path.split("/"):  # one part at a time: joinpath takes one argument before Python 3.11
        resource = resource.joinpath(part)
    return Template(resource.read_text(encoding="utf-8"))


_COMMENT_COLUMN = 27  # comments start in this column


def _pad(key: str, value: object, indent: int) -> str:
    """Spaces that put the comment after ``key: value`` in the comment column."""
    used = indent + len(key) + 2 + len(str(value))
    return " " * max(1, _COMMENT_COLUMN - used)


def _fill(template: Template, values: dict[str, object], indents: dict[str, int]) -> str:
    pads = {f"{k}_pad": _pad(k if k not in ("stm", "ltm") else "capacity", values[k], i) for k, i in indents.items()}
    return template.substitute({**values, **pads})


def manifest_text(options: InitOptions, file: str = "manifest.yaml") -> str:
    """The commented manifest for ``options`` (not yet validated)."""
    if options.size not in SIZES:
        raise CortexError(f"unknown size {options.size!r}; choose one of {', '.join(SIZES)}")
    size = SIZES[options.size]
    train_note = ", then train it into runs/" + options.name if options.train else ""
    values = {**size, "name": options.name, "size": options.size, "file": file, "train_note": train_note}
    text = _fill(_template("init/manifest.yaml.tmpl"), values,
                 {"name": 0, "dim": 2, "layers": 2, "heads": 2, "context": 2})
    if options.memory:  # each optional section follows a blank line
        text += "\n" + _fill(_template("init/memory.yaml.tmpl"), size, {"stm": 6, "ltm": 6})
    if options.train:
        text += "\n" + _fill(_template("init/train.yaml.tmpl"), size,
                             {k: 2 for k in ("tokens", "batch", "warmup", "eval_every", "checkpoint_every")})
    return text


def check_run_name(name: str) -> str:
    from cortex.kernel.manifest import RUN_NAME

    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise CortexError(f"{name!r} is not a valid model name: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    return name


def init_manifest(path: Path, options: InitOptions) -> Path:
    """Write the manifest for ``options`` to ``path`` (a file, or a folder that gets
    ``<name>.yaml``), after validating it. Refuses to replace an existing file."""
    from cortex.kernel.manifest import load_manifest_text

    check_run_name(options.name)
    path = Path(path)
    if path.is_dir():
        path = path / f"{options.name}.yaml"
    if path.exists():
        raise CortexError(f"{path} already exists; choose another path (cortex init never overwrites)")
    text = manifest_text(options, path.name)
    load_manifest_text(text, str(path))  # raises ManifestError: a bug here, never the user's
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_new_file(path, text)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_new_file(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and link it to ``path``: all or nothing, no clobbering."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a manifest is not
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile
        except FileExistsError:
            raise CortexError(f"{path} already exists; choose another path") from None
        except OSError:  # no hard links on this file system
            if path.exists():
                raise CortexError(f"{path} already exists; choose another path") from None
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------- cortex plugin new

PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")


def check_plugin_name(name: str) -> str:
    """A plugin name is its Python package and its namespace: ``demo_tier``, ``hopfield``."""
    if not PLUGIN_NAME.fullmatch(name) or keyword.iskeyword(name):
        raise CortexError(
            f"{name!r} cannot name a plugin: use a lower-case Python identifier (letters, digits, '_'), "
            "e.g. demo_tier; it becomes the package name and the namespace of the plugin's components"
        )
    if name in ("cortex", "cortex_plugins") or name.startswith("cortex_"):
        raise CortexError(f"{name!r} cannot name a plugin: Cortex's own packages are named cortex*, and the "
                          f"distribution is called cortex-<name> anyway — try {name.removeprefix('cortex_') or 'my_plugin'!r}")
    if name in sys.stdlib_module_names or name in ("torch", "numpy", "faiss", "test", "tests"):
        raise CortexError(f"{name!r} cannot name a plugin: a package of that name would shadow the module "
                          f"{name!r} that Python or Cortex imports; choose a name of your own, e.g. my_{name}")
    if _is_builtin_entry_point(name):
        raise CortexError(f"{name!r} cannot name a plugin: it is the name of a built-in Cortex plugin; "
                          f"choose another, e.g. my_{name}")
    return name


def _is_builtin_entry_point(name: str) -> bool:
    from importlib import metadata

    return any(ep.name == name and ep.dist is not None and ep.dist.metadata["Name"].lower() == "cortex"
               for ep in metadata.entry_points(group="cortex.plugins"))


def distribution_name(name: str) -> str:
    """The distribution (pip) name of plugin ``name``: ``demo_tier`` -> ``cortex-demo-tier``."""
    return "cortex-" + name.replace("_", "-")


#: the files of a new plugin package, in the order they are listed, as paths under
#: ``templates/plugin/`` less ``.tmpl``; ``__ns__`` is the package folder
PLUGIN_TEMPLATES = (
    "pyproject.toml",
    "README.md",
    "src/__ns__/__init__.py",
    "src/__ns__/plugin.py",
    "src/__ns__/tiers.py",
    "tests/test_plugin.py",
)


def plugin_files(name: str) -> dict[str, str]:
    """Relative path -> text of every file of plugin package ``name``."""
    check_plugin_name(name)
    values = {"ns": name, "dist": distribution_name(name)}
    return {
        path.replace("__ns__", name): _template(f"plugin/{path}.tmpl").substitute(values).rstrip("\n") + "\n"
        for path in PLUGIN_TEMPLATES
    }


def new_plugin(name: str, output: Path = Path(".")) -> Path:
    """Write the package of plugin ``name`` to ``output/name``; never replaces anything."""
    files = plugin_files(name)
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")  # a template bug must never reach the user's disk
    dest = Path(output) / name
    if dest.exists():
        raise CortexError(f"{dest} already exists; choose another name or -o folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        for path, text in files.items():
            target = tmp / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        if dest.exists():
            raise CortexError(f"{dest} already exists; choose another name or -o folder")
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise CortexError(f"cannot create {dest}: {exc.strerror}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
