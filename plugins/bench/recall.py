"""``cortex bench recall``: associative recall beyond the context window.

Two tasks, generated offline from seeds:

- **passkey**: "The pass key is 48213. Remember it." followed by ``d`` context windows
  of demo-corpus filler; then the cue "The pass key is" alone must complete to the key;
- **mqar** (multi-query associative recall): several "Remember: kq=73." pairs, ``d``
  windows of filler, then each "Remember: kq=" must complete to its value;
- **qa** (long-document question answering): a demo world's statements ("Hana is an
  accountant. ..."), ``d`` windows of filler, then its questions in the demo's own wording
  ("What is Hana's job?" must be answered "An accountant"), English or Korean.

Everything before the cue is written to memory through the real-time API and is gone
from the context when the cue is asked, so only memory can answer. The filler names
nobody the told text names, so nothing in it changes an answer. Accuracy is reported by
distance (in context windows) for each read mode the model has, with memory off (a
session that was told nothing; chance is 1e-5 for a passkey, 1e-2 for a value), for the
same manifest untrained and for a verbatim store (see
[`_baselines`][cortex_plugins.bench._baselines]). A model is also asked **in window**
(reported at distance 0): the told sentence that answers the cue, then the cue, in the
prompt of a session told nothing: what the model reads with the fact in view, the most a
memory read that hands it the same text can expect.
"""

from __future__ import annotations

import functools
import random
import re
import string
from pathlib import Path
from typing import Callable

from pydantic import Field

from cortex import hookimpl
from cortex.bench.harness import BenchSuite, Check, SuiteResult, load_target, median_and_spread
from cortex.kernel.interfaces import Settings
from cortex.kernel.lazy import torch
from cortex_plugins.bench._baselines import VerbatimStore, best_verbatim, untrained_twin

TARGETS = {4: 0.9, 16: 0.8}  # distance in windows -> accuracy with memory
READ_MODES = ("knn_lm", "knn_attention")


