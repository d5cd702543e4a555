"""The fast low-rank path the ``cls`` feature adds beside an MLP (imported when a model is built)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FastAdapter(nn.Module):
    """``scale * B(act(A(x)))``: a small path in parallel with an MLP (``B`` starts at zero)."""

    def __init__(self, dim: int, width: int, scale: float, activation: str, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = scale
        self.activation = activation
        self.A = nn.Parameter(torch.randn(width, dim, generator=generator) / dim**0.5)
        self.B = nn.Parameter(torch.zeros(dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.A.to(x.dtype))
        if self.activation == "gelu":
            h = F.gelu(h)
        return self.scale * F.linear(h, self.B.to(x.dtype))
