"""The reader (``reader``): binding a name to what the context says is the read path's job.

```yaml
features:
  - {type: reader}           # combine: poe, eps: 0.05, read_eps: 0.01, beta: 1, fold_case: true
train:
  data: {type: demo, settings: {updates: 0.3}}
```

Two parts:

**A learned pointer over the model's own context.** After the last block a
[`PointerHead`][cortex_plugins.cognition._pointer_head.PointerHead] turns each position's
hidden state into a key; the token that followed the position is its value. The query of
the current position attends over every earlier key, with a learned bias per
log-distance bucket, a rarity-weighted word overlap between the query's sentence and the
key's (names and values weigh, template words do not), a learned bonus per token that
ends equally at both (a told wording is continued as told) and a learned penalty where a
later key like this one exists in a sentence about the same name (the later of two
statements wins). With a byte tokenizer, UTF-8 keeps the pointer on values that can come
next (a character's first byte where one starts). The attention mass on each value is a
next-token distribution, combined with the model's as a product of experts (``combine: poe``)::

    p(w) ∝ p_model(w) · (eps + p_ptr(w))^beta      (read_eps in place of eps when reading)

The model supplies the template and the type of the answer, the pointer which one; where
the pointer sees nothing the model is unchanged. (``combine: gate`` is the learned
mixture ``g p_ptr + (1 - g) p_model`` it replaced; its gate learnt to stay shut.) Training
adds the combined distribution's negative log-likelihood to the LM loss
(``reader/pointer``), with gradients into the core.

**Told text read by meaning.** ``model.remember``ed texts and chat prompts are kept per
session, sentence by sentence (bounded, saved with the run). Before a prompt is answered,
the told sentences that
share a rare word with it (rarity from the demo corpus; a relevance floor, so unrelated
prompts read nothing; a first-person word counts as rare, since in a session "I" is its
speaker, and a prompt sharing no such word reads its speaker's statements, "my" and "I"
counting as one; a word many of the session's texts share weighs less, so a name outweighs a
wording) are put back before it, oldest first, and the pointer reads them like any fact
in the prompt. A ``bge_m3`` feature listed before the reader adds the texts its dense
embeddings find.

The model consults the feature through the
[`CognitiveFeature`][cortex.kernel.interfaces.CognitiveFeature] read path:
``remember``, ``context_for`` and ``adjust_logits``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import torch

if TYPE_CHECKING:
    from cortex import ModelHandle
    from cortex_plugins.cognition._pointer_head import PointerHead

_WORD = re.compile(r"[\w']+", re.UNICODE)
_CLITIC = re.compile(r"'(s|m|re|ve|ll|d)$")
#: the speaker of a chat session: told text in the first person is about whoever asks in it
SELF_WORDS = frozenset({"i", "my", "me", "mine", "나", "내", "저", "제"})
#: particles after a Korean first-person word (나는, 내가, 저도, 나를, 제게)
_SELF_PARTICLES = frozenset("는가도를의랑게")
#: closed-class words, no evidence of what a text is about however rare the demo corpus has
#: them ("How old am I?" shares "am" with "I am tired.", not with "I'm 60 years old."); not "will" or "may": names
FUNCTION_WORDS = frozenset(
    "a an the am is are was were be been being do does did have has had to of in on at by for with from "
    "and or but so not no it its this that these those there here can could would shall should "
    "might must very too just quite bit some any all you your we our they their he she him her his them "
    "좀 그 이 그리고 하지만 그런데 정말 아주 너무 조금".split())


def words(text: str) -> list[str]:
    """Lower-cased words; a possessive ``'s``, a contraction's ``'m`` and Korean particles
    are cut, so that ``Mina's`` and ``민아는`` give the name and ``I'm`` gives ``i``. A cut
    that leaves a first-person word counts only before a particle a pronoun takes (나는,
    내가; not 내선 or 저녁)."""
    out = []
    for w in _WORD.findall(text.lower()):
        w = _CLITIC.sub("", w)
        stem = w[:-1]
        if w and "\uac00" <= w[0] <= "\ud7a3" and stem and (stem not in SELF_WORDS or w[-1] in _SELF_PARTICLES):
            out.append(stem)  # 민아는 -> 민아, 부산에 -> 부산 (and the whole word too)
        out.append(w)
    return out


def speaker_words(text: str) -> set[str]:
    """The set of ``words``, every first-person word (``SELF_WORDS``) counted as ``i``: "What
    is my job?" and "I am a nurse." are about one person, the session's speaker."""
    return {"i" if w in SELF_WORDS else w for w in words(text)}


