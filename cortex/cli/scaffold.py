"""Scaffolding: a commented first manifest (``cortex init``) and a plugin package
(``cortex plugin new``).

Both write atomically: the manifest through a temporary file linked into place, the
package into a temporary directory renamed into place. Neither ever overwrites anything.
What they write is checked before it is written: the manifest validates against the
installed components, and the package's Python compiles.

This module imports neither torch nor the plugins, so ``cortex init`` starts fast.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
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


_MANIFEST = Template("""\
# $name: written by `cortex init` ($size preset). Every key is explained in the
# manifest reference (docs/reference/manifest.md); `cortex schema` prints all of them.
#
#   cortex validate $file      check it (every problem at once, as FILE:LINE:COL)
#   cortex build $file         assemble the model$train_note
cortex: 1                  # schema version of the manifest
name: $name$name_pad# the run directory will be runs/$name
seed: 0                    # initialisation and data order

model:                     # the transformer core (decoder-only, RoPE, pre-norm)
  dim: $dim$dim_pad# width of the residual stream
  layers: $layers$layers_pad# transformer blocks
  heads: $heads$heads_pad# attention heads; dim / heads must be even
  context: $context$context_pad# tokens the model sees at once

tokenizer: {type: byte}    # UTF-8 bytes: Korean and English with no set-up;
                           # or {type: bpe, path: tokenizer.json} (`cortex tokenizer train`)
$memory$train""")

_MEMORY = Template("""
memory:                    # memory tiers, in hand-over order (stm -> ltm)
  - type: stm              # short-term memory: a small exact buffer per stream
    settings:
      capacity: $stm$stm_pad# slots per stream
      consolidate_after: 3 # uses after which an entry moves on to ltm
  - type: ltm              # long-term memory: a FAISS index per stream
    settings:
      capacity: $ltm$ltm_pad# entries at most, over all streams
      index: flat          # flat (exact) | ivf | hnsw

memory_system:             # how the model writes, reads and consolidates its tiers
  read: [knn_lm]           # kNN-LM: training-free; add knn_attention with model.memory_layers
  k: 8                     # neighbours read per tier
  consolidate: step        # hand entries down at every step end, or only in `sleep`
""")

_TRAIN = Template("""
train:                     # with this section, `cortex build` also trains the model
  data: {type: demo, settings: {documents: $documents}}   # the bundled bilingual corpus;
                           # or a .jsonl / .txt file, or a folder from `cortex data prepare`
  tokens: $tokens$tokens_pad# training tokens; steps = tokens / (batch x context)
  batch: $batch$batch_pad# sequences per optimiser step
  lr: 2.0e-3               # peak learning rate (AdamW), warm-up then cosine decay
  warmup: $warmup$warmup_pad# warm-up steps
  precision: auto          # bf16 where the hardware runs it fast, else fp32
  eval_every: $eval_every$eval_every_pad# validation loss every N steps; the best model is kept
  checkpoint_every: $checkpoint_every$checkpoint_every_pad# resumable checkpoints (`cortex train RUN --resume auto`)
""")

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
    memory = _fill(_MEMORY, size, {"stm": 6, "ltm": 6}) if options.memory else ""
    train = _fill(_TRAIN, size, {k: 2 for k in ("tokens", "batch", "warmup", "eval_every",
                                                 "checkpoint_every")}) if options.train else ""
    train_note = ", then train it into runs/" + options.name if options.train else ""
    values = {**size, "name": options.name, "size": options.size, "file": file, "memory": memory,
              "train": train, "train_note": train_note}
    return _fill(_MANIFEST, values, {"name": 0, "dim": 2, "layers": 2, "heads": 2, "context": 2})


def check_run_name(name: str) -> str:
    from cortex.kernel.manifest import RUN_NAME

    if not RUN_NAME.match(name) or name in (".", ".."):
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
    if not PLUGIN_NAME.match(name) or keyword.iskeyword(name) or name in ("cortex", "cortex_plugins", "test", "tests"):
        raise CortexError(
            f"{name!r} cannot name a plugin: use a lower-case Python identifier (letters, digits, '_'), "
            "e.g. demo_tier; it becomes the package name and the namespace of the plugin's components"
        )
    return name


def distribution_name(name: str) -> str:
    """The distribution (pip) name of plugin ``name``: ``demo_tier`` -> ``cortex-demo-tier``."""
    return "cortex-" + name.replace("_", "-")


_PYPROJECT = Template("""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A Cortex plugin: the $ns.recent memory tier"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["cortex>=0.1"]

