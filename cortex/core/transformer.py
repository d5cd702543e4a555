"""The transformer core: a decoder-only language model, readable in one file. Pre-norm blocks
(RMSNorm), rotary position embeddings (RoPE) on queries and keys, PyTorch scaled-dot-product
attention, a GELU MLP, no biases and tied input/output embeddings. Two things make it Cortex's
core rather than a plain GPT:

* **Memory insertion points.** Every block has a ``memory`` attribute, ``None`` by default.
  [`Transformer.set_memory_layer`][cortex.core.transformer.Transformer.set_memory_layer] installs a
  module there; it is called as ``x = module(x, memory)`` on the residual stream right after
  the block, where ``memory`` is what the caller passed to ``forward`` (the memory system
  passes a [`MemoryRead`][cortex.core.memory.MemoryRead]: the streams to read; ``None``
  means memory is not consulted). With nothing installed the forward pass pays for one
  ``if`` per block.
* **KV-cache generation.** [`Transformer.generate`][cortex.core.transformer.Transformer.generate] runs
  on a preallocated [`KVCache`][cortex.core.transformer.KVCache] through
  [`Transformer.forward_cached`][cortex.core.transformer.Transformer.forward_cached].

It must train as fast as the plain GPT of the same shape in
[`cortex.bench.reference`][cortex.bench.reference]. The code here is plain PyTorch; RMSNorm, the RoPE
split of q, k and v, and bf16 attention first ask [`cortex.core.cpu_kernels`][cortex.core.cpu_kernels]
for a faster kernel, which answers ``None`` where it has none (or is switched off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from cortex.core import cpu_kernels
from cortex.core.cpu_kernels import as_complex

__all__ = ["KVCache", "ModelConfig", "RMSNorm", "RopeTables", "Transformer", "apply_rope", "rope_frequencies"]


@dataclass
class ModelConfig:
    """The shape of a model. ``memory_layers`` lists the blocks after which memory may sit."""

    vocab_size: int
    dim: int
    layers: int
    heads: int
    context: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    memory_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "layers", "heads", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head dimension dim/heads = {self.head_dim} must be even for RoPE")
        if self.mlp_ratio <= 0 or int(self.mlp_ratio * self.dim) < 1:
            raise ValueError(f"ModelConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.rope_base <= 0:
            raise ValueError(f"ModelConfig.rope_base must be > 0, got {self.rope_base!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        self.memory_layers = tuple(self.memory_layers)
        for layer in self.memory_layers:
            if not isinstance(layer, int) or not 0 <= layer < self.layers:
                raise ValueError(f"ModelConfig.memory_layers: {layer!r} is not a block index in "
                                 f"[0, {self.layers - 1}]")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"ModelConfig.memory_layers has duplicates: {self.memory_layers}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer, ``int(mlp_ratio * dim)``."""
        return int(self.mlp_ratio * self.dim)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) with a faster CPU backward
    ([`cpu_kernels.rms_norm`][cortex.core.cpu_kernels.rms_norm]) where it applies."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu_kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps) if y is None else y


