"""examples/full.yaml (every built-in plugin) under two torchrun ranks (gloo) resumes exactly.

Two runs of the same shrunk copy of examples/full.yaml, each leg a fresh ``torchrun``:

* ``straight``: ``N + M`` steps at once;
* ``first`` then ``resume``: ``N`` steps (``stop_at``, as if interrupted), then a new pair
  of processes that loads the run directory and continues with ``resume="auto"``.

The sleep cycle is short enough that NREM and REM happen before and after the resume
point, which falls between two NREM units. Each rank dumps its own weights, plugin state
and RNG at the end; the two runs must agree rank by rank, and the logged metrics of steps
``N+1 .. N+M`` must be the same.

This module is also the per-rank driver: ``torchrun ... -m tests.test_ddp_resume LEG
MANIFEST RUN OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cortex.kernel.errors import CheckpointError
from cortex.runtime.checkpoint import load_checkpoint, rank_state, save_checkpoint, verify_checkpoint
from cortex.runtime.rundir import load_state
from tests.test_checkpoint import _flat  # state dicts as (path, leaf) pairs

ROOT = Path(__file__).resolve().parents[1]
N, M = 7, 11  # steps before and after the interruption
WORLD = 2

#: examples/full.yaml -> the same plugins and settings, small and short
SHRINK = {
    "{type: ltm, settings: {capacity: 4096, index: flat, idle_steps: 100}}":
        "{type: ltm, settings: {capacity: 256, index: flat, idle_steps: 1}}",
    "{type: archive, settings: {capacity: 16384, age_steps: [50, 200], train_after: 1024}}":
        "{type: archive, settings: {capacity: 1024, age_steps: [2, 6], train_after: 32}}",
    "{type: episodic, settings: {capacity: 20000, record_every_steps: 10}}":
        "{type: episodic, settings: {capacity: 2000, record_every_steps: 2}}",
    "{wake: 100, nrem: 10, rem: 4, lr: 1.0e-4}": "{wake: 6, nrem: 2, rem: 1, lr: 1.0e-4}",
    "documents: 4000": "documents: 200",
    "tokens: 400000": f"tokens: {(N + M) * 4 * 64}",
    "batch: 16": "batch: 4",
    "warmup: 30": "warmup: 2",
    "precision: auto": "precision: fp32\n  device: cpu",
    "eval_every: 100": "eval_every: 4\n  eval_batches: 1",
    "checkpoint_every: 100": "checkpoint_every: 4",
}


def shrunk_full_yaml() -> str:
    text = (ROOT / "examples/full.yaml").read_text(encoding="utf-8")
    for old, new in SHRINK.items():
        assert text.count(old) == 1, f"examples/full.yaml changed: {old!r} not found once"
        text = text.replace(old, new)
    return text


# --------------------------------------------------------------------------- the driver (one rank)


def _leg(leg: str, manifest: Path, run: Path, out: Path) -> None:
    from cortex.runtime import distributed
    from cortex.assembly import assemble
    from cortex.runtime.checkpoint import rng_state
    from cortex.kernel.manifest import load_manifest
    from cortex.runtime.rundir import load_run, save_run
    from cortex.runtime.train import train

    torch.set_num_threads(1)
    info = distributed.init_from_env()
    settings = load_manifest(manifest).manifest.train
    if leg == "resume":  # a fresh pair of processes
        model = load_run(run)
        summary = train(model, run, settings, resume="auto")
    else:
        model = assemble(load_manifest(manifest))
        if info.main:
            save_run(model, run.parent, name=run.name)
        distributed.barrier()
        summary = train(model, run, settings, stop_at=N if leg == "first" else None)
    graph = next(f for f in model.features if f.name == "cognition_graph").stats()
    torch.save({"weights": model.core.state_dict(), "state": model.plugin_state(), "rng": rng_state(),
                "graph": graph, "summary": summary}, out / f"{leg}-rank{info.rank}.pt")
    distributed.barrier()
    distributed.destroy()
    os._exit(0)  # no C++ static destructors at exit: see tests/test_ddp.py::_rank


# --------------------------------------------------------------------------- the test


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    return a == b or (a != a and b != b)  # NaN == NaN


def _differences(a: dict, b: dict) -> list[str]:
    fa, fb = dict(_flat(a)), dict(_flat(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k not in fa or k not in fb or not _same(fa[k], fb[k])]


def _steps(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "event" not in row:
            assert row["step"] not in rows, f"step {row['step']} logged twice"
            row.pop("tokens_per_s")  # wall-clock
            rows[row["step"]] = row
    return rows


class _Model:
    """What a checkpoint needs of a model: a core and plugin state."""

    def __init__(self, value: float) -> None:
        self.core = torch.nn.Linear(2, 2)
        self.state = {"feature": {"seen": torch.tensor([value]), "count": int(value)}}

    def plugin_state(self) -> dict:
        return self.state

    def load_plugin_state(self, state: dict, where: str = "") -> None:
        self.state = state


def test_a_checkpoint_keeps_each_ranks_part_and_restores_the_asked_one(tmp_path):
    torch.manual_seed(5)
    part = rank_state(_Model(1.0))  # as rank 1 hands it to rank 0
    torch.manual_seed(0)
    model = _Model(0.0)
    optimizer = torch.optim.SGD(model.core.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path, model, optimizer, {"step": 3}, ranks=[part])
    info = verify_checkpoint(path)
    assert info["ranks"] == 2 and {"rank-1/state.safetensors", "rank-1/rng.pt"} <= set(info["files"])

    loaded = _Model(9.0)
    load_checkpoint(path, loaded, rank=1)
    assert loaded.state["feature"]["count"] == 1 and loaded.state["feature"]["seen"].tolist() == [1.0]
    assert torch.equal(torch.get_rng_state(), part["rng"]["torch"])
    load_checkpoint(path, loaded)  # one process, two ranks saved: rank 0's part
    assert loaded.state["feature"]["count"] == 0
    with pytest.raises(CheckpointError, match="no rank 2"):
        load_checkpoint(path, loaded, rank=2)
    (path / "rank-1" / "state.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="rank-1/state.safetensors: corrupt"):
        verify_checkpoint(path)


def _torchrun(*args: str) -> None:
    """``torchrun --standalone --nproc-per-node 2 -m tests.test_ddp_resume ARGS`` (gloo)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
         "-m", "tests.test_ddp_resume", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_full_yaml_resumes_exactly_under_two_ranks(tmp_path):
    manifest = tmp_path / "full.yaml"
    manifest.write_text(shrunk_full_yaml(), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    straight, resumed = tmp_path / "runs" / "straight", tmp_path / "runs" / "resumed"
    _torchrun("straight", str(manifest), str(straight), str(out))
    _torchrun("first", str(manifest), str(resumed), str(out))
    before = _steps(resumed)
    _torchrun("resume", str(manifest), str(resumed), str(out))
    a = [torch.load(out / f"straight-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    b = [torch.load(out / f"resume-rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # the run did what it should: every plugin, sleep on both sides of the resume point
    assert a[0]["summary"]["steps"] == b[0]["summary"]["steps"] == N + M
    assert a[0]["summary"]["world_size"] == WORLD
    logged = _steps(straight)
    phases = [logged[s]["sleep/phase"] for s in range(1, N + M + 1)]
    assert phases == [0] * 6 + [1, 1, 2] + [0] * 6 + [1, 1, 2], phases
    assert phases[N - 1] == phases[N] == 1  # interrupted between the two NREM units
    assert logged[N]["sleep/consolidated"] > 0 and logged[N + 1]["sleep/consolidated"] > 0
    assert {key.rsplit(".", 1)[-1] for key in a[0]["state"]} == {  # cognition_graph: rebuilt in REM
        "memory_system", "stm", "ltm", "archive", "cortical_columns", "homeostasis", "hebbian", "bcm",
        "episodic", "working", "cls", "sleep_wake"}
    for r in range(WORLD):  # entries reached the archive and aged into its last level
        levels = a[r]["state"]["memory.2.archive"]["levels"]
        assert levels[0]["n"] > 0 and levels[-1]["n"] > 0, levels
        assert a[r]["graph"] and a[r]["graph"] == b[r]["graph"]

    # the metrics of the resumed steps, and the first leg's, are those of the straight run
    after = _steps(resumed)
    assert sorted(after) == list(range(1, N + M + 1))
    assert all(after[s] == before[s] for s in before)
    for s in range(1, N + M + 1):
        assert after[s] == logged[s], (s, {k: (v, after[s].get(k)) for k, v in logged[s].items()
                                           if after[s].get(k) != v})

    # every rank ends with the straight run's weights, plugin state and RNG, exactly
    for r in range(WORLD):
        for name, w in a[r]["weights"].items():
            assert torch.equal(w, b[r]["weights"][name]), (r, name, (w - b[r]["weights"][name]).abs().max())
        assert _differences(a[r]["state"], b[r]["state"]) == [], r
        # torch's generator (numpy's and Python's are not seeded by assemble: not comparable)
        assert torch.equal(a[r]["rng"]["torch"], b[r]["rng"]["torch"]), r

    # across ranks: weights and the state every rank must share (plasticity, reduced over
    # ranks; the fast path and the sleep buffer, built from every rank's rows) are identical;
    # what a rank keeps of the data it saw itself (its lanes' memories and working memory,
    # the episodes of its rows) is its own
    for name, w in a[0]["weights"].items():
        assert torch.equal(w, a[1]["weights"][name]), name
    differ = {key.split("/")[1] for key in _differences(a[0]["state"], a[1]["state"])}
    own = {"memory.0.stm", "features.0.episodic", "features.1.working"}
    assert own <= differ <= own | {"memory_system", "memory.1.ltm", "memory.2.archive"}, differ

    # the last checkpoint holds each rank's own part, and it is what that rank had
    last = straight / "checkpoints" / f"step-{N + M:08d}"
    assert json.loads((last / "checkpoint.json").read_text())["ranks"] == WORLD
    assert _differences(load_state(last), a[0]["state"]) == []
    assert _differences(load_state(last / "rank-1"), a[1]["state"]) == []
    assert torch.equal(torch.load(last / "rank-1" / "rng.pt", weights_only=True)["torch"], a[1]["rng"]["torch"])


if __name__ == "__main__":
    _leg(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
