"""Korean-English BPE pipeline: corpus -> tokenizer -> mixed dataset -> trained model.

    python examples/pipelines/korean_english_bpe.py [-o OUT] [--tiny] [--ko-share 0.4]

Writes a Korean and an English JSONL corpus from the bundled demo worlds (the same kind of
small world told in either language), then runs the real ``cortex`` command line on them:

1. ``cortex tokenizer train ko.jsonl en.jsonl`` trains a byte-level BPE tokenizer;
2. every document of both files must survive ``decode(encode(text))`` unchanged;
3. ``cortex data prepare ko.jsonl en.jsonl --mix ko.jsonl=0.4,en.jsonl=0.6`` tokenizes
   them into one dataset; the script counts the tokens of each language in ``train.bin``
   itself (a document is Korean when it has Hangul in it) and checks the shares against
   the requested mix within ``--tolerance``;
4. ``cortex build manifest.yaml`` builds a small model with that tokenizer and trains it
   on the prepared folder.

It prints a short report (vocabulary, round trips, token shares, loss first -> last) and
writes it to ``OUT/report.json``; it exits 1 when a check fails. ``--tiny`` is the size the
tests run (about 15 s on one CPU core).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from cortex.core.tokenizer import load_tokenizer
from cortex_plugins.data.demo import demo_documents

HANGUL = re.compile("[\uac00-\ud7a3]")
SIZES = {  # documents per language, vocabulary, model, steps, batch
    "default": dict(documents=3000, vocab_size=4000, dim=128, layers=4, heads=4, context=128, steps=300, batch=16),
    "tiny": dict(documents=300, vocab_size=800, dim=32, layers=2, heads=2, context=64, steps=40, batch=8),
}


def cortex(work: Path, *args: str, threads: int | None = None) -> str:
    """Run ``cortex ARGS`` in ``work`` (a new process, as a user would); log it, return stdout."""
    print(f"$ cortex {' '.join(args)}", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = subprocess.run([sys.executable, "-m", "cortex.cli.app", *args], cwd=work, capture_output=True, text=True,
                         env=env)
    with open(work / "commands.log", "a", encoding="utf-8") as log:
        log.write(f"$ cortex {' '.join(args)}\n{out.stdout}{out.stderr}\n")
    if out.returncode != 0:
        sys.exit(f"`cortex {' '.join(args)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


def write_corpora(work: Path, documents: int, seed: int) -> dict[str, list[str]]:
    """``ko.jsonl`` (Korean worlds only) and ``en.jsonl`` (English only), ``documents`` each."""
    texts = {
        "ko.jsonl": [d.text for d in demo_documents(documents, seed=seed, korean=1.0)],
        "en.jsonl": [d.text for d in demo_documents(documents, seed=seed + 1, korean=0.0)],
    }
    for name, docs in texts.items():
        assert all(bool(HANGUL.search(t)) == (name == "ko.jsonl") for t in docs), name
        (work / name).write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs),
                                 encoding="utf-8")
    return texts


def round_trips(tokenizer, texts: list[str]) -> dict:
    """How many texts decode back exactly, and tokens per character."""
    ids = tokenizer.encode_batch(texts)
    exact = sum(tokenizer.decode(x) == t for x, t in zip(ids, texts))
    return {"documents": len(texts), "exact": exact, "ok": exact == len(texts),
            "tokens_per_char": sum(map(len, ids)) / sum(map(len, texts))}


def measured_shares(data: Path) -> dict[str, float]:
    """Shares of the training tokens by language, counted in ``train.bin`` document by document."""
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    tokens = np.fromfile(data / "train.bin", dtype=meta["dtype"]).astype(np.int64)
    tokenizer = load_tokenizer(data / "tokenizer.json")
    ends = np.flatnonzero(tokens == meta["tokenizer"]["eos_id"])
    counts = {"ko.jsonl": 0, "en.jsonl": 0}
    start = 0
    for end in ends:  # every document is followed by <eos>, counted with it as prepare does
        text = tokenizer.decode(tokens[start:end].tolist())
        counts["ko.jsonl" if HANGUL.search(text) else "en.jsonl"] += int(end + 1 - start)
        start = end + 1
    assert start == len(tokens), "train.bin does not end with <eos>"
    return {name: n / len(tokens) for name, n in counts.items()}


def manifest(tokenizer: Path, data: Path, size: dict, seed: int) -> str:
    return f"""\