def rope_frequencies(head_dim: int, length: int, base: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations ``exp(i * pos * base^(-2j/head_dim))``, shape (length, head_dim/2).

    Dimensions ``2j`` and ``2j+1`` of a head form the pair rotated by frequency ``j``.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, n, head_dim) by position; ``freqs`` (T, head_dim/2) from
    [`rope_frequencies`][cortex.core.transformer.rope_frequencies]."""
    rotated = as_complex(x.float()) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class RopeTables(NamedTuple):
    """The rotations of positions ``start..end-1``: ``freqs`` for
    [`apply_rope`][cortex.core.transformer.apply_rope], the other two laid out for
    [`cpu_kernels`][cortex.core.cpu_kernels] (materialised over heads: multiplying by a
    broadcast table is slower on CPU)."""

    rotate: torch.Tensor  # (T, 2*heads, head_dim/2) complex64, for q and k together
    unrotate: torch.Tensor  # (T, heads, head_dim/2) complex64, the inverse, for gradients
    freqs: torch.Tensor  # (T, head_dim/2) complex64

    @classmethod
    def build(cls, freqs: torch.Tensor, heads: int) -> "RopeTables":
        rotate = freqs.unsqueeze(1).expand(-1, 2 * heads, -1).contiguous()
        return cls(rotate, rotate[:, :heads].conj().resolve_conj().contiguous(), freqs)


class KVCache:
    """Preallocated keys and values of every layer, ``(batch, heads, context, head_dim)``.

    Storage is allocated on the first write of each layer, with the dtype and device of
    the keys written (so it follows autocast). Positions ``[0, length)`` are valid.
    """

    def __init__(self, config: ModelConfig, batch_size: int) -> None:
        self.config = config
        self.batch_size = batch_size
        self.k: list[torch.Tensor | None] = [None] * config.layers
        self.v: list[torch.Tensor | None] = [None] * config.layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, ...]:
        """Write ``k``/``v`` (B, H, t, hd) at ``start_pos``; return the valid prefix."""
        end = start_pos + k.size(2)
        if self.k[layer] is None or self.k[layer].dtype != k.dtype or self.k[layer].device != k.device:
            shape = (self.batch_size, k.size(1), self.config.context, k.size(3))
            self.k[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        k_all, v_all = self.k[layer], self.v[layer]
        k_all[:, :, start_pos:end] = k
        v_all[:, :, start_pos:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]

    def reset(self) -> None:
        """Forget every position (storage is kept)."""
        self.length = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache | None = None, layer: int = 0,
                start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        dropout = self.dropout if self.training and cache is None else 0.0
        y = None
        if cache is None and mask is None and dropout == 0.0:  # bf16 training on CPU only
            y = cpu_kernels.causal_attention(qkv, rope, self.heads)
        if y is None:
            q, k, v = cpu_kernels.rotary_qkv(qkv, rope, self.heads, self.qkv) or self.split(qkv, rope)
            if cache is not None:
                k, v = cache.update(layer, k, v, start_pos)
            causal = mask is None and (cache is None or T > 1)  # else one new token, or a mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def split(self, qkv: torch.Tensor, rope: RopeTables) -> tuple[torch.Tensor, ...]:
        """q, k, v (B, heads, T, head_dim) of ``qkv`` (B, T, 3*dim), RoPE on q and k."""
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = apply_rope(q, rope.freqs), apply_rope(k, rope.freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block, followed by the optional memory module."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm1 = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        #: module called as ``x = memory(x, read)`` after this block; a plain attribute when None
        self.memory: nn.Module | None = None

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache | None = None,
                start_pos: int = 0, mask: torch.Tensor | None = None, memory: Any = None) -> torch.Tensor:
        x = self.body(x, rope, cache, start_pos, mask)
        return x if self.memory is None else self.memory(x, memory)

    def body(self, x: torch.Tensor, rope: RopeTables, cache: KVCache | None = None,
             start_pos: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention and MLP with their residuals, without the memory module."""
        x = x + self._drop(self.attn(self.norm1(x), rope, cache, self.index, start_pos, mask))
        return x + self._drop(self.mlp(self.norm2(x)))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.drop is None else self.drop(x)


