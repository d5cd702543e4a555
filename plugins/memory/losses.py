"""Memory-augmented losses: ``retrieval_loss``, ``stm_usage_loss`` and ``consolidation_loss``.

```yaml
model: {memory_layers: [1]}
memory: [{type: stm}]
memory_system: {read: [knn_attention]}
features:
  - {type: retrieval_loss, settings: {weight: 1.0}}
  - {type: stm_usage_loss, settings: {weight: 0.1}}
  - {type: consolidation_loss, settings: {weight: 0.1}}
```

Three features, each switched on by listing it and off by leaving it out (or ``weight: 0``).
Each returns its term from ``cortex_extra_losses``, so it is added to the language-modelling
loss and logged under its name in ``metrics.jsonl``. All three look at the kNN-attention
read of the last training forward pass: for each memory layer, the reader's query ``q`` (with
its gradient) and the slots of the tiers it read in training (``train_read_tiers``, each a
dense tier such as ``stm``), taken before the pass wrote its own entries. A slot is a
*positive* for a position when the token stored with it (what followed its key) is that
position's next token. The reader's attention over a row's slots is recomputed as it reads
(without the null slot, ``memory_system.null_slot``):
``softmax(q . key * scale)`` over the ``k`` best-scoring slots (no dropout or Gumbel noise).

* ``retrieval_loss`` (``memory/retrieval_loss``): InfoNCE over the retrieved candidates
  plus the positives, ``logsumexp(candidates) - logsumexp(positives)``, averaged over the
  positions with a positive in memory. Also logs ``memory/retrieval_hit``: the share of those
  positions whose best slot is a positive.
* ``stm_usage_loss`` (``memory/stm_usage_loss``): ``1 - H(u) / log n`` per row, with ``u``
  the attention mass each of the row's ``n`` filled slots receives over the segment: 0 when
  the reads spread over every slot, 1 when they all land on one.
* ``consolidation_loss`` (``memory/consolidation_loss``): STM counts a use of each slot a
  segment's reads retrieve (once per segment) and hands slots with enough uses to LTM, so the
  reads decide what moves. A counted use is *useful* when the slot is a positive for the
  position that reads it most. The hand-over is a count and carries no gradient; the logged
  ``memory/consolidation_precision`` measures it: the share of this step's counted uses that
  were useful. The loss is its differentiable side: each read slot weighs its strongest
  attention, and the loss is the share of that weight on slots that were not useful.

Every term trains the query path only: the reader's ``norm``, ``query`` and ``log_scale``,
and the blocks and embeddings below the memory layer (with ``query: key`` the query is the
stop-gradient memory key, so only ``log_scale``, the read's sharpness). Retrieved keys are stop-gradient, and
the reader's ``value``, ``out`` and ``gate`` get no gradient from these terms. A step whose
memory holds no positive (or no filled slot) logs no term.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from cortex import hookimpl
from cortex.kernel.errors import CortexError
from cortex.kernel.interfaces import CognitiveFeature, Settings
from cortex.kernel.lazy import torch

if TYPE_CHECKING:
    from cortex import ModelHandle


# --------------------------------------------------------------------------- the terms


def retrieval_nce(logits: torch.Tensor, keep: torch.Tensor, positive: torch.Tensor) -> torch.Tensor | None:
    """InfoNCE over the candidates ``keep | positive`` toward the ``positive`` slots, averaged
    over the positions with one; all (B, T, S). ``None`` when no position has a positive."""
    has = positive.any(dim=-1)
    if not bool(has.any()):
        return None
    logits = logits[has]
    every = torch.logsumexp(logits.masked_fill(~(keep | positive)[has], float("-inf")), dim=-1)
    right = torch.logsumexp(logits.masked_fill(~positive[has], float("-inf")), dim=-1)
    return (every - right).mean()


def usage_deficit(attn: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """``1 - H(u) / log n`` averaged over rows with two or more filled slots: ``u`` the share
    of attention ``attn`` (B, T, S) each slot receives, ``n`` the row's filled slots ``valid``
    (B, S). ``None`` when no row has two."""
    n = valid.sum(dim=-1)
    rows = n >= 2
    if not bool(rows.any()):
        return None
    mass = attn[rows].sum(dim=1)
    p = mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
    return (1 - entropy / torch.log(n[rows].float())).mean()


def wasted_reads(strongest: torch.Tensor, useful: torch.Tensor) -> torch.Tensor | None:
    """The share of read weight on slots whose strongest reader could not use them:
    ``strongest`` (B, S) the largest attention each slot received in the segment, ``useful``
    (B, S) whether it was a positive for the position that gave it. ``None`` when nothing was read."""
    total = strongest.sum()
    if float(total.detach()) <= 0:
        return None
    return (strongest * ~useful).sum() / total


# --------------------------------------------------------------------------- the read of the last pass


@dataclass
class Read:
    """One memory layer's read of a training pass, as the losses need it."""

    keys: torch.Tensor  # (B, S, d) stop-gradient
    tokens: torch.Tensor  # (B, S) what followed each slot's key; -1 where empty
    valid: torch.Tensor  # (B, S)
    scale: torch.Tensor  # the reader's logit scale (a parameter's exp)
    k: int
    q: torch.Tensor | None = None  # (B, T, d) normalised, with its gradient
    computed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # attention(), once per pass

    def attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, S), the reader's top-k ``keep`` and its attention over them
        (computed once: every loss of a pass shares them)."""
        if self.computed is None:
            self.computed = self._attention()
        return self.computed

    def _attention(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q.float()
        logits = torch.einsum("btd,bsd->bts", q, self.keys) * self.scale.float()
        scores = torch.einsum("btd,bsd->bts", q.detach(), self.keys).masked_fill(~self.valid[:, None, :], float("-inf"))
        top = scores.topk(min(self.k, scores.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & torch.isfinite(scores)
        attn = torch.softmax(logits.masked_fill(~keep, -1e9), dim=-1).masked_fill(~keep, 0.0)
        return logits, keep, attn


class ReadCapture:
    """Keeps the kNN-attention reads of a memory system's last training pass (one per memory
    layer), through hooks on its readers. Shared by every loss feature of one model."""

    _of: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, system: Any) -> ReadCapture:
        if system not in cls._of:
            cls._of[system] = cls(system)
        return cls._of[system]

    def __init__(self, system: Any) -> None:
        self.system = system
        self.reads: dict[int, Read] = {}
        for i, reader in enumerate(system.readers):
            reader.register_forward_pre_hook(self._before(i))
            reader.query.register_forward_hook(self._query(i))

    def _before(self, i: int):
        def hook(reader, args):
            memory = args[1] if len(args) > 1 else None
            self.reads.pop(i, None)
            if memory is None or not reader.training or not torch.is_grad_enabled():
                return
            slots = [self._slots(tier, memory.streams)
                     for tier in self.system.tiers[: self.system.settings.train_read_tiers] if len(tier)]
            if slots:
                keys, tokens, valid = (torch.cat(part, dim=1) for part in zip(*slots))
                self.reads[i] = Read(keys.float(), tokens, valid, reader.log_scale.exp(), reader.settings.k)
                if reader.settings.query == "key":  # the keys query: no projection to hook
                    self.reads[i].q = memory.keys
        return hook

    def _query(self, i: int):
        def hook(module, args, out):
            read = self.reads.get(i)
            if read is not None and read.q is None:
                read.q = torch.nn.functional.normalize(out, dim=-1)
        return hook

    @staticmethod
    def _slots(tier: Any, streams: torch.Tensor):
        keys, _, valid = tier.dense_entries(streams)
        return keys.detach().clone(), tier.dense_tokens(streams).clone(), valid.clone()

    def latest(self, targets: torch.Tensor) -> list[tuple[Read, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each memory layer read in the last pass: logits, keep, attention and the
        positives (B, T, S) for ``targets`` (B, T)."""
        out = []
        for read in self.reads.values():
            if read.q is None or read.q.shape[:2] != targets.shape:
                continue
            logits, keep, attn = read.attention()
            positive = (read.tokens[:, None, :] == targets[:, :, None]) & read.valid[:, None, :] & (targets[:, :, None] >= 0)
            out.append((read, logits, keep, attn, positive))
        return out


