"""The training loop: data, schedule, checkpoints, validation, rollback, hardware fitting.

[`train`][cortex.runtime.train.train] drives the kernel's one step function,
[`train_step`][cortex.runtime.step.train_step], over a prepared dataset read in *lanes*
([`TokenDataset.lanes`][cortex.runtime.data.TokenDataset.lanes]): row ``r`` of every batch
continues where row ``r`` of the previous batch ended, so memory carried per row spans
consecutive segments of one document stream. Lane ``r`` is memory stream ``r``. With
``train.lanes: documents`` a lane reads whole documents instead
([`DocumentLanes`][cortex.runtime.document_lanes.DocumentLanes]) and its memory stream is
cleared whenever it starts the next one.

Per step: the learning rate is set from [`cosine_schedule`][cortex.runtime.step.cosine_schedule]
(linear warm-up, cosine decay to ``min_lr``); the global batch (``train.batch`` rows) is
split across ranks and into micro-batches whose gradients are accumulated; one line is
appended to ``RUN/metrics.jsonl``. Every ``eval_every`` steps the validation loss is
measured and, when it is the best so far, the run directory's own ``model.safetensors`` and
plugin state are replaced by the current model (so the run directory always holds the best
model; under DDP with rank 0's plugin state). Every ``checkpoint_every`` steps a resumable
checkpoint is written ([`cortex.runtime.checkpoint`][cortex.runtime.checkpoint]; under DDP it holds every
rank's own plugin state and RNG, and each rank resumes from its own).

A loss above ``spike_factor`` times the mean of the last ``spike_window`` losses, or a
non-finite loss or gradient, rolls the model back to the latest checkpoint, skips the
offending batch and goes on (logged as an ``"event": "rollback"`` line). Running out of
memory halves the micro-batch and doubles the accumulation instead of crashing.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from cortex.runtime import distributed as dist
from cortex.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rank_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cortex.kernel.errors import CheckpointError, CortexError, DataError
from cortex.kernel.interfaces import BuildContext
from cortex.kernel.manifest import DataSpec, TrainSection
from cortex.runtime.data import TokenDataset, documents_from_path, prepare
from cortex.runtime.document_lanes import DocumentLanes
from cortex.runtime.gpu import compile_core, faiss_note
from cortex.runtime.rundir import atomic_write, write_into, write_json
from cortex.runtime.step import cosine_schedule, make_optimizer, set_lr, train_step

__all__ = ["Preset", "hardware_preset", "resolve_data", "resolve_device", "total_steps", "train"]

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Preset:
    """What [`hardware_preset`][cortex.runtime.train.hardware_preset] picked, and why."""

    device: str
    precision: str
    micro_batch: int
    reason: str


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error. Under
    ``torchrun`` the GPU is the one of the process's ``LOCAL_RANK``."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise CortexError("train.device is `cuda` but no CUDA device is available; use `auto` or `cpu`")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def activation_bytes(config: Any, precision: str) -> int:
    """Rough training memory of one sequence: activations kept for backward plus logits."""
    per_layer = config.dim * (34 if precision == "bf16" else 68)
    per_token = config.layers * per_layer + config.vocab_size * 12
    return config.context * per_token


def hardware_preset(config: Any, batch: int, device: torch.device | str = "cpu") -> Preset:
    """Pick precision and micro-batch for ``device`` (cores, CPU features, GPU memory).

    Precision: bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16 or
    AMX), fp32 otherwise. Micro-batch: the largest divisor of ``batch`` whose estimated
    activation memory fits a share of the free memory (half the free GPU memory after
    weights, gradients and AdamW state; a quarter of the free RAM on a CPU), at most 32
    on a CPU where larger passes bring nothing.
    """
    device = torch.device(device)
    params = sum(
        p for p in (config.vocab_size * config.dim,
                    config.layers * (4 * config.dim * config.dim + 2 * config.dim * config.hidden_dim))
    )
    if device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * 0.5 - params * 16
        per_seq = activation_bytes(config, precision)
        micro = _divisor_at_most(batch, max(1, int(budget // per_seq)))
        name = torch.cuda.get_device_name(device)
        return Preset("cuda", precision, micro, f"{name}, {free / 2**30:.1f} GiB free")
    precision = "bf16" if _cpu_has_fast_bf16() else "fp32"
    ram = _available_ram()
    per_seq = activation_bytes(config, precision)
    micro = _divisor_at_most(batch, min(32, max(1, int(ram * 0.25 // per_seq))))
    cores = os.cpu_count() or 1
    bf16 = "native bf16" if precision == "bf16" else "no native bf16"
    return Preset("cpu", precision, micro, f"{cores} CPU cores, {bf16}, {ram / 2**30:.1f} GiB free RAM")


# --------------------------------------------------------------------------- data


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith((".", "~")) or Path(name).suffix != ""


def resolve_data(
    model: Any,
    run_dir: Path,
    spec: DataSpec | None,
    override: str | None = None,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    console: Any = None,
    prepare_data: bool = True,
) -> Path:
    """The prepared dataset folder to train ``model`` on.

    ``override`` (``--data``) replaces ``spec``'s source. A registered source name
    (``demo``, ``jsonl``, ...), a ``.jsonl``/text file or a Hugging Face dataset folder
    (read by the ``hf`` source) is prepared with the model's tokenizer into ``RUN/data`` —
    unless it already holds the same source prepared with the same tokenizer. A prepared
    dataset folder is used as it is; its tokenizer must be the model's.
    """
    tokenizer = model.tokenizer
    target = override if override is not None else (spec.type if spec is not None else "demo")
    raw_settings = spec.settings if spec is not None and spec.type == target else {}
    info = model.pm.registry.get("data", target)
    found = model.pm.registry.reader_of(target) if info is None else None
    if found is not None:  # e.g. a Hugging Face dataset folder, read by the hf source
        info, raw_settings = found[0], found[1].model_dump()
    out = Path(run_dir) / "data"
    if info is not None:
        try:
            settings = info.cls.Settings.model_validate(raw_settings)
        except ValidationError as exc:
            raise DataError(f"data source {target!r}: invalid settings: {exc.errors()[0]['msg']}") from None
        key: dict[str, Any] = {"source": target, "settings": settings.model_dump(mode="json")}

        def documents() -> Any:
            context = BuildContext(config=model.config, tokenizer=tokenizer, seed=seed, run_dir=Path(run_dir))
            return info.cls(settings, context).documents()
    else:
        path = Path(target).expanduser()
        if not path.exists():
            if _looks_like_path(target):
                raise DataError(f"{target}: no such file or folder — check the --data / train.data path")
            known = ", ".join(model.pm.registry.names("data")) or "none"
            raise DataError(f"{target}: no such file or folder, and no data source of that name (known: {known})")
        if path.is_dir():
            if not (path / "meta.json").is_file():
                raise DataError(
                    f"{path}: a folder but not a prepared dataset (no meta.json) — prepare one with "
                    f"`cortex data prepare FILES -o {path}` or pass a .jsonl/.txt file"
                )
            TokenDataset(path, "train", tokenizer)  # refuses another tokenizer's data
            return path
        stat = path.stat()
        key = {"file": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

        def documents() -> Any:
            return documents_from_path(path)
    key.update(val_fraction=val_fraction, seed=seed, tokenizer=tokenizer.fingerprint)
    if not prepare_data or _prepared(out, key):
        return out
    if console is not None:
        console.print(f"preparing data {target!r} into {out} ...")
    started = time.perf_counter()
    meta = prepare([(target, documents(), None)], out, tokenizer, val_fraction=val_fraction, seed=seed)
    write_json(out / "source.json", key)
    if console is not None:
        splits = meta["splits"]
        console.print(f"data: {splits['train']['tokens']:,} training and {splits['val']['tokens']:,} "
                      f"validation tokens ({time.perf_counter() - started:.1f} s)")
    return out


def _prepared(out: Path, key: dict[str, Any]) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        source = json.loads((out / "source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return source == key and meta.get("tokenizer", {}).get("fingerprint") == key["tokenizer"]


# --------------------------------------------------------------------------- helpers


def total_steps(settings: TrainSection, context: int) -> int:
    """Optimiser steps of a run: ``tokens // (batch * context)``."""
    return settings.tokens // (settings.batch * context)


