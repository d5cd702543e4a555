"""Ablation study: train the same small model with each component switched off in turn.

    python examples/pipelines/ablation_study.py [MANIFEST] [-o OUT] [--train-steps 200] [--tiny]

Drives the real ``ablate`` benchmark suite (``cortex bench ablate``, in
``cortex_plugins.bench.ablate``) with training switched on: the manifest as written and
one variant without each memory tier, plasticity rule and feature are each trained
``--train-steps`` steps on the manifest's data from the same seed, then measured by the
same suites (``recall`` and ``facts``; ``recall`` alone with ``--quick``). The command line
``cortex bench ablate`` measures untrained variants; training is what this script adds,
together with each variant's final training and validation loss.

Without MANIFEST it uses a small built-in one with two memory tiers (stm, ltm), a Hebbian
rule and working memory. It writes into OUT (default ``runs/pipelines/ablation``):

- ``ablation.md``: one row per metric, one column per variant, each cell the value and its
  change from the full model (also printed);
- ``report.md`` and ``results.json``: the suite's own report, as ``cortex bench`` writes it.

``--tiny`` is the size the tests run: a 32-wide core, 10 training steps, quick measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from cortex.bench.harness import SuiteResult, render_report
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import BuildContext
from cortex.kernel.plugins import create_plugin_manager
from cortex.runtime.rundir import atomic_write, environment, write_json

MANIFEST = """\
cortex: 1
name: ablation
seed: 0
model: {{dim: {dim}, layers: 2, heads: 2, context: 64, memory_layers: [1]}}
tokenizer: {{type: byte}}
memory:
  - {{type: stm, settings: {{capacity: 64}}}}
  - {{type: ltm, settings: {{capacity: 4096, index: flat}}}}
memory_system: {{read: [knn_attention, knn_lm], key_layer: 0, key_window: 16}}
plasticity:
  - {{type: hebbian, target: "blocks.0.attn.proj", settings: {{lr: 1.0e-5, norm: initial}}}}
features:
  - {{type: working, settings: {{slots: 8, tasks: 2}}}}
train:
  data: {{type: demo, settings: {{documents: {documents}}}}}
  batch: 8
  lr: 3.0e-3
  warmup: 5
  precision: fp32
  eval_every: 0
  eval_batches: 4
  checkpoint_every: 0
"""
SIZES = {"default": dict(dim=64, documents=2000, train_steps=200),
         "tiny": dict(dim=32, documents=200, train_steps=10)}
LOSSES = ("train loss", "val loss")  # train.json's final `loss` and `val_loss`


def ablate_suite(train_steps: int, suites: list[str] | None):
    """The registered ``ablate`` suite, set to train every variant; it also keeps each
    variant's ``train.json`` (losses) before the suite deletes the variant's run."""
    info = create_plugin_manager().registry.get("bench", "ablate")

    class AblateWithLosses(info.cls):
        def __init__(self, settings, context):
            super().__init__(settings, context)
            self.trained: list[dict] = []

        def _trained(self, manifest, tmp, log):
            run = super()._trained(manifest, tmp, log)
            self.trained.append(json.loads((run / "train.json").read_text(encoding="utf-8")))
            return run

    settings = {"train_steps": train_steps, **({"suites": suites} if suites else {})}
    return AblateWithLosses(info.cls.Settings(**settings), BuildContext())


def _natural(metric: str) -> list[tuple[int, int | str]]:
    """Sort key: ``recall:passkey:knn_lm:4`` before ``...:16``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in metric.split(":")]


