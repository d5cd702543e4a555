"""The one training step. Everything that trains a Cortex model goes through
[`train_step`][cortex.runtime.step.train_step]; segments with memory, auxiliary losses, plasticity
rules and features extend it through the hooks, not by copying it.

Also here: [`make_optimizer`][cortex.runtime.step.make_optimizer] (AdamW with the usual decay
split) and [`cosine_schedule`][cortex.runtime.step.cosine_schedule] (linear warm-up, cosine decay).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
from torch import nn

from cortex.runtime.gpu import autocast_dtype

__all__ = ["PRECISIONS", "cosine_schedule", "make_optimizer", "train_step"]

PRECISIONS = ("fp32", "bf16")

#: metric names train_step itself reports; an extra loss may not use them
RESERVED_METRICS = frozenset({"loss", "grad_norm", "tokens", "lr", "skipped"})


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _collect_extra_losses(results: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Merge the dicts the plugins returned; a name returned twice is an error."""
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        if not result:
            continue
        for name, value in result.items():
            if name in merged:
                raise ValueError(f"extra loss {name!r} was returned by more than one plugin")
            if name in RESERVED_METRICS:
                raise ValueError(f"extra loss name {name!r} is reserved for train_step's own metrics")
            merged[name] = value
    return merged


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[torch.Tensor],
    *,
    step: int,
    hook: Any = None,
    precision: str = "fp32",
    clip: float | None = 1.0,
) -> dict[str, float]:
    """One optimiser update from gradient accumulated over ``micro_batches``.

    Each micro-batch is a LongTensor (B, T+1): inputs ``b[:, :-1]``, targets ``b[:, 1:]``.
    ``model(inputs, targets)`` must return ``(logits, loss)``. Each micro-batch's loss is
    scaled by ``1 / len(micro_batches)``, so equal-sized micro-batches give the gradient of
    their concatenation. ``precision="bf16"`` runs forwards (and the extra-loss hook) under
    bf16 autocast on the batch's device type; backward runs outside autocast.

    ``hook`` is a pluggy hook relay (``pm.hook``) or ``None``. With one:

    * ``cortex_before_step(model, step, batch)`` is called **once per step**, before the
      first forward, with the **first** micro-batch;
    * ``cortex_extra_losses(model, batch, logits)`` after **every** micro-batch's forward;
      the returned terms are added to that micro-batch's loss (same 1/n scaling);
    * ``cortex_after_step(model, step, metrics)`` after the optimiser update; plugins may
      add entries to ``metrics``, which is then returned.

    The model's train/eval mode is left as it is. Gradients are clipped to a total norm of
    ``clip`` (``None``: not clipped, the norm is still reported). A non-finite loss is not
    an error: it is reported in ``metrics``; when the gradient norm is not finite the
    optimiser update is skipped (``metrics["skipped"] == 1.0``) so the weights stay finite.

    Returns ``loss`` (mean LM loss over micro-batches), ``grad_norm``, ``tokens`` (targets
    processed), ``lr`` (of the first parameter group), ``skipped`` and the mean of each
    extra loss term by name.
    """
    if len(micro_batches) == 0:
        raise ValueError("train_step needs at least one micro-batch")
    n = len(micro_batches)
    device = micro_batches[0].device
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    if hook is not None:
        hook.cortex_before_step(model=model, step=step, batch=micro_batches[0])

    lm_total = torch.zeros((), device=device)
    extra_totals: dict[str, torch.Tensor] = {}
    tokens = 0
    for batch in micro_batches:
        if batch.dim() != 2 or batch.size(1) < 2:
            raise ValueError(f"a micro-batch must be (B, T+1) with T >= 1, got shape {tuple(batch.shape)}")
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with _autocast(precision, device):
            logits, lm_loss = model(inputs, targets)
            total = lm_loss
            if hook is not None:
                extras = _collect_extra_losses(
                    hook.cortex_extra_losses(model=model, batch=batch, logits=logits)
                )
                for name, value in extras.items():
                    total = total + value
                    detached = value.detach().float()
                    extra_totals[name] = extra_totals.get(name, 0.0) + detached
        (total / n).backward()
        lm_total += lm_loss.detach().float()
        tokens += targets.numel()

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grad_norm_value = float(grad_norm)
    skipped = not math.isfinite(grad_norm_value)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    metrics: dict[str, float] = {
        "loss": float(lm_total) / n,
        "grad_norm": grad_norm_value,
        "tokens": float(tokens),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "skipped": float(skipped),
    }
    for name, value in extra_totals.items():
        metrics[name] = float(value) / n
    if hook is not None:
        hook.cortex_after_step(model=model, step=step, metrics=metrics)
    return metrics


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (1 by default)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``.

    Weight decay applies to parameters with two or more dimensions (linear weights and the
    tied embedding/output matrix, as in nanoGPT); 1-D parameters (norm gains, biases) are
    not decayed. A parameter with an ``lr_scale`` attribute (a module's few scalar priors,
    which Adam's steps of about ``lr`` would move by one in a thousand steps) gets a group of
    its own at ``lr * lr_scale``; see [`set_lr`][cortex.runtime.step.set_lr]. Build the
    optimiser after installing memory modules, so their parameters are included. Uses the
    fused CPU/CUDA implementation when every parameter allows it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    scaled = [p for p in params if hasattr(p, "lr_scale")]
    params = [p for p in params if not hasattr(p, "lr_scale")]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"params": [p], "weight_decay": 0.0, "lr_scale": float(p.lr_scale), "lr": lr * p.lr_scale} for p in scaled),
    ]
    params += scaled
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def cosine_schedule(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up to ``lr`` over ``warmup`` steps,
    then cosine decay to ``min_lr`` at ``total``; ``min_lr`` afterwards."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
