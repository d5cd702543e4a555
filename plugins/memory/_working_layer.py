"""The module the ``working`` feature installs after a block (imported when a model is built)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class WorkingMemoryLayer(nn.Module):
    """The module installed after a block: reads the current task's slots, then writes."""

    def __init__(self, owner: Any, dim: int, inner: nn.Module | None = None) -> None:
        super().__init__()
        s = owner.settings
        self._owner = [owner]  # not a registered child: the feature is not a Module
        self.inner = inner
        self.norm = nn.RMSNorm(dim)
        self.query = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mix = nn.Parameter(torch.full((dim,), float(s.gate_init)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / s.read_temperature)))
        logits = torch.full((s.tasks, s.slots), -4.0)
        for t in range(s.tasks):  # tasks split the slots evenly (contiguous blocks)
            logits[t, t * s.slots // s.tasks:(t + 1) * s.slots // s.tasks] = 4.0
        self.task_gates = nn.Parameter(logits)
        with torch.no_grad():
            self.query.weight.copy_(torch.eye(dim))
            nn.init.normal_(self.out.weight, std=0.02)
        #: attention (B, T, slots) of the last forward call, for inspection and tests
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, memory: Any = None) -> torch.Tensor:
        if self.inner is not None:
            x = self.inner(x, memory)
        owner = self._owner[0]
        B, T, _ = x.shape
        streams = owner.current_streams(B, memory)
        keys, values, filled = owner.gather(streams, x.device)
        gate = owner.gate(self.task_gates)  # (S,) in [0, 1]
        out = x
        if bool(filled.any()):
            q = F.normalize(self.query(self.norm(x)), dim=-1)
            logits = torch.bmm(q, keys.to(q.dtype).transpose(1, 2)) * self.log_scale.exp()
            logits = logits + torch.log(gate.clamp_min(1e-6)).to(q.dtype)
            logits = logits.masked_fill(~filled[:, None, :], float("-inf"))
            attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing filled reads 0
            self.last_attention = attn.detach()
            read = torch.bmm(attn, values.to(q.dtype))
            out = x + torch.sigmoid(self.mix) * self.out(read)
        else:
            self.last_attention = torch.zeros(B, T, keys.shape[1], device=x.device)
        if owner.writing and T >= owner.settings.min_tokens:
            owner.write(streams, x[:, -1].detach())
        return out
