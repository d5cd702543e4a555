"""``cortex bench reads``: does the model read what it is given?

Three tasks in the demo corpus's own statement and question templates, English and Korean
alternating, values drawn fresh per seed:

- **binding** — 2 to 4 people in the prompt, one fact each (the same attribute, distinct
  values), then the question about one of them: "Mina lives in Busan. Jun lives in Oslo.
  Where does Mina live?" Names from the demo lists (``binding``) and names never seen in
  training (``binding_new``).
- **told** — a fact told once with ``remember``, then a fact about somebody else; asked in
  other words (the demo question: ``other_words``) and with the told wording up to the
  value (``told_wording``); ``locality``: an unrelated prompt continues as in an empty
  session; ``specificity``: the question about a name never told does not get the told value.
- **corrections** — one person's city told twice, each once ("lives in" then "moved to",
  the reverse, or "Correction: ..."); the later statement must win.
- **one_person** — three facts about one person, each another attribute, told once each
  ("Mina lives in Busan." "Mina is a nurse." "Mina likes apples."), then the question
  about one of them: the told statement that answers it, not the latest about the name.
- **about_me** — a user tells their name or a fact in the first person ("My name is Aris.",
  "I live in Busan."), then two unrelated turns, then asks about themselves ("What is my
  name?", "Where do I live?"), as in ``cortex chat``.

Everything told is told first; then the model is saved and loaded back (a restart) and
asked. Figures are reported for both languages together and for each alone. Every figure
sits beside the same manifest untrained and a verbatim store (the told text,
or the prompt's own statements, as a table from the last n tokens to the next; see
[`_baselines`][cortex_plugins.bench._baselines]): only the margin over the better of them is
the model's. Targets are issue 19's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, load_target, median_and_spread
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch
from cortex_plugins.bench._baselines import VerbatimStore, best_verbatim, contribution, restarted, untrained_twin
from cortex_plugins.data.demo import (
    CITIES, COLOURS, FOODS, JOBS, NAMES, UNSEEN_NAMES, Person, _city_statement, _first_person, _question,
    _self_question, _statement,
)

TARGETS = {"binding": 0.9, "other_words": 0.8, "told_wording": 0.9, "locality": 0.95, "specificity": 0.95,
           "corrections": 0.9}
#: (English, Korean) names no training data uses
NEW_NAMES = UNSEEN_NAMES[:20]
ATTRIBUTES = ("city", "job", "colour", "food", "locker", "age")
#: (row label, figure key suffix): both languages together, then each alone
LANGUAGES = (("both", ""), ("English", ":en"), ("Korean", ":ko"))
COLUMNS = ("binding", "binding_new", "other_words", "told_wording", "locality", "specificity", "corrections",
           "one_person", "about_me")
#: unrelated chat turns between telling and asking (about_me)
SMALL_TALK = [("What a nice day.", "날씨가 좋네."), ("Tell me a story.", "이야기 하나 해 줘."),
              ("I am a bit tired today.", "오늘은 좀 피곤해.")]


def _value(rng: random.Random, attr: str) -> Any:
    pools = {"city": CITIES, "job": JOBS, "colour": COLOURS, "food": FOODS}
    if attr in pools:
        return rng.choice(pools[attr])
    return rng.randint(100, 9999) if attr == "locker" else rng.randint(18, 79)


def _distinct(rng: random.Random, attr: str, n: int) -> list[Any]:
    values: list[Any] = []
    while len(values) < n:
        v = _value(rng, attr)
        if v not in values:
            values.append(v)
    return values


def _answers(subject: Any, prompt: str, answer: str, session: str, told: str = "") -> bool:
    """Whether ``subject`` answers ``prompt`` with ``answer``; ``told`` is text before it
    in the prompt (a verbatim store is told it instead, so it can look it up)."""
    if isinstance(subject, VerbatimStore):
        subject.remember(told, session=session)
    elif told:
        prompt = f"{told}\n{prompt}"
    return subject.generate_text(prompt, session=session, max_new_tokens=24, temperature=0.0).strip().startswith(answer)


def measure(subject: Any, seed: int, n: int, restart: Callable[[Any], Any] = lambda s: s) -> dict[str, float]:
    """Every figure of the suite for ``subject`` (a model, or a stand-in with its real-time API),
    overall and per language (``<figure>:en``, ``<figure>:ko``).

    Everything is told first; then ``subject`` is ``restart``-ed (a model: saved and loaded
    back) and every question about told text is asked of what came back.
    """
    rng = random.Random(f"reads:{seed}")
    hits: dict[str, int] = {}
    trials: dict[str, int] = {}
    asks: list[tuple[str, bool, Callable[[Any], bool]]] = []  # asked after the restart

    def score(column: str, ko: bool, hit: bool) -> None:
        for key in (column, f"{column}:{'ko' if ko else 'en'}"):
            hits[key] = hits.get(key, 0) + hit
            trials[key] = trials.get(key, 0) + 1

    for i in range(n):
        ko, attr = i % 2 == 1, ATTRIBUTES[i % len(ATTRIBUTES)]
        for column, names in (("binding", NAMES), ("binding_new", NEW_NAMES)):
            k = rng.randint(2, 4)
            people = [Person(name, {attr: v}) for name, v in zip(rng.sample(names, k), _distinct(rng, attr, k))]
            question, answer = _question(rng.choice(people), attr, ko)
            body = " ".join(_statement(p, attr, ko) for p in people)
            score(column, ko, _answers(subject, question, answer, f"reads-{seed}-{column}-{i}", told=body))
        told, other, untold = [Person(name, {attr: v}) for name, v in zip(rng.sample(NEW_NAMES, 3),
                                                                          _distinct(rng, attr, 3))]
        session = f"reads-{seed}-told-{i}"
        unrelated = _statement(Person(rng.choice(NAMES), {"age": rng.randint(18, 79)}), "age", ko)[:-4]
        before = subject.generate_text(unrelated, session=f"{session}-empty", max_new_tokens=12, temperature=0.0)
        fact = _statement(told, attr, ko)
        subject.remember(fact, session=session)
        subject.remember(_statement(other, attr, ko), session=session)
        question, answer = _question(told, attr, ko)
        value = answer.rstrip(".")
        at = fact.lower().find(value.lower())
        asks += [
            ("other_words", ko, lambda s, q=question, a=answer, t=session: _answers(s, q, a, t)),
            ("locality", ko, lambda s, u=unrelated, b=before, t=session: s.generate_text(
                u, session=t, max_new_tokens=12, temperature=0.0) == b),
            ("specificity", ko, lambda s, q=_question(untold, attr, ko)[0], a=answer, t=session:
                not _answers(s, q, a, t)),
        ]
        if at > 0:  # the told wording up to the value, which must follow as it was told
            asks.append(("told_wording", ko, lambda s, p=fact[:at].rstrip(), v=fact[at:at + len(value)], t=session:
                         _answers(s, p, v, t)))
        wordings = [("lives", "moved"), ("moved", "lives"), ("lives", "correction")][i % 3]
        name, (old, new) = rng.choice(NEW_NAMES), rng.sample(CITIES, 2)
        session = f"reads-{seed}-corrections-{i}"
        for city, wording in zip((old, new), wordings):
            subject.remember(_city_statement(name, city, wording, ko), session=session)
        asks.append(("corrections", ko, lambda s, qa=_question(Person(name, {"city": new}), "city", ko), t=session:
                     _answers(s, *qa, t)))
        draw = random.Random(f"reads-one-person:{seed}:{i}")  # its own draws: the other tasks' stay as they were
        person = Person(draw.choice(NAMES), {a: _value(draw, a) for a in draw.sample(ATTRIBUTES, 3)})
        session = f"reads-{seed}-one-person-{i}"
        for told_attr in person.facts:
            subject.remember(_statement(person, told_attr, ko), session=session)
        asks.append(("one_person", ko, lambda s, qa=_question(person, draw.choice(list(person.facts)), ko), t=session:
                     _answers(s, *qa, t)))
        me = Person(rng.choice(NEW_NAMES), {attr: _value(rng, attr)})
        about = rng.choice(["name", attr])
        session = f"reads-{seed}-me-{i}"
        for turn in (_first_person(me, about, ko), *(t[ko] for t in rng.sample(SMALL_TALK, 2))):
            subject.remember(turn, session=session)
        asks.append(("about_me", ko, lambda s, qa=_self_question(me, about, ko), t=session: _answers(s, *qa, t)))
    subject = restart(subject)
    for column, ko, ask in asks:
        score(column, ko, ask(subject))
    return {key: hits[key] / trials[key] for key in trials}


class Reads(BenchSuite):
    """Binding in the prompt, text told once read in other words, and corrections by recency."""

    name = "reads"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        trials: int = Field(40, ge=2, description="Trials per task and seed (languages alternate: at least 2).")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        n = min(self.settings.trials, 6) if quick else self.settings.trials
        result = SuiteResult()
        rows = []
        for target in targets:
            scores: dict[str, list[float]] = {}
            for seed in seeds:
                torch.manual_seed(seed)
                model = load_target(target).eval()
                figures = {f"trained:{k}": v for k, v in measure(model, seed, n, restarted).items()}
                twin = untrained_twin(target)
                if twin is not None:
                    figures.update({f"untrained:{k}": v for k, v in measure(twin, seed, n, restarted).items()})
                figures.update({f"verbatim:{k}": v for k, v in best_verbatim(
                    model.tokenizer, lambda store: measure(store, seed, n)).items() if not k.endswith("_n")})
                for key, value in figures.items():
                    scores.setdefault(key, []).append(value)
                log(f"{target} seed {seed}: " + ", ".join(f"{c} {figures['trained:' + c]:.2f}" for c in COLUMNS))
            stats = {key: median_and_spread(values) for key, values in scores.items()}
            result.figures[str(target)] = {**stats, "trials": n}
            for language, suffix in LANGUAGES:
                def mean(key: str) -> float | None:
                    return stats[key + suffix]["mean"] if key + suffix in stats else None

                for label, prefix in (("trained", "trained:"), ("same manifest untrained", "untrained:"),
                                      ("verbatim store", "verbatim:")):
                    if mean(prefix + COLUMNS[0]) is not None:
                        rows.append([str(target), language, label, *(
                            f"{stats[prefix + c + suffix]['mean']:.2f} ± {stats[prefix + c + suffix]['std']:.2f}"
                            for c in COLUMNS)])
                rows.append([str(target), language, "contribution", *(
                    f"{contribution(mean('trained:' + c), mean('untrained:' + c), mean('verbatim:' + c)):+.2f}"
                    for c in COLUMNS)])
                for column, goal in TARGETS.items():
                    result.checks.append(Check(f"{target} {column} ({language})", mean(f"trained:{column}"), goal))
        result.tables.append(("Reading (mean ± std over seeds)", ["target", "language", "model", *COLUMNS], rows))
        result.notes.append(
            "binding: the question about one of 2-4 people in the prompt (demo names / binding_new: names never "
            "seen in training); other_words / told_wording: a fact told once with remember, then a fact about "
            "somebody else, asked with the demo question / the told wording; locality: an unrelated prompt "
            "continues as in an empty session; specificity: a never-told name does not get the told value; "
            "corrections: a city told twice, the later must win; one_person: three facts about one person "
            "told, one asked; about_me: a user's name or fact told in the "
            "first person, two unrelated turns, then asked ('What is my name?'). untrained: the run's manifest with no training "
            "step; verbatim store: the told text (or the prompt's statements) as a table from the last n tokens "
            "to the next, at its best n per figure. contribution: trained minus the better of the two.")
        return result


@hookimpl
def cortex_register_components(register):
    register(Reads)
