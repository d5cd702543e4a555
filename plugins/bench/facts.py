"""``cortex bench facts``: one-shot fact learning through the real-time API, scored like
knowledge-editing work (ROME).

Facts are generated offline from a seed ("Mina's locker number is 3817."), told once with
``model.remember`` in a session, the process is "restarted" (the run is saved and loaded
back), and then, with unrelated text before every cue:

- **efficacy**: the taught wording ("... Mina's locker number is") completes to the value;
- **paraphrase**: a different question template ("What is Mina's locker number?");
- **locality**: unrelated prompts continue exactly as they did before anything was taught;
- **specificity**: a taught wording about somebody never told of ("... Leo's badge id is")
  does not complete to any taught value (a memory that answers every cue alike fails it).

Memory off (the same weights, a session that was told nothing) is the baseline. Facts,
distractors and unrelated prompts come from seeds disjoint from any training data.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable

from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, load_target, median_and_spread
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch

EFFICACY_TARGET = 0.8
LOCALITY_TARGET = 0.95

NAMES = ["Mina", "Jisoo", "Daniel", "Hana", "Oliver", "Seojun", "Emma", "Minho", "Yuna", "Lucas",
         "Sora", "Noah", "Jiwoo", "Grace", "Taeyang", "Chloe", "Haneul", "Ethan", "Bora", "Leo"]
ATTRIBUTES = [  # (statement, question) templates; {n} name, {v} value
    ("{n}'s locker number is {v}.", "What is {n}'s locker number?"),
    ("{n}'s bike code is {v}.", "Which code opens {n}'s bike lock?"),
    ("{n}'s room is number {v}.", "In which room does {n} stay?"),
    ("{n}'s badge id is {v}.", "Tell me {n}'s badge id."),
]
DISTRACTORS = [
    "We talked about the weather and the bus schedule for a while.",
    "The cafeteria served noodles today and the line was long.",
    "Somebody left an umbrella by the door of the library.",
    "The meeting moved to the afternoon because of the rain.",
]


def make_facts(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` facts with distinct (name, attribute) pairs and 4-digit values."""
    rng = random.Random(f"facts:{seed}")
    pairs = [(name, attr) for name in NAMES for attr in ATTRIBUTES]
    rng.shuffle(pairs)
    facts = []
    for name, (statement, question) in pairs[:n]:
        value = str(rng.randint(1000, 9999))
        facts.append({
            "statement": statement.format(n=name, v=value),
            "cue": statement.format(n=name, v="\0").split("\0")[0].rstrip(),
            "question": question.format(n=name),
            "value": value,
        })
    return facts


def completes(model, prompt: str, value: str, session: str) -> bool:
    """Whether greedy generation after ``prompt`` starts with ``value`` (spaces aside)."""
    text = model.generate_text(prompt, session=session, max_new_tokens=len(value) + 2, temperature=0.0)
    return text.strip().startswith(value)


def restarted(model):
    """The model saved to a temporary run directory and loaded back, as after a restart."""
    from cortex.runtime.rundir import load_run, save_run

    with tempfile.TemporaryDirectory() as tmp:
        return load_run(save_run(model, Path(tmp), name="restart")).eval()


class Facts(BenchSuite):
    """Efficacy, paraphrase and locality of facts told once."""

    name = "facts"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        facts: int = Field(50, gt=0, le=len(NAMES) * len(ATTRIBUTES), description="Facts taught per seed.")
        unrelated: int = Field(40, gt=0, description="Unrelated prompts for locality.")
        untold: int = Field(30, gt=0, description="Cues about untold (name, attribute) pairs for specificity.")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        from cortex_plugins.data.demo import demo_documents

        s = self.settings
        n_facts, n_unrelated, n_untold = (
            (min(s.facts, 8), min(s.unrelated, 8), min(s.untold, 8)) if quick else (s.facts, s.unrelated, s.untold))
        result = SuiteResult()
        rows = []
        for target in targets:
            scores: dict[str, list[float]] = {}
            for seed in seeds:
                for name, value in self._one_seed(target, seed, n_facts, n_unrelated, n_untold,
                                                  demo_documents).items():
                    scores.setdefault(name, []).append(value)
                log(f"{target} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in scores.items()))
            figures = {name: median_and_spread(values) for name, values in scores.items()}
            result.figures[str(target)] = {**figures, "facts": n_facts, "unrelated": n_unrelated}
            rows.append([str(target)] + [f"{figures[k]['mean']:.2f} ± {figures[k]['std']:.2f}" if k in figures
                                         else "n/a" for k in _COLUMNS])
            if "locality" in figures:
                result.checks.append(Check(f"{target} efficacy", figures["efficacy"]["mean"], EFFICACY_TARGET))
                result.checks.append(Check(f"{target} locality", figures["locality"]["mean"], LOCALITY_TARGET))
        result.tables.append(("One-shot facts after a restart (mean ± std over seeds)", ["target", *_COLUMNS], rows))
        result.notes.append(
            "efficacy: the taught wording after a distractor sentence; paraphrase: a question template the "
            "model was never told; locality: unrelated prompts continue exactly as before teaching; "
            "specificity: the taught wording about an untold name completes to no taught value; "
            "*_off: the same weights asked in a session that was told nothing (memory off); n/a: a model "
            "without memory, or no untold pair left for specificity.")
        return result

    @staticmethod
    def _one_seed(target: Path, seed: int, n_facts: int, n_unrelated: int, n_untold: int,
                  demo_documents) -> dict[str, float]:
        torch.manual_seed(seed)
        model = load_target(target).eval()
        every = make_facts(len(NAMES) * len(ATTRIBUTES), seed)
        facts, untold = every[:n_facts], every[n_facts:][:n_untold]
        taught = {f["value"] for f in facts}
        rng = random.Random(f"distractors:{seed}")
        asked = [(f, rng.choice(DISTRACTORS)) for f in facts]
        asked_untold = [(f, rng.choice(DISTRACTORS)) for f in untold]
        unrelated = [d.text[:80] for d in demo_documents(n_unrelated, seed=1_000_000 + seed)]
        session = f"facts-{seed}"

        def rate(model, prompt_of, session) -> float:
            return sum(completes(model, prompt_of(f, d), f["value"], session) for f, d in asked) / len(asked)

        def efficacy(f, d):
            return f"{d} {f['cue']}"

        def paraphrase(f, d):
            return f"{d} {f['question']}"

        out = {"efficacy_off": rate(model, efficacy, session), "paraphrase_off": rate(model, paraphrase, session)}
        if model.memory_system is None:
            return out
        before = {p: model.generate_text(p, session=session, max_new_tokens=8) for p in unrelated}
        for fact in facts:
            model.remember(fact["statement"], session=session)
        out["efficacy_no_restart"] = rate(model, efficacy, session)
        model = restarted(model)
        out["efficacy"] = rate(model, efficacy, session)
        out["paraphrase"] = rate(model, paraphrase, session)
        out["locality"] = sum(model.generate_text(p, session=session, max_new_tokens=8) == before[p]
                              for p in unrelated) / len(unrelated)
        if asked_untold:
            answers = [model.generate_text(efficacy(f, d), session=session, max_new_tokens=6, temperature=0.0)
                       for f, d in asked_untold]
            out["specificity"] = sum(a.strip()[:4] not in taught for a in answers) / len(answers)
        return out


_COLUMNS = ("efficacy", "efficacy_no_restart", "paraphrase", "locality", "specificity", "efficacy_off",
            "paraphrase_off")


@hookimpl
def cortex_register_components(register):
    register(Facts)
