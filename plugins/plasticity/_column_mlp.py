"""The MLP the ``cortical_columns`` rule puts in place of its targets (imported when it attaches)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cortex.kernel.interfaces import firing_rate


class ColumnMLP(nn.Module):
    """An MLP whose hidden layer is ``columns`` columns, ``active`` of them on per token."""

    def __init__(self, mlp: nn.Module, columns: int, active: int, *, selection: str = "topk",
                 temperature: float = 1.0) -> None:
        super().__init__()
        fc, proj = getattr(mlp, "fc", None), getattr(mlp, "proj", None)
        if not isinstance(fc, nn.Linear) or not isinstance(proj, nn.Linear):
            raise ValueError(f"an MLP with `fc` and `proj` nn.Linear layers is needed, got {type(mlp).__name__}")
        hidden = fc.out_features
        if hidden % columns:
            raise ValueError(f"the MLP's hidden width {hidden} is not divisible by columns={columns}")
        if not 1 <= active <= columns:
            raise ValueError(f"active columns must be in [1, {columns}], got {active}")
        self.fc, self.proj = fc, proj
        self.columns, self.active = columns, active
        self.selection, self.temperature = selection, temperature
        self.router = nn.Linear(fc.in_features, columns, bias=False).to(fc.weight.device, fc.weight.dtype)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        device = fc.weight.device
        #: balancing boost added to the selection scores only (set by the rule at step end)
        self.register_buffer("boost", torch.zeros(columns, device=device), persistent=False)
        # tokens routed to each column, and tokens seen, since the rule last read them
        self.register_buffer("usage", torch.zeros(columns, device=device), persistent=False)
        self.register_buffer("tokens", torch.zeros((), device=device), persistent=False)
        #: the (..., columns) 0/1 mask of the last forward pass
        self.last_mask: torch.Tensor | None = None

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The (..., columns) 0/1 mask of the ``active`` winning columns of each token."""
        sel = scores.detach().float() + self.boost
        if self.training and self.selection == "gumbel":
            uniform = torch.rand_like(sel).clamp_(1e-9, 1.0 - 1e-9)
            sel = sel - self.temperature * torch.log(-torch.log(uniform))
        winners = sel.topk(self.active, dim=-1).indices
        return torch.zeros_like(sel).scatter_(-1, winners, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.router(x)
        mask = self.select(scores)
        gates = scores.float().masked_fill(mask == 0, float("-inf")).softmax(-1) * self.active
        h = F.gelu(self.fc(x))
        h = h.unflatten(-1, (self.columns, -1)) * gates.to(h.dtype).unsqueeze(-1)
        if self.training:
            with torch.no_grad():
                n = mask.numel() // self.columns
                self.usage += firing_rate(mask, 0.5) * n
                self.tokens += n
        self.last_mask = mask.detach()
        return self.proj(h.flatten(-2))
