"""Run directories: written atomically, loaded back exactly.

A run directory holds ``manifest.yaml`` (the manifest as written), ``model.safetensors``,
``tokenizer.json``, ``state.safetensors`` + ``state.json`` (every plugin's state) and
``build.json`` (versions, plugin sources, summary). It is assembled in a temporary
directory beside its destination and renamed into place, so a crash never leaves half a run.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from cortex.kernel import VERSION
from cortex.kernel.errors import CheckpointError, CortexError
from cortex.kernel.manifest import RUN_NAME

RUN_FILES = ("manifest.yaml", "model.safetensors", "tokenizer.json", "state.safetensors", "state.json", "build.json")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staged_directory(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise CortexError(f"{dest} already exists; pass --overwrite or choose another -o/--name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_path(out_dir: Path, name: str) -> Path:
    """The run directory ``out_dir/name``; a name can never point outside ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise CortexError(f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-'")
    path = (out_dir / name).resolve()
    if path.parent != out_dir:
        raise CortexError(f"run name {name!r} would write outside {out_dir}")
    return path


# ------------------------------------------------------------------ the writer's lock


@contextmanager
def run_lock(run: Path, command: str) -> Iterator[None]:
    """Hold the advisory lock of run directory ``run`` while the block writes it.

    The lock is a file beside the run (``.NAME.lock``, removed on release), so it also
    guards a run being built or replaced. A second writer fails at once with a
    [`CortexError`][cortex.kernel.errors.CortexError] naming the holder's pid and command;
    readers (``generate``, ``memory``) never take it. Under ``torchrun`` only rank 0 locks.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    run = Path(run).resolve()
    run.parent.mkdir(parents=True, exist_ok=True)
    lock_file = run.parent / f".{run.name}.lock"
    while True:
        fh = open(lock_file, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise CortexError(f"{run} is in use by {holder}; wait for it to finish, or use another run") from None
        try:  # the holder before us may have removed the file between our open and our lock
            if os.fstat(fh.fileno()).st_ino == os.stat(lock_file).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} ({command})\n")
        fh.flush()
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # removed while still held, so nobody locks a stale file
        fh.close()


# ------------------------------------------------------------------ plugin state


def flatten_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested plugin state into tensors (for safetensors) and JSON with references."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {str(k): walk(v, f"{key}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, "state")


def unflatten_state(tensors: dict[str, torch.Tensor], data: Any) -> Any:
    """Inverse of [`flatten_state`][cortex.runtime.rundir.flatten_state]."""
    if isinstance(data, dict):
        if set(data) == {"__tensor__"}:
            return tensors[data["__tensor__"]]
        return {k: unflatten_state(tensors, v) for k, v in data.items()}
    if isinstance(data, list):
        return [unflatten_state(tensors, v) for v in data]
    return data


def save_state(directory: Path, state: dict[str, Any], *, weights: str | None = None) -> None:
    """Write plugin state as ``state.safetensors`` (authoritative: tensors plus the JSON
    part in its metadata, replaced in one rename) and a readable copy ``state.json``.
    ``weights`` is the generation of the weights this state goes with (see ``write_into``)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".state.", suffix=".tmp")
    os.close(fd)
    tmp = _state_file(state, weights, Path(name))
    try:
        os.replace(tmp, directory / "state.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    write_json(directory / "state.json", flatten_state(state)[1])


def _state_file(state: dict[str, Any], weights: str | None, file: Path) -> Path:
    tensors, data = flatten_state(state)
    metadata = {"cortex_state": json.dumps(data, ensure_ascii=False)}
    if weights is not None:
        metadata[WEIGHTS_KEY] = weights
    save_file(tensors, str(file), metadata=metadata)
    return file


def save_memory(model: Any, run: Path) -> None:
    """Write ``model``'s plugin state (what it learnt in real-time use) back into run ``run``."""
    save_state(Path(run), model.plugin_state(), weights=getattr(model, "weights_generation", None))


def load_state(directory: Path) -> dict[str, Any]:
    """Read what [`save_state`][cortex.runtime.rundir.save_state] wrote."""
    path = directory / "state.safetensors"
    with safe_open(path, framework="pt") as fh:
        text = (fh.metadata() or {}).get("cortex_state")
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    data = json.loads(text) if text is not None else json.loads((directory / "state.json").read_text("utf-8"))
    return unflatten_state(tensors, data)


# ------------------------------------------------------------------ runs


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run and benchmark."""
    return {
        "cortex": VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def save_run(model: Any, out_dir: Path, *, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (a [`CortexModel`][cortex.model.CortexModel]) as a run directory; from then
    on ``model.save()`` rewrites it."""
    dest = run_path(out_dir, name or model.manifest.name)
    with staged_directory(dest, overwrite=overwrite) as tmp:
        write_into(model, tmp)
    _bind_run(model, dest)
    return dest


def save_model_run(model: Any, path: Path | None) -> Path:
    """What [`CortexModel.save`][cortex.model.CortexModel.save] does: rewrite the model's own run
    directory in place (``path`` ``None`` or that run), holding the run's lock, or write a
    new run directory ``path`` (staged and renamed into place; an existing one is refused)."""
    own = Path(model.run_dir).resolve() if model.run_dir is not None else None
    path = own if path is None else Path(path).expanduser().resolve()
    if path is None:
        raise CortexError("this model has no run directory yet: give save a path, e.g. model.save('runs/my-model')")
    if path == own:
        with run_lock(path, "model.save"):
            write_into(model, path)
        return path
    if path.exists():
        raise CortexError(f"{path} already exists and is not the run this model was loaded from; "
                          "choose a new path (or load that run to change it)")
    with run_lock(path, "model.save"), staged_directory(path) as tmp:
        write_into(model, tmp)
    _bind_run(model, path)
    return path


def _bind_run(model: Any, path: Path) -> None:
    """Make ``path`` the run ``model.save()`` writes, with this module as its writer."""
    model.run_dir = Path(path)
    model.run_writer = save_model_run


def write_into(model: Any, directory: Path) -> None:
    """Write every run file of ``model`` into an existing directory.

    The weights and the plugin state are one set: both carry a new *generation* token and
    are written in full under pending names before either replaces the old file, weights
    first. A process killed between the two renames leaves the new state pending; loading
    the run (or the next write) completes the rename, so the directory always loads as
    one save. Stray temporary files of earlier writes are removed.
    """
    directory = Path(directory)
    complete_pending_write(directory)
    for stray in directory.glob(".*.tmp"):
        if stray.is_file():
            stray.unlink(missing_ok=True)
    atomic_write(directory / "manifest.yaml", model.validated.source.text)
    model.tokenizer.save(directory / "tokenizer.json")
    generation = secrets.token_hex(8)
    weights = directory / f".model.safetensors.{generation}.tmp"
    save_model(model.core, str(weights), metadata={WEIGHTS_KEY: generation})
    plugin_state = model.plugin_state()
    state = _state_file(plugin_state, generation, directory / f".state.safetensors.{generation}.tmp")
    os.replace(weights, directory / "model.safetensors")
    os.replace(state, directory / "state.safetensors")
    model.weights_generation = generation
    write_json(directory / "state.json", flatten_state(plugin_state)[1])
    write_json(directory / "build.json", {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
        "summary": model.summary(),
    })


#: the safetensors metadata key of the weights' generation, in the weights and in the state
WEIGHTS_KEY = "cortex_weights"


def _generation(file: Path) -> str | None:
    try:
        with safe_open(str(file), framework="pt") as fh:
            return (fh.metadata() or {}).get(WEIGHTS_KEY)
    except (SafetensorError, OSError):
        return None


def complete_pending_write(directory: Path) -> None:
    """Finish a ``write_into`` that was killed after the weights were replaced and before
    the state was: the state of the weights' generation is waiting under its pending name."""
    weights = _generation(directory / "model.safetensors")
    if weights is None or _generation(directory / "state.safetensors") in (weights, None):
        return
    pending = directory / f".state.safetensors.{weights}.tmp"
    if _generation(pending) == weights:
        os.replace(pending, directory / "state.safetensors")


def load_weights(core: torch.nn.Module, file: Path, *, device: str = "cpu") -> None:
    """Load ``file`` into ``core``; a missing, unreadable or mismatched file is a CheckpointError."""
    try:
        missing, unexpected = load_model(core, str(file), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file}: cannot be loaded: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}) — was it written by another manifest?"
        )