# --------------------------------------------------------------------------- the features


class _MemoryLoss(CognitiveFeature):
    """What the three losses share: the capture, the weight and the averaging over layers."""

    metric: ClassVar[str]  # the name the term is logged under
    measure: ClassVar[str] = ""  # the name of its measured figure, if any

    class Settings(Settings):
        weight: float = Field(1.0, ge=0, description="Weight of the term beside the LM loss (0: off).")

    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__(settings, context)
        self.capture: ReadCapture | None = None
        self.measured: list[float] = []

    @hookimpl
    def cortex_model_built(self, model: ModelHandle) -> None:
        system = model.memory_system
        if system is None or not system.readers:
            raise CortexError(f"{self.name} trains the kNN-attention read: give the model memory tiers, "
                             "memory_system.read: [knn_attention] and model.memory_layers, e.g. [1]")
        for tier in system.tiers[: system.settings.train_read_tiers]:
            if not callable(getattr(tier, "dense_tokens", None)):
                raise CortexError(f"{self.name} needs the tiers read in training to be dense (such as stm); "
                                 f"{tier.key} is searched: lower memory_system.train_read_tiers")
        self.capture = ReadCapture.of(system)

    @hookimpl
    def cortex_extra_losses(self, model: ModelHandle, batch: torch.Tensor, logits: torch.Tensor):
        if self.capture is None or self.settings.weight == 0:
            return None
        with torch.autocast(device_type=batch.device.type, enabled=False):
            terms = [t for t in (self.term(*read) for read in self.capture.latest(batch[:, 1:])) if t is not None]
        if not terms:
            return None
        return {self.metric: self.settings.weight * torch.stack(terms).mean()}

    @hookimpl
    def cortex_after_step(self, model: ModelHandle, step: int, metrics: dict[str, float]) -> None:
        if self.measured:
            metrics[self.measure] = sum(self.measured) / len(self.measured)
        self.measured = []

    def term(self, read: Read, logits, keep, attn, positive) -> torch.Tensor | None:
        """This loss for one layer's read: logits, keep, attention and positives (B, T, S)."""
        raise NotImplementedError