@functools.lru_cache(maxsize=256)
def filler(tokens: int, tokenizer, seed: int, avoid: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Demo-corpus paragraphs totalling at least ``tokens`` tokens, none naming a word of ``avoid``."""
    from cortex_plugins.data.demo import demo_documents

    texts, total = [], 0
    for doc in demo_documents(10 * (tokens // 200 + 1), seed=2_000_000 + seed):
        if any(word in doc.text for word in avoid):
            continue
        texts.append(doc.text)
        total += len(tokenizer.encode(doc.text))
        if total >= tokens:
            break
    return tuple(texts)


def told_names(text: str) -> frozenset[str]:
    """The demo names ``text`` mentions: the filler after it mentions none of them, so that no
    later statement about somebody of the same name changes the answer (as in the long
    documents the demo source writes)."""
    from cortex_plugins.data.demo import NAMES

    return frozenset(name for pair in NAMES for name in pair if name in text)


def passkey_trial(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    key = str(rng.randint(10000, 99999))
    return f"The pass key is {key}. Remember it.", [("The pass key is", key)]


def mqar_trial(rng: random.Random, pairs: int = 4) -> tuple[str, list[tuple[str, str]]]:
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], pairs)
    values = [str(rng.randint(10, 99)) for _ in keys]
    text = " ".join(f"Remember: {k}={v}." for k, v in zip(keys, values))
    return text, [(f"Remember: {k}=", v) for k, v in zip(keys, values)]


def qa_trial(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    from cortex_plugins.data.demo import make_world

    world = make_world(rng, rng.random() < 0.5, kind="facts")
    return world.text.split("\n", 1)[0], [(q, a.rstrip(".")) for q, a in world.qa]


TASKS = {"passkey": passkey_trial, "mqar": mqar_trial, "qa": qa_trial}


def told_sentence(text: str, cue: str, answer: str) -> str:
    """The sentence of told ``text`` that answers ``cue``: of those holding ``answer`` (in any
    case, not inside a longer number), the one sharing the most words with the cue (the asked
    name, the pair's key)."""
    from cortex.model import told_sentences  # here: the command line starts without torch

    words = set(re.findall(r"\w+", cue.lower()))
    value = re.compile(rf"(?<!\d){re.escape(answer.lower())}(?!\d)")
    holding = [s for s in told_sentences(text) if value.search(s.lower())]
    if not holding:
        raise ValueError(f"no sentence of the told text holds the answer {answer!r}")
    return max(holding, key=lambda s: len(words & set(re.findall(r"\w+", s.lower()))))


class RecallSuite(BenchSuite):
    """Recall accuracy by distance, per read mode, memory on and off."""

    name = "recall"
    default_targets = ("examples/quickstart.yaml",)

    class Settings(Settings):
        distances: list[int] = Field(default_factory=lambda: [1, 4, 16], description="Filler, in context windows.")
        trials: int = Field(10, gt=0, description="Trials per task, distance and seed.")

    def run(self, targets: list[Path], *, quick: bool, seeds: list[int],
            log: Callable[[str], None]) -> SuiteResult:
        s = self.settings
        distances, trials = ([1, 4], 3) if quick else (s.distances, s.trials)
        result = SuiteResult()
        rows = []
        for target in targets:
            acc: dict[tuple[str, str, int], list[float]] = {}
            for seed in seeds:
                torch.manual_seed(seed)
                model = load_target(target).eval()
                measured = self._one_seed(model, seed, distances, trials)
                twin = untrained_twin(target)
                if twin is not None:
                    measured.update({(task, f"untrained {mode}", d): v for (task, mode, d), v
                                     in self._one_seed(twin, seed, distances, trials).items() if mode != "off"})
                verbatim = best_verbatim(model.tokenizer, lambda store: {
                    f"{task}:{d}": v for (task, mode, d), v in self._one_seed(
                        store, seed, distances, trials, window=model.config.context).items() if mode == "verbatim"})
                measured.update({(key.split(":")[0], "verbatim store", int(key.split(":")[1])): v
                                 for key, v in verbatim.items() if not key.endswith("_n")})
                for key, value in measured.items():
                    acc.setdefault(key, []).append(value)
                log(f"{target} seed {seed} done")
            for (task, mode, distance), values in sorted(acc.items()):
                figure = median_and_spread(values)
                result.figures[f"{target}:{task}:{mode}:{distance}"] = figure
                rows.append([str(target), task, mode, distance, f"{figure['mean']:.2f} ± {figure['std']:.2f}"])
            for distance, goal in TARGETS.items():
                best = max((median_and_spread(v)["mean"] for (t, m, d), v in acc.items()
                            if d == distance and m in READ_MODES), default=None)
                if best is not None:
                    result.checks.append(Check(f"{target} best read mode at {distance} windows", best, goal))
        result.tables.append(("Recall accuracy by distance in context windows (mean ± std over seeds)",
                              ["target", "task", "read mode", "distance", "accuracy"], rows))
        result.notes.append("Everything before the cue is flushed from the context: only memory can answer. "
                            "'off' asks a session that was told nothing; 'untrained <mode>' is the run's manifest "
                            "built with its seed and no training step; 'verbatim store' a table from the last n "
                            "tokens of told text to the next token, at its best n per task and distance. A figure "
                            "the untrained model or the verbatim store also reaches is not the model's merit.")
        return result

    @staticmethod
    def _answers(model, prompt: str, answer: str, session: str) -> bool:
        """Whether greedy text after ``prompt`` in ``session`` starts with ``answer``."""
        out = model.generate_text(prompt, session=session, max_new_tokens=len(model.tokenizer.encode(" " + answer)))
        return out.strip().startswith(answer)

    @staticmethod
    def _one_seed(model, seed: int, distances: list[int], trials: int,
                  window: int | None = None) -> dict[tuple[str, str, int], float]:
        """Accuracy per (task, read mode, distance) of ``model``, or of a stand-in with the
        real-time API (then ``window`` gives the filler's unit and the mode is ``verbatim``)."""
        stand_in = isinstance(model, VerbatimStore)
        ms = model.memory_system
        modes = ["verbatim"] if stand_in else [] if ms is None else [
            m for m in READ_MODES if m in ms.settings.read and (m == "knn_lm" or ms.readers)]
        original = list(ms.settings.read) if ms is not None else []
        window = window or model.config.context
        out: dict[tuple[str, str, int], float] = {}
        try:
            for task, make in TASKS.items():
                for distance in distances:
                    rng = random.Random(f"{task}:{seed}:{distance}")
                    correct: dict[str, int] = {}
                    asked = 0
                    drawn = []
                    for trial in range(trials):
                        text, questions = make(rng)
                        drawn.append((text, questions))
                        session = f"recall-{task}-{seed}-{distance}-{trial}"
                        if ms is not None or stand_in:
                            model.remember(text, session=session)
                            for chunk in filler(distance * window, model.tokenizer, seed * 1000 + trial,
                                                told_names(text)):
                                model.remember(chunk, session=session)
                        asked += len(questions)
                        for mode in [*modes, "off"]:
                            if mode in READ_MODES:
                                ms.settings.read = [mode]
                            who = session if mode != "off" else f"{session}-untold"
                            correct[mode] = correct.get(mode, 0) + sum(
                                RecallSuite._answers(model, cue, answer, who) for cue, answer in questions)
                        if ms is not None:
                            ms.settings.read = original
                    for mode, n in correct.items():
                        out[(task, mode, distance)] = n / asked
                    if not stand_in and distance == distances[0]:  # the fact in view, memory empty
                        out[(task, "in window", 0)] = sum(
                            RecallSuite._answers(model, told_sentence(text, cue, answer) + "\n" + cue, answer,
                                                 f"recall-{task}-{seed}-window-{i}")
                            for i, (text, questions) in enumerate(drawn) for cue, answer in questions) / asked
        finally:
            if ms is not None:
                ms.settings.read = original
        return out


@hookimpl
def cortex_register_components(register):
    register(RecallSuite)
