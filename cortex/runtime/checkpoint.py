"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``RUN/checkpoints/step-XXXXXXXX/`` (the number of optimiser
updates done) holding::

    model.safetensors   the core's weights
    optimizer.pt        the optimiser's state dict (torch.save; read with weights_only=True)
    trainer.json        step, schedule, data position, best validation loss, spike history
    rng.pt              torch CPU (+ CUDA) generator states, numpy's and Python's
    state.safetensors   every plugin's state (model.plugin_state()), tensors ...
    state.json          ... and the rest
    rank-N/             under DDP: rank N's own rng.pt, state.safetensors and state.json
                        (N = 1 .. world size - 1; the files above are rank 0's)
    checkpoint.json     written last: the number of ranks, the size and sha256 of each file

Under DDP the ranks share weights and optimiser state, but what a plugin keeps of the data
its rank saw (the memory of the rank's lanes, the episodes of its rows) is the rank's own,
and so are its RNG states. Every rank hands its part ([`rank_state`][cortex.runtime.checkpoint.rank_state])
to rank 0, which writes the checkpoint; on resume each rank restores its own part, so a
resumed run continues exactly as the uninterrupted one would. Resumed with another number
of processes, every rank starts from rank 0's part (the lanes are dealt out differently,
so that continuation is not exact).

It is assembled in a temporary folder beside its destination and renamed into place
([`staged_directory`][cortex.runtime.rundir.staged_directory]), then the ``checkpoints/latest``
pointer is replaced atomically, and only then are old checkpoints pruned. A process killed
at any moment (``kill -9`` included) therefore leaves ``latest`` naming a complete
checkpoint. A checkpoint that was damaged afterwards fails its checksum and raises a
[`CheckpointError`][cortex.kernel.errors.CheckpointError] naming the file.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from cortex.kernel.errors import CheckpointError
from cortex.runtime import distributed
from cortex.runtime.rundir import (
    atomic_write,
    flatten_state,
    load_state,
    load_weights,
    save_state,
    staged_directory,
    unflatten_state,
    write_json,
)

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointError",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "rank_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT = 1
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer.json", "rng.pt",
                    "state.safetensors", "state.json")