def load(run: str | Path, *, device: str = "cpu") -> Any:
    """Load a run directory for real-time use: ``cortex.load("runs/quickstart").chat("...")``."""
    return load_run(Path(run), device=device).eval()


def load_run(path: Path, *, device: str = "cpu") -> Any:
    """Rebuild the model of a run directory: manifest, weights, tokenizer and plugin state."""
    from cortex.assembly import assemble
    from cortex.kernel.manifest import load_manifest
    from cortex.core.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run directory (build one with `cortex build MANIFEST`)")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete run directory, missing {', '.join(missing)}")
    built = load_manifest(path / "manifest.yaml")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    model = assemble(built, device=device, tokenizer=tokenizer)
    complete_pending_write(path)
    load_weights(model.core, path / "model.safetensors", device=device)
    weights, state_of = _generation(path / "model.safetensors"), _generation(path / "state.safetensors")
    if weights is not None and state_of is not None and weights != state_of:
        raise CheckpointError(f"{path}: the memory state belongs to other weights than model.safetensors "
                              "(a write was interrupted) — restore the run from a checkpoint "
                              "(`cortex train RUN --resume auto`) or build it again")
    model.weights_generation = weights
    try:
        state = load_state(path)
    except (SafetensorError, OSError, ValueError, KeyError, RecursionError) as exc:
        raise CheckpointError(f"{path}: plugin state cannot be read: {str(exc)[:300]}") from None
    model.load_plugin_state(state, where=str(path / "state.safetensors"))
    _bind_run(model, path)
    return model
