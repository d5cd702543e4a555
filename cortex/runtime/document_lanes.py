"""Document lanes: each batch row reads one document's consecutive segments, in order.

With ``train.lanes: documents`` a batch row is a *lane* that reads a document from its
start to its end, one context-sized segment per step, then takes the next document nobody
has read yet. What a lane's earlier segments wrote to memory is there when its later
segments are read, and a lane's memory stream is cleared when it starts a new document, so
nothing read in one document comes from another (as Memorizing Transformers trained on long
documents).

Documents are found in any prepared dataset by its ``<eos>`` tokens (each document is
followed by one; see [`prepare`][cortex.runtime.data.prepare]). A document is read with the
``<eos>`` before it, so its first token is a target too (but the split's first document,
which has none). Documents that fit one segment
whole are packed, several to a segment, in file order; a segment never holds the end of a
long document and the start of another. The last segment of a document is filled up with
``<eos>`` whose targets are not trained (see ``lengths``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cortex.kernel.errors import DataError
from cortex.runtime.data import TokenDataset

__all__ = ["DocumentLanes", "LaneBatch", "document_ends"]

#: tokens scanned for ``<eos>`` at a time (bounds the memory of the scan)
_SCAN = 1 << 24


def document_ends(tokens: np.ndarray, eos: int) -> np.ndarray:
    """End (exclusive, after its ``<eos>``) of every document of ``tokens``; a last
    document without ``<eos>`` ends at the end of the split."""
    found = [np.flatnonzero(np.asarray(tokens[i : i + _SCAN]) == eos) + (i + 1) for i in range(0, len(tokens), _SCAN)]
    ends = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    return ends.astype(np.int64)


@dataclass
class LaneBatch:
    """One step of document lanes."""

    #: resume position: tokens each lane advanced including this batch (a multiple of seq_len)
    position: int
    #: (batch, seq_len + 1) token ids; a row's tokens past ``lengths`` are ``<eos>`` filling
    tokens: torch.Tensor
    #: (batch,) how many leading tokens of each row are the document's (targets after it are not trained)
    lengths: torch.Tensor
    #: (batch,) bool: the row starts a document, so its lane's memory must be cleared first
    fresh: torch.Tensor


class DocumentLanes:
    """The document lanes of a prepared split for ``batch`` rows of ``seq_len`` tokens.

    A *unit* is one document longer than a segment or several whole shorter ones; a unit of
    ``n`` tokens takes ``ceil((n - 1) / seq_len)`` segments. Lanes take units from a queue in
    file order (lane ``r`` starts with unit ``r``; a lane that finishes takes the next one,
    lower lanes first) and the queue starts over after the last unit.
    """

    def __init__(self, data: TokenDataset, batch: int, seq_len: int, eos: int) -> None:
        if batch < 1 or seq_len < 1:
            raise DataError(f"document lanes need batch and seq_len of at least 1, got {batch} and {seq_len}")
        self.data, self.batch, self.seq_len, self.eos = data, batch, seq_len, int(eos)
        ends = document_ends(data.tokens, self.eos)
        starts = np.concatenate(([0], ends[:-1]))
        firsts = np.maximum(starts - 1, 0)  # read from the <eos> before the document
        units: list[tuple[int, int]] = []
        pack_from = pack_to = -1
        for first, end in zip(firsts.tolist(), ends.tolist()):
            if end - first > seq_len + 1:  # a long document: a unit of its own
                if pack_from >= 0:
                    units.append((pack_from, pack_to))
                    pack_from = -1
                units.append((first, end))
            elif pack_from >= 0 and end - pack_from <= seq_len + 1:
                pack_to = end
            else:
                if pack_from >= 0:
                    units.append((pack_from, pack_to))
                pack_from, pack_to = first, end
        if pack_from >= 0:
            units.append((pack_from, pack_to))
        units = [(a, b) for a, b in units if b - a >= 2]
        self.documents = len(ends)
        if len(units) < batch:
            raise DataError(
                f"{data.path}: split {data.split!r} has {len(units)} document(s) to read in lanes, fewer than "
                f"the {batch} lanes of a batch — use more documents or a smaller train.batch")
        self.units = np.array(units, dtype=np.int64)
        self.segments = (self.units[:, 1] - self.units[:, 0] - 2) // seq_len + 1

    def batches(self, start: int = 0) -> Iterator[LaneBatch]:
        """Every step's [`LaneBatch`][cortex.runtime.document_lanes.LaneBatch] from position
        ``start`` (a multiple of ``seq_len``), forever; the same ``start`` gives the same batches."""
        if start < 0 or start % self.seq_len:
            raise DataError(f"start position {start} is not a multiple of seq_len {self.seq_len} — resume with "
                            "the batch and seq_len the position was saved with")
        B, T, count = self.batch, self.seq_len, len(self.units)
        unit = np.arange(B, dtype=np.int64)  # each lane's unit and the segment its unit began at
        began = np.zeros(B, dtype=np.int64)
        queue = [(int(self.segments[r]), r) for r in range(B)]  # (segment a lane's unit ends at, lane)
        heapq.heapify(queue)
        taken = B
        step = start // T
        span = np.arange(T + 1, dtype=np.int64)
        while True:
            while queue[0][0] <= step:  # lanes whose unit is done take the next one
                ends_at, r = heapq.heappop(queue)
                unit[r], began[r] = taken % count, ends_at
                taken += 1
                heapq.heappush(queue, (ends_at + int(self.segments[unit[r]]), r))
            a, b = self.units[unit, 0], self.units[unit, 1]
            first = a + (step - began) * T
            lengths = np.minimum(T + 1, b - first)
            index = first[:, None] + span[None, :]
            inside = span[None, :] < lengths[:, None]
            rows = np.where(inside, np.asarray(self.data.tokens[np.where(inside, index, first[:, None])]), self.eos)
            step += 1
            yield LaneBatch(step * T, torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(lengths),
                            torch.from_numpy(began == step - 1))
