"""``cortex bench facts``: one-shot fact learning through the real-time API, scored like
knowledge-editing work (ROME).

Facts are generated offline from a seed ("Brisa's bike code is 3817."), told once with
``model.remember`` in a session, the process is "restarted" (the run is saved and loaded
back), and then, with an unrelated sentence before every cue:

- **efficacy**: the taught wording ("... Brisa's bike code is") completes to the value;
- **paraphrase**: the question of the same wording set ("Which code opens Brisa's bike lock?");
- **locality**: unrelated prompts continue exactly as they did before anything was taught;
- **specificity**: a taught wording about somebody never told of ("... Cato's badge id is")
  does not complete to any taught value (a memory that answers every cue alike fails it).

Four groups, each its own session and restart, are reported apart: the **held-out**
wordings of [`heldout_templates`][cortex_plugins.bench.heldout_templates], which no training
data source uses, and the **demo** corpus's own locker template ("{n}'s locker number is
{v}." / "What is {n}'s locker number?"), each in English and in Korean. Names are never
seen in training in any group; values, distractors and unrelated prompts come from seeds
disjoint from the training data.

Every figure sits beside memory off (the same weights, a session that was told nothing),
the same manifest untrained and a verbatim store (see
[`_baselines`][cortex_plugins.bench._baselines]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, load_target, median_and_spread
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch
from cortex_plugins.bench._baselines import VERBATIM_ORDERS, VerbatimStore, best_verbatim, contribution, restarted, untrained_twin
from cortex_plugins.bench.heldout_templates import DISTRACTORS, NAMES, WORDINGS

EFFICACY_TARGET = 0.8
LOCALITY_TARGET = 0.95

#: (wording set, language) of each reported group
GROUPS = (("held-out", "en"), ("held-out", "ko"), ("demo", "en"), ("demo", "ko"))


def wordings(kind: str, language: str) -> list[Callable[[tuple[str, str], str], tuple[str, str]]]:
    """Functions ``(name, value) -> (statement, question)`` of a wording set: ``held-out``
    or ``demo`` (the demo corpus's own locker sentences, made by its generator)."""
    ko = language == "ko"
    if kind == "demo":
        from cortex_plugins.data.demo import Person, _question, _statement

        def locker(name: tuple[str, str], value: str) -> tuple[str, str]:
            person = Person(name, {"locker": int(value)})
            return _statement(person, "locker", ko), _question(person, "locker", ko)[0]

        return [locker]
    return [lambda name, value, s=s, q=q: (s.format(n=name[ko], v=value), q.format(n=name[ko]))
            for s, q in WORDINGS[language]]


def make_facts(n: int, seed: int, kind: str = "held-out", language: str = "en") -> list[dict[str, str]]:
    """``n`` facts with distinct (name, wording) pairs and 4-digit values; the first ``n`` of
    a seed do not depend on ``n``."""
    rng = random.Random(f"facts:{seed}:{kind}:{language}")
    pairs = [(name, wording) for name in NAMES for wording in wordings(kind, language)]
    rng.shuffle(pairs)
    facts = []
    for name, wording in pairs[:n]:
        value = str(rng.randint(1000, 9999))
        statement, question = wording(name, value)
        facts.append({"statement": statement, "cue": statement[:statement.index(value)].rstrip(),
                      "question": question, "value": value})
    return facts


def completes(model, prompt: str, value: str, session: str) -> bool:
    """Whether greedy generation after ``prompt`` starts with ``value`` (spaces aside)."""
    text = model.generate_text(prompt, session=session, max_new_tokens=len(value) + 2, temperature=0.0)
    return text.strip().startswith(value)


class Facts(BenchSuite):
    """Efficacy, paraphrase and locality of facts told once, in held-out and demo wordings."""

    name = "facts"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        facts: int = Field(24, gt=0, le=len(NAMES) - 1, description="Facts taught per seed and group.")
        unrelated: int = Field(20, gt=0, description="Unrelated prompts for locality, per group.")
        untold: int = Field(16, gt=0, description="Cues about untold (name, wording) pairs for specificity, "
                                                  "per group (fewer where the names run out).")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        n_facts, n_unrelated, n_untold = (
            (min(s.facts, 8), min(s.unrelated, 8), min(s.untold, 8)) if quick else (s.facts, s.unrelated, s.untold))
        result = SuiteResult()
        rows = []
        for target in targets:
            scores: dict[str, list[float]] = {}
            for seed in seeds:
                for kind, language in GROUPS:
                    group = f"{kind}-{language}"
                    measured = self._one_group(target, seed, kind, language, n_facts, n_unrelated, n_untold)
                    for name, value in measured.items():
                        scores.setdefault(f"{group}:{name}", []).append(value)
                    log(f"{target} seed {seed} {kind} {language}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in measured.items() if ":" not in k and not k.endswith("_n")))
            figures = {name: median_and_spread(values) for name, values in scores.items()}
            result.figures[str(target)] = {**figures, "facts": n_facts, "unrelated": n_unrelated}
            for kind, language in GROUPS:
                group = f"{kind}-{language}"
                mine = {k[len(group) + 1:]: v for k, v in figures.items() if k.startswith(group + ":")}
                rows += [[row[0], kind, language, *row[1:]] for row in _rows(str(target), mine)]
                if "locality" in mine:
                    for column, goal in (("efficacy", EFFICACY_TARGET), ("locality", LOCALITY_TARGET)):
                        result.checks.append(Check(f"{target} {kind} {language} {column}", mine[column]["mean"], goal))
        result.tables.append(("One-shot facts after a restart (mean ± std over seeds)",
                              ["target", "wordings", "language", "model", *_COLUMNS], rows))
        result.notes.append(
            "wordings: held-out = templates no training data source uses (cortex_plugins.bench.heldout_templates), "
            "demo = the demo corpus's own locker sentences; names are never seen in training in either. "
            "efficacy: the taught wording after a distractor sentence; paraphrase: the set's question, never "
            "told; locality: unrelated prompts continue exactly as before teaching; specificity: the taught "
            "wording about an untold name completes to no taught value; *_off: the same weights asked in a "
            "session that was told nothing (memory off); n/a: a model without memory, or no untold pair left.")
        result.notes.append(
            "untrained: the run's manifest built with its seed and no training step (a manifest target is "
            "itself untrained). verbatim store: a table from the last n tokens of told text to the next token, "
            f"each figure at its best n from {VERBATIM_ORDERS[0]} to {VERBATIM_ORDERS[-1]} tokens. "
            "contribution: trained minus the better of the two; zero or below means the figure is not the "
            "model's merit.")
        return result

    @staticmethod
    def _one_group(target: Path, seed: int, kind: str, language: str, n_facts: int, n_unrelated: int,
                   n_untold: int) -> dict[str, float]:
        """Every figure of one seed and group: the model loaded afresh, its untrained twin, the verbatim store."""
        from cortex_plugins.data.demo import demo_documents

        torch.manual_seed(seed)
        model = load_target(target).eval()
        every = make_facts(len(NAMES) * len(WORDINGS[language]), seed, kind, language)
        facts, untold = every[:n_facts], every[n_facts:][:n_untold]
        rng = random.Random(f"distractors:{seed}:{kind}:{language}")
        distractors = DISTRACTORS[language]
        unrelated = demo_documents(n_unrelated, seed=1_000_000 + seed, korean=float(language == "ko"))
        trial = Trial(facts, [(f, rng.choice(distractors)) for f in facts],
                      [(f, rng.choice(distractors)) for f in untold],
                      [d.text[:80] for d in unrelated], f"facts-{seed}-{kind}-{language}")
        out = trial.measure(model, restarted)
        twin = untrained_twin(target)
        if twin is not None:
            out.update({f"untrained:{k}": v for k, v in trial.measure(twin, restarted).items()})
        verbatim = best_verbatim(model.tokenizer, lambda store: trial.measure(store, lambda same: same))
        out.update({f"verbatim:{k}": v for k, v in verbatim.items()})
        return out


@dataclass
class Trial:
    """One seed's facts, cues and unrelated prompts, measured the same way on any subject."""

    facts: list[dict[str, str]]
    asked: list[tuple[dict[str, str], str]]  # (fact, distractor sentence)
    asked_untold: list[tuple[dict[str, str], str]]
    unrelated: list[str]
    session: str

    def rate(self, subject: Any, prompt_of: Callable[[dict, str], str]) -> float:
        hits = sum(completes(subject, prompt_of(f, d), f["value"], self.session) for f, d in self.asked)
        return hits / len(self.asked)

    def measure(self, subject: Any, restart: Callable[[Any], Any]) -> dict[str, float]:
        """Every figure of the suite for ``subject`` (a model or a stand-in with its API)."""
        out = {"efficacy_off": self.rate(subject, _efficacy), "paraphrase_off": self.rate(subject, _paraphrase)}
        if subject.memory_system is None and not isinstance(subject, VerbatimStore):
            return out
        before = {p: subject.generate_text(p, session=self.session, max_new_tokens=8) for p in self.unrelated}
        for fact in self.facts:
            subject.remember(fact["statement"], session=self.session)
        out["efficacy_no_restart"] = self.rate(subject, _efficacy)
        subject = restart(subject)
        out["efficacy"] = self.rate(subject, _efficacy)
        out["paraphrase"] = self.rate(subject, _paraphrase)
        out["locality"] = sum(subject.generate_text(p, session=self.session, max_new_tokens=8) == before[p]
                              for p in self.unrelated) / len(self.unrelated)
        if self.asked_untold:
            taught = {f["value"] for f in self.facts}
            answers = [subject.generate_text(_efficacy(f, d), session=self.session, max_new_tokens=6,
                                             temperature=0.0) for f, d in self.asked_untold]
            out["specificity"] = sum(a.strip()[:4] not in taught for a in answers) / len(answers)
        return out


def _efficacy(fact: dict[str, str], distractor: str) -> str:
    return f"{distractor} {fact['cue']}"


def _paraphrase(fact: dict[str, str], distractor: str) -> str:
    return f"{distractor} {fact['question']}"


def _rows(target: str, figures: dict[str, dict[str, float]]) -> list[list[str]]:
    """The table rows of one target: trained, untrained, verbatim store and contribution."""

    def cell(key: str) -> str:
        f = figures.get(key)
        return "n/a" if f is None else f"{f['mean']:.2f} ± {f['std']:.2f}"

    rows = [[target, "trained" if ("untrained:efficacy" in figures) else "as given", *map(cell, _COLUMNS)]]
    for prefix, label in (("untrained:", "same manifest untrained"), ("verbatim:", "verbatim store")):
        if any(k.startswith(prefix) for k in figures):
            rows.append([target, label, *(cell(prefix + c) for c in _COLUMNS)])
    gains = []
    for column in _COLUMNS:
        if column in _EFFICACY and column in figures:
            baselines = [figures[p + column]["mean"] for p in ("untrained:", "verbatim:") if p + column in figures]
            gains.append(f"{contribution(figures[column]['mean'], *baselines):+.2f}")
        else:
            gains.append("")
    rows.append([target, "contribution", *gains])
    return rows


_COLUMNS = ("efficacy", "efficacy_no_restart", "paraphrase", "locality", "specificity", "efficacy_off",
            "paraphrase_off")
#: the columns that measure recall, where the model must beat its baselines
_EFFICACY = ("efficacy", "efficacy_no_restart", "paraphrase")


@hookimpl
def cortex_register_components(register):
    register(Facts)