cortex: 1
name: ko-en
seed: {seed}
model: {{dim: {size['dim']}, layers: {size['layers']}, heads: {size['heads']}, context: {size['context']}}}
tokenizer: {{type: bpe, path: {json.dumps(str(tokenizer))}}}
train:
  data: {json.dumps(str(data))}
  tokens: {size['steps'] * size['batch'] * size['context']}
  batch: {size['batch']}
  lr: 3.0e-3
  warmup: {max(1, size['steps'] // 10)}
  precision: fp32
  eval_every: {max(1, size['steps'] // 4)}
  eval_batches: 2
  checkpoint_every: 0
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/pipelines/korean_english_bpe"),
                        help="working folder (corpora, tokenizer, dataset, run directory)")
    parser.add_argument("--tiny", action="store_true", help="the small size the tests use")
    parser.add_argument("--ko-share", type=float, default=0.4, help="Korean share of the training tokens")
    parser.add_argument("--tolerance", type=float, default=0.02, help="allowed |measured - requested| share")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="OpenMP threads of the cortex commands (--tiny: 1)")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.tiny else None)  # tiny models gain nothing from more
    size = SIZES["tiny" if args.tiny else "default"]
    if not 0 < args.ko_share < 1:
        parser.error("--ko-share must be between 0 and 1")
    work = args.output.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "commands.log").unlink(missing_ok=True)

    texts = write_corpora(work, size["documents"], args.seed)
    cortex(work, "tokenizer", "train", "ko.jsonl", "en.jsonl", "-o", "tokenizer.json",
           "--vocab-size", str(size["vocab_size"]), threads=threads)
    tokenizer = load_tokenizer(work / "tokenizer.json")
    trips = {name: round_trips(tokenizer, docs) for name, docs in texts.items()}

    mix = {"ko.jsonl": args.ko_share, "en.jsonl": 1 - args.ko_share}
    cortex(work, "data", "prepare", "ko.jsonl", "en.jsonl", "--tokenizer", "tokenizer.json",
           "--mix", ",".join(f"{k}={v:g}" for k, v in mix.items()), "-o", "data", "--seed", str(args.seed),
           threads=threads)
    meta = json.loads((work / "data" / "meta.json").read_text(encoding="utf-8"))
    shares = measured_shares(work / "data")
    shares_ok = all(abs(shares[k] - mix[k]) <= args.tolerance for k in mix)

    (work / "manifest.yaml").write_text(manifest(work / "tokenizer.json", work / "data", size, args.seed),
                                        encoding="utf-8")
    cortex(work, "build", "manifest.yaml", "-o", "runs", "--overwrite", threads=threads)
    run = work / "runs" / "ko-en"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x and "event" not in x]
    vals = [x["val_loss"] for x in lines if "val_loss" in x]

    report = {
        "vocab_size": tokenizer.vocab_size,
        "round_trip": trips,
        "mix": {"requested": mix, "measured": shares, "meta": meta["mix"]["achieved"],
                "tolerance": args.tolerance, "ok": shares_ok},
        "train_tokens": meta["splits"]["train"]["tokens"],
        "steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
        "val_loss_first": vals[0] if vals else None, "val_loss_last": vals[-1] if vals else None,
        "run": str(run),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"\ntokenizer: {tokenizer.vocab_size} tokens (asked {size['vocab_size']})")
    for name, label in (("ko.jsonl", "Korean"), ("en.jsonl", "English")):
        t = trips[name]
        print(f"round trip {label:<8} {'ok' if t['ok'] else 'FAILED'} ({t['exact']}/{t['documents']} documents, "
              f"{t['tokens_per_char']:.2f} tokens per character)")
    print(f"training tokens: {report['train_tokens']:,}")
    for name in mix:
        print(f"share {name:<9} requested {mix[name]:.3f}  measured {shares[name]:.3f}  "
              f"(meta.json {meta['mix']['achieved'][name]:.3f})")
    print(f"shares within {args.tolerance}: {'ok' if shares_ok else 'FAILED'}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps"
          + (f"; validation {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else ""))
    print(f"run directory: {run}")
    if not (shares_ok and all(t["ok"] for t in trips.values())):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
