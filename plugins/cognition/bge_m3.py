"""BGE-M3 text embeddings (``bge_m3``): semantic keys for text-level memories.

```yaml
features:
  - {type: bge_m3, settings: {path: ~/models/bge-m3}}
```

Needs the optional extra: ``pip install 'cortex[bge]'`` (FlagEmbedding with
``transformers<5``). This module imports without it; FlagEmbedding is imported only when the
embedder is first used.

**What it keys.** Whole texts — chat turns, episodes, notes — never token positions. Every
stored text gets a dense BGE-M3 embedding (and, with ``sparse_weight > 0``, its sparse
lexical weights) as its key; a query text is embedded the same way and the most similar
stored texts of *its session* come back with their scores. Nothing is fed into the
language model's token inputs (the reference put one sentence vector into every token
position, so each position saw the words that follow it).

**Where texts come from.**

- ``remember``: what the model is told, through ``model.remember`` and every chat turn of
  ``model.interact``/``cortex chat`` that learns, in its session;
- ``cortex_interaction``: each chat turn's answer is noted with its prompt (``record:
  prompt``, the default); ``turn`` also stores prompt and answer together as one text, and
  ``none`` stores nothing more;
- [`remember_text`][cortex_plugins.cognition.bge_m3.BgeM3.remember_text]``(text, session)`` stores
  any text, e.g. an episode's text from the ``episodic`` feature.

**Reading, in the model's read path** (``read: true``, the default). Texts the model is
told (``model.remember``, every chat turn that learns) are stored; before the model
answers a prompt, the stored texts of its session that score at least ``min_score`` (at
most ``k``) are put in front of it, oldest first, so the model reads them in its context
(the ``reader`` feature, listed after ``bge_m3``, then points into them). Unrelated prompts
score below the floor and read nothing. By hand,
[`search`][cortex_plugins.cognition.bge_m3.BgeM3.search]``(text, k, session)`` returns
[`TextHit`][cortex_plugins.cognition.bge_m3.TextHit]s, most similar first, and
[`recall_context`][cortex_plugins.cognition.bge_m3.BgeM3.recall_context]``(prompt, session)``
the hits above ``min_score`` as lines.

**Score.** Cosine similarity of the dense embeddings (BGE-M3's are unit length), plus
``sparse_weight`` times the lexical matching score (the sum over shared tokens of the
product of their weights) for the ``4 k`` best dense candidates.

**Capacity and eviction.** At most ``capacity`` texts over all sessions. Storing a text
already held in the same session does not duplicate it: it counts a use and refreshes it.
A search counts a use of every hit it returns. When full, the least recently used text
(written or returned by a search) is evicted, never the one being written.

**Persistence.** Keys, texts, sessions, use counts and lexical weights are saved with the
run (``state.safetensors``), so recall survives a restart without re-embedding anything.

**Weights.** Loaded from the local directory ``path`` only (``config.json``, the model
weights, the tokenizer, and for the sparse head ``sparse_linear.pt``), with
``HF_HUB_OFFLINE=1``; nothing is ever downloaded. ``~`` expands; a relative path is
relative to the working directory.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import F, torch
from cortex_plugins.data.hf import hf_offline

if TYPE_CHECKING:
    from cortex import ModelHandle

INSTALL = "pip install 'cortex[bge]'"
DOWNLOAD = ("download the weights once on a machine with network access, e.g. "
            "`huggingface-cli download BAAI/bge-m3 --local-dir ~/models/bge-m3`, copy the folder here "
            "and set `path:` in the bge_m3 settings to it")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")


def extra_installed() -> bool:
    """Whether FlagEmbedding (the ``bge`` extra) can be found, without importing it."""
    try:
        return importlib.util.find_spec("FlagEmbedding") is not None
    except (ImportError, ValueError):
        return False


def resolve_path(path: str) -> Path:
    """``path`` with ``~`` expanded, relative to the working directory."""
    return Path(os.path.expanduser(path)).resolve()


def missing_weights(path: str) -> str | None:
    """Why ``path`` does not hold BGE-M3 weights, or ``None`` when it looks complete."""
    where = resolve_path(path)
    if not where.exists():
        return f"no BGE-M3 weights at {where}: no such directory"
    if not where.is_dir():
        return f"no BGE-M3 weights at {where}: not a directory"
    lacking = []
    if not (where / "config.json").is_file():
        lacking.append("config.json")
    if not any((where / name).is_file() for name in WEIGHT_FILES):
        lacking.append("model weights (model.safetensors or pytorch_model.bin)")
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        lacking.append("a tokenizer (tokenizer.json or sentencepiece.bpe.model)")
    if lacking:
        return f"no BGE-M3 weights at {where}: missing {', '.join(lacking)}"
    return None


@dataclass
class TextHit:
    """A stored text returned by a search, with its score and where it came from."""

    text: str
    score: float  # dense cosine + sparse_weight * lexical score
    dense: float  # cosine similarity of the dense embeddings
    lexical: float  # lexical matching score (0 when sparse_weight is 0)
    session: str
    id: int  # the entry's id, stable while it is stored
    uses: int  # times it was written again or returned by a search
    meta: dict[str, Any] = field(default_factory=dict)


class BgeM3(CognitiveFeature):
    """BGE-M3 embeddings as keys of a bounded, per-session store of texts; needs the extra
    `pip install 'cortex[bge]'` and the weights in a local folder (see the module docs)."""

    name: ClassVar[str] = "bge_m3"

    class Settings(Settings):
        path: str = Field(
            description="Local directory of the BGE-M3 weights (config.json, weights, tokenizer); never downloaded.")
        capacity: int = Field(10000, gt=0, description="Most texts held over all sessions.")
        record: Literal["prompt", "turn", "none"] = Field(
            "prompt", description="What each chat turn stores: the prompt, prompt and answer, or nothing.")
        k: int = Field(4, gt=0, description="Texts returned by `search` and `recall_context` by default.")
        min_score: float = Field(
            0.5, description="Least score of a text that `recall_context` returns (and `search` when asked).")
        sparse_weight: float = Field(
            0.0, ge=0, description="Weight of the sparse lexical matching score in the score (0: dense only).")
        max_length: int = Field(512, gt=0, description="Tokens of a text that are embedded (longer texts are cut).")
        batch_size: int = Field(16, gt=0, description="Texts embedded per forward pass.")
        fp16: bool = Field(False, description="Half precision (only on a GPU; the CPU always runs float32).")
        read: bool = Field(True, description="Put the session's stored texts scoring at least min_score (at "
                                             "most k) in front of each prompt the model answers.")

        @model_validator(mode="after")
        def _available(self) -> BgeM3.Settings:
            problems = []
            if not extra_installed():
                problems.append(f"bge_m3 needs the optional extra: {INSTALL}")
            why = missing_weights(self.path)
            if why:
                problems.append(f"{why}; {DOWNLOAD}")
            if problems:
                raise ValueError("; and ".join(problems))
            return self

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        self.path = resolve_path(settings.path)
        self.device = str(getattr(context, "device", "cpu") or "cpu")
        self._embedder: Any = None
        self.dim = 0
        self._reset()

    def _reset(self) -> None:
        self.keys = torch.zeros(0, self.dim)
        self.texts: list[str] = []
        self.sessions: list[str] = []
        self.meta: list[dict[str, Any]] = []
        self.lexical: list[dict[str, float]] = []
        self.ids = torch.zeros(0, dtype=torch.long)
        self.uses = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)  # clock of the last write or hit
        self.clock = 0
        self.next_id = 0
        self.counters = {"stored": 0, "refreshed": 0, "evicted": 0, "searches": 0, "hits": 0}

    @classmethod
    def of(cls, model: ModelHandle) -> BgeM3:
        """The ``bge_m3`` feature of ``model`` (a `CortexError` if it has none)."""
        for component in model.features:
            if isinstance(component, cls):
                return component
        raise CortexError("this model has no bge_m3 feature; add `- {type: bge_m3, settings: {path: ...}}` "
                          "under `features:` in its manifest")

    # ------------------------------------------------------------------ the embedder

    def load(self) -> Any:
        """Load (once) and return the ``BGEM3FlagModel`` from ``path``."""
        if self._embedder is not None:
            return self._embedder
        why = missing_weights(str(self.path))
        if why:
            raise CortexError(f"bge_m3: {why}; {DOWNLOAD}")
        with hf_offline():
            try:
                from FlagEmbedding import BGEM3FlagModel
            except ImportError as exc:
                raise CortexError(
                    f"bge_m3: FlagEmbedding cannot be imported ({type(exc).__name__}: {exc}); it needs "
                    f"transformers<5 — install the pinned extra in its own environment: {INSTALL}") from None
            # the sparse and ColBERT heads are initialised at random when their files are
            # missing: keep the caller's random stream untouched either way
            with torch.random.fork_rng(devices=[]):
                try:
                    self._embedder = BGEM3FlagModel(
                        str(self.path), devices=self.device,
                        use_fp16=bool(self.settings.fp16 and self.device != "cpu"),
                        batch_size=self.settings.batch_size, passage_max_length=self.settings.max_length,
                        query_max_length=self.settings.max_length)
                except Exception as exc:
                    raise CortexError(
                        f"bge_m3: the weights at {self.path} cannot be loaded ({type(exc).__name__}: {exc}); "
                        f"point `path:` to a complete BGE-M3 folder — {DOWNLOAD}") from None
        if self.settings.sparse_weight > 0 and not (self.path / "sparse_linear.pt").is_file():
            self._embedder = None
            raise CortexError(f"bge_m3: sparse_weight > 0 needs {self.path / 'sparse_linear.pt'} "
                              "(BGE-M3's lexical head); copy it from the model folder or set sparse_weight: 0")
        return self._embedder

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Dense embeddings (N, D) float32, unit length, and lexical weights (token id -> weight;
        empty dicts when ``sparse_weight`` is 0) of ``texts``."""
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim), []
        sparse = self.settings.sparse_weight > 0
        out = self.load().encode(texts, batch_size=self.settings.batch_size, max_length=self.settings.max_length,
                                 return_dense=True, return_sparse=sparse, return_colbert_vecs=False)
        dense = F.normalize(torch.as_tensor(out["dense_vecs"]).float().reshape(len(texts), -1), dim=-1)
        if self.dim == 0:
            self.dim = int(dense.shape[1])
            if self.keys.shape[0] == 0:
                self.keys = torch.zeros(0, self.dim)
        elif dense.shape[1] != self.dim:
            raise CortexError(f"bge_m3: the model at {self.path} gives {dense.shape[1]}-d embeddings, but the stored "
                              f"keys are {self.dim}-d (made by another model); clear the store or use that model")
        lexical = ([{str(t): float(w) for t, w in weights.items()} for weights in out["lexical_weights"]]
                   if sparse else [{} for _ in texts])
        return dense, lexical

    def embed(self, texts: str | list[str]) -> torch.Tensor:
        """Dense unit-length embeddings: (D,) for one text, (N, D) for a list."""
        single = isinstance(texts, str)
        dense, _ = self.encode([texts] if single else list(texts))
        return dense[0] if single else dense

    # ------------------------------------------------------------------ the store

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def capacity(self) -> int:
        return self.settings.capacity

    def _row(self, text: str, session: str) -> int | None:
        for i, (t, s) in enumerate(zip(self.texts, self.sessions)):
            if t == text and s == session:
                return i
        return None

    def remember_text(self, text: str, session: str = "self", meta: dict[str, Any] | None = None) -> int:
        """Embed ``text`` and store it in ``session``; returns its id. A text already stored
        in that session is refreshed (one more use) instead of stored twice."""
        text = str(text)
        if not text.strip():
            raise CortexError("bge_m3: cannot remember an empty text")
        self.clock += 1
        row = self._row(text, session)
        if row is not None:
            self.uses[row] += 1
            self.last[row] = self.clock
            if meta:
                self.meta[row].update(meta)
            self.counters["refreshed"] += 1
            return int(self.ids[row])
        dense, lexical = self.encode([text])
        if len(self.texts) >= self.capacity:
            self._evict(len(self.texts) - self.capacity + 1)
        new_id = self.next_id
        self.next_id += 1
        self.keys = torch.cat([self.keys, dense])
        self.texts.append(text)
        self.sessions.append(session)
        self.meta.append(dict(meta or {}))
        self.lexical.append(lexical[0])
        self.ids = torch.cat([self.ids, torch.tensor([new_id])])
        self.uses = torch.cat([self.uses, torch.zeros(1, dtype=torch.long)])
        self.last = torch.cat([self.last, torch.tensor([self.clock])])
        self.counters["stored"] += 1
        return new_id

    def _evict(self, n: int) -> None:
        """Drop the ``n`` least recently used texts (ties: the oldest first)."""
        order = torch.argsort(self.last * (self.next_id + 1) + self.ids)  # by last use, then by age
        drop = set(order[:n].tolist())
        keep = [i for i in range(len(self.texts)) if i not in drop]
        self._select(keep)
        self.counters["evicted"] += len(drop)

    def _select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        self.keys = self.keys[index] if rows else torch.zeros(0, self.dim)
        self.ids, self.uses, self.last = self.ids[index], self.uses[index], self.last[index]
        self.texts = [self.texts[i] for i in rows]
        self.sessions = [self.sessions[i] for i in rows]
        self.meta = [self.meta[i] for i in rows]
        self.lexical = [self.lexical[i] for i in rows]

    def forget(self, session: str | None = None) -> int:
        """Remove the texts of ``session`` (all sessions when ``None``); returns how many."""
        keep = [i for i, s in enumerate(self.sessions) if session is not None and s != session]
        removed = len(self.texts) - len(keep)
        self._select(keep)
        return removed

    def texts_of(self, session: str = "self") -> list[str]:
        """The texts stored in ``session``, oldest first."""
        return [t for t, s in zip(self.texts, self.sessions) if s == session]

    def search(self, text: str, k: int | None = None, session: str = "self", *,
               min_score: float | None = None, touch: bool = True) -> list[TextHit]:
        """The (up to) ``k`` texts of ``session`` most similar to ``text``, best first.

        Only hits scoring at least ``min_score`` are returned (all when ``None``). With
        ``touch`` every hit counts a use and becomes recently used (retrieval strengthens a
        memory); ``touch=False`` only looks.
        """
        k = self.settings.k if k is None else int(k)
        self.counters["searches"] += 1
        rows = torch.tensor([i for i, s in enumerate(self.sessions) if s == session], dtype=torch.long)
        if k <= 0 or rows.numel() == 0:
            return []
        query, query_lexical = self.encode([text])
        dense = self.keys[rows] @ query[0]
        w = self.settings.sparse_weight
        n = min(rows.numel(), max(4 * k, 32) if w > 0 else k)
        top_dense, top = torch.topk(dense, n)
        candidates = rows[top]
        lexical = torch.zeros(n)
        if w > 0:
            q = query_lexical[0]
            lexical = torch.tensor([sum(weight * q[t] for t, weight in self.lexical[int(r)].items() if t in q)
                                    for r in candidates], dtype=torch.float32)
        scores = top_dense + w * lexical
        order = torch.argsort(scores, descending=True, stable=True)[:k]
        hits = []
        if touch:
            self.clock += 1
        for j in order.tolist():
            if min_score is not None and float(scores[j]) < min_score:
                continue
            r = int(candidates[j])
            if touch:
                self.uses[r] += 1
                self.last[r] = self.clock
            hits.append(TextHit(self.texts[r], float(scores[j]), float(top_dense[j]), float(lexical[j]),
                                self.sessions[r], int(self.ids[r]), int(self.uses[r]), dict(self.meta[r])))
        self.counters["hits"] += len(hits)
        return hits

    def recall_context(self, prompt: str, session: str = "self", k: int | None = None,
                       min_score: float | None = None) -> str:
        """The stored texts of ``session`` relevant to ``prompt`` (score >= ``min_score``,
        the setting by default), one per line with a trailing newline, best first, to put in
        front of the prompt; ``""`` when none is relevant."""
        floor = self.settings.min_score if min_score is None else min_score
        hits = self.search(prompt, k, session, min_score=floor)
        return "".join(f"{hit.text}\n" for hit in hits)

    # ------------------------------------------------------------------ the model's read path

    def remember(self, text: str, session: str) -> int:
        """Store what the model is told (``model.remember``, a chat turn that learns)."""
        if not text.strip():
            return 0
        self.remember_text(text, session, {"source": "told"})
        return 1

    def context_for(self, prompt: str, session: str) -> str:
        """``prompt`` with the session's relevant stored texts in front of it, oldest first
        (a lookup: it strengthens nothing); ``prompt`` itself when none scores ``min_score``."""
        if not self.settings.read or session not in self.sessions:
            return prompt
        hits = [h for h in self.search(prompt, session=session, min_score=self.settings.min_score, touch=False)
                if h.text not in prompt]
        if not hits:
            return prompt
        return " ".join(h.text for h in sorted(hits, key=lambda h: h.id)) + "\n" + prompt

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def cortex_interaction(self, model: ModelHandle, session: str, prompt: str, response: str) -> None:
        record = self.settings.record
        if record == "none" or not prompt.strip():
            return
        meta = {"source": "chat", "response": response}
        row = self._row(prompt, session)
        if row is not None:  # stored this turn through ``remember``: note its answer
            self.meta[row].update(meta)
        elif record == "prompt":
            self.remember_text(prompt, session, meta)
        if record == "turn":
            self.remember_text(f"{prompt}\n{response}", session, meta)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        return {"texts": len(self), "capacity": self.capacity, "sessions": len(set(self.sessions)),
                "dim": self.dim, "loaded": self._embedder is not None, **self.counters}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "texts": list(self.texts), "sessions": list(self.sessions), "meta": [dict(m) for m in self.meta],
            "lexical": [dict(x) for x in self.lexical], "clock": self.clock, "next_id": self.next_id,
            "dim": self.dim, "counters": dict(self.counters),
        }
        if self.texts:
            state.update(keys=self.keys.clone(), ids=self.ids.clone(), uses=self.uses.clone(),
                         last=self.last.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dim = int(state.get("dim", 0))
        self._reset()
        self.texts = [str(t) for t in state["texts"]]
        self.sessions = [str(s) for s in state["sessions"]]
        self.meta = [dict(m) for m in state["meta"]]
        self.lexical = [{str(t): float(w) for t, w in x.items()} for x in state["lexical"]]
        if self.texts:
            self.keys = state["keys"].float().reshape(len(self.texts), self.dim)
            self.ids, self.uses, self.last = (state[name].long() for name in ("ids", "uses", "last"))
        self.clock, self.next_id = int(state["clock"]), int(state["next_id"])
        self.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
        if len(self.texts) > self.capacity:
            self._evict(len(self.texts) - self.capacity)


@hookimpl
def cortex_register_components(register):
    register(BgeM3)