class RetrievalLoss(_MemoryLoss):
    """InfoNCE toward the stored keys whose continuation is the next token (module docs)."""

    name = "retrieval_loss"
    metric = "memory/retrieval_loss"
    measure = "memory/retrieval_hit"

    def term(self, read, logits, keep, attn, positive):
        has = positive.any(dim=-1)
        if bool(has.any()):
            best = logits.detach().masked_fill(~read.valid[:, None, :], float("-inf")).argmax(dim=-1, keepdim=True)
            self.measured.append(float(positive.gather(-1, best)[..., 0][has].float().mean()))
        return retrieval_nce(logits, keep, positive)


class StmUsageLoss(_MemoryLoss):
    """Entropy of slot use, against reads collapsing onto a few slots (module docs)."""

    name = "stm_usage_loss"
    metric = "memory/stm_usage_loss"

    class Settings(_MemoryLoss.Settings):
        weight: float = Field(0.1, ge=0, description="Weight of the term beside the LM loss (0: off).")

    def term(self, read, logits, keep, attn, positive):
        return usage_deficit(attn, read.valid)


class ConsolidationLoss(_MemoryLoss):
    """What STM hands to LTM should be what reads use (module docs)."""

    name = "consolidation_loss"
    metric = "memory/consolidation_loss"
    measure = "memory/consolidation_precision"

    class Settings(_MemoryLoss.Settings):
        weight: float = Field(0.1, ge=0, description="Weight of the term beside the LM loss (0: off).")

    def term(self, read, logits, keep, attn, positive):
        strongest, reader = attn.max(dim=1)  # each slot's strongest read and the position giving it
        useful = positive.gather(1, reader[:, None, :])[:, 0, :]
        counted = keep.any(dim=1)
        if bool(counted.any()):
            self.measured.append(float((counted & useful).sum()) / float(counted.sum()))
        return wasted_reads(strongest, useful)


@hookimpl
def cortex_register_components(register):
    register(RetrievalLoss)
    register(StmUsageLoss)
    register(ConsolidationLoss)

