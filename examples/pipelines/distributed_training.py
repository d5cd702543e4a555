"""Distributed training: two ``torchrun`` ranks train a manifest, then resume the run.

    python examples/pipelines/distributed_training.py [-o OUT] [--nproc 2] [--tiny]

Runs the real command line under ``torchrun --standalone``, on the CPU (gloo):

1. ``torchrun --standalone --nproc_per_node 2 -m cortex.cli.app train manifest.yaml --steps N``
   builds the run directory (rank 0 writes it) and trains it, each rank reading its own
   rows of every global batch;
2. ``cortex train manifest.yaml --steps N`` in one process, into another folder, for
   comparison (skip with ``--no-compare``): the two ranks together make the same updates as
   one process with the whole batch, so the losses of every step must agree within
   ``--tolerance`` (the default size: within 4e-5 over 100 steps). The ranks sum in another
   order; a loss spike early in training (too short a warm-up) can blow such rounding
   differences up into two different, equally good paths, and ``--compare-steps K`` then
   compares only the first K steps;
3. ``torchrun ... -m cortex.cli.app train RUN --resume auto --steps M`` continues the run from its
   latest checkpoint to step ``M``;
4. the run directory is loaded back in this process and checked: ``train.json`` says two
   processes and ``M`` steps, ``metrics.jsonl`` has steps 1..M once each (the first ``N``
   unchanged by the resume), ``checkpoints/latest`` is step ``M``, and the model generates.

It prints the checks and the losses, writes ``OUT/report.json`` and exits 1 when a check
fails. ``--tiny`` is the size the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"default": dict(dim=128, layers=4, context=128, documents=4000, steps=100, resume_steps=200, every=50,
                    warmup=10),
         "tiny": dict(dim=32, layers=2, context=32, documents=300, steps=4, resume_steps=8, every=2, warmup=2)}


def manifest(size: dict) -> str:
    return f"""\
cortex: 1
name: ddp
seed: 0
model: {{dim: {size['dim']}, layers: {size['layers']}, heads: 2, context: {size['context']}}}
tokenizer: {{type: byte}}
train:
  data: {{type: demo, settings: {{documents: {size['documents']}}}}}
  tokens: {size['resume_steps'] * 8 * size['context']}
  batch: 8
  lr: 3.0e-3
  warmup: {size['warmup']}
  precision: fp32
  device: cpu
  eval_every: {size['every']}
  eval_batches: 2
  checkpoint_every: {size['every']}
"""


def run(work: Path, label: str, argv: list[str]) -> float:
    """Run a command in ``work``, logging its output to ``commands.log``; seconds taken."""
    print(f"$ {label}", flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=env)
    with open(work / "commands.log", "a", encoding="utf-8") as log:
        log.write(f"$ {label}\n{out.stdout}{out.stderr}\n")
    if out.returncode != 0:
        sys.exit(f"`{label}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - started


def torchrun(work: Path, nproc: int, *args: str) -> float:
    launcher = ["--standalone", "--nproc_per_node", str(nproc)]
    return run(work, " ".join(["torchrun", *launcher, "-m", "cortex.cli.app", *args]),
               [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "cortex.cli.app", *args])


def step_losses(run_dir: Path) -> dict[int, float]:
    """``{step: loss}`` of ``metrics.jsonl``; a step logged twice is an error."""
    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "event" not in row:
            assert row["step"] not in losses, f"step {row['step']} logged twice"
            losses[row["step"]] = row["loss"]
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/pipelines/distributed"))
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks); train.batch 8 must divide by it")
    parser.add_argument("--tiny", action="store_true", help="the small size the tests use")
    parser.add_argument("--no-compare", action="store_true", help="skip the single-process comparison run")
    parser.add_argument("--compare-steps", type=int, default=0,
                        help="compare only the first K steps' losses (default: every step)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="allowed |DDP - single| loss per step")
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "default"]
    if 8 % args.nproc:
        parser.error("--nproc must divide the batch of 8")
    import torch  # after argument parsing: --help stays fast

    work = args.output.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "commands.log").unlink(missing_ok=True)
    (work / "manifest.yaml").write_text(manifest(size), encoding="utf-8")
    first, total = size["steps"], size["resume_steps"]

    seconds = {"first": torchrun(work, args.nproc, "train", "manifest.yaml", "-o", "runs", "--steps", str(first),
                                 "--overwrite")}
    run_dir = work / "runs" / "ddp"
    before = step_losses(run_dir)
    single = None
    if not args.no_compare:
        seconds["single"] = run(work, f"cortex train manifest.yaml -o single --steps {first} --overwrite",
                                [sys.executable, "-m", "cortex.cli.app", "train", "manifest.yaml", "-o", "single",
                                 "--steps", str(first), "--overwrite"])
        single = step_losses(work / "single" / "ddp")
    seconds["resume"] = torchrun(work, args.nproc, "train", "runs/ddp", "--resume", "auto", "--steps", str(total))

    import cortex
    from cortex.runtime.checkpoint import latest_checkpoint

    summary = json.loads((run_dir / "train.json").read_text(encoding="utf-8"))
    after = step_losses(run_dir)
    latest = latest_checkpoint(run_dir)
    torch.manual_seed(0)
    model = cortex.load(run_dir)
    sample = model.generate_text("Mina lives in", max_new_tokens=8)
    compared = min(args.compare_steps, first) if args.compare_steps > 0 else first
    gap = max(abs(before[s] - single[s]) for s in range(1, compared + 1)) if single is not None else None
    checks = {
        f"train.json: {args.nproc} processes": summary["world_size"] == args.nproc,
        f"train.json: {total} steps": summary["steps"] == total == summary["total_steps"],
        f"metrics.jsonl: steps 1..{total} once each": sorted(after) == list(range(1, total + 1)),
        f"metrics.jsonl: steps 1..{first} unchanged by the resume": all(after[s] == before[s] for s in before),
        f"checkpoints/latest: step {total}": latest is not None and latest.name == f"step-{total:08d}",
        "the run loads and generates": isinstance(sample, str),
    }
    if gap is not None:
        checks[f"steps 1..{compared}: {args.nproc} ranks match one process within {args.tolerance:g}"] = \
            gap <= args.tolerance
    report = {"nproc": args.nproc, "steps": total, "first_leg_steps": first, "world_size": summary["world_size"],
              "losses": [after[s] for s in sorted(after)], "single_process_losses": single and list(single.values()),
              "compared_steps": compared, "max_loss_gap": gap, "latest_checkpoint": latest and latest.name,
              "sample": sample, "seconds": seconds, "checks": checks, "run": str(run_dir)}
    (work / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    print()
    for name, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED':<7}{name}")
    print(f"loss {after[1]:.3f} -> {after[total]:.3f} over {total} steps ({first} + {total - first} resumed)"
          + (f"; largest gap to one process over steps 1..{compared} {gap:.2e}" if gap is not None else ""))
    if single is not None:
        tail = range(max(1, first - 9), first + 1)
        ranks, one = (sum(losses[s] for s in tail) / len(tail) for losses in (before, single))
        print(f"mean loss of steps {tail[0]}..{first}: {args.nproc} ranks {ranks:.3f}, one process {one:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"sample: {sample!r}")
    print(f"run directory: {run_dir}")
    if not all(checks.values()):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