def pivot(table: dict[str, dict[str, dict[str, float]]]) -> tuple[list[str], list[list[str]]]:
    """One row per metric, one column per variant; a cell is ``value (change from full)``."""
    full = table["full"]
    metrics = [m for m in LOSSES if m in full] + sorted((m for m in full if m not in LOSSES), key=_natural)
    rows = []
    for metric in metrics:
        cells = [metric]
        for label, values in table.items():
            if metric not in values:
                cells.append("—")
                continue
            value = values[metric]["mean"]
            digits = 4 if metric in LOSSES else 3
            change = value - full[metric]["mean"]
            cells.append(f"{value:.{digits}f}" if label == "full" else f"{value:.{digits}f} ({change:+.{digits}f})")
        rows.append(cells)
    return ["metric", *table], rows


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, nargs="?", help="manifest to ablate (default: a built-in one)")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/pipelines/ablation"))
    parser.add_argument("--train-steps", type=int, help="training steps per variant (0: untrained)")
    parser.add_argument("--suites", help="comma-separated suites to measure (default: recall,facts)")
    parser.add_argument("--seeds", type=int, default=1, help="measuring seeds per variant")
    parser.add_argument("--quick", action="store_true", help="the suites' quick settings (recall only)")
    parser.add_argument("--threads", type=int, help="torch and FAISS threads (default: theirs; --tiny: 1)")
    parser.add_argument("--tiny", action="store_true", help="the small size the tests use (implies --quick)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    threads = args.threads or (1 if args.tiny else None)
    if threads is None:
        return ablate(args)
    with_threads = _threads(threads)
    try:
        return ablate(args)
    finally:
        _threads(*with_threads)


def _threads(torch_threads: int, faiss_threads: int | None = None) -> tuple[int, int | None]:
    """Set torch's (and FAISS's) thread counts; returns the previous ones. Tiny models gain
    nothing from more threads, and OpenMP threads stall badly when another process holds a core."""
    import torch

    before = torch.get_num_threads(), None
    torch.set_num_threads(torch_threads)
    try:
        import faiss
    except ImportError:
        return before
    before = before[0], faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(faiss_threads or torch_threads)
    return before


def ablate(args: argparse.Namespace) -> dict:
    size = SIZES["tiny" if args.tiny else "default"]
    steps = size["train_steps"] if args.train_steps is None else args.train_steps
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = args.manifest
    if manifest is None:
        manifest = out / "ablation.yaml"
        manifest.write_text(MANIFEST.format(**size), encoding="utf-8")
    elif not manifest.is_file():
        sys.exit(f"{manifest}: no such manifest")
    components = [f"{section}[{i}] {item['type']}"
                  for section in ("memory", "plasticity", "features")
                  for i, item in enumerate(yaml.safe_load(manifest.read_text(encoding="utf-8")).get(section) or [])]
    if not components:
        sys.exit(f"{manifest}: has no memory tiers, plasticity rules or features to switch off")

    suite = ablate_suite(steps, args.suites.split(",") if args.suites else None)
    started = time.time()
    try:
        result: SuiteResult = suite.run([manifest], quick=args.quick or args.tiny, seeds=list(range(args.seeds)),
                                        log=lambda msg: print(msg, flush=True))
    except CortexError as exc:  # e.g. --train-steps without a train: section
        sys.exit(f"error: {exc}")
    table = result.figures[str(manifest)]
    for label, summary in zip(table, suite.trained):  # variants are trained in table order
        for key, metric in zip(("loss", "val_loss"), LOSSES):
            if summary.get(key) is not None:
                table[label][metric] = {"mean": summary[key], "std": 0.0}

    columns, rows = pivot(table)
    title = (f"Ablation of {manifest.name}: each variant trained {steps} steps" if steps
             else f"Ablation of {manifest.name}: untrained variants")
    text = f"# {title}\n\nCell: value (change from `full`).\n\n" + markdown(columns, rows)
    atomic_write(out / "ablation.md", text)
    meta = {"duration_s": round(time.time() - started, 1), "quick": args.quick or args.tiny,
            "seeds": list(range(args.seeds)), "targets": [str(manifest)], "train_steps": steps, **environment()}
    command = ["python", "examples/pipelines/ablation_study.py", *args.argv]
    atomic_write(out / "report.md", render_report("ablate", command, meta, result))
    write_json(out / "results.json", {"suite": "ablate", "command": command, **meta, "figures": result.figures,
                                      "components": components, "notes": result.notes})
    print(f"\n{text}\nreport: {out / 'ablation.md'}")
    return {"components": components, "table": table, "markdown": out / "ablation.md"}


if __name__ == "__main__":
    main()