class _Hooks:
    """``model.pm.hook`` that always passes the real model, whatever module ran the forward;
    with document lanes, extra losses see no targets past a row's end (see ``_LaneStreams``)."""

    def __init__(self, hook: Any, model: nn.Module, lanes: "_LaneStreams | None" = None) -> None:
        self._hook = hook
        self._model = model
        self._lanes = lanes

    def __getattr__(self, name: str) -> Any:
        caller = getattr(self._hook, name)
        if name == "cortex_extra_losses" and self._lanes is not None:
            return lambda **kwargs: caller(**{**kwargs, "model": self._model,
                                              "batch": self._lanes.mask_last(kwargs["batch"])})
        return lambda **kwargs: caller(**{**kwargs, "model": self._model})


class _LaneStreams(nn.Module):
    """Forwards ``(idx, targets)`` with ``streams`` = each row's global lane index (when the
    model takes streams) and, given each row's ``lengths``, no targets past a row's end."""

    def __init__(self, model: nn.Module, streams: bool = True) -> None:
        super().__init__()
        self.model = model
        self.streams = streams
        self.first = 0
        self.calls = 0
        self.lengths: torch.Tensor | None = None

    def start(self, first: int, lengths: torch.Tensor | None = None) -> None:
        self.first, self.calls, self.lengths = first, 0, lengths

    def _past_end(self, row: int, targets: torch.Tensor) -> torch.Tensor:
        """``targets`` of the rows from ``row`` on, -1 past each row's end."""
        ends = self.lengths[row : row + targets.size(0)].to(targets.device) - 1
        return targets.masked_fill(torch.arange(targets.size(1), device=targets.device) >= ends[:, None], -1)

    def mask_last(self, batch: torch.Tensor) -> torch.Tensor:
        """The last forward's ``batch`` (B, T+1) with its targets (``batch[:, 1:]``) past each
        row's end at -1, for the features' extra losses."""
        if self.lengths is None:
            return batch
        return torch.cat([batch[:, :1], self._past_end(self.calls - batch.size(0), batch[:, 1:])], dim=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        row = self.calls
        self.calls += idx.size(0)
        if self.lengths is not None and targets is not None:
            targets = self._past_end(row, targets)
        if not self.streams:
            return self.model(idx, targets)
        lo = self.first + row
        return self.model(idx, targets, streams=torch.arange(lo, lo + idx.size(0)))


def _forget_lanes(model: Any, streams: torch.Tensor) -> None:
    """Clear the memory streams of lanes that start a new document, in every tier."""
    for stream in streams.tolist():
        for tier in getattr(model, "memory", None) or []:
            tier.clear(int(stream))


def _accepts_streams(model: nn.Module) -> bool:
    try:
        return "streams" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Metrics:
    """``RUN/metrics.jsonl``, one JSON object per line, appended and flushed (rank 0 only);
    each line also goes to the ``loggers``: its numbers and its texts."""

    def __init__(self, path: Path, enabled: bool, loggers: list[Any] = ()) -> None:
        self.path = path
        self.enabled = enabled
        self.loggers = list(loggers)

    def truncate(self, step: int) -> None:
        """Drop step lines after ``step`` (a resume or rollback replays them); keep events."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut by a crash (or not ours)
            if "event" in obj or obj.get("step", 0) <= step:
                keep.append(line)
        atomic_write(self.path, "".join(f"{line}\n" for line in keep))

    def reset(self) -> None:
        if self.enabled:
            atomic_write(self.path, "")

    def write(self, obj: dict[str, Any]) -> None:
        if not self.enabled:
            return
        obj = {k: _finite(v) for k, v in obj.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        values = {k: v for k, v in obj.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and "event" not in obj}
        text = obj.get("text", obj.get("reason"))
        texts = {obj["event"]: text} if "event" in obj and isinstance(text, str) else {}
        for logger in self.loggers:
            logger.log(obj["step"], values, texts)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _build_loggers(model: Any, run_dir: Path, specs: list[Any]) -> list[Any]:
    """The ``train.loggers`` of a manifest (``--log`` adds to them), built for ``run_dir``."""
    loggers = []
    for spec in specs:
        info = model.pm.registry.get("logger", spec.type)
        if info is None:
            known = ", ".join(model.pm.registry.names("logger")) or "none"
            raise CortexError(f"train.loggers: no logger {spec.type!r} (known: {known})")
        try:
            settings = info.cls.Settings.model_validate(spec.settings)
        except ValidationError as exc:
            raise CortexError(f"train.loggers: {spec.type}: {exc.errors()[0]['msg']}") from None
        context = BuildContext(config=model.config, tokenizer=model.tokenizer, seed=model.manifest.seed,
                               run_dir=Path(run_dir))
        logger = info.cls(settings, context)
        logger.key = f"train.loggers.{spec.type}"
        loggers.append(logger)
    return loggers


@dataclass
class _State:
    """The loop's resumable state (saved as ``trainer.json`` in every checkpoint)."""

    step: int = 0
    position: int = 0
    tokens: int = 0
    total_steps: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    recent: list | None = None
    skip_positions: list | None = None
    rollbacks: int = 0
    micro_batch: int = 0

    def to_json(self, settings: TrainSection, context: int, warmup: int, min_lr: float,
                fingerprint: str) -> dict[str, Any]:
        return {
            "step": self.step, "total_steps": self.total_steps, "position": self.position,
            "tokens": self.tokens, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
            "recent_losses": list(self.recent or []), "skip_positions": sorted(self.skip_positions or []),
            "rollbacks": self.rollbacks, "micro_batch": self.micro_batch,
            "batch": settings.batch, "context": context,
            "scheduler": {"kind": "cosine", "lr": settings.lr, "min_lr": min_lr, "warmup": warmup,
                          "total": self.total_steps},
            "tokenizer": fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        """The state ``trainer.json`` holds; a field of the wrong type is a CheckpointError."""
        try:
            return cls(
                step=int(data["step"]), position=int(data["position"]), tokens=int(data["tokens"]),
                total_steps=int(data["total_steps"]), best_val_loss=_number(data.get("best_val_loss")),
                best_step=data.get("best_step"), recent=[float(x) for x in data.get("recent_losses", [])],
                skip_positions=[int(x) for x in data.get("skip_positions", [])],
                rollbacks=int(data.get("rollbacks", 0)), micro_batch=int(data.get("micro_batch", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"trainer.json: a field is missing or of the wrong type ({exc}); "
                                  "resume from another checkpoint") from None


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenDataset, batch: int, seq_len: int, batches: int,
             precision: str = "fp32") -> float:
    """Mean loss over the first ``batches`` batches of ``data`` (in file order), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, (_, x) in enumerate(data.batches(batch, seq_len, loop=False)):
            if i >= batches:
                break
            x = x.to(device)
            with _autocast(precision, device):
                _, loss = model(x[:, :-1], x[:, 1:])
            total += float(loss) * x.size(0)
            count += x.size(0)
    finally:
        model.train(was_training)
    return total / max(1, count)


#: seconds between two plain progress lines when the output is not a terminal
PROGRESS_EVERY_S = 30.0


class _Progress:
    """Training progress on ``console``: a live bar on a terminal; otherwise (a log file, a
    pipe) a plain line every ``PROGRESS_EVERY_S`` seconds and at the last step: step, loss,
    tokens/s and the time left."""

    def __init__(self, console: Any, total: int, done: int) -> None:
        self.console, self.total, self.every_s = console, total, PROGRESS_EVERY_S
        self.first, self.started = done, time.perf_counter()
        self.shown = self.started
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", speed="-")
            self.bar.start()

    def update(self, step: int, loss: float | None = None, speed: float | None = None) -> None:
        if self.bar is not None:
            fields = {} if loss is None else {"loss": f"{loss:.3f}", "speed": f"{speed or 0:,.0f}"}
            self.bar.update(self.task, completed=step, **fields)
            return
        now = time.perf_counter()
        if loss is None or (now - self.shown < self.every_s and step != self.total):
            return
        self.shown = now
        left = (self.total - step) * (now - self.started) / max(1, step - self.first)
        self.console.print(f"step {step}/{self.total}  loss {loss:.4f}  {speed or 0:,.0f} tok/s  "
                           f"{int(left) // 60}m{int(left) % 60:02d}s left", highlight=False)

    def print(self, text: str) -> None:
        (self.bar.console if self.bar is not None else self.console).print(text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- the loop


def train(
    model: Any,
    run_dir: Path,
    settings: TrainSection,
    *,
    resume: str | Path | None = None,
    console: Any = None,
    data: str | None = None,
    steps: int | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a ``CortexModel``) into ``run_dir``.

    Args:
        model: the assembled model, on the device to train on.
        run_dir: an existing run directory; receives ``data/``, ``checkpoints/``,
            ``metrics.jsonl``, ``train.json`` and, whenever validation improves (or at the
            end without validation data), its ``model.safetensors`` and plugin state.
        settings: the manifest's ``train:`` section.
        resume: ``"auto"`` (the run's latest checkpoint) or a checkpoint folder: restores
            weights, optimiser, schedule, data position, RNG and plugin state exactly
            (each rank's own under DDP).
        console: a rich console for the progress bar and messages; ``None``: silent.
        data: overrides ``settings.data`` (a source name, a file or a prepared folder).
        steps: overrides the number of steps (default ``tokens // (batch * context)``).
        stop_at: stop after this many steps (with a checkpoint), as if interrupted; the
            schedule still runs to ``steps``.

    Returns:
        A summary: ``steps``, ``tokens``, ``loss`` (last step), ``val_loss``,
        ``best_val_loss``, ``best_step``, ``tokens_per_s``, ``rollbacks``, ``micro_batch``,
        ``grad_accum``, ``precision``, ``elapsed_s``.
    """
    run_dir = Path(run_dir)
    device = next(model.core.parameters()).device
    info = dist.init_from_env(device)
    main = info.main
    console = console if main else None
    world = info.world_size
    context = model.config.context
    if settings.batch % world:
        raise CortexError(f"train.batch {settings.batch} is not divisible by the {world} processes")
    local_batch = settings.batch // world
    preset = hardware_preset(model.config, local_batch, device)
    precision = preset.precision if settings.precision == "auto" else settings.precision
    if settings.micro_batch is not None:
        micro = settings.micro_batch
    elif settings.grad_accum is not None:
        micro = max(1, local_batch // settings.grad_accum)
    else:
        micro = preset.micro_batch
    micro = _divisor_at_most(local_batch, micro)
    if settings.gradient_checkpointing:
        if not hasattr(model.core, "gradient_checkpointing"):
            raise CortexError("this model core does not support gradient_checkpointing")
        model.core.gradient_checkpointing = True
    if settings.compile:
        compile_core(model)
    note = faiss_note(model, device) if main else None
    if note is not None and console is not None:
        console.print(f"note: {note}")
    elif note is not None:
        warnings.warn(note, stacklevel=2)
    min_lr = settings.min_lr if settings.min_lr is not None else settings.lr / 10
    fingerprint = model.tokenizer.fingerprint
    metrics = _Metrics(run_dir / METRICS_FILE, main, _build_loggers(model, run_dir, settings.loggers) if main else [])

    resume_path = None
    if resume is not None:  # fail fast, before any data is prepared
        resume_path = resolve_checkpoint(resume, run_dir)
        verify_checkpoint(resume_path)
    elif list_checkpoints(run_dir):  # every rank checks, before rank 0 writes any
        raise CheckpointError(
            f"{run_dir}: has checkpoints from an earlier training — continue it with --resume auto, "
            f"or delete {run_dir / 'checkpoints'} to train again from the current weights"
        )

    # -- data (rank 0 prepares, the others wait and read it) --
    data_dir = resolve_data(model, run_dir, settings.data, data, val_fraction=settings.val_fraction,
                            seed=model.manifest.seed, console=console, prepare_data=main)
    dist.barrier()
    train_data = TokenDataset(data_dir, "train", model.tokenizer)
    val_data = TokenDataset(data_dir, "val", model.tokenizer)
    has_val = len(val_data) > context
    if not has_val and console is not None:
        console.print("note: no validation data (the val split is shorter than one context); "
                      "the final model is kept instead of the best one")
    documents = None
    if settings.lanes == "documents":
        documents = DocumentLanes(train_data, settings.batch, context, model.tokenizer.eos_id)
    elif len(train_data) // settings.batch <= context:
        raise DataError(
            f"{data_dir}: {len(train_data):,} training tokens are too few for {settings.batch} lanes of "
            f"more than {context} tokens — use more data or a smaller train.batch"
        )

    # -- optimiser and state --
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    state = _State(recent=[], skip_positions=[], micro_batch=micro)
    if resume_path is not None:
        path = resume_path
        saved = load_checkpoint(path, model, optimizer)
        for key, expected in (("batch", settings.batch), ("context", context), ("tokenizer", fingerprint)):
            if saved.get(key) != expected:
                raise CheckpointError(
                    f"{path / 'trainer.json'}: written with {key} {saved.get(key)!r}, this run has "
                    f"{expected!r} — resume with the settings the checkpoint was made with"
                )
        state = _State.from_json(saved)
        micro = _divisor_at_most(local_batch, min(micro, state.micro_batch or micro))
        state.micro_batch = micro
        metrics.truncate(state.step)
        if console is not None:
            console.print(f"resuming from {path} (step {state.step})")
    else:
        metrics.reset()
    state.total_steps = steps if steps is not None else (state.total_steps or total_steps(settings, context))
    if state.total_steps < 1:
        raise CortexError(
            f"train.tokens {settings.tokens:,} is less than one step of batch x context = "
            f"{settings.batch * context:,} tokens"
        )
    total = state.total_steps
    warmup = settings.warmup
    grad_accum = local_batch // micro

    def trainer_json() -> dict[str, Any]:
        state.micro_batch = micro
        return state.to_json(settings, context, warmup, min_lr, fingerprint)

    def checkpoint() -> None:
        # under DDP every other rank's own plugin state and RNG go in too
        parts = dist.gather_object(None if main else rank_state(model)) if world > 1 else None
        if main:
            save_checkpoint(run_dir, model, optimizer, trainer_json(), keep=settings.keep_checkpoints,
                            ranks=parts[1:] if parts else None)
        dist.barrier()

    def write_best() -> None:
        if main:
            write_into(model, run_dir)

    if resume is None:
        checkpoint()  # step 0: a rollback before the first periodic checkpoint has somewhere to go

    # -- modules the step runs through --
    step_model: nn.Module = model
    lane_streams = None
    if _accepts_streams(model) or documents is not None:
        lane_streams = _LaneStreams(model, streams=_accepts_streams(model))
        step_model = lane_streams
    step_model = dist.wrap(step_model, find_unused_parameters=bool(getattr(model, "memory", None)))
    hook = _Hooks(model.pm.hook, model, lane_streams) if step_model is not model else model.pm.hook
    model.train()

    def lanes() -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """``(position, batch, lengths, fresh)``; the last two only for document lanes."""
        skip = set(state.skip_positions or [])
        if documents is None:
            for position, batch in train_data.lanes(settings.batch, context, start=state.position):
                if position not in skip:
                    yield position, batch, None, None
            return
        missed = torch.zeros(settings.batch, dtype=torch.bool)  # documents begun in skipped batches
        for part in documents.batches(start=state.position):
            if part.position in skip:
                missed |= part.fresh
                continue
            yield part.position, part.tokens, part.lengths, part.fresh | missed
            missed[:] = False

    sample_prompt = _sample_prompt(model, settings, val_data if has_val else train_data)
    progress = _Progress(console, total, state.step) if console is not None else None
    started = time.perf_counter()
    last_val = None
    last_loss = None
    speeds: list[float] = []
    rows = slice(info.rank * local_batch, (info.rank + 1) * local_batch)
    stop = min(total, stop_at) if stop_at is not None else total
    try:
        stream = lanes()
        while state.step < stop:
            t0 = time.perf_counter()
            position, batch, lengths, fresh = next(stream)
            batch = batch[rows].to(device, non_blocking=True)
            if fresh is not None:
                _forget_lanes(model, torch.nonzero(fresh[rows]).flatten() + info.rank * local_batch)
            lr = cosine_schedule(state.step, warmup=warmup, total=total, lr=settings.lr, min_lr=min_lr)
            set_lr(optimizer, lr)
            while True:
                try:
                    if lane_streams is not None:
                        lane_streams.start(info.rank * local_batch, None if lengths is None else lengths[rows])
                    out = train_step(step_model, optimizer, list(batch.split(micro)), step=state.step,
                                     hook=hook, precision=precision, clip=settings.clip)
                    break
                except RuntimeError as exc:
                    if not _is_oom(exc):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if micro == 1:
                        raise CortexError(
                            "out of memory with micro_batch 1 — use a smaller model or context, "
                            "gradient_checkpointing: true, or precision: bf16"
                        ) from None
                    old, micro = micro, _divisor_at_most(local_batch, micro // 2)
                    grad_accum = local_batch // micro
                    metrics.write({"step": state.step, "event": "oom_backoff", "micro_batch": micro,
                                   "grad_accum": grad_accum})
                    if console is not None:
                        console.print(f"[yellow]out of memory at step {state.step}: micro-batch {old} -> "
                                      f"{micro}, accumulating {grad_accum}")
            loss, grad_norm = dist.all_reduce_floats([out["loss"], out["grad_norm"]])
            elapsed = time.perf_counter() - t0

            # -- spike detection --
            reason = None
            recent = state.recent or []
            if not math.isfinite(loss) or not math.isfinite(grad_norm) or out.get("skipped"):
                reason = "non-finite loss or gradient"
            elif len(recent) >= settings.spike_window:
                mean = sum(recent) / len(recent)
                if loss > settings.spike_factor * mean:
                    reason = f"loss {loss:.4g} > {settings.spike_factor:g} x recent mean {mean:.4g}"
            if reason is not None:
                state = _rollback(model, optimizer, run_dir, state, position, reason, settings, metrics,
                                  console, micro)
                micro = _divisor_at_most(local_batch, min(micro, state.micro_batch or micro))
                grad_accum = local_batch // micro
                stream = lanes()
                if progress is not None:
                    progress.update(state.step)
                continue

            state.step += 1
            state.position = position
            state.tokens += settings.batch * context
            recent.append(loss)
            state.recent = recent[-settings.spike_window:]
            last_loss = loss
            speed = settings.batch * context / max(elapsed, 1e-9)
            speeds.append(speed)
            line: dict[str, Any] = {
                "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": state.tokens, "tokens_per_s": speed,
            }
            line.update({k: v for k, v in out.items() if k not in ("loss", "grad_norm", "tokens", "lr", "skipped")})
            final = state.step == total
            if has_val and ((settings.eval_every and state.step % settings.eval_every == 0) or final):
                last_val = evaluate(model, val_data, micro, context, settings.eval_batches, precision)
                line["val_loss"] = last_val
                if state.best_val_loss is None or last_val < state.best_val_loss:
                    state.best_val_loss, state.best_step = last_val, state.step
                    line["best"] = True
                    write_best()
            metrics.write(line)
            sample = settings.sample_every and state.step % settings.sample_every == 0
            if (sample or ("val_loss" in line and metrics.loggers)) and sample_prompt is not None:
                text = _sample(model, sample_prompt, settings.sample_tokens, seed=model.manifest.seed + state.step)
                metrics.write({"step": state.step, "event": "sample", "text": text})
                if progress is not None:
                    progress.print(f"[dim]sample @ {state.step}:[/dim] {text!r}")
            if progress is not None:
                window = speeds[-20:]
                progress.update(state.step, loss, sum(window) / len(window))
            if final or state.step == stop or (settings.checkpoint_every and state.step % settings.checkpoint_every == 0):
                checkpoint()
    finally:
        metrics.close()
        if progress is not None:
            progress.stop()
    if state.step == total and not has_val:
        write_best()  # no validation: the final model is the run's model
    dist.barrier()
    elapsed = time.perf_counter() - started
    summary = {
        "steps": state.step, "total_steps": total, "tokens": state.tokens, "loss": last_loss,
        "val_loss": last_val, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
        "tokens_per_s": (sum(speeds) / len(speeds)) if speeds else None, "rollbacks": state.rollbacks,
        "micro_batch": micro, "grad_accum": grad_accum, "precision": precision, "world_size": world,
        "device": str(device), "elapsed_s": elapsed,
    }
    if main:
        write_json(run_dir / "train.json", summary)
    return summary


def _rollback(model: Any, optimizer: torch.optim.Optimizer, run_dir: Path, state: _State, position: int,
              reason: str, settings: TrainSection, metrics: _Metrics, console: Any, micro: int) -> _State:
    """Restore the latest checkpoint and mark the batch ending at ``position`` to be skipped."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CortexError(f"loss spike at step {state.step + 1} ({reason}) and no checkpoint to roll back to")
    rollbacks = state.rollbacks + 1
    if rollbacks > settings.max_rollbacks:
        raise CortexError(
            f"training keeps diverging: {reason} at step {state.step + 1} after {state.rollbacks} rollbacks "
            f"— lower train.lr, raise train.warmup or check the data"
        )
    skip = set(state.skip_positions or []) | {position}
    restored = _State.from_json(load_checkpoint(path, model, optimizer))
    restored.rollbacks = rollbacks
    restored.skip_positions = sorted(skip | set(restored.skip_positions or []))
    restored.total_steps = state.total_steps
    restored.micro_batch = min(micro, restored.micro_batch or micro)
    metrics.truncate(restored.step)
    metrics.write({"step": state.step + 1, "event": "rollback", "reason": reason, "restored": path.name,
                   "restored_step": restored.step, "skipped_position": position})
    if console is not None:
        console.print(f"[yellow]step {state.step + 1}: {reason} — rolled back to {path.name}, skipping that batch")
    return restored


def _sample_prompt(model: Any, settings: TrainSection, data: TokenDataset) -> torch.Tensor | None:
    if settings.sample_prompt:
        ids = model.tokenizer.encode(settings.sample_prompt)
    else:
        ids = [int(t) for t in data.tokens[: min(32, len(data))]]
    if not ids:
        return None
    return torch.tensor([ids[-(model.config.context // 2):]], dtype=torch.long)


def _sample(model: Any, prompt: torch.Tensor, tokens: int, seed: int) -> str:
    """A seeded sample continuation of ``prompt`` (its own generator: training RNG untouched)."""
    device = next(model.core.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    generate = model.generate if hasattr(model, "generate") else model.core.generate  # memory-aware when present
    out = generate(prompt.to(device), tokens, temperature=0.8, top_k=40, generator=generator)
    return model.tokenizer.decode(out[0, prompt.size(1):].tolist())