class Transformer(nn.Module):
    """Decoder-only transformer; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        # stored as real (context, head_dim/2, 2) so that model.to(dtype) cannot drop the
        # imaginary part; viewed as complex float32 in forward
        freqs = rope_frequencies(config.head_dim, config.context, config.rope_base)
        self.register_buffer("rope_freqs", torch.view_as_real(freqs), persistent=False)
        self._step_rope: dict[tuple[int, torch.device], RopeTables] = {}  # see _rope
        #: recompute each block's activations in backward when training (less memory, more
        #: compute); blocks with a memory module are not recomputed (their reads have effects)
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; residual projections scaled by 1/sqrt(2 * layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def _rope(self, start: int, end: int) -> RopeTables:
        """RoPE rotations for positions start..end-1, built once per forward; a one-token
        step's are built once per position and device (generation asks for them every token)."""
        key = (start, self.rope_freqs.device)
        if end == start + 1 and key in self._step_rope:
            return self._step_rope[key]
        freqs = torch.view_as_complex(self.rope_freqs[start:end].float().contiguous())
        tables = RopeTables.build(freqs, self.config.heads)
        if end == start + 1:
            self._step_rope[key] = tables
        return tables

    def set_memory_layer(self, layer: int, module: nn.Module | None) -> None:
        """Install ``module`` after block ``layer`` (``x = module(x, memory)``); ``None`` removes it.

        The module becomes a registered child (``blocks.<layer>.memory``), so its
        parameters are trained and saved with the model. It sees the residual stream
        (B, T, dim) of the full sequence in training, and only the new positions in
        [`forward_cached`][cortex.core.transformer.Transformer.forward_cached].
        """
        if not isinstance(layer, int) or not 0 <= layer < self.config.layers:
            raise ValueError(f"memory layer {layer!r} is not a block index in [0, {self.config.layers - 1}]")
        block = self.blocks[layer]
        if module is None:
            block._modules.pop("memory", None)
            block.memory = None
        elif isinstance(module, nn.Module):
            block.memory = module
        else:
            raise TypeError(f"memory module must be an nn.Module or None, got {type(module).__name__}")

    def memory_layer(self, layer: int) -> nn.Module | None:
        """The module installed after block ``layer``, or ``None``."""
        return self.blocks[layer].memory

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                memory: Any = None) -> tuple[torch.Tensor, ...]:
        """Logits (B, T, vocab) for ``idx`` (B, T) and, given ``targets``, the mean
        cross-entropy (``-1`` targets are ignored). ``memory`` goes to the memory modules."""
        T = idx.size(1)
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the model context {self.config.context}")
        x = self.tok_emb(idx)
        if self.drop is not None:
            x = self.drop(x)
        rope = self._rope(0, T)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute and block.memory is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, memory=memory)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, *, layer: int, window: int = 0) -> torch.Tensor:
        """The residual stream (B, T, dim) after block ``layer`` (before its memory module).

        With ``window > 0`` each position attends to at most the last ``window`` tokens
        (itself included), so the result does not depend on distant context — the memory
        system's keys. Memory modules are skipped: keys are a function of the weights alone.
        """
        T = idx.size(1)
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the model context {self.config.context}")
        mask = None
        if 0 < window < T:
            pos = torch.arange(T, device=idx.device)
            offset = pos[:, None] - pos[None, :]
            mask = (offset >= 0) & (offset < window)
        x = self.tok_emb(idx)
        rope = self._rope(0, T)
        for block in self.blocks[: layer + 1]:
            x = block.body(x, rope, None, 0, mask)
        return x

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, start_pos: int, memory: Any = None) -> torch.Tensor:
        """Logits (B, t, vocab) for new tokens ``idx`` (B, t) at positions ``start_pos..``.

        Keys and values of earlier positions come from ``cache`` (filled by earlier calls);
        those of ``idx`` are written into it. Dropout is not applied. ``memory`` goes to the
        memory modules, as in ``forward``.
        """
        B, T = idx.shape
        end = start_pos + T
        if start_pos < 0 or end > self.config.context:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit the model context "
                             f"{self.config.context}")
        if start_pos > cache.length:
            raise ValueError(f"start_pos {start_pos} leaves a gap after cached length {cache.length}")
        if B != cache.batch_size:
            raise ValueError(f"batch size {B} does not match the cache's {cache.batch_size}")
        mask = None
        if T > 1 and start_pos > 0:  # query i sees keys 0..start_pos+i
            mask = torch.ones(T, end, dtype=torch.bool, device=idx.device).tril(diagonal=start_pos)
        x = self.tok_emb(idx)
        rope = self._rope(start_pos, end)
        for block in self.blocks:
            x = block(x, rope, cache, start_pos, mask, memory)
        cache.length = end
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` with the KV cache (see
        [`generation.generate`][cortex.core.generation.generate] for the options)."""
        from cortex.core.generation import generate

        return generate(self, idx, max_new_tokens, **sampling)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters; tied embeddings count once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
        return n