class Reader(CognitiveFeature):
    """The pointer read over the context and the told text that feeds it (module docs)."""

    name = "reader"

    class Settings(Settings):
        dim: int = Field(64, gt=0, description="Width of the pointer's queries and keys.")
        weight: float = Field(1.0, ge=0, description="Weight of the pointer loss beside the LM loss.")
        train_rows: float = Field(1.0, gt=0, le=1, description="Share of each training batch's rows (the first "
                                                               "ones) the pointer's losses read: its (T, T) "
                                                               "work per step shrinks with it.")
        direct: float = Field(0.0, ge=0, description="Weight of the pointer's own negative log-likelihood of "
                                                       "the next token where a key it sees holds it "
                                                       "(``reader/direct``): the pointer lands on the answer's "
                                                       "key, not on one whose value the model vetoes.")
        combine: Literal["poe", "gate"] = Field(
            "poe", description="How the pointer meets the model: `poe` (product of experts, "
                               "p ∝ p_model (eps + p_ptr)^beta) or `gate` (a learned mixture gate).")
        eps: float = Field(0.05, gt=0, description="poe: the floor of the pointer's factor in training.")
        read_eps: float = Field(0.01, gt=0, description="poe: the floor of the pointer's factor when reading "
                                                        "(generation, confidence): lower lets the pointer "
                                                        "overrule a confident model.")
        beta: float = Field(1.0, gt=0, description="poe: the exponent of the pointer's factor.")
        fold_case: bool = Field(True, description="A byte and its other ASCII case count as one in the "
                                                   "pointer's factor (poe: told `apples` supports `Apples.`) "
                                                   "and, when reading, in its token match (told `gold` goes "
                                                   "on after an answer's `G`).")
        copying: bool = Field(False, description="poe: mix the product with the pointer's own distribution by a "
                                              "learned share that grows where the pointer continues a "
                                              "copy (a told name never seen in training).")
        look_ahead: bool = Field(False, description="A key in a sentence finished before the query's also "
                                                    "reads its sentence's end (a learned term, zero at "
                                                    "first): where the value comes before the words "
                                                    "saying what it is, as in Korean.")
        gate_bias: float = Field(-1.0, description="combine: gate: the initial logit of the gate.")
        recall: bool = Field(True, description="Put told texts relevant to a prompt back before it.")
        max_texts: int = Field(256, gt=0, description="Told sentences kept per session (the oldest dropped).")
        top: int = Field(4, gt=0, description="Told texts put back before a prompt at most.")
        keep: float = Field(0.75, ge=0, le=1, description="Told texts read score at least this share of the "
                                                          "best one's (a word many told texts share weighs less).")
        min_idf: float = Field(3.0, ge=0, description="Relevance floor: a told text is read only when it "
                                                     "shares with the prompt a word at least this rare (log "
                                                     "inverse document frequency in the demo corpus).")
        common_idf: float = Field(1.5, ge=0, description="Rarity subtracted from every word's in the "
                                                          "pointer's word overlap (template words weigh 0).")
        background: int = Field(4000, ge=0, description="Demo documents counted for word rarity.")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        self.head: PointerHead | None = None
        self.texts: dict[str, list[str]] = {}
        self._df: Counter | None = None
        self.counters = {"recalled": 0, "prompts": 0}

    @hookimpl
    def cortex_model_built(self, model: ModelHandle) -> None:
        from cortex import ByteTokenizer
        from cortex_plugins.cognition._pointer_head import PointerHead

        core = model.core
        last = core.config.layers - 1
        if core.memory_layer(last) is not None:
            raise ValueError("the reader sits after the last block, where another memory module already is")
        st = self.settings
        self.head = PointerHead(core.config.dim, st.dim, st.gate_bias, combine=st.combine, eps=st.eps,
                                beta=st.beta, fold_case=st.fold_case, read_eps=st.read_eps, copying=st.copying,
                                look_ahead=st.look_ahead)
        self.head.to(next(core.parameters()).device)
        self.head.idf = self.byte_idf
        self.head.utf8 = isinstance(model.tokenizer, ByteTokenizer)
        self.head.min_shared = st.min_idf - st.common_idf  # a word as rare as the relevance floor
        core.set_memory_layer(last, self.head)

    @hookimpl
    def cortex_extra_losses(self, model: ModelHandle, batch: torch.Tensor, logits: torch.Tensor):
        if self.head is None or self.settings.weight == 0 or self.head.hidden is None:
            return None
        rows = math.ceil(self.settings.train_rows * batch.shape[0])
        if rows < batch.shape[0]:
            batch, logits, self.head.hidden = batch[:rows], logits[:rows], self.head.hidden[:rows]
        targets = batch[:, 1:]
        logp, own = self.head.training_log_probs(logits, targets, targets, batch[:, :-1])
        valid = targets >= 0
        losses = {"reader/pointer": self.settings.weight * -(logp * valid).sum() / valid.sum().clamp_min(1)}
        if self.settings.direct > 0:
            held = valid & ~own.isnan()
            losses["reader/direct"] = self.settings.direct * -own.nan_to_num(0.0).mul(held).sum() / held.sum().clamp_min(1)
        return losses

    # -- the read path (called by the model) ----------------------------------------------

    def remember(self, text: str, session: str) -> int:
        """Keep each sentence of ``text`` as a told text of its own: a question then reads the
        statements that share its rare word, not everything told with them."""
        from cortex.model import told_sentences  # here: the command line starts without torch

        sentences = told_sentences(text)
        kept = self.texts.setdefault(session, [])
        kept.extend(sentences)
        del kept[: -self.settings.max_texts]
        return len(sentences)

    def context_for(self, prompt: str, session: str) -> str:
        """``prompt`` with the relevant told texts before it (the prompt itself unchanged)."""
        self.counters["prompts"] += 1
        found = self.recall(prompt, session) if self.settings.recall else []
        if not found:
            return prompt
        self.counters["recalled"] += 1
        return " ".join(found) + "\n" + prompt

    def adjust_logits(self, ids: torch.Tensor, logits: torch.Tensor, session: str) -> torch.Tensor:
        """The pointer combined with ``logits``: log-probabilities of the same shape."""
        if self.head is None:
            return logits
        if logits.dim() == 2:
            return self.head.mix_last(ids, logits)
        with torch.no_grad():
            return self.head.sequence_log_probs(logits, ids)

    # -- told text ----------------------------------------------------------------------

    def idf(self, word: str) -> float:
        """log((N + 1) / (df + 0.5)) over a background sample of the demo corpus: template
        words are common, names and values rarer, a never-seen word the rarest; a
        ``FUNCTION_WORDS`` word weighs 0."""
        if word in FUNCTION_WORDS:
            return 0.0
        if self._df is None:
            from cortex_plugins.data.demo import demo_documents

            self._df = Counter()
            for doc in demo_documents(self.settings.background, seed=12345):
                self._df.update(set(words(doc.text)))
        return math.log((self.settings.background + 1) / (self._df.get(word, 0) + 0.5))

    def byte_idf(self, word: bytes) -> float:
        """Rarity of a byte-level word (see ``idf``); words common in the corpus weigh 0."""
        return max(0.0, self.idf(word.decode("utf-8", errors="replace")) - self.settings.common_idf)

    def recall(self, prompt: str, session: str) -> list[str]:
        """Told texts of ``session`` relevant to ``prompt``, oldest first.

        A text is relevant when it shares with the prompt a word at least as rare as the floor
        (``min_idf``; a first-person word, ``SELF_WORDS``, counts as that rare: in a session
        "I live in Busan." and "Where do I live?" are about its speaker). Its score is its
        best shared word's rarity times how few of the session's texts hold that word, and
        only texts scoring ``keep`` of the best are read: among many statements in one
        wording, the one sharing the asked name, not every one sharing the wording. A prompt
        that shares no such word reads the texts it shares its speaker with: every
        first-person word counts as one (``speaker_words``), so "What is my job?" reads "I
        am a nurse." (and only then: "my name" otherwise reads "My name is Aris." alone)."""
        kept = self.texts.get(session, [])
        return (self._relevant(kept, prompt, lambda text: set(words(text)))
                or self._relevant(kept, prompt, speaker_words))

    def _relevant(self, kept: list[str], prompt: str, bag_of: Callable[[str], set[str]]) -> list[str]:
        """``recall`` with the word sets ``bag_of`` gives."""
        asked = bag_of(prompt)
        told = [bag_of(text) for text in kept]
        df = Counter(w for bag in told for w in bag & asked)
        norm = math.log((len(kept) + 1) / 1.5)
        scored = []
        for i, (text, bag) in enumerate(zip(kept, told)):
            if text in prompt:
                continue
            shared = asked & bag
            rare = {w: self.settings.min_idf if w in SELF_WORDS else self.idf(w) for w in shared}
            if rare and max(rare.values()) >= self.settings.min_idf:
                scored.append((max(r * math.log((len(kept) + 1) / (df[w] + 0.5)) / norm for w, r in rare.items()), i))
        floor = self.settings.keep * max((score for score, _ in scored), default=0.0)
        best = sorted((x for x in scored if x[0] >= floor), reverse=True)[: self.settings.top]
        return [kept[i] for _, i in sorted(best, key=lambda s: s[1])]

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "sessions": len(self.texts), "texts": sum(map(len, self.texts.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {"texts": {k: list(v) for k, v in self.texts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.texts = {k: list(v) for k, v in state.get("texts", {}).items()}


@hookimpl
def cortex_register_components(register):
    register(Reader)
