"""The frozen reference GPT: the yardstick for throughput figures.

A plain nanoGPT-style decoder built from torch alone: learned absolute position embeddings,
LayerNorm without bias, one fused qkv projection with causal scaled-dot-product attention,
a 4x GELU MLP without biases and tied input/output embeddings, initialised like the core.
Built from the same [`ModelConfig`][cortex.core.transformer.ModelConfig] as the core (RoPE and memory
fields are ignored), it answers "is the Cortex core as fast as a plain GPT of this shape?".

It was written once and must be left alone: do not tune it, or every speed ratio measured
against it loses its meaning. Its parameters, without the position table, equal the
core's (see [`comparable_parameters`][cortex.bench.reference.comparable_parameters]).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cortex.core.transformer import ModelConfig

__all__ = ["ReferenceGPT", "comparable_parameters"]


class _SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.c_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.c_proj(y))


class _MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * config.dim)
        self.c_fc = nn.Linear(config.dim, hidden, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.dim, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, bias=False)
        self.attn = _SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim, bias=False)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class ReferenceGPT(nn.Module):
    """nanoGPT-style GPT of the shape in ``config``; ``forward`` matches the core's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.context, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.dim, bias=False)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the model context {self.config.context}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss


def comparable_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (tied weights once), without a reference's position table.

    Equal for a [`ReferenceGPT`][cortex.bench.reference.ReferenceGPT] and a
    [`Transformer`][cortex.core.transformer.Transformer] built from the same config.
    """
    excluded = {id(model.wpe.weight)} if isinstance(model, ReferenceGPT) else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)
