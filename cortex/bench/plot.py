"""``cortex plot RUN``: one PNG of a run's training curves, from ``RUN/metrics.jsonl``.

Panels: loss with validation loss (rollbacks marked), learning rate, tokens/s, gradient
norm, then one panel per further numeric metric found (memory statistics and whatever
else plugins add in ``cortex_after_step``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cortex.kernel.errors import CortexError

__all__ = ["plot_metrics", "read_metrics"]

#: step-line keys that are not curves of their own
_NOT_PLOTTED = {"step", "tokens", "best", "val_loss", "skipped", "event"}
_FIRST = ("loss", "lr", "tokens_per_s", "grad_norm")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Step lines (the last one of each step, in step order) and event lines of a metrics file."""
    steps: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
            step = int(obj["step"]) if isinstance(obj, dict) and "step" in obj else None
        except (ValueError, TypeError, RecursionError):
            continue  # a line cut short by a crash, or not a metrics line
        if step is None:
            continue
        if "event" in obj:
            events.append(obj)
        else:
            steps[step] = obj
    return [steps[s] for s in sorted(steps)], events


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(row["step"]))
            ys.append(float(value))
    return xs, ys


def plot_metrics(run: Path, output: Path | None = None) -> Path:
    """Draw the curves of ``run`` into ``output`` (default ``RUN/metrics.png``); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise CortexError(f"{path}: no metrics to plot — train the run first (`cortex train {run}`)")
    rows, events = read_metrics(path)
    if not rows:
        raise CortexError(f"{path}: holds no training steps yet — train the run first")
    keys = [k for k in _FIRST if _series(rows, k)[0]]
    extra = sorted({k for row in rows for k, v in row.items()
                    if k not in _NOT_PLOTTED and k not in _FIRST and isinstance(v, (int, float))})
    keys += [k for k in extra if _series(rows, k)[0]]
    cols = 2
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, label=key, linewidth=1)
        if key == "loss":
            vx, vy = _series(rows, "val_loss")
            if vx:
                ax.plot(vx, vy, "o-", label="val_loss", markersize=3)
            for event in events:
                if event.get("event") == "rollback":
                    ax.axvline(int(event["step"]), color="red", alpha=0.4, linestyle="--")
            ax.legend(loc="upper right")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{run.name if run.is_dir() else run.parent.name}: {rows[-1]['step']} steps")
    fig.tight_layout()
    out = Path(output) if output is not None else (run if run.is_dir() else run.parent) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
