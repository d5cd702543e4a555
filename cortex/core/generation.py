"""Token generation with the KV cache: sampling, streaming and the sliding window."""

from __future__ import annotations

from typing import Any, Callable

import torch


def generate(
    core: Any, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
    stream: Callable[[int], None] | None = None,
    adjust: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, memory: Any = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens sampled from ``core`` (a ``Transformer``) to ``idx``
    (B, T); return (B, T + new).

    ``temperature=0`` is greedy. ``top_k`` keeps the k likeliest tokens, ``top_p`` the
    smallest set whose probability reaches p. ``stream(token_id)`` is called for each
    new token (batch size 1 only). ``adjust(ids, logits)`` may replace the next-token
    logits (B, vocab) given the ids so far (kNN-LM uses it). ``memory`` goes to the
    core's memory modules at every step; a callable ``memory(ids, new)`` is asked at every
    step for what to give them about the last ``new`` positions of the ids so far. The
    model runs in eval mode meanwhile.

    Sliding window: the model attends to at most ``context`` tokens. When the cache is
    full, it is rebuilt from the last ``context // 2`` tokens (positions restart at 0)
    and generation continues from there.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("idx must be a non-empty (batch, length) tensor of token ids")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if stream is not None and idx.size(0) != 1:
        raise ValueError("stream needs batch size 1")
    context = core.config.context
    keep = max(1, context // 2)
    was_training = core.training
    core.eval()
    try:
        out = idx
        cache = core.new_cache(idx.size(0))
        window = out[:, -context:]
        logits = core.forward_cached(window, cache, 0, _read(memory, out, window.size(1)))[:, -1]
        pos = window.size(1)
        for i in range(max_new_tokens):
            if adjust is not None:
                logits = adjust(out, logits)
            token = _sample(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, token], dim=1)
            if stream is not None:
                stream(int(token))
            if i == max_new_tokens - 1:
                break
            if pos == context:  # full: rebuild from the last `keep` tokens
                cache.reset()
                window = out[:, -keep:]
                logits = core.forward_cached(window, cache, 0, _read(memory, out, window.size(1)))[:, -1]
                pos = window.size(1)
            else:
                logits = core.forward_cached(token, cache, pos, _read(memory, out, 1))[:, -1]
                pos += 1
        return out
    finally:
        core.train(was_training)


def _read(memory: Any, ids: torch.Tensor, new: int) -> Any:
    """What the memory modules get for a cached step over the last ``new`` of ``ids``:
    ``memory`` itself, or what it returns when it is a function of them."""
    return memory(ids, new) if callable(memory) else memory


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, vocab); returns (B, 1)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        k = min(int(top_k), logits.size(-1))
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
