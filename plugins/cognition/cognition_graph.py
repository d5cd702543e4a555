"""The cognition graph (``cognition_graph``): concepts, associations, causes and analogies.

```yaml
features:
  - {type: cognition_graph, settings: {concepts: 16, lag: 1, min_count: 3, min_delta_p: 0.2}}
```

A [`CognitionGraph`][cortex_plugins.cognition.cognition_graph.CognitionGraph] is a networkx
``MultiDiGraph`` built from what a model actually stored
([`from_model`][cortex_plugins.cognition.cognition_graph.CognitionGraph.from_model]), or from any
stream of events ([`from_events`][cortex_plugins.cognition.cognition_graph.CognitionGraph.from_events]):

- **Concepts**: the keys of every memory tier (STM slots, LTM entries, decoded archive
  entries) are clustered with spherical ``faiss.Kmeans`` into at most ``concepts``
  clusters (at least ``min_concept_size`` entries each; the best of ``restarts`` runs). A concept node ``c<i>`` carries its
  size, the tiers its entries came from, the tokens that most often followed its entries,
  a few text snippets and its centroid (its vector).
- **Event sequences**: each text a model stored (entries of one stream with the same
  ``meta.text``, ordered by ``meta.position``; else a stream's entries in write order) and
  each episode of an ``episodic`` feature (its tokens keyed by the model and assigned to
  the nearest centroid) becomes a sequence of concepts in time (a run of one concept is
  one event; runs shorter than ``min_run`` positions are dropped: neighbouring keys share
  most of their terms, so a one-position concept is clustering flicker, not an event).
- **Associations** (edge key ``association``): events at most ``association_window`` steps
  apart co-activate; an edge holds the count and the PMI, kept when the count is at least
  ``min_association`` and the PMI at least ``min_pmi``.
- **Causal candidates** (edge key ``causes``): ``A -> B`` when B follows A within ``lag``
  steps more often than it follows anything else: contingency ``delta_p = P(B | A) -
  P(B | not A)`` at least ``min_delta_p`` over at least ``min_count`` joint occurrences.
  Co-occurrence at the same step, frequent events and reversed order do not qualify. With
  ``screen`` (conditional contrasts) a candidate is dropped when another candidate screens
  it off: a mediator (``A -> B -> C`` drops ``A -> C`` when C no longer follows A more than
  usual unless B does), or a co-occurring cause (``X -> B`` is dropped when, on the steps
  without the other cause ``A``, X no longer raises the chance of B).
- **Analogies** ``A : B :: C : ?``: candidates ``D`` are scored by the relation vector
  (cosine of ``v_D - v_C`` with ``v_B - v_A``: 3CosAdd) plus ``structure_weight`` times the
  agreement of the graph relations from C to D with those from A to B (edge kinds and
  directions, Jaccard).

Queries: ``concepts()``, ``concept_of(keys)``, ``causes(x)`` (what causes x), ``effects(x)``,
``associations(x)``, ``analogy(a, b, c)``, ``summary()``. ``export(path)`` writes GraphML
or node-link JSON (``load(path)`` reads either back with the same nodes and edges);
``draw(path)`` renders a PNG. On the command line: ``cortex graph RUN [--export FILE]
[--png FILE]``.

Delta-P measures contingency, not intervention: a hidden common cause that precedes A and
B in that order produces a candidate too. The edges are *candidates*, with their counts.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import LazyModule, torch

nx: Any = LazyModule("networkx")  # imported when a graph is built, not when the CLI starts

if TYPE_CHECKING:
    from cortex import ModelHandle


class GraphSettings(Settings):
    """How a cognition graph is built (the settings of the ``cognition_graph`` feature)."""

    concepts: int = Field(16, ge=1, description="Most concepts (k-means clusters of memory keys).")
    min_concept_size: int = Field(4, ge=1, description="Least entries per concept on average (fewer clusters for small memories).")
    max_items: int = Field(50000, gt=0, description="Memory entries used at most (a seeded sample beyond).")
    restarts: int = Field(5, ge=1, description="k-means runs from different seeds; the tightest clustering is kept.")
    lag: int = Field(1, ge=1, description="Steps after A in which B counts as following A.")
    min_count: int = Field(3, ge=1, description="Least joint occurrences (A, then B) of a causal candidate.")
    min_delta_p: float = Field(0.2, gt=0, le=1, description="Least contingency P(B|A) - P(B|not A) of a causal candidate.")
    screen: bool = Field(True, description="Drop candidates another candidate screens off: a mediator "
                                           "(A -> B -> C drops A -> C) or a co-occurring stronger cause.")
    min_run: int = Field(2, ge=1, description="Least consecutive positions a concept holds in a stored text or "
                                              "episode to be an event (shorter runs are clustering flicker).")
    association_window: int = Field(2, ge=0, description="Steps apart at which events co-activate (0: the same step).")
    min_association: int = Field(2, ge=1, description="Least co-activations of an association edge.")
    min_pmi: float = Field(0.3, ge=0, description="Least PMI (log co-activation over chance) of an association edge.")
    structure_weight: float = Field(1.0, ge=0, description="Weight of graph-relation agreement in analogies.")
    seed: int = Field(0, description="Seed of sampling and k-means.")


# --------------------------------------------------------------------------- helpers


def _step_events(step: Any) -> list[str]:
    if step is None:
        return []
    if isinstance(step, str):
        return [step]
    return [str(e) for e in step]


def _scalar(value: Any) -> Any:
    """A GraphML-safe attribute value (lists and dicts as JSON strings)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return json.dumps(value, ensure_ascii=False)