# The entry point's name ($ns) is the namespace of every component the plugin
# registers: the tier below is used in a manifest as `type: $ns.recent`.
[project.entry-points."cortex.plugins"]
$ns = "$ns.plugin"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
""")

_INIT = Template('''\
"""$dist: a Cortex plugin (components under the `$ns.` namespace)."""

__version__ = "0.1.0"
''')

_PLUGIN = Template('''\
"""The entry point module of $dist: hands Cortex the plugin's components.

Cortex finds this module through the `cortex.plugins` entry point `$ns` declared in
pyproject.toml and calls `cortex_register_components`; each class registered here is
used in a manifest as `$ns.<its name>`.
"""

from cortex import hookimpl

from $ns.tiers import RecentMemory


@hookimpl
def cortex_register_components(register):
    register(RecentMemory)
''')

_TIERS = Template('''\
"""The memory tier of $dist: `$ns.recent`."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch.nn import functional as F

from cortex.kernel.interfaces import Entries, MemoryTier, Retrieval, Settings


class RecentMemory(MemoryTier):
    """The newest `capacity` entries of each stream, searched exactly by cosine similarity.

    Streams are isolated (a batch row in training, a session at inference); when a stream
    is full its oldest entries are dropped, so the tier never holds more than
    `capacity` entries per stream.
    """

    name = "recent"

    class Settings(Settings):
        capacity: int = Field(128, gt=0, description="Entries kept per stream; the oldest go first.")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        self.dim = int(context.model.dim)
        self.next_id = 0
        self.store: dict[int, dict[str, torch.Tensor]] = {}  # stream -> its entries

    def _empty(self) -> dict[str, torch.Tensor]:
        return {
            "keys": torch.zeros(0, self.dim), "values": torch.zeros(0, self.dim),
            "tokens": torch.zeros(0, dtype=torch.long), "ids": torch.zeros(0, dtype=torch.long),
            "uses": torch.zeros(0, dtype=torch.long),
        }

    @torch.no_grad()
    def write(self, entries: Entries, *, step: int = 0) -> None:
        n = len(entries)
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        keys = F.normalize(entries.keys.detach().float().cpu(), dim=-1)
        values = entries.values.detach().float().cpu()
        tokens, streams = entries.tokens.detach().long().cpu(), entries.streams.detach().long().cpu()
        for stream in streams.unique().tolist():
            sel = streams == stream
            old = self.store.get(stream, self._empty())
            new = {"keys": keys[sel], "values": values[sel], "tokens": tokens[sel], "ids": ids[sel],
                   "uses": torch.zeros(int(sel.sum()), dtype=torch.long)}
            cap = self.settings.capacity
            self.store[stream] = {k: torch.cat([old[k], new[k]])[-cap:] for k in old}

    @torch.no_grad()
    def read(self, queries: torch.Tensor, k: int, *, stream: int = 0, step: int = 0,
             touch: bool = True) -> Retrieval:
        q = F.normalize(queries.detach().float().cpu(), dim=-1)
        n_q = q.shape[0]
        out = Retrieval(
            values=torch.zeros(n_q, k, self.dim), tokens=torch.full((n_q, k), -1),
            scores=torch.full((n_q, k), float("-inf")), ids=torch.full((n_q, k), -1),
            keys=torch.zeros(n_q, k, self.dim), uses=torch.zeros(n_q, k, dtype=torch.long),
        )
        s = self.store.get(int(stream))
        if s is not None and len(s["ids"]) and k > 0:
            top = (q @ s["keys"].T).topk(min(k, len(s["ids"])), dim=-1)
            j, m = top.indices, top.indices.shape[1]
            if touch:
                s["uses"][j.unique()] += 1
            out.scores[:, :m] = top.values
            out.values[:, :m], out.keys[:, :m] = s["values"][j], s["keys"][j]
            out.tokens[:, :m], out.ids[:, :m], out.uses[:, :m] = s["tokens"][j], s["ids"][j], s["uses"][j]
        device = queries.device
        return Retrieval(*(t.to(device) for t in (out.values, out.tokens, out.scores, out.ids, out.keys, out.uses)))

    def clear(self, stream: int | None = None) -> None:
        if stream is None:
            self.store.clear()
        else:
            self.store.pop(int(stream), None)

    def __len__(self) -> int:
        return sum(len(s["ids"]) for s in self.store.values())

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self), "capacity": self.settings.capacity, "streams": len(self.store)}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"next_id": self.next_id, "streams": sorted(self.store)}
        for stream, s in self.store.items():
            for key, tensor in s.items():
                state[f"{stream}.{key}"] = tensor.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_id = int(state["next_id"])
        self.store = {
            int(stream): {key: state[f"{stream}.{key}"].clone() for key in self._empty()}
            for stream in state["streams"]
        }