#: the files of each ``rank-N/`` folder (rank N's own part)
RANK_FILES = ("rng.pt", "state.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator that training may draw from, in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what [`rng_state`][cortex.runtime.checkpoint.rng_state] returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def rank_state(model: Any) -> dict[str, Any]:
    """This process's own part of a checkpoint: its plugin state and RNG states (CPU tensors).

    Under DDP every rank but 0 hands it to rank 0
    ([`gather_object`][cortex.runtime.distributed.gather_object]), which passes the list to
    [`save_checkpoint`][cortex.runtime.checkpoint.save_checkpoint] as ``ranks``.
    """
    return {"state": unflatten_state(*flatten_state(model.plugin_state())), "rng": rng_state()}


def _rank_files(ranks: int) -> list[str]:
    return [*CHECKPOINT_FILES, *(f"rank-{r}/{f}" for r in range(1, ranks) for f in RANK_FILES)]


# --------------------------------------------------------------------------- listing


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` points to (or the newest folder without it)."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{pointer}: does not name a checkpoint ({name!r}); delete it to use the newest folder")
        path = root / name
        if not path.is_dir():
            raise CheckpointError(
                f"{pointer}: points to {name}, which does not exist — delete {pointer} to fall back "
                "to the newest checkpoint folder, or pass --resume PATH"
            )
        return path
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(resume: str | Path, run_dir: Path) -> Path:
    """``"auto"`` -> the run's latest checkpoint; a path -> that checkpoint folder.

    A run directory given as the path means its latest checkpoint.
    """
    if str(resume) == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(
                f"{run_dir}: no checkpoint to resume from (checkpoints/ is empty) — train without --resume"
            )
        return path
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint — pass a checkpoints/step-XXXXXXXX folder or `auto`")
    if (path / "checkpoints").is_dir() and not (path / "checkpoint.json").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: the run has no checkpoints")
        return latest
    return path


# --------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
    *,
    keep: int = 2,
    fail_after: int | None = None,
    ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step-<trainer['step']>`` of ``model`` (a CortexModel) atomically.

    ``trainer`` is the loop's JSON-serialisable state; its ``step`` names the folder. The
    ``latest`` pointer is updated, then all but the newest ``keep`` checkpoints are
    deleted. ``ranks`` (under DDP): the parts of ranks 1, 2, ...
    ([`rank_state`][cortex.runtime.checkpoint.rank_state] on each), written to ``rank-N/``; the
    model's own state and this process's RNG are rank 0's. ``fail_after`` (tests only)
    raises after writing that many files, as a crash in the middle of the write would.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{int(trainer['step']):08d}"
    dest = root / name
    written = [0]

    def wrote() -> None:
        written[0] += 1
        if fail_after is not None and written[0] >= fail_after:
            raise RuntimeError(f"simulated crash after writing {written[0]} checkpoint files")

    with staged_directory(dest, overwrite=True) as tmp:
        save_model(model.core, str(tmp / "model.safetensors"))
        wrote()
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        wrote()
        write_json(tmp / "trainer.json", {"format": FORMAT, **trainer})
        wrote()
        torch.save(rng_state(), tmp / "rng.pt")
        wrote()
        save_state(tmp, model.plugin_state())
        wrote()
        for r, part in enumerate(ranks or [], start=1):
            (tmp / f"rank-{r}").mkdir()
            torch.save(part["rng"], tmp / f"rank-{r}" / "rng.pt")
            save_state(tmp / f"rank-{r}", part["state"])
            wrote()
        count = 1 + len(ranks or [])
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in _rank_files(count)}
        write_json(tmp / "checkpoint.json",
                   {"format": FORMAT, "step": int(trainer["step"]), "ranks": count, "files": files})
    atomic_write(root / "latest", name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- load


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check that every file of the checkpoint is present and intact; return checkpoint.json."""
    path = Path(path)
    fix = "resume from an earlier checkpoint (--resume RUN/checkpoints/step-...) or delete this one"
    index = path / "checkpoint.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    if not index.is_file():
        raise CheckpointError(f"{index}: missing — the checkpoint is incomplete; {fix}")
    try:
        info = json.loads(index.read_text(encoding="utf-8"))
        files = info["files"]
        ranks = int(info.get("ranks", 1))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: unreadable ({str(exc)[:300]}); {fix}") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{index}: checkpoint format {info.get('format')!r} is not {FORMAT}; {fix}")
    if ranks < 1:
        raise CheckpointError(f"{index}: ranks {ranks} is not a number of processes; {fix}")
    for name in _rank_files(ranks):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"{file}: missing — the checkpoint is incomplete; {fix}")
        expected = files[name]
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: corrupt (size or checksum differs from checkpoint.json); {fix}")
    return info


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True,
    rank: int | None = None,
) -> dict[str, Any]:
    """Restore weights, optimiser state, plugin state and RNG states; return trainer.json.

    Plugin and RNG state are those of ``rank``; by default this process's rank when the
    checkpoint was written by as many processes as now run, else rank 0's.
    """
    path = Path(path)
    info = verify_checkpoint(path)
    saved_ranks = int(info.get("ranks", 1))
    if rank is None:
        rank = distributed.rank() if saved_ranks == distributed.world_size() else 0
    if not 0 <= rank < saved_ranks:
        raise CheckpointError(f"{path}: written by {saved_ranks} process(es), it has no rank {rank}")
    own = path / f"rank-{rank}" if rank else path
    device = next(model.core.parameters()).device
    load_weights(model.core, path / "model.safetensors", device=str(device))
    if optimizer is not None:
        state = _load_tensors(path / "optimizer.pt", device)
        try:
            optimizer.load_state_dict(state)
        except Exception as exc:
            raise CheckpointError(f"{path / 'optimizer.pt'}: does not fit this model's optimiser: {exc}") from None
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path / 'trainer.json'}: unreadable: {str(exc)[:300]}") from None
    try:
        plugin_state = load_state(own)
    except (SafetensorError, OSError, ValueError, KeyError, RecursionError) as exc:
        raise CheckpointError(f"{own}: plugin state cannot be read: {str(exc)[:300]}") from None
    model.load_plugin_state(plugin_state, where=str(own / "state.safetensors"))
    if restore_rng:
        try:
            set_rng_state(_load_tensors(own / "rng.pt", "cpu"))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{own / 'rng.pt'}: cannot be restored: {exc}") from None
    return trainer


def _load_tensors(file: Path, device: Any) -> Any:
    """``torch.load(file, weights_only=True)``: tensors and plain containers, never pickled code."""
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: not a checkpoint file this version of Cortex wrote (it holds more "
                              "than tensors); Cortex never loads such a file, since unpickling can run code") from None
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot be loaded: {str(exc)[:300]}") from None