class CognitionGraph:
    """Concepts, associations, causal candidates and analogies over a networkx graph."""

    def __init__(self, graph: nx.MultiDiGraph | None = None, vectors: dict[str, np.ndarray] | None = None,
                 settings: GraphSettings | None = None) -> None:
        self.graph = graph if graph is not None else nx.MultiDiGraph()
        self.vectors: dict[str, np.ndarray] = dict(vectors or {})
        self.settings = settings or GraphSettings()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_events(cls, sequences: Sequence[Sequence[Any]], *, vectors: dict[str, Any] | None = None,
                    settings: GraphSettings | None = None, node_attrs: dict[str, dict[str, Any]] | None = None,
                    ) -> CognitionGraph:
        """A graph from event sequences: each sequence is a list of time steps, each step an
        event name or a collection of names (events at the same time). ``vectors`` gives
        nodes a vector for analogies; without it, nodes get distributional vectors (SVD of
        their PPMI co-activation profile)."""
        s = settings or GraphSettings()
        steps = [[_step_events(step) for step in seq] for seq in sequences]
        names = sorted({e for seq in steps for step in seq for e in step})
        index = {n: i for i, n in enumerate(names)}
        E = len(names)
        self = cls(settings=s)
        if E == 0:
            return self
        blocks, futures, nears = [], [], []
        for seq in steps:
            T = len(seq)
            if T == 0:
                continue
            P = np.zeros((T, E), dtype=np.float64)
            for t, step in enumerate(seq):
                for e in step:
                    P[t, index[e]] = 1.0
            F = np.zeros_like(P)  # F[t, b]: b occurs in (t, t + lag]
            for d in range(1, s.lag + 1):
                if d < T:
                    F[:-d] = np.maximum(F[:-d], P[d:])
            N = P.copy()  # N[t, b]: b occurs within association_window steps of t (either side)
            for d in range(1, s.association_window + 1):
                if d < T:
                    N[:-d] = np.maximum(N[:-d], P[d:])
                    N[d:] = np.maximum(N[d:], P[:-d])
            blocks.append(P)
            futures.append(F)
            nears.append(N)
        P, F, N = np.concatenate(blocks), np.concatenate(futures), np.concatenate(nears)
        T = P.shape[0]
        count = P.sum(0)
        for n, i in index.items():
            attrs = {"kind": "event", "count": int(count[i])}
            attrs.update((node_attrs or {}).get(n, {}))
            self.graph.add_node(n, **attrs)

        # associations: co-activation within the window; PMI against the chance that the
        # other event is within the window of a random step
        co = P.T @ N  # (i, j): steps with i that have j within the window
        near = N.mean(0)
        with np.errstate(divide="ignore"):
            pmi = np.log(np.maximum(co, 1e-12) / np.maximum(count[:, None] * near[None, :], 1e-12))
        pair_count, pair_pmi = (co + co.T) / 2.0, (pmi + pmi.T) / 2.0
        for i, j in zip(*np.nonzero(np.triu(pair_count >= s.min_association, 1))):
            if pair_pmi[i, j] >= s.min_pmi:
                self.graph.add_edge(names[i], names[j], key="association", weight=int(round(pair_count[i, j])),
                                    pmi=round(float(pair_pmi[i, j]), 4))

        # causal candidates: contingency of "B follows A within lag steps"
        joint = P.T @ F  # (A, B): steps with A whose next `lag` steps hold B
        follows = F.sum(0)
        p_b_a = joint / np.maximum(count[:, None], 1)
        p_b_not_a = (follows[None, :] - joint) / np.maximum(T - count[:, None], 1)
        delta = p_b_a - p_b_not_a
        ok = (joint >= s.min_count) & (delta >= s.min_delta_p)
        np.fill_diagonal(ok, False)
        candidates = {(int(a), int(b)) for a, b in zip(*np.nonzero(ok))}
        if s.screen:
            candidates -= self._screened(candidates, P, F, p_b_not_a, delta, s)
        for a, b in sorted(candidates):
            self.graph.add_edge(names[a], names[b], key="causes", delta_p=round(float(delta[a, b]), 4),
                                count=int(joint[a, b]), p_b_given_a=round(float(p_b_a[a, b]), 4),
                                p_b_given_not_a=round(float(p_b_not_a[a, b]), 4))

        if vectors is not None:
            self.vectors = {str(k): np.asarray(v, dtype=np.float64) for k, v in vectors.items()}
        else:
            self.vectors = self._distributional(names, P, N)
        self.graph.graph.update(source="events", sequences=len(steps), steps=int(T))
        return self

    @staticmethod
    def _screened(candidates: set[tuple[int, int]], P: np.ndarray, F: np.ndarray, p_b_not_a: np.ndarray,
                  delta: np.ndarray, s: GraphSettings) -> set[tuple[int, int]]:
        """Candidates another candidate screens off (conditional contrasts)."""
        dropped = set()
        present, follows = P > 0, F > 0
        for x, b in candidates:
            # a mediator: x -> m -> b, and b no longer follows x more than usual unless m does
            for m in range(P.shape[1]):
                if m in (x, b) or (x, m) not in candidates or (m, b) not in candidates:
                    continue
                without = present[:, x] & ~follows[:, m]
                n = without.sum()
                if n == 0 or follows[without, b].mean() - p_b_not_a[x, b] < s.min_delta_p:
                    dropped.add((x, b))
                    break
            if (x, b) in dropped:
                continue
            # a co-occurring cause: a -> b too, and x no longer predicts b on steps without a
            for a in range(P.shape[1]):
                if a in (x, b) or (a, b) not in candidates:
                    continue
                rest = ~present[:, a]
                with_x, without_x = rest & present[:, x], rest & ~present[:, x]
                if with_x.sum() < s.min_count or without_x.sum() == 0:
                    # x is (almost) never seen without a: dropped if a predicts b without x
                    a_alone, neither = present[:, a] & ~present[:, x], ~present[:, a] & ~present[:, x]
                    if a_alone.sum() >= s.min_count and neither.sum():
                        screened = follows[a_alone, b].mean() - follows[neither, b].mean() >= s.min_delta_p
                    else:
                        screened = delta[x, b] < delta[a, b]  # never seen apart: the weaker one goes
                else:
                    screened = follows[with_x, b].mean() - follows[without_x, b].mean() < s.min_delta_p
                if screened:
                    dropped.add((x, b))
                    break
        return dropped

    @staticmethod
    def _distributional(names: list[str], P: np.ndarray, N: np.ndarray) -> dict[str, np.ndarray]:
        """Vectors from each event's PPMI co-activation profile, reduced by SVD."""
        co = P.T @ N
        total = co.sum()
        if total <= 0:
            return {}
        row, col = co.sum(1, keepdims=True), co.sum(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ppmi = np.maximum(np.log(co * total / np.maximum(row * col, 1e-12)), 0)
        ppmi = np.nan_to_num(ppmi)
        u, sv, _ = np.linalg.svd(ppmi, full_matrices=False)
        k = max(1, min(32, len(names) - 1))
        vecs = u[:, :k] * np.sqrt(sv[:k])
        return {n: vecs[i] for i, n in enumerate(names)}

    @classmethod
    def from_model(cls, model: ModelHandle, settings: GraphSettings | None = None) -> CognitionGraph:
        """A graph of what ``model`` stored: its tiers' keys clustered into concepts, its
        stored texts and episodes as concept sequences (see the module docs)."""
        s = settings or GraphSettings()
        items = _memory_items(model)
        if items["keys"].shape[0] == 0:
            raise CortexError("this model's memory is empty: nothing to build a graph from "
                              "(store something first, e.g. model.remember(text) or a chat)")
        keys = items["keys"]
        n = keys.shape[0]
        if n > s.max_items:
            keep = np.sort(np.random.default_rng(s.seed).choice(n, s.max_items, replace=False))
            items = {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]) for k, v in items.items()}
            keys, n = items["keys"], s.max_items
        k = max(1, min(s.concepts, n // s.min_concept_size))
        centroids, assign = _kmeans(keys, k, s.seed, s.restarts)
        k = centroids.shape[0]
        names = [f"c{i}" for i in range(k)]
        tok = model.tokenizer
        attrs = _concept_attrs(items, assign, k, tok)
        sequences = _memory_sequences(items, assign, names, s.min_run)
        sequences += _episode_sequences(model, centroids, names, s.min_run)
        graph = cls.from_events(sequences, vectors={names[i]: centroids[i] for i in range(k)}, settings=s,
                                node_attrs={names[i]: attrs[i] for i in range(k)})
        for i, name in enumerate(names):  # concepts no sequence mentions are still concepts
            if name not in graph.graph:
                graph.graph.add_node(name, **{"kind": "concept", "count": 0, **attrs[i]})
        graph.graph.graph.update(source="model", model=model.manifest.name, entries=int(n))
        return graph

    def add_relation(self, a: str, b: str, kind: str, **attrs: Any) -> None:
        """Add a typed relation edge ``a -> b`` (nodes are created as needed)."""
        for node in (a, b):
            if node not in self.graph:
                self.graph.add_node(node, kind="entity", count=0)
        self.graph.add_edge(a, b, key=kind, **attrs)

    # ------------------------------------------------------------------ queries

    def concept_of(self, keys: Any) -> list[str]:
        """The concept each of ``keys`` (N, d) belongs to: the nearest centroid by cosine,
        as memory entries are assigned when the graph is built."""
        names = [c["id"] for c in self.concepts() if c["id"] in self.vectors]
        if not names:
            raise CortexError("this graph has no concepts with centroids (build it from a model)")
        cents = np.stack([self.vectors[n] for n in names]).astype(np.float64)
        x = np.asarray(keys, dtype=np.float64).reshape(-1, cents.shape[1])
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cents = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        return [names[i] for i in (x @ cents.T).argmax(1)]

    def concepts(self) -> list[dict[str, Any]]:
        """Concept nodes with their attributes, largest first."""
        rows = [{"id": n, **d} for n, d in self.graph.nodes(data=True) if d.get("kind") == "concept"]
        return sorted(rows, key=lambda r: -int(r.get("size", 0)))

    def _edges(self, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [(u, v, d) for u, v, key, d in self.graph.edges(keys=True, data=True) if key == kind]

    def causal_edges(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every causal candidate ``(cause, effect, attributes)``, strongest first."""
        return sorted(self._edges("causes"), key=lambda e: -e[2]["delta_p"])

    def causes(self, x: str) -> list[tuple[str, float, int]]:
        """What causes ``x``: ``(cause, delta_p, count)``, strongest first."""
        self._check(x)
        rows = [(u, d["delta_p"], d["count"]) for u, _, key, d in self.graph.in_edges(x, keys=True, data=True)
                if key == "causes"]
        return sorted(rows, key=lambda r: -r[1])

    def effects(self, x: str) -> list[tuple[str, float, int]]:
        """What ``x`` causes: ``(effect, delta_p, count)``, strongest first."""
        self._check(x)
        rows = [(v, d["delta_p"], d["count"]) for _, v, key, d in self.graph.out_edges(x, keys=True, data=True)
                if key == "causes"]
        return sorted(rows, key=lambda r: -r[1])

    def associations(self, x: str) -> list[tuple[str, int, float]]:
        """Nodes co-activated with ``x``: ``(node, count, pmi)``, by PMI."""
        self._check(x)
        rows = [(v, d["weight"], d["pmi"]) for _, v, key, d in self.graph.out_edges(x, keys=True, data=True)
                if key == "association"]
        rows += [(u, d["weight"], d["pmi"]) for u, _, key, d in self.graph.in_edges(x, keys=True, data=True)
                 if key == "association"]
        return sorted(rows, key=lambda r: -r[2])

    def relation(self, a: str, b: str) -> set[str]:
        """The relations from ``a`` to ``b``: edge kinds, ``>`` for a -> b, ``<`` for b -> a
        (associations are undirected)."""
        out = set()
        for key in (self.graph.get_edge_data(a, b) or {}):
            out.add(key if key == "association" else f"{key}>")
        for key in (self.graph.get_edge_data(b, a) or {}):
            out.add(key if key == "association" else f"{key}<")
        return out

    def analogy(self, a: str, b: str, c: str, k: int = 1) -> str | list[tuple[str, float]] | None:
        """``a : b :: c : ?`` — the best ``d`` (``k`` > 1: the best ``k`` with scores).

        Score: cosine of ``v_d - v_c`` with ``v_b - v_a`` (relation vectors, when nodes have
        vectors) plus ``structure_weight`` x Jaccard agreement of ``relation(c, d)`` with
        ``relation(a, b)``.
        """
        for x in (a, b, c):
            self._check(x)
        want = self.relation(a, b)
        va, vb, vc = (self.vectors.get(x) for x in (a, b, c))
        offset = None
        if va is not None and vb is not None and vc is not None:
            offset = vb - va
        scores = []
        for d in self.graph.nodes:
            if d in (a, b, c):
                continue
            score = 0.0
            vd = self.vectors.get(d)
            if offset is not None and vd is not None:
                diff = vd - vc
                denom = np.linalg.norm(diff) * np.linalg.norm(offset)
                score += float(diff @ offset / denom) if denom > 0 else 0.0
            if want:
                have = self.relation(c, d)
                score += self.settings.structure_weight * len(want & have) / len(want | have)
            scores.append((d, score))
        if not scores:
            return None
        scores.sort(key=lambda r: -r[1])
        return scores[0][0] if k == 1 else scores[:k]

    def _check(self, x: str) -> None:
        if x not in self.graph:
            raise KeyError(f"{x!r} is not a node of this graph")

    def summary(self) -> dict[str, Any]:
        kinds = Counter(key for _, _, key in self.graph.edges(keys=True))
        nodes = Counter(d.get("kind", "?") for _, d in self.graph.nodes(data=True))
        return {
            "nodes": self.graph.number_of_nodes(),
            "edges": self.graph.number_of_edges(),
            "concepts": nodes.get("concept", 0),
            "events": nodes.get("event", 0),
            "associations": kinds.get("association", 0),
            "causal": kinds.get("causes", 0),
            "relations": {k: v for k, v in kinds.items() if k not in ("association", "causes")},
            **{k: v for k, v in self.graph.graph.items() if isinstance(v, (int, float, str))},
        }

    # ------------------------------------------------------------------ files

    def _export_graph(self) -> nx.MultiDiGraph:
        g = nx.MultiDiGraph()
        g.graph.update({k: _scalar(v) for k, v in self.graph.graph.items()})
        for n, d in self.graph.nodes(data=True):
            attrs = {k: _scalar(v) for k, v in d.items() if v is not None}
            if n in self.vectors:
                attrs["vector"] = " ".join(f"{x:.6g}" for x in np.asarray(self.vectors[n]).ravel())
            g.add_node(n, **attrs)
        for u, v, key, d in self.graph.edges(keys=True, data=True):
            g.add_edge(u, v, key=key, **{k: _scalar(x) for k, x in d.items() if x is not None})
        return g

    def export(self, path: str | Path) -> Path:
        """Write ``.graphml`` or ``.json`` (networkx node-link data), by suffix."""
        path = Path(path)
        g = self._export_graph()
        if path.suffix == ".graphml":
            nx.write_graphml(g, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps(nx.node_link_data(g, edges="edges"), indent=1, ensure_ascii=False) + "\n",
                            encoding="utf-8")
        else:
            raise CortexError(f"{path}: export to .graphml or .json")
        return path

    @classmethod
    def load(cls, path: str | Path, settings: GraphSettings | None = None) -> CognitionGraph:
        """Read a graph written by [`export`][cortex_plugins.cognition.cognition_graph.CognitionGraph.export]."""
        path = Path(path)
        if path.suffix == ".graphml":
            g = nx.read_graphml(path, force_multigraph=True)
        elif path.suffix == ".json":
            g = nx.node_link_graph(json.loads(path.read_text(encoding="utf-8")), directed=True, multigraph=True,
                                   edges="edges")
        else:
            raise CortexError(f"{path}: read a .graphml or .json graph")
        vectors = {}
        for n, d in g.nodes(data=True):
            vec = d.pop("vector", None)
            if vec:
                vectors[n] = np.array([float(x) for x in vec.split()])
        return cls(nx.MultiDiGraph(g), vectors, settings)

    def draw(self, path: str | Path, *, max_nodes: int = 60) -> Path:
        """Render the graph to a PNG (the ``max_nodes`` busiest nodes)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g = self.graph
        busiest = sorted(g.nodes, key=lambda n: -g.degree(n))[:max_nodes]
        sub = g.subgraph(busiest)
        pos = nx.spring_layout(nx.Graph(sub), seed=self.settings.seed)
        fig, ax = plt.subplots(figsize=(10, 8))
        sizes = [80 + 20 * math.sqrt(float(sub.nodes[n].get("size", sub.nodes[n].get("count", 1)) or 1)) for n in sub]
        nx.draw_networkx_nodes(sub, pos, node_size=sizes, node_color="#9ecae1", ax=ax)
        labels = {n: str(sub.nodes[n].get("label", n))[:18] for n in sub}
        nx.draw_networkx_labels(sub, pos, labels=labels, font_size=7, ax=ax)
        from matplotlib.lines import Line2D

        styles = {"association": ("#bbbbbb", "-"), "causes": ("#d62728", "-")}
        handles = []
        for key in sorted({k for _, _, k in sub.edges(keys=True)}):
            edges = [(u, v) for u, v, k in sub.edges(keys=True) if k == key]
            color, style = styles.get(key, ("#2ca02c", "--"))
            nx.draw_networkx_edges(nx.DiGraph(edges), pos, edgelist=edges, edge_color=color, style=style, ax=ax,
                                   arrows=key != "association", arrowsize=10)
            handles.append(Line2D([0], [0], color=color, linestyle=style, label=key))
        if handles:
            ax.legend(handles=handles, loc="lower right", fontsize=8)
        s = self.summary()
        ax.set_title(f"{s['nodes']} nodes, {s['associations']} associations, {s['causal']} causal candidates")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


# --------------------------------------------------------------------------- from a model


def _memory_items(model: ModelHandle) -> dict[str, Any]:
    """Every entry of every tier: keys (N, d) float32, tokens, streams, ids, order, tier, meta."""
    keys, tokens, streams, order, tiers, metas = [], [], [], [], [], []
    for tier in model.memory:
        got = _tier_entries(tier)
        if got is None:
            continue
        k, t, s, ids, meta = got
        keys.append(k)
        tokens.append(t)
        streams.append(s)
        order.append(ids)
        tiers += [tier.name] * len(t)
        metas += meta
    if not keys:
        return {"keys": np.zeros((0, 1), dtype=np.float32)}
    k = torch.nn.functional.normalize(torch.cat(keys).float(), dim=-1).numpy()
    return {"keys": k, "tokens": torch.cat(tokens).long().numpy(), "streams": torch.cat(streams).long().numpy(),
            "order": torch.cat(order).long().numpy(), "tier": np.array(tiers), "meta": metas}


def _tier_entries(tier: Any) -> tuple[torch.Tensor, ...] | None:
    """(keys, tokens, streams, ids, meta) of a tier, for the built-in tiers (and any tier
    with an ``entries()`` method returning an ``Entries``)."""
    if hasattr(tier, "entries") and callable(tier.entries):
        e = tier.entries()
        ids = torch.arange(len(e))
        return e.keys, e.tokens, e.streams, ids, list(e.meta or [None] * len(e))
    meta_of = getattr(tier, "meta_of", None)
    if hasattr(tier, "valid") and hasattr(tier, "stream_ids"):  # stm: (streams, slots) tables
        rows, cols = torch.nonzero(tier.valid, as_tuple=True)
        ids = tier.ids[rows, cols]
        return (tier.keys[rows, cols], tier.tokens[rows, cols], tier.stream_ids[rows], ids,
                meta_of(ids) if meta_of else [None] * len(ids))
    if hasattr(tier, "live"):  # ltm: slots
        slots = torch.nonzero(tier.live).flatten()
        ids = tier.ids[slots]
        return tier.keys[slots], tier.tokens[slots], tier.streams[slots], ids, meta_of(ids) if meta_of else [None] * len(ids)
    if hasattr(tier, "levels"):  # archive: compressed levels
        parts = []
        for level in tier.levels:
            if getattr(level, "n", 0) and level.trained:
                rows = torch.arange(level.n)
                ids = level.col("ids").long()
                parts.append((level.decode_keys(rows), level.col("tokens").long(), level.col("streams").long(), ids,
                              meta_of(ids) if meta_of else [None] * len(ids)))
        if parts:
            return tuple(torch.cat([p[i] for p in parts]) for i in range(4)) + ([m for p in parts for m in p[4]],)
    return None


def _kmeans(keys: np.ndarray, k: int, seed: int, restarts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means centroids (k, d) and assignments (N,), the best of ``restarts`` runs
    (one run can merge two clusters and split another); empty clusters are dropped."""
    import faiss

    x = np.ascontiguousarray(keys, dtype=np.float32)
    if k <= 1:
        c = x.mean(0, keepdims=True)
        c /= max(np.linalg.norm(c), 1e-12)
        return c, np.zeros(len(x), dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1,
                      nredo=restarts)
    km.train(x)
    _, assign = km.index.search(x, 1)
    assign = assign.ravel()
    used = np.unique(assign)
    remap = -np.ones(k, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return km.centroids[used].copy(), remap[assign]


def _concept_attrs(items: dict[str, Any], assign: np.ndarray, k: int, tok: Any) -> list[dict[str, Any]]:
    attrs = []
    encoded: dict[str, list[int]] = {}
    for c in range(k):
        members = np.nonzero(assign == c)[0]
        toks = Counter(int(t) for t in items["tokens"][members] if t >= 0)
        top = [t for t, _ in toks.most_common(5)]
        snippets: Counter[str] = Counter()
        for i in members[:200]:
            meta = items["meta"][i]
            if tok is not None and isinstance(meta, dict) and isinstance(meta.get("text"), str) and "position" in meta:
                ids = encoded.setdefault(meta["text"], tok.encode(meta["text"]))
                p = int(meta["position"])
                snippets[tok.decode(ids[max(0, p - 7):p + 2])] += 1
        tiers = Counter(items["tier"][members].tolist())
        # next tokens that are parts of a character (a byte tokenizer's Korean) decode to U+FFFD
        label = tok.decode(top[:3]).replace("\ufffd", "") if (tok is not None and top) else ""
        attrs.append({
            "kind": "concept", "size": int(len(members)),
            "label": (snippets.most_common(1)[0][0] if snippets else label).strip() or f"c{c}",
            "next_tokens": repr(tok.decode(top)) if tok is not None else json.dumps(top),
            "examples": " | ".join(s for s, _ in snippets.most_common(3)),
            "tiers": json.dumps(dict(tiers)),
        })
    return attrs


def _memory_sequences(items: dict[str, Any], assign: np.ndarray, names: list[str],
                      min_run: int = 1) -> list[list[str]]:
    """Concept sequences of stored texts (ordered by position, runs shorter than ``min_run``
    dropped) and of streams (by write order)."""
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for i, meta in enumerate(items["meta"]):
        stream = int(items["streams"][i])
        if isinstance(meta, dict) and "position" in meta:
            key = (stream, str(meta.get("text", "")))
            groups[key].append((int(meta["position"]), names[assign[i]]))
        else:
            groups[(stream, None)].append((int(items["order"][i]), names[assign[i]]))
    return [_collapse([n for _, n in sorted(rows)], min_run if key[1] is not None else 1)
            for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _collapse(seq: list[str], min_run: int = 1) -> list[str]:
    """Runs of one concept become one event (a concept persisting over positions is one event).

    Runs shorter than ``min_run`` positions are dropped first. A memory key sums the hidden
    states of several positions back (``key_offsets``), so neighbouring positions share most
    of their key: a concept that holds a single position between two others is the
    clustering flickering at a boundary, not an event, and such flicker would drown every
    contingency in noise.
    """
    runs: list[list[Any]] = []
    for n in seq:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    kept = [n for n, length in runs if length >= min_run]
    return [n for i, n in enumerate(kept) if i == 0 or n != kept[i - 1]]


def _episode_sequences(model: ModelHandle, centroids: np.ndarray, names: list[str],
                       min_run: int = 1) -> list[list[str]]:
    """Each stored episode (of an ``episodic`` feature) as a sequence of concepts."""
    episodic = [f for f in model.features if getattr(f, "name", "") == "episodic"]
    if not episodic or model.memory_system is None:
        return []
    ms = model.memory_system
    ctx = model.config.context
    cents = torch.from_numpy(np.ascontiguousarray(centroids)).float()
    out = []
    for feature in episodic:
        for ep in feature.replay(len(feature.episodes), strategy="oldest"):
            seq = []
            for start in range(0, ep.tokens.numel(), ctx):
                keys = ms.keys(ep.tokens[start:start + ctx].unsqueeze(0))[0]
                if keys.shape[-1] != cents.shape[-1]:
                    return out
                sims = torch.nn.functional.normalize(keys, dim=-1) @ cents.T
                seq += [names[i] for i in sims.argmax(1).tolist()]
            out.append(_collapse(seq, min_run))
    return out


# --------------------------------------------------------------------------- the feature


class CognitionGraphFeature(CognitiveFeature):
    """Builds the [`CognitionGraph`][cortex_plugins.cognition.cognition_graph.CognitionGraph] of a model's memory."""

    name = "cognition_graph"

    class Settings(GraphSettings):
        rebuild_in_sleep: bool = Field(False, description="Rebuild the graph at every REM phase of sleep.")

    def __init__(self, settings: Settings, context) -> None:
        super().__init__(settings, context)
        self.graph: CognitionGraph | None = None

    def graph_settings(self) -> GraphSettings:
        return GraphSettings(**self.settings.model_dump(exclude={"rebuild_in_sleep"}))

    def build(self, model: ModelHandle | None = None) -> CognitionGraph:
        """Build (and keep) the graph of ``model``'s memory (the model it was built into)."""
        model = model or (self.model if self.is_bound else None)
        if model is None:
            raise CortexError("cognition_graph: no model to build from")
        self.graph = CognitionGraph.from_model(model, self.graph_settings())
        return self.graph

    @hookimpl
    def cortex_sleep(self, model: ModelHandle, phase: str, step: int) -> None:
        if phase == "rem" and self.settings.rebuild_in_sleep:
            try:
                self.build(model)
            except CortexError:
                pass  # nothing stored yet

    def stats(self) -> dict[str, Any]:
        return self.graph.summary() if self.graph is not None else {}


def graph_of_run(model: ModelHandle) -> CognitionGraph:
    """The graph of a loaded run: with the run's ``cognition_graph`` settings when it has the feature."""
    for feature in model.features:
        if isinstance(feature, CognitionGraphFeature):
            return feature.build(model)
    return CognitionGraph.from_model(model)


@hookimpl
def cortex_register_components(register):
    register(CognitionGraphFeature)


@hookimpl
def cortex_register_commands(app):
    import typer
    from rich.console import Console
    from rich.table import Table

    @app.command()
    def graph(
        run: Path = typer.Argument(..., help="A run directory."),
        export: Optional[Path] = typer.Option(None, "--export", help="Write the graph to FILE.graphml or FILE.json."),
        png: Optional[Path] = typer.Option(None, "--png", help="Draw the graph to a PNG file."),
    ) -> None:
        """Build the concept / association / causal graph of a run's memory and summarise it."""
        from cortex import load

        if export is not None and export.suffix not in (".graphml", ".json"):
            raise CortexError(f"--export {export}: use a .graphml or .json file name")
        g = graph_of_run(load(run))
        s = g.summary()
        console = Console(width=200) if not sys.stdout.isatty() else Console()
        console.print(f"graph of {run}: {s['nodes']} nodes ({s['concepts']} concepts), "
                      f"{s['associations']} associations, {s['causal']} causal candidates", highlight=False)
        table = Table(title="concepts (largest first)")
        for column in ("concept", "size", "label", "causes", "effects"):
            table.add_column(column)
        for c in g.concepts()[:12]:
            table.add_row(c["id"], str(c.get("size", "")), str(c.get("label", "")),
                          ", ".join(u for u, _, _ in g.causes(c["id"])[:3]),
                          ", ".join(v for v, _, _ in g.effects(c["id"])[:3]))
        console.print(table)
        for u, v, d in g.causal_edges()[:10]:
            console.print(f"  {u} -> {v}  delta_p {d['delta_p']:.3f}  count {d['count']}", highlight=False)
        if export is not None:
            console.print(f"graph: {g.export(export)}")
        if png is not None:
            console.print(f"png: {g.draw(png)}")
