"""The baselines every efficacy figure of the recall and facts suites sits beside.

- **the same manifest untrained**: the run's manifest built with its seed and no step, so
  whatever a figure owes to the store alone (and not to learnt weights) shows up there;
- **a verbatim store**: [`VerbatimStore`][cortex_plugins.bench._baselines.VerbatimStore], a
  table from the last ``n`` tokens of told text to the token that followed them.

The model's contribution is its figure minus the better of the two.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

#: context lengths (in tokens) the verbatim store is tried with; each figure takes its best
VERBATIM_ORDERS = tuple(range(1, 33))


class VerbatimStore:
    """A lookup table standing in for a model: it answers with told text, verbatim.

    What ``remember(text)`` stores is, for every run of ``n`` consecutive tokens of
    ``text``, the token that followed it (the latest text wins where two agree on the
    run); ``generate_text(prompt)`` extends the prompt greedily while its last ``n``
    tokens are such a run, and stops at the first miss. Sessions are separate. It has the
    real-time API the suites use, and nothing learnt.
    """

    memory_system = None
    _END = chr(0x10FFFF)  # between told texts: no run crosses it, no token id is it

    def __init__(self, tokenizer: Any, n: int) -> None:
        self.tokenizer = tokenizer
        self.n = n
        self.told: dict[str, str] = {}  # session -> told token ids as one string, one char each

    def _chars(self, text: str) -> str:
        return "".join(map(chr, self.tokenizer.encode(text)))

    def remember(self, text: str, session: str = "self") -> int:
        chars = self._chars(text)
        self.told[session] = self.told.get(session, "") + chars + self._END
        return len(chars)

    def generate_text(self, prompt: str, *, session: str = "self", max_new_tokens: int = 64, **_: Any) -> str:
        told, ids = self.told.get(session, ""), self._chars(prompt)
        new = ""
        while len(new) < max_new_tokens and len(ids) >= self.n:
            run = ids[len(ids) - self.n:]
            at = told.rfind(run)  # the latest told occurrence
            following = told[at + self.n] if at >= 0 else self._END
            if following == self._END:
                break
            ids += following
            new += following
        return self.tokenizer.decode([ord(c) for c in new])


def untrained_twin(target: Path) -> Any:
    """The model of ``target``'s manifest built with its seed and no training step.

    For a run directory that is its saved ``manifest.yaml``; a manifest target is itself
    untrained, so ``None`` is returned (its own figures are the untrained ones).
    """
    from cortex import assemble, load_manifest

    target = Path(target)
    if not target.is_dir():
        return None
    return assemble(load_manifest(target / "manifest.yaml")).eval()


def restarted(model: Any) -> Any:
    """The model saved to a temporary run directory and loaded back, as after a restart."""
    from cortex.runtime.rundir import load_run, save_run

    with tempfile.TemporaryDirectory() as tmp:
        return load_run(save_run(model, Path(tmp), name="restart")).eval()


def best_verbatim(tokenizer: Any, measure: Callable[[VerbatimStore], dict[str, float]]) -> dict[str, float]:
    """Each figure of ``measure`` at the verbatim store's best order ``n`` for that figure,
    plus ``<figure>_n``: the order that reached it."""
    best: dict[str, float] = {}
    for n in VERBATIM_ORDERS:
        for name, value in measure(VerbatimStore(tokenizer, n)).items():
            if name not in best or value > best[name]:
                best[name], best[f"{name}_n"] = value, float(n)
    return best


def contribution(trained: float, *baselines: float | None) -> float:
    """``trained`` minus the best of the baselines measured (negative when a baseline wins)."""
    return trained - max((b for b in baselines if b is not None), default=0.0)
