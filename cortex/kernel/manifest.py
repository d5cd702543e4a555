"""Manifests: YAML read safely with the position of every node, validated by pydantic.

Every problem is reported at once as ``FILE:LINE:COL path.to.field: message``. Only
registered component names are accepted, never import paths, and YAML tags beyond plain
data (``!!python/object`` and friends) are refused before anything is constructed.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import Settings

SCHEMA_VERSION = 1
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")  # \Z: a trailing newline is not a name
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_MAX_NODES = 100_000  # guards against alias ("billion laughs") expansion

FieldPath = tuple[str | int, ...]


# --------------------------------------------------------------------------- models


class MemorySettings(Settings):
    """The ``memory_system:`` section of a manifest."""

    read: list[Literal["knn_attention", "knn_lm"]] = Field(default_factory=lambda: ["knn_lm"], description="Read modes in use.")
    k: int = Field(8, gt=0, description="Neighbours retrieved per tier and query.")
    key_layer: int | None = Field(None, ge=0, description="Block whose output gives memory keys (default: "
                                                          "the first memory layer, else the last block).")
    key_window: int = Field(32, ge=0, description="Tokens a key's hidden state sees (0: the full context).")
    key_offsets: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 4, 8, 12, 16, 20, 24],
        description="Positions back from the current one whose hidden states, each turned by a rotation "
                    "of its own, are summed into a key.")
    key_decay: float = Field(0.9, gt=0, le=1, description="Weight ratio of each further offset in a key.")
    key_words: float = Field(0.0, ge=0, description="Weight of each position's sentence words in its key (byte tokenizer; 0: none): a question's key meets the statements sharing its rare words (cortex.core.words).")
    tier_temperature: float = Field(1.0, gt=0, description="kNN-attention: softmax temperature over tiers' best scores (kNN-LM pools every tier's neighbours instead).")
    lm_lambda: float = Field(0.8, ge=0, le=1, description="kNN-LM weight of memory at full strength; a match of "
                                                          "strength s (1 + its uses) weighs lm_lambda * s / (s + 1).")
    lm_temperature: float = Field(0.001, gt=0, description="kNN-LM softmax temperature over cosine scores.")
    lm_min_score: float = Field(0.9, ge=-1, le=1, description="kNN-LM ignores neighbours below this cosine.")
    lm_margin: float = Field(0.0, ge=0, description="kNN-LM weighs memory by 1 - exp(-m / lm_margin), m: how much "
                                                    "closer the best neighbour is than one saying another token (0: off).")
    lm_recalled_only: bool = Field(False, description="kNN-LM reads only prompts a feature put told text before, and of memory only the texts a sentence of which is there.")
    use_bonus: float = Field(1.0, ge=0, description="kNN-LM log-weight bonus per log(1 + uses): repetition raises confidence.")
    read_temperature: float = Field(0.1, gt=0, description="Initial temperature of kNN-attention scores.")
    read_min_score: float | None = Field(None, ge=-1, le=1, description="Outside training, kNN-attention skips "
                                         "entries below this cosine (None: none); training reads all, to keep learning.")
    null_slot: float | None = Field(None, description="Initial score of kNN-attention's learned null slot (None: none).")
    gate_init: float = Field(-1.0, description="Initial logit of the kNN-attention gate.")
    residual_weight: float = Field(1.0, ge=0, description="Scale of the memory output added to the stream.")
    memory_dropout: float = Field(0.0, ge=0, lt=1, description="Share of retrieved slots dropped in training.")
    gumbel_temperature: float | None = Field(None, gt=0, description="Gumbel-softmax slot sparsity in training (None: off).")
    query: Literal["learned", "key"] = Field("learned", description="kNN-attention's query: learned from the stream, "
                                             "or the position's own memory key (a repeat matches its entry exactly).")
    value: Literal["state", "next", "both"] = Field("state", description="What kNN-attention reads of an entry: the "
                                                    "stream's state, the token that followed its key, or both.")
    train_read_tiers: int = Field(1, ge=1, description="Tiers kNN-attention reads in training (the first N; all at "
                                                       "inference): exact batched search is cheap, FAISS per token not.")
    read_at: Literal["every", "frontier"] = Field("every", description="Generation: kNN-attention reads at every position, "
                                                  "or only where the next token is unknown (a prompt's text reads nothing).")

    @model_validator(mode="after")
    def _offsets(self) -> MemorySettings:
        if not self.key_offsets or min(self.key_offsets) < 0 or 0 not in self.key_offsets:
            raise ValueError("key_offsets must be non-negative and include 0 (the current position)")
        return self

    write: Literal["all", "surprise"] = Field("surprise", description="Store every position, or the most surprising (top loss).")
    write_fraction: float = Field(0.25, gt=0, le=1, description="Share of positions stored with `surprise`.")
    write_in_training: bool = Field(True, description="Write each training segment to STM. Off saves the key pass where nothing reads what training rows wrote (kNN-LM alone reads only outside training, in sessions' streams).")
    spill: Literal["never", "inference", "always"] = Field("inference", description="When entries pushed out of a "
                                                           "full tier go to the next one: never, outside training, or always.")
    consolidate: Literal["step", "sleep"] = Field(
        "step", description="Hand entries down the tiers at every step end, or only during sleep (NREM).")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Shape of the transformer core. The vocabulary size comes from the tokenizer."""

    dim: int = Field(256, gt=0, description="Width of the residual stream.")
    layers: int = Field(4, gt=0, description="Number of transformer blocks.")
    heads: int = Field(4, gt=0, description="Attention heads; must divide `dim`, head size even.")
    context: int = Field(256, gt=1, description="Context window in tokens.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of `dim`.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability during training.")
    rope_base: float = Field(10000.0, gt=0, description="RoPE frequency base.")
    memory_layers: list[int] = Field(default_factory=list, description="Blocks after which the memory layer reads the tiers.")

    @model_validator(mode="after")
    def _shape(self) -> ModelSection:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head size dim/heads = {self.dim // self.heads} must be even for RoPE")
        bad = [i for i in self.memory_layers if not 0 <= i < self.layers]
        if bad:
            raise ValueError(f"memory_layers {bad} outside 0..{self.layers - 1}")
        return self


class TokenizerSection(_Section):
    """``{type: byte}`` (default, no set-up) or ``{type: bpe, path: tokenizer.json}``."""

    type: Literal["byte", "bpe"] = Field("byte", description="Tokenizer kind.")
    path: str | None = Field(None, description="tokenizer.json of a BPE tokenizer, relative to the manifest.")

    @model_validator(mode="after")
    def _path(self) -> TokenizerSection:
        if self.type == "bpe" and not self.path:
            raise ValueError("a bpe tokenizer needs `path:` to its tokenizer.json")
        return self


class ComponentSpec(_Section):
    """A registered component and its settings; a bare name (``stm``) stands for ``{type: stm}``."""

    type: str = Field(min_length=1, description="Registered component name, e.g. `stm` or `hopfield.hebbian`.")
    settings: dict[str, Any] = Field(default_factory=dict, description="The component's own settings.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class RuleSpec(ComponentSpec):
    """A plasticity rule, the modules it targets, and its settings."""

    target: str = Field("*", min_length=1, description="Glob over module names, e.g. `blocks.*.mlp`.")


class DataSpec(ComponentSpec):
    """A data source: a registered name (``demo``) or a path to a prepared dataset."""


class TrainSection(_Section):
    """Training settings; ``cortex build`` trains when this section is present."""

    data: DataSpec = Field(default_factory=lambda: DataSpec(type="demo"), description="Data source.")
    tokens: int = Field(3_000_000, gt=0, description="Training tokens in total.")
    batch: int = Field(16, gt=0, description="Sequences per optimiser step.")
    lanes: Literal["stream", "documents"] = Field("stream", description="A row reads the token stream, or documents one by one.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    warmup: int = Field(100, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    precision: Literal["fp32", "bf16", "auto"] = Field("bf16", description="Autocast; `auto`: bf16 where it is fast, else fp32.")
    min_lr: float | None = Field(None, ge=0, description="Learning rate at the end of the cosine decay (default: `lr / 10`).")
    micro_batch: int | None = Field(
        None, gt=0, description="Sequences per forward pass (per process under torchrun); the passes of a "
        "step are accumulated (default: from `grad_accum`, else picked for the device).")
    grad_accum: int | None = Field(None, gt=0, description="Micro-batches accumulated per step; `batch` must be a multiple of it.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; `auto` uses CUDA when present.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, more compute.")
    compile: bool = Field(False, description="`torch.compile` the core for training: faster steps on a GPU after a slow start.")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of documents held out for validation when preparing data.")
    eval_every: int = Field(200, ge=0, description="Validation loss every N steps (0: only at the end).")
    eval_batches: int = Field(8, gt=0, description="Micro-batches of the validation split per evaluation.")
    sample_every: int = Field(0, ge=0, description="Log a sample generation every N steps (0: never).")
    sample_prompt: str = Field("", description="Prompt of the sample generations (default: start of val).")
    sample_tokens: int = Field(64, gt=0, description="Tokens per sample generation.")
    checkpoint_every: int = Field(500, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the latest checkpoints to keep.")
    spike_factor: float = Field(3.0, gt=1, description="A loss this many times the recent mean rolls back to a checkpoint.")
    spike_window: int = Field(20, gt=0, description="Recent steps averaged for spike detection (none before that many).")
    max_rollbacks: int = Field(10, ge=0, description="Rollbacks allowed in one run before training stops.")
    loggers: list[ComponentSpec] = Field(default_factory=list, description="Experiment trackers fed what "
                                         "metrics.jsonl gets, e.g. `[tensorboard]` (also `--log NAME`).")

    @model_validator(mode="after")
    def _accumulation(self) -> TrainSection:
        mb, acc = self.micro_batch, self.grad_accum
        if mb is not None and mb > self.batch:
            raise ValueError(f"micro_batch {mb} is larger than batch {self.batch}")
        if mb is not None and self.batch % mb:
            raise ValueError(f"batch {self.batch} is not a multiple of micro_batch {mb}")
        if acc is not None and self.batch % acc:
            raise ValueError(f"batch {self.batch} is not a multiple of grad_accum {acc}")
        if mb is not None and acc is not None and mb * acc != self.batch:
            raise ValueError(f"micro_batch {mb} x grad_accum {acc} must equal batch {self.batch}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class Manifest(_Section):
    """A model: its core, tokenizer, memory tiers, plasticity rules, features and training."""

    cortex: int = Field(description=f"Schema version; this Cortex reads version {SCHEMA_VERSION}.")
    name: str = Field(description="Run name: letters, digits, `.`, `_`, `-`; the run directory's name.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    model: ModelSection = Field(default_factory=ModelSection, description="Transformer core.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection, description="Tokenizer.")
    memory: list[ComponentSpec] = Field(default_factory=list, description="Memory tiers, in hand-over order.")
    memory_system: MemorySettings = Field(
        default_factory=MemorySettings, description="How the model writes, reads and consolidates its tiers.")
    plasticity: list[RuleSpec] = Field(default_factory=list, description="Plasticity rules, applied in order.")
    features: list[ComponentSpec] = Field(default_factory=list, description="Cognitive features.")
    train: TrainSection | None = Field(None, description="Training; omit to build an untrained model.")

    @field_validator("cortex")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema version {value} is not supported; this Cortex reads `cortex: {SCHEMA_VERSION}`")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not RUN_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(
                f"{value!r} is not a valid run name: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        return value


#: manifest section -> component kind
SECTIONS = {"memory": "memory", "plasticity": "plasticity", "features": "feature"}


# --------------------------------------------------------------------------- errors


@dataclass
class Problem:
    """One thing wrong with a manifest, with where it is."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(CortexError):
    """All the problems found in a manifest."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def dotted(path: FieldPath) -> str:
    """``("memory", 0, "settings")`` -> ``memory[0].settings``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- YAML


@dataclass
class Source:
    """A parsed YAML document, with the position of every value and key."""

    file: str
    text: str
    data: Any = None
    marks: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    #: paths given on the command line (``--set``): their problems name the option, not a line
    overridden: set[FieldPath] = field(default_factory=set)

    def position(self, path: FieldPath, *, key: bool = False) -> tuple[int, int]:
        """Line and column (1-based) of ``path``, or of its nearest ancestor present."""
        path = tuple(path)
        while True:
            if key and path in self.key_marks:
                return self.key_marks[path]
            if path in self.marks:
                return self.marks[path]
            if not path:
                return (1, 1)
            path = path[:-1]

    def problem(self, path: FieldPath, message: str, *, key: bool = False) -> None:
        if any(tuple(path[:i]) in self.overridden for i in range(len(path) + 1)):
            self.problems.append(Problem("--set", 0, 0, dotted(path), message))
            return
        line, col = self.position(path, key=key)
        self.problems.append(Problem(self.file, line, col, dotted(path), message))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse_yaml(text: str, file: str = "<manifest>") -> Source:
    """Parse YAML into plain data, refusing non-data tags and duplicate keys."""
    src = Source(file, text)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        src.problems.append(Problem(file, line, col, "", f"invalid YAML: {problem}"))
        return src
    finally:
        loader.dispose()
    if root is None:
        src.problems.append(Problem(file, 1, 1, "", "the manifest is empty"))
        return src
    budget = [_MAX_NODES]

    def build(node: yaml.Node, path: FieldPath) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLarge
        src.marks[path] = _mark(node)
        if node.tag not in _PLAIN_TAGS:
            line, col = _mark(node)
            src.problems.append(Problem(
                file, line, col, dotted(path),
                f"YAML tag {node.tag!r} is not allowed: manifests hold plain data only "
                "(mappings, lists, strings, numbers, booleans)",
            ))
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag not in _PLAIN_TAGS or not isinstance(key_node, yaml.ScalarNode):
                    line, col = _mark(key_node)
                    src.problems.append(Problem(file, line, col, dotted(path), "keys must be plain strings"))
                    continue
                key = str(loader.construct_object(key_node))
                src.key_marks[path + (key,)] = _mark(key_node)
                if key in out:
                    src.problem(path + (key,), "duplicate key; each key may appear once", key=True)
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return loader.construct_object(node)

    try:
        src.data = build(root, ())
    except _TooLarge:
        src.problems.append(Problem(file, 1, 1, "", f"the manifest expands to more than {_MAX_NODES} nodes"))
        src.data = None
    return src


class _TooLarge(Exception):
    pass


# --------------------------------------------------------------------------- validation


@dataclass
class ResolvedComponent:
    """A manifest entry bound to its registered class and validated settings."""

    section: str
    index: int
    spec: ComponentSpec
    info: Any  # cortex.kernel.registry.ComponentInfo
    settings: BaseModel

    @property
    def key(self) -> str:
        return f"{self.section}.{self.index}.{self.spec.type}"


@dataclass
class ValidatedManifest:
    """A manifest that passed every check, with its components resolved."""

    manifest: Manifest
    source: Source
    path: Path | None
    components: list[ResolvedComponent]
    plugins: Any  # cortex.kernel.plugins.CortexPluginManager
    data: ResolvedComponent | None = None

    def section(self, name: str) -> list[ResolvedComponent]:
        return [c for c in self.components if c.section == name]


def _pydantic_problems(src: Source, exc: ValidationError, prefix: FieldPath = (),
                       model: type[BaseModel] | None = None) -> None:
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _keys_at(model, tuple(err["loc"])[:-1]) if model is not None else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = f"unknown key; did you mean {hint[0]!r}?" if hint else "unknown key; remove it or check its spelling"
            src.problem(loc, message, key=True)
            continue
        if err["type"] == "missing":
            message = f"required field `{loc[-1]}` is missing"
        src.problem(loc, message)


def _keys_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the pydantic model found at ``loc`` inside ``model`` (for hints)."""
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field_info = model.model_fields.get(part)
        if field_info is None:
            return []
        candidates = [field_info.annotation, *typing.get_args(field_info.annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _entries(data: Any) -> list[tuple[str, str, int, Any]]:
    """``(section, kind, index, item)`` of every component a manifest names, data and loggers too."""
    raw = data if isinstance(data, dict) else {}
    entries = [(section, kind, i, item) for section, kind in SECTIONS.items()
               for i, item in enumerate(raw[section] if isinstance(raw.get(section), list) else [])]
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if "data" in train:
        entries.append(("train", "data", -1, train["data"]))
    loggers = train.get("loggers") if isinstance(train.get("loggers"), list) else []
    return entries + [("train", "logger", i, item) for i, item in enumerate(loggers)]


def _referenced_namespaces(data: Any) -> set[str]:
    names = [item.get("type") if isinstance(item, dict) else item for *_, item in _entries(data)]
    return {n.split(".", 1)[0] for n in names if isinstance(n, str) and "." in n and "/" not in n}


def _unknown(kind: str, name: str, pm: Any) -> str:
    registry = pm.registry
    other = [info.kind for info in registry if info.name == name]
    if other:
        return f"{name!r} is a {other[0]} component, not a {kind} component"
    if "." in name:
        namespace = name.split(".", 1)[0]
        if namespace not in pm.installed_namespaces:
            hint = difflib.get_close_matches(namespace, sorted(pm.installed_namespaces), n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else "; install the plugin package that provides it"
            return f"no installed plugin provides the namespace {namespace!r}{tip}"
        if namespace not in pm.loaded_namespaces:
            return (f"the plugin namespace {namespace!r} is installed but not loaded: "
                    "CORTEX_DISABLE_PLUGIN_AUTOLOAD or CORTEX_PLUGINS excludes it")
    candidates = registry.names(kind) + sorted(pm.installed_namespaces)
    hint = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    known = ", ".join(registry.names(kind)) or "none"
    tip = f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else f"; known: {known}"
    return f"unknown {kind} component {name!r}{tip}"


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix != ""


def validate(src: Source, path: Path | None = None, *, plugins: Any = None) -> ValidatedManifest:
    """Validate parsed YAML; raise [`ManifestError`][cortex.kernel.manifest.ManifestError] with every problem."""
    from cortex.kernel.plugins import create_plugin_manager

    manifest = None
    if not src.problems:
        if not isinstance(src.data, dict):
            src.problem((), "a manifest is a mapping of sections (cortex, name, model, ...)")
        else:
            try:
                manifest = Manifest.model_validate(src.data)
            except ValidationError as exc:
                _pydantic_problems(src, exc, model=Manifest)
    pm = plugins if plugins is not None else create_plugin_manager(_referenced_namespaces(src.data))
    components: list[ResolvedComponent] = []
    data_component = None
    for section, kind, i, item in _entries(src.data):
        spec_cls = RuleSpec if section == "plasticity" else DataSpec if kind == "data" else ComponentSpec
        where: FieldPath = {"data": ("train", "data"), "logger": ("train", "loggers", i)}.get(kind, (section, i))
        try:
            spec = spec_cls.model_validate(item)
        except ValidationError:
            continue  # already reported by the whole-manifest validation
        info = pm.registry.get(kind, spec.type)
        if info is None:
            if kind == "data" and _looks_like_path(spec.type):
                continue  # a prepared dataset directory or a file, checked when training reads it
            src.problem(where + ("type",), _unknown(kind, spec.type, pm))
            continue
        try:
            settings = info.cls.Settings.model_validate(spec.settings)
        except ValidationError as exc:
            _pydantic_problems(src, exc, where + ("settings",), model=info.cls.Settings)
            continue
        resolved = ResolvedComponent(section, i, spec, info, settings)
        if kind == "data":
            data_component = resolved
        elif kind != "logger":  # loggers are built by training, not into the model
            components.append(resolved)
    if manifest is not None:
        _cross_checks(src, manifest)
    if src.problems:
        src.problems.sort(key=lambda p: (p.line, p.column))
        raise ManifestError(src.problems)
    assert manifest is not None
    return ValidatedManifest(manifest, src, path, components, pm, data_component)


def _cross_checks(src: Source, m: Manifest) -> None:
    """Constraints between sections."""
    ms = m.memory_system
    given = isinstance(src.data, dict) and "memory_system" in src.data
    if given and not m.memory:
        src.problem(("memory_system",), "a memory system needs at least one tier under `memory:`")
    if m.memory and "knn_attention" in ms.read and not m.model.memory_layers:
        src.problem(("memory_system", "read"),
                    "knn_attention reads at the memory layers: set model.memory_layers, e.g. [1]")
    if ms.key_layer is not None and ms.key_layer >= m.model.layers:
        src.problem(("memory_system", "key_layer"), f"must be a block index below model.layers ({m.model.layers})")


def load_manifest(path: str | Path, *, plugins: Any = None) -> ValidatedManifest:
    """Read and validate a manifest file (``cortex.load_manifest`` adds ``${NAME}`` and
    ``--set`` overrides on top: see `cortex.runtime.manifests`)."""
    return validate(read_source(path), Path(path), plugins=plugins)


def read_source(path: str | Path) -> Source:
    """Parse a manifest file into a [`Source`][cortex.kernel.manifest.Source], not yet validated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CortexError(f"{path}: no such manifest file") from None
    except IsADirectoryError:
        raise CortexError(f"{path}: is a directory, not a manifest file") from None
    except UnicodeDecodeError as exc:
        raise CortexError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path))


def load_manifest_text(text: str, file: str = "<manifest>", *, plugins: Any = None) -> ValidatedManifest:
    """Validate a manifest given as a YAML string."""
    return validate(parse_yaml(text, file), None, plugins=plugins)
