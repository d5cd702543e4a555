"""CortexModel: the transformer core with its components, and the real-time API.

``model(idx, targets)`` trains; ``remember``, ``chat``, ``interact``, ``generate_text`` and
``confidence`` are real-time use, with no train/inference switch. It implements
[`ModelHandle`][cortex.kernel.interfaces.ModelHandle], the surface hooks and components use.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cortex.core.memory import KeyStream, MemorySystem, session_stream
from cortex.core.tokenizer import ByteTokenizer, Tokenizer
from cortex.core.transformer import ModelConfig, Transformer
from cortex.kernel.errors import CheckpointError, CortexError
from cortex.kernel.hookspecs import hookimpl
from cortex.kernel.interfaces import CognitiveFeature, Component, MemoryTier, PlasticityRule
from cortex.kernel.manifest import ResolvedComponent, ValidatedManifest
from cortex.kernel.plugins import CortexPluginManager

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def told_sentences(text: str) -> list[str]:
    """The sentences of a told text: split after ``.``, ``!`` or ``?`` before a space, and at
    line breaks."""
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]


class _RuleRunner:
    """Runs a model's plasticity rules at step end, in manifest order, after every other
    ``cortex_after_step`` implementation (so activity seen by replay in those is applied
    in the same step)."""

    def __init__(self, rules: list[PlasticityRule]) -> None:
        self.rules = rules

    @hookimpl(trylast=True)
    def cortex_after_step(self, model: Any, step: int, metrics: dict[str, float]) -> None:
        for rule in self.rules:
            rule.step_end(model, step, metrics)


class CortexModel(nn.Module):
    """The transformer core with its components and its own plugin manager.

    Calling the model runs the core: ``logits, loss = model(idx, targets)``. Lifecycle
    hooks are called through ``model.pm.hook``; every built component is registered there.
    """

    def __init__(
        self,
        built: ValidatedManifest,
        core: Transformer,
        tokenizer: Tokenizer,
        components: dict[str, list[Component]],
        pm: CortexPluginManager,
    ) -> None:
        super().__init__()
        self.core = core
        #: the validated manifest this model was assembled from
        self.validated = built
        self.manifest = built.manifest
        self.tokenizer = tokenizer
        self.pm = pm
        self.memory: list[MemoryTier] = components.get("memory", [])
        self.plasticity: list[PlasticityRule] = components.get("plasticity", [])
        self.features: list[Component] = components.get("features", [])
        self.memory_system: MemorySystem | None = None
        #: the generation token of the weights in the run directory this model was loaded
        #: from or last written to; its saved memory state records it (see ``runtime.rundir``)
        self.weights_generation: str | None = None
        #: the run directory this model was loaded from or last saved as: where ``save()`` writes
        self.run_dir: Path | None = None
        #: writes a run directory, ``(model, path or None) -> path``; set by ``cortex.runtime.rundir``
        #: when it loads or saves the model (the model cannot import the runtime: it is a layer below)
        self.run_writer: Callable[[Any, Path | None], Path] | None = None
        if self.memory:
            if self.manifest.memory_system.key_words and not isinstance(tokenizer, ByteTokenizer):
                raise CortexError("memory_system.key_words reads words of UTF-8 bytes: it needs "
                                  "`tokenizer: {type: byte}` (or key_words: 0)")
            self.memory_system = MemorySystem(self.manifest.memory_system, self.memory, core)
            pm.register(self.memory_system, name="memory_system")
        if self.plasticity:
            pm.register(_RuleRunner(self.plasticity), name="plasticity_rules")

    @property
    def config(self) -> ModelConfig:
        return self.core.config

    @property
    def components(self) -> list[Component]:
        return [*self.memory, *self.plasticity, *self.features]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                streams: torch.Tensor | None = None):
        """``(logits, loss)``. With memory, row ``b`` reads and writes stream ``streams[b]``.

        In training ``streams`` defaults to the row index. In eval mode memory is consulted
        only when ``streams`` is given (so validation measures the weights alone); then
        kNN-LM, when enabled, turns the logits into interpolated log-probabilities.
        """
        if self.memory_system is None or (streams is None and not self.training):
            return self.core(idx, targets)
        if streams is None:
            streams = torch.arange(idx.shape[0])
        return self.memory_system.forward(idx, targets, streams, training=self.training)

    # -- real-time use ---------------------------------------------------------------

    def remember(self, text: str, session: str = "self") -> int:
        """Store ``text`` in the memory of ``session`` and tell every feature (no training
        switch); returns the entries stored (the tiers', else what features kept)."""
        kept = self._keep(text, session)
        if kept is None:
            raise CortexError("this model has no memory tiers (and no feature keeps told text); "
                              "add `memory:` to its manifest")
        return kept

    def _keep(self, text: str, session: str) -> int | None:
        told = sum(feature.remember(text, session) for feature in self._cognitive())
        if self.memory_system is None:
            return told or None
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        return self.memory_system.remember(ids, session_stream(session), {"text": text, "session": session})

    def _cognitive(self) -> list[CognitiveFeature]:
        return [f for f in self.features if isinstance(f, CognitiveFeature)]

    def _read_prompt(self, prompt: str, session: str) -> str:
        """What the model reads for ``prompt``: every feature's ``context_for``, in manifest order."""
        for feature in self._cognitive():
            prompt = feature.context_for(prompt, session)
        return prompt

    def _read_ids(self, prompt: str, session: str) -> tuple[list[int], int]:
        """The token ids the model reads for ``prompt`` (see ``_read_prompt``) and where the
        prompt's own ids begin among them (0 when nothing was put in front, or the ids of
        the joined text do not end with the prompt's)."""
        read, own = self.tokenizer.encode(self._read_prompt(prompt, session)), self.tokenizer.encode(prompt)
        start = len(read) - len(own)
        return read, start if start > 0 and read[start:] == own else 0

    def _adjusters(self) -> list[CognitiveFeature]:
        return [f for f in self._cognitive() if type(f).adjust_logits is not CognitiveFeature.adjust_logits]

    def _knn_lm(self) -> bool:
        return self.memory_system is not None and "knn_lm" in self.memory_system.settings.read

    def _told_before(self, ids: torch.Tensor, start: int) -> Callable[[str | None], bool] | None:
        """With ``lm_recalled_only``, which told texts kNN-LM may read: those with a sentence
        among what the features put before the prompt (``ids[0, :start]``), so that a
        question reads the statements recalled for it and not a template it shares with
        others ("What is Yuna's locker number? 2869." for "What is Sejin's ...")."""
        if not (self._knn_lm() and self.memory_system.settings.lm_recalled_only) or start <= 0:
            return None
        front = self.tokenizer.decode(ids[0, :start].tolist())

        @functools.lru_cache(maxsize=None)
        def told(text: str | None) -> bool:
            return text is not None and any(sentence in front for sentence in told_sentences(text))
        return told

    def _adjust(self, ids: torch.Tensor, logits: torch.Tensor, session: str, *, touch: bool = True,
                keys: KeyStream | None = None, start: int = 0,
                told: Callable[[str | None], bool] | None = None) -> torch.Tensor:
        """Next-token scores after ``ids``: every feature's ``adjust_logits``, then kNN-LM.
        ``logits`` is (B, vocab) for the token after ``ids`` or (B, T, vocab) for every position;
        ``keys`` carries a generation's memory keys from token to token. kNN-LM reads ``ids``
        from ``start`` on: text the features put in front of the prompt is theirs to read,
        and kNN-LM keys the prompt as it would without them (see ``_read_ids``); ``told``
        (``_told_before``) picks the told texts it reads."""
        for feature in self._adjusters():
            logits = feature.adjust_logits(ids, logits, session)
        start = start if 0 < start < ids.shape[1] else 0
        if not self._knn_lm() or (self.memory_system.settings.lm_recalled_only and start == 0):
            return logits
        stream = session_stream(session)
        if logits.dim() == 2:
            return self.memory_system.knn_lm_next(ids[:, start:], logits, stream, keys=keys, told=told)
        read = self.memory_system.knn_lm_logits(ids[:, start:], logits[:, start:],
                                                torch.full((ids.shape[0],), stream), touch=touch, told=told)
        return torch.cat([logits[:, :start], read], dim=1)

    def chat(self, text: str, *, session: str = "self", learn: bool = True, **generation: Any) -> Reply:
        """A chat turn: the answer (the reply's first line: after it a model trained on
        documents goes on with a next line of its own), its confidence and the detected language."""
        answer = self.interact(text, session=session, learn=learn, **generation).strip("\n").split("\n")[0]
        confidence = self.confidence(text, answer, session=session) if answer else 0.0
        return Reply(answer, confidence, detect_language(answer or text))

    def save(self, path: str | Path | None = None) -> Path:
        """Write this model — weights, memory and every plugin's state, manifest, tokenizer — as
        a run directory, and return it; ``cortex.load`` reads it back.

        ``path`` ``None`` (or the run itself) rewrites the run the model was loaded from, in
        place: weights and state are replaced as one set (see ``cortex.runtime.rundir.write_into``)
        while the run's lock is held, so ``cortex chat`` or training on the same run refuses
        to start meanwhile, and the reverse. Another ``path`` becomes a new run directory, written
        in a temporary folder and renamed into place (an existing one is refused); later saves
        go there. A model assembled in Python is saved the first time with
        ``cortex.save_run(model, OUT_DIR)``.
        """
        if self.run_writer is None:
            raise CortexError("this model was assembled in Python and never saved: write it once with "
                              "cortex.save_run(model, OUT_DIR); after that model.save() rewrites it")
        return self.run_writer(self, None if path is None else Path(path))

    def stats(self) -> dict[str, Any]:
        """Memory use per tier, consolidation counts and every component's figures."""
        out: dict[str, Any] = {c.key: c.stats() for c in self.components}
        if self.memory_system is not None:
            out["memory_system"] = self.memory_system.summary()
        return out

    def interact(self, prompt: str, *, session: str = "self", learn: bool = True, **generation: Any) -> str:
        """One turn of real-time use: answer ``prompt``, then learn from it.

        The answer reads ``session``'s memory; the prompt is then stored there (with
        ``learn``) and ``cortex_interaction`` fires, so features such as a fast-weight
        path can learn from the turn. There is no train/inference switch.
        """
        response = self.generate_text(prompt, session=session, **generation)
        if learn:
            self._keep(prompt, session)
        self.pm.hook.cortex_interaction(model=self, session=session, prompt=prompt, response=response)
        return response

    @torch.no_grad()
    def confidence(self, prompt: str, answer: str, *, session: str = "self") -> float:
        """Mean probability the model (with ``session``'s memory) gives ``answer``'s tokens
        after ``prompt``, teacher-forced, read as generation reads it: told text put back,
        kNN-attention, the features' ``adjust_logits``, kNN-LM. Looking strengthens no memory."""
        p_ids, start = self._read_ids(prompt, session)
        a_ids = self.tokenizer.encode(answer)
        ids = torch.tensor([(p_ids + a_ids)[-(self.config.context + 1):]], dtype=torch.long)
        start -= len(p_ids) + len(a_ids) - ids.shape[1]  # positions cut off the front
        n = min(len(a_ids), ids.shape[1] - 1)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        read = None
        if self.memory_system is not None:
            read = self.memory_system.pass_read(inputs, torch.full((1,), session_stream(session)), touch=False)
        logits, _ = self.core(inputs, memory=read)
        logits = self._adjust(inputs, logits, session, touch=False, start=max(start, 0),
                              told=self._told_before(inputs, start))
        logp = torch.log_softmax(logits.float(), dim=-1)[0, -n:].gather(1, targets[0, -n:, None])
        return float(logp.exp().mean())

    @torch.no_grad()
    def generate_text(self, prompt: str, *, session: str = "self", max_new_tokens: int = 64,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      seed: int | None = None, stream: Any = None, stop_at_eos: bool = True) -> str:
        """Continue ``prompt``, reading the memory of ``session``; returns the new text."""
        read, start = self._read_ids(prompt, session)
        ids = torch.tensor([read or [self.tokenizer.eos_id]], dtype=torch.long)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        out = self.generate(ids, max_new_tokens, session=session, temperature=temperature, top_k=top_k,
                            top_p=top_p, generator=generator, stream=stream, prompt_start=start)
        new = out[0, ids.shape[1]:].tolist()
        if stop_at_eos and self.tokenizer.eos_id in new:
            new = new[: new.index(self.tokenizer.eos_id)]
        return self.tokenizer.decode(new)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, session: str = "self", prompt_start: int = 0,
                 **sampling: Any):
        """Token generation with the KV cache, reading ``session``'s memory and adjusted by
        the features' ``adjust_logits`` (see ``Transformer.generate``); ``prompt_start``: where
        the prompt begins in ``idx`` after what the features put in front of it."""
        ms = self.memory_system
        keys = KeyStream(ms) if self._knn_lm() else None  # kNN-LM's, over the prompt from prompt_start
        told = self._told_before(idx, prompt_start)
        adjust = (lambda ids, logits: self._adjust(ids, logits, session, keys=keys, start=prompt_start, told=told)) if self._knn_lm() or self._adjusters() else None
        read = None
        if ms is not None:  # kNN-attention's keys (query: key) over everything read
            read = ms.generation_read(torch.full((idx.shape[0],), session_stream(session)),
                                      KeyStream(ms) if ms.query_keys else None)
        return self.core.generate(idx, max_new_tokens, adjust=adjust, memory=read, **sampling)

    def _stateful(self) -> dict[str, Any]:
        parts: dict[str, Any] = {c.key: c for c in self.components}
        if self.memory_system is not None:
            parts["memory_system"] = self.memory_system
        return parts

    def plugin_state(self) -> dict[str, Any]:
        """Every component's ``state_dict`` (and the memory system's), keyed by component key."""
        return {key: state for key, part in self._stateful().items() if (state := part.state_dict())}

    def load_plugin_state(self, state: dict[str, Any], where: str = "the saved state") -> None:
        """Give each component back the state [`plugin_state`][cortex.model.CortexModel.plugin_state] saved.

        State that does not fit (another manifest's, or tampered with) is a
        [`CheckpointError`][cortex.kernel.errors.CheckpointError] naming ``where`` and the component."""
        for key, part in self._stateful().items():
            if key in state:
                try:
                    part.load_state_dict(state[key])
                except Exception as exc:  # a component's own check, or torch/FAISS refusing the data
                    raise CheckpointError(f"{where}: the state of {key!r} does not fit this model "
                                          f"({type(exc).__name__}: {str(exc)[:300]}) — was it written by "
                                          "another manifest, or changed by hand?") from None

    def summary(self) -> dict[str, Any]:
        """Parameters, shape, tokenizer and every component with its plugin source."""
        cfg = self.config

        def describe(c: Component, resolved: ResolvedComponent) -> dict[str, Any]:
            row = {
                "key": c.key,
                "name": resolved.info.name,
                "source": resolved.info.source.describe(),
                **({"target": c.target, "modules": len(c.targets)} if isinstance(c, PlasticityRule) else {}),
                **({"capacity": c.capacity} if isinstance(c, MemoryTier) else {}),
            }
            return row

        resolved = {r.key: r for r in self.validated.components}
        return {
            "name": self.manifest.name,
            "parameters": sum(p.numel() for p in self.parameters()),
            "model": {
                "dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads,
                "context": cfg.context, "vocab_size": cfg.vocab_size,
                "memory_layers": list(cfg.memory_layers),
            },
            "tokenizer": {**self.tokenizer.config(), "fingerprint": self.tokenizer.fingerprint},
            "components": {
                section: [describe(c, resolved[c.key]) for c in group]
                for section, group in (("memory", self.memory), ("plasticity", self.plasticity),
                                       ("features", self.features))
            },
        }


@dataclass
class Reply:
    """A chat answer with the mean probability of its tokens and its language (``ko``/``en``)."""

    text: str
    confidence: float
    language: str

    def __str__(self) -> str:
        return self.text


def detect_language(text: str) -> str:
    """``ko`` when Hangul makes up at least half of the letters, else ``en``."""
    letters = [ch for ch in text if ch.isalpha()]
    hangul = sum(1 for ch in letters if "\uac00" <= ch <= "\ud7a3" or "\u3131" <= ch <= "\u318e")
    return "ko" if letters and hangul * 2 >= len(letters) else "en"
