"""Real-time learning demo: teach facts the model never saw, restart, ask.

    python examples/pipelines/realtime_learning.py RUN_DIR [--facts 50] [--seed 0]

Teaches ``--facts`` generated facts through the real-time API — a third of them once, a
third twice, a third three times — in a fresh session, with distractor text between them,
writes the memory back into a copy of the run, then starts a *new process* that loads the
copy and asks every fact after an unrelated sentence. It prints recall and mean confidence
by number of tellings, with memory on (the taught session) and off (a session told nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cortex
from cortex.runtime.rundir import save_memory
from cortex_plugins.bench.facts import make_facts
from cortex_plugins.bench.heldout_templates import DISTRACTORS

SESSION = "demo"
SENTENCES = DISTRACTORS["en"]


def teach(run: Path, work: Path, n: int, seed: int) -> list[dict]:
    shutil.copytree(run, work)
    model = cortex.load(work)
    facts = make_facts(n, seed=seed)
    for i, fact in enumerate(facts):
        fact["tellings"] = 1 + i % 3
        for telling in range(fact["tellings"]):
            model.remember(fact["statement"], session=SESSION)
            model.remember(SENTENCES[(i + telling) % len(SENTENCES)], session=SESSION)
    save_memory(model, work)
    return facts


def ask(work: Path, facts: list[dict]) -> dict:
    model = cortex.load(work)
    rows: dict[str, dict[str, list[float]]] = {}
    for i, fact in enumerate(facts):
        prompt = f"{SENTENCES[(i + 1) % len(SENTENCES)]} {fact['cue']}"
        for memory, session in (("on", SESSION), ("off", "nobody")):
            answer = model.generate_text(prompt, session=session, max_new_tokens=6)
            row = rows.setdefault(f"{memory}:{fact['tellings']}", {"recall": [], "confidence": []})
            row["recall"].append(float(answer.strip().startswith(fact["value"])))
            row["confidence"].append(model.confidence(prompt, " " + fact["value"], session=session))
    return {key: {k: sum(v) / len(v) for k, v in row.items()} for key, row in sorted(rows.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory whose model has memory tiers")
    parser.add_argument("--facts", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ask", type=Path, help=argparse.SUPPRESS)  # the restarted process
    args = parser.parse_args()
    if args.ask:
        facts = json.loads((args.ask / "facts.json").read_text())
        print(json.dumps(ask(args.ask, facts)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        facts = teach(args.run, work, args.facts, args.seed)
        (work / "facts.json").write_text(json.dumps(facts))
        out = subprocess.run([sys.executable, __file__, str(args.run), "--ask", str(work)],
                             capture_output=True, text=True, check=True)
        table = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'memory':<8}{'tellings':>9}{'recall':>9}{'confidence':>12}")
    for key, row in table.items():
        memory, tellings = key.split(":")
        print(f"{memory:<8}{tellings:>9}{row['recall']:>9.2f}{row['confidence']:>12.3f}")


if __name__ == "__main__":
    main()