''')

_TEST = Template('''\
"""Tests of $dist, written with the fixtures of `cortex.testing` (a pytest plugin
that comes with Cortex: fake_distribution, build_model, cortex_cli, register_plugin)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from cortex.kernel.interfaces import BuildContext, Entries
from cortex.core.transformer import ModelConfig

from $ns import plugin
from $ns.tiers import RecentMemory

MANIFEST = """\\
cortex: 1
name: $ns-test
model: {dim: 32, layers: 2, heads: 2, context: 16}
memory:
  - {type: $ns.recent, settings: {capacity: 8}}
"""


@pytest.fixture
def installed(fake_distribution):
    """The plugin as Cortex sees it: really installed, or a fake distribution when the
    tests run from a source checkout that is not installed."""
    if not metadata.entry_points(group="cortex.plugins", name="$ns"):
        fake_distribution("$dist", {"$ns": plugin}, version="0.1.0")


def make_tier(capacity=4):
    context = BuildContext(model=ModelConfig(vocab_size=16, dim=8, layers=1, heads=2, context=8))
    return RecentMemory(RecentMemory.Settings(capacity=capacity), context)


def entries(keys, stream):
    n = keys.shape[0]
    return Entries(keys, keys * 2, torch.arange(n), torch.full((n,), stream))


def test_read_finds_the_written_entry_and_streams_are_isolated():
    tier = make_tier()
    keys = torch.eye(8)[:3]
    tier.write(entries(keys, stream=0))
    got = tier.read(keys[1:2], k=2, stream=0)
    assert got.tokens[0, 0] == 1 and torch.isclose(got.scores[0, 0], torch.tensor(1.0))
    assert (tier.read(keys[1:2], k=2, stream=1).ids == -1).all()  # another stream sees nothing


def test_capacity_is_never_exceeded_and_state_round_trips():
    tier = make_tier(capacity=4)
    tier.write(entries(torch.randn(10, 8), stream=0))
    assert len(tier) == 4
    copy = make_tier(capacity=4)
    copy.load_state_dict(tier.state_dict())
    query = torch.randn(2, 8)
    assert torch.equal(copy.read(query, 3, touch=False).ids, tier.read(query, 3, touch=False).ids)


def test_cortex_lists_the_plugin(installed, cortex_cli):
    result = cortex_cli("plugins", "--json")
    names = [c["name"] for c in json.loads(result.stdout)["components"]]
    assert "$ns.recent" in names


def test_a_manifest_builds_and_the_model_writes_to_the_tier(installed, build_model):
    model = build_model(MANIFEST)
    [tier] = model.memory
    assert isinstance(tier, RecentMemory) and tier.capacity == 8
    model.train()
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx)  # a training forward pass writes each row to its own stream
    assert 0 < len(tier) <= 8 * 2
''')

_README = Template("""\
# $dist

A [Cortex](https://github.com/) plugin. It registers, under the namespace `$ns`
(the name of its `cortex.plugins` entry point):

- `$ns.recent`: a memory tier holding the newest `capacity` entries of each stream,
  searched exactly by cosine similarity.

## Install and use

```bash
pip install -e .          # from this folder
cortex plugins            # lists $ns.recent, with this distribution and version
```

```yaml
cortex: 1
name: with-recent
model: {dim: 64, layers: 2, heads: 2, context: 64}
memory:
  - {type: $ns.recent, settings: {capacity: 64}}
```

## Test

```bash
pytest
```

The tests use the fixtures of `cortex.testing`, which Cortex installs as a pytest plugin.
""")


def plugin_files(name: str) -> dict[str, str]:
    """Relative path -> text of every file of plugin package ``name``."""
    check_plugin_name(name)
    values = {"ns": name, "dist": distribution_name(name)}
    files = {
        "pyproject.toml": _PYPROJECT.substitute(values),
        "README.md": _README.substitute(values),
        f"src/{name}/__init__.py": _INIT.substitute(values),
        f"src/{name}/plugin.py": _PLUGIN.substitute(values),
        f"src/{name}/tiers.py": _TIERS.substitute(values),
        "tests/test_plugin.py": _TEST.substitute(values),
    }
    return {path: text.rstrip("\n") + "\n" for path, text in files.items()}


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
