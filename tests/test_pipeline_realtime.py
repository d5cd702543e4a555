"""The real-time learning demo runs end to end (teach, restart in a new process, ask)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from cortex.runtime.rundir import save_run
from tests.conftest import tiny_manifest

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = tiny_manifest("demo", context=96, memory_system={"read": ["knn_lm"]}, memory=[
    {"type": "stm", "settings": {"capacity": 64}}, {"type": "ltm", "settings": {"capacity": 4096}}])


def test_demo_recalls_with_memory_and_not_without(build_model, tmp_path):
    torch.manual_seed(0)
    run = save_run(build_model(MANIFEST), tmp_path / "runs")
    # one OpenMP thread in the demo's processes (the tiny model gains nothing from more, and two
    # threads stall on a busy machine: 22 s -> 5 s, the same table)
    out = subprocess.run([sys.executable, str(ROOT / "examples/pipelines/realtime_learning.py"), str(run),
                          "--facts", "6"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:2]): [float(x) for x in line.split()[2:]]
            for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {(m, t) for m in ("on", "off") for t in ("1", "2", "3")}
    on_recall = sum(rows[("on", t)][0] for t in "123") / 3
    off_recall = sum(rows[("off", t)][0] for t in "123") / 3
    assert on_recall > off_recall and off_recall == 0.0
    assert rows[("on", "3")][1] > rows[("off", "3")][1]  # confidence with memory beats without
